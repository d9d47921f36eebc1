"""Rollout speed of part06: batched generation with the KV cache, what SFT's evaluation and
the RL parts (08-09) spend their sampling time on.

  python bench/rollout.py                                     # CPU, part06's default shape
  python bench/rollout.py --device cuda --init_from out/part06/sft.pt

Prompts of the built-in tasks (varied lengths, left-padded into one batch), sampled at
temperature 1 for --new_tokens tokens without stopping at <|end|>, so every batch size does
the same work per row. Tokens/s counts new tokens; the first call of each batch size is a
warm-up. The model is random (the default shape) unless --init_from names a checkpoint:
speed does not depend on the weights. Prints a table and writes out/bench/rollout.json.
Timings depend on the machine and on what else runs on it.
"""
import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import part06_sft as p6  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--init_from", default="", help="a part06 checkpoint (default: a random model)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = p6.pick_device(args.device)
    dtype = p6.pick_dtype("auto", device)
    cfg = p6.Config(device=device, out_dir="out/bench/rollout")
    if args.init_from:
        cfg, tokenizer, model = p6.load_model(cfg, args.init_from, device)
    else:
        tokenizer = p6.ByteTokenizer(p6.CHAT_TOKENS)
        cfg = p6.dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
        torch.manual_seed(0)
        model = p6.GPT(cfg).to(device)
    rng = random.Random(0)
    prompts = [p6.render_chat(tokenizer, p6.user_turn(rng.choice(p6.TASKS).make(rng)), True)[0]
               for _ in range(max(args.batches))]
    no_stop, pad = -1, tokenizer.special["<|pad|>"]  # an id never sampled: every row runs to the end
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for B in args.batches:
        times = []
        for i in range(args.repeats + 1):
            p6.sync(device)
            t = time.perf_counter()
            with p6.autocast_ctx(device, dtype):
                p6.generate_batch(model, prompts[:B], args.new_tokens, no_stop, pad, 1.0, generator=gen)
            p6.sync(device)
            if i:  # the first call warms up
                times.append(time.perf_counter() - t)
        best = min(times)
        rows.append({"batch": B, "seconds": best, "tokens_per_s": B * args.new_tokens / best,
                     "ms_per_step": 1000 * best / args.new_tokens})
    print(f"{p6.GPT.num_params(model):,} parameters, {device}, {str(dtype).replace('torch.', '')}, "
          f"{args.new_tokens} new tokens per row, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    print(f"{'batch':>6} {'ms/step':>8} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['batch']:6d} {r['ms_per_step']:8.2f} {r['tokens_per_s']:10,.0f}")
    out = ROOT / "out" / "bench" / "rollout.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "torch": torch.__version__, "device": device,
               "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
