"""PPO (part08) against GRPO (part09) from one SFT policy, at the same number of sampled completions.

  python bench/rl_compare.py                                         # every variant, seeds 1 2 3
  python bench/rl_compare.py --sft out/part08/sft.pt --reward_model out/part07/reward.pt
  python bench/rl_compare.py --variants ppo_checker grpo --seeds 1 --extra "--device cuda"

Each variant of VARIANTS starts from the SAME SFT checkpoint (--sft: default
out/bench/part09/default/sft.pt, which bench/milestones.py --parts 09 writes) and samples the
same completions: --iters iterations (part08's --ppo_iters, part09's --grpo_iters) of
--rollout_batch responses (PPO: one per prompt; GRPO: rollout_batch / group_size prompts x
group_size), with --control false, over --seeds. The PPO variants read --reward_model (default
out/bench/part08/default/reward.pt): ppo_rm optimizes its score, ppo_checker the task's
checker (GRPO's verifier reward, the fairest comparison of the two algorithms; the reward
model then only gives the proxy score); grpo uses part09's verifier reward without
resampling flat groups (exactly as many completions), grpo_dynamic part09's defaults (flat
groups resampled: up to --max_draws times as many completions, counted in its summary's
grpo.sampled_responses). Each run
is its own process with --out_dir out/bench/rl_compare/VARIANT_seedS (its output in
VARIANT_seedS.log), seeds outermost, so that a change in the machine's load falls on every
variant alike. Per run: held-out greedy gold accuracy before (the SFT start) and after RL
on the hard and easy tasks, KL (nats per response, the last rollout), RL time (summary
rl_s: the loop without its evaluations), the process's wall time, its peak memory (the run
goes through WRAPPER, which writes its own ru_maxrss and, when it used CUDA,
torch.cuda.max_memory_allocated: the table shows the CUDA figure when the run was on a
GPU, else the RSS) and the trained parameters (policy + critic for PPO, the policy for
GRPO, from the "== PPO:" / "== GRPO:" line of its output).
--extra "..." is appended to every run's flags, --ppo_extra / --grpo_extra to one part's
(flags one part lacks, as --group_size, go there). A check of this script (a minute or two on a CPU),
after a tiny SFT policy and reward model:
  python part09_grpo.py --data ../shared/data/tinyshakespeare.txt --n_layer 1 --n_embd 32
    --max_steps 20 --eval_interval 10 --eval_iters 2 --sft_steps 20 --sft_examples 70
    --sft_val_examples 14 --sft_eval_interval 10 --eval_prompts 2 --pass_k 2 --grpo_iters 2
    --rollout_batch 8 --group_size 4 --grpo_minibatch 4 --control false --out_dir /tmp/rlc_sft
  python part07_reward.py --init_from /tmp/rlc_sft/sft.pt --eval_prompts 2 --pass_k 2
    --gold_pairs 70 --policy_prompts 14 --rm_eval_prompts 3 --rm_steps 20 --rm_eval_interval 10
    --out_dir /tmp/rlc_rm
  python bench/rl_compare.py --sft /tmp/rlc_sft/sft.pt --reward_model /tmp/rlc_rm/reward.pt
    --iters 2 --rollout_batch 8 --seeds 1 2 --eval_interval 1 --extra "--eval_prompts 2 --pass_k 2"
    --ppo_extra "--ppo_minibatch 4" --grpo_extra "--group_size 4 --grpo_minibatch 4"
Prints the table and writes out/bench/rl_compare.json with the machine. Timings and memory
depend on the machine and on what else runs on it: say which when quoting them.
"""
import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench"
ALGOS = {  # algorithm -> (script, its iteration flag, its eval-interval flag, the line that counts its parameters)
    "ppo": (ROOT / "part08_ppo.py", "--ppo_iters", "--ppo_eval_interval",
            re.compile(r"== PPO: ([\d,]+) policy and ([\d,]+) critic parameters")),
    "grpo": (ROOT / "part09_grpo.py", "--grpo_iters", "--grpo_eval_interval",
             re.compile(r"== GRPO: ([\d,]+) policy parameters")),
}
VARIANTS = {  # name -> (label, algorithm, flags)
    "ppo_rm": ("PPO, the reward model's score", "ppo", ["--reward_source", "model"]),
    "ppo_checker": ("PPO, the checker's reward (GRPO's signal)", "ppo", ["--reward_source", "checker"]),
    "grpo": ("GRPO, the verifier's reward, no critic, as many completions", "grpo", ["--skip_flat_groups", "false"]),
    "grpo_dynamic": ("GRPO as part09's default: flat groups resampled (more completions)", "grpo", []),
}
# Runs a part as `python part.py FLAGS` would (sys.argv, __main__), then writes this process's
# own peak memory: ru_maxrss (KiB on Linux, bytes on macOS) and, if it used CUDA, the most the
# caching allocator held for tensors. Written on any exit (SystemExit from the part included).
WRAPPER = """\
import json, runpy, sys
script, report = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    except ImportError:
        rss = None
    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    with open(report, "w") as f:
        json.dump({"max_rss_bytes": rss,
                   "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                   "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None}, f)
"""
IMPORT_TORCH_RSS = """\
import resource, sys, torch
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10))
"""  # the floor under every run's RSS: the interpreter and torch


def run(name, algo, flags):
    """ALGO's part --out_dir out/bench/rl_compare/NAME FLAGS in its own process (through
    WRAPPER) -> its summary.json plus process_s, its memory, its trained parameters and evals
    (its "ppo_eval" / "grpo_eval" rows); on failure the last lines of its output and exit 1."""
    script, _, _, params_line = ALGOS[algo]
    out_dir = OUT / "rl_compare" / name
    report = OUT / "rl_compare" / f"{name}.memory.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)
    flags = ["--out_dir", str(out_dir), "--overwrite", *flags]
    cmd = [sys.executable, "-c", WRAPPER, str(script), str(report), *flags]
    print("$", shlex.join([sys.executable, str(script.relative_to(ROOT)), *flags]), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace")
    process_s = time.perf_counter() - t0
    output = r.stdout + r.stderr
    (OUT / "rl_compare" / f"{name}.log").write_text(output)
    if r.returncode != 0:
        print("\n".join(output.splitlines()[-30:]))
        raise SystemExit(f"{script.name} ({name}) failed with exit status {r.returncode}")
    summary = json.loads((out_dir / "summary.json").read_text())
    memory = json.loads(report.read_text()) if report.exists() else {}
    found = params_line.search(output)
    counts = [int(g.replace(",", "")) for g in found.groups()] if found else []
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    on_gpu = str(summary.get("device", "")).startswith("cuda")
    peak = memory.get("cuda_max_allocated_bytes") if on_gpu else memory.get("max_rss_bytes")
    summary.update(process_s=process_s, memory=memory, peak_mb=peak / 2**20 if peak is not None else None,
                   peak_kind="cuda max_memory_allocated" if on_gpu else "max RSS",
                   policy_params=counts[0] if counts else None, critic_params=counts[1] if len(counts) > 1 else 0,
                   trained_params=sum(counts) if counts else None,
                   evals=[row for row in rows if row.get("stage") == f"{algo}_eval"])
    return summary


def spread(xs, spec):
    """The mean of xs (None left out), and min..max where they differ."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    mean = format(sum(xs) / len(xs), spec)
    lo, hi = format(min(xs), spec), format(max(xs), spec)
    return mean if lo == hi else f"{mean} ({lo}..{hi})"


def print_table(results):
    """One row per variant, mean (min..max) over its seeds."""
    variants = results["variants"]
    print(f"\n{results['iters']} iterations x {results['rollout_batch']} sampled responses per run, from "
          f"{results['sft']}; seeds {', '.join(map(str, results['args']['seeds']))}")
    kinds = {s["peak_kind"] for v in variants.values() for s in v["runs"].values()}
    table = [("variant", "hard gold sft -> rl", "easy gold rl", "KL", "sampled", "RL s", "process s", "peak MB",
              "trained params")]
    every = results["iters"] * results["rollout_batch"]  # PPO's, and GRPO's without resampling
    for name, v in variants.items():
        runs = list(v["runs"].values())
        col = lambda key: [s[key] for s in runs]  # noqa: E731
        gold = lambda model, part: [s["gold_accuracy"][model][part] for s in runs]  # noqa: E731
        params = sorted({p for p in col("trained_params") if p is not None})
        table.append((name, f"{spread(gold('sft', 'hard'), '.1%')} -> {spread(gold('rl', 'hard'), '.1%')}",
                      spread(gold("rl", "easy"), ".1%"), spread(col("kl"), ".3f"),
                      spread([s.get("grpo", {}).get("sampled_responses", every) for s in runs], ",.0f"),
                      spread(col("rl_s"), ",.1f"),
                      spread(col("process_s"), ",.1f"), spread(col("peak_mb"), ",.0f"),
                      "/".join(f"{p:,}" for p in params) or "n/a"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print(f"{row[0]:<{widths[0]}}" + "".join(f"  {c:>{w}}" for c, w in zip(row[1:], widths[1:])))
    base = results["machine"]["import_torch_rss_mb"]
    print("KL: nats per response on the last rollout; RL s: the RL loop without its held-out evaluations;"
          f" peak MB: {', '.join(sorted(kinds))} of the run's own process"
          + (f" (a process that only imports torch: {base:,.0f} MB RSS)" if base else ""))
    for name, v in variants.items():
        print(f"  {name}: {v['label']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", "--init_from", dest="sft", default=None,
                    help="the SFT checkpoint every run starts from (default: out/bench/part09/default/sft.pt)")
    ap.add_argument("--reward_model", default=str(OUT / "part08" / "default" / "reward.pt"),
                    help="part07/08's reward.pt for the PPO variants (default: out/bench/part08/default/reward.pt)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="--seed of each run of each variant")
    ap.add_argument("--iters", type=int, default=100, help="RL iterations: part08's --ppo_iters, part09's --grpo_iters")
    ap.add_argument("--rollout_batch", type=int, default=64, help="sampled responses per iteration, in both parts")
    ap.add_argument("--eval_interval", type=int, default=None,
                    help="--ppo_eval_interval and --grpo_eval_interval (default: the parts' own)")
    ap.add_argument("--extra", default="", help='flags appended to every run, e.g. "--device cuda"')
    ap.add_argument("--ppo_extra", default="", help="flags appended to part08's runs only")
    ap.add_argument("--grpo_extra", default="", help='flags appended to part09\'s runs only, e.g. "--group_size 4"')
    args = ap.parse_args()
    default_sft = OUT / "part09" / "default" / "sft.pt"
    if args.sft is None and not default_sft.exists():
        raise SystemExit(f"no {default_sft}: pass --sft PATH (a part06-09 sft.pt), or run "
                         "bench/milestones.py --parts 09 first")
    sft = Path(args.sft).resolve() if args.sft else default_sft
    reward_model = Path(args.reward_model).resolve()
    if not sft.exists():
        raise SystemExit(f"--sft {sft} does not exist")
    if any(VARIANTS[v][1] == "ppo" for v in args.variants) and not reward_model.exists():
        raise SystemExit(f"--reward_model {reward_model} does not exist (the PPO variants need one: "
                         "part07's or part08's reward.pt, or run bench/ppo.py first)")
    extra = {"ppo": shlex.split(args.extra) + shlex.split(args.ppo_extra),
             "grpo": shlex.split(args.extra) + shlex.split(args.grpo_extra)}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    base = subprocess.run([sys.executable, "-c", IMPORT_TORCH_RSS], capture_output=True, text=True)
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
                           "import_torch_rss_mb": float(base.stdout) if base.returncode == 0 else None,
                           "torch": torch.__version__, "python": platform.python_version()},
               "args": vars(args), "sft": str(sft), "reward_model": str(reward_model), "iters": args.iters,
               "rollout_batch": args.rollout_batch,
               "variants": {name: {"label": VARIANTS[name][0], "algo": VARIANTS[name][1], "runs": {}}
                            for name in args.variants}}
    path = OUT / "rl_compare.json"
    for seed in args.seeds:
        for name in args.variants:
            _, algo, flags = VARIANTS[name]
            _, iters_flag, eval_flag, _ = ALGOS[algo]
            start = ["--init_from", str(sft), "--control", "false", iters_flag, str(args.iters),
                     "--rollout_batch", str(args.rollout_batch), "--seed", str(seed)]
            if algo == "ppo":
                start += ["--reward_model", str(reward_model)]
            if args.eval_interval:
                start += [eval_flag, str(args.eval_interval)]
            results["variants"][name]["runs"][seed] = run(f"{name}_seed{seed}", algo, start + flags + extra[algo])
            path.write_text(json.dumps(results, indent=2))  # after every run: a later failure keeps these
    print_table(results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
