"""Part 01 - The Transformer from first principles: a GPT that memorizes a paragraph.

New in this part
  1.1 Positional embeddings: learned absolute and sinusoidal (`--pos learned|sinusoidal`);
      the sinusoidal table's dot product depends only on the distance and falls with it.
  1.2 Self-attention by hand: a NumPy walk-through on 3 tokens of width 4 (`--explain`):
      Q, K, V, scores, scaling, causal mask, softmax, weighted sum; checked equal to `Head`.
  1.3 A single attention head (`Head`) and 1.4 multi-head attention
      (`CausalSelfAttention`: split, attend, concatenate, project), written out; `--flash`
      runs the same attention through torch's fused `scaled_dot_product_attention`.
  1.5 The MLP (4x expansion, GELU), residual connections, LayerNorm (own implementation).
  1.6 The pre-norm `Block` and the `GPT`: token + position embeddings, blocks, final norm,
      an LM head tied to the token embedding; a parameter count checked against a formula.
  An attention picture: one head's weights on the toy text as a table (and a PNG heat map
      when matplotlib is installed).

Run
  python part01_transformer.py                   # < 1 minute on a 2-core CPU
  python part01_transformer.py --explain         # the NumPy attention walk-through
  python part01_transformer.py --pos sinusoidal --text "your own sentence to memorize"

Milestone: the GPT overfits a short fixed text (loss below 0.05), then regenerates it
exactly with greedy decoding from its first byte. out/part01/summary.json: `final_loss`,
`steps`, `exact_match`, `wall_s`.

Part00's measurement harness stays behind; its utilities carry on:
Replaces: print_pipeline, estimate_compute, sdpa_backends, check_compile, environment_report
Replaces: time_op, measure_matmul, measure_bandwidth, mixed_precision_demo, profile_step
Replaces: fmt_seconds
Replaces: params, tokens, mfu, batch_size, bench_seconds, compile_check, profile
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal, get_args, get_origin

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# Config: every hyperparameter, with the defaults of the milestone run. One flag per field.
# ----------------------------------------------------------------------------------------
@dataclass
class Config:
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 autocast where supported, else float32
    seed: int = 1337  # random seed: the same seed gives the same CPU run
    out_dir: str = "out/part01"  # where summary.json, metrics.jsonl and samples.txt are written
    # model
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 64  # model width
    block_size: int = 256  # context length in tokens (bytes here)
    vocab_size: int = 256  # vocabulary size: one token per byte value
    pos: Literal["learned", "sinusoidal"] = "learned"  # position embedding
    bias: bool = True  # biases in Linear layers and LayerNorm
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    flash: bool = True  # attention through F.scaled_dot_product_attention (false: written out)
    # the milestone: memorize a text
    text: str = ""  # text to memorize; empty = the built-in toy text
    learning_rate: float = 3e-3  # AdamW learning rate
    max_steps: int = 1000  # give up after this many steps
    target_loss: float = 0.05  # stop once the training loss is below this
    log_interval: int = 25  # print the loss every this many steps
    explain: bool = False  # print the NumPy attention walk-through step by step


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
# Model
# ----------------------------------------------------------------------------------------
def count_params(n_layer, n_embd, block_size, vocab_size, learned_pos=True, bias=True):
    """Parameters of `GPT`: the token embedding, tied to the LM head, counts once; learned
    positions add T*C (sinusoidal ones are a fixed table, no parameters). Per block:
    LayerNorm (2C) + qkv (3C*C + 3C) + proj (C*C + C) + LayerNorm (2C)
    + MLP (C*4C + 4C + 4C*C + C) = 12C^2 + 13C with biases, 12C^2 + 2C without
    (LayerNorm keeps its weight). A final LayerNorm: 2C with bias, C without."""
    C = n_embd
    per_block = 12 * C * C + (13 * C if bias else 2 * C)
    pos = block_size * C if learned_pos else 0
    return vocab_size * C + pos + n_layer * per_block + (2 * C if bias else C)


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


# 1.2 Self-attention by hand, in NumPy -----------------------------------------------------
def explain_attention(x, Wq, Wk, Wv, verbose=True):
    """One causal attention head in NumPy on x: (T, C) with weights (C, head_dim)."""
    def show(name, a):
        if verbose:
            print(f"{name} {a.shape}:\n{np.array2string(a, precision=3, suppress_small=True)}")

    show("x (tokens as vectors)", x)
    q, k, v = x @ Wq, x @ Wk, x @ Wv  # (T, C) @ (C, hd) -> (T, hd)
    show("Q = x Wq: what each token looks for", q)
    show("K = x Wk: what each token offers", k)
    show("V = x Wv: what each token passes on", v)
    scores = q @ k.T  # (T, hd) @ (hd, T) -> (T, T): row i = how well query i matches each key
    show("scores = Q K^T", scores)
    scores = scores / np.sqrt(k.shape[1])  # keep the variance ~1, so softmax stays soft
    show("scaled by 1/sqrt(head_dim)", scores)
    T = x.shape[0]
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)  # no peeking ahead
    show("causal mask: -inf above the diagonal", scores)
    w = np.exp(scores - scores.max(axis=1, keepdims=True))  # softmax, stabilized
    w = w / w.sum(axis=1, keepdims=True)
    show("softmax: each row sums to 1", w)
    out = w @ v  # (T, T) @ (T, hd) -> (T, hd): a weighted average of the values
    show("output = weights V", out)
    return out


# 1.3 A single attention head ------------------------------------------------------------
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


class Head(nn.Module):
    """One head: project to queries, keys and values, then attend causally."""

    def __init__(self, n_embd, head_dim, bias=False):
        super().__init__()
        self.query = nn.Linear(n_embd, head_dim, bias=bias)
        self.key = nn.Linear(n_embd, head_dim, bias=bias)
        self.value = nn.Linear(n_embd, head_dim, bias=bias)

    def forward(self, x):  # (B, T, C) -> (B, T, head_dim)
        q, k, v = self.query(x), self.key(x), self.value(x)  # each (B, T, head_dim)
        return attention(q, k, v, causal_mask(x.size(1), x.device))[0]


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
        self.record = False  # set True to keep the attention weights of the next forward
        self.weights = None

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, 3C) -> 3 x (B, T, C)
        # (B, T, C) -> (B, T, n_head, head_dim) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash and not self.record:  # the same math in one fused kernel
            p = self.attn_dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y, att = attention(q, k, v, causal_mask(T, x.device), self.attn_dropout)
            if self.record:
                self.weights = att.detach()  # (B, n_head, T, T)
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
        if targets is not None:  # targets[b, t] is the token that follows idx[b, t]
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# ----------------------------------------------------------------------------------------
# Training: memorize one sequence
# ----------------------------------------------------------------------------------------
def train(model, ids, cfg, device, dtype):
    """Full-batch AdamW on one sequence until its loss falls below cfg.target_loss.
    Returns the list of (step, loss)."""
    x, y = ids[None, :-1].to(device), ids[None, 1:].to(device)  # (1, T): input, next byte
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    history = []
    model.train()
    for step in range(1, cfg.max_steps + 1):
        with autocast_ctx(device, dtype):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((step, loss.item()))
        done = loss.item() < cfg.target_loss
        if step % cfg.log_interval == 0 or step == 1 or done:
            print(f"step {step:5d}  loss {loss.item():.4f}")
        if done:
            break
    return history


# ----------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, idx, max_new_tokens):
    """Greedy decoding: append the most likely next token, max_new_tokens times."""
    model.eval()
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.cfg.block_size:])  # crop to the context the model has
        next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, vocab) -> (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def attention_picture(model, ids, layer=0, head=0, n=16, png=None):
    """One head's attention weights over the first n tokens, as a printed table."""
    n = min(n, len(ids), model.cfg.block_size)
    attn = model.h[layer].attn
    attn.record = True
    model.eval()
    with torch.no_grad():
        model(ids[None, :n])
    attn.record = False
    w = attn.weights[0, head].float().cpu()  # (n, n)
    labels = [repr(chr(b))[1:-1] if b < 128 else f"x{b:02x}" for b in ids[:n].tolist()]
    print(f"Attention of layer {layer}, head {head} (row: query, column: key)")
    print("      " + "".join(f"{s:>5}" for s in labels))
    for i, s in enumerate(labels):
        print(f"{s:>5} " + "".join(f"{w[i, j]:5.2f}" if j <= i else "    ." for j in range(n)))
    if png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return w
        fig, ax = plt.subplots(figsize=(6, 5))
        ax.imshow(w.numpy(), cmap="viridis")
        ax.set_xticks(range(n), labels)
        ax.set_yticks(range(n), labels)
        ax.set_title(f"layer {layer} head {head}")
        fig.savefig(png, dpi=120, bbox_inches="tight")
        plt.close(fig)
        print(f"wrote {png}")
    return w


# ----------------------------------------------------------------------------------------
# main: memorize a paragraph and recite it
# ----------------------------------------------------------------------------------------
TOY_TEXT = ("First Citizen: Before we proceed any further, hear me speak. "
            "All: Speak, speak. First Citizen: You are all resolved rather to die than "
            "to famish? All: Resolved. resolved.")


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
    in_range(cfg, 1, None, "n_layer", "n_head", "n_embd", "block_size", "max_steps", "log_interval")
    in_range(cfg, 256, None, "vocab_size")  # every byte needs an id
    in_range(cfg, 0, 1, "dropout")
    if cfg.learning_rate <= 0:
        die(f"--learning_rate must be positive, got {cfg.learning_rate}")
    if cfg.n_embd % cfg.n_head:
        die(f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")
    if cfg.pos == "sinusoidal" and cfg.n_embd % 2:
        die(f"--pos sinusoidal needs an even --n_embd, got {cfg.n_embd}")


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
    L, C, T, B, V = cfg.n_layer, cfg.n_embd, cfg.block_size, 1, cfg.vocab_size  # one text
    activations = L * B * T * C * 34 * 4 + B * T * V * 8  # float32; logits and their gradient
    need, free = 16 * n + activations, free_memory(device)
    if free is not None and need > free:
        die(f"this model needs about {need / 1e9:,.1f} GB ({n / 1e6:,.1f}M parameters) and "
            f"{device} has {free / 1e9:,.1f} GB free: shrink --n_layer, --n_embd or --block_size")


def main(argv=None):
    cfg = parse_args(argv)
    validate(cfg)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    text = cfg.text or TOY_TEXT
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)  # bytes 0..255
    if len(ids) < 2:
        die("--text needs at least 2 bytes")
    if len(ids) - 1 > cfg.block_size:
        die(f"--text is {len(ids)} bytes; the model sees at most --block_size "
            f"{cfg.block_size} + 1 (raise --block_size)")
    if cfg.vocab_size < 256:
        die(f"--vocab_size must be at least 256 to hold every byte, got {cfg.vocab_size}")
    writable_dir(cfg.out_dir, "--out_dir")
    check_fits(cfg, device)
    t0 = time.perf_counter()

    if cfg.explain:
        print("1.2 Self-attention by hand (NumPy, 3 tokens, width 4)")
        rng = np.random.default_rng(cfg.seed)
        x, Wq, Wk, Wv = rng.standard_normal((3, 4)), *rng.standard_normal((3, 4, 4))
        out = explain_attention(x, Wq, Wk, Wv)
        head = Head(4, 4)
        with torch.no_grad():  # nn.Linear computes x @ W.T, so it holds the transposes
            for lin, W in ((head.query, Wq), (head.key, Wk), (head.value, Wv)):
                lin.weight.copy_(torch.from_numpy(W.T))
            same = torch.allclose(head(torch.from_numpy(x)[None].float())[0].double(),
                                  torch.from_numpy(out), atol=1e-5)
        print(f"the torch Head with the same weights gives the same output: {same}")
    P = sinusoidal_table(cfg.block_size, cfg.n_embd - cfg.n_embd % 2)
    dots = {d: float(P[0] @ P[d]) for d in (0, 1, 2, 4, 8, 16, 32, 64) if d < cfg.block_size}
    print("1.1 Sinusoidal positions: PE[i] . PE[i+d] depends on d alone and falls off as d grows")
    print("  " + "  ".join(f"d={d}: {v:.1f}" for d, v in dots.items()))

    model = GPT(cfg).to(device)
    n = model.num_params()
    formula = count_params(cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size,
                           cfg.pos == "learned", cfg.bias)
    print(f"GPT: {n:,} parameters; the formula of count_params() says {formula:,}")

    history = train(model, ids, cfg, device, dtype)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "w") as f:
        for step, loss in history:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    steps, final_loss = history[-1]

    out = generate(model, ids[None, :1].to(device), len(ids) - 1)[0].cpu()
    recited = bytes(out.tolist()).decode("utf-8", errors="replace")
    exact = bool(torch.equal(out, ids))
    print(f"Greedy from its first byte ({'exact' if exact else 'NOT exact'}):\n{recited}")
    attention_picture(model, ids.to(device), png=os.path.join(cfg.out_dir, "attention.png"))
    with open(os.path.join(cfg.out_dir, "samples.txt"), "w") as f:
        f.write(recited + "\n")

    summary = {"final_loss": final_loss, "steps": steps, "exact_match": exact,
               "params": n, "params_formula": formula, "text_bytes": len(ids),
               "wall_s": time.perf_counter() - t0}
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    print(f"loss {final_loss:.4f} after {steps} steps, exact match: {exact}, "
          f"{summary['wall_s']:.1f} s; wrote {cfg.out_dir}/summary.json")
    return summary


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves first): one line, not a traceback
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
