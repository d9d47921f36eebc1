"""Where GRPO's gain goes, task by task: part09's GRPO from one SFT model on three prompt
mixes, each policy judged on every held-out prompt of the hard tasks it can find (up to
--most per task; multiply has 53), greedy and by --samples answers at temperature 1.

  python bench/rl_tasks.py --init_from out/part09/sft.pt
  python bench/rl_tasks.py --init_from out/part09/sft.pt --mixes builtin --extra "--grpo_iters 300"
  python bench/rl_tasks.py --init_from out/part09/sft.pt --device cuda

Mixes: builtin (part09's own: fresh prompts of all seven tasks, each equally likely),
add_sort (training-side prompts of add and sort alone), multiply (multiply's 667
training-side prompts alone); the last two reach part09 through --prompt_data. Each GRPO
run is its own process (`python part09_grpo.py --init_from SFT --control false ...`, its
output in out/bench/rl_tasks/MIX.log). part09's own milestone judges 50 held-out prompts
per task greedily; on 50 prompts one answer is 2 points, so this bench judges on more
prompts and also reports the share of right samples, which is what GRPO raises. Prints a
table and writes out/bench/rl_tasks.json.
"""
import argparse
import json
import random
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import part09_grpo as p9  # noqa: E402

OUT = ROOT / "out" / "bench" / "rl_tasks"
MIXES = {"builtin": None, "add_sort": ("add", "sort"), "multiply": ("multiply",)}  # None: part09's own prompts


def prompts_of(task, held_out, most, rng):
    """Up to `most` distinct prompts of a task from one side of part06's split (fewer where
    the task has fewer: 200 draws per prompt wanted find nearly all of a small task's)."""
    found = {}
    for _ in range(200 * most):
        prompt = task.make(rng)
        if p9.held_out(prompt) == held_out:
            found[prompt] = None
            if len(found) == most:
                break
    return list(found)


def judge(path, prompts, samples, seed, device):
    """Greedy exact match and (pass@samples, share of right samples) per hard task."""
    cfg = p9.Config(device=device, seed=seed)
    cfg, tokenizer, model = p9.load_model(cfg, str(path), device)
    dtype = p9.pick_dtype("auto", device)
    greedy = p9.gold_accuracy(model.eval(), tokenizer, prompts, cfg, dtype)
    sampled = p9.pass_at_k(model, tokenizer, prompts, cfg, dtype, samples)
    return {"greedy": {t: greedy[t] for t in [*prompts, "hard"]}, "pass_at_k": {t: sampled[t] for t in [*prompts, "hard"]},
            "sampled": sampled["sampled"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init_from", default="out/part09/sft.pt", help="the SFT model every run starts from")
    ap.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    ap.add_argument("--most", type=int, default=200, help="held-out prompts per hard task at most")
    ap.add_argument("--samples", type=int, default=8, help="answers at temperature 1 per prompt")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="cpu", help="for the GRPO runs and the judging")
    ap.add_argument("--extra", default="", help="flags for every GRPO run, e.g. \"--grpo_iters 300\"")
    args = ap.parse_args()
    device = p9.pick_device(args.device)
    if not Path(args.init_from).is_file():
        sys.exit(f"error: --init_from {args.init_from} is not a file (part09's default run writes out/part09/sft.pt)")
    OUT.mkdir(parents=True, exist_ok=True)
    hard = [t for t in p9.TASKS if t.level == "hard"]
    rng = random.Random(f"rl-tasks-{args.seed}")
    test = {t.name: prompts_of(t, True, args.most, rng) for t in hard}
    print("held-out prompts: " + ", ".join(f"{t} {len(ps)}" for t, ps in test.items()))
    rows = {"sft": judge(args.init_from, test, args.samples, args.seed, device)}
    for mix in args.mixes:
        flags = ["--init_from", args.init_from, "--control", "false", "--seed", str(args.seed), "--device", device,
                 "--out_dir", str(OUT / mix), "--overwrite", "true", *shlex.split(args.extra)]
        if MIXES[mix]:
            path = OUT / f"{mix}.jsonl"
            train = [{"prompt": q} for name in MIXES[mix] for q in prompts_of(p9.TASK_BY_NAME[name], False, 3000, rng)]
            random.Random(args.seed).shuffle(train)
            path.write_text("".join(json.dumps(r) + "\n" for r in train))
            flags += ["--prompt_data", str(path)]
        print(f"== GRPO on {mix}: python part09_grpo.py {shlex.join(flags)}", flush=True)
        with open(OUT / f"{mix}.log", "w") as log:
            subprocess.run([sys.executable, str(ROOT / "part09_grpo.py"), *flags], stdout=log,
                           stderr=subprocess.STDOUT, check=True)
        rows[mix] = judge(OUT / mix / "grpo.pt", test, args.samples, args.seed, device)
    names = [*test, "hard"]
    print(f"\ngreedy exact match / share of right answers at temperature 1 ({args.samples} per prompt)")
    print(f"{'RL prompts':<10} " + " ".join(f"{n:>15}" for n in names))
    for mix, r in rows.items():
        print(f"{mix:<10} " + " ".join(f"{r['greedy'][n]:7.1%}/{r['sampled'][n]:<7.1%}" for n in names))
    (OUT.parent / "rl_tasks.json").write_text(json.dumps(
        {"init_from": args.init_from, "held_out": {t: len(ps) for t, ps in test.items()}, "samples": args.samples,
         "extra": args.extra, "rows": rows}, indent=2))
    print(f"wrote {OUT.parent / 'rl_tasks.json'}")


if __name__ == "__main__":
    main()
