"""Part07's milestone (the reward model's held-out checks) and what its choices buy.

  python bench/reward.py --data ../shared/data/tinyshakespeare.txt               # milestone + variants
  python bench/reward.py --skip_milestone                                        # variants only, reusing sft.pt
  python bench/reward.py --data ... --extra "--device cuda"                      # flags for every run

1. The milestone: part07_reward.py with its default flags (--out_dir out/bench/part07/default),
   timed in its own process: pretraining, SFT, then the reward model and its checks.
2. From the SAME SFT policy (--init_from out/bench/part07/default/sft.pt), the reward model
   again in each variant of VARIANTS, each in its own process and --out_dir under
   out/bench/part07/: without the centering term, and with 4x the steps.
--extra "..." is appended to every run's flags. A check of this script (about a minute on a CPU):
  python bench/reward.py --data ... --extra "--n_layer 1 --n_embd 32 --max_steps 20
    --eval_interval 10 --eval_iters 2 --sft_steps 20 --sft_examples 70 --sft_val_examples 14
    --sft_eval_interval 10 --eval_prompts 2 --pass_k 2 --gold_pairs 70 --policy_prompts 14
    --rm_eval_prompts 3 --rm_steps 20 --rm_eval_interval 10"
Prints the tables and writes out/bench/reward.json with the machine. Timings depend on the
machine and on what else runs on it: say which when quoting them.
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
SCRIPT = ROOT / "part07_reward.py"
VARIANTS = {"center_coef 0": ["--center_coef", "0"], "rm_steps x4": ["--rm_steps", "4x"]}


def run(name, flags):
    """part07_reward.py --out_dir out/bench/part07/NAME FLAGS in its own process -> its
    summary.json plus process_s; on failure the last lines of its output and exit status 1."""
    out_dir = OUT / "part07" / name
    cmd = [sys.executable, str(SCRIPT), "--out_dir", str(out_dir), "--overwrite", *flags]
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        print("\n".join((r.stdout + r.stderr).splitlines()[-30:]))
        raise SystemExit(f"part07 ({name}) failed with exit status {r.returncode}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["process_s"] = time.perf_counter() - t0
    return summary


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def print_milestone(s):
    acc = s["accuracy"]["sft"]
    print(f"\nSFT policy: exact match easy {acc['easy']:.1%}, hard {acc['hard']:.1%}")
    print("held-out pair accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in s["pair_accuracy"].items())
          + "; by corruption: " + ", ".join(f"{k} {v:.1%}" for k, v in s["pair_accuracy_by_kind"].items()))
    print(f"AUC right vs wrong SFT answers {fmt(s['auc'])} (" +
          ", ".join(f"{k} {fmt(v, '.2f')}" for k, v in s["auc_per_task"].items()) + ")")
    print(f"reward-length correlation {fmt(s['length_corr'])}; padding max diff {s['padding_max_diff']:.1e}; "
          f"calibration error {s['calibration_error']:.3f}")
    print(f"{'confidence bin':<15} {'pairs':>6} {'confidence':>11} {'agreement':>10}")
    for b in s["calibration"]:
        print(f"{b['bin']:<15} {b['pairs']:>6} {b['confidence']:>11.1%} {b['agreement']:>10.1%}")
    rm = s["reward_model"]
    print(f"reward model: {rm['steps']} steps (best {rm['best_step']}), {rm['tokens_per_s']:,.0f} tokens/s, "
          f"{rm['train_s']:,.0f} s; wall {s['wall_s']:,.0f} s (process {s['process_s']:,.0f} s)")


def print_variants(variants):
    print(f"\n{'variant':<16} {'gold':>7} {'on-policy':>10} {'AUC':>7} {'len corr':>9} {'calib err':>10} {'RM s':>7}")
    for name, s in variants.items():
        acc = s["pair_accuracy"]
        print(f"{name:<16} {acc['gold']:>7.1%} {acc.get('on_policy', float('nan')):>10.1%} {fmt(s['auc']):>7}"
              f" {fmt(s['length_corr']):>9} {s['calibration_error']:>10.3f} {s['reward_model']['train_s']:>7,.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="--data for the milestone's pretraining (default: part07's)")
    ap.add_argument("--extra", default="", help='flags appended to every run, e.g. "--device cuda"')
    ap.add_argument("--skip_milestone", action="store_true", help="reuse out/bench/part07/default/sft.pt")
    args = ap.parse_args()
    extra = shlex.split(args.extra)
    policy = OUT / "part07" / "default" / "sft.pt"
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version()},
               "args": vars(args), "milestone": None, "variants": {}}
    if not args.skip_milestone:
        data = ["--data", str(Path(args.data).resolve())] if args.data else []
        results["milestone"] = run("default", data + extra)
        print_milestone(results["milestone"])
    elif not policy.exists():
        raise SystemExit(f"--skip_milestone needs {policy}: run once without it")
    steps = next((extra[i + 1] for i in range(len(extra) - 1) if extra[i] == "--rm_steps"), None)
    steps = int(steps) if steps else int(subprocess.run(
        [sys.executable, "-c", "import part07_reward as p; print(p.Config.rm_steps)"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    for name, flags in VARIANTS.items():
        flags = [str(4 * steps) if f == "4x" else f for f in flags]
        results["variants"][name] = run(name.replace(" ", "_"), ["--init_from", str(policy)] + extra + flags)
    print_variants(results["variants"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "reward.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {OUT / 'reward.json'}")


if __name__ == "__main__":
    main()
