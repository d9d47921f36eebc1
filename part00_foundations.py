"""Part 00 - Foundations & mindset: what it costs to train a language model, measured.

New in this part
  0.1 The pipeline: pretraining -> SFT -> reward model -> RLHF (PPO, GRPO), and which part
      of this repository builds each stage. A compute/memory estimator: training FLOPs
      (6*N*D plus attention), memory of weights, gradients, AdamW state and activations in
      fp32 and bf16, and the time a run would take on this device at a stated MFU.
  0.2 The environment: Python/torch/numpy versions, devices, dtype support, the
      scaled_dot_product_attention backends that run here, whether torch.compile works.
  Measured, not quoted: matmul TFLOP/s (fp32, bf16) and memory bandwidth on this device;
      fp16 overflow vs bf16; a gradient that underflows in fp16, recovered by loss scaling;
      a torch.profiler table of one small training step.
  The utilities every later part copies: `Config` with command-line flags generated from
      its fields, device/dtype choice, autocast, seeding, a timer, and `die()`.

Run
  python part00_foundations.py                      # report for this machine (< 60 s on CPU)
  python part00_foundations.py --device cuda
  python part00_foundations.py --params 7e9 --tokens 2e12 --mfu 0.4   # size a run

Milestone: the measured figures, written to out/part00/summary.json: `matmul_tflops`
(per dtype and size), `bandwidth_gbs`, and the estimate for the configured model shape.
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import platform
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
    out_dir: str = "out/part00"  # where summary.json is written
    # model shape for the estimator (default: GPT-2 small, 124M parameters)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # model width
    block_size: int = 1024  # context length in tokens
    vocab_size: int = 50304  # vocabulary size (50257 padded to a multiple of 64)
    batch_size: int = 8  # sequences per step, for the activation memory estimate
    params: float = 0.0  # parameter count to estimate with; 0 = count it from the shape above
    tokens: float = 10e9  # training tokens for the estimate
    mfu: float = 0.4  # model FLOPs utilization assumed for the time estimate (0-1]
    bench_seconds: float = 0.25  # time spent on each throughput measurement
    compile_check: bool = True  # try torch.compile on a tiny function (about 15 s on a CPU)
    profile: bool = True  # print a torch.profiler table of one small training step


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
# 0.1 The pipeline, and what a run costs
# ----------------------------------------------------------------------------------------
PIPELINE = [
    # (stage, part of this repository, what it consumes, what it produces)
    ("tokenize", "part02 (bytes), part04 (BPE)", "raw text", "token ids"),
    ("pretrain", "part01-part05", "trillions of tokens of web text, code, books", "a base model that continues text"),
    ("SFT", "part06", "(instruction, response) pairs in a chat template", "a model that follows instructions"),
    ("reward model", "part07", "preference pairs (chosen, rejected)", "a scalar score of a response"),
    ("RLHF: PPO", "part08", "prompts + the reward model + a frozen reference", "a policy tuned to the reward"),
    ("RL: GRPO", "part09", "prompts with checkable answers, several samples each", "a policy tuned without a value net"),
    ("beyond tokens", "part10", "sentence embeddings, hierarchies, byte patches", "concept models, hyperbolic embeddings"),
]


def print_pipeline():
    print("0.1 The pipeline")
    w = [max(len(row[i]) for row in PIPELINE) for i in range(3)]
    for stage, part, data, out in PIPELINE:
        print(f"  {stage:<{w[0]}}  {part:<{w[1]}}  {data:<{w[2]}}  -> {out}")


def count_params(n_layer, n_embd, block_size, vocab_size):
    """Parameters of the GPT built in part01: tied token embedding / LM head, learned
    positions, and per block LayerNorm(2C) + qkv(3C*C + 3C) + proj(C*C + C)
    + LayerNorm(2C) + MLP(C*4C + 4C + 4C*C + C) = 12C^2 + 13C; a final LayerNorm (2C)."""
    C = n_embd
    return vocab_size * C + block_size * C + n_layer * (12 * C * C + 13 * C) + 2 * C


def estimate_compute(cfg):
    """FLOPs and memory of training `cfg`'s model on `cfg.tokens` tokens.

    FLOPs per token = 6*N + 12*L*C*T (Kaplan et al. 2020; PaLM appendix B): every weight
    does a multiply-add (2 FLOPs) forward and twice that backward; attention adds the
    QK^T and AV products, 2*2*T*C per token per layer forward, x3 with backward.
    N counts the weights that take part in matmuls: all but the position table.
    """
    L, C, T, H = cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.n_head
    if cfg.params > 0:
        n_total = n_matmul = int(cfg.params)
    else:
        n_total = count_params(L, C, T, cfg.vocab_size)
        n_matmul = n_total - T * C
    attn_flops = 12 * L * C * T
    flops_per_token = 6 * n_matmul + attn_flops
    B, V = cfg.batch_size, cfg.vocab_size
    memory = {}
    for name, nbytes in (("float32", 4), ("bfloat16", 2)):
        # Activations kept for backward, per block (Korthikanti et al. 2022, for 2-byte
        # activations): B*T*C*(34 + 5*H*T/C) bytes; the second term is the T x T
        # attention scores, which flash attention never stores. Scaled by nbytes/2.
        act = L * B * T * C * (34 + 5 * H * T / C) * nbytes / 2 + B * T * V * 4  # + fp32 logits
        memory[name] = {
            "weights_gb": n_total * nbytes / 1e9,
            "grads_gb": n_total * nbytes / 1e9,
            "adamw_gb": n_total * 8 / 1e9,  # two fp32 moments per parameter, in both cases
            "activations_gb": act / 1e9,
        }
        memory[name]["total_gb"] = sum(memory[name].values())
    return {"params": n_total, "matmul_params": n_matmul, "tokens": cfg.tokens,
            "flops_per_token": flops_per_token, "attention_flops_per_token": attn_flops,
            "train_flops": flops_per_token * cfg.tokens, "memory": memory}


# ----------------------------------------------------------------------------------------
# 0.2 The environment
# ----------------------------------------------------------------------------------------
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def sdpa_backends(device, dtype):
    """Which scaled_dot_product_attention kernels actually run here, tried one at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, 2, 64, 32, device=device, dtype=dtype)  # (B, n_head, T, head_dim)
    result = {}
    for name in SDPA_BACKENDS:
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            result[name.lower()] = "ok"
        except RuntimeError as e:  # an unavailable kernel raises; that is the answer
            msg = str(e).strip().splitlines()[0]
            result[name.lower()] = "not available" if "No viable backend" in msg else msg[:80]
    return result


def check_compile(device):
    """Compile a tiny function; report OK and the compile time, or the error."""
    try:
        torch._dynamo.reset()
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1)
        x = torch.randn(64, device=device)
        with Timer(device) as t:
            y = fn(x)
        ok = torch.allclose(y, torch.nn.functional.gelu(x) * 2 + 1, atol=1e-5)
        return {"ok": bool(ok), "seconds": round(t.seconds, 2)}
    except Exception as e:
        return {"ok": False, "error": str(e).strip().splitlines()[0][:200]}


def environment_report(device, dtype, cfg):
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "platform": platform.platform(),
           "cpu_threads": torch.get_num_threads(), "device": device,
           "autocast_dtype": str(dtype).replace("torch.", "")}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}",
                   gpu_memory_gb=round(p.total_memory / 1e9, 1),
                   bf16=torch.cuda.is_bf16_supported(), tf32=p.major >= 8,
                   fp16=True)
    else:
        env.update(bf16=True, fp16=True, tf32=False)  # CPU kernels exist for both
    env["mps_available"] = bool(getattr(torch.backends, "mps", None)
                                and torch.backends.mps.is_available())
    env["sdpa"] = sdpa_backends(device, dtype)
    env["compile"] = check_compile(device) if cfg.compile_check else "skipped"
    print("0.2 The environment")
    for k, v in env.items():
        print(f"  {k:<15} {v}")
    return env


# ----------------------------------------------------------------------------------------
# Measured, not quoted: matmul throughput, memory bandwidth
# ----------------------------------------------------------------------------------------
def time_op(fn, device, seconds):
    """Seconds per call of fn: warm up, then repeat until `seconds` of work have run."""
    fn()
    fn()  # warm-up: kernel selection, caches, lazy allocation
    calls = 0
    with Timer(device) as t:
        while calls < 3 or time.perf_counter() - t._start < seconds:
            fn()
            calls += 1
    return t.seconds / calls  # the timer synchronizes: all queued calls are counted


def measure_matmul(device, seconds, sizes=None):
    """TFLOP/s of an n x n @ n x n matmul (2*n^3 FLOPs) per dtype and size."""
    if sizes is None:
        sizes = [1024, 4096, 8192] if device.startswith("cuda") else [256, 512, 1024]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        out[name] = {}
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            s = time_op(lambda: a @ b, device, seconds)
            out[name][str(n)] = 2 * n**3 / s / 1e12
    return out


def measure_bandwidth(device, seconds, nbytes=None):
    """GB/s of a large copy: each copy reads and writes nbytes."""
    if nbytes is None:
        nbytes = 1 << 30 if device.startswith("cuda") else 1 << 27
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    s = time_op(lambda: dst.copy_(src), device, seconds)
    return 2 * nbytes / s / 1e9


# ----------------------------------------------------------------------------------------
# Mixed precision: fp16 has range problems that bf16 does not; loss scaling fixes fp16 grads
# ----------------------------------------------------------------------------------------
def mixed_precision_demo(device):
    """Return the facts the demo shows (the tests check each one)."""
    big, tiny = 70000.0, 1e-8
    facts = {
        # fp16 tops out at 65504; bf16 keeps float32's 8 exponent bits (max ~3.4e38)
        "fp16_70000": float(torch.tensor(big).half()),
        "bf16_70000": float(torch.tensor(big).bfloat16()),
        # fp16's smallest subnormal is ~6e-8: 1e-8 flushes to zero; bf16 keeps it (roughly)
        "fp16_1e-8": float(torch.tensor(tiny).half()),
        "bf16_1e-8": float(torch.tensor(tiny).bfloat16()),
    }
    # A gradient of 1e-8 computed in fp16 underflows to zero ...
    w = torch.ones(1, device=device, requires_grad=True)

    def loss_fn():  # d(loss)/dw = 1e-4 * 1e-4 = 1e-8, computed in fp16
        return (w.half() * 1e-4).sum() * 1e-4

    loss_fn().backward()
    facts["fp16_grad"] = float(w.grad)
    # ... unless the loss is multiplied by a scale S first (every gradient is then S times
    # larger and representable) and the gradients are divided by S in float32 afterwards.
    w.grad = None
    opt = torch.optim.SGD([w], lr=0.0)
    scaler = torch.amp.GradScaler(device.split(":")[0], init_scale=1024.0)
    scaler.scale(loss_fn()).backward()
    scaler.unscale_(opt)
    facts["fp16_grad_scaled"] = float(w.grad)
    facts["true_grad"] = 1e-8
    print("Mixed precision")
    print(f"  70000 in fp16 -> {facts['fp16_70000']}, in bf16 -> {facts['bf16_70000']}")
    print(f"  1e-8  in fp16 -> {facts['fp16_1e-8']}, in bf16 -> {facts['bf16_1e-8']:.3e}")
    print(f"  a 1e-8 gradient in fp16: {facts['fp16_grad']} plain, "
          f"{facts['fp16_grad_scaled']:.4e} with loss scaling (GradScaler, scale 1024)")
    return facts


# ----------------------------------------------------------------------------------------
# Profiling: where the time of one small step goes
# ----------------------------------------------------------------------------------------
def profile_step(device, dtype, rows=10):
    """torch.profiler over one forward+backward of a small attention + MLP block."""
    from torch.profiler import ProfilerActivity, profile
    B, T, C = 8, 128, 256
    x = torch.randn(B, T, C, device=device)
    ln = nn.LayerNorm(C).to(device)
    qkv, mlp = nn.Linear(C, 3 * C).to(device), nn.Linear(C, C).to(device)
    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)

    def step():
        with autocast_ctx(device, dtype):
            h = ln(x)
            q, k, v = qkv(h).split(C, dim=-1)  # (B, T, 3C) -> 3 x (B, T, C)
            att = (q @ k.transpose(-2, -1)) / C**0.5  # (B, T, T), written out to profile softmax
            y = torch.softmax(att.float(), dim=-1).to(v.dtype) @ v  # (B, T, C)
            loss = mlp(y).float().pow(2).mean()
        loss.backward()

    step()  # warm-up
    sync(device)
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print("Profile of one step (top ops by self time)")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    return [e.key for e in events[:rows]]


# ----------------------------------------------------------------------------------------
# main: measure, estimate, write out/part00/summary.json
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
    in_range(cfg, 1, None, "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size")
    in_range(cfg, 0, None, "params")
    if cfg.n_embd % cfg.n_head:
        die(f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")
    if cfg.tokens <= 0 or cfg.bench_seconds <= 0:
        die("--tokens and --bench_seconds must be positive")
    if not 0 < cfg.mfu <= 1:
        die(f"--mfu must be in (0, 1], got {cfg.mfu}")


def fmt_seconds(s):
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s"


def main(argv=None):
    cfg = parse_args(argv)
    validate(cfg)
    writable_dir(cfg.out_dir, "--out_dir")  # now, not after the benchmarks
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    t0 = time.perf_counter()

    print_pipeline()
    env = environment_report(device, dtype, cfg)

    print("Measured on this device")
    tflops = measure_matmul(device, cfg.bench_seconds)
    for name, by_size in tflops.items():
        cells = ", ".join(f"{n}: {v:.3f}" for n, v in by_size.items())
        print(f"  matmul {name:<9} TFLOP/s  {cells}")
    bandwidth = measure_bandwidth(device, cfg.bench_seconds)
    print(f"  copy bandwidth     {bandwidth:.1f} GB/s (read + write)")

    est = estimate_compute(cfg)
    # The best measured matmul rate in the training dtype stands in for the device's peak.
    train_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    peak = max(tflops[train_dtype].values()) * 1e12
    est["peak_flops_measured"] = peak
    est["dtype"] = train_dtype
    est["mfu"] = cfg.mfu
    est["seconds"] = est["train_flops"] / (peak * cfg.mfu)
    print(f"Estimate for {est['params'] / 1e6:.1f}M parameters on {cfg.tokens:.3g} tokens")
    print(f"  FLOPs/token {est['flops_per_token']:.3e} (attention {est['attention_flops_per_token']:.2e})"
          f", total {est['train_flops']:.3e}")
    for name, m in est["memory"].items():
        print(f"  memory {name:<9} weights {m['weights_gb']:.2f} GB, grads {m['grads_gb']:.2f} GB, "
              f"AdamW {m['adamw_gb']:.2f} GB, activations {m['activations_gb']:.2f} GB "
              f"(batch {cfg.batch_size}) = {m['total_gb']:.2f} GB")
    print(f"  time at {cfg.mfu:.0%} MFU of the measured {peak / 1e12:.2f} TFLOP/s ({train_dtype}):"
          f" {fmt_seconds(est['seconds'])}")

    mp = mixed_precision_demo(device)
    top_ops = profile_step(device, dtype) if cfg.profile else []

    summary = {"device": device, "matmul_tflops": tflops, "bandwidth_gbs": bandwidth,
               "estimate": est, "environment": env, "mixed_precision": mp,
               "profile_top_ops": top_ops, "wall_s": time.perf_counter() - t0}
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    print(f"wrote {os.path.join(cfg.out_dir, 'summary.json')} in {summary['wall_s']:.1f} s")
    return summary


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves first): one line, not a traceback
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
