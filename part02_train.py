"""Part 02 - Training a tiny byte-level LLM on real text.

New in this part
  2.1 `ByteTokenizer`: any string to UTF-8 byte ids 0-255 and back.
  2.2 Data: `--data` takes a .txt file, a folder of .txt files or an http(s) URL; the
      default, Tiny Shakespeare, is downloaded once into data/ (offline: the text of
      pydoc_data.topics, shipped with CPython). Tokens are cached as a .bin file and read
      through a numpy memmap; 90/10 train/val split; random windows, targets shifted by one.
  2.3 The loss: next-token cross-entropy, in nats per byte and bits per byte (bpb).
  2.4 The training loop: AdamW (weight decay on matrices only), gradient clipping, periodic
      evaluation, an atomic checkpoint at the best validation loss, a progress line.
  2.5 Sampling: temperature, top-k, top-p (nucleus), seeded; `--prompt`; `--sample_only`.
  2.6 `estimate_loss`: the mean loss over `eval_iters` batches of each split.

Run
  python part02_train.py                         # ~3 minutes on a 2-core CPU
  python part02_train.py --data my_texts/        # a folder of .txt files
  python part02_train.py --sample_only --prompt "ROMEO:" --temperature 0.7

A prompt longer than the context keeps its last `block_size` bytes (the run says so).

Milestone: validation loss <= 1.90 nats/byte on Tiny Shakespeare within 3 minutes on a
2-core CPU, then samples. out/part02/summary.json: `val_loss`, `val_bpb`, `train_loss`,
`tokens_per_s`, `wall_s`, `steps`, `data`.

Part01's memorization demo stays behind, and so do the single head and the parameter
formula it taught (multi-head attention and num_params() carry on):
Replaces: explain_attention, attention_picture, Head, count_params
Replaces: text, target_loss, explain
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
    out_dir: str = "out/part02"  # ckpt.pt, metrics.jsonl, summary.json, samples.txt
    # data
    data: str = SHAKESPEARE_URL  # a .txt file, a folder of .txt files, or an http(s) URL
    data_dir: str = "data"  # where downloads and token caches are kept
    # model
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # model width
    block_size: int = 128  # context length in tokens (bytes here)
    vocab_size: int = 256  # vocabulary size: one token per byte value
    pos: Literal["learned", "sinusoidal"] = "learned"  # position embedding
    bias: bool = True  # biases in Linear layers and LayerNorm
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


# 1.3 Scaled dot-product attention -------------------------------------------------------
def causal_mask(T, device=None):
    """(T, T) bool, True where query i may attend to key j (j <= i)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def attention(q, k, v, mask, dropout=None):
    """softmax(q k^T / sqrt(d)) v over the keys `mask` allows. q, k, v: (..., T, d)."""
    att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (..., T, d) @ (..., d, T) -> (..., T, T)
    att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)  # softmax in float32 under autocast
    if dropout is not None:
        att = dropout(att)
    return att @ v, att  # (..., T, T) @ (..., T, d) -> (..., T, d)


# 1.4 Multi-head attention ---------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """n_head heads side by side: one matmul makes q, k, v for all heads, a reshape splits
    them, each head attends on its own slice, and the output projection mixes the heads."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.flash = cfg.n_head, cfg.flash
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        # (B, T, C) -> (B, T, n_head, head_dim) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:  # the same math in one fused kernel
            p = self.attn_dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y, _ = attention(q, k, v, causal_mask(T, x.device), self.attn_dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_head, T, hd) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


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


# 1.6 The block and the model -------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). The residual
    stream carries the input through untouched; each sublayer only adds to it."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The decoder: token embeddings plus position embeddings, n_layer pre-norm blocks, a
    final norm, and the LM head, which shares its matrix with the token embedding.
    forward(idx (B, T), targets (B, T) or None) -> logits (B, T, vocab), loss or None."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token id -> vector
        if cfg.pos == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # position -> vector
        else:
            self.wpe = SinusoidalPositions(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, bias=cfg.bias)
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

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.h:
            x = block(x)
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


SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pos", "bias")


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
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
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


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Append max_new_tokens tokens to idx (B, T), each sampled from the model's next-token
    distribution: sharpened or flattened by temperature (0 = greedy), cut by top_k/top_p."""
    model.eval()
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.cfg.block_size:])  # crop to the context the model has
        logits = logits[:, -1, :].float()  # (B, T, V) -> (B, V): the last position predicts
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
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
    in_range(cfg, 0, None, "grad_clip", "weight_decay", "max_new_tokens", "temperature", "top_k")
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
    if cfg.pos == "sinusoidal" and cfg.n_embd % 2:
        die(f"--pos sinusoidal needs an even --n_embd, got {cfg.n_embd}")


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
               "device": device}
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
