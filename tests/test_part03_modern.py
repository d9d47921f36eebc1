"""Part 03: the modern decoder. The KV cache against recomputation (token for token and
logit for logit, batched, past the context), RoPE's relative positions, RMSNorm against its
formula, grouped-query attention against a repeated-heads reference, sliding windows and
sinks against a brute-force mask, the rolling cache against a full windowed forward, the
SwiGLU width and the parameter formula, flag errors, the time budget, and the milestone."""
import math
import time
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (expect_flag_error, load, part_names, part_number, perturb_, read_summary,
                      tiny_cfg, tiny_gpt, tokens)

ALL = part_names(3)
LESSON = 3  # every part builds part03's model: the modern stack, dense (conftest.lesson_fields)
# The tiny models of this file: conftest's, with part03's defaults and a 32-token context.
modern_cfg = partial(tiny_cfg, lesson=LESSON, block_size=32)
modern_gpt = partial(tiny_gpt, lesson=LESSON, block_size=32)

# Architectures every later part must keep serving through the cache.
ARCHS = {
    "modern": dict(),  # the defaults: RoPE, RMSNorm, SwiGLU, no biases
    "gqa": dict(n_kv_head=2),
    "part02": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "sinusoidal": dict(pos="sinusoidal", norm="layernorm", n_kv_head=1),
    "window_sink": dict(window=8, sink=2),  # RoPE: streams past block_size
    "window_learned": dict(pos="learned", window=5, sink=1),  # no RoPE: does not stream
}


def cache_bytes(mod, cache):
    """The bytes a KV cache holds: its keys and values. Part03's KVCache reports them itself
    (nbytes, for its streaming demo), and must agree; part04 replaces nbytes."""
    held = sum(t.nelement() * t.element_size() for t in cache.k + cache.v if t is not None)
    if part_number(mod) == 3:
        assert cache.nbytes() == held
    return held


# ---------------------------------------------------------------------------------------
# 3.4 The KV cache: the same tokens and the same logits as recomputation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_generation_equals_uncached(name, arch):
    mod = load(name)
    model = modern_gpt(mod, **ARCHS[arch])
    prompt = tokens((3, 5))
    n = 32 - 5  # fills the context exactly
    a = mod.generate(model, prompt, n, temperature=0, use_cache=True)
    b = mod.generate(model, prompt, n, temperature=0, use_cache=False)
    assert a.shape == (3, 32) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert len(set(a[:, 5:].flatten().tolist())) > 3  # not a degenerate constant stream
    assert not torch.equal(a[0], a[1])  # the rows of the batch are generated independently


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("arch", ["modern", "part02", "gqa", "window_learned"])
def test_cached_generation_past_the_context_restarts_like_cropping(name, arch):
    """Full attention past block_size: the uncached path crops to the last block_size
    tokens, the cached path must restart its cache and give the very same tokens."""
    mod = load(name)
    model = modern_gpt(mod, block_size=16, **ARCHS[arch])
    assert not model.streams
    prompt = tokens((3, 5), seed=2)
    a = mod.generate(model, prompt, 30, temperature=0, use_cache=True)
    b = mod.generate(model, prompt, 30, temperature=0, use_cache=False)
    assert a.shape == (3, 35)
    assert torch.equal(a, b)
    with torch.no_grad():  # both are what the definition says: argmax over the last 16 tokens
        for t in (16, 17, 25, 34):
            logits, _ = model(a[:, t - 16:t])
            assert torch.equal(a[:, t], logits[:, -1].argmax(-1))


@pytest.mark.parametrize("name", ALL)
def test_cached_generation_streams_past_the_context(name):
    """Sliding window + RoPE: no crop, no restart; the rolling cache gives the tokens of
    a full windowed forward over everything generated so far."""
    mod = load(name)
    model = modern_gpt(mod, block_size=16, window=8, sink=2)
    assert model.streams
    prompt = tokens((3, 4), seed=3)
    a = mod.generate(model, prompt, 44, temperature=0, use_cache=True)
    b = mod.generate(model, prompt, 44, temperature=0, use_cache=False)
    assert a.shape == (3, 48)
    assert torch.equal(a, b)
    with torch.no_grad():
        logits, _ = model(a[:, :-1])  # T = 47 > block_size: allowed when the model streams
    assert torch.equal(a[:, 4:], logits[:, 3:].argmax(-1))
    assert len(set(a[:, 4:].flatten().tolist())) > 3


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("flash", [True, False])
def test_prefill_then_decode_logits_equal_full_forward(name, arch, flash):
    mod = load(name)
    model = modern_gpt(mod, flash=flash, **ARCHS[arch])
    idx = tokens((3, 32), seed=4)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache()
        parts = [model(idx[:, :7], cache=cache)[0]]  # prefill
        assert cache.seen == 7
        parts.append(model(idx[:, 7:11], cache=cache)[0])  # a chunk on top of a cache
        for t in range(11, 32):  # decode, one position at a time
            parts.append(model(idx[:, t:t + 1], cache=cache)[0])
        assert cache.seen == 32
    stepped = torch.cat(parts, dim=1)
    assert stepped.shape == full.shape == (3, 32, 64)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=0)
    # positions matter: the same token at another position has other logits
    assert (full[:, 1:] - full[:, :1]).abs().amax() > 1e-2


@pytest.mark.parametrize("name", ALL)
def test_cache_shrinks_with_grouped_query_attention(name):
    mod = load(name)
    idx = tokens((2, 20), seed=5)
    sizes = {}
    for kv in (0, 2, 1):
        model = modern_gpt(mod, n_kv_head=kv)
        cache = model.new_cache()
        with torch.no_grad():
            model(idx, cache=cache)
        sizes[kv] = cache_bytes(mod, cache)
    # allocated for the whole context: layers * (k, v) * B * block_size * C * float32
    assert sizes[0] == 2 * 2 * 2 * model.cfg.block_size * 32 * 4
    assert sizes[2] * 2 == sizes[0] and sizes[1] * 4 == sizes[0]


# ---------------------------------------------------------------------------------------
# 3.2 RoPE
# ---------------------------------------------------------------------------------------
def rotated(mod, x, positions):
    """x (hd,) rotated to each of `positions` -> (len(positions), hd)."""
    cos, sin = mod.rope_angles(torch.as_tensor(positions), x.numel())
    return mod.apply_rope(x.expand(1, 1, len(positions), -1), cos, sin)[0, 0]


@pytest.mark.parametrize("name", ALL)
def test_rope_dot_product_depends_on_distance_only(name):
    mod = load(name)
    g = torch.Generator().manual_seed(6)
    hd = 16
    for _ in range(5):
        q, k = F.normalize(torch.randn(2, hd, generator=g), dim=-1)
        for p, s in ((3, 1), (5, 5), (2, 9), (10, 0)):
            dots = []
            for d in (0, 1, 7, 30, 60):
                rq, rk = rotated(mod, q, [p + d]), rotated(mod, k, [s + d])
                dots.append((rq @ rk.T).item())
            np.testing.assert_allclose(dots, dots[0], atol=1e-5, rtol=0)
            # ... and another distance gives another score: the check can fail
            for e in (1, 4):
                other = (rotated(mod, q, [p]) @ rotated(mod, k, [s + e]).T).item()
                assert abs(other - dots[0]) > 1e-4, (p, s, e)


@pytest.mark.parametrize("name", ALL)
def test_rope_preserves_norms_and_is_identity_at_zero(name):
    mod = load(name)
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(7))
    cos, sin = mod.rope_angles(torch.arange(40), 16)
    assert cos.shape == sin.shape == (40, 8)
    y = mod.apply_rope(x, cos, sin)
    assert y.shape == x.shape
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0: no rotation
    assert (y[:, :, 1:] - x[:, :, 1:]).abs().amax() > 0.1  # later positions are rotated


@pytest.mark.parametrize("name", ALL)
def test_rope_model_adds_no_parameters_and_sees_order(name):
    mod = load(name)
    rope = modern_gpt(mod, pos="rope")
    assert rope.wpe is None
    assert modern_gpt(mod, pos="learned").num_params() - rope.num_params() == 32 * 32
    idx = tokens((1, 12), seed=8)
    with torch.no_grad():
        a, _ = rope(idx)
        b, _ = rope(idx.flip(1))  # the same bag of tokens in another order
    assert (a[0, -1] - b[0, -1]).abs().amax() > 1e-3


# ---------------------------------------------------------------------------------------
# 3.1 RMSNorm
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_rmsnorm_matches_its_formula(name):
    mod = load(name)
    norm = mod.RMSNorm(24)
    assert sum(p.numel() for p in norm.parameters()) == 24  # a gain, no bias
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=torch.Generator().manual_seed(9)))
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(10)) * 4 + 2
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    got = norm(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # unlike LayerNorm it keeps the mean: the two differ on inputs with a nonzero mean
    ln = F.layer_norm(x, (24,), norm.weight.detach(), None, 1e-5)
    assert (got - ln).abs().amax() > 0.1
    # scale invariant
    torch.testing.assert_close(norm(10 * x), got, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# 3.3 Grouped-query attention
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_gqa_with_as_many_kv_heads_is_multihead(name):
    mod = load(name)
    mha = modern_gpt(mod, n_kv_head=0)
    gqa = modern_gpt(mod, n_kv_head=4, seed=1)
    gqa.load_state_dict(mha.state_dict())
    idx = tokens((2, 20), seed=11)
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n_kv_head", [1, 2])
@pytest.mark.parametrize("flash", [True, False])
def test_gqa_equals_repeated_kv_heads_reference(name, n_kv_head, flash):
    mod = load(name)
    cfg = modern_cfg(mod, n_kv_head=n_kv_head, flash=flash, bias=True)
    torch.manual_seed(0)
    attn = perturb_(mod.CausalSelfAttention(cfg), scale=0.3).eval()
    B, T, C, H, hd = 2, 10, 32, 4, 8
    kv = n_kv_head * hd
    assert attn.c_attn.weight.shape == (C + 2 * kv, C)
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        q, k, v = F.linear(x, attn.c_attn.weight, attn.c_attn.bias).split([C, kv, kv], dim=2)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, T, C) -> (B, H, T, hd)
        group = H // n_kv_head
        heads = [h // group for h in range(H)]  # query head h reads kv head h // group
        k = k.view(B, T, n_kv_head, hd).transpose(1, 2)[:, heads]  # -> (B, H, T, hd)
        v = v.view(B, T, n_kv_head, hd).transpose(1, 2)[:, heads]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        want = attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        got = attn(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_gqa_model_equals_multihead_model_with_copied_kv_weights(name):
    """The whole model (RoPE, window, sink) with 2 kv heads = multi-head attention whose
    k and v projections hold each kv head's weights once per query head of its group."""
    mod = load(name)
    gqa = modern_gpt(mod, n_kv_head=2, window=8, sink=2)
    mha = modern_gpt(mod, n_kv_head=0, window=8, sink=2, seed=1)
    C, hd, H = 32, 8, 4
    state = gqa.state_dict()
    for key, w in list(state.items()):
        if key.endswith("attn.c_attn.weight"):
            q, k, v = w.split([C, 2 * hd, 2 * hd])
            # (2 * hd, C) -> (2, hd, C) -> each kv head once per query head of its group
            rep = [t.view(2, hd, C).repeat_interleave(H // 2, 0).reshape(H * hd, C) for t in (k, v)]
            state[key] = torch.cat([q, *rep])
    mha.load_state_dict(state)
    idx = tokens((2, 24), seed=13)
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-5, rtol=1e-5)
        # a different grouping (head h reads kv head h % 2) gives different logits
        for key, w in list(state.items()):
            if key.endswith("attn.c_attn.weight"):
                q, k, v = gqa.state_dict()[key].split([C, 2 * hd, 2 * hd])
                state[key] = torch.cat([q, k.repeat(H // 2, 1), v.repeat(H // 2, 1)])
        mha.load_state_dict(state)
        assert (gqa(idx)[0] - mha(idx)[0]).abs().amax() > 1e-3


# ---------------------------------------------------------------------------------------
# 3.5 Sliding window and sink
# ---------------------------------------------------------------------------------------
def brute_mask(q_pos, k_pos, window, sink):
    out = torch.zeros(len(q_pos), len(k_pos), dtype=torch.bool)
    for i, qp in enumerate(q_pos):
        for j, kp in enumerate(k_pos):
            if kp > qp:
                continue
            if window == 0 or qp - kp < window or kp < sink:
                out[i, j] = True
    return out


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("window,sink", [(0, 0), (1, 0), (3, 0), (4, 1), (5, 2), (8, 3), (20, 2)])
def test_attention_mask_matches_brute_force(name, window, sink):
    mod = load(name)
    cases = [(list(range(12)), list(range(12))),  # training: the full square
             ([13, 14, 15], [0, 1, 2] + list(range(8, 16))),  # a rolling cache's entries
             ([30], [0, 1, 24, 25, 26, 27, 28, 29, 30])]
    for q_pos, k_pos in cases:
        got = mod.attention_mask(torch.tensor(q_pos), torch.tensor(k_pos), window, sink)
        assert got.dtype == torch.bool and got.shape == (len(q_pos), len(k_pos))
        assert torch.equal(got, brute_mask(q_pos, k_pos, window, sink)), (q_pos, k_pos)
    if window == 0:
        assert torch.equal(mod.attention_mask(torch.arange(7), torch.arange(7)),
                           torch.ones(7, 7, dtype=torch.bool).tril())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("flash", [True, False])
def test_window_covering_the_sequence_is_full_attention(name, flash):
    mod = load(name)
    full = modern_gpt(mod, flash=flash, window=0)
    idx = tokens((2, 20), seed=14)
    with torch.no_grad():
        want, _ = full(idx)
        for window, sink in ((20, 0), (32, 3), (100, 0)):
            wide = modern_gpt(mod, flash=flash, window=window, sink=sink, seed=5)
            wide.load_state_dict(full.state_dict())
            torch.testing.assert_close(wide(idx)[0], want, atol=1e-5, rtol=1e-5)
        narrow = modern_gpt(mod, flash=flash, window=4, seed=5)
        narrow.load_state_dict(full.state_dict())
        got = narrow(idx)[0]
    torch.testing.assert_close(got[:, :4], want[:, :4], atol=1e-5, rtol=1e-5)  # still in view
    assert (got[:, 4:] - want[:, 4:]).abs().amax(-1).min() > 1e-4  # beyond the window: differs


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("arch", [dict(window=6), dict(window=6, sink=2),
                                  dict(window=5, sink=1, n_kv_head=2), dict(n_kv_head=1),
                                  dict(window=3, pos="learned", norm="layernorm")])
def test_flash_and_explicit_paths_agree(name, arch):
    mod = load(name)
    fast = modern_gpt(mod, flash=True, **arch)
    slow = modern_gpt(mod, flash=False, seed=3, **arch)
    slow.load_state_dict(fast.state_dict())
    idx = tokens((2, 24), seed=15)
    with torch.no_grad():
        a, la = fast(idx, idx)
        b, lb = slow(idx, idx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("q_pos,k_pos", [(range(12), range(12)),  # training: the full square
                                         ([13, 14, 15], [0, 1, *range(9, 16)])])  # a rolling cache
def test_attention_weights_follow_the_window_and_sink(name, q_pos, k_pos):
    """attention() under attention_mask(window=4, sink=2): each query's weights are a
    distribution over exactly the keys the window and the sink let it see."""
    mod = load(name)
    q_pos, k_pos = torch.tensor(list(q_pos)), torch.tensor(list(k_pos))
    g = torch.Generator().manual_seed(16)
    q = torch.randn(1, 4, len(q_pos), 8, generator=g) * 2
    k, v = (torch.randn(1, 4, len(k_pos), 8, generator=g) * 2 for _ in range(2))
    mask = mod.attention_mask(q_pos, k_pos, 4, 2)
    allowed = brute_mask(q_pos.tolist(), k_pos.tolist(), 4, 2)
    assert torch.equal(mask, allowed)
    y, w = mod.attention(q, k, v, mask)
    assert w.shape == (1, 4, len(q_pos), len(k_pos))
    assert torch.all(w[..., ~allowed] == 0)
    assert torch.all(w[..., allowed] > 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, len(q_pos)), atol=1e-5, rtol=0)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               atol=1e-5, rtol=1e-5)
    # the sink and the window leave a gap: some earlier keys are out of sight
    assert (~allowed & (k_pos[None, :] <= q_pos[:, None])).any()


# ---------------------------------------------------------------------------------------
# 3.6 The rolling cache
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n_kv_head", [0, 2])
def test_rolling_cache_streams_like_a_full_windowed_forward(name, n_kv_head):
    mod = load(name)
    window, sink, T, B = 8, 2, 16, 2
    model = modern_gpt(mod, block_size=T, window=window, sink=sink, n_kv_head=n_kv_head)
    assert model.streams
    idx = tokens((B, 5 * T), seed=17)
    cache = model.new_cache()
    logits, sizes, entries = [], [], []
    with torch.no_grad():
        full, _ = model(idx)  # the reference: every position from scratch, windowed
        for t in range(5 * T):
            logits.append(model(idx[:, t:t + 1], cache=cache)[0])
            sizes.append(cache_bytes(mod, cache))
            entries.append(max(k.size(2) for k in cache.k))
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)
    # memory stops growing: at most sink + window (+1) entries per layer, however long
    kv = n_kv_head or 4
    assert max(entries) <= sink + window + 1
    assert max(sizes) <= 2 * 2 * B * kv * (sink + window + 1) * 8 * 4  # layers, k+v, fp32
    assert len(set(sizes[T:])) == 1 and sizes[0] < sizes[T]
    # the window matters: a model that sees everything gives other logits late in the stream
    wide = modern_gpt(mod, block_size=5 * T, n_kv_head=n_kv_head)
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (wide(idx)[0][:, -1] - full[:, -1]).abs().amax() > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_full_attention_cache_refuses_to_pass_the_context(name):
    mod = load(name)
    model = modern_gpt(mod, block_size=8)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens((1, 8)), cache=cache)
        with pytest.raises(ValueError):
            model(tokens((1, 1)), cache=cache)
        with pytest.raises(ValueError):
            model(tokens((1, 9)))


# ---------------------------------------------------------------------------------------
# 3.3 SwiGLU and the parameter formula
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n_embd", [128, 256, 384, 768])
def test_swiglu_width_matches_gelu_parameters(name, n_embd):
    mod = load(name)
    h = mod.swiglu_hidden(n_embd)
    assert h % 64 == 0 and h > 0
    cfg = modern_cfg(mod, n_embd=n_embd, n_head=4, bias=False)
    swiglu = sum(p.numel() for p in mod.SwiGLU(cfg).parameters())
    gelu = sum(p.numel() for p in mod.MLP(cfg).parameters())
    assert swiglu == 3 * n_embd * h and gelu == 8 * n_embd * n_embd
    assert abs(swiglu - gelu) / gelu < 0.15


@pytest.mark.parametrize("name", ALL)
def test_swiglu_is_gated_silu(name):
    mod = load(name)
    cfg = modern_cfg(mod, bias=True)
    m = perturb_(mod.SwiGLU(cfg), scale=0.3).eval()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(18))
    h = mod.swiglu_hidden(32)
    with torch.no_grad():
        hid = F.linear(x, m.c_fc.weight, m.c_fc.bias)
        gate, up = hid[..., :h], hid[..., h:]
        want = F.linear(gate * torch.sigmoid(gate) * up, m.c_proj.weight, m.c_proj.bias)
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


def modern_params(cfg, vocab_rows):
    """The parameter count of a part03-style GPT from its config, term by term: the tied
    embedding (vocab_rows x C), the learned position table, per block two norms, attention
    (q: C x C, k and v: C x kv each, out: C x C) and the MLP (GELU: C x 4C and 4C x C; SwiGLU:
    C x 2h and h x C, h = 8C/3 rounded to 64), the final norm. Biases where cfg.bias; RMSNorm
    has a gain and never a bias."""
    C, bias = cfg.n_embd, cfg.bias
    kv = (cfg.n_kv_head or cfg.n_head) * (C // cfg.n_head)
    norm = C if cfg.norm == "rmsnorm" else C + (C if bias else 0)
    attn = C * (C + 2 * kv) + C * C + (C + 2 * kv + C if bias else 0)
    if cfg.mlp == "gelu":
        mlp = 8 * C * C + (4 * C + C if bias else 0)
    else:
        h = max(64, 64 * round(8 * C / 3 / 64))
        mlp = 3 * C * h + (2 * h + C if bias else 0)
    pos = cfg.block_size * C if cfg.pos == "learned" else 0
    return vocab_rows * C + pos + cfg.n_layer * (2 * norm + attn + mlp) + norm


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_kv_head", [0, 1, 2])
def test_num_params_matches_formula(name, pos, norm, mlp, bias, n_kv_head):
    mod = load(name)
    cfg = modern_cfg(mod, pos=pos, norm=norm, mlp=mlp, bias=bias, n_kv_head=n_kv_head,
                     n_layer=3, n_embd=48, n_head=4, block_size=20, vocab_size=64)
    model = mod.GPT(cfg)
    n = model.num_params()
    assert n == sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    assert n == modern_params(cfg, vocab_rows=64)  # a multiple of 64: part04 pads to one


def test_num_params_by_hand():
    """One configuration counted by hand, apart from modern_params: the modern stack, 2 kv
    heads of 4, 50 embedding rows (part03 does not pad the vocabulary)."""
    mod = load("part03")
    C, L, V, h, kv = 48, 3, 50, mod.swiglu_hidden(48), 24
    cfg = modern_cfg(mod, n_layer=L, n_embd=C, n_head=4, n_kv_head=2, vocab_size=V)
    per_block = C * (C + 2 * kv) + C * C + 3 * C * h + 2 * C
    assert mod.GPT(cfg).num_params() == V * C + L * per_block + C


# ---------------------------------------------------------------------------------------
# Bad flags and the time budget
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("args", [["--n_head", "4", "--n_kv_head", "3"], ["--window", "-1"],
                                  ["--sink", "2"], ["--norm", "foo"], ["--mlp", "foo"],
                                  ["--pos", "foo"], ["--n_kv_head", "-2"]])
def test_bad_flags_exit_2(name, args, tmp_path, capsys):
    expect_flag_error(capsys, load(name), args, tmp_path)


@pytest.mark.parametrize("name", ALL)
def test_train_honours_max_seconds(name, tmp_path, shakespeare, monkeypatch):
    mod = load(name)
    cfg = modern_cfg(mod, block_size=32, vocab_size=256, batch_size=4, max_steps=10**7,
                   max_seconds=1.0, eval_interval=10**7, eval_iters=2, log_interval=10**7,
                   out_dir=str(tmp_path))
    data = np.frombuffer(open(shakespeare, "rb").read()[:200_000], dtype=np.uint8)
    train_data, val_data = mod.split_data(data)
    mod.set_seed(0)
    model = mod.GPT(cfg)
    t0 = time.perf_counter()
    get_batch = mod.get_batch

    def watched(*args, **kwargs):  # a loop that ignores the budget fails here, not never
        assert time.perf_counter() - t0 < 30, "train ran 30 s past a 1 s --max_seconds"
        return get_batch(*args, **kwargs)

    monkeypatch.setattr(mod, "get_batch", watched)
    result = mod.train(model, train_data, val_data, cfg, "cpu", torch.float32)
    wall = time.perf_counter() - t0
    assert 1 < result["steps"] < cfg.max_steps
    assert 1.0 <= wall < 15
    assert (tmp_path / "ckpt.pt").exists()  # the end of the budget still evaluates and saves
    assert math.isfinite(result["val_loss"])


# ---------------------------------------------------------------------------------------
# The milestone
# ---------------------------------------------------------------------------------------
TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32",
        "--batch_size", "8", "--eval_iters", "2", "--device", "cpu", "--dtype", "float32",
        "--num_samples", "1", "--max_new_tokens", "40"]


def test_milestone_summary_has_the_benchmarks(tmp_path, shakespeare, monkeypatch):
    mod = load("part03")
    orig = mod.kv_benchmark  # 1024 uncached tokens take too long for a test: 512 at most
    monkeypatch.setattr(mod, "kv_benchmark",
                        lambda cfg, device: orig(cfg, device, lengths=(64, 512)))
    out = tmp_path / "out"
    mod.main(TINY + ["--data", shakespeare, "--data_dir", str(tmp_path / "data"),
                     "--out_dir", str(out), "--max_steps", "40", "--eval_interval", "20",
                     "--learning_rate", "3e-3", "--window", "8", "--sink", "2"])
    s = read_summary(out)
    part02_keys = {"val_loss", "val_bpb", "train_loss", "final_val_loss", "tokens_per_s",
                   "wall_s", "steps", "data", "params", "device"}
    assert part02_keys <= set(s)
    assert s["steps"] == 40
    assert s["val_loss"] < math.log(256) - 0.5  # it learned something in 40 steps
    assert s["val_bpb"] == pytest.approx(s["val_loss"] / math.log(2))
    assert s["kv_speedup"] > 1  # the cache beats recomputation at 512 new tokens
    assert [r["new_tokens"] for r in s["kv_bench"]] == [64, 512]
    for r in s["kv_bench"]:
        assert r["speedup"] == pytest.approx(r["cached_tok_s"] / r["uncached_tok_s"])
    assert s["kv_speedup"] == s["kv_bench"][-1]["speedup"]
    stream = s["stream"]
    assert stream["window"] == 8 and stream["sink"] == 2
    assert stream["tokens"] == 10 * 32 and len(stream["cache_bytes"]) == 10
    assert len(set(stream["cache_bytes"][1:])) == 1  # constant: the cache stopped growing
    assert stream["cache_bytes"][-1] <= 2 * 2 * 4 * (8 + 2 + 1) * 8 * 4
    assert (out / "ckpt.pt").exists() and (out / "samples.txt").exists()


def test_milestone_ablation_table(tmp_path, shakespeare, monkeypatch):
    mod = load("part03")
    orig = mod.kv_benchmark
    monkeypatch.setattr(mod, "kv_benchmark", lambda cfg, device: orig(cfg, device, lengths=(8, 16)))
    out = tmp_path / "out"
    s = mod.main(TINY + ["--data", shakespeare, "--data_dir", str(tmp_path / "data"),
                         "--out_dir", str(out), "--ablate", "--ablate_seconds", "1",
                         "--eval_interval", "1000000"])
    assert read_summary(out)["ablation"] == s["ablation"]
    rows = s["ablation"]
    assert len(rows) == 5
    assert rows[0]["name"].startswith("baseline")
    for r in rows:
        assert {"name", "params", "tokens_per_s", "val_loss", "val_bpb"} <= set(r)
        assert r["tokens_per_s"] > 0 and math.isfinite(r["val_loss"])
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2))
    by_name = {r["name"]: r for r in rows}
    swiglu = next(r for r in rows if "SwiGLU" in r["name"])
    gqa = next(r for r in rows if "GQA" in r["name"])
    assert rows[0]["params"] != swiglu["params"]
    assert gqa["params"] < swiglu["params"]  # fewer key/value heads, fewer parameters
    assert len(by_name) == 5
    assert "kv_bench" in s and "stream" in s
