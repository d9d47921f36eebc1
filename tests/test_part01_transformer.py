"""Part 01: the Transformer written out. Causality, attention against torch's own
implementations, the attention weights as causal distributions, LayerNorm and GELU against
torch, the NumPy walk-through against `Head`, gradients reaching every parameter, the
parameter formula, sinusoidal positions, and the milestone: the GPT memorizes a paragraph and
recites it greedily. Part02 replaces `Head`, `count_params`, the recorded weights and the
attention picture: their tests run on part01 alone, the ideas behind them on every part."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import load, part_names, part_number, randomize_, read_summary, tiny_cfg, tiny_gpt

ALL = part_names(1)
PART01 = part_names(1, last=1)  # Head, count_params, recorded weights: part02 replaces them
LESSON = 1  # every part builds part01's model: learned positions, LayerNorm, GELU, biases


def causal_mask(mod, T):
    """The part's own (T, T) causal mask: causal_mask until part03 made masks from positions."""
    if part_number(mod) >= 3:
        return mod.attention_mask(torch.arange(T), torch.arange(T))
    return mod.causal_mask(T)


# ---------------------------------------------------------------------------------------
# Causality
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_future_tokens_never_change_earlier_logits(name, flash, pos):
    mod = load(name)
    model = tiny_gpt(mod, LESSON, flash=flash, pos=pos)
    randomize_(model)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 64, (2, 16), generator=g)
    cut = 7
    idx2 = idx.clone()
    idx2[:, cut:] = (idx2[:, cut:] + 1 + torch.randint(0, 62, (2, 16 - cut), generator=g)) % 64
    assert (idx2[:, cut:] != idx[:, cut:]).all()
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(idx2)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=1e-5, rtol=0)
    # ... while the logits that may see the change do change (the test is not vacuous)
    assert (a[:, cut:] - b[:, cut:]).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("flash", [True, False])
def test_no_gradient_flows_from_the_future(name, flash):
    """d out[t] / d x[s] is zero for every s > t: a stronger check than one perturbation."""
    mod = load(name)
    cfg = tiny_cfg(mod, LESSON, flash=flash)
    torch.manual_seed(0)
    attn = randomize_(mod.CausalSelfAttention(cfg)).eval()
    x = torch.randn(1, 8, cfg.n_embd, requires_grad=True)
    t = 3
    attn(x)[0, t].sum().backward()
    g = x.grad[0].abs().sum(dim=-1)  # (T,)
    assert torch.all(g[t + 1:] == 0)
    assert torch.all(g[: t + 1] > 0)


# ---------------------------------------------------------------------------------------
# Attention against torch's implementations
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("flash", [True, False])
def test_multihead_attention_matches_sdpa(name, flash):
    mod = load(name)
    cfg = tiny_cfg(mod, LESSON, flash=flash)
    torch.manual_seed(0)
    attn = randomize_(mod.CausalSelfAttention(cfg)).eval()
    B, T, C, H = 2, 10, cfg.n_embd, cfg.n_head
    x = torch.randn(B, T, C)
    with torch.no_grad():
        q, k, v = F.linear(x, attn.c_attn.weight, attn.c_attn.bias).split(C, dim=2)
        split = lambda t: t.view(B, T, H, C // H).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        want = attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        got = attn(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_multihead_attention_matches_nn_multiheadattention(name, flash, bias):
    mod = load(name)
    cfg = tiny_cfg(mod, LESSON, flash=flash, bias=bias)
    torch.manual_seed(0)
    attn = randomize_(mod.CausalSelfAttention(cfg)).eval()
    ref = nn.MultiheadAttention(cfg.n_embd, cfg.n_head, bias=bias, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.c_attn.weight)  # rows: q, then k, then v
        ref.out_proj.weight.copy_(attn.c_proj.weight)
        if bias:
            ref.in_proj_bias.copy_(attn.c_attn.bias)
            ref.out_proj.bias.copy_(attn.c_proj.bias)
    T = 12
    x = torch.randn(3, T, cfg.n_embd)
    mask = ~torch.ones(T, T, dtype=torch.bool).tril()  # True: may NOT attend
    with torch.no_grad():
        want, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
        got = attn(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PART01)
@pytest.mark.parametrize("bias", [False, True])
def test_single_head_matches_sdpa(name, bias):
    mod = load(name)
    torch.manual_seed(0)
    head = randomize_(mod.Head(16, 8, bias=bias))
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        q, k, v = head.query(x), head.key(x), head.value(x)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = head(x)
    assert got.shape == (2, 9, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_explicit_path_equals_flash_path(name, pos):
    mod = load(name)
    fast = tiny_gpt(mod, LESSON, flash=True, pos=pos)
    randomize_(fast)
    slow = tiny_gpt(mod, LESSON, flash=False, pos=pos)
    slow.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, la = fast(idx, idx)
        b, lb = slow(idx, idx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("T", [1, 11])
def test_attention_weights_are_causal_distributions(name, T):
    """attention(q, k, v, mask) under the part's causal mask: each query's weights are a
    distribution over itself and the keys before it, and the output is their average of v."""
    mod = load(name)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, T, 8, generator=g) * 2 for _ in range(3))
    mask = causal_mask(mod, T)
    assert torch.equal(mask, torch.ones(T, T, dtype=torch.bool).tril())
    y, w = mod.attention(q, k, v, mask)
    assert w.shape == (2, 4, T, T) and y.shape == (2, 4, T, 8)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, T), atol=1e-5, rtol=0)
    assert torch.all(w[..., ~mask] == 0)
    assert torch.all(w[..., mask] > 0)  # every allowed key gets some weight
    torch.testing.assert_close(y, w @ v)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # the first query sees only itself: its output is its own value
    torch.testing.assert_close(y[..., 0, :], v[..., 0, :], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", PART01)
def test_recorded_attention_weights_are_causal_distributions(name):
    mod = load(name)
    model = tiny_gpt(mod, LESSON, flash=True)
    randomize_(model)
    idx = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain, _ = model(idx)
        attn = model.h[1].attn
        attn.record = True
        recorded, _ = model(idx)
        attn.record = False
    w = attn.weights
    assert w.shape == (2, 4, 11, 11)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 11), atol=1e-5, rtol=0)
    assert torch.all(w.triu(1) == 0)
    allowed = torch.ones(11, 11, dtype=torch.bool).tril()
    assert torch.all(w[..., allowed] > 0)  # every allowed key gets some weight
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)  # recording changes nothing


@pytest.mark.parametrize("name", PART01)
def test_attention_picture_returns_the_recorded_head(name, capsys):
    mod = load(name)
    model = tiny_gpt(mod, LESSON)
    randomize_(model)
    ids = torch.randint(32, 127, (14,), generator=torch.Generator().manual_seed(4)) % 64
    w = mod.attention_picture(model, ids, layer=1, head=2, n=10)
    assert w.shape == (10, 10)
    torch.testing.assert_close(w.sum(-1), torch.ones(10), atol=1e-5, rtol=0)
    assert torch.all(w.triu(1) == 0)
    torch.testing.assert_close(w, model.h[1].attn.weights[0, 2].float())
    assert model.h[1].attn.record is False  # switched back off
    assert "layer 1, head 2" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# The pieces: LayerNorm, GELU, the NumPy walk-through
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(name, bias):
    mod = load(name)
    ours = randomize_(mod.LayerNorm(24, bias=bias))
    ref = nn.LayerNorm(24, eps=1e-5, bias=bias)
    ref.load_state_dict(ours.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == (48 if bias else 24)
    x = (torch.randn(3, 5, 24) * 4 + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    a, b = ours(x), ref(x2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_gelu_is_the_exact_erf_gelu(name):
    mod = load(name)
    x = torch.cat([torch.linspace(-8, 8, 2001), torch.randn(1000) * 3])
    torch.testing.assert_close(mod.gelu(x), F.gelu(x), atol=1e-6, rtol=1e-6)
    # the tanh approximation differs by more than that: the check tells the two apart
    assert (F.gelu(x, approximate="tanh") - F.gelu(x)).abs().max() > 1e-5


@pytest.mark.parametrize("name", PART01)
def test_numpy_walkthrough_equals_head(name, capsys):
    mod = load(name)
    explain, Head = mod.explain_attention, mod.Head
    rng = np.random.default_rng(5)
    T, C, hd = 5, 8, 4
    x = rng.standard_normal((T, C))
    Wq, Wk, Wv = rng.standard_normal((3, C, hd))
    out = explain(x, Wq, Wk, Wv, verbose=False)
    assert capsys.readouterr().out == ""  # verbose=False prints nothing
    assert out.shape == (T, hd)
    np.testing.assert_allclose(out[0], x[0] @ Wv, rtol=1e-12)  # token 0 sees only itself
    head = Head(C, hd)
    with torch.no_grad():  # nn.Linear computes x @ W.T: it stores the transposes
        for lin, W in ((head.query, Wq), (head.key, Wk), (head.value, Wv)):
            lin.weight.copy_(torch.from_numpy(W.T))
        got = head(torch.from_numpy(x).float()[None])[0].double().numpy()
    np.testing.assert_allclose(out, got, rtol=1e-5, atol=1e-5)  # float32 Head
    with torch.no_grad():  # a different weight gives a different output: the check bites
        head.value.weight.mul_(1.01)
        moved = head(torch.from_numpy(x).float()[None])[0].double().numpy()
    assert np.abs(out - moved).max() > 1e-3


# ---------------------------------------------------------------------------------------
# The model: gradients, parameter count, positions
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_every_parameter_gets_a_gradient(name, pos):
    mod = load(name)
    model = tiny_gpt(mod, LESSON, pos=pos, n_layer=2).train()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(6))
    _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{pname} got a zero gradient"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ALL)
def test_initial_loss_is_near_uniform(name):
    """Small init: the untrained model predicts ~uniformly, loss ~ ln(vocab_size)."""
    mod = load(name)
    model = tiny_gpt(mod, LESSON, perturb=False, vocab_size=256)
    g = torch.Generator().manual_seed(7)
    idx, targets = torch.randint(0, 256, (2, 4, 16), generator=g)
    with torch.no_grad():
        logits, loss = model(idx, targets)
        no_loss = model(idx)[1]
    assert logits.shape == (4, 16, 256) and no_loss is None
    assert abs(loss.item() - np.log(256)) < 0.1


def part01_params(cfg):
    """Part01's formula: 12C^2 + 13C per block (with biases; 2C of LayerNorm gains without),
    the tied embedding once, the position table when learned, the final LayerNorm."""
    C, bias = cfg.n_embd, cfg.bias
    per_block = 12 * C * C + (13 * C if bias else 2 * C)
    pos = cfg.block_size * C if cfg.pos == "learned" else 0
    return cfg.vocab_size * C + pos + cfg.n_layer * per_block + (2 * C if bias else C)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
@pytest.mark.parametrize("bias", [True, False])
def test_num_params_matches_formula(name, pos, bias):
    mod = load(name)
    cfg = tiny_cfg(mod, LESSON, pos=pos, bias=bias, n_layer=3, n_embd=24, n_head=3, block_size=20,
                   vocab_size=64)  # a multiple of 64: later parts pad the vocabulary to one
    model = mod.GPT(cfg)
    n = model.num_params()
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert n == sum(unique.values())
    assert n == part01_params(cfg)
    # by hand for this config: 12C^2 + 13C (or + 2C) per block, tied embedding once
    C = 24
    per_block = 12 * C * C + (13 * C if bias else 2 * C)
    hand = 64 * C + (20 * C if pos == "learned" else 0) + 3 * per_block + (2 * C if bias else C)
    assert n == hand


@pytest.mark.parametrize("name", PART01)
@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [dict(n_layer=3, n_embd=24, n_head=3, block_size=20, vocab_size=64),
                                   dict(n_layer=1, n_embd=16, n_head=2, block_size=7, vocab_size=100)])
def test_count_params_is_the_formula(name, pos, bias, shape):
    """count_params, the formula part01 teaches, counts the model without building it."""
    mod = load(name)
    cfg = tiny_cfg(mod, LESSON, pos=pos, bias=bias, **shape)
    n = mod.count_params(cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size,
                         pos == "learned", bias)
    assert n == mod.GPT(cfg).num_params() == part01_params(cfg)


@pytest.mark.parametrize("name", ALL)
def test_lm_head_is_tied_and_context_is_limited(name):
    mod = load(name)
    model = tiny_gpt(mod, LESSON)
    assert model.lm_head.weight is model.wte.weight
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))  # block_size is 16


@pytest.mark.parametrize("name", ALL)
def test_sinusoidal_dot_product_depends_on_distance_only(name):
    mod = load(name)
    table = mod.sinusoidal_table
    T, C = 96, 16
    P = table(T, C).double()
    assert P.shape == (T, C)
    p = torch.arange(T, dtype=torch.float64)
    torch.testing.assert_close(P[:, 0], torch.sin(p))  # lowest column pair: frequency 1
    torch.testing.assert_close(P[:, 1], torch.cos(p))
    for d in (1, 2, 5, 17, 40):
        dots = torch.stack([P[i] @ P[i + d] for i in (0, 3, 11, 30, 55)])
        torch.testing.assert_close(dots, dots[0].expand(5), atol=1e-4, rtol=0)
    self_dot = P[0] @ P[0]
    assert self_dot.item() == pytest.approx(C / 2)  # each sin/cos pair has unit length
    for d in range(1, T):
        assert P[0] @ P[d] < self_dot - 1e-3, d
    # the nearest neighbour is the most alike of all other positions
    assert P[0] @ P[1] > (P[0] @ P[2:].T).max()


@pytest.mark.parametrize("name", ALL)
def test_sinusoidal_positions_add_no_parameters(name):
    mod = load(name)
    learned = tiny_gpt(mod, LESSON, pos="learned").num_params()
    sinus = tiny_gpt(mod, LESSON, pos="sinusoidal").num_params()
    assert learned - sinus == 16 * 32  # block_size * n_embd


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("args", [["--n_embd", "10", "--n_head", "3"], ["--pos", "foo"]])
def test_bad_model_flags_exit_2(name, args, tmp_path, capsys):
    mod = load(name)
    with pytest.raises(SystemExit) as e:
        mod.main(args + ["--out_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err


def test_text_longer_than_context_exits_2(tmp_path, capsys):
    mod = load("part01")
    with pytest.raises(SystemExit) as e:
        mod.main(["--block_size", "8", "--text", "x" * 10, "--out_dir", str(tmp_path / "a"),
                  "--device", "cpu"])
    assert e.value.code == 2
    assert "--block_size" in capsys.readouterr().err


def test_text_of_block_size_plus_one_bytes_is_accepted(tmp_path):
    mod = load("part01")
    s = mod.main(["--block_size", "8", "--text", "x" * 9, "--max_steps", "2",
                  "--out_dir", str(tmp_path / "b"), "--device", "cpu"])
    assert s["text_bytes"] == 9 and s["steps"] == 2


# ---------------------------------------------------------------------------------------
# Generation and the milestone
# ---------------------------------------------------------------------------------------
def test_generate_is_greedy_and_crops_to_the_context():
    mod = load("part01")
    model = tiny_gpt(mod, LESSON, block_size=8)
    randomize_(model)
    start = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(8))
    out = mod.generate(model, start, 10)
    assert out.shape == (2, 15) and torch.equal(out[:, :5], start)
    with torch.no_grad():
        for t in range(5, 15):
            logits, _ = model(out[:, max(0, t - 8):t])  # the last block_size tokens
            assert torch.equal(out[:, t], logits[:, -1].argmax(-1))
    assert torch.equal(mod.generate(model, start, 10), out)  # greedy: deterministic


def test_trained_model_recites_its_text_greedily():
    mod = load("part01")
    text = "to be or not to be, that is the question."
    ids = torch.tensor(list(text.encode()), dtype=torch.long)
    cfg = tiny_cfg(mod, LESSON, vocab_size=256, block_size=64, n_embd=32, n_head=4, n_layer=1,
                   learning_rate=1e-2, max_steps=300, target_loss=0.02, log_interval=1000)
    mod.set_seed(0)
    model = mod.GPT(cfg)
    untrained = mod.generate(model, ids[None, :1], len(ids) - 1)[0]
    history = mod.train(model, ids, cfg, "cpu", torch.float32)
    assert history[-1][1] < 0.02 < history[0][1]
    out = mod.generate(model, ids[None, :1], len(ids) - 1)[0]
    assert bytes(out.tolist()).decode() == text
    assert not torch.equal(untrained, ids)


def test_milestone_memorizes_and_recites(tmp_path):
    mod = load("part01")
    full, short = tmp_path / "full", tmp_path / "short"
    mod.main(["--out_dir", str(full), "--device", "cpu"])
    s = read_summary(full)
    assert s["exact_match"] is True
    assert s["final_loss"] < 0.05
    assert s["steps"] < 1000  # it stopped at the target, not at the step limit
    assert s["params"] == s["params_formula"]
    assert (full / "samples.txt").read_text().rstrip("\n") == mod.TOY_TEXT
    assert len((full / "metrics.jsonl").read_text().splitlines()) == s["steps"]
    # three steps are not enough: the figure moves the right way with training
    mod.main(["--out_dir", str(short), "--device", "cpu", "--max_steps", "3"])
    s3 = read_summary(short)
    assert s3["steps"] == 3
    assert s3["exact_match"] is False
    assert s3["final_loss"] > s["final_loss"] + 1.0
