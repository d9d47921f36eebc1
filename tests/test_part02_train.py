"""Part 02: training a byte-level LLM on real text. The byte tokenizer on random Unicode,
the data path (file, folder, URL through a local http.server, the offline fallback, the
token cache), get_batch's shifted windows, the loss at initialization, estimate_loss,
top-k / top-p / temperature sampling, checkpoints, every bad input ending in one `error:`
line and exit status 2, and the milestone: a short run lowers the validation loss. (The
same seed gives the same run: test_part00_foundations.py checks it on every part.)"""
import dataclasses
import http.server
import math
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (as_flags, expect_exit_2, lesson_fields, load, part_names, random_strings,
                      randomize_, read_metrics, read_summary, tiny_cfg, unused_port, write)

ALL = part_names(2)
LESSON = 2  # every part trains part02's model: byte tokens, learned positions, dense GELU MLPs
LN256 = math.log(256)
SHAPE = dict(n_layer=1, n_head=2, n_embd=32, block_size=16)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def run_cfg(mod, tmp_path, **kw):
    """Part02's tiny model (conftest's tiny_cfg) for a 4-step run whose caches and outputs
    stay inside tmp_path."""
    run = dict(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), max_steps=4,
               eval_interval=2, log_interval=1, num_samples=1, max_new_tokens=8, vocab_size=256)
    return tiny_cfg(mod, LESSON, **{**run, **SHAPE, **kw})


def cli(mod, **kw):
    """Command-line flags for main(): CPU, part02's model in the tiny shape (kw overrides it)."""
    return as_flags({"device": "cpu", **lesson_fields(mod, LESSON), **SHAPE, **kw})


def small_text(tmp_path, n=4000, name="small.txt"):
    """n bytes of varied ASCII prose: enough for block_size 16 and a 90/10 split."""
    rng = random.Random(n)
    words = ["the", "king", "of", "rome", "speaks", "and", "all", "hear", "him", "now", "o",
             "gentle", "friend", "what", "light"]
    text = ""
    while len(text) < n:
        text += " ".join(rng.choice(words) for _ in range(8)) + ".\n"
    return write(tmp_path / name, text[:n])


def tiny_model(mod, tmp_path, seed=0, **kw):
    cfg = run_cfg(mod, tmp_path, **kw)
    torch.manual_seed(seed)
    return cfg, randomize_(mod.GPT(cfg), seed).eval()


def train_tiny(mod, tmp_path, text_path, **kw):
    """What main() does before sampling, on a tiny config: returns cfg, model, result."""
    # the byte tokenizer main() builds (part06 on: with the chat tokens)
    tokenizer = mod.ByteTokenizer(mod.CHAT_TOKENS) if hasattr(mod, "CHAT_TOKENS") else mod.ByteTokenizer()
    cfg = run_cfg(mod, tmp_path, data=text_path, **{"vocab_size": tokenizer.vocab_size, **kw})
    data, _ = mod.load_tokens(cfg, tokenizer)
    train_data, val_data = mod.split_data(data)
    os.makedirs(cfg.out_dir, exist_ok=True)
    mod.set_seed(cfg.seed)
    model = mod.GPT(cfg)
    result = mod.train(model, train_data, val_data, cfg, "cpu", torch.float32)
    return cfg, model, result


def checkpoints(out_dir):
    """The checkpoint files of a run (part02: ckpt.pt)."""
    return sorted(f for f in os.listdir(out_dir) if f.endswith(".pt"))


def snapshot(out_dir):
    return {f: Path(out_dir, f).read_bytes() for f in sorted(os.listdir(out_dir))}


# ---------------------------------------------------------------------------------------
# A local HTTP server (no network): files by path, hit counting, a truncated response
# ---------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.hits.append(self.path)
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        extra = 1000 if self.path in srv.truncated else 0  # promise more than is sent
        self.send_header("Content-Length", str(len(body) + extra))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def no_proxy(monkeypatch):
    """requests talks to 127.0.0.1 directly, whatever proxy the environment names."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(no_proxy):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.hits, srv.truncated = {}, [], set()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


# ---------------------------------------------------------------------------------------
# 2.1 The byte tokenizer
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_byte_tokenizer_round_trips_random_unicode(name):
    mod = load(name)
    tok = mod.ByteTokenizer()
    assert tok.vocab_size == 256
    strings = random_strings(3000, seed=2)
    assert sum(any(ord(c) > 0xFFFF for c in s) for s in strings) > 500  # 4-byte characters
    for s in strings:
        ids = tok.encode(s)
        assert all(isinstance(i, int) and 0 <= i < 256 for i in ids)
        assert ids == list(s.encode("utf-8"))  # one id per UTF-8 byte
        assert tok.decode(ids) == s, repr(s)
    assert len(tok.encode("\U0001F600")) == 4 and len(tok.encode("\u00e9")) == 2


@pytest.mark.parametrize("name", ALL)
def test_byte_tokenizer_decodes_any_byte_ids(name):
    mod = load(name)
    tok = mod.ByteTokenizer()
    rng = random.Random(3)
    replaced = 0
    for _ in range(3000):
        ids = [rng.randrange(256) for _ in range(rng.randrange(0, 24))]
        text = tok.decode(ids)
        assert isinstance(text, str)
        assert text == bytes(ids).decode("utf-8", errors="replace")
        replaced += "\ufffd" in text
    assert replaced > 1000  # most random byte strings are not valid UTF-8: the check bites
    assert tok.decode([0xFF]) == "\ufffd"
    assert tok.decode(tok.encode("\u00e9")[:1]) == "\ufffd"  # a cut multi-byte character
    assert tok.decode(list(range(256)))[:128] == "".join(map(chr, range(128)))


# ---------------------------------------------------------------------------------------
# 2.2 Data: file, folder, token cache, short files, windows
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_load_text_reads_a_file_and_a_folder_of_txt_files(name, tmp_path):
    mod = load(name)
    f = write(tmp_path / "one.txt", "h\u00e9llo \U0001F600\n")
    text, used = mod.load_text(run_cfg(mod, tmp_path, data=f))
    assert (text, used) == ("h\u00e9llo \U0001F600\n", f)
    folder = tmp_path / "corpus"
    names = ["c.txt", "10.txt", "a.txt", "B.txt", "2.txt"]  # sorted: 10, 2, B, a, c
    for n in names:
        write(folder / n, n.upper())
    write(folder / "d.md", "not text")
    write(folder / "z.txt.bak", "not text either")
    text, used = mod.load_text(run_cfg(mod, tmp_path, data=str(folder)))
    assert text == "10.TXT\n\n2.TXT\n\nB.TXT\n\nA.TXT\n\nC.TXT"  # sorted, .txt only
    assert used == str(folder)
    # invalid UTF-8 in a file is replaced, not fatal
    bad = write(tmp_path / "bad.txt", b"ok \xff\xfe ok")
    assert mod.load_text(run_cfg(mod, tmp_path, data=bad))[0] == "ok \ufffd\ufffd ok"


@pytest.mark.parametrize("name", ALL)
def test_load_tokens_caches_in_data_dir_and_notices_a_changed_file(name, tmp_path):
    mod = load(name)
    tok = mod.ByteTokenizer()
    path = small_text(tmp_path, 2000)
    cfg = run_cfg(mod, tmp_path, data=path)
    data, used = mod.load_tokens(cfg, tok)
    raw = Path(path).read_bytes()
    assert used == path and data.dtype == np.uint8 and len(data) == len(raw)
    assert bytes(np.asarray(data)) == raw
    caches = sorted(os.listdir(cfg.data_dir))
    assert len(caches) == 1 and caches[0].endswith(".npy")
    again, _ = mod.load_tokens(cfg, tok)
    assert np.array_equal(again, data) and sorted(os.listdir(cfg.data_dir)) == caches
    # the same length, other content: a stale cache would return the old tokens
    changed = raw.replace(b"king", b"KING")
    assert changed != raw and len(changed) == len(raw)
    Path(path).write_bytes(changed)
    new, _ = mod.load_tokens(cfg, tok)
    assert bytes(np.asarray(new)) == changed
    assert not any(f.endswith(".tmp") for f in os.listdir(cfg.data_dir))


@pytest.mark.parametrize("name", ALL)
def test_shortest_accepted_file_holds_a_window_in_both_splits(name, tmp_path):
    mod = load(name)
    T = SHAPE["block_size"]
    cfg = run_cfg(mod, tmp_path, data=small_text(tmp_path, 10 * (T + 1)))
    data, _ = mod.load_tokens(cfg, mod.ByteTokenizer())
    train_data, val_data = mod.split_data(data)
    assert len(train_data) + len(val_data) == len(data)
    assert len(train_data) == int(0.9 * len(data)) and len(val_data) >= T + 1
    assert np.array_equal(np.concatenate([train_data, val_data]), data)  # first 90%, then 10%
    for split in (train_data, val_data):
        x, y = mod.get_batch(split, 3, T, "cpu")
        assert x.shape == y.shape == (3, T)


def find_window(data, row):
    """Start positions where data[i : i + len(row)] equals row."""
    windows = np.lib.stride_tricks.sliding_window_view(data, len(row))
    return np.flatnonzero((windows == row).all(axis=1))


@pytest.mark.parametrize("name", ALL)
def test_get_batch_gives_real_windows_shifted_by_one(name):
    mod = load(name)
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, 3000, dtype=np.uint8)
    B, T = 6, 20
    x, y = mod.get_batch(data, B, T, "cpu", torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (B, T)
    assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert torch.equal(y[:, :-1], x[:, 1:])
    for b in range(B):
        full = np.concatenate([x[b].numpy(), y[b, -1:].numpy()])
        starts = find_window(data, full)  # x = data[i:i+T], y = data[i+1:i+T+1]
        assert len(starts) == 1, b
        assert np.array_equal(x[b].numpy(), data[starts[0]:starts[0] + T])
    # the same generator seed gives the same batch; another seed another one
    x2, y2 = mod.get_batch(data, B, T, "cpu", torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = mod.get_batch(data, B, T, "cpu", torch.Generator().manual_seed(2))
    assert not torch.equal(x, x3)


@pytest.mark.parametrize("name", ALL)
def test_get_batch_reaches_the_last_window(name):
    """Data of T+2 tokens has exactly two windows: both get drawn, nothing runs past the end."""
    mod = load(name)
    T = 8
    data = np.arange(T + 2, dtype=np.uint8)
    x, y = mod.get_batch(data, 64, T, "cpu", torch.Generator().manual_seed(0))
    starts = set(x[:, 0].tolist())
    assert starts == {0, 1}
    assert torch.equal(y, x + 1)
    one, _ = mod.get_batch(data[:T + 1], 4, T, "cpu")  # a single window: always it
    assert torch.equal(one, torch.arange(T).expand(4, T))


# ---------------------------------------------------------------------------------------
# 2.3 The loss and 2.6 estimate_loss
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_untrained_loss_is_near_ln_256_on_real_text(name, tmp_path):
    mod = load(name)
    cfg = run_cfg(mod, tmp_path, data=small_text(tmp_path, 6000), n_layer=2, n_embd=64,
                   n_head=4, block_size=32, batch_size=8, eval_iters=4)
    data, _ = mod.load_tokens(cfg, mod.ByteTokenizer())
    train_data, val_data = mod.split_data(data)
    torch.manual_seed(0)
    model = mod.GPT(cfg)
    losses = mod.estimate_loss(model, {"train": train_data, "val": val_data}, cfg, "cpu",
                               torch.float32)
    assert set(losses) == {"train", "val"}
    for split, loss in losses.items():
        assert abs(loss - LN256) < 0.1, (split, loss)


@pytest.mark.parametrize("name", ALL)
def test_loss_is_next_token_cross_entropy_and_bpb_divides_by_ln2(name, tmp_path):
    mod = load(name)
    cfg, model = tiny_model(mod, tmp_path)
    data = np.random.default_rng(5).integers(0, 256, 500, dtype=np.uint8)
    x, y = mod.get_batch(data, 3, cfg.block_size, "cpu", torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, loss = model(x, y)
    logp = torch.log_softmax(logits.double(), dim=-1)  # (B, T, V)
    want = -logp.gather(-1, y[..., None]).mean()  # -log p(the next token), mean over B*T
    assert abs(loss.item() - want.item()) < 1e-4
    unshifted = -logp.gather(-1, x[..., None]).mean()  # scoring the current token instead
    assert abs(want.item() - unshifted.item()) > 0.01  # ... is another number: the check bites
    assert mod.bits_per_byte(loss.item()) == pytest.approx(loss.item() / math.log(2), rel=1e-12)
    assert mod.bits_per_byte(2.0, 4.0) == pytest.approx(2.0 / math.log(2) / 4.0, rel=1e-12)
    assert mod.bits_per_byte(math.log(256)) == pytest.approx(8.0)  # uniform bytes: 8 bits


@pytest.mark.parametrize("name", ALL)
def test_estimate_loss_is_repeatable_and_leaves_training_alone(name, tmp_path):
    mod = load(name)
    cfg, model = tiny_model(mod, tmp_path, eval_iters=3)
    model.train()
    rng = np.random.default_rng(6)
    splits = {"train": rng.integers(0, 256, 800, dtype=np.uint8),
              "val": rng.integers(0, 128, 300, dtype=np.uint8)}
    state = torch.get_rng_state()
    a = mod.estimate_loss(model, splits, cfg, "cpu", torch.float32)
    b = mod.estimate_loss(model, splits, cfg, "cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream untouched
    assert model.training  # back in training mode
    assert a == b and set(a) == {"train", "val"}
    assert a["train"] != a["val"] and all(math.isfinite(v) for v in a.values())
    # it is the mean loss over eval_iters batches: one batch alone gives another number
    one = mod.estimate_loss(model, splits, dataclasses.replace(cfg, eval_iters=1), "cpu",
                            torch.float32)
    assert one["train"] != a["train"]


# ---------------------------------------------------------------------------------------
# 2.5 Sampling
# ---------------------------------------------------------------------------------------
PROBS = [0.5, 0.3, 0.15, 0.05]


def kept(logits):
    return torch.isfinite(logits)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("p, n_kept", [(0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.96, 4),
                                       (0.01, 1), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(name, p, n_kept):
    mod = load(name)
    logits = torch.tensor(PROBS).log()
    perms = [torch.arange(4), torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])]
    batch = torch.stack([logits[q] for q in perms])  # the same distribution, shuffled
    out = mod.filter_logits(batch.clone(), top_p=p)
    assert out.shape == batch.shape
    for row, q in enumerate(perms):
        want = torch.zeros(4, dtype=torch.bool)
        want[:n_kept] = True  # the n_kept most likely tokens, in original order
        assert torch.equal(kept(out[row]), want[q]), (p, row)
        assert torch.equal(out[row][kept(out[row])], batch[row][kept(out[row])])  # untouched


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 3, 17, 49, 50, 0, 80])
def test_top_k_keeps_the_k_largest(name, k):
    mod = load(name)
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(3, 50, generator=g) * 3
    out = mod.filter_logits(logits.clone(), top_k=k)
    n = 50 if k == 0 or k >= 50 else k  # 0 = off; k >= V keeps everything
    for row in range(3):
        top = set(torch.topk(logits[row], n).indices.tolist())
        assert set(torch.nonzero(kept(out[row])).flatten().tolist()) == top
        assert torch.equal(out[row][kept(out[row])], logits[row][kept(out[row])])
    # top_k and top_p together: what top_p keeps lies within the top k
    both = mod.filter_logits(logits.clone(), top_k=5, top_p=0.5)
    assert (kept(both) <= kept(mod.filter_logits(logits.clone(), top_k=5))).all()
    assert (kept(both).sum(-1) >= 1).all()


@pytest.mark.parametrize("name", ALL)
def test_top_k_1_and_tiny_top_p_equal_greedy(name, tmp_path):
    mod = load(name)
    cfg, model = tiny_model(mod, tmp_path, block_size=16)
    start = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(7))
    greedy = mod.generate(model, start, 16, temperature=0)
    assert greedy.shape == (3, 21) and torch.equal(greedy[:, :5], start)  # past the context too
    for kw in (dict(temperature=1.0, top_k=1), dict(temperature=0.7, top_k=1),
               dict(temperature=1.5, top_p=1e-6)):
        g = torch.Generator().manual_seed(11)
        assert torch.equal(mod.generate(model, start, 16, generator=g, **kw), greedy), kw
    free = mod.generate(model, start, 16, temperature=1.0,
                        generator=torch.Generator().manual_seed(11))
    assert not torch.equal(free, greedy)  # plain sampling does differ: the check bites


@pytest.mark.parametrize("name", ALL)
def test_the_generator_seed_decides_the_samples(name, tmp_path):
    mod = load(name)
    cfg, model = tiny_model(mod, tmp_path)
    start = torch.zeros(2, 1, dtype=torch.long)

    def run(seed, **kw):
        torch.manual_seed(1000 + seed * 7)  # the global RNG must not matter
        return mod.generate(model, start, 20, temperature=1.0,
                            generator=torch.Generator().manual_seed(seed), **kw)

    a = run(5)
    assert torch.equal(a, run(5))
    assert not torch.equal(a, run(6))
    assert torch.equal(run(5, top_k=20, top_p=0.9), run(5, top_k=20, top_p=0.9))
    # top_k keeps the samples inside the k most likely tokens at every step
    out = run(3, top_k=2)
    with torch.no_grad():
        for t in range(1, out.size(1)):
            logits = model(out[:, max(0, t - cfg.block_size):t])[0][:, -1]
            top2 = torch.topk(logits, 2).indices
            assert (top2 == out[:, t:t + 1]).any(dim=-1).all(), t


@pytest.mark.parametrize("name", ALL)
def test_sample_keeps_the_last_block_size_tokens_of_a_long_prompt(name, tmp_path, capsys):
    mod = load(name)
    T = 16
    prompt = "".join(chr(ord("a") + i % 26) for i in range(40))
    cfg, model = tiny_model(mod, tmp_path, block_size=T, prompt=prompt, num_samples=2,
                            max_new_tokens=6, temperature=0)
    capsys.readouterr()
    samples = mod.sample(model, mod.ByteTokenizer(), cfg, "cpu")
    out = capsys.readouterr().out
    assert len(samples) == 2
    for s in samples:
        assert s.startswith(prompt[-T:]) and not s.startswith(prompt[-T - 1:])
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "40" in note[0] and str(T) in note[0], out
    # a prompt that fits is kept whole and needs no note
    short = mod.sample(model, mod.ByteTokenizer(), dataclasses.replace(cfg, prompt="abc"), "cpu")
    assert all(s.startswith("abc") for s in short) and "note" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# 2.4 Training and checkpoints
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_train_writes_a_plain_checkpoint_that_loads_back(name, tmp_path):
    mod = load(name)
    cfg, model, result = train_tiny(mod, tmp_path, small_text(tmp_path), max_steps=4,
                                    eval_interval=2)
    assert result["steps"] == 4 and math.isfinite(result["val_loss"])
    assert result["tokens_per_s"] > 0
    files = os.listdir(cfg.out_dir)
    assert "ckpt.pt" in files and "metrics.jsonl" in files
    assert not [f for f in files if f.endswith(".tmp")]  # written atomically
    ckpts = {f: torch.load(os.path.join(cfg.out_dir, f), map_location="cpu", weights_only=True)
             for f in checkpoints(cfg.out_dir)}
    for ckpt in ckpts.values():
        assert {"model", "optimizer", "config", "step"} <= set(ckpt)
        assert isinstance(ckpt["config"], dict) and ckpt["config"]["n_layer"] == SHAPE["n_layer"]
        assert "state" in ckpt["optimizer"] and "param_groups" in ckpt["optimizer"]
    # the checkpoint of the best validation loss (ckpt.pt here; a later part may name it apart)
    best = [f for f, c in ckpts.items() if c.get("val_loss") == pytest.approx(result["val_loss"])]
    assert best, {f: c.get("val_loss") for f, c in ckpts.items()}
    path, ckpt = os.path.join(cfg.out_dir, best[0]), ckpts[best[0]]
    assert ckpt["step"] in (2, 4)
    lines = read_metrics(cfg.out_dir)
    assert [d["step"] for d in lines if "train_loss" in d] == [1, 2, 3, 4]
    assert [d["step"] for d in lines if "val_loss" in d] == [2, 4]
    # load_checkpoint accepts it, and its weights give back the best validation loss
    again = mod.load_checkpoint(path, cfg, "cpu")
    fresh = mod.GPT(cfg)
    fresh.load_state_dict(again["model"])
    data, _ = mod.load_tokens(cfg, mod.ByteTokenizer())
    splits = dict(zip(("train", "val"), mod.split_data(data)))
    val = mod.estimate_loss(fresh, splits, cfg, "cpu", torch.float32)["val"]
    assert val == pytest.approx(ckpt["val_loss"], abs=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_holds_the_best_validation_loss_not_the_last(name, tmp_path, monkeypatch):
    """Scripted evaluations (val 3.0, 2.0, 2.5, 1.5, 4.0 at steps 2, 4, ..., 10): the saved
    model is the one of step 8, and the result reports 1.5 as the best, 4.0 as the final."""
    mod = load(name)
    vals = iter([3.0, 2.0, 2.5, 1.5, 4.0])
    real = mod.estimate_loss

    def scripted(model, splits, cfg, device, dtype):
        out = real(model, splits, cfg, device, dtype)  # the real work, then the script's value
        return {**out, "val": next(vals)}

    monkeypatch.setattr(mod, "estimate_loss", scripted)
    cfg, _, result = train_tiny(mod, tmp_path, small_text(tmp_path), max_steps=10,
                                eval_interval=2)
    assert next(vals, None) is None  # five evaluations
    assert result["val_loss"] == 1.5 and result["final_val_loss"] == 4.0
    saved = [torch.load(os.path.join(cfg.out_dir, f), map_location="cpu", weights_only=True)
             for f in checkpoints(cfg.out_dir)]
    assert any(c["step"] == 8 and c["val_loss"] == 1.5 for c in saved), \
        [(c["step"], c.get("val_loss")) for c in saved]
    evals = [d for d in read_metrics(cfg.out_dir) if "val_loss" in d]
    assert [(d["step"], d["val_loss"]) for d in evals] == [(2, 3.0), (4, 2.0), (6, 2.5), (8, 1.5),
                                                            (10, 4.0)]


@pytest.mark.parametrize("name", ALL)
def test_sample_only_with_a_matching_checkpoint_prints_samples(name, tmp_path, capsys):
    mod = load(name)
    cfg, _, _ = train_tiny(mod, tmp_path, small_text(tmp_path))
    before = snapshot(cfg.out_dir)
    capsys.readouterr()
    r = mod.main(["--sample_only", "--out_dir", cfg.out_dir, "--data_dir", cfg.data_dir,
                  "--prompt", "the king", "--num_samples", "3", "--max_new_tokens", "12",
                  "--temperature", "0.9", "--top_k", "10", *cli(mod)])
    assert r is None
    out = capsys.readouterr().out
    assert "loaded" in out
    assert out.count("the king") == 3 and out.count("-" * 80) == 3
    assert snapshot(cfg.out_dir) == before  # sampling writes nothing


@pytest.mark.parametrize("name", ALL)
def test_sample_only_with_another_model_shape_exits_2(name, tmp_path, capsys):
    mod = load(name)
    cfg, _, _ = train_tiny(mod, tmp_path, small_text(tmp_path))
    before = snapshot(cfg.out_dir)
    err = expect_exit_2(capsys, mod.main, ["--sample_only", "--out_dir", cfg.out_dir,
                                           *cli(mod, n_layer=2)])
    assert "--n_layer" in err
    assert snapshot(cfg.out_dir) == before


class NotATensor:
    """A pickled object weights_only=True must refuse to build (it would run code)."""


def _garbage(mod, path):
    Path(path).write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))


def _empty(mod, path):
    Path(path).write_bytes(b"")


def _list(mod, path):
    torch.save([torch.zeros(3), 1, "x"], path)


def _foreign_object(mod, path):
    """A checkpoint that would otherwise load and sample fine, plus one object that only a
    full unpickler (weights_only=False: it runs the file's code) would build."""
    cfg = run_cfg(mod, Path(path).parent)
    torch.save({"model": mod.GPT(cfg).state_dict(), "config": dataclasses.asdict(cfg), "step": 1,
                "val_loss": 1.0, "payload": NotATensor()}, path)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("make", [_garbage, _empty, _list, _foreign_object],
                         ids=["garbage", "empty", "list", "foreign-object"])
def test_unreadable_checkpoint_exits_2_and_is_left_untouched(name, make, tmp_path, capsys):
    mod = load(name)
    out = tmp_path / "out"
    out.mkdir()
    make(mod, str(out / "ckpt.pt"))
    before = (out / "ckpt.pt").read_bytes()
    err = expect_exit_2(capsys, mod.main, ["--sample_only", "--out_dir", str(out),
                                           "--max_new_tokens", "2", *cli(mod)])
    assert "ckpt.pt" in err
    assert snapshot(out) == {"ckpt.pt": before}


@pytest.mark.parametrize("name", ALL)
def test_truncated_checkpoint_exits_2(name, tmp_path, capsys):
    mod = load(name)
    cfg, _, _ = train_tiny(mod, tmp_path, small_text(tmp_path))
    for f in checkpoints(cfg.out_dir):  # cut every checkpoint file in half
        ckpt = Path(cfg.out_dir, f)
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    before = snapshot(cfg.out_dir)
    err = expect_exit_2(capsys, mod.main, ["--sample_only", "--out_dir", cfg.out_dir, *cli(mod)])
    assert ".pt" in err
    assert snapshot(cfg.out_dir) == before


@pytest.mark.parametrize("name", ALL)
def test_sample_only_without_a_checkpoint_exits_2(name, tmp_path, capsys):
    mod = load(name)
    err = expect_exit_2(capsys, mod.main, ["--sample_only", "--out_dir", str(tmp_path / "none"),
                                           *cli(mod)])
    assert "checkpoint" in err
    assert not (tmp_path / "none").exists() or not os.listdir(tmp_path / "none")


# ---------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, nothing written
# ---------------------------------------------------------------------------------------
BAD_DATA = {
    "missing file": lambda tmp: str(tmp / "no_such_file.txt"),
    "empty file": lambda tmp: write(tmp / "empty.txt", ""),
    "too short": lambda tmp: write(tmp / "short.txt", "x" * (10 * (SHAPE["block_size"] + 1) - 1)),
    "folder without txt": lambda tmp: str((tmp / "notes").mkdir() or tmp / "notes"),
    "folder of non-txt": lambda tmp: str(Path(write(tmp / "docs" / "a.md", "text " * 200)).parent),
    "unreachable url": lambda tmp: f"http://127.0.0.1:{unused_port()}/corpus.txt",
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_exits_2_with_one_line(name, case, tmp_path, capsys, no_proxy):
    mod = load(name)
    data = BAD_DATA[case](tmp_path)
    out = tmp_path / "out"
    err = expect_exit_2(capsys, mod.main, ["--data", data, "--data_dir", str(tmp_path / "cache"),
                                           "--out_dir", str(out), "--max_steps", "1", *cli(mod)])
    assert "--data" in err
    assert not (out / "ckpt.pt").exists() and not (out / "summary.json").exists()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("args", [["--top_p", "0"], ["--temperature", "-1"], ["--top_p", "1.5"],
                                  ["--top_k", "-1"], ["--max_new_tokens", "-1"],
                                  ["--temperature", "warm"], ["--sample_only", "maybe"]])
def test_bad_sampling_flags_exit_2(name, args, tmp_path, capsys):
    mod = load(name)
    data = small_text(tmp_path)  # good data and a 1-step run: only the flag can stop it
    err = expect_exit_2(capsys, mod.main, args + ["--out_dir", str(tmp_path / "out"),
                                                  "--data", data, "--data_dir",
                                                  str(tmp_path / "data"), "--max_steps", "1",
                                                  *cli(mod)])
    assert args[0] in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("name", ALL)
def test_bad_flag_leaves_an_existing_run_alone(name, tmp_path, capsys):
    mod = load(name)
    cfg, _, _ = train_tiny(mod, tmp_path, small_text(tmp_path))
    before = snapshot(cfg.out_dir)
    expect_exit_2(capsys, mod.main, ["--out_dir", cfg.out_dir, "--data", cfg.data,
                                     "--data_dir", cfg.data_dir, "--top_p", "0", "--max_steps", "1",
                                     *cli(mod)])
    assert snapshot(cfg.out_dir) == before


# ---------------------------------------------------------------------------------------
# Download: a local http.server, the cache, the offline fallback
# ---------------------------------------------------------------------------------------
BODY = ("First Citizen:\nBefore we proceed any further, hear me speak. \u00e9\U0001F600\n"
        * 50).encode()


@pytest.mark.parametrize("name", ALL)
def test_download_is_cached_and_not_fetched_again(name, tmp_path, server, capsys):
    mod = load(name)
    server.files["/x.txt"] = BODY
    cfg = run_cfg(mod, tmp_path, data=server.url + "/x.txt")
    text, used = mod.load_text(cfg)
    assert text == BODY.decode()
    assert os.path.dirname(used) == cfg.data_dir and used.endswith("-x.txt")  # <url hash>-x.txt
    assert Path(used).read_bytes() == BODY
    assert server.hits == ["/x.txt"]
    assert "downloading" in capsys.readouterr().out
    again, used2 = mod.load_text(cfg)
    assert (again, used2) == (text, used)
    assert server.hits == ["/x.txt"]  # served from data_dir: no second request
    assert "downloading" not in capsys.readouterr().out
    assert os.listdir(cfg.data_dir) == [os.path.basename(used)]  # no temp file left
    # and load_tokens trains on it (the URL's tokens are cached next to it)
    data, _ = mod.load_tokens(cfg, mod.ByteTokenizer())
    assert bytes(np.asarray(data)) == BODY and server.hits == ["/x.txt"]


@pytest.mark.parametrize("name", ALL)
def test_the_default_url_is_cached_as_tinyshakespeare(name, tmp_path, server, monkeypatch):
    mod = load(name)
    server.files["/input.txt"] = BODY
    monkeypatch.setattr(mod, "SHAKESPEARE_URL", server.url + "/input.txt")
    cfg = run_cfg(mod, tmp_path, data=mod.SHAKESPEARE_URL)
    text, used = mod.load_text(cfg)
    assert text == BODY.decode() and used == os.path.join(cfg.data_dir, "tinyshakespeare.txt")
    assert mod.load_text(cfg)[0] == text and server.hits == ["/input.txt"]


@pytest.mark.parametrize("name", ALL)
def test_offline_falls_back_to_pydoc_topics(name, tmp_path, monkeypatch, capsys, no_proxy):
    mod = load(name)
    url = f"http://127.0.0.1:{unused_port()}/input.txt"
    monkeypatch.setattr(mod, "SHAKESPEARE_URL", url)
    cfg = run_cfg(mod, tmp_path, data=url)
    capsys.readouterr()
    text, used = mod.load_text(cfg)
    from pydoc_data.topics import topics
    assert used == "pydoc_data.topics"
    assert text == "\n\n".join(topics[k] for k in sorted(topics)) and len(text) > 100_000
    out = capsys.readouterr()
    assert "pydoc_data.topics" in out.out and out.err == ""
    assert not os.path.exists(os.path.join(cfg.data_dir, "tinyshakespeare.txt"))
    data, used = mod.load_tokens(cfg, mod.ByteTokenizer())  # and it trains on it
    assert used == "pydoc_data.topics" and len(data) == len(text.encode())


@pytest.mark.parametrize("name", ALL)
def test_failed_download_of_another_url_exits_2_and_caches_nothing(name, tmp_path, server,
                                                                   capsys):
    mod = load(name)
    cfg = run_cfg(mod, tmp_path, data=server.url + "/missing.txt")  # 404
    err = expect_exit_2(capsys, mod.load_text, cfg)
    assert "missing.txt" in err and server.hits == ["/missing.txt"]
    assert not os.path.exists(cfg.data_dir) or os.listdir(cfg.data_dir) == []
    closed = run_cfg(mod, tmp_path, data=f"http://127.0.0.1:{unused_port()}/x.txt")
    expect_exit_2(capsys, mod.load_text, closed)
    assert not os.path.exists(cfg.data_dir) or os.listdir(cfg.data_dir) == []


@pytest.mark.parametrize("name", ALL)
def test_interrupted_download_leaves_no_file_and_is_retried(name, tmp_path, server, capsys):
    mod = load(name)
    server.files["/cut.txt"] = BODY
    server.truncated.add("/cut.txt")  # the connection closes 1000 bytes early
    cfg = run_cfg(mod, tmp_path, data=server.url + "/cut.txt")
    expect_exit_2(capsys, mod.load_text, cfg)
    assert os.listdir(cfg.data_dir) == []  # neither the data file nor a partial temp file
    server.truncated.clear()
    text, _ = mod.load_text(cfg)  # the next run downloads it whole
    assert text == BODY.decode() and server.hits == ["/cut.txt", "/cut.txt"]
    assert len(os.listdir(cfg.data_dir)) == 1 and os.listdir(cfg.data_dir)[0].endswith("-cut.txt")


@pytest.mark.parametrize("name", ALL)
def test_two_urls_with_the_same_file_name_do_not_share_a_cache(name, tmp_path, server):
    mod = load(name)
    server.files["/a/input.txt"] = b"text of corpus A\n" * 40
    server.files["/b/input.txt"] = b"text of corpus B\n" * 40
    a = mod.load_text(run_cfg(mod, tmp_path, data=server.url + "/a/input.txt"))[0]
    b = mod.load_text(run_cfg(mod, tmp_path, data=server.url + "/b/input.txt"))[0]
    assert a.startswith("text of corpus A")
    assert b.startswith("text of corpus B")


# ---------------------------------------------------------------------------------------
# The milestone (part02's main): a short run lowers the validation loss; seeds
# ---------------------------------------------------------------------------------------
RUN = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "32",
       "--batch_size", "8", "--max_steps", "60", "--eval_interval", "30", "--eval_iters", "5",
       "--log_interval", "10", "--num_samples", "2", "--max_new_tokens", "20",
       "--device", "cpu"]


def test_short_training_run_lowers_validation_loss(tmp_path, shakespeare, capsys):
    mod = load("part02")
    out = tmp_path / "out"
    s = mod.main(RUN + ["--data", shakespeare, "--data_dir", str(tmp_path / "data"),
                        "--out_dir", str(out)])
    stdout = capsys.readouterr().out
    assert s == read_summary(out)
    assert {"val_loss", "val_bpb", "train_loss", "tokens_per_s", "wall_s", "steps",
            "data"} <= set(s)
    assert s["steps"] == 60 and s["data"] == shakespeare
    assert s["val_loss"] < LN256 - 1.5, s  # 5.55 at the start: well below uniform
    assert s["val_bpb"] == pytest.approx(s["val_loss"] / math.log(2), rel=1e-9)
    assert s["tokens_per_s"] > 0 and s["wall_s"] > 0 and math.isfinite(s["train_loss"])
    metrics = read_metrics(out)
    train = [d for d in metrics if "train_loss" in d]
    evals = [d for d in metrics if "val_loss" in d]
    assert [d["step"] for d in train] == [1, 10, 20, 30, 40, 50, 60]
    assert abs(train[0]["train_loss"] - LN256) < 0.15  # the untrained model: ~uniform
    assert [d["step"] for d in evals] == [30, 60]
    assert evals[1]["val_loss"] < evals[0]["val_loss"] < LN256 - 0.5
    assert s["val_loss"] == pytest.approx(min(d["val_loss"] for d in evals))
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "config", "step"} <= set(ckpt)
    assert ckpt["step"] == 60 and ckpt["config"]["block_size"] == 32
    samples = (out / "samples.txt").read_text().split("\n" + "-" * 80 + "\n")
    assert len(samples) == 2 and all(x.startswith("\n") for x in samples)  # the default prompt
    assert "tok/s" in stdout and "ETA" in stdout and "bpb" in stdout
    assert not list(out.glob("*.tmp"))
