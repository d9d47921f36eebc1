"""Training tokens/s of part05's MoE against its dense twin (same active parameters).

  python bench/moe_throughput.py --device cuda                 # GPT-2-small shape, 8 experts, top-2
  python bench/moe_throughput.py --device cpu --preset cpu     # part05's default shape

Rows: the dense model (n_experts 0), then the MoE with its experts in one F.grouped_mm
call and with a loop over experts. Each row times full optimizer steps (forward, backward,
clip, AdamW; bf16 autocast and torch.compile on CUDA) after warm-up steps, on random tokens
with the router's balancing losses on. The issue's target: on a GPU the MoE runs at least
0.7x the dense model's tokens/s. Prints a table and writes out/bench/moe_throughput.json.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import part05_moe as p5  # noqa: E402
from throughput import measure  # noqa: E402  (this folder is on sys.path when run as a script)

PRESETS = {  # model shape and batch; the MoE: 8 experts, top-2, each half the dense SwiGLU width
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, batch_size=16),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096, batch_size=8),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256, batch_size=4),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--preset", default="gpu", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--profile", action="store_true", help="print the top kernels of the grouped-matmul MoE")
    args = ap.parse_args()
    device = p5.pick_device(args.device)
    dtype = p5.pick_dtype("auto", device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_model = args.compile == "true" or (args.compile == "auto" and device.startswith("cuda"))
    base = p5.Config(**PRESETS[args.preset], n_experts=8, moe_top_k=2, dropout=0.0)
    runs = {"dense": dataclasses.replace(base, n_experts=0),
            "moe grouped_mm": dataclasses.replace(base, grouped_mm="true"),
            "moe loop": dataclasses.replace(base, grouped_mm="false")}
    if not hasattr(F, "grouped_mm"):
        del runs["moe grouped_mm"]
        print(f"torch {torch.__version__} has no F.grouped_mm: the loop only")
    rows = {}
    for name, cfg in runs.items():
        try:
            rows[name] = measure(cfg, device, dtype, cfg.batch_size, args.steps, args.warmup,
                                 compile_model, part=p5, profile=args.profile and name == "moe grouped_mm")
        except RuntimeError as e:  # a kernel this device lacks: say so, go on with the rest
            print(f"{name}: failed ({str(e).splitlines()[0][:120]})")
            continue
        r = rows[name]
        print(f"{name:<15} {r['ms_per_iter']:8.1f} ms/iter {r['tokens_per_s']:12,.0f} tok/s", flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    dense = rows.get("dense", {}).get("tokens_per_s")
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"\n{where}, preset {args.preset}, {str(dtype).replace('torch.', '')}, compile={compile_model},"
          f" batch {base.batch_size} x {base.block_size}")
    print(f"{'model':<15} {'params':>12} {'active':>12} {'ms/iter':>9} {'tok/s':>12} {'x dense':>8}")
    for name, r in rows.items():
        r["vs_dense"] = r["tokens_per_s"] / dense if dense else None
        print(f"{name:<15} {r['total_params']:12,d} {r['active_params']:12,d} {r['ms_per_iter']:9.1f}"
              f" {r['tokens_per_s']:12,.0f} {(format(r['vs_dense'], '.2f') + 'x') if dense else '-':>8}")
    out = ROOT / "out" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_throughput.json").write_text(json.dumps(
        {"device": where, "preset": args.preset, "dtype": str(dtype), "compile": compile_model,
         "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out / 'moe_throughput.json'}")


if __name__ == "__main__":
    main()
