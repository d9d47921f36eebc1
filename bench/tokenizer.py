"""BPE tokenizer speed: train to a vocabulary, encode, decode; bytes per token.

  python bench/tokenizer.py --data ../shared/data/tinyshakespeare.txt --vocab_size 4096

The tokenizer trains on the first 90% of the text, as part04's run does; bytes per token
are reported on that training text and on the held-out last 10%. When Hugging Face
`tokenizers` is installed (pip install tokenizers), it trains a byte-level BPE with the same
split pattern, special token and vocabulary size on the same text, and the table gives the
ratios ours / HF of the training time and of the encode speed, and whether both cut the
held-out text into the same tokens (compared as byte strings: HF numbers its ids in
another order). Times are the best of --repeat runs.

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


def best_time(fn, repeat):
    """(the shortest wall time of `repeat` calls, the last call's result)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def hf_byte_of():
    """GPT-2's byte-level alphabet, reversed: the character HF writes for a byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def hf_bpe(text, vocab_size, special_tokens, pattern):
    """A Hugging Face byte-level BPE: the same split regex, all 256 bytes, the same specials."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer)
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a .txt file")
    ap.add_argument("--vocab_size", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--part", default="part04_scale", help="the part whose BPETokenizer to time")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each step; the best counts")
    args = ap.parse_args()
    part = importlib.import_module(args.part)
    BPE = part.BPETokenizer
    try:
        import tokenizers
    except ImportError:
        tokenizers = None
    text = Path(args.data).read_text(encoding="utf-8")
    n_bytes = len(text.encode("utf-8"))
    train_text, held_out = text[: int(0.9 * len(text))], text[int(0.9 * len(text)):]
    rows = []
    for vocab in args.vocab_size:
        train_s, tok = best_time(lambda: BPE.train(train_text, vocab), args.repeat)
        # a fresh tokenizer each time: an empty chunk cache
        encode_s, ids = best_time(lambda: BPE(list(tok.merges), list(tok.special)).encode(text), args.repeat)
        decode_s, back = best_time(lambda: tok.decode(ids), args.repeat)
        assert back == text, "round trip failed"
        held_ids = tok.encode(held_out)
        row = {"vocab_size": vocab, "train_s": train_s, "encode_mb_s": n_bytes / encode_s / 1e6,
               "decode_mb_s": n_bytes / decode_s / 1e6,
               "bytes_per_token_train": len(train_text.encode("utf-8")) / len(tok.encode(train_text)),
               "bytes_per_token_held_out": len(held_out.encode("utf-8")) / len(held_ids)}
        if tokenizers is not None:
            special = list(tok.special)
            hf_train_s, hf = best_time(lambda: hf_bpe(train_text, vocab, special, part.GPT4_SPLIT), args.repeat)
            hf_encode_s, _ = best_time(lambda: hf.encode(text), args.repeat)
            byte_of = hf_byte_of()
            hf_held = [bytes(byte_of[c] for c in hf.id_to_token(i)) for i in hf.encode(held_out).ids]
            row.update({"hf_vocab_size": hf.get_vocab_size(), "hf_train_s": hf_train_s,
                        "hf_encode_mb_s": n_bytes / hf_encode_s / 1e6,
                        "train_time_ours_over_hf": train_s / hf_train_s,
                        "encode_speed_ours_over_hf": (n_bytes / encode_s) / (n_bytes / hf_encode_s),
                        "same_held_out_tokens": [tok.vocab[i] for i in held_ids] == hf_held})
        rows.append(row)
    print(f"{'vocab':>6} {'train s':>8} {'encode MB/s':>12} {'decode MB/s':>12} {'bytes/token train':>18}"
          f" {'held-out':>9}")
    for r in rows:
        print(f"{r['vocab_size']:6d} {r['train_s']:8.2f} {r['encode_mb_s']:12.2f} {r['decode_mb_s']:12.1f}"
              f" {r['bytes_per_token_train']:18.3f} {r['bytes_per_token_held_out']:9.3f}")
    if tokenizers is None:
        print("(pip install tokenizers to compare with Hugging Face's BPE)")
    else:
        print(f"\nHugging Face tokenizers {tokenizers.__version__}, same pattern, text and vocabulary:")
        print(f"{'vocab':>6} {'HF train s':>11} {'HF encode MB/s':>15} {'train time ours/HF':>19}"
              f" {'encode speed ours/HF':>21} {'same held-out tokens':>21}")
        for r in rows:
            print(f"{r['vocab_size']:6d} {r['hf_train_s']:11.2f} {r['hf_encode_mb_s']:15.2f}"
                  f" {r['train_time_ours_over_hf']:19.2f} {r['encode_speed_ours_over_hf']:21.2f}"
                  f" {str(r['same_held_out_tokens']):>21}")
    out = ROOT / "out" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "data": args.data, "bytes": n_bytes, "repeat": args.repeat,
              "tokenizers": tokenizers and tokenizers.__version__, "rows": rows}
    (out / "tokenizer.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'tokenizer.json'}")


if __name__ == "__main__":
    main()
