"""BPE tokenizer speed: train to a vocabulary, encode, decode; bytes per token.

  python bench/tokenizer.py --data ../shared/data/tinyshakespeare.txt --vocab_size 4096

Targets (issue: 2-core CPU, Tiny Shakespeare): train to 4096 in <= 10 s (goal 3 s),
encode >= 1 MB/s. Prints a table and writes out/bench/tokenizer.json.
"""
import argparse
import importlib
import json
import platform
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a .txt file")
    ap.add_argument("--vocab_size", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--part", default="part04_scale", help="the part whose BPETokenizer to time")
    args = ap.parse_args()
    BPE = importlib.import_module(args.part).BPETokenizer
    text = Path(args.data).read_text(encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    train_text = text[: int(0.9 * len(text))]
    rows = []
    for vocab in args.vocab_size:
        t = time.perf_counter()
        tok = BPE.train(train_text, vocab)
        train_s = time.perf_counter() - t
        fresh = BPE([tuple(p) for p in tok.merges], list(tok.special))  # an empty chunk cache
        t = time.perf_counter()
        ids = fresh.encode(text)
        encode_s = time.perf_counter() - t
        t = time.perf_counter()
        back = fresh.decode(ids)
        decode_s = time.perf_counter() - t
        assert back == text, "round trip failed"
        rows.append({"vocab_size": vocab, "train_s": train_s, "encode_mb_s": n_bytes / encode_s / 1e6,
                     "decode_mb_s": n_bytes / decode_s / 1e6, "bytes_per_token": n_bytes / len(ids)})
    print(f"{'vocab':>6} {'train s':>8} {'encode MB/s':>12} {'decode MB/s':>12} {'bytes/token':>12}")
    for r in rows:
        print(f"{r['vocab_size']:6d} {r['train_s']:8.2f} {r['encode_mb_s']:12.2f} {r['decode_mb_s']:12.1f}"
              f" {r['bytes_per_token']:12.3f}")
    out = ROOT / "out" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "data": args.data, "bytes": n_bytes, "rows": rows}
    (out / "tokenizer.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'tokenizer.json'}")


if __name__ == "__main__":
    main()
