"""Part 10: beyond tokens. BoundlessBPE (training against a brute-force recount of the whole
corpus, superwords made of whole word pretokens only, round trips on random Unicode, never
more tokens than BPE where word pairs repeat, save/load and files of the other kind), Renyi
efficiency by hand, the patching rule and patches that cover the text once, the
byte-latent model (causal, and its loss falls), and the lessons' main() with bad input."""
import collections
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import regex
import torch

from conftest import expect_exit_2, load, part_names, random_strings, read_summary, write

ALL = part_names(10)
SPECIALS = ("<|endoftext|>",)
# word pairs that repeat (supermerge material), beside punctuation, digits and newlines
PAIRS_TEXT = ("of the king, to the queen; in the court of the duke. I am here, I am there!\n"
              "And to the war 1234 of the realm: is the crown of the people?\n") * 30


# ---------------------------------------------------------------------------------------
# 10.1 BoundlessBPE
# ---------------------------------------------------------------------------------------
def reference_boundless(mod, text, n_merges):
    """BoundlessBPE the slow way, on the whole corpus as a sequence: each step counts every
    pair inside a pretoken and every pair of adjacent word units that are one token each,
    and takes the most frequent (the smallest pair on ties; a regular merge wins a tie with
    a supermerge). Returns (merges, supermerge ranks, the corpus's tokens at the end)."""
    units = [[list(c.encode()), bool(mod.WORD.fullmatch(c))] for c in regex.findall(mod.GPT4_SPLIT, text)]
    merges, supers = [], []
    for _ in range(n_merges):
        regular, joined = collections.Counter(), collections.Counter()
        for ids, _ in units:
            regular.update(zip(ids, ids[1:]))
        for (a, wa), (b, wb) in zip(units, units[1:]):
            if wa and wb and len(a) == 1 and len(b) == 1:
                joined[a[0], b[0]] += 1
        best_r = min(regular, key=lambda p: (-regular[p], p)) if regular else None
        best_s = min(joined, key=lambda p: (-joined[p], p)) if joined else None
        if best_r is None and best_s is None:
            break
        new = 256 + len(merges)
        if best_s is None or (best_r is not None and regular[best_r] >= joined[best_s]):
            merges.append(best_r)
            for u in units:
                u[0] = mod._merge(u[0], best_r, new)
            continue
        merges.append(best_s)
        supers.append(len(merges) - 1)
        out, i = [], 0
        while i < len(units):
            a = units[i]
            if (i + 1 < len(units) and a[1] and units[i + 1][1] and a[0] == [best_s[0]]
                    and units[i + 1][0] == [best_s[1]]):
                out.append([[new], True])
                i += 2
            else:
                out.append(a)
                i += 1
        units = out
    return merges, supers, [t for ids, _ in units for t in ids]


_TRAINED = {}


def trained(mod, text=PAIRS_TEXT, vocab_size=400, kind="boundless"):
    key = (mod.__name__, text[:50], len(text), vocab_size, kind)
    if key not in _TRAINED:
        cls = mod.BoundlessBPETokenizer if kind == "boundless" else mod.BPETokenizer
        _TRAINED[key] = cls.train(text, vocab_size, SPECIALS)
    return _TRAINED[key]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("vocab_size", [300, 400, 520])
def test_boundless_training_matches_a_brute_force_recount(name, vocab_size, shakespeare):
    mod = load(name)
    text = PAIRS_TEXT[:1500] + Path(shakespeare).read_text()[:2500]
    tok = mod.BoundlessBPETokenizer.train(text, vocab_size, SPECIALS)
    merges, supers, final = reference_boundless(mod, text, vocab_size - 256 - len(SPECIALS))
    assert [tuple(p) for p in tok.ranked] == merges
    assert tok.super_ranks == supers and supers, "no supermerge: the test text should make some"
    # encoding the training text gives what training left: regular merges first, then the
    # supermerges, is the same as the two interleaved
    assert tok.encode(text) == final


@pytest.mark.parametrize("name", ALL)
def test_superwords_are_whole_word_pretokens(name, shakespeare):
    mod = load(name)
    text = PAIRS_TEXT + Path(shakespeare).read_text()[:100_000]
    tok = trained(mod, text, 1000)
    assert len(tok.supermerges) > 10
    for token in tok.supermerges.values():  # every superword is two or more whole word pretokens
        s = tok.decode([token])
        pieces = regex.findall(mod.GPT4_SPLIT, s)
        assert len(pieces) >= 2 and all(mod.WORD.fullmatch(p) for p in pieces), repr(s)
    # in an encoding every token ends at a pretoken boundary or inside a pretoken of one
    # kind: a token never ends inside a pretoken it shares with a superword
    probe = Path(shakespeare).read_text()[-20_000:]
    ids = tok.encode(probe)
    ends = np.cumsum([len(tok.decode([i])) for i in ids])
    bounds = set(np.cumsum([len(c) for c in regex.findall(mod.GPT4_SPLIT, probe)]).tolist())
    start = 0
    for i, end in zip(ids, ends.tolist()):
        if i in tok.supermerges.values():
            assert start in bounds | {0} and end in bounds, (start, end, tok.decode([i]))
        start = end
    assert tok.decode(ids) == probe


@pytest.mark.parametrize("name", ALL)
def test_boundless_round_trips_random_unicode(name):
    mod = load(name)
    tok = trained(mod)
    for s in random_strings(1500, seed=5, extra=("of the king", " to the queen ", "I am I am I am")):
        assert tok.decode(tok.encode(s)) == s, repr(s)


@pytest.mark.parametrize("name", ALL)
def test_never_more_tokens_than_bpe_where_word_pairs_repeat(name):
    mod = load(name)
    for vocab_size in (300, 400, 600):
        bpe, boundless = trained(mod, kind="bpe", vocab_size=vocab_size), trained(mod, vocab_size=vocab_size)
        for text in (PAIRS_TEXT, PAIRS_TEXT[:500], "the king of the realm, " * 20):
            assert len(boundless.encode(text)) <= len(bpe.encode(text))
    assert len(boundless.encode(PAIRS_TEXT)) < 0.9 * len(bpe.encode(PAIRS_TEXT))
    assert boundless.decode([boundless.supermerges[boundless.ranked[boundless.super_ranks[0]]]]).count(" ") >= 1


@pytest.mark.parametrize("name", ALL)
def test_save_load_gives_identical_ids_and_refuses_the_other_kind(name, tmp_path):
    mod = load(name)
    tok, bpe = trained(mod), trained(mod, kind="bpe")
    tok.save(tmp_path / "b.json")
    bpe.save(tmp_path / "p.json")
    again = mod.BoundlessBPETokenizer.load(tmp_path / "b.json")
    probe = PAIRS_TEXT + "".join(random_strings(50, seed=3))
    assert again.encode(probe) == tok.encode(probe) and again.name == tok.name
    assert again.vocab_size == tok.vocab_size and again.super_ranks == tok.super_ranks
    assert tok.name != bpe.name and tok.name.startswith("boundless")
    with pytest.raises(ValueError, match="not a BoundlessBPE"):
        mod.BoundlessBPETokenizer.load(tmp_path / "p.json")
    with pytest.raises(ValueError, match="not a BPE"):
        mod.BPETokenizer.load(tmp_path / "b.json")
    obj = json.loads((tmp_path / "b.json").read_text())
    obj["supermerges"] = [len(obj["merges"]) + 3]
    write(tmp_path / "bad.json", json.dumps(obj))
    with pytest.raises(ValueError, match="supermerge ranks"):
        mod.BoundlessBPETokenizer.load(tmp_path / "bad.json")


@pytest.mark.parametrize("name", ALL)
def test_chat_tokens_keep_a_boundless_tokenizer_boundless(name):
    mod = load(name)
    tok = trained(mod)
    grown = mod.with_chat_tokens(tok)
    assert isinstance(grown, mod.BoundlessBPETokenizer)
    assert grown.encode(PAIRS_TEXT) == tok.encode(PAIRS_TEXT)
    assert grown.vocab_size == tok.vocab_size + len(mod.CHAT_TOKENS)


# ---------------------------------------------------------------------------------------
# Renyi efficiency
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_renyi_efficiency_by_hand(name):
    mod = load(name)
    ids = [0] * 6 + [1] * 3 + [2]  # p = 0.6, 0.3, 0.1 over a vocabulary of 8
    p = np.array([0.6, 0.3, 0.1])
    by_hand = math.log((p ** 2.5).sum()) / (1 - 2.5) / math.log(8)
    assert mod.renyi_efficiency(ids, 8, 2.5) == pytest.approx(by_hand, rel=1e-12)
    shannon = -(p * np.log(p)).sum() / math.log(8)
    assert mod.renyi_efficiency(ids, 8, 1.0) == pytest.approx(shannon, rel=1e-12)
    assert mod.renyi_efficiency(ids, 8, 1.0001) == pytest.approx(shannon, rel=1e-3)
    assert mod.renyi_efficiency(list(range(8)) * 5, 8, 2.5) == pytest.approx(1.0)  # uniform: the most
    assert mod.renyi_efficiency(ids, 8, 3.0) < mod.renyi_efficiency(ids, 8, 2.5) < shannon


# ---------------------------------------------------------------------------------------
# 10.2 Entropy patches and the byte-latent model
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_patch_starts_follow_the_rule(name):
    mod = load(name)
    gen = torch.Generator().manual_seed(0)
    h = torch.rand(3, 50, generator=gen) * 4  # entropy of bytes 1..50
    for threshold, rise in ((2.0, 0.0), (3.0, 0.5), (1.0, 1.5)):
        s = mod.patch_starts(h, threshold, rise)
        assert s.shape == (3, 51) and s[:, 0].all()
        for b in range(3):
            for i in range(1, 51):
                e = h[b, i - 1]
                want = bool(e > threshold) or (rise > 0 and i > 1 and bool(e - h[b, i - 2] > rise))
                assert bool(s[b, i]) == want


@pytest.mark.parametrize("name", ALL)
def test_patches_cover_the_text_once(name, shakespeare):
    mod = load(name)
    torch.manual_seed(0)
    model = mod.GPT(mod.Config(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=261)).eval()
    data = np.frombuffer(Path(shakespeare).read_bytes()[:32 * 7 + 5], dtype=np.uint8).astype(np.uint16)
    entropy, starts = mod.text_patches(model, data, 5.0, 0.3, 32)
    assert len(entropy) == len(starts) == 32 * 7  # whole windows
    first = np.flatnonzero(starts)
    lengths = np.diff(first, append=len(starts))
    assert first[0] == 0 and lengths.min() >= 1 and lengths.sum() == len(starts)
    assert starts[::32].all() and np.isnan(entropy[::32]).all()  # each window's first byte
    # the rule on the computed entropies, byte by byte, inside each window
    for t in range(len(starts)):
        if t % 32:
            rise = t % 32 > 1 and entropy[t] - entropy[t - 1] > 0.3
            assert starts[t] == (entropy[t] > 5.0 or rise)
    # entropies are those of the model's next-byte distributions
    idx = torch.from_numpy(data[:32].astype(np.int64))[None]
    logp = torch.log_softmax(model(idx)[0][0, :, :256], -1)
    want = -(logp.exp() * logp).sum(-1)[:-1]
    assert np.allclose(entropy[1:32], want.detach().numpy(), atol=1e-5)


def tiny_latent(mod, seed=0):
    """A tiny ByteLatent over a random entropy model, its threshold the median entropy
    (about two bytes a patch)."""
    torch.manual_seed(seed)
    cfg = mod.Config(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=261, local_layers=1,
                     device="cpu", dtype="float32")
    entropy_model = mod.GPT(mod.Config(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=261))
    for p in entropy_model.parameters():  # far from uniform: entropies vary, so patches do
        p.data.normal_(0, 0.5)
    x = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(seed))
    threshold = mod.next_byte_entropy(entropy_model.eval(), x).median().item()
    return mod.ByteLatent(cfg, entropy_model, threshold), cfg


@pytest.mark.parametrize("name", ALL)
def test_byte_latent_model_is_causal(name):
    mod = load(name)
    model, _ = tiny_latent(mod)
    model.eval()
    x = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    logits = model(x)[0]
    assert 1.5 < model.patch_len < 10  # real patches, not one per byte or one per window
    for t in (0, 7, 19, 30):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, 256, (3, 31 - t), generator=torch.Generator().manual_seed(t))
        assert torch.allclose(model(y)[0][:, :t + 1], logits[:, :t + 1], atol=1e-5), t


@pytest.mark.parametrize("name", ALL)
def test_byte_latent_model_loss_falls(name, shakespeare):
    mod = load(name)
    model, cfg = tiny_latent(mod)
    data = np.frombuffer(Path(shakespeare).read_bytes()[:20_000], dtype=np.uint8).astype(np.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x, y = mod.get_batch(data, 8, 32, "cpu", gen)
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:5])
    assert all(p.grad is None for p in model.entropy_model[0].parameters())  # frozen
    assert not any(k.startswith("entropy") for k in model.state_dict())  # saved with its own run
    assert model.flops_per_token() > 0


# ---------------------------------------------------------------------------------------
# main(): the lessons, their summary keys, bad input
# ---------------------------------------------------------------------------------------
def lesson_flags(tmp_path, data, **kw):
    base = dict(data=data, data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), device="cpu",
                dtype="float32", seed=0, vocab_size=2048, n_layer=1, n_embd=32, n_head=2, block_size=32,
                batch_size=4, max_steps=30, max_seconds=0, eval_interval=15, eval_iters=2, log_interval=15,
                warmup_steps=5, num_samples=1, max_new_tokens=8, entropy_layers=1, entropy_embd=16)
    base.update(kw)
    return [a for k, v in base.items() for a in (f"--{k}", str(v))]


@pytest.mark.parametrize("name", ALL)
def test_lessons_write_their_keys_and_move_the_figures(name, tmp_path, shakespeare):
    mod = load(name)
    summary = mod.main(lesson_flags(tmp_path, shakespeare, only="boundless"))
    b = summary["boundless"]
    assert set(b) >= {"bpe", "boundless", "wall_s"}
    for kind in ("bpe", "boundless"):
        assert set(b[kind]) >= {"bytes_per_token", "renyi_efficiency", "train_s", "val_bpb"}
        assert 0 < b[kind]["renyi_efficiency"] < 1 and b[kind]["val_bpb"] < 8
    assert b["boundless"]["bytes_per_token"] > b["bpe"]["bytes_per_token"]  # superwords compress
    assert b["boundless"]["superwords"] > 50 and b["bpe"]["superwords"] == 0
    out = tmp_path / "out"
    assert (out / "tokens-boundless" / "tokenizer.json").exists()
    # --only patches reruns tokens-bpe (--overwrite) and keeps the boundless figures
    # (200 steps at a high rate: a tiny entropy model whose entropies spread around 3 nats)
    summary = mod.main(lesson_flags(tmp_path, shakespeare, only="patches", overwrite="true", patch_threshold=3.5,
                                    max_steps=200, eval_interval=100, log_interval=100, learning_rate=5e-3))
    p = summary["patches"]
    assert read_summary(out)["boundless"] == b
    assert 1.5 < p["mean_patch_length"] < 32
    patches = sum(p["patch_length_histogram"].values())
    val_bytes = (len(Path(shakespeare).read_bytes()) - int(0.9 * len(Path(shakespeare).read_bytes()))) // 32 * 32
    assert patches * p["mean_patch_length"] == pytest.approx(val_bytes, abs=32)
    assert p["bpe_bytes_per_token"] == pytest.approx(b["bpe"]["bytes_per_token"], rel=0.02)
    for k in ("latent", "tokens"):
        assert p[k]["val_bpb"] < math.log2(261) - 3 and p[k]["flops_per_byte"] > 0  # 8 bits: uniform
    assert (out / "patches.txt").exists()
    assert (out / "latent" / "best.pt").exists() and (out / "entropy" / "best.pt").exists()


@pytest.mark.parametrize("name", ALL)
def test_a_lesson_run_is_not_overwritten_by_accident(name, tmp_path, shakespeare, capsys):
    mod = load(name)
    flags = lesson_flags(tmp_path, shakespeare, only="boundless", vocab_size=300, max_steps=2, eval_interval=2)
    mod.main(flags)
    before = (tmp_path / "out" / "tokens-bpe" / "best.pt").read_bytes()
    err = expect_exit_2(capsys, mod.main, flags)
    assert "tokens-bpe holds a run" in err and "--overwrite" in err
    assert (tmp_path / "out" / "tokens-bpe" / "best.pt").read_bytes() == before


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", ["empty", "whitespace", "small_vocab", "threshold", "negative_threshold",
                                  "other_kind", "heads"])
def test_bad_input_is_one_line_and_exit_2(name, case, tmp_path, shakespeare, capsys):
    mod = load(name)
    flags = dict(only="boundless")
    if case in ("empty", "whitespace"):
        flags["data"] = write(tmp_path / "t.txt", "" if case == "empty" else " \n\t \n" * 100)
    elif case == "small_vocab":
        flags["vocab_size"] = 260  # 256 bytes + 6 special tokens do not fit
    elif case in ("threshold", "negative_threshold"):
        flags.update(only="patches", patch_threshold=0 if case == "threshold" else -1.5)
    elif case == "other_kind":
        trained(mod, kind="bpe").save(tmp_path / "bpe.json")
        flags.update(sample_only="true", tokenizer="boundless", tokenizer_file=str(tmp_path / "bpe.json"))
    else:
        flags.update(only="patches", n_embd=40, n_head=4)  # the local layers' heads: 20 / 4 = 5 wide, odd
    err = expect_exit_2(capsys, mod.main, lesson_flags(tmp_path, flags.pop("data", shakespeare), **flags))
    want = {"empty": "empty", "whitespace": "whitespace", "small_vocab": "--vocab_size", "threshold": "--patch_threshold",
            "negative_threshold": "--patch_threshold", "other_kind": "not a BoundlessBPE", "heads": "--n_embd"}[case]
    assert want in err, err
    assert not (tmp_path / "out" / "summary.json").exists()


# ---------------------------------------------------------------------------------------
# 10.3 Large Concept Model
# ---------------------------------------------------------------------------------------
TINY_DOCS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
             "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n")


def tiny_lcm_cfg(mod, **kw):
    return mod.Config(**{**dict(n_layer=1, n_head=2, n_embd=32, concept_dim=16, concept_layers=1, sentence_len=48,
                                lcm_context=8, batch_size=4, sentence_batch=8, seed=0, device="cpu",
                                dtype="float32", max_seconds=0, warmup_steps=5, log_interval=1000), **kw})


@pytest.mark.parametrize("name", ALL)
def test_documents_are_paragraphs_of_short_sentences_ending_in_the_end_marker(name):
    mod = load(name)
    docs = mod.documents_of(TINY_DOCS + "A line far too long to be one sentence of sixteen bytes here. Ok.", 16)
    assert docs[0] == ["First Citizen:", "Before we", "proceed any", "further, hear me", "speak.", mod.END_OF_TEXT]
    assert docs[1] == ["All:", "Speak, speak.", mod.END_OF_TEXT]
    assert all(len(s.encode()) <= 16 for d in docs for s in d)
    assert len(docs) == 5 and docs[-1][-2:] == ["Ok.", mod.END_OF_TEXT]
    assert mod.documents_of(" \n\n \n", 16) == []


@pytest.mark.parametrize("name", ALL)
def test_a_tiny_autoencoder_gives_its_sentences_back(name):
    mod = load(name)
    cfg = tiny_lcm_cfg(mod, max_steps=300, learning_rate=1e-2)
    sentences = ["Speak, speak.", "Resolved. resolved.", "First Citizen:", "All:", mod.END_OF_TEXT,
                 "Before we proceed"]
    torch.manual_seed(0)
    ae = mod.SentenceAutoencoder(cfg)
    fitted = mod.fit(ae, lambda gen: mod.sentence_batch(sentences, "cpu"), cfg, "cpu", torch.float32, "ae")
    assert fitted["steps"] == 300 and fitted["train_loss"] < 0.05
    concepts = mod.embed_sentences(ae, sentences, "cpu")
    assert torch.allclose(concepts.norm(dim=1), torch.ones(len(sentences)), atol=1e-5)  # unit vectors
    assert ae.decode(concepts, cfg.sentence_len) == sentences
    # a concept depends on its sentence alone: padding beside a longer one changes nothing
    alone = mod.embed_sentences(ae, ["All:"], "cpu")
    assert torch.allclose(alone[0], concepts[3], atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_the_next_concept_loss_falls_and_the_model_is_causal(name):
    mod = load(name)
    cfg = tiny_lcm_cfg(mod, max_steps=80, learning_rate=3e-3)
    gen = torch.Generator().manual_seed(0)
    # documents that walk along a few fixed directions: the next concept is predictable
    basis = torch.nn.functional.normalize(torch.randn(6, 16, generator=gen), dim=-1)
    sequences = [basis[(torch.arange(7) + int(s)) % 6] for s in torch.randint(6, (40,), generator=gen)]
    torch.manual_seed(0)
    lcm = mod.BaseLCM(cfg)
    x, mask = mod.concept_windows(sequences, cfg, "cpu", torch.Generator().manual_seed(1))
    before = lcm(x, mask)[1].item()
    mod.fit(lcm, lambda g: mod.concept_windows(sequences, cfg, "cpu", g), cfg, "cpu", torch.float32, "lcm")
    after = lcm(x, mask)[1].item()
    assert after < 0.3 * before
    pred = lcm(x)[0]
    y = x.clone()
    y[:, 4:] = torch.randn_like(y[:, 4:])
    assert torch.allclose(lcm(y)[0][:, :4], pred[:, :4], atol=1e-5)  # position i sees concepts 0..i only
    figures = mod.next_concept_figures(lcm, sequences[:5], basis.mean(0), basis, torch.Generator().manual_seed(2),
                                       candidates=6)
    assert figures["cosine"] > 0.9 > figures["cosine_repeat_last"] and figures["rank_of_next"] < 1.5


# ---------------------------------------------------------------------------------------
# 10.4 Poincare embeddings
# ---------------------------------------------------------------------------------------
def closure_of_tree(depth=4, branching=2):
    """A complete tree's (node, ancestor) closure pairs, node 0 the root."""
    parent, nodes = {}, [0]
    frontier = [0]
    for _ in range(depth):
        nxt = []
        for p in frontier:
            for _ in range(branching):
                parent[len(nodes)] = p
                nxt.append(len(nodes))
                nodes.append(len(nodes))
        frontier = nxt
    pairs = []
    for n in nodes[1:]:
        a = parent[n]
        while True:
            pairs.append((f"n{n:03d}", f"n{a:03d}"))
            if a == 0:
                break
            a = parent[a]
    return pairs, parent


@pytest.mark.parametrize("name", ALL)
def test_poincare_distance_by_hand(name):
    mod = load(name)
    u, v = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([-0.1, 0.5], dtype=torch.float64)
    sq = ((0.3 + 0.1) ** 2 + (-0.2 - 0.5) ** 2)
    want = math.acosh(1 + 2 * sq / ((1 - 0.13) * (1 - 0.26)))
    assert mod.poincare_distance(u, v).item() == pytest.approx(want, rel=1e-9)
    assert mod.poincare_distance(v, u).item() == pytest.approx(want, rel=1e-12)
    x = torch.rand(20, 3, generator=torch.Generator().manual_seed(0)) * 0.5
    d = mod.poincare_distance(x[:, None], x[None])
    assert torch.allclose(d, d.T) and d.diagonal().abs().max() < 1e-5
    assert mod.poincare_distance(torch.zeros(2), torch.tensor([0.5, 0.0])).item() == pytest.approx(2 * math.atanh(0.5), rel=1e-5)
    toward = [mod.poincare_distance(torch.zeros(2, dtype=torch.float64), torch.tensor([r, 0.0], dtype=torch.float64)).item()
              for r in (0.9, 0.99, 0.999, 0.9999999)]
    assert all(a < b for a, b in zip(toward, toward[1:])) and toward[-1] > 15  # without bound


@pytest.mark.parametrize("name", ALL)
def test_riemannian_sgd_keeps_every_point_inside_the_ball(name):
    mod = load(name)
    w = (torch.rand(50, 2, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9).requires_grad_()
    for step in range(30):
        (mod.poincare_distance(w[:25], w[25:]).sum() * -1.0).backward()  # push apart: toward the boundary
        mod.riemannian_sgd_step(w, lr=50.0)
        assert (w.detach().norm(dim=1) < 1).all() and torch.isfinite(w).all()
    assert w.detach().norm(dim=1).max() > 0.999
    # the step is the Euclidean gradient scaled by (1 - |x|^2)^2 / 4
    x = torch.tensor([[0.5, 0.0]], requires_grad=True)
    x.grad = torch.tensor([[1.0, 2.0]])
    mod.riemannian_sgd_step(x, lr=0.1)
    assert torch.allclose(x.detach(), torch.tensor([[0.5 - 0.1 * 0.75 ** 2 / 4, -0.2 * 0.75 ** 2 / 4]]))


@pytest.mark.parametrize("name", ALL)
def test_a_small_tree_embeds_parents_inward_and_beats_euclidean(name):
    mod = load(name)
    pairs, parent = closure_of_tree()
    names, ids = mod.index_hierarchy(pairs, "tree")
    cfg = mod.Config(poincare_epochs=150, poincare_lr=0.2, poincare_batch=16, negatives=10, burn_in=10, seed=0)
    w = mod.train_embedding(len(names), ids, 2, cfg, "poincare")
    norms = w.norm(dim=1)
    closer = [norms[names.index(f"n{parent[c]:03d}")] < norms[names.index(f"n{c:03d}")] for c in parent]
    assert np.mean(closer) > 0.9
    depth = {0: 0, **{c: 0 for c in parent}}
    for c in sorted(parent):
        depth[c] = depth[parent[c]] + 1
    by_depth = [norms[[names.index(f"n{n:03d}") for n in depth if depth[n] == k]].mean() for k in range(5)]
    assert all(a < b for a, b in zip(by_depth, by_depth[1:]))
    e = mod.train_embedding(len(names), ids, 2, cfg, "euclidean")
    _, map_p = mod.reconstruction(w, ids, mod.poincare_distance)
    _, map_e = mod.reconstruction(e, ids, mod.euclidean_distance)
    assert map_p > map_e + 0.1


@pytest.mark.parametrize("name", ALL)
def test_reconstruction_counts_as_gensim_does(name):
    mod = load(name)
    pairs, _ = closure_of_tree(depth=3)
    names, ids = mod.index_hierarchy(pairs, "tree")
    w = torch.rand(len(names), 3, generator=torch.Generator().manual_seed(0)) * 0.6 - 0.3
    mean_rank, map_ = mod.reconstruction(w, ids, mod.poincare_distance)
    d = mod.poincare_distance(w[:, None].double(), w[None].double()).numpy()
    relations = collections.defaultdict(set)
    for c, a in ids.tolist():
        relations[c].add(a)
    ranks, aps = [], []
    for u, pos in relations.items():  # gensim's loop: every node not a positive is a negative, u included
        pos = sorted(pos)
        negative = np.ones(len(names), dtype=bool)
        negative[pos] = False
        r = np.array([(d[u][negative] < d[u][p]).sum() + 1 for p in pos])
        ranks += list(r)
        map_ranks = np.sort(r) + np.arange(len(r))
        aps.append((np.arange(1, len(r) + 1) / np.sort(map_ranks)).mean())
    assert mean_rank == pytest.approx(np.mean(ranks)) and map_ == pytest.approx(np.mean(aps), rel=1e-6)
    assert mean_rank >= 2  # u itself, at distance 0, is always nearer than its ancestors


@pytest.mark.parametrize("name", ALL)
def test_the_standard_library_gives_a_closure(name):
    mod = load(name)
    pairs = set(mod.stdlib_hierarchy())
    assert {("email.mime.text", "email.mime"), ("email.mime.text", "email"), ("email.mime.text", "stdlib"),
            ("email", "stdlib"), ("json", "stdlib")} <= pairs
    names, ids = mod.index_hierarchy(sorted(pairs), "stdlib")
    assert len(names) > 300 and "stdlib" in names and not any(n.startswith("site-packages") for n in names)
    ancestors = collections.defaultdict(set)
    for c, a in pairs:
        ancestors[c].add(a)
    for c, ups in ancestors.items():  # transitively closed
        for a in ups:
            assert ancestors.get(a, set()) <= ups


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", ["fields", "self", "cycle", "dim", "lr", "sentences", "no_file"])
def test_bad_hierarchy_and_lcm_input_exits_2(name, case, tmp_path, shakespeare, capsys):
    mod = load(name)
    flags = dict(only="poincare", poincare_epochs=1)
    tsv = {"fields": "a\tb\nc\n", "self": "a\tb\nb\tb\n", "cycle": "a\tb\nb\tc\nc\ta\n"}.get(case)
    if tsv is not None:
        flags["hierarchy"] = write(tmp_path / "h.tsv", tsv)
    elif case == "dim":
        flags["dim"] = 1
    elif case == "lr":
        flags["poincare_lr"] = 0
    elif case == "no_file":
        flags["hierarchy"] = str(tmp_path / "missing.tsv")
    else:
        flags.update(only="lcm", data=write(tmp_path / "t.txt", "no sentence ends here " * 500))
    err = expect_exit_2(capsys, mod.main, lesson_flags(tmp_path, flags.pop("data", shakespeare), **flags))
    want = {"fields": "h.tsv:2", "self": "own parent", "cycle": "cycle", "dim": "--dim", "lr": "--poincare_lr",
            "sentences": "paragraphs", "no_file": "no such file"}[case]
    assert want in err, err
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("name", ALL)
def test_the_lcm_and_poincare_lessons_write_their_keys(name, tmp_path, shakespeare):
    mod = load(name)
    data = write(tmp_path / "t.txt", Path(shakespeare).read_text()[:60_000])
    summary = mod.main(lesson_flags(tmp_path, data, only="lcm", n_embd=32, concept_dim=16, concept_layers=1,
                                    max_steps=40, autoencoder_steps=40, sentence_batch=16, lcm_context=8))
    lcm = summary["lcm"]
    assert set(lcm) >= {"cosine", "cosine_repeat_last", "cosine_mean", "rank_of_next", "reconstruction_exact"}
    assert -1 <= lcm["cosine"] <= 1 and 1 <= lcm["rank_of_next"] <= 100 and 0 <= lcm["reconstruction_exact"] <= 1
    assert lcm["autoencoder"]["steps"] == 40 and lcm["lcm"]["steps"] == 40
    assert (tmp_path / "out" / "lcm.pt").exists() and (tmp_path / "out" / "poincare.pt").exists() is False
    pairs, _ = closure_of_tree(depth=3)
    tsv = write(tmp_path / "tree.tsv", "".join(f"{c}\t{a}\n" for c, a in pairs))
    summary = mod.main(lesson_flags(tmp_path, data, only="poincare", hierarchy=tsv, poincare_epochs=30))
    p = summary["poincare"]
    assert set(p["poincare"]) == set(p["euclidean"]) == {"2", "5", "10"}
    assert all(set(row) == {"mean_rank", "map"} for g in ("poincare", "euclidean") for row in p[g].values())
    assert p["poincare"]["2"]["map"] > p["euclidean"]["2"]["map"]
    saved = torch.load(tmp_path / "out" / "poincare.pt", weights_only=True)
    assert saved["names"][0] == "n000" and saved["poincare-2"].shape == (len(saved["names"]), 2)
    assert summary["lcm"] == lcm  # the earlier lesson's key stays


# ---------------------------------------------------------------------------------------
# 10.5-10.7 Quantization and compression
# ---------------------------------------------------------------------------------------
def tiny_bpe_gpt(mod, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = mod.Config(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=300, device="cpu",
                               dtype="float32"), **kw})
    model = mod.GPT(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model.eval(), cfg


@pytest.mark.parametrize("name", ALL)
def test_quantized_weights_come_back_within_half_a_step(name):
    mod = load(name)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 24)[:, None]
    q, scale = mod.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (24, 1)
    assert ((mod.dequantize(q, scale, 8) - w).abs() <= scale / 2 + 1e-6).all()
    assert (q.abs().amax(1) == 127).all()  # each row's largest weight uses the whole range
    packed, scale4 = mod.quantize_int4(w, 16)
    assert packed.dtype == torch.uint8 and packed.shape == (24, 32) and scale4.shape == (24, 4)
    step = scale4.repeat_interleave(16, dim=1)
    assert ((mod.dequantize(packed, scale4, 4, 16) - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("name", ALL)
def test_int4_packing_round_trips_all_16_values(name):
    mod = load(name)
    values = torch.arange(-8, 8, dtype=torch.int8)
    grid = torch.stack(torch.meshgrid(values, values, indexing="ij"), -1).reshape(1, -1)  # every pair, both orders
    packed = ((grid + 8).to(torch.uint8)[:, 0::2] | ((grid + 8).to(torch.uint8)[:, 1::2] << 4))
    assert torch.equal(mod.unpack_int4(packed), grid)
    w = values.float()[None].repeat(3, 4) * 0.25  # values that are exact multiples of a scale of 0.25 * 8 / 7
    packed, scale = mod.quantize_int4(w, 16)
    assert torch.equal(mod.unpack_int4(packed), torch.round(w / scale.repeat_interleave(16, 1)).to(torch.int8))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_layer_equals_dequantize_then_matmul(name, bits):
    mod = load(name)
    layer = torch.nn.Linear(64, 40, bias=True)
    q = mod.QuantLinear(layer.weight.detach(), layer.bias, bits, 16)
    x = torch.randn(5, 7, 64)
    w = mod.dequantize(q.qweight, q.scale, bits, 16)
    assert torch.allclose(q(x), x @ w.T + layer.bias, atol=1e-5)
    err = (w - layer.weight).abs().max().item()
    assert 0 < err < (0.01 if bits == 8 else 0.05)


@pytest.mark.parametrize("name", ALL)
def test_a_quantized_checkpoint_saves_loads_and_generates(name, tmp_path, capsys):
    mod = load(name)
    model, cfg = tiny_bpe_gpt(mod)
    group = mod.quant_group(model, 0)
    assert group == 32  # 128 and 64 do not divide the 32-wide inputs
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    for bits in (8, 4):
        q = mod.quantize_model(model, bits, group)
        assert q.lm_head.qweight is q.wte.table.qweight  # one table for the tied embedding and head
        path = tmp_path / f"int{bits}.pt"
        mod.save_checkpoint(str(path), {"model": q.state_dict(), "config": mod.dataclasses.asdict(cfg)})
        again = mod.quantize_model(mod.GPT(cfg), bits, group)
        again.load_state_dict(torch.load(path, weights_only=True)["model"])
        want = mod.generate(q, prompt, 12, temperature=0)
        assert torch.equal(mod.generate(again, prompt, 12, temperature=0), want)
        if bits == 8:  # (a random model's int4 copy may wander off: the lesson test measures agreement)
            assert (mod.generate(model, prompt, 12, temperature=0)[:, 5:] == want[:, 5:]).float().mean() > 0.5
        # a quantized file is not a float checkpoint: one line, exit 2
        err = expect_exit_2(capsys, mod.load_checkpoint, str(path), cfg, "cpu")
        assert "another model" in err
    with pytest.raises(SystemExit):
        mod.quant_group(model, 24)  # does not divide 32


@pytest.mark.parametrize("name", ALL)
def test_svd_at_full_rank_is_the_layer_and_a_bad_rank_is_refused(name):
    mod = load(name)
    layer = torch.nn.Linear(48, 20, bias=True)
    full = mod.LowRankLinear(layer, 20)
    x = torch.randn(3, 48)
    assert torch.allclose(full(x), layer(x), atol=1e-5)
    half = mod.LowRankLinear(layer, 10)
    assert sum(p.numel() for p in half.parameters()) == 10 * (48 + 20) + 20
    for rank in (0, -1, 21):
        if rank:
            with pytest.raises(ValueError, match="rank"):
                mod.svd_rank(layer.weight, rank=rank)
    s2 = torch.linalg.svdvals(layer.weight.detach().double()) ** 2
    r = mod.svd_rank(layer.weight, energy=0.5)
    assert s2[:r].sum() / s2.sum() >= 0.5 > s2[:r - 1].sum() / s2.sum()
    model, _ = tiny_bpe_gpt(mod)
    factored = mod.factorize_model(model, energy=1.0)
    idx = torch.randint(0, 300, (2, 9))
    assert torch.allclose(factored(idx)[0], model(idx)[0], atol=1e-3)


@pytest.mark.parametrize("name", ALL)
def test_distillation_loss_is_zero_for_the_teacher_itself(name):
    mod = load(name)
    logits = torch.randn(2, 5, 30)
    assert mod.distillation_loss(logits, logits, 2.0).item() == pytest.approx(0, abs=1e-6)
    other = torch.randn(2, 5, 30)
    loss = mod.distillation_loss(other, logits, 2.0)
    p = torch.softmax(logits / 2, -1)
    kl = (p * (torch.log_softmax(logits / 2, -1) - torch.log_softmax(other / 2, -1))).sum(-1).mean() * 4
    assert loss.item() == pytest.approx(kl.item(), rel=1e-5) and loss > 0


@pytest.mark.parametrize("name", ALL)
def test_the_int8_kv_cache_is_close_to_the_float_one_at_half_of_bf16(name):
    mod = load(name)
    model, cfg = tiny_bpe_gpt(mod, n_embd=64, n_head=4, n_kv_head=2)
    data = np.random.default_rng(0).integers(0, 300, 5000)
    exact = mod.cached_loss(model, data, cfg, mod.KVCache, chunk=8, windows=4)
    plain = mod.estimate_loss(model, {"v": data}, mod.dataclasses.replace(cfg, eval_iters=1, batch_size=4,
                                                                            seed=cfg.seed + 1), "cpu", torch.float32)
    assert math.isfinite(plain["v"])
    int8 = mod.cached_loss(model, data, cfg, mod.Int8KVCache, chunk=8, windows=4)
    assert 0 < abs(int8 - exact) < 0.02 * exact
    # the cached loss is the uncached one: the float cache changes nothing
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    x, y = mod.get_batch(data, 4, cfg.block_size, "cpu", gen)
    assert exact == pytest.approx(model(x, y)[1].item(), rel=1e-5)
    assert mod.kv_bytes_per_token(cfg, "int8") == 2 * 2 * 2 * (16 + 2)  # layers x (k, v) x kv heads x (bytes + scale)
    assert mod.kv_bytes_per_token(cfg, "int8") < 0.6 * mod.kv_bytes_per_token(cfg, "bfloat16")


@pytest.mark.parametrize("name", ALL)
def test_the_quant_lesson_table(name, tmp_path, shakespeare):
    mod = load(name)
    data = write(tmp_path / "t.txt", Path(shakespeare).read_text()[:200_000])
    summary = mod.main(lesson_flags(tmp_path, data, only="quant", vocab_size=512, max_steps=60, decode_tokens=8,
                                    student_layers=1, student_embd=16, eval_iters=2))
    q = summary["quant"]
    for key in ("float32", "bfloat16", "int8", "int4", "svd", "student", "scratch", "torch_int8"):
        assert set(q[key]) >= {"bytes", "val_bpb", "tokens_per_s", "agreement"}, key
    assert q["float32"]["agreement"] == 1.0
    # (in a model this small the scales and the file format weigh more: the README has the default run's sizes)
    assert q["int8"]["bytes"] < 0.35 * q["float32"]["bytes"] and q["int4"]["bytes"] < 0.25 * q["float32"]["bytes"]
    assert q["int4"]["bytes"] < q["int8"]["bytes"] < q["torch_int8"]["bytes"] < q["float32"]["bytes"]
    assert abs(q["int8"]["val_bpb"] - q["float32"]["val_bpb"]) < 0.01
    assert q["kv_cache"]["int8"]["bytes_per_token"] < 0.6 * q["kv_cache"]["bfloat16"]["bytes_per_token"]
    assert q["student"]["bytes"] == q["scratch"]["bytes"] < q["float32"]["bytes"]
    saved = torch.load(tmp_path / "out" / "int4.pt", weights_only=True)
    config = {k: v for k, v in saved["config"].items() if k in {f.name for f in mod.dataclasses.fields(mod.Config)}}
    again = mod.quantize_model(mod.GPT(mod.Config(**config)), 4, saved["quant"]["group"])
    again.load_state_dict(saved["model"])  # the file holds the whole quantized model


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", ["group", "svd_rank", "temperature", "energy"])
def test_bad_quant_flags_exit_2(name, case, tmp_path, shakespeare, capsys):
    mod = load(name)
    flags = {"group": dict(quant_group=24), "svd_rank": dict(svd_rank=-2), "temperature": dict(distill_temperature=0),
             "energy": dict(svd_energy=1.5)}[case]
    err = expect_exit_2(capsys, mod.main, lesson_flags(tmp_path, shakespeare, only="quant", **flags))
    assert f"--{next(iter(flags))}" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name", ALL)
def test_the_distilled_students_loss_weighs_the_teacher_and_the_text(name):
    mod = load(name)
    teacher, cfg = tiny_bpe_gpt(mod, seed=0)
    student, _ = tiny_bpe_gpt(mod, seed=1)
    idx, targets = torch.randint(0, 300, (2, 9)), torch.randint(0, 300, (2, 9))
    s, t = student(idx)[0][..., :300], teacher(idx)[0][..., :300]
    soft = mod.distillation_loss(s, t, 2.0)
    hard = torch.nn.functional.cross_entropy(s.flatten(0, 1), targets.flatten())
    for alpha in (0.0, 0.3, 1.0):
        loss = mod.Distilled(student, teacher, 2.0, alpha)(idx, targets)[1]
        assert loss.item() == pytest.approx((alpha * soft + (1 - alpha) * hard).item(), rel=1e-5)
    wrapped = mod.Distilled(student, teacher, 2.0)
    assert not any(k.startswith("teacher") for k in wrapped.state_dict())
    assert wrapped.num_params() == student.num_params()


@pytest.mark.parametrize("name", ALL)
def test_a_lessons_files_are_not_run_over_by_accident(name, tmp_path, shakespeare, capsys):
    mod = load(name)
    pairs, _ = closure_of_tree(depth=2)
    tsv = write(tmp_path / "tree.tsv", "".join(f"{c}\t{a}\n" for c, a in pairs))
    flags = lesson_flags(tmp_path, shakespeare, only="poincare", hierarchy=tsv, poincare_epochs=2, dim=2)
    mod.main(flags)
    before = (tmp_path / "out" / "poincare.pt").read_bytes()
    err = expect_exit_2(capsys, mod.main, flags)
    assert "poincare.pt" in err and "--overwrite" in err
    assert (tmp_path / "out" / "poincare.pt").read_bytes() == before
    mod.main(flags + ["--overwrite", "true"])  # asked for: it runs again
    assert (tmp_path / "out" / "poincare.pt").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
@pytest.mark.parametrize("name", ALL)
def test_a_second_run_in_the_same_out_dir_is_refused(name, tmp_path, shakespeare, capsys):
    """Lessons without run folders of their own (lcm, poincare) share --out_dir with the
    others: a run there at the same time would overwrite their summary.json."""
    import fcntl
    mod = load(name)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "run.lock", "w") as other:  # another process's part10 run holds the lock
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242\n")
        other.flush()
        err = expect_exit_2(capsys, mod.main, lesson_flags(tmp_path, shakespeare, only="poincare"))
    assert "in use by another run" in err and "4242" in err
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
