"""Part06's milestone (base vs SFT vs LoRA exact match) and its 6.3/6.4 batching comparisons.

  python bench/sft.py --data ../shared/data/tinyshakespeare.txt                 # milestone + variants
  python bench/sft.py --data ... --skip_milestone --steps 3000                  # variants only, reusing best.pt
  python bench/sft.py --data ... --extra "--device cuda"                        # flags for every run

1. The milestone: part06_sft.py with its default flags (--out_dir out/bench/part06/default),
   timed in its own process: exact match per task for the base, SFT and LoRA models, pass@k
   on the hard tasks against greedy, padding, tokens/s, trainable parameters, wall time.
2. From the SAME pretrained base (--init_from out/bench/part06/default/best.pt), full SFT
   for --steps steps with early stopping off (a huge --sft_patience) in three variants:
   random order (the default), --curriculum (6.4) and --group_by_length (6.3), each in its
   own process and --out_dir under out/bench/part06/.
--extra "..." is appended to every run's flags. A check of this script (well under a minute on a CPU):
  python bench/sft.py --data ... --steps 20 --extra "--n_layer 1 --n_embd 32 --max_steps 20
    --eval_interval 10 --eval_iters 2 --sft_examples 70 --sft_val_examples 14
    --sft_eval_interval 10 --eval_prompts 2 --pass_k 2"
Prints the tables and writes out/bench/sft.json with the machine. Timings (tokens/s,
seconds) depend on the machine and on what else runs on it: say which when quoting them.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench"
SCRIPT = ROOT / "part06_sft.py"
VARIANTS = {"random order": [], "curriculum": ["--curriculum"], "group_by_length": ["--group_by_length"]}


def run(name, flags):
    """part06_sft.py --out_dir out/bench/part06/NAME FLAGS in its own process -> its summary.json
    plus process_s; on failure the last lines of its output and exit status 1."""
    out_dir = OUT / "part06" / name
    cmd = [sys.executable, str(SCRIPT), "--out_dir", str(out_dir), "--overwrite", *flags]
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        print("\n".join((r.stdout + r.stderr).splitlines()[-30:]))
        raise SystemExit(f"part06 ({name}) failed with exit status {r.returncode}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["process_s"] = time.perf_counter() - t0
    return summary


def print_milestone(s):
    acc = s["accuracy"]
    names = list(acc["base"])  # the tasks, then easy, hard, overall
    print("\nexact match on held-out prompts")
    print(f"{'model':<6}" + "".join(f"{n:>9}" for n in names))
    for model, row in acc.items():
        print(f"{model:<6}" + "".join(f"{row[n]:9.1%}" for n in names))
    greedy = acc["sft" if "sft" in acc else "lora"]["hard"]
    print(f"pass@{s['pass_at_k']['k']} hard {s['pass_at_k']['hard']:.1%} vs greedy hard {greedy:.1%}")
    params = " vs ".join(f"{m} {n:,}" for m, n in s["trainable_params"].items())
    print(f"padding {s['padding_fraction']:.1%}, {s['tokens_per_s']:,.0f} tokens/s (SFT), trainable params {params}")
    print(f"wall {s['wall_s']:,.0f} s (process {s['process_s']:,.0f} s)")


def print_variants(variants):
    print(f"\n{'variant':<16} {'steps':>6} {'padding':>8} {'tok/s':>9} {'easy':>7} {'hard':>7} {'overall':>8} {'SFT s':>7}")
    for name, s in variants.items():
        run_, acc = s["sft"]["full"], s["accuracy"]["sft"]
        print(f"{name:<16} {run_['steps']:>6} {run_['padding_fraction']:>8.1%} {run_['tokens_per_s']:>9,.0f}"
              f" {acc['easy']:>7.1%} {acc['hard']:>7.1%} {acc['overall']:>8.1%} {run_['train_s']:>7,.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="--data for the milestone's pretraining (default: part06's)")
    ap.add_argument("--steps", type=int, default=1500, help="SFT steps of every variant (no early stopping)")
    ap.add_argument("--extra", default="", help='flags appended to every run, e.g. "--device cuda"')
    ap.add_argument("--skip_milestone", action="store_true", help="reuse out/bench/part06/default/best.pt")
    args = ap.parse_args()
    extra = shlex.split(args.extra)
    base = OUT / "part06" / "default" / "best.pt"
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version()},
               "args": vars(args), "milestone": None, "variants": {}}
    if not args.skip_milestone:
        data = ["--data", str(Path(args.data).resolve())] if args.data else []
        results["milestone"] = run("default", data + extra)
        print_milestone(results["milestone"])
    elif not base.exists():
        raise SystemExit(f"--skip_milestone needs {base}: run once without it")
    common = ["--init_from", str(base), "--sft_method", "full", "--sft_steps", str(args.steps),
              "--sft_patience", "1000000"]
    for name, flags in VARIANTS.items():
        results["variants"][name] = run(name.replace(" ", "_"), common + flags + extra)
    print_variants(results["variants"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sft.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {OUT / 'sft.json'}")


if __name__ == "__main__":
    main()
