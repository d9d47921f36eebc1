"""Run the milestone of each part with its default flags and print one table.

  python bench/milestones.py --data ../shared/data/tinyshakespeare.txt            # parts 01-05
  python bench/milestones.py --data ... --parts 02 03 --ablate                    # + part03's table

Each part runs its milestone in its own process (as a user would run it: default flags,
plus MILESTONE_FLAGS where the milestone is a mode, as part05's --compare) with --out_dir
under out/bench/; the figures come from the summary.json each part writes. The table is
printed and written to out/bench/milestones.json. Timings depend on the machine: say which.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {  # part -> the summary keys that make its milestone
    "00": ["matmul_tflops", "bandwidth_gbs"],
    "01": ["final_loss", "steps", "exact_match", "wall_s"],
    "02": ["val_loss", "val_bpb", "tokens_per_s", "steps", "wall_s"],
    "03": ["val_loss", "val_bpb", "tokens_per_s", "steps", "kv_speedup", "wall_s"],
    "04": ["val_loss", "val_bpb", "bytes_per_token", "tokens_per_s", "steps", "wall_s"],
    "05": ["wall_s"],  # and the dense-vs-MoE rows of `compare`
    "06": ["wall_s"],  # and a row of exact match per model (bench/sft.py has the full table)
    "07": ["pair_accuracy", "auc", "length_corr", "calibration_error", "wall_s"],  # bench/reward.py: the full checks
    "08": ["rm_score", "kl", "rl_s", "wall_s"],  # and a row of held-out gold accuracy per model (bench/ppo.py)
    "09": ["kl", "flat_group_fraction", "rl_s", "wall_s"],  # and gold rows as 08's (bench/rl_compare.py)
    "10": ["wall_s"],  # and rows per lesson (bench/boundless.py: the vocabulary sweep; bench/poincare.py: gensim)
}
MILESTONE_FLAGS = {"05": ["--compare", "--tokenizer", "byte"]}


def run_part(part, extra, out_root):
    script = next(ROOT.glob(f"part{part}_*.py"))
    out_dir = out_root / f"part{part}" / ("ablate" if "--ablate" in extra else "default")
    cmd = [sys.executable, str(script), "--out_dir", str(out_dir), *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-2000:])
        raise SystemExit(f"part{part} failed with exit status {r.returncode}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["process_s"] = time.perf_counter() - t0
    return summary


def fmt(v):
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, dict):
        return json.dumps({k: round(x, 3) if isinstance(x, float) else x for k, x in v.items()})
    return str(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="--data passed to parts 02 and later")
    ap.add_argument("--parts", nargs="+", default=["01", "02", "03", "04", "05"])
    ap.add_argument("--ablate", action="store_true", help="also run part03 --ablate")
    args = ap.parse_args()
    out_root = ROOT / "out" / "bench"
    data = ["--data", str(Path(args.data).resolve())] if args.data else []
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "python": platform.python_version(), "parts": {}}
    for part in args.parts:
        extra = (data + ["--overwrite"] if int(part) >= 2 else []) + MILESTONE_FLAGS.get(part, [])
        results["parts"][part] = run_part(part, extra, out_root)
    if args.ablate:
        results["parts"]["03-ablate"] = run_part("03", data + ["--ablate", "--overwrite"], out_root)

    print(f"\n{'part':<10} {'figure':<19} value")
    for part, s in results["parts"].items():
        for key in FIGURES.get(part[:2], []) + ["process_s"]:
            if key in s and not (part.endswith("ablate") and key not in ("kv_speedup", "process_s")):
                print(f"{part:<10} {key:<19} {fmt(s[key])}")
        for model, row in s.get("compare", {}).items():
            print(f"{part:<10} {model:<20} params {row['total_params']:,} ({row['active_params']:,} active)"
                  f"  {row['tokens_per_s']:,.0f} tok/s  val {row['val_loss']:.4f} nats/token"
                  f" = {row['val_bpb']:.3f} bpb")
        for model, acc in (s.get("gold_accuracy") or s.get("accuracy", {})).items():  # 08, 09: sft, rl, sft_more
            print(f"{part:<10} {model:<20} exact match easy {acc['easy']:.1%}  hard {acc['hard']:.1%}"
                  f"  overall {acc['overall']:.1%}")
        for kind, row in s.get("boundless", {}).items() if part == "10" else ():  # 10.1
            if isinstance(row, dict):
                print(f"{part:<10} {kind:<20} {row['bytes_per_token']:.3f} bytes/token  Renyi {row['renyi_efficiency']:.4f}"
                      f"  trained in {row['train_s']:.1f} s  val {row['val_bpb']:.3f} bpb")
        patches = s.get("patches", {}) if part == "10" else {}
        for model in ("latent", "tokens") if patches else ():  # 10.2
            row = patches[model]
            print(f"{part:<10} {model:<20} val {row['val_bpb']:.3f} bpb  {row['flops_per_byte'] / 1e6:.2f} MFLOPs/byte"
                  f"  (patches {patches['mean_patch_length']:.2f} bytes, BPE {patches['bpe_bytes_per_token']:.2f})")
        lcm = s.get("lcm") if part == "10" else None  # 10.3
        if lcm:
            print(f"{part:<10} {'Base-LCM':<20} next-concept cosine {lcm['cosine']:.3f} (last {lcm['cosine_repeat_last']:.3f},"
                  f" mean {lcm['cosine_mean']:.3f})  rank of next {lcm['rank_of_next']:.1f}/100"
                  f"  reconstruction {lcm['reconstruction_exact']:.1%}")
        for geometry, by_dim in ((g, s["poincare"][g]) for g in ("poincare", "euclidean")) if part == "10" and "poincare" in s else ():
            print(f"{part:<10} {geometry:<20} " + "  ".join(f"dim {d}: rank {r['mean_rank']:.2f} MAP {r['map']:.3f}"
                                                         for d, r in by_dim.items()))
        for row in s.get("ablation", []):
            print(f"{part:<10} {row['name']:<20} params {row['params']:,}  {row['tokens_per_s']:,.0f} tok/s"
                  f"  val {row['val_loss']:.4f} nats/byte = {row['val_bpb']:.3f} bpb")
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "milestones.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out_root / 'milestones.json'}")


if __name__ == "__main__":
    main()
