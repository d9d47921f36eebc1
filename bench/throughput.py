"""Training throughput and MFU of part04's GPT at the GPT-2 124M shape.

  python bench/throughput.py --device cuda                    # batch 12, then a batch sweep
  python bench/throughput.py --device cpu --preset tiny       # a smoke run anywhere

Each measurement times full optimizer steps (forward, backward, clip, fused AdamW) under
bf16 autocast with torch.compile, after warm-up steps, on random tokens (speed does not
depend on the data). MFU = 6N + 12LCT FLOPs per token x tokens/s / the GPU's bf16 peak.
Reference (the issue, H100): nanoGPT at this shape, batch 12: 28.5 ms/iter = 431k tok/s,
37% MFU; the target is 560k tok/s at batch 12. Prints a table and writes
out/bench/throughput.json.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import part04_scale as p4  # noqa: E402

PRESETS = {  # the GPT-2 small shape as nanoGPT benchmarks it: learned positions, GELU, LayerNorm
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, pos="learned",
                 norm="layernorm", mlp="gelu", bias=False, dropout=0.0),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256, pos="learned",
                 norm="layernorm", mlp="gelu", bias=False, dropout=0.0),
}


def print_profile(step, device, steps=3, rows=15, part=p4):
    """torch.profiler over a few more steps: the kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        part.sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def measure(cfg, device, dtype, batch, steps, warmup, compile_model, part=p4, profile=False):
    """Time `steps` optimizer steps of part.GPT(cfg) at `batch` after `warmup` steps (at
    least one: the first step compiles). `profile`: print the top kernels afterwards."""
    torch._dynamo.reset()  # compile each batch size afresh (static shapes, as a training run has)
    torch.manual_seed(0)
    model = part.GPT(dataclasses.replace(cfg, batch_size=batch)).to(device)
    opt = part.configure_optimizer(model, cfg, device)
    run = getattr(part, "compile_model", torch.compile)(model) if compile_model else model
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size), device=device)
    y = torch.randint(cfg.vocab_size, (batch, cfg.block_size), device=device)

    def step():
        with part.autocast_ctx(device, dtype):
            _, loss = run(x, y)
            if hasattr(model, "router_loss"):  # part05: the routers' balancing losses
                loss = loss + model.router_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with part.Timer(device) as first:  # compiles when compiling
        step()
    for _ in range(warmup - 1):
        step()
    with part.Timer(device) as t:
        for _ in range(steps):
            step()
    if profile:
        print_profile(step, device, part=part)
    ms = t.seconds / steps * 1e3
    tok_s = batch * cfg.block_size / (ms / 1e3)
    peak = part.gpu_peak_flops(device)
    mfu = model.flops_per_token() * tok_s / peak if peak else None
    active = model.active_params() if hasattr(model, "active_params") else model.num_params()
    return {"batch": batch, "ms_per_iter": ms, "tokens_per_s": tok_s, "mfu": mfu, "first_step_s": first.seconds,
            "total_params": model.num_params(), "active_params": active}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default="gpt2", choices=sorted(PRESETS))
    ap.add_argument("--batches", type=int, nargs="+", default=[12, 16, 24, 32, 48])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--profile", action="store_true", help="print the top kernels of the first batch size")
    args = ap.parse_args()
    device = p4.pick_device(args.device)
    dtype = p4.pick_dtype("auto", device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_model = args.compile == "true" or (args.compile == "auto" and device.startswith("cuda"))
    cfg = p4.Config(**PRESETS[args.preset])
    rows = []
    for batch in args.batches:
        try:
            rows.append(measure(cfg, device, dtype, batch, args.steps, args.warmup, compile_model,
                                profile=args.profile and not rows))
            if device.startswith("cuda"):
                torch.cuda.empty_cache()  # the last model's memory, before the next batch size
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch}: out of memory")
            break
        r = rows[-1]
        print(f"batch {batch:3d}: {r['ms_per_iter']:8.1f} ms/iter {r['tokens_per_s']:12,.0f} tok/s"
              + (f"  MFU {r['mfu']:.1%}" if r["mfu"] is not None else "")
              + f"  (first step {r['first_step_s']:.1f} s)", flush=True)
    best = max(rows, key=lambda r: r["tokens_per_s"])
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"\n{name}, {args.preset}, {str(dtype).replace('torch.', '')}, compile={compile_model}")
    print(f"{'batch':>6} {'ms/iter':>9} {'tok/s':>12} {'MFU':>6}")
    for r in rows:
        print(f"{r['batch']:6d} {r['ms_per_iter']:9.1f} {r['tokens_per_s']:12,.0f} "
              f"{(format(r['mfu'], '.1%') if r['mfu'] is not None else '-'):>6}" + ("  best" if r is best else ""))
    out = ROOT / "out" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps({"device": name, "preset": args.preset,
                                                     "compile": compile_model, "rows": rows}, indent=2))
    print(f"wrote {out / 'throughput.json'}")


if __name__ == "__main__":
    main()
