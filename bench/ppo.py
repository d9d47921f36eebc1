"""Part08's milestone (PPO's held-out gold accuracy against SFT and the control) and overoptimization.

  python bench/ppo.py --data ../shared/data/tinyshakespeare.txt               # milestone + variants
  python bench/ppo.py --skip_milestone --variants beta0 --seeds 1 2           # reusing sft.pt and reward.pt
  python bench/ppo.py --data ... --extra "--device cuda"                      # flags for every run

1. The milestone: part08_ppo.py with its default flags (--out_dir out/bench/part08/default),
   timed in its own process: pretraining, SFT, the reward model, PPO, then the control (SFT
   continued for the RL phase's time). Its verdict: the RL policy's held-out greedy gold
   accuracy on the hard tasks against the SFT model's and the control's (target +10 points).
2. Overoptimization (Gao et al. 2022): from the SAME SFT policy and reward model
   (out/bench/part08/default/sft.pt and reward.pt), PPO with --control false in each variant
   of VARIANTS, each in its own process and --out_dir under out/bench/part08/: no KL penalty
   and the default kl_coef, each over --seeds, and the checker's reward (a perfect reward
   model: what PPO could gain with a reward model that is always right) at part08's default
   seed. Per variant, the held-out evaluations ("stage": "ppo_eval" of metrics.jsonl) from
   the SFT start on: KL, proxy (reward-model score) and gold, mean (min..max) over seeds.
--extra "..." is appended to every run's flags. A check of this script (minutes on a CPU):
  python bench/ppo.py --data ... --extra "--n_layer 1 --n_embd 32 --max_steps 20
    --eval_interval 10 --eval_iters 2 --sft_steps 20 --sft_examples 70 --sft_val_examples 14
    --sft_eval_interval 10 --eval_prompts 2 --pass_k 2 --gold_pairs 70 --policy_prompts 14
    --rm_eval_prompts 3 --rm_steps 20 --rm_eval_interval 10 --ppo_iters 4 --rollout_batch 8
    --ppo_minibatch 4 --ppo_eval_interval 2"
Prints the tables and writes out/bench/ppo.json with the machine. Timings depend on the
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
SCRIPT = ROOT / "part08_ppo.py"
TARGET = 10  # points of hard-task gold accuracy the RL policy should gain over SFT and over the control
VARIANTS = {  # name -> (label, flags, over --seeds: else part08's default seed)
    "beta0": ("kl_coef 0: no KL penalty", ["--kl_coef", "0"], True),
    "beta": ("the default kl_coef", [], True),
    "checker": ("checker reward (a perfect reward model), the default kl_coef", ["--reward_source", "checker"], False),
}


def run(name, flags):
    """part08_ppo.py --out_dir out/bench/part08/NAME FLAGS in its own process -> its
    summary.json plus process_s and evals (its "ppo_eval" rows); on failure the last lines
    of its output and exit status 1."""
    out_dir = OUT / "part08" / name
    cmd = [sys.executable, str(SCRIPT), "--out_dir", str(out_dir), "--overwrite", *flags]
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        print("\n".join((r.stdout + r.stderr).splitlines()[-30:]))
        raise SystemExit(f"part08 ({name}) failed with exit status {r.returncode}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["process_s"] = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary["evals"] = [r for r in rows if r.get("stage") == "ppo_eval"]
    return summary


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def spread(xs, spec):
    """The mean of xs (None left out), and min..max where there are several."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    mean = format(sum(xs) / len(xs), spec)
    return mean if len(xs) == 1 else f"{mean} ({format(min(xs), spec)}..{format(max(xs), spec)})"


def print_milestone(s):
    gold, proxy = s["gold_accuracy"], s["rm_score"]
    cols = list(gold["sft"])  # the tasks, then easy, hard, overall
    print("\nheld-out greedy gold accuracy")
    print(f"{'model':<9}" + "".join(f" {c:>8}" for c in cols) + f" {'RM score':>9}")
    for model, acc in gold.items():
        print(f"{model:<9}" + "".join(f" {fmt(acc[c], '.1%'):>8}" for c in cols) + f" {fmt(proxy[model], '+.3f'):>9}")
    control = (f"control {s['control_s']:,.0f} s ({s['control_steps']} SFT steps)" if s.get("control_s") is not None
               else "no control")
    print(f"KL {s['kl']:.3f} nats per response; RL {s['rl_s']:,.0f} s, {control}; "
          f"wall {s['wall_s']:,.0f} s (process {s['process_s']:,.0f} s)")
    gains = {m: 100 * (gold["rl"]["hard"] - gold[m]["hard"]) for m in ("sft", "sft_more") if m in gold}
    met = len(gains) == 2 and min(gains.values()) >= TARGET
    print("milestone: hard-task gain of rl " + ", ".join(f"over {m} {g:+.1f} points" for m, g in gains.items())
          + f" (target +{TARGET} over both): {'met' if met else 'not met'}")


def print_variant(label, runs):
    """One table: the SFT start, then each evaluation iteration, mean (min..max) over the runs."""
    seeds = ", ".join(str(seed) for seed in runs)  # "default": part08's own
    betas = sorted({s["ppo"]["beta"] for s in runs.values()})
    print(f"\n{label} (beta {', '.join(f'{b:g}' for b in betas)}; seeds {seeds}); "
          f"RL {spread([s['rl_s'] for s in runs.values()], ',.0f')} s")
    sft = [(s["rm_score"]["sft"], s["gold_accuracy"]["sft"]) for s in runs.values()]
    table = [("sft", [0.0], [p for p, _ in sft], [g["hard"] for _, g in sft], [g["easy"] for _, g in sft])]
    for it in sorted({r["ppo_iter"] for s in runs.values() for r in s["evals"]}):
        rows = [r for s in runs.values() for r in s["evals"] if r["ppo_iter"] == it]
        table.append((it, *([r[k] for r in rows] for k in ("kl", "rm_score", "gold_hard", "gold_easy"))))
    print(f"{'iter':<6} {'KL':>20} {'proxy':>22} {'gold hard':>22} {'gold easy':>22}")
    for it, kl, proxy, hard, easy in table:
        print(f"{it:<6} {spread(kl, '.3f'):>20} {spread(proxy, '+.3f'):>22} {spread(hard, '.1%'):>22}"
              f" {spread(easy, '.1%'):>22}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="--data for the milestone's pretraining (default: part08's)")
    ap.add_argument("--extra", default="", help='flags appended to every run, e.g. "--device cuda"')
    ap.add_argument("--skip_milestone", action="store_true", help="reuse out/bench/part08/default's sft.pt, reward.pt")
    ap.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                    help="the overoptimization runs (default: all; none: the milestone only)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="--seed of each run of beta0 and beta")
    args = ap.parse_args()
    extra = shlex.split(args.extra)
    default = OUT / "part08" / "default"
    start = ["--init_from", str(default / "sft.pt"), "--reward_model", str(default / "reward.pt"), "--control", "false"]
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version()},
               "args": vars(args), "milestone": None, "variants": {}}
    if not args.skip_milestone:
        data = ["--data", str(Path(args.data).resolve())] if args.data else []
        results["milestone"] = run("default", data + extra)
        print_milestone(results["milestone"])
    elif args.variants and not all((default / f).exists() for f in ("sft.pt", "reward.pt")):
        raise SystemExit(f"--skip_milestone needs {default}/sft.pt and reward.pt: run once without it")
    for name in args.variants:
        label, flags, seeded = VARIANTS[name]
        runs = ({seed: run(f"{name}_seed{seed}", start + extra + flags + ["--seed", str(seed)]) for seed in args.seeds}
                if seeded else {"default": run(name, start + extra + flags)})
        results["variants"][name] = {"label": label, "runs": runs}
    for v in results["variants"].values():
        print_variant(v["label"], v["runs"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ppo.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {OUT / 'ppo.json'}")


if __name__ == "__main__":
    main()
