"""BPE against BoundlessBPE (part10, 10.1) over vocabulary sizes: bytes per token on the
held-out text and on the training text, Renyi efficiency (alpha 2.5) and Shannon efficiency
on the held-out text, training and encoding time, and how many tokens are superwords.

  python bench/boundless.py --data ../shared/data/tinyshakespeare.txt
  python bench/boundless.py --data ... --vocab_sizes 4096 32768

Both train on the first 90% of the text with part10's special tokens, as part10's lesson
does; the held-out text is the last 10%. The lesson's model figures (val bpb at equal
training time) come from `python part10_semantic.py --only boundless`. Prints a table and
writes out/bench/boundless.json.
"""
import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(cls, train_text, val_text, vocab_size, specials, renyi):
    t = time.perf_counter()
    tok = cls.train(train_text, vocab_size, specials)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    ids = tok.encode(val_text)
    encode_s = time.perf_counter() - t
    assert tok.decode(ids) == val_text
    return {"bytes_per_token": len(val_text.encode("utf-8")) / len(ids),
            "train_bytes_per_token": len(train_text.encode("utf-8")) / len(tok.encode(train_text)),
            "renyi_efficiency": renyi(ids, tok.vocab_size, 2.5), "shannon_efficiency": renyi(ids, tok.vocab_size, 1.0),
            "train_s": train_s, "encode_mb_s": len(val_text.encode("utf-8")) / 1e6 / encode_s,
            "superwords": len(getattr(tok, "supermerges", ())), "vocab_size": tok.vocab_size}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a .txt file")
    ap.add_argument("--vocab_sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--out", default="out/bench/boundless.json")
    args = ap.parse_args()
    mod = importlib.import_module("part10_semantic")
    text = Path(args.data).read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    train_text, val_text = text[:cut], text[cut:]
    specials = ("<|endoftext|>", *mod.CHAT_TOKENS)
    rows = []
    print(f"{'vocab':>6} {'kind':<10} {'bytes/tok':>9} {'(train)':>8} {'Renyi':>7} {'Shannon':>8} {'train s':>8} "
          f"{'MB/s':>6} {'superwords':>10}")
    for vocab_size in args.vocab_sizes:
        for kind, cls in (("bpe", mod.BPETokenizer), ("boundless", mod.BoundlessBPETokenizer)):
            r = {"vocab": vocab_size, "kind": kind,
                 **measure(cls, train_text, val_text, vocab_size, specials, mod.renyi_efficiency)}
            rows.append(r)
            print(f"{vocab_size:>6} {kind:<10} {r['bytes_per_token']:9.3f} {r['train_bytes_per_token']:8.3f} "
                  f"{r['renyi_efficiency']:7.4f} {r['shannon_efficiency']:8.4f} {r['train_s']:8.1f} "
                  f"{r['encode_mb_s']:6.2f} {r['superwords']:10d}", flush=True)
        bpe, boundless = rows[-2], rows[-1]
        print(f"{'':>6} {'ratio':<10} {boundless['bytes_per_token'] / bpe['bytes_per_token']:9.3f} "
              f"{boundless['train_bytes_per_token'] / bpe['train_bytes_per_token']:8.3f} "
              f"{boundless['renyi_efficiency'] / bpe['renyi_efficiency']:7.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "data": args.data, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
