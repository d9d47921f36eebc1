"""Part 03 - The modern decoder: RMSNorm, RoPE, SwiGLU, GQA, KV cache, sliding windows.

New in this part (each upgrade is a flag, so its effect can be measured)
  3.1 `RMSNorm` (`--norm layernorm|rmsnorm`).
  3.2 RoPE, rotary position embeddings (`--pos learned|sinusoidal|rope`): q and k are
      rotated by their position, so attention scores depend on relative distance.
  3.3 `SwiGLU` (`--mlp gelu|swiglu`), its hidden width chosen to match the GELU MLP's
      parameters; grouped-query attention (`--n_kv_head`).
  3.4 `KVCache`: prefill the prompt once, then decode one position per token; batched.
  3.5 Sliding-window attention and an attention sink (`--window`, `--sink`): one mask
      function, `attention_mask`, serves training and the cache.
  3.6 A rolling-buffer KV cache: a sliding-window RoPE model streams far past its context
      with memory bounded by sink + window entries.
  Defaults: the modern stack (RMSNorm, RoPE, SwiGLU, no biases). `--max_seconds` gives a
  run a wall-clock budget.

Run
  python part03_modern.py                        # modern stack, < 3 minutes on a 2-core CPU
  python part03_modern.py --ablate               # the before/after table (5 models, ~1 min each)
  python part03_modern.py --window 64 --sink 4   # sliding-window attention

Milestone: before/after benchmarks. `--ablate` trains the part02 baseline and each
cumulative upgrade (+RMSNorm, +RoPE, +SwiGLU, +GQA) for the same wall time and prints
params, tokens/s, val loss and bpb. Every run prints greedy tokens/s with and without the
KV cache (256 and 1024 new tokens) and the rolling cache's size while streaming 10x the
context. out/part03/summary.json: part02's keys, `kv_speedup`, `kv_bench`, `stream`, and
`ablation` (rows {name, params, tokens_per_s, val_loss, val_bpb}) with --ablate.

Masks now come from positions (`attention_mask`), for the cache and the window alike:
Replaces: causal_mask
"""

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal, get_args, get_origin

try:  # POSIX: file locks for the run folder
    import fcntl
except ImportError:
    fcntl = None
import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F


SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# ----------------------------------------------------------------------------------------
# Config: every hyperparameter, with the defaults of the milestone run. One flag per field.
# ----------------------------------------------------------------------------------------
@dataclass
class Config:
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 autocast where supported, else float32
    seed: int = 1337  # random seed: the same seed gives the same CPU run
    out_dir: str = "out/part03"  # ckpt.pt, metrics.jsonl, summary.json, samples.txt
    # data
    data: str = SHAKESPEARE_URL  # a .txt file, a folder of .txt files, or an http(s) URL
    data_dir: str = "data"  # where downloads and token caches are kept
    # model
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # model width
    block_size: int = 128  # context length in tokens (bytes here)
    vocab_size: int = 256  # vocabulary size: one token per byte value
    pos: Literal["learned", "sinusoidal", "rope"] = "rope"  # learned, sinusoidal: added to the input; rope: rotates q and k
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"  # normalization in each block and at the end
    mlp: Literal["gelu", "swiglu"] = "swiglu"  # gelu (4x, GELU) or swiglu (gated, same parameter count)
    n_kv_head: int = 0  # key/value heads, grouped-query attention (0 = n_head: plain multi-head)
    window: int = 0  # sliding-window attention: each query sees the last `window` positions (0 = all)
    sink: int = 0  # with --window: the first `sink` positions stay visible to every query
    bias: bool = False  # biases in Linear layers and LayerNorm
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    flash: bool = True  # attention through F.scaled_dot_product_attention (false: written out)
    # training
    batch_size: int = 8  # sequences per step
    max_steps: int = 2500  # optimizer steps
    learning_rate: float = 2e-3  # AdamW learning rate
    weight_decay: float = 0.1  # AdamW weight decay, on matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = off)
    eval_interval: int = 250  # evaluate (and checkpoint at a new best) every this many steps
    eval_iters: int = 20  # batches per split in each evaluation
    log_interval: int = 50  # print a progress line every this many steps
    overwrite: bool = False  # start over in an --out_dir that holds a run (its files are removed)
    max_seconds: float = 0.0  # stop after this many seconds of training steps (0 = run max_steps)
    ablate: bool = False  # the milestone table: baseline and each upgrade at equal wall time
    ablate_seconds: float = 60.0  # training budget of each model in --ablate
    # sampling
    sample_only: bool = False  # load out_dir/ckpt.pt and sample, without training
    prompt: str = ""  # text to continue; empty = start from a newline
    num_samples: int = 2  # samples to print
    max_new_tokens: int = 300  # tokens per sample
    temperature: float = 0.8  # < 1 sharpens the distribution, > 1 flattens it; 0 = greedy
    top_k: int = 0  # sample among the k most likely tokens only (0 = off)
    top_p: float = 1.0  # sample from the smallest set with this much probability (1 = off)


# ----------------------------------------------------------------------------------------
# Utilities: errors, command line, device and dtype, autocast, seeding, timing
# ----------------------------------------------------------------------------------------
def die(msg):
    """A user's mistake: one clear line on stderr, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line
        die(f"{self.prog}: {message}")


def _str2bool(s):
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _field_help(cls):
    """name -> the comment written after the field in the class source."""
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^=]+=.*?#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


def _finite(s):
    v = float(s)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def parse_args(argv=None, cls=Config):
    """Flags generated from the Config fields: `--n_layer 4` and `--n_layer=4` both work.
    A Literal field takes one of its values (--help lists them); a float must be finite."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
    parser = _Parser(description=doc[0] if doc else None,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        choices = get_args(f.type) if get_origin(f.type) is Literal else None
        kind = str if choices else _str2bool if f.type is bool else _finite if f.type is float else f.type
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, choices=choices,
                            nargs="?" if f.type is bool else None,
                            const=True if f.type is bool else None,
                            metavar=None if choices else f.type.__name__.upper(), help=helps.get(f.name, " "))
    return cls(**vars(parser.parse_args(argv)))


def pick_device(name):
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            die(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            die(f"--device {name}: no such GPU ({torch.cuda.device_count()} found)")
        return name
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            die("--device mps: MPS is not available on this machine")
        return name
    if name == "cpu":
        return name
    die(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name, device):
    """The compute dtype of autocast. 'auto': bf16 where the GPU supports it, else float32."""
    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        die(f"--dtype {name!r}: expected auto, float32, bfloat16 or float16")
    if name == "float16" and not device.startswith("cuda"):
        die("--dtype float16 needs a CUDA device (use bfloat16 or float32 here)")
    return DTYPES[name]


def autocast_ctx(device, dtype):
    """Mixed precision: matmuls run in `dtype`, weights and reductions stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def sync(device):
    """Wait for queued GPU work, so that a timer measures the work and not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


class Timer:
    """`with Timer(device) as t: ...` then `t.seconds`; synchronizes the device at both ends."""

    def __init__(self, device="cpu"):
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(path) as tmp:` write tmp; on success it is renamed over path, so a
    reader never sees half a file and a crash mid-write leaves the old file whole; on failure
    it is removed. The process id in its name keeps torchrun's ranks apart."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def json_safe(obj):
    """obj with NaN and infinities as None: strict JSON, which every reader accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)


def writable_dir(path, flag):
    """Make the folder a flag names, or end with one line saying why it cannot be: checked
    before any data is read or any model built."""
    if os.path.exists(path) and not os.path.isdir(path):
        die(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        die(f"{flag} {path}: cannot write there ({e.strerror or e})")


# ----------------------------------------------------------------------------------------
# 2.1 Tokenizer: text <-> bytes
# ----------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, nothing to train, every string representable.
    A character outside ASCII takes 2-4 tokens."""

    name = "byte"
    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        # A sampled id sequence may cut a multi-byte character: show U+FFFD, don't fail.
        return bytes(ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------
# 2.2 Data: a file, a folder or a URL -> cached token ids -> random training windows
# ----------------------------------------------------------------------------------------
def download(url, dest):
    """Stream `url` to `dest` through a temp file, so an interrupted download leaves nothing."""
    with atomic_path(dest) as tmp, requests.get(url, stream=True, timeout=(10, 60)) as r:
        r.raise_for_status()
        with open(tmp, "wb") as f:
            for chunk in r.iter_content(chunk_size=1 << 20):
                f.write(chunk)


def offline_corpus():
    """Text every CPython ships: the help topics of pydoc (about 0.5 MB of English)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(cfg):
    """Resolve --data to (text, name of what was used). Bad input ends the run (exit 2)."""
    spec = cfg.data
    if spec.startswith(("http://", "https://")):
        # one file per URL: two URLs ending in the same name must not share a cache
        url_hash = hashlib.sha1(spec.encode()).hexdigest()[:10]
        dest = os.path.join(cfg.data_dir, f"{url_hash}-{os.path.basename(spec.split('?')[0]) or 'download.txt'}")
        if spec == SHAKESPEARE_URL:
            dest = os.path.join(cfg.data_dir, "tinyshakespeare.txt")
        if not os.path.exists(dest):
            print(f"downloading {spec} -> {dest}")
            try:
                download(spec, dest)
            except (requests.RequestException, OSError) as e:
                if spec != SHAKESPEARE_URL:
                    die(f"--data {spec}: download failed ({type(e).__name__})")
                print(f"download failed ({type(e).__name__}); using the offline corpus "
                      "pydoc_data.topics instead")
                return offline_corpus(), "pydoc_data.topics"
        spec = dest
    if os.path.isdir(spec):
        files = sorted(f for f in os.listdir(spec) if f.endswith(".txt"))
        if not files:
            die(f"--data {spec}: the folder holds no .txt file")
        parts = []
        for f in files:
            with open(os.path.join(spec, f), "rb") as fh:
                parts.append(decode_text(fh.read(), os.path.join(spec, f)))
        return "\n\n".join(parts), spec
    if not os.path.exists(spec):
        die(f"--data {spec}: no such file or folder")
    if not os.path.isfile(spec):
        die(f"--data {spec}: not a regular file or a folder")
    with open(spec, "rb") as f:
        return decode_text(f.read(), spec), spec


def decode_text(raw, name):
    """UTF-8 bytes -> text. What is not UTF-8 becomes U+FFFD, and the run says how much."""
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if bad:
        print(f"note: --data {name}: {bad:,} byte sequences of {len(raw):,} bytes are not UTF-8 "
              "text (read as U+FFFD)")
    return text


def load_tokens(cfg, tokenizer):
    """Token ids of --data as a numpy memmap, encoded once and cached in data_dir."""
    text, name = load_text(cfg)
    key = hashlib.sha1(f"{tokenizer.name}:{len(text)}:".encode() + text.encode()).hexdigest()[:12]
    dtype = np.uint8 if tokenizer.vocab_size <= 256 else np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    path = os.path.join(cfg.data_dir, f"tokens-{key}.{tokenizer.name}.npy")
    try:  # the .npy header records dtype and length: a cut or foreign file fails here, then is rebuilt
        data = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        ids = np.array(tokenizer.encode(text), dtype=dtype)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # torchrun: every rank may write it
            np.save(f, ids)
        data = np.load(path, mmap_mode="r")
    if len(data) < 10 * (cfg.block_size + 1):  # 10% of it must still hold one window
        die(f"--data {name}: {len(data)} tokens is too short for --block_size {cfg.block_size} "
            f"(at least {10 * (cfg.block_size + 1)} needed for a 90/10 split)")
    return data, name


def split_data(data):
    """The first 90% trains, the last 10% validates."""
    n = int(0.9 * len(data))
    return data[:n], data[n:]


def get_batch(data, batch_size, block_size, device, generator=None):
    """batch_size random windows: x = data[i : i+T], y = data[i+1 : i+T+1] (the next tokens)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = ix.numpy()[:, None] + np.arange(block_size + 1)  # (B, T+1) positions
    window = torch.from_numpy(data[offsets].astype(np.int64))  # (B, T+1), one gather
    x, y = window[:, :-1], window[:, 1:]  # (B, T) each, y shifted by one
    if device.startswith("cuda"):  # page-locked memory lets the copy overlap compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------
# 1.1 Positional embeddings --------------------------------------------------------------
def sinusoidal_table(T, C):
    """(T, C) table: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(same angle).
    Each pair of columns is a rotation at its own frequency, so
    PE[p] . PE[p+d] = sum_i cos(d * w_i): it depends on the distance d alone."""
    pos = torch.arange(T, dtype=torch.float32)[:, None]  # (T, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, C, 2, dtype=torch.float32) / C)  # (C/2,)
    table = torch.zeros(T, C)
    table[:, 0::2] = torch.sin(pos * freq)  # (T, C/2)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class SinusoidalPositions(nn.Module):
    def __init__(self, block_size, n_embd):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(block_size, n_embd), persistent=False)

    def forward(self, pos):  # (T,) -> (T, C)
        return self.table[pos]


# 3.2 RoPE ---------------------------------------------------------------------------------
def rope_angles(positions, head_dim, base=10000.0):
    """cos and sin of the angles (T, head_dim/2): position p turns the feature pair
    (i, i + head_dim/2) by p * base^(-2i/head_dim), fast for small i, slow for large i."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, 1) * (1, hd/2) -> (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each feature pair of x (B, H, T, hd) by its position's angle. A query at p and
    a key at s then meet at angle (p - s): q.k depends on the distance alone, and no
    position vector is ever added to the residual stream."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, hd/2) each: the two halves of each pair
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


# 1.3 Scaled dot-product attention -------------------------------------------------------
def attention(q, k, v, mask, dropout=None):
    """softmax(q k^T / sqrt(d)) v over the keys `mask` allows. q, k, v: (..., T, d)."""
    att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (..., T, d) @ (..., d, T) -> (..., T, T)
    att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)  # softmax in float32 under autocast
    if dropout is not None:
        att = dropout(att)
    return att @ v, att  # (..., T, T) @ (..., T, d) -> (..., T, d)


# 3.5 Sliding window and attention sink ------------------------------------------------------
def attention_mask(q_pos, k_pos, window=0, sink=0):
    """(Tq, Tk) bool from absolute positions: query i sees key j when j <= i and either
    j > i - window (the last `window` positions, itself included) or j < sink (the first
    `sink` positions, which soak up attention a softmax must put somewhere).
    window = 0: plain causal attention. One function serves training and the KV cache."""
    q, k = q_pos[:, None], k_pos[None, :]  # (Tq, 1), (1, Tk)
    allowed = k <= q
    if window > 0:
        allowed = allowed & ((k > q - window) | (k < sink))
    return allowed


# 1.4 Multi-head attention ---------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """n_head heads side by side: one matmul makes q, k, v for all heads, a reshape splits
    them, each head attends on its own slice, and the output projection mixes the heads.
    Grouped-query attention: with n_kv_head < n_head, each key/value head serves
    n_head / n_kv_head query heads, and the KV cache shrinks by that factor."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.flash = cfg.n_head, cfg.flash
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.window, self.sink = cfg.window, cfg.sink
        self.kv_dim = self.n_kv_head * (cfg.n_embd // cfg.n_head)
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * self.kv_dim, bias=cfg.bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, pos=None, rope=None, cache=None, layer=0):
        B, T, C = x.shape
        hd = C // self.n_head
        if pos is None:
            pos = torch.arange(T, device=x.device)
        q, k, v = self.c_attn(x).split([C, self.kv_dim, self.kv_dim], dim=2)  # (B, T, C + 2*kv_dim) -> q, k, v
        # (B, T, C) -> (B, T, n_head, head_dim) -> (B, n_head, T, head_dim); k, v: n_kv_head heads
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_pos = pos
        if cache is not None:  # attend to the cached past as well: (B, Hkv, T, hd) -> (B, Hkv, L, hd)
            k, v, k_pos = cache.update(layer, k, v, pos)
        if self.n_kv_head != self.n_head:  # (B, n_kv_head, L, hd) -> (B, n_head, L, hd)
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if self.flash:  # the same math in one fused kernel
            p = self.attn_dropout.p if self.training else 0.0
            if self.window == 0 and k.size(2) == T:  # no cached past: plain causal
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            elif self.window == 0 and T == 1:  # one new token sees every cached key
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:
                mask = attention_mask(pos, k_pos, self.window, self.sink)  # (T, L)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            mask = attention_mask(pos, k_pos, self.window, self.sink)
            y, _ = attention(q, k, v, mask, self.attn_dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_head, T, hd) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# 3.4 / 3.6 The KV cache -----------------------------------------------------------------------
class KVCache:
    """The keys and values of every layer for the positions seen so far, so that each new
    token computes only its own q, k, v. Full attention: buffers sized for max_len positions,
    written in place (no copy of the past per token). With window > 0 it is a rolling
    buffer: after each step a layer keeps just the first `sink` positions and the last
    `window` - 1 (the next token makes `window`), so memory stays bounded however long the
    stream runs. Keys are stored already rotated by RoPE at their absolute position, so
    nothing is recomputed when older entries leave."""

    def __init__(self, n_layer, max_len, window=0, sink=0):
        self.max_len, self.window, self.sink = max_len, window, sink
        self.k = [None] * n_layer  # per layer: (B, n_kv_head, L, head_dim)
        self.v = [None] * n_layer
        self.pos = [None] * n_layer  # rolling buffer, per layer: (L,) absolute positions
        self.seen = 0  # tokens processed so far = the position of the next token

    def update(self, layer, k, v, pos):
        """Store the new entries; return every key, value and position to attend to."""
        if self.window == 0:
            if self.k[layer] is None:  # (B, Hkv, max_len, hd), filled from the left
                B, H, _, D = k.shape
                self.k[layer], self.v[layer] = k.new_empty(B, H, self.max_len, D), v.new_empty(B, H, self.max_len, D)
            end = self.seen + k.size(2)
            self.k[layer][:, :, self.seen:end] = k
            self.v[layer][:, :, self.seen:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end], torch.arange(end, device=k.device)
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)  # (B, Hkv, L, hd) + (B, Hkv, T, hd)
            v = torch.cat([self.v[layer], v], dim=2)
            pos = torch.cat([self.pos[layer], pos])
        keep = (pos < self.sink) | (pos > pos[-1] + 1 - self.window)  # what the next query can see
        self.k[layer], self.v[layer], self.pos[layer] = k[:, :, keep], v[:, :, keep], pos[keep]
        return k, v, pos

    def nbytes(self):
        return sum(t.nelement() * t.element_size() for t in self.k + self.v if t is not None)


# 1.5 MLP, GELU, LayerNorm ---------------------------------------------------------------
def gelu(x):
    """GELU(x) = x * Phi(x), Phi the standard normal CDF: a smooth ReLU."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class MLP(nn.Module):
    """Position-wise: widen 4x, GELU, project back."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.dropout(self.c_proj(gelu(self.c_fc(x))))


def swiglu_hidden(n_embd):
    """8C/3: three C x h matrices then hold the 8C^2 parameters of the 4x GELU MLP.
    Rounded to a multiple of 64, which matmul kernels like."""
    return max(64, 64 * round(8 * n_embd / 3 / 64))


class SwiGLU(nn.Module):
    """3.3 silu(x W_gate) * (x W_up), then W_down: the MLP of PaLM, Llama and Mistral. The
    gate decides, feature by feature, how much of the up-projection passes."""

    def __init__(self, cfg):
        super().__init__()
        hidden = swiglu_hidden(cfg.n_embd)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)  # gate and up in one matmul
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, 2h) -> 2 x (B, T, h) -> (B, T, C)
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class LayerNorm(nn.Module):
    """Normalize each vector to zero mean and unit variance over its C features, then
    scale and shift with learned weight and bias."""

    def __init__(self, n_embd, bias=True, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None

    def forward(self, x):  # (..., C) -> (..., C)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y


# 3.1 RMSNorm ------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Divide each vector by its root mean square, then scale by a learned gain: no mean to
    subtract, no bias. Cheaper than LayerNorm and as good in practice (Zhang & Sennrich 2019)."""

    def __init__(self, n_embd, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x):  # (..., C) -> (..., C), computed in float32
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg):
    return RMSNorm(cfg.n_embd) if cfg.norm == "rmsnorm" else LayerNorm(cfg.n_embd, bias=cfg.bias)


# 1.6 The block and the model -------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). The residual
    stream carries the input through untouched; each sublayer only adds to it."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def forward(self, x, pos=None, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), pos, rope, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The decoder: token embeddings (plus learned or sinusoidal positions; RoPE rotates q and
    k inside attention instead), n_layer pre-norm blocks, a final norm, and the LM head,
    which shares its matrix with the token embedding. forward(idx (B, T), targets (B, T) or
    None, cache) -> logits (B, T, vocab), loss or None; with a KVCache, idx continues the
    positions the cache has seen."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token id -> vector
        if cfg.pos == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # position -> vector
        elif cfg.pos == "sinusoidal":
            self.wpe = SinusoidalPositions(cfg.block_size, cfg.n_embd)
        else:  # rope: positions rotate q and k inside attention; nothing is added here
            self.wpe = None
            cos, sin = rope_angles(torch.arange(cfg.block_size), cfg.n_embd // cfg.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, head_dim/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes tokens
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections so
            if name.endswith("c_proj.weight"):  # the stream's variance does not grow with depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    @property
    def streams(self):
        """RoPE with a sliding window has no position limit: it can run past block_size."""
        return self.cfg.pos == "rope" and self.cfg.window > 0

    def new_cache(self):
        return KVCache(self.cfg.n_layer, self.cfg.block_size, self.cfg.window, self.cfg.sink)

    def rope(self, start, end):
        """cos, sin for positions start..end-1: a view of the precomputed table, or
        computed afresh when a stream runs past it."""
        if end <= self.rope_cos.size(0):
            return self.rope_cos[start:end], self.rope_sin[start:end]
        pos = torch.arange(start, end, device=self.rope_cos.device)
        return rope_angles(pos, self.cfg.n_embd // self.cfg.n_head)

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        start = cache.seen if cache is not None else 0  # position of idx[:, 0]
        if start + T > self.cfg.block_size and not self.streams:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.cfg.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        x = self.drop(x)
        rope = self.rope(start, start + T) if self.wpe is None else None
        for i, block in enumerate(self.h):
            x = block(x, pos, rope, cache, i)
        if cache is not None:
            cache.seen += T
        logits = self.lm_head(self.ln_f(x))  # (B, T, C) -> (B, T, vocab_size)
        loss = None
        if targets is not None:
            # 2.3 The loss. targets[b, t] is the token that follows idx[b, t] (get_batch made
            # it by shifting the window by one), so every position is a next-token
            # prediction: (B, T, V) logits vs (B, T) targets -> flatten to (B*T, V) vs (B*T,).
            # Cross-entropy is -log p(correct token) in nats, averaged over the B*T positions.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
def configure_optimizer(model, cfg, device):
    """AdamW. Weight decay pulls matrices (embeddings, Linear weights) toward zero; biases
    and norm gains are left alone: shrinking those does not regularize, it distorts."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.startswith("cuda"))


def bits_per_byte(loss, bytes_per_token=1.0):
    """Nats per token -> bits per byte: divide by ln 2 and by the bytes a token stands for,
    so that models with different tokenizers compare on one scale."""
    return loss / math.log(2) / bytes_per_token


@torch.no_grad()
def estimate_loss(model, splits, cfg, device, dtype):
    """2.6 Mean loss over eval_iters batches of each split. The batches come from a
    generator seeded the same way every time: successive evaluations see the same windows
    (less noise between them) and training's random stream is left untouched."""
    model.eval()
    out = {}
    for name, data in splits.items():
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = torch.zeros(cfg.eval_iters)
        for i in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, cfg.block_size, device, gen)
            with autocast_ctx(device, dtype):
                losses[i] = model(x, y)[1].item()
        out[name] = losses.mean().item()
    model.train()
    return out


def save_checkpoint(path, ckpt):
    """Write to a temp file, then rename: a crash mid-save leaves the old checkpoint whole,
    and a write that fails (a full disk) ends the run with one line."""
    try:
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        full = shutil.disk_usage(os.path.dirname(path) or ".").free < (1 << 26)
        why = "no space left on device" if full else str(e).strip().splitlines()[0]
        die(f"could not write {path}: {why}; the previous checkpoint is intact")


SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pos", "bias",
                "norm", "mlp", "n_kv_head", "window", "sink")


def check_finite(loss, step):
    """A loss that turned NaN or infinite does not come back: stop now, with one line, and
    keep the checkpoints saved before it."""
    if not math.isfinite(loss):
        die(f"training diverged: the loss is {loss} at step {step}; the checkpoints saved "
            "before it are kept (a lower --learning_rate may help)")


def load_checkpoint(path, cfg, device):
    """Read a checkpoint (tensors and plain values only: weights_only=True runs no code)
    and check that it holds the model this run asks for."""
    if not os.path.exists(path):
        die(f"no checkpoint at {path}: train first, or point --out_dir at a run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        die(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not (isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt):
        die(f"{path} is not a checkpoint of this project")
    saved, fields = ckpt["config"], {f.name: f.type for f in dataclasses.fields(cfg)}
    other = [k for k in SHAPE_FIELDS if k in saved and saved[k] != getattr(cfg, k)]
    foreign = [k for k in other if get_origin(fields[k]) is Literal and saved[k] not in get_args(fields[k])]
    if foreign:  # a later part's option: no flag of this part gives it
        die(f"{path} was written by another part ({', '.join(f'{k}={saved[k]}' for k in foreign)}); "
            "this part cannot load it")
    if other:
        die(f"{path} holds another model shape; pass "
            + ", ".join(f"--{k} {saved[k]} (this run: {getattr(cfg, k)})" for k in other))
    with torch.device("meta"):  # the names and shapes this part's model has, without memory
        want = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    got = {k: v.shape for k, v in ckpt["model"].items()}
    if got != want:
        odd = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
        die(f"{path} holds the weights of another model (e.g. {odd[0]}): another part or other "
            "flags wrote it")
    return ckpt


def train(model, train_data, val_data, cfg, device, dtype):
    """2.4 The loop: sample a batch, forward, backward, clip, step. Evaluate every
    eval_interval steps and checkpoint at each new best validation loss."""
    opt = configure_optimizer(model, cfg, device)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    tokens_per_step = cfg.batch_size * cfg.block_size
    best_val, eval_s = float("inf"), 0.0
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w", buffering=1)  # line by line
    t0 = time.perf_counter()
    model.train()
    for step in range(1, cfg.max_steps + 1):
        x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, device)
        with autocast_ctx(device, dtype):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:  # one bad batch cannot throw the weights far
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        out_of_time = cfg.max_seconds > 0 and time.perf_counter() - t0 - eval_s >= cfg.max_seconds

        if step % cfg.log_interval == 0 or step == 1:
            loss_f = loss.item()  # the one host sync of a logged step
            check_finite(loss_f, step)
            elapsed = time.perf_counter() - t0
            if step == 1:  # one-off costs (CUDA start-up, kernel choice) stay out of the rates
                first_s = elapsed
            n, secs = (step - 1, elapsed - first_s) if step > 1 else (1, first_s)
            tok_s = n * tokens_per_step / max(secs - eval_s, 1e-9)
            eta = secs / n * (cfg.max_steps - step)
            print(f"step {step:5d}/{cfg.max_steps} | loss {loss_f:.4f} | lr {cfg.learning_rate:.2e}"
                  f" | {tok_s:,.0f} tok/s | {elapsed:.0f}s, ETA {eta:.0f}s")
            metrics.write(json.dumps({"step": step, "train_loss": loss_f, "lr": cfg.learning_rate,
                                      "tokens_per_s": tok_s, "elapsed_s": elapsed}) + "\n")
        if step % cfg.eval_interval == 0 or step == cfg.max_steps or out_of_time:
            t_eval = time.perf_counter()
            losses = estimate_loss(model, {"train": train_data, "val": val_data}, cfg, device, dtype)
            check_finite(losses["val"], step)
            best = losses["val"] < best_val
            if best:
                best_val = losses["val"]
                save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                            "config": dataclasses.asdict(cfg), "step": step,
                                            "val_loss": best_val, "tokenizer": "byte"})
            eval_s += time.perf_counter() - t_eval
            print(f"eval {step:5d} | train {losses['train']:.4f} | val {losses['val']:.4f} nats/byte"
                  f" = {bits_per_byte(losses['val']):.3f} bpb{' | saved ckpt.pt' if best else ''}")
            metrics.write(json.dumps({"step": step, "eval_train_loss": losses["train"],
                                      "val_loss": losses["val"]}) + "\n")
        if out_of_time:
            break
    metrics.close()
    n, train_s = (step - 1, time.perf_counter() - t0 - eval_s - first_s) if step > 1 else (1, first_s)
    return {"train_loss": losses["train"], "final_val_loss": losses["val"], "val_loss": best_val,
            "steps": step, "tokens_per_s": n * tokens_per_step / max(train_s, 1e-9)}


# ----------------------------------------------------------------------------------------
# Inference: 2.5 sampling
# ----------------------------------------------------------------------------------------
def filter_logits(logits, top_k=0, top_p=1.0):
    """(B, V) logits -> the same with -inf outside the kept set: the top_k largest, and/or
    the smallest set of most likely tokens whose probabilities add up to top_p."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # 1st stays
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)  # undo the sort
    return logits


def next_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """(B, V) logits of the last position -> (B, 1) ids: greedy at temperature 0, else
    sampled from the distribution sharpened or flattened by temperature, cut by top_k/top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None,
             use_cache=True):
    """Append max_new_tokens tokens to idx (B, T). 3.4 With the KV cache, the prompt runs
    once (prefill) and each new token then costs a single position (decode); without it,
    every step reruns the whole context. Both produce the same tokens. When a full-attention
    context is full, the cache restarts from the last block_size tokens, which is what the
    uncached path sees; a sliding-window RoPE model streams on with a rolling cache."""
    model.eval()
    T = model.cfg.block_size

    def context(ids):
        return ids if model.streams else ids[:, -T:]  # crop to the context the model has

    cache = model.new_cache() if use_cache else None
    step_input = context(idx)
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache)[0][:, -1, :].float()  # (B, T, V) -> (B, V)
        next_id = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
        if cache is None:
            step_input = context(idx)
        elif cache.seen < T or model.streams:
            step_input = next_id  # decode: one new position
        else:
            cache, step_input = model.new_cache(), idx[:, -T:]  # full: prefill the last T again
    return idx


def sample(model, tokenizer, cfg, device):
    """cfg.num_samples continuations of cfg.prompt, seeded by cfg.seed."""
    ids = tokenizer.encode(cfg.prompt or "\n")
    if len(ids) > cfg.block_size:
        print(f"note: the prompt is {len(ids)} tokens; the model sees its last {cfg.block_size}")
        ids = ids[-cfg.block_size:]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, gen)
    return [tokenizer.decode(row.tolist()) for row in out]


# ----------------------------------------------------------------------------------------
# The milestone: KV-cache speed, streaming memory, and the architecture ablation
# ----------------------------------------------------------------------------------------
def kv_benchmark(cfg, device, lengths=(256, 1024)):
    """Greedy tokens/s with and without the KV cache, on an untrained model of this shape
    whose context holds the whole generation (speed does not depend on the weights)."""
    bench_cfg = dataclasses.replace(cfg, block_size=max(lengths) + 1, window=0, dropout=0.0)
    model = GPT(bench_cfg).to(device)
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    rows = []
    for n in lengths:
        row = {"new_tokens": n}
        for use_cache in (False, True):
            with Timer(device) as t:
                generate(model, prompt, n, temperature=0, use_cache=use_cache)
            row["cached_tok_s" if use_cache else "uncached_tok_s"] = n / t.seconds
        row["speedup"] = row["cached_tok_s"] / row["uncached_tok_s"]
        rows.append(row)
        print(f"  {n:5d} new tokens: {row['uncached_tok_s']:8.1f} tok/s without cache, "
              f"{row['cached_tok_s']:8.1f} with, speed-up {row['speedup']:.1f}x")
    return rows


def streaming_demo(cfg, device, multiple=10):
    """Generate `multiple` x block_size tokens with a sliding-window RoPE model and a rolling
    cache: the cache's size stops growing at sink + window entries per layer."""
    window = cfg.window or cfg.block_size // 2
    stream_cfg = dataclasses.replace(cfg, pos="rope", window=window, sink=cfg.sink or 4, dropout=0.0)
    model = GPT(stream_cfg).to(device).eval()
    cache = model.new_cache()
    next_id = torch.zeros(1, 1, dtype=torch.long, device=device)
    sizes = []
    with torch.no_grad():
        for i in range(multiple * cfg.block_size):
            logits = model(next_id, cache=cache)[0][:, -1, :]
            next_id = logits.argmax(dim=-1, keepdim=True)
            if (i + 1) % cfg.block_size == 0:
                sizes.append(cache.nbytes())
    print(f"  streaming {multiple * cfg.block_size} tokens (window {window}, sink {stream_cfg.sink}):"
          f" cache bytes after each block_size tokens: {sizes}")
    return {"tokens": multiple * cfg.block_size, "window": window, "sink": stream_cfg.sink,
            "cache_bytes": sizes}


def generation_benchmarks(cfg, device):
    print("3.4 KV cache: greedy generation speed")
    kv = kv_benchmark(cfg, device)
    print("3.6 Rolling KV cache")
    return {"kv_speedup": kv[-1]["speedup"], "kv_bench": kv, "stream": streaming_demo(cfg, device)}


ABLATION = [  # cumulative: each row adds one upgrade to the row above
    ("baseline (part02)", dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, n_kv_head=0)),
    ("+RMSNorm, no bias", dict(norm="rmsnorm", bias=False)),
    ("+RoPE", dict(pos="rope")),
    ("+SwiGLU", dict(mlp="swiglu")),
    ("+GQA", dict(n_kv_head=-1)),  # -1: half as many key/value heads as query heads
]


def ablate(cfg, device, dtype, train_data, val_data):
    """Train the baseline and each cumulative upgrade for the same wall-clock budget, on
    the same data and seed; one row per model."""
    rows, settings = [], {}
    for name, change in ABLATION:
        settings.update(change)
        if settings["n_kv_head"] == -1:
            settings["n_kv_head"] = max(1, cfg.n_head // 2)
        run_cfg = dataclasses.replace(cfg, **settings, max_seconds=cfg.ablate_seconds,
                                      out_dir=os.path.join(cfg.out_dir, "ablate", str(len(rows))))
        os.makedirs(run_cfg.out_dir, exist_ok=True)
        print(f"== {name}")
        set_seed(cfg.seed)
        model = GPT(run_cfg).to(device)
        result = train(model, train_data, val_data, run_cfg, device, dtype)
        rows.append({"name": name, "params": model.num_params(), "tokens_per_s": result["tokens_per_s"],
                     "steps": result["steps"], "val_loss": result["val_loss"],
                     "val_bpb": bits_per_byte(result["val_loss"])})
    print(f"\n{'model':<20} {'params':>9} {'tok/s':>8} {'steps':>6} {'val loss':>9} {'val bpb':>8}")
    for r in rows:
        print(f"{r['name']:<20} {r['params']:9,d} {r['tokens_per_s']:8,.0f} {r['steps']:6d} "
              f"{r['val_loss']:9.4f} {r['val_bpb']:8.3f}")
    return rows


# ----------------------------------------------------------------------------------------
# main: train on real text, checkpoint the best model, print samples
# ----------------------------------------------------------------------------------------
def in_range(cfg, low, high, *names):
    """Each --name must lie in [low, high); high None: at least low."""
    for name in names:
        v = getattr(cfg, name)
        if v < low or (high is not None and v >= high):
            bound = f"at least {low}" if high is None else f"in [{low}, {high})"
            die(f"--{name} must be {bound}, got {v}")


def validate(cfg):
    """Ranges and the rules that tie flags together; choices and finite floats were checked
    while parsing."""
    if not 0 <= cfg.seed < 2**63:
        die(f"--seed must be in [0, 2**63), got {cfg.seed}")
    in_range(cfg, 1, None, "n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_steps",
             "eval_interval", "eval_iters", "log_interval", "num_samples")
    in_range(cfg, 256, None, "vocab_size")  # every byte needs an id
    in_range(cfg, 0, None, "n_kv_head", "window", "sink", "max_seconds", "grad_clip", "weight_decay",
             "max_new_tokens", "temperature", "top_k")
    in_range(cfg, 0, 1, "dropout", "beta1", "beta2")
    if cfg.learning_rate <= 0:
        die(f"--learning_rate must be positive, got {cfg.learning_rate}")
    if not 0 < cfg.top_p <= 1:
        die(f"--top_p must be in (0, 1], got {cfg.top_p}")
    try:
        cfg.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8
        die("--prompt is not UTF-8 text")
    if cfg.n_embd % cfg.n_head:
        die(f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")
    if cfg.pos == "rope" and (cfg.n_embd // cfg.n_head) % 2:
        die(f"--pos rope needs an even head size, got {cfg.n_embd // cfg.n_head}")
    if cfg.pos == "sinusoidal" and cfg.n_embd % 2:
        die(f"--pos sinusoidal needs an even --n_embd, got {cfg.n_embd}")
    if cfg.n_kv_head and cfg.n_head % cfg.n_kv_head:
        die(f"--n_head {cfg.n_head} must be a multiple of --n_kv_head {cfg.n_kv_head}")
    if cfg.sink and not cfg.window:
        die("--sink needs a sliding window: set --window too")
    if cfg.ablate_seconds <= 0:
        die(f"--ablate_seconds must be positive, got {cfg.ablate_seconds}")


RUN_FILES = ("ckpt.pt", "metrics.jsonl", "summary.json", "samples.txt")
_run_locks = {}  # lock path -> the open lock file of this process's run there


def claim_run_folder(cfg):
    """A run folder holds one run. A second run in it at the same time is refused (a lock
    that lasts while this process lives), and so is a new run over an earlier one unless
    --overwrite says to start over: its files are then removed first."""
    writable_dir(cfg.out_dir, "--out_dir")
    path = os.path.join(cfg.out_dir, "run.lock")
    if path in _run_locks:  # an earlier main() of this process: that run is over
        _run_locks.pop(path).close()
    lock = open(path, "a+")
    if fcntl is not None:  # POSIX; elsewhere runs are not locked
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            die(f"--out_dir {cfg.out_dir} is in use by another run (process {holder}); "
                "wait for it to end or pick another --out_dir")
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _run_locks[path] = lock
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, f))]
    if found and not cfg.overwrite:
        die(f"--out_dir {cfg.out_dir} holds a run ({', '.join(found)}): pass --overwrite to "
            "start over, or pick another --out_dir")
    for f in found:
        os.remove(os.path.join(cfg.out_dir, f))


def free_memory(device):
    """Bytes this device can still give, or None where unknown."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_fits(cfg, device):
    """Refuse a model that cannot fit, before allocating it: weights, gradients and AdamW's
    two moments (16 bytes a parameter), plus one step's activations as part00 estimates
    them, against the memory the device has free. The parameters are counted on the meta
    device (shapes, no storage), from a few blocks when there are many."""
    with torch.device("meta"):
        small = GPT(dataclasses.replace(cfg, n_layer=min(cfg.n_layer, 4)))
    per_block = sum(p.numel() for b in small.h for p in b.parameters()) / len(small.h)
    n = small.num_params() + (cfg.n_layer - len(small.h)) * per_block
    L, C, T, B, V = cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.vocab_size
    activations = L * B * T * C * 34 * 4 + B * T * V * 8  # float32; logits and their gradient
    need, free = 16 * n + activations, free_memory(device)
    if free is not None and need > free:
        die(f"this model needs about {need / 1e9:,.1f} GB ({n / 1e6:,.1f}M parameters, batch "
            f"{B} x {T}) and {device} has {free / 1e9:,.1f} GB free: shrink --n_layer, --n_embd, "
            "--block_size or --batch_size")


def main(argv=None):
    cfg = parse_args(argv)
    validate(cfg)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    tokenizer = ByteTokenizer()
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    t0 = time.perf_counter()

    if cfg.sample_only:
        ckpt = load_checkpoint(ckpt_path, cfg, device)
        model = GPT(cfg).to(device)
        model.load_state_dict(ckpt["model"])
        print(f"loaded {ckpt_path} (step {ckpt['step']}, val loss {ckpt['val_loss']:.4f})")
        for text in sample(model, tokenizer, cfg, device):
            print(text + "\n" + "-" * 80)
        return None

    claim_run_folder(cfg)  # before reading the data: a busy or finished run stops here
    writable_dir(cfg.data_dir, "--data_dir")
    check_fits(cfg, device)
    data, name = load_tokens(cfg, tokenizer)
    train_data, val_data = split_data(data)
    if cfg.ablate:
        summary = {"ablation": ablate(cfg, device, dtype, train_data, val_data), "data": name,
                   "device": device, **generation_benchmarks(cfg, device)}
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        return summary
    model = GPT(cfg).to(device)
    print(f"data: {name}, {len(data):,} tokens ({len(train_data):,} train, {len(val_data):,} val)")
    print(f"model: {model.num_params():,} parameters; device {device}, "
          f"{str(dtype).replace('torch.', '')}; {cfg.batch_size * cfg.block_size:,} tokens per step")
    result = train(model, train_data, val_data, cfg, device, dtype)

    model.load_state_dict(load_checkpoint(ckpt_path, cfg, device)["model"])  # the best model
    samples = sample(model, tokenizer, cfg, device)
    with open(os.path.join(cfg.out_dir, "samples.txt"), "w") as f:
        f.write(("\n" + "-" * 80 + "\n").join(samples) + "\n")
    for text in samples:
        print(text + "\n" + "-" * 80)

    summary = {"val_loss": result["val_loss"], "val_bpb": bits_per_byte(result["val_loss"]),
               "train_loss": result["train_loss"], "final_val_loss": result["final_val_loss"],
               "tokens_per_s": result["tokens_per_s"], "wall_s": time.perf_counter() - t0,
               "steps": result["steps"], "data": name, "params": model.num_params(),
               "device": device, **generation_benchmarks(cfg, device)}
    summary["wall_s"] = time.perf_counter() - t0
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    print(f"val loss {summary['val_loss']:.4f} nats/byte = {summary['val_bpb']:.3f} bpb after "
          f"{summary['steps']} steps, {summary['tokens_per_s']:,.0f} tok/s, "
          f"{summary['wall_s']:.0f} s; wrote {cfg.out_dir}/summary.json")
    return summary


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves first): one line, not a traceback
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
