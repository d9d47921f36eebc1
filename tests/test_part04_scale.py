"""Part 04: scaling up. The BPE tokenizer (round trips on random Unicode, merges applied in
rank order, long chunks against the naive merge loop, the bounded cache, training against a
naive recount, JSON save/load, special tokens allowed only on request, inconsistent and bad
files, unknown ids), gradient accumulation against one big batch, the warmup + cosine schedule, exact resume
after Ctrl-C, atomic checkpoints, the checkpoint/summary/metrics contents, the vocabulary
padded to a multiple of 64, two torchrun processes against one, and the FLOPs estimate."""
import collections
import dataclasses
import io
import json
import math
import os
import random
import re
import signal
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import regex
import torch

from conftest import (expect_exit_2, lesson_fields, load, part_names, random_strings, randomize_,
                      read_metrics, read_summary, run_flags, small_corpus, tiny_cfg, torchrun,
                      train_losses, val_losses, write)

ALL = part_names(4)
RUN = part_names(4, 9)  # main() trains one model in --out_dir; part10's runs lessons (test_part10_semantic.py)
SPECIAL = "<|endoftext|>"


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
UNICODE_EXTRA = ("\nh\u00e9llo w\u00f6rld \u65e5\u672c\u8a9e\u306e\u6587 \U0001F600\U0001F44D "
                 "e\u0301 na\u00efve caf\u00e9 \u0416\u0443\u043a \u03b1\u03b2\u03b3 ") * 40


def mixed_text(shakespeare):
    """The first 50 kB of Shakespeare plus some non-ASCII text."""
    return Path(shakespeare).read_text(encoding="utf-8")[:50_000] + UNICODE_EXTRA


LESSON = 4  # every part builds part04's model: dense (conftest.lesson_fields)
# The tiny model of this file: conftest's, one layer of two heads, a 300-token vocabulary.
part04_cfg = partial(tiny_cfg, lesson=LESSON, n_layer=1, n_head=2, vocab_size=300)


# near misses of the special token, and ordinary text, beside conftest's hard cases
NEAR_MISSES = ("First Citizen:\nBefore we proceed", "it's 2024, isn't it?", "<|endoftext", "endoftext|>",
               "<|", "|>", "<|endoftext|", "<|EndOfText|>", "< |endoftext|>")


_TRAINED = {}


def trained_bpe(mod, shakespeare, vocab_size=400):
    """A tokenizer trained on mixed text (cached: training is deterministic)."""
    key = (mod.__name__, vocab_size)
    if key not in _TRAINED:
        _TRAINED[key] = mod.BPETokenizer.train(mixed_text(shakespeare), vocab_size)
    return _TRAINED[key]


# ---------------------------------------------------------------------------------------
# 4.1 BPE
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_bpe_round_trips_random_unicode(name, shakespeare):
    mod = load(name)
    tok = trained_bpe(mod, shakespeare)
    assert tok.vocab_size == 400 and len(tok.merges) == 400 - 256 - 1
    sid = tok.special[SPECIAL]
    strings = random_strings(1000, seed=4, extra=NEAR_MISSES)
    assert sum(any(ord(c) > 0xFFFF for c in s) for s in strings) > 200  # 4-byte characters
    merged = 0
    for s in strings:
        ids = tok.encode(s)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids), repr(s)
        assert sid not in ids, repr(s)  # ordinary text never makes the special id
        assert tok.decode(ids) == s, repr(s)
        merged += len(ids) < len(s.encode("utf-8"))
    assert merged > 200  # merges do fire on these strings: the round trip is not bytes only
    text = mixed_text(shakespeare)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < 0.8 * len(text.encode("utf-8"))


@pytest.mark.parametrize("name", ALL)
def test_bpe_applies_merges_in_rank_order(name):
    mod = load(name)
    ab_first = mod.BPETokenizer([(97, 98), (98, 99)], special_tokens=())  # ab -> 256, bc -> 257
    assert ab_first.vocab_size == 258
    assert ab_first.encode("abc") == [256, 99]  # not [97, 257]: the earlier merge wins
    bc_first = mod.BPETokenizer([(98, 99), (97, 98)], special_tokens=())  # bc -> 256, ab -> 257
    assert bc_first.encode("abc") == [97, 256]
    assert ab_first.decode([256, 99]) == bc_first.decode([97, 256]) == "abc"
    # merges build on merges; the lowest rank among the present pairs goes first each time
    tok = mod.BPETokenizer([(97, 97), (256, 97), (98, 98), (256, 256)], special_tokens=())
    assert tok.encode("aaa") == [257]  # aa -> 256, then (256, a) -> 257
    assert tok.encode("aaaa") == [259]  # aa aa -> 256 256 -> 259
    assert tok.encode("aaaaa") == [256, 257]  # 256 256 a: (256, a) ranks before (256, 256)
    assert tok.encode("bbb") == [258, 98]
    assert tok.decode([259, 97, 258]) == "aaaaabb" and tok.decode([256, 257]) == "aaaaa"
    # a merge never crosses a pre-tokenization chunk boundary ("a" + " a" are two chunks)
    assert tok.encode("a a") == [97, 32, 97]


def naive_encode_chunk(merges, ids):
    """Reference: merge the pair learned earliest (leftmost among equals), rescan, repeat."""
    while len(ids) > 1:
        pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, math.inf))
        if pair not in merges:
            return ids
        ids = _naive_merge(ids, pair, merges[pair])
    return ids


@pytest.mark.parametrize("name", ALL)
def test_long_chunk_merges_equal_the_naive_loop(name, shakespeare):
    """The heap merge of long chunks gives the naive loop's ids on random chunks of every
    length, on learned merges and on hand-made ones whose merges build on each other."""
    mod = load(name)
    rng = random.Random(11)
    letters = "".join(c for c in Path(shakespeare).read_text(encoding="utf-8")[:20_000] if c.isalpha())
    tokenizers = [(trained_bpe(mod, shakespeare), letters),
                  (mod.BPETokenizer.train("".join(rng.choice("aab") for _ in range(3000)), 256 + 60), "ab"),
                  (mod.BPETokenizer([(97, 97), (256, 97), (98, 98), (256, 256), (97, 258)]), "ab")]
    for tok, alphabet in tokenizers:
        for _ in range(1000):
            chunk = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 90)))
            ids = list(chunk.encode("utf-8"))
            assert tok._merge_long(list(ids)) == naive_encode_chunk(tok.merges, ids), chunk
    # through encode(): chunks beyond LONG_CHUNK take the heap, the others the loop
    tok = tokenizers[0][0]
    text = " ".join(letters[i:i + rng.randrange(1, 3 * tok.LONG_CHUNK)] for i in range(0, 15_000, 150))
    want = [i for c in regex.findall(mod.GPT4_SPLIT, text)
            for i in naive_encode_chunk(tok.merges, list(c.encode("utf-8")))]
    assert tok.encode(text) == want and tok.decode(want) == text
    assert max(map(len, text.split())) > tok.LONG_CHUNK


class CountingMerges(dict):
    """A merges table that counts its lookups and fails past a budget (quadratic work fails
    fast instead of running for minutes)."""

    def __init__(self, merges, budget):
        super().__init__(merges)
        self.lookups, self.budget = 0, budget

    def _count(self):
        self.lookups += 1
        assert self.lookups <= self.budget, f"more than {self.budget} lookups of the merges"

    def get(self, key, default=None):
        self._count()
        return super().get(key, default)

    def __contains__(self, key):
        self._count()
        return super().__contains__(key)

    def __getitem__(self, key):
        self._count()
        return super().__getitem__(key)


@pytest.mark.parametrize("name", ALL)
def test_a_200kb_chunk_encodes_in_linear_many_lookups(name, shakespeare):
    """200 KB of letters without a space is one pre-token. Rescanning it after each merge
    is O(n^2) (half a minute); the heap merge looks up each pair a few times. Counted,
    not timed, so a loaded machine cannot make it flaky."""
    mod = load(name)
    text = Path(shakespeare).read_text(encoding="utf-8")
    letters = "".join(c for c in text if c.isalpha())[:200_000]
    tok = trained_bpe(mod, shakespeare)
    fresh = mod.BPETokenizer(list(tok.merges), list(tok.special))
    fresh.merges = CountingMerges(tok.merges, budget=10 * len(letters))
    ids = fresh.encode(letters)
    assert regex.findall(mod.GPT4_SPLIT, letters) == [letters]  # one chunk indeed
    assert fresh.decode(ids) == letters and len(ids) < 0.8 * len(letters)
    assert fresh.merges.lookups > len(letters)  # the count sees the lookups


@pytest.mark.parametrize("name", ALL)
def test_encode_cache_is_bounded_and_skips_long_chunks(name, shakespeare):
    """200k distinct words once kept 43 MB of cache: it holds CACHE_SIZE chunks at most,
    starts over when full (the same ids either way) and never keeps a chunk longer than
    LONG_CHUNK bytes."""
    mod = load(name)
    tok = trained_bpe(mod, shakespeare)
    assert 1000 <= tok.CACHE_SIZE <= 100_000
    small = mod.BPETokenizer(list(tok.merges), list(tok.special))
    small.CACHE_SIZE = 100
    rng = random.Random(12)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randrange(2, 9))) for _ in range(1500)]
    sizes = []
    for w in words:
        assert small.encode(" " + w) == tok.encode(" " + w)
        sizes.append(len(small._cache))
    assert len(set(words)) > 1000 and max(sizes) == 100 and sizes[-1] <= 100
    text = " ".join(words)
    assert small.encode(text) == tok.encode(text)
    long = "x" * small.LONG_CHUNK + "y"
    assert small.decode(small.encode(long)) == long and long not in small._cache
    assert all(len(c.encode("utf-8")) <= small.LONG_CHUNK for c in small._cache)


@pytest.mark.parametrize("name", ALL)
def test_bpe_training_gives_the_classic_merges(name):
    """The textbook example: aaabdaaabac -> aa first (4 times), then ab, then (aa)(ab)."""
    mod = load(name)
    tok = mod.BPETokenizer.train("aaabdaaabac", 256 + 3, special_tokens=())
    assert list(tok.merges.items()) == [((97, 97), 256), ((97, 98), 257), ((256, 257), 258)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    with_special = mod.BPETokenizer.train("aaabdaaabac", 256 + 3)  # one slot goes to the special
    assert list(with_special.merges) == [(97, 97), (97, 98)]
    assert with_special.special == {SPECIAL: 258} and with_special.vocab_size == 259


@pytest.mark.parametrize("name", ALL)
def test_vocab_size_counts_bytes_merges_and_special_tokens(name, tmp_path, capsys):
    """train(text, 256) gave 257 ids and train('hello', 1000) 261 without a word: too small
    a vocab_size is a ValueError, and a text that runs out of pairs says so in one line."""
    mod = load(name)
    for vocab, specials in [(256, (SPECIAL,)), (100, (SPECIAL,)), (257, ("<|a|>", "<|b|>"))]:
        with pytest.raises(ValueError, match=f"256 bytes \\+ {len(specials)} special tokens"):
            mod.BPETokenizer.train("hello hello", vocab, specials)
    assert mod.BPETokenizer.train("hello", 256, special_tokens=()).vocab_size == 256
    capsys.readouterr()
    tok = mod.BPETokenizer.train("hello", 1000)
    assert tok.vocab_size == 261 and len(tok.merges) == 4  # he el ll lo, then no pair is left
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("note:") and "261" in out[0] and "1000" in out[0]
    assert mod.BPETokenizer.train("hello world " * 3, 262).vocab_size == 262
    assert capsys.readouterr().out == ""  # enough pairs: nothing to say
    # the command line: the note, then the usual line with the size reached
    cfg = part04_cfg(mod, tokenizer="bpe", vocab_size=5000, out_dir=str(tmp_path))
    reached = mod.build_tokenizer(cfg, "hello world " * 20).vocab_size
    out = capsys.readouterr().out.splitlines()
    assert reached < 300 and [line.split()[0] for line in out] == ["note:", "BPE:"]
    assert f"vocabulary of {reached}, not 5000" in out[0] and f"{reached} tokens" in out[1]


def _naive_merge(ids, pair, new):
    out, i = [], 0
    while i < len(ids):
        if ids[i:i + 2] == list(pair):
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_bpe(text, n_merges, pattern):
    """Reference BPE: recount every pair of every chunk after each merge; ties go to the
    smallest pair."""
    words = [list(c.encode("utf-8")) for c in regex.findall(pattern, text)]
    merges = []
    while len(merges) < n_merges:
        counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        words = [_naive_merge(w, best, 255 + len(merges)) for w in words]
    return merges


def naive_texts():
    rng = random.Random(7)
    texts = []
    for alphabet, n in [("ab ", 600), ("aab c\n", 1500), ("abcd  \n\u00e9\u65e5", 2500),
                        ("aaaaab ", 800), ("xy1234 .,'", 1200)]:
        texts.append("".join(rng.choice(alphabet) for _ in range(n)))
    texts.append("ab ab ab abc")  # fewer possible merges than asked for
    texts.append("the cat sat on the mat; the hat? that cat! 2024 it's they're " * 5)
    return texts


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("text_index", range(7))
def test_bpe_training_matches_a_naive_recount(name, text_index):
    mod = load(name)
    text = naive_texts()[text_index]
    n_merges = 80
    tok = mod.BPETokenizer.train(text, 256 + n_merges + 1)
    want = naive_bpe(text, n_merges, mod.GPT4_SPLIT)
    assert list(tok.merges) == want
    assert list(tok.merges.values()) == list(range(256, 256 + len(want)))  # id = 256 + rank
    assert tok.vocab_size == 256 + len(want) + 1
    assert tok.decode(tok.encode(text)) == text
    if text_index < 5:
        assert len(want) >= 60  # the random texts have pairs for many merges


@pytest.mark.parametrize("name", ALL)
def test_bpe_save_load_is_readable_json_and_gives_the_same_ids(name, shakespeare, tmp_path):
    mod = load(name)
    tok = trained_bpe(mod, shakespeare)
    path = tmp_path / "tok.json"
    tok.save(str(path))
    with open(path) as f:
        obj = json.load(f)  # plain, readable JSON
    assert [tuple(p) for p in obj["merges"]] == list(tok.merges)  # in rank order
    assert SPECIAL in obj["special_tokens"]
    assert os.listdir(tmp_path) == ["tok.json"]  # no temp file left behind
    again = mod.BPETokenizer.load(str(path))
    assert again.vocab_size == tok.vocab_size and again.special == tok.special
    assert again.name == tok.name
    for s in random_strings(300, seed=5, extra=NEAR_MISSES) + [mixed_text(shakespeare)[:5000], f"a{SPECIAL}b"]:
        assert again.encode(s) == tok.encode(s), repr(s)
    # another tokenizer has another name (the token caches are keyed by it)
    assert mod.BPETokenizer.train(mixed_text(shakespeare), 380).name != tok.name


@pytest.mark.parametrize("name", ALL)
def test_special_tokens_are_never_split_nor_made_from_text(name, shakespeare):
    mod = load(name)
    tok = trained_bpe(mod, shakespeare)
    sid = tok.special[SPECIAL]
    assert sid == tok.vocab_size - 1 and sid == 256 + len(tok.merges)
    assert tok.encode(SPECIAL, allowed_special="all") == [sid]
    assert tok.decode([sid]) == SPECIAL
    for left, right in [("Hello", "World"), ("the end. ", "\nFirst"), ("", ""), (" ", " "),
                        ("\u65e5", "\U0001F600"), ("<|", "|>")]:
        text = left + SPECIAL + right
        ids = tok.encode(text, allowed_special="all")
        assert ids == tok.encode(left) + [sid] + tok.encode(right), repr(text)
        assert tok.decode(ids) == text
    twice = tok.encode(f"a{SPECIAL}{SPECIAL}b", allowed_special={SPECIAL})
    assert twice.count(sid) == 2
    # a tokenizer trained on text full of the special string still keeps it whole
    flooded = mod.BPETokenizer.train((f"doc one{SPECIAL}doc two{SPECIAL}") * 50, 320)
    fid = flooded.special[SPECIAL]
    assert flooded.encode(f"doc one{SPECIAL}", allowed_special="all") == flooded.encode("doc one") + [fid]
    assert all(fid not in flooded.encode(s, allowed_special="all")
               for s in random_strings(200, seed=6, extra=NEAR_MISSES))


@pytest.mark.parametrize("name", ALL)
def test_special_token_text_is_plain_text_unless_allowed(name, shakespeare):
    """By default the text of a special token is ordinary text (the ids of a tokenizer that
    has no special tokens), so nobody can forge one by typing it; 'all' or a set of tokens
    lets it become its id; 'none_raise' refuses it."""
    mod = load(name)
    tok = trained_bpe(mod, shakespeare)
    sid = tok.special[SPECIAL]
    plain_tok = mod.BPETokenizer(list(tok.merges), [])
    for text in [f"Hello{SPECIAL}World", f" {SPECIAL}", SPECIAL * 3, f"a<{SPECIAL}>b", "no special"]:
        plain = plain_tok.encode(text)
        assert tok.encode(text) == tok.encode(text, allowed_special="none") == plain, repr(text)
        assert sid not in plain and tok.decode(plain) == text
        assert tok.encode(text, allowed_special={SPECIAL}) == tok.encode(text, allowed_special="all")
        assert tok.encode(text, allowed_special="all").count(sid) == text.count(SPECIAL)
        if SPECIAL in text:
            with pytest.raises(ValueError, match="special tokens"):
                tok.encode(text, allowed_special="none_raise")
        else:
            assert tok.encode(text, allowed_special="none_raise") == plain
    for bad in ({"<|im_start|>"}, SPECIAL, "nothing"):  # unknown tokens; a bare string is its letters
        with pytest.raises(ValueError, match="not special tokens"):
            tok.encode("hi", allowed_special=bad)
    # only the allowed ones become ids; a token that begins another does not cut it
    two = mod.BPETokenizer(list(tok.merges), ["<|a|>", "<|a|>b"])
    a, ab = two.special["<|a|>"], two.special["<|a|>b"]
    assert two.encode("x<|a|>by<|a|>", allowed_special="all") == two.encode("x") + [ab] + two.encode("y") + [a]
    only_a = two.encode("x<|a|>by", allowed_special={"<|a|>"})
    assert only_a == two.encode("x") + [a] + two.encode("by") and ab not in two.encode("<|a|>b")


@pytest.mark.parametrize("name", ALL)
def test_prompt_and_data_cannot_forge_a_special_token(name, shakespeare, tmp_path, monkeypatch):
    """--data and --prompt are text from a user: their special-token text stays text."""
    mod = load(name)
    tok = trained_bpe(mod, shakespeare)
    sid = tok.special[SPECIAL]
    text = f"First Citizen:{SPECIAL}\nBefore we proceed any further, hear me speak.\n" * 100
    cfg = part04_cfg(mod, data_dir=str(tmp_path / "data"), block_size=64, prompt=f"Hi{SPECIAL}there",
                   num_samples=1)
    data, _ = mod.load_tokens(cfg, tok, (text, "forged.txt"))
    assert sid not in data.tolist() and tok.decode(data.tolist()) == text
    prompts = []
    monkeypatch.setattr(mod, "generate", lambda model, idx, *args, **kw: prompts.append(idx) or idx)
    assert mod.sample(None, tok, cfg, "cpu") == [cfg.prompt]
    assert sid not in prompts[0].tolist()


@pytest.mark.parametrize("name", ALL)
def test_decode_rejects_ids_outside_the_vocabulary(name, shakespeare):
    """An unknown id was dropped in silence (decode([99999, -1, 4095]) gave the special
    token's text): it is a ValueError that names the id. Every real id still decodes."""
    mod = load(name)
    tok = trained_bpe(mod, shakespeare)
    sid = tok.special[SPECIAL]
    for bad in (99999, -1, tok.vocab_size, 4095):
        with pytest.raises(ValueError, match=f"id {bad} is not in the vocabulary"):
            tok.decode([72, bad, sid])
    assert tok.decode([72, 105, sid]) == "Hi" + SPECIAL
    assert tok.decode(list(range(tok.vocab_size))).endswith(SPECIAL)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\xff garbage", b"{not json",
                                     b"", b"[1, 2, 3]", b'{"merges": [[97, 98]]}',
                                     b'{"merges": [[97]], "special_tokens": [], "pattern": "a"}',
                                     b'{"merges": [[97, 5000]], "special_tokens": [], '
                                     b'"pattern": "a"}'],
                         ids=["binary", "truncated-json", "empty", "json-list", "no-specials",
                              "one-id-merge", "unknown-id"])
def test_loading_a_bad_tokenizer_file_raises_and_the_command_line_exits_2(name, content, tmp_path,
                                                                          capsys):
    """A library user can catch the error; build_tokenizer (the command line) makes it one
    'error:' line and exit status 2."""
    mod = load(name)
    path = write(tmp_path / "tok.json", content)
    with pytest.raises(ValueError, match="tok.json is not a BPE tokenizer file"):
        mod.BPETokenizer.load(path)
    err = expect_exit_2(capsys, mod.build_tokenizer, part04_cfg(mod, tokenizer="bpe", tokenizer_file=path))
    assert "tok.json" in err


def tokenizer_file(mod, merges, special_tokens=(SPECIAL,), pattern=None):
    """The JSON that save() writes, with any merges and special tokens."""
    return json.dumps({"type": "bpe", "pattern": pattern or mod.GPT4_SPLIT,
                       "special_tokens": special_tokens, "merges": merges})


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("merges, special_tokens, why", [
    ([[104, 105], [104, 105]], [SPECIAL], "appears twice"),  # the special id would be 257 = hi
    ([[97, 256]], [SPECIAL], "below 256"),  # merge 0 makes 256: it cannot contain itself
    ([[97, 98], [258, 97]], [SPECIAL], "below 257"),  # nor a later id
    ([[-1, 97]], [SPECIAL], "below 256"), ([[97, 98, 99]], [SPECIAL], "two ids"),
    ([[97.0, 98]], [SPECIAL], "two ids"), ([[True, 98]], [SPECIAL], "two ids"),
    ([[97, 98]], [SPECIAL, SPECIAL], "distinct"), ([[97, 98]], [""], "non-empty"),
    ([[97, 98]], [5], "strings"), ([[97, 98]], "<|x|>", "strings")],
    ids=["repeated-merge", "merge-of-itself", "merge-of-a-later-id", "negative-id", "three-ids",
         "float-id", "bool-id", "repeated-special", "empty-special", "int-special", "str-specials"])
def test_inconsistent_vocabularies_raise_on_load_and_construction(name, merges, special_tokens, why,
                                                                  tmp_path):
    mod = load(name)
    path = write(tmp_path / "tok.json", tokenizer_file(mod, merges, special_tokens))
    with pytest.raises(ValueError, match=why) as e:
        mod.BPETokenizer.load(path)
    assert "tok.json" in str(e.value)
    with pytest.raises(ValueError, match=why):
        mod.BPETokenizer(merges, special_tokens)


@pytest.mark.parametrize("name", ALL)
def test_a_good_file_loads_whatever_its_merges_build_on(name, tmp_path):
    mod = load(name)
    merges = [[104, 105], [256, 256], [32, 257]]  # hi, hihi, " hihi"
    tok = mod.BPETokenizer.load(write(tmp_path / "tok.json", tokenizer_file(mod, merges, [SPECIAL, "<|pad|>"])))
    assert tok.special == {SPECIAL: 259, "<|pad|>": 260} and tok.vocab_size == 261
    assert tok.encode("hi") == [256] and tok.encode(" hihi") == [258] and tok.encode("hihihi") == [257, 256]


@pytest.mark.parametrize("name", ALL)
def test_tokenizer_file_with_a_bad_pattern_raises(name, tmp_path):
    mod = load(name)
    path = write(tmp_path / "tok.json", tokenizer_file(mod, [], pattern="("))
    with pytest.raises(ValueError, match="tok.json"):
        mod.BPETokenizer.load(path)


@pytest.mark.parametrize("name", RUN)
def test_resume_with_a_bad_saved_tokenizer_exits_2(name, shakespeare, tmp_path, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    write(tmp_path / "out" / "tokenizer.json", tokenizer_file(mod, [[104, 105], [104, 105]]))
    for flag in ("resume", "sample_only"):
        err = expect_exit_2(capsys, mod.main, run_flags(tmp_path, data, **{flag: True}))
        assert "tokenizer.json" in err and "twice" in err


@pytest.mark.parametrize("name", RUN)
def test_tokenizer_file_flag_with_a_bad_file_exits_2(name, shakespeare, tmp_path, capsys):
    mod = load(name)
    bad = write(tmp_path / "bad.json", '{"merges": [[97, 98], ')
    data = small_corpus(tmp_path, shakespeare)
    err = expect_exit_2(capsys, mod.main, run_flags(tmp_path, data, tokenizer_file=bad))
    assert "bad.json" in err
    out = tmp_path / "out"
    assert not out.exists() or not {"ckpt.pt", "tokenizer.json", "summary.json"} & set(os.listdir(out))
    missing = str(tmp_path / "missing.json")
    err = expect_exit_2(capsys, mod.main, run_flags(tmp_path, data, tokenizer_file=missing))
    assert "--tokenizer_file" in err


# ---------------------------------------------------------------------------------------
# Flags that cannot work
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RUN)
@pytest.mark.parametrize("bad, word", [(dict(vocab_size=256), "--vocab_size"),
                                       (dict(vocab_size=100), "--vocab_size"),
                                       (dict(dtype="float16"), "float16"),
                                       (dict(grad_accum=0), "--grad_accum"),
                                       (dict(min_lr=1.0, learning_rate=0.1), "--min_lr")])
def test_impossible_flags_exit_2_and_write_nothing(name, bad, word, shakespeare, tmp_path, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    err = expect_exit_2(capsys, mod.main, run_flags(tmp_path, data, **bad))
    assert word in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------
# 4.2 Gradient accumulation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_two_half_batches_accumulate_to_the_full_batch_gradient(name):
    mod = load(name)
    cfg = part04_cfg(mod)
    torch.manual_seed(0)
    model = randomize_(mod.GPT(cfg), scale=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), generator=g)
    y = torch.randint(0, cfg.vocab_size, (8, cfg.block_size), generator=g)
    model.zero_grad()
    model(x, y)[1].backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        (model(x[half], y[half])[1] / 2).backward()
    for a, b in zip(full, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert max(a.abs().max().item() for a in full) > 1e-3  # gradients of some size: it bites


@pytest.mark.parametrize("name", ALL)
def test_train_with_grad_accum_equals_one_double_batch(name, tmp_path, monkeypatch):
    """train() with grad_accum=2 x batch_size 4 takes the same step as grad_accum=1 x 8 when
    the micro-batches are the halves of the big batch: the same gradients, the same weights
    after the step, the same logged loss."""
    mod = load(name)
    real = mod.get_batch
    g = torch.Generator().manual_seed(3)
    big_x = torch.randint(0, 300, (8, 16), generator=g)
    big_y = torch.randint(0, 300, (8, 16), generator=g)
    calls = []

    def fixed_batches(data, batch_size, block_size, device, generator=None, shard=(0, 1)):
        if generator is not None:  # estimate_loss: the real thing
            return real(data, batch_size, block_size, device, generator, shard)
        i = len(calls) % (8 // batch_size)
        calls.append(batch_size)
        rows = slice(i * batch_size, (i + 1) * batch_size)
        return big_x[rows].clone(), big_y[rows].clone()

    monkeypatch.setattr(mod, "get_batch", fixed_batches)
    data = torch.randint(0, 300, (2000,), generator=g).numpy().astype("uint16")
    results = {}
    for accum, bs in [(2, 4), (1, 8)]:
        calls.clear()
        cfg = part04_cfg(mod, batch_size=bs, grad_accum=accum, max_steps=1, warmup_steps=0,
                       min_lr=1e-3, learning_rate=1e-3, grad_clip=0.0, eval_interval=100,
                       out_dir=str(tmp_path / f"accum{accum}"))
        os.makedirs(cfg.out_dir)
        torch.manual_seed(0)
        model = randomize_(mod.GPT(cfg), scale=0.1)
        mod.train(model, data[:1800], data[1800:], cfg, "cpu", torch.float32)
        assert calls == [bs] * accum
        results[accum] = ([p.grad.clone() for p in model.parameters()],
                          [p.detach().clone() for p in model.parameters()],
                          train_losses(cfg.out_dir)[1])
    (g2, w2, l2), (g1, w1, l1) = results[2], results[1]
    for a, b in zip(g2, g1):  # the last step's gradients stay on the parameters
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    for a, b in zip(w2, w1):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert l2 == pytest.approx(l1, abs=1e-6)
    torch.manual_seed(0)
    init = list(randomize_(mod.GPT(part04_cfg(mod)), scale=0.1).parameters())
    assert max((a - b).abs().max().item() for a, b in zip(w1, init)) > 1e-4  # a step was taken


# ---------------------------------------------------------------------------------------
# 4.3 The learning-rate schedule
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_warmup_then_cosine_schedule(name):
    mod = load(name)
    cfg = mod.Config(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lr = lambda s: mod.get_lr(s, cfg)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(1) == pytest.approx(1e-4, rel=1e-12)
    assert lr(5) == pytest.approx(5e-4, rel=1e-12)  # linear warmup
    assert lr(10) == pytest.approx(1e-3, rel=1e-12)  # warmup ends at the peak
    assert lr(60) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-12)  # halfway down the cosine
    assert lr(110) == pytest.approx(1e-4, rel=1e-12)  # min_lr at max_steps
    assert lr(200) == pytest.approx(1e-4, rel=1e-12)  # and after
    warm = [lr(s) for s in range(0, 11)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    decay = [lr(s) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing after warmup
    # a quarter of the way down: min + (max - min) * (1 + cos(pi/4)) / 2
    assert lr(35) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12)
    no_warmup = dataclasses.replace(cfg, warmup_steps=0)
    assert mod.get_lr(1, no_warmup) == pytest.approx(
        1e-4 + 9e-4 * (1 + math.cos(math.pi / 110)) / 2, rel=1e-12)


# ---------------------------------------------------------------------------------------
# 4.4 Exact resume, Ctrl-C, atomic checkpoints
# ---------------------------------------------------------------------------------------
RESUME = dict(max_steps=20, log_interval=1, eval_interval=5, ckpt_interval=1000, dropout=0.1,
              warmup_steps=5)


def interrupting(monkeypatch, mod, at_call):
    """Patch mod.get_batch so that its at_call-th training call sends SIGINT to this process
    (what Ctrl-C does); train's handler must be installed by then."""
    real = mod.get_batch
    calls = []

    def get_batch(data, batch_size, block_size, device, generator=None, shard=(0, 1)):
        if generator is None:
            calls.append(1)
            if len(calls) == at_call:
                handler = signal.getsignal(signal.SIGINT)
                assert handler not in (signal.default_int_handler, signal.SIG_DFL, None), \
                    "train installed no SIGINT handler"
                os.kill(os.getpid(), signal.SIGINT)
        return real(data, batch_size, block_size, device, generator, shard)

    monkeypatch.setattr(mod, "get_batch", get_batch)
    return calls


@pytest.mark.parametrize("name", RUN)
def test_ctrl_c_saves_and_resume_continues_exactly(name, shakespeare, tmp_path, monkeypatch,
                                                   capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    a = mod.main(run_flags(tmp_path, data, out="a", **RESUME))
    assert a["steps"] == 20
    handler = signal.getsignal(signal.SIGINT)
    # B: Ctrl-C during step 8
    with monkeypatch.context() as m:
        calls = interrupting(m, mod, at_call=8)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            mod.main(run_flags(tmp_path, data, out="b", **RESUME))
        out = capsys.readouterr().out
    assert stopped.value.code == 130  # what shells expect of an interrupted program
    assert len(calls) == 8  # it stopped after finishing the step it was in
    assert "Ctrl-C" in out and "stopped at step 8" in out and "--resume" in out
    assert signal.getsignal(signal.SIGINT) is handler  # the old handler is back
    bdir = tmp_path / "b"
    assert not (bdir / "summary.json").exists()
    ckpt = torch.load(bdir / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 8
    assert max(train_losses(bdir)) == 8
    # resume B: every step after the interruption has A's loss, exactly
    capsys.readouterr()
    resumed = mod.main(run_flags(tmp_path, data, out="b", resume=True, **RESUME))
    assert "resuming" in capsys.readouterr().out
    assert resumed["steps"] == 20
    la, lb = train_losses(tmp_path / "a"), train_losses(bdir)
    assert sorted(lb) == list(range(1, 21))
    assert [lb[s] for s in range(9, 21)] == [la[s] for s in range(9, 21)]
    assert [lb[s] for s in range(1, 9)] == [la[s] for s in range(1, 9)]  # the same seed
    va, vb = val_losses(tmp_path / "a"), val_losses(bdir)
    assert [vb[s] for s in (10, 15, 20)] == [va[s] for s in (10, 15, 20)]
    assert resumed["final_val_loss"] == a["final_val_loss"]
    lrs = {d["step"]: d["lr"] for d in read_metrics(bdir) if "lr" in d}
    assert lrs == {d["step"]: d["lr"] for d in read_metrics(tmp_path / "a") if "lr" in d}
    # the check bites: dropout and the random windows make steps differ from one another,
    # and a resume that restarted the random streams would draw other batches
    assert len({round(v, 6) for v in la.values()}) == 20


@pytest.mark.parametrize("name", RUN)
def test_resume_without_a_checkpoint_exits_2(name, shakespeare, tmp_path, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    err = expect_exit_2(capsys, mod.main, run_flags(tmp_path, data, tokenizer="byte",
                                                    vocab_size=256, resume=True))
    assert "checkpoint" in err and "ckpt.pt" in err
    # BPE: the run's tokenizer is missing too, and that is said first
    err = expect_exit_2(capsys, mod.main, run_flags(tmp_path, data, out="bpe", resume=True))
    assert "tokenizer" in err
    for out in ("out", "bpe"):  # nothing but the run folder's lock
        assert os.listdir(tmp_path / out) == ["run.lock"]


@pytest.mark.parametrize("name", RUN)
@pytest.mark.parametrize("content", [b"not a checkpoint at all " * 50, b""],
                         ids=["garbage", "empty"])
def test_resume_with_a_corrupt_checkpoint_exits_2_and_keeps_it(name, content, shakespeare,
                                                               tmp_path, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    out = tmp_path / "out"
    write(out / "ckpt.pt", content)
    err = expect_exit_2(capsys, mod.main, run_flags(tmp_path, data, tokenizer="byte",
                                                    vocab_size=256, resume=True))
    assert "ckpt.pt" in err
    assert sorted(os.listdir(out)) == ["ckpt.pt", "run.lock"] and (out / "ckpt.pt").read_bytes() == content


def half_writing_save(real_save, error):
    """A torch.save that writes the first half of the file, then fails (a full disk, a kill)."""
    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        with open(f, "wb") as fh:
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise error
    return save


@pytest.mark.parametrize("name", ALL)
def test_a_failed_save_leaves_the_old_checkpoint_whole(name, tmp_path, monkeypatch):
    mod = load(name)
    cfg = part04_cfg(mod)
    path = str(tmp_path / "ckpt.pt")
    torch.manual_seed(0)
    good = {"model": mod.GPT(cfg).state_dict(), "config": dataclasses.asdict(cfg), "step": 3,
            "val_loss": 1.0}
    mod.save_checkpoint(path, good)
    before = Path(path).read_bytes()
    monkeypatch.setattr(mod.torch, "save", half_writing_save(torch.save, OSError(28, "No space")))
    newer = {**good, "step": 4, "model": randomize_(mod.GPT(cfg)).state_dict()}
    with pytest.raises(SystemExit) as e:  # one line: could not write ..., the previous one is intact
        mod.save_checkpoint(path, newer)
    assert e.value.code == 2
    monkeypatch.undo()
    assert Path(path).read_bytes() == before
    ckpt = mod.load_checkpoint(path, cfg, "cpu")
    assert ckpt["step"] == 3
    others = [f for f in os.listdir(tmp_path) if f != "ckpt.pt"]
    assert len(others) <= 1  # at most the failed temp file, never a second "checkpoint"
    for f in others:  # the half file really is half a file: the check bites
        with pytest.raises(Exception):
            torch.load(tmp_path / f, weights_only=True)


@pytest.mark.parametrize("name", RUN)
def test_a_save_failing_during_training_keeps_the_saved_run(name, shakespeare, tmp_path,
                                                            monkeypatch, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    mod.main(run_flags(tmp_path, data, max_steps=4, eval_interval=2))
    out = tmp_path / "out"
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "best.pt")}
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(mod.torch, "save", half_writing_save(torch.save, KeyboardInterrupt()))
    try:
        with pytest.raises(KeyboardInterrupt):
            mod.main(run_flags(tmp_path, data, max_steps=8, eval_interval=2, resume=True))
    finally:
        signal.signal(signal.SIGINT, handler)  # whatever train left installed
        monkeypatch.undo()
    for f, content in before.items():
        assert (out / f).read_bytes() == content, f
        ckpt = torch.load(out / f, map_location="cpu", weights_only=True)
        assert ckpt["step"] in (2, 4)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("name", ALL)
def test_train_restores_the_sigint_handler_when_it_fails(name, shakespeare, tmp_path,
                                                         monkeypatch):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(mod.torch, "save", half_writing_save(torch.save, OSError(28, "No space")))
    try:
        with pytest.raises(SystemExit):  # the failed save ends the run with one line
            mod.main(run_flags(tmp_path, data, max_steps=2, eval_interval=1))
        left = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, handler)
        monkeypatch.undo()
    assert left is handler


# ---------------------------------------------------------------------------------------
# What a run writes: ckpt.pt, best.pt, summary.json, metrics.jsonl, TensorBoard, loss.png
# ---------------------------------------------------------------------------------------
class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (not installed in the tests)."""
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


@pytest.mark.parametrize("name", RUN)
def test_a_run_writes_full_checkpoints_summary_and_metrics(name, shakespeare, tmp_path,
                                                           monkeypatch, capsys):
    mod = load(name)
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeWriter.made.clear()
    text = Path(shakespeare).read_text(encoding="utf-8")[:36_000] + UNICODE_EXTRA
    data = write(tmp_path / "mixed.txt", text)  # the validation tenth is mostly non-ASCII
    capsys.readouterr()
    s = mod.main(run_flags(tmp_path, data, grad_accum=2, warmup_steps=4, max_steps=8,
                           eval_interval=4, ckpt_interval=100, tensorboard=True))
    stdout = capsys.readouterr().out
    out = tmp_path / "out"
    assert "effective batch 4 x 32 x 2 = 256 tokens per step" in stdout
    # ckpt.pt: everything a resume needs
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "config", "step", "best_val", "rng"} <= set(ckpt)
    assert ckpt["step"] == 8 and ckpt["config"]["grad_accum"] == 2
    assert ckpt["config"]["vocab_size"] == 300  # the tokenizer's vocabulary
    assert isinstance(ckpt["scaler"], dict)
    assert {"torch", "python", "numpy"} <= set(ckpt["rng"])
    assert len(ckpt["optimizer"]["state"]) > 0
    assert ckpt["best_val"] == pytest.approx(s["val_loss"])
    # best.pt: the weights of the best evaluation
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["step"] in (4, 8) and best["val_loss"] == pytest.approx(s["val_loss"])
    vals = val_losses(out)
    assert sorted(vals) == [4, 8] and s["val_loss"] == pytest.approx(min(vals.values()))
    assert vals[best["step"]] == pytest.approx(best["val_loss"])
    assert not list(out.glob("*.tmp"))
    # summary.json: part02's keys plus part04's
    assert s == read_summary(out)
    assert {"val_loss", "val_bpb", "train_loss", "tokens_per_s", "wall_s", "steps",
            "data"} <= set(s)
    assert s["mfu"] is None  # no peak FLOP/s for a CPU
    assert s["tokenizer"].startswith("bpe300-") and s["vocab_size"] == 300
    assert s["steps"] == 8 and s["world_size"] == 1
    # bytes per token, measured on the validation text with the saved tokenizer
    tok = mod.BPETokenizer.load(str(out / "tokenizer.json"))
    assert tok.name == s["tokenizer"]
    ids = tok.encode(text)
    val_ids = ids[int(0.9 * len(ids)):]
    val_text = tok.decode(val_ids)
    assert len(val_text.encode("utf-8")) > 1.2 * len(val_text)  # bytes, not characters
    want = len(val_text.encode("utf-8")) / len(val_ids)
    assert s["bytes_per_token"] == pytest.approx(want, rel=1e-9) and s["bytes_per_token"] > 1.0
    assert s["val_bpb"] == pytest.approx(s["val_loss"] / math.log(2) / s["bytes_per_token"],
                                         rel=1e-9)
    # metrics.jsonl: the learning rate rises through warmup, then decays
    rows = [d for d in read_metrics(out) if "train_loss" in d]
    assert [d["step"] for d in rows] == list(range(1, 9))
    cfg = mod.Config(learning_rate=mod.Config.learning_rate, warmup_steps=4, max_steps=8)
    lrs = [d["lr"] for d in rows]
    assert lrs == pytest.approx([mod.get_lr(step, cfg) for step in range(1, 9)], rel=1e-12)
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] and lrs[3] > lrs[4] > lrs[7]
    assert all("mfu" in d and d["mfu"] is None for d in rows)
    # TensorBoard got the same numbers
    (w,) = FakeWriter.made
    assert w.closed and Path(w.log_dir) == out / "tensorboard"
    assert [(step, v) for tag, v, step in w.scalars if tag == "train/loss"] == \
        [(d["step"], d["train_loss"]) for d in rows]
    assert [step for tag, _, step in w.scalars if tag == "val/loss"] == [4, 8]
    # loss.png when matplotlib is there, nothing (and no failure) when it is not
    try:
        import matplotlib  # noqa: F401
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert not (out / "loss.png").exists()


# ---------------------------------------------------------------------------------------
# The vocabulary padded to a multiple of 64
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_vocabulary_is_padded_to_a_multiple_of_64(name):
    mod = load(name)
    assert [mod.padded_vocab(v) for v in (1, 64, 65, 256, 257, 300, 320, 4096, 50257)] == \
        [64, 64, 128, 256, 320, 320, 320, 4096, 50304]
    for vocab, shape in [(300, dict()), (257, dict(pos="learned", norm="layernorm", mlp="gelu",
                                                    bias=True)), (256, dict(n_kv_head=1))]:
        cfg = part04_cfg(mod, vocab_size=vocab, **shape)
        model = mod.GPT(cfg)
        rows = mod.padded_vocab(vocab)
        assert model.wte.weight.shape == (rows, cfg.n_embd)
        assert model.lm_head.weight is model.wte.weight  # still tied
        # the padding rows are all the parameters it adds: as many as a model whose vocabulary
        # fills them, (rows - 256) * C more than a model of 256 tokens (which needs no padding)
        filled = mod.GPT(dataclasses.replace(cfg, vocab_size=rows))
        assert model.num_params() == filled.num_params()
        bytes_only = mod.GPT(dataclasses.replace(cfg, vocab_size=256))
        assert model.num_params() - bytes_only.num_params() == (rows - 256) * cfg.n_embd
        assert model(torch.zeros(1, 4, dtype=torch.long))[0].shape == (1, 4, rows)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_never_returns_padding_ids(name, use_cache):
    mod = load(name)
    cfg = part04_cfg(mod, vocab_size=300)
    torch.manual_seed(0)
    model = randomize_(mod.GPT(cfg), seed=1, scale=0.5).eval()
    with torch.no_grad():
        model.wte.weight[300:] *= 40  # the padding rows would win every argmax
    start = torch.randint(0, 300, (8, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(start)[0][:, -1]
    assert (logits.argmax(-1) >= 300).float().mean() > 0.5  # the check bites
    for kw in (dict(temperature=10.0), dict(temperature=0), dict(temperature=3.0, top_k=50),
               dict(temperature=5.0, top_p=0.99)):
        out = mod.generate(model, start, 40, generator=torch.Generator().manual_seed(3),
                           use_cache=use_cache, **kw)
        assert out.shape == (8, 43)
        assert int(out.max()) < cfg.vocab_size, kw
    wide = mod.generate(model, start, 40, temperature=10.0, use_cache=use_cache,
                        generator=torch.Generator().manual_seed(4))
    assert len(set(wide[:, 3:].flatten().tolist())) > 100  # high temperature: many ids drawn


# ---------------------------------------------------------------------------------------
# Distributed: two torchrun processes (gloo, CPU) against one
# ---------------------------------------------------------------------------------------
DDP_RUN = dict(batch_size=4, max_steps=6, eval_interval=3, log_interval=1, warmup_steps=2,
               ckpt_interval=100)


@pytest.mark.parametrize("name", RUN)
def test_two_torchrun_processes_equal_one_process(name, shakespeare, tmp_path):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    # part04's dense model: an MoE's balancing loss is a product of batch means, per rank
    run = dict(DDP_RUN, **lesson_fields(mod, LESSON))
    r = torchrun(name, run_flags(tmp_path, data, out="ddp", **run))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    single = mod.main(run_flags(tmp_path, data, out="one", **run))
    ddp = read_summary(tmp_path / "ddp")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["steps"] == single["steps"] == 6
    assert ddp["tokenizer"] == single["tokenizer"]
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    assert ddp["final_val_loss"] == pytest.approx(single["final_val_loss"], abs=1e-5)
    ld, ls = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert sorted(ld) == sorted(ls) == list(range(1, 7))
    for step in ls:
        assert ld[step] == pytest.approx(ls[step], abs=1e-5), step
    vd, vs = val_losses(tmp_path / "ddp"), val_losses(tmp_path / "one")
    assert sorted(vd) == sorted(vs) == [3, 6]
    for step in vs:
        assert vd[step] == pytest.approx(vs[step], abs=1e-5), step
    # the check bites: training moved the loss, so both runs took the same real steps
    assert abs(ls[6] - ls[1]) > 1e-3
    # rank 0 alone logs and saves: one metrics line per step, one set of files
    assert len([d for d in read_metrics(tmp_path / "ddp") if "train_loss" in d]) == 6
    assert r.stdout.count("eval     6") == 1


@pytest.mark.parametrize("name", RUN)
def test_torchrun_batch_not_divisible_by_world_exits_2(name, shakespeare, tmp_path):
    data = small_corpus(tmp_path, shakespeare)
    r = torchrun(name, run_flags(tmp_path, data, out="ddp", **{**DDP_RUN, "batch_size": 3}))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("--batch_size 3" in line for line in errors), r.stderr[-3000:]
    # rank 0 ended with status 2; the only traceback is the launcher's own report of it
    assert re.search(r"rank\s*:\s*0\b.*?exitcode\s*:\s*2\b", r.stderr, re.S), r.stderr[-3000:]
    assert r.stderr.count("Traceback (most recent call last)") <= 1
    if "Traceback" in r.stderr:  # the launcher's ChildFailedError, after the workers' lines
        tb = r.stderr.index("Traceback")
        assert tb > max(r.stderr.rindex(e) for e in errors)
        assert "ChildFailedError" in r.stderr[tb:]
    assert not (tmp_path / "ddp" / "ckpt.pt").exists()


# ---------------------------------------------------------------------------------------
# FLOPs per token
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_flops_per_token_is_6n_plus_attention(name):
    mod = load(name)
    L, C, T, V = 2, 32, 16, 300
    cfg = part04_cfg(mod, n_layer=L, n_embd=C, block_size=T, vocab_size=V, pos="learned",
                   norm="layernorm", mlp="gelu", bias=True)
    model = mod.GPT(cfg)
    n = sum(p.numel() for name_, p in model.named_parameters() if not name_.startswith("wpe."))
    assert n == model.num_params() - T * C
    Vp = 320  # the padded vocabulary
    by_hand = Vp * C + L * (12 * C * C + 13 * C) + 2 * C  # embeddings, blocks, final LayerNorm
    assert n == by_hand
    assert model.flops_per_token() == 6 * by_hand + 12 * L * C * T
    rope = mod.GPT(part04_cfg(mod, n_layer=L, n_embd=C, block_size=T, vocab_size=V, pos="rope"))
    assert rope.flops_per_token() == 6 * rope.num_params() + 12 * L * C * T  # no table to drop
