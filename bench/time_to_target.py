"""Wall time of a finished run to reach a validation bits-per-byte target.

  python bench/time_to_target.py out/gpu/recipe --bpb 2.10

Reads the run's metrics.jsonl (evaluation rows carry val_loss in nats per token; training
rows carry elapsed_s since the loop started, compilation included) and summary.json (bytes
per token). Prints the first evaluation at or under the target, the seconds the loop had run
by then, the first step's seconds (mostly torch.compile) and the best validation figure.
"""
import argparse
import json
import math
from pathlib import Path


def time_to_target(out_dir, bpb):
    out_dir = Path(out_dir)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    bytes_per_token = json.loads((out_dir / "summary.json").read_text()).get("bytes_per_token", 1.0)
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if "elapsed_s" in r}
    evals = [(r["step"], r["val_loss"] / math.log(2) / bytes_per_token) for r in rows if "val_loss" in r]
    first_step = min(elapsed)
    result = {"target_bpb": bpb, "first_step_s": elapsed[first_step],
              "best_bpb": min(b for _, b in evals), "reached": None}
    for step, b in evals:
        if b <= bpb:
            # the eval follows the training row of the same step (log_interval divides eval_interval)
            result["reached"] = {"step": step, "bpb": b, "elapsed_s": elapsed.get(step)}
            break
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--bpb", type=float, default=2.10)
    args = ap.parse_args()
    r = time_to_target(args.out_dir, args.bpb)
    print(json.dumps(r, indent=2))
    hit = r["reached"]
    print(f"first step (compile) {r['first_step_s']:.1f} s; best {r['best_bpb']:.3f} bpb; "
          + (f"{args.bpb} bpb reached at step {hit['step']} ({hit['bpb']:.3f}) after {hit['elapsed_s']:.1f} s"
             if hit else f"{args.bpb} bpb not reached"))


if __name__ == "__main__":
    main()
