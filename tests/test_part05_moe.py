"""Part 05: Mixture-of-Experts. Top-k gating against its definition (float32 router, even
under autocast; the routing offsets pick experts but never enter the gates), dispatch and
combine against a naive per-token reference in float64, the grouped matmul against the loop
over experts, expert parallelism over processes against one process (the layer, then whole
training runs under torchrun, checkpoints and resume), the load-balancing loss and the
z-loss against their formulas, capacity drops, auxiliary-loss-free balancing, hybrid placement
(--moe_every), active parameters against the dense model, the router losses kept out of the LM loss,
gradients, flag errors, checkpoints of another shape, and the dense-vs-MoE milestone."""
import dataclasses
import gc
import math
import re
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (expect_exit_2, expect_flag_error, load, part_names, perturb_, read_metrics,
                      read_summary, run_flags, small_corpus, tiny_cfg, tiny_gpt, tokens, torchrun,
                      train_losses)

ALL = part_names(5)
HARNESS = part_names(5, 5)  # expert parallelism and --compare: part06 drops them (Replaces:)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for these tiny models: on a busy 2-core machine, OpenMP threads that
    wait for each other make every small op (index_add_, Adam's sqrt) take milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LESSON = 5
# An explicit small MoE (defaults may change in later parts), in conftest's tiny model of two heads.
MOE = dict(n_experts=4, moe_top_k=2, expert_hidden=0, moe_every=1, n_shared_experts=0,
           capacity_factor=0.0, aux_loss_coef=0.01, z_loss_coef=0.001, balance="aux")
moe_cfg = partial(tiny_cfg, lesson=LESSON, n_head=2, **MOE)
moe_gpt = partial(tiny_gpt, lesson=LESSON, n_head=2, **MOE)


def tiny_moe(mod, seed=0, **kw):
    """One MoE layer of moe_cfg, far from uniform routing (perturb_)."""
    torch.manual_seed(seed)
    return perturb_(mod.MoE(moe_cfg(mod, **kw)), seed)


def randn(*shape, seed=2, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def router_logits(moe, flat):
    """The router's logits as the lesson defines them: a bias-free linear map in float32."""
    return F.linear(flat.float(), moe.router.weight.float())


def reference_route(moe, flat):
    """Top-k by logits + routing offsets; gates = the router probabilities of the chosen
    experts, renormalized to sum to 1 when k > 1 (Switch, k = 1, keeps p)."""
    logits = router_logits(moe, flat)
    probs = logits.softmax(-1)
    chosen = torch.topk(logits + moe.expert_offset, moe.top_k, dim=-1).indices
    gate = probs.gather(1, chosen)
    if moe.top_k > 1:
        gate = gate / gate.sum(-1, keepdim=True)
    return chosen, gate


def swiglu_expert(moe, e, x):
    h = moe.w_in.shape[-1] // 2
    w_in = moe.w_in[e]
    return (F.silu(x @ w_in[:, :h]) * (x @ w_in[:, h:])) @ moe.w_out[e]


def shared_ref(moe, x):
    fc, proj = moe.shared.c_fc, moe.shared.c_proj
    h = proj.weight.shape[1]
    a = x @ fc.weight.T + (fc.bias if fc.bias is not None else 0)
    y = (F.silu(a[:, :h]) * a[:, h:]) @ proj.weight.T
    return y + (proj.bias if proj.bias is not None else 0)


def naive_moe(moe, flat, keep=None):
    """For each token, for each chosen expert e: gate * SwiGLU_e(x), summed (a loop over
    tokens, no sorting); `keep` (N, k) bool drops assignments; plus the shared experts.
    The routing is route()'s own (checked against its definition by the gate tests), so
    this reference holds whether the router runs in float32 or in the input's float64."""
    with torch.no_grad():
        chosen, gate = moe.route(flat)
    want_chosen, want_gate = reference_route(moe, flat)
    assert torch.equal(chosen, want_chosen)
    torch.testing.assert_close(gate.double(), want_gate.double(), atol=1e-6, rtol=0)
    out = torch.zeros_like(flat)
    for i in range(flat.size(0)):
        for j in range(moe.top_k):
            if keep is None or keep[i, j]:
                e = int(chosen[i, j])
                out[i] += gate[i, j].to(flat.dtype) * swiglu_expert(moe, e, flat[i:i + 1])[0]
    if moe.shared is not None:
        out = out + shared_ref(moe, flat)
    return out


def double_moe(moe):
    """The module in float64 for exact comparisons (route() still computes in float32)."""
    return moe.double()


# ---------------------------------------------------------------------------------------
# 5.1 Routing: top-k gates
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gates_are_router_probabilities_of_the_chosen_experts(name, k):
    mod = load(name)
    moe = tiny_moe(mod, moe_top_k=k)
    flat = randn(40, 32)
    with torch.no_grad():
        chosen, gate = moe.route(flat)
    logits = router_logits(moe, flat)
    probs = logits.softmax(-1)
    assert chosen.shape == gate.shape == (40, k)
    assert gate.dtype == torch.float32
    # the k largest logits, each expert at most once per token
    assert torch.equal(chosen.sort(-1).values, logits.topk(k, -1).indices.sort(-1).values)
    assert all(len(set(row)) == k for row in chosen.tolist())
    assert len(set(chosen[:, 0].tolist())) > 1  # not a degenerate router
    p = probs.gather(1, chosen)
    if k == 1:  # Switch: the gate is the probability itself, not renormalized to 1
        torch.testing.assert_close(gate, p, atol=1e-6, rtol=0)
        assert gate.max() < 0.999
    else:  # Mixtral: renormalized over the chosen experts
        torch.testing.assert_close(gate.sum(-1), torch.ones(40), atol=1e-6, rtol=0)
        torch.testing.assert_close(gate, p / p.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    assert (gate > 0).all()
    assert torch.equal(moe.counts, torch.bincount(chosen.flatten(), minlength=4))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 2])
def test_router_runs_in_float32_under_autocast(name, k):
    mod = load(name)
    moe = tiny_moe(mod, moe_top_k=k)
    flat = randn(64, 32)
    with torch.no_grad():
        chosen, gate = moe.route(flat)
        aux, z = moe.aux_loss.clone(), moe.z_loss.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            chosen_bf, gate_bf = moe.route(flat.bfloat16())  # the stream arrives in bf16
            y = moe(flat.bfloat16().view(4, 16, 32))
    assert gate_bf.dtype == torch.float32 and moe.z_loss.dtype == torch.float32
    # the same logits as a float32 router on the bf16-rounded input (a bf16 router differs)
    chosen_ref, gate_ref = reference_route(moe, flat.bfloat16())
    assert torch.equal(chosen_bf, chosen_ref)
    torch.testing.assert_close(gate_bf, gate_ref, atol=1e-6, rtol=0)
    logits_bf16 = F.linear(flat.bfloat16(), moe.router.weight.bfloat16()).float()
    assert (logits_bf16 - router_logits(moe, flat.bfloat16())).abs().max() > 1e-3  # bf16 would show
    # only the input's rounding separates it from the float32 run
    assert (chosen_bf != chosen).float().mean() < 0.1
    torch.testing.assert_close(gate_bf, gate, atol=0.05, rtol=0)
    assert math.isfinite(aux) and math.isfinite(z)
    assert y.shape == (4, 16, 32) and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 2])
def test_routing_offsets_pick_experts_but_not_gates(name, k):
    mod = load(name)
    moe = tiny_moe(mod, moe_top_k=k)
    flat = randn(50, 32)
    probs = router_logits(moe, flat).softmax(-1)
    moe.expert_offset.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))  # expert 3 always selected
    with torch.no_grad():
        chosen, gate = moe.route(flat)
    assert (chosen == 3).any(-1).all()
    assert moe.counts[3] == 50
    assert (probs.argmax(-1) != 3).sum() > 10  # the router itself prefers others
    p = probs.gather(1, chosen)  # the router's own probabilities of what was chosen
    if k == 1:
        torch.testing.assert_close(gate[:, 0], probs[:, 3], atol=1e-6, rtol=0)
        assert gate.min() < 0.5  # not softmax(logits + offset), which would be ~1
    else:
        torch.testing.assert_close(gate, p / p.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    # the losses see the router's probabilities, not the offset ones
    f = moe.counts.float() / chosen.numel()
    torch.testing.assert_close(moe.aux_loss, 4 * (f * probs.mean(0)).sum(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_moe_survives_a_dtype_cast(name, dtype):
    """GPT(...).double() (exact references) or .to(torch.bfloat16) (pure-bf16 inference)
    cast the router too; the router should still run in (at least) float32."""
    mod = load(name)
    moe = tiny_moe(mod)
    x = randn(2, 5, 32)
    with torch.no_grad():
        want = moe(x)
        chosen, gate = moe.route(x.view(-1, 32))
        moe.to(dtype)
        got = moe(x.to(dtype))
        chosen2, gate2 = moe.route(x.view(-1, 32).to(dtype))
    assert got.dtype == dtype and gate2.dtype in (torch.float32, torch.float64)
    tol = 1e-5 if dtype == torch.float64 else 0.1
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    if dtype == torch.float64:
        assert torch.equal(chosen2, chosen)
        torch.testing.assert_close(gate2.float(), gate, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------
# 5.2 Dispatch and combine
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shared", [0, 1, 2])
def test_dispatch_and_combine_equal_naive_reference(name, k, shared):
    mod = load(name)
    moe = double_moe(tiny_moe(mod, moe_top_k=k, n_shared_experts=shared))
    x = randn(3, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        y = moe(x)
        want = naive_moe(moe, x.view(-1, 32)).view(3, 7, 32)
    assert y.dtype == torch.float64 and y.shape == x.shape
    assert (moe.counts > 0).all()  # every expert ran on something
    assert moe.dropped == 0
    assert (y - want).abs().max() < 1e-10
    assert y.abs().max() > 1e-2
    if shared:  # the shared experts are one SwiGLU as wide as `shared` experts
        h = mod.expert_hidden(moe_cfg(mod, moe_top_k=k))
        assert moe.shared.c_fc.weight.shape == (2 * shared * h, 32)


@pytest.mark.parametrize("name", ALL)
def test_expert_shapes_and_default_width(name):
    mod = load(name)
    for k, h in ((1, 64), (2, 32), (4, 16)):  # swiglu_hidden(32) = 64, split over k experts
        cfg = moe_cfg(mod, moe_top_k=k)
        assert mod.swiglu_hidden(32) == 64 and mod.expert_hidden(cfg) == h
        moe = mod.MoE(cfg)
        assert moe.w_in.shape == (4, 32, 2 * h) and moe.w_out.shape == (4, h, 32)
        assert moe.router.weight.shape == (4, 32) and moe.router.bias is None
    assert mod.expert_hidden(moe_cfg(mod, moe_top_k=2, expert_hidden=24)) == 24
    assert mod.expert_hidden(moe_cfg(mod, n_embd=8, n_head=2, moe_top_k=4)) == 16  # floor of 16


@pytest.mark.parametrize("name", ALL)
def test_one_token_and_empty_experts(name):
    """A single token (decode) visits k experts; the other experts run on nothing."""
    mod = load(name)
    moe = double_moe(tiny_moe(mod, moe_top_k=2))
    x = randn(1, 1, 32, dtype=torch.float64)
    with torch.no_grad():
        y = moe(x)
    assert int((moe.counts > 0).sum()) == 2
    assert (y.view(1, 32) - naive_moe(moe, x.view(1, 32))).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------
# 5.2 Every expert in one grouped matmul
# ---------------------------------------------------------------------------------------
def forward_backward(moe, x, seed=3):
    """Output, input gradient and parameter gradients for a fixed random upstream gradient."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = moe(x)
    (y.float() * randn(*y.shape, seed=seed)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}


needs_grouped = pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="F.grouped_mm needs torch >= 2.10")


@needs_grouped
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k,cf,shared", [(1, 0.0, 0), (2, 0.0, 1), (2, 1.0, 0)])
def test_grouped_matmul_equals_the_loop_over_experts(name, k, cf, shared):
    mod = load(name)
    moe = tiny_moe(mod, moe_top_k=k, capacity_factor=cf, n_shared_experts=shared).train()
    moe.expert_offset[3] = -1e4  # expert 3 gets no token: an empty group
    x = randn(3, 7, 32)
    calls = []
    real = F.grouped_mm
    moe.grouped_mm = "true"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mod.F, "grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        y_g, gx_g, gp_g = forward_backward(moe, x)
    assert len(calls) == 2  # w_in, then w_out: no per-expert loop
    assert moe.counts[3] == 0 and (moe.dropped > 0) == (cf > 0)
    moe.grouped_mm = "false"
    y_l, gx_l, gp_l = forward_backward(moe, x)
    torch.testing.assert_close(y_g, y_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_g, gx_l, atol=1e-5, rtol=1e-5)
    for n in gp_l:
        torch.testing.assert_close(gp_g[n], gp_l[n], atol=1e-5, rtol=1e-5, msg=n)
    assert gp_g["w_in"][3].abs().max() == 0 and gp_g["w_in"].abs().max() > 0


@needs_grouped
@pytest.mark.parametrize("name", ALL)
def test_grouped_matmul_runs_in_bf16_under_autocast(name):
    mod = load(name)
    moe = tiny_moe(mod).train()
    x = randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.use_grouped(x, moe.matmul_dtype(x)) and moe.matmul_dtype(x) == torch.bfloat16
        y_g, _, gp_g = forward_backward(moe, x)
    moe.grouped_mm = "false"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_l, _, gp_l = forward_backward(moe, x)
    assert y_g.dtype == y_l.dtype == torch.float32  # the residual stream stays float32
    torch.testing.assert_close(y_g, y_l, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gp_g["w_out"], gp_l["w_out"], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", ALL)
def test_grouped_matmul_auto_choice(name):
    mod = load(name)
    moe = tiny_moe(mod)
    x32, x64 = randn(4, 32), randn(4, 32, dtype=torch.float64)
    have = hasattr(F, "grouped_mm")
    assert moe.use_grouped(x32, torch.float32) == have
    assert moe.use_grouped(x32, torch.bfloat16) == have
    assert not moe.use_grouped(x64, torch.float64)  # no float64 kernel: the loop
    assert not tiny_moe(mod, expert_hidden=20).use_grouped(x32, torch.float32)  # rows of 80 bytes
    moe.grouped_mm = "false"
    assert not moe.use_grouped(x32, torch.float32)
    with pytest.MonkeyPatch.context() as m:
        m.delattr(mod.F, "grouped_mm", raising=False)
        assert not tiny_moe(mod).use_grouped(x32, torch.float32)  # torch < 2.10: the loop


# ---------------------------------------------------------------------------------------
# 5.1 The load-balancing loss and the z-loss
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 2])
def test_aux_and_z_loss_match_their_formulas(name, k):
    mod = load(name)
    moe = tiny_moe(mod, moe_top_k=k)
    flat = randn(48, 32, seed=5)
    chosen, _ = moe.route(flat)
    logits = router_logits(moe, flat)
    f = torch.bincount(chosen.flatten(), minlength=4).float() / (48 * k)
    P = logits.softmax(-1).mean(0)
    torch.testing.assert_close(moe.aux_loss, 4 * (f * P).sum(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(moe.z_loss, torch.logsumexp(logits, -1).pow(2).mean(), atol=1e-5, rtol=1e-6)
    assert moe.z_loss > 0.1 and abs(moe.aux_loss.item() - 1) > 1e-3
    # P is differentiable (f is not): the router gets a gradient from the aux loss alone
    moe.aux_loss.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().max() > 0
    assert moe.w_in.grad is None


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_is_one_when_balanced(name, k):
    mod = load(name)
    moe = tiny_moe(mod, moe_top_k=k)
    # token group e points at expert e first and expert e+1 second: a cyclic, even routing
    E, n = 4, 6
    w = torch.zeros(E, 32)
    w[torch.arange(E), torch.arange(E)] = 1.0
    x = torch.zeros(E * n, 32)
    for e in range(E):
        x[e * n:(e + 1) * n, e] = 3.0
        x[e * n:(e + 1) * n, (e + 1) % E] = 1.5
    x += randn(E * n, 32, seed=3) * 0.05
    with torch.no_grad():
        moe.router.weight.copy_(w)
        moe.route(x)
    assert moe.counts.tolist() == [n * k] * E
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-2)
    # uniform probabilities (zero router weights): 1 whatever the selection
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.route(randn(20, 32))
    assert moe.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_aux_loss_grows_when_routing_collapses(name):
    mod = load(name)
    moe = tiny_moe(mod, moe_top_k=1)
    x = randn(32, 32) * 0.1
    x[:, 0] = 10.0
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token: logit 100 for expert 0, 0 for the rest
        moe.route(x)
    assert moe.counts.tolist() == [32, 0, 0, 0]
    assert moe.aux_loss.item() == pytest.approx(4.0, abs=1e-3)  # = n_experts
    # top-2: half the assignments on expert 0, whose probability is ~1 -> E / 2
    moe.top_k = 2
    with torch.no_grad():
        moe.route(x)
    assert moe.counts[0] == 32
    assert moe.aux_loss.item() == pytest.approx(2.0, abs=1e-3)


# ---------------------------------------------------------------------------------------
# 5.2 Capacity
# ---------------------------------------------------------------------------------------
def kept_assignments(chosen, capacity, E):
    """Each expert keeps its first `capacity` assignments in token order."""
    keep = torch.zeros_like(chosen, dtype=torch.bool)
    seen = [0] * E
    for i in range(chosen.size(0)):
        for j in range(chosen.size(1)):
            e = int(chosen[i, j])
            keep[i, j] = seen[e] < capacity
            seen[e] += 1
    return keep


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k,cf", [(1, 1.0), (2, 0.5), (2, 1.0), (2, 1.25)])
def test_capacity_drops_overflow(name, k, cf):
    mod = load(name)
    moe = double_moe(tiny_moe(mod, moe_top_k=k, capacity_factor=cf, n_shared_experts=0))
    with torch.no_grad():
        moe.router.weight[0] += 0.2  # skewed toward expert 0: it overflows
    x = randn(2, 16, 32, dtype=torch.float64, seed=7) + 0.3
    flat = x.view(-1, 32)
    with torch.no_grad():
        y = moe(x).view(-1, 32)
    chosen, _ = reference_route(moe, flat)
    counts = torch.bincount(chosen.flatten(), minlength=4)
    capacity = math.ceil(cf * 32 * k / 4)
    want_dropped = int((counts - capacity).clamp(min=0).sum())
    assert want_dropped > 0 and (counts > 0).sum() >= 3, counts  # overflow, not collapse
    assert moe.dropped == want_dropped
    assert torch.equal(moe.counts, counts)  # counts are assignments before dropping
    keep = kept_assignments(chosen, capacity, 4)
    assert int((~keep).sum()) == want_dropped
    assert (y - naive_moe(moe, flat, keep)).abs().max() < 1e-10


@pytest.mark.parametrize("name", ALL)
def test_fully_dropped_tokens_pass_through(name):
    mod = load(name)
    moe = double_moe(tiny_moe(mod, moe_top_k=2, capacity_factor=1.0))
    moe.expert_offset.copy_(torch.tensor([50.0, 50.0, 0.0, 0.0]))  # every token picks 0 and 1
    x = randn(2, 8, 32, dtype=torch.float64, seed=8)  # 16 tokens, 32 assignments, capacity 8
    with torch.no_grad():
        y = moe(x)
    assert moe.counts.tolist() == [16, 16, 0, 0]
    assert moe.dropped == 16
    assert torch.equal(y[1], torch.zeros(8, 32, dtype=torch.float64))  # tokens 8..15: nothing
    assert (y[0].abs().sum(-1) > 1e-3).all()  # tokens 0..7 kept both experts
    keep = kept_assignments(moe.route(x.view(-1, 32))[0], 8, 4)
    assert (y.view(-1, 32) - naive_moe(moe, x.view(-1, 32), keep)).abs().max() < 1e-10

    # in a block: the residual stream of a dropped token gets the attention part only
    torch.manual_seed(0)
    block = perturb_(mod.Block(moe_cfg(mod, moe_top_k=2, capacity_factor=1.0), layer=0)).eval()
    assert isinstance(block.mlp, mod.MoE)
    block.mlp.expert_offset.copy_(torch.tensor([50.0, 50.0, 0.0, 0.0]))
    xb = randn(2, 8, 32, seed=9)
    with torch.no_grad():
        after_attn = xb + block.attn(block.ln_1(xb))
        out = block(xb)
    assert torch.equal(out[1], after_attn[1])
    assert (out[0] - after_attn[0]).abs().max() > 1e-3

    # dropless (0) and a roomy capacity (4 x 32 / 4 = 32 slots) drop nothing
    for cf in (0.0, 4.0):
        moe = double_moe(tiny_moe(mod, moe_top_k=2, capacity_factor=cf))
        moe.expert_offset.copy_(torch.tensor([50.0, 50.0, 0.0, 0.0]))
        with torch.no_grad():
            y2 = moe(x)
        assert moe.dropped == 0
        assert (y2.view(-1, 32) - naive_moe(moe, x.view(-1, 32))).abs().max() < 1e-10
        assert (y2[1].abs().sum(-1) > 1e-3).all()
        assert torch.equal(y2[0], y[0])  # the kept tokens are untouched by the capacity


# ---------------------------------------------------------------------------------------
# 5.1 Auxiliary-loss-free balancing
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_update_offsets_moves_toward_underused_experts(name):
    mod = load(name)
    moe = tiny_moe(mod)
    moe.counts = torch.tensor([10, 0, 2, 4])  # mean 4
    moe.expert_offset.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))
    moe.update_offsets(0.1)
    torch.testing.assert_close(moe.expert_offset, torch.tensor([0.4, 0.1, 0.1, 0.0]), atol=1e-7, rtol=0)
    assert not moe.expert_offset.requires_grad


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 2])
def test_offset_balancing_reduces_max_load(name, k):
    mod = load(name)
    moe = tiny_moe(mod, moe_top_k=k)
    with torch.no_grad():
        moe.router.weight[0] += 0.2  # expert 0 is everyone's favourite
    flat = randn(128, 32, seed=11) + 0.5
    shares = []
    with torch.no_grad():
        for _ in range(50):
            moe.route(flat)
            share = moe.counts.float() / moe.counts.sum()
            shares.append((share.min().item(), share.max().item()))
            moe.update_offsets(0.1)
    first, last = shares[0], shares[-10:]
    assert first[1] > 0.4 and first[0] < 0.1  # skewed at the start (max share 1/k)
    assert max(s[1] for s in last) < min(0.3, first[1] - 0.1)
    assert min(s[0] for s in last) > 0.2  # the starved expert gets its share
    assert moe.expert_offset[0] < 0 and moe.expert_offset[1:].max() > 0


# ---------------------------------------------------------------------------------------
# 5.4 Hybrid placement, parameter counts, the router loss, gradients
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("every,n_experts,want", [(2, 4, [0, 1, 0, 1]), (1, 4, [1, 1, 1, 1]),
                                                  (3, 4, [0, 0, 1, 0]), (4, 4, [0, 0, 0, 1]),
                                                  (5, 4, [0, 0, 0, 0]), (1, 0, [0, 0, 0, 0])])
def test_moe_every_places_moe_blocks(name, every, n_experts, want):
    mod = load(name)
    model = mod.GPT(moe_cfg(mod, n_layer=4, moe_every=every, n_experts=n_experts))
    got = [int(isinstance(b.mlp, mod.MoE)) for b in model.h]
    assert got == want
    assert model.moe_layers() == [b.mlp for b in model.h if isinstance(b.mlp, mod.MoE)]
    for b in model.h:
        if not isinstance(b.mlp, mod.MoE):
            assert isinstance(b.mlp, mod.SwiGLU)
    if not any(want):
        assert model.active_params() == model.num_params()
        assert float(model.router_loss()) == 0.0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k,every,shared,eh", [(1, 1, 0, 0), (2, 1, 0, 0), (2, 2, 0, 0), (4, 1, 0, 0),
                                               (2, 1, 1, 0), (3, 1, 0, 24), (2, 3, 2, 40)])
def test_active_params(name, k, every, shared, eh):
    mod = load(name)
    C, L, E = 32, 3, 4
    cfg = moe_cfg(mod, n_layer=L, moe_top_k=k, moe_every=every, n_shared_experts=shared,
                   expert_hidden=eh)
    model = mod.GPT(cfg)
    dense = mod.GPT(dataclasses.replace(cfg, n_experts=0))
    h, hd = mod.expert_hidden(cfg), mod.swiglu_hidden(C)
    n_moe = len([i for i in range(L) if i % every == every - 1])
    assert len(model.moe_layers()) == n_moe
    per_expert = 3 * C * h
    # total: the dense model with each MoE block's MLP swapped for router + experts + shared
    assert model.num_params() == dense.num_params() + n_moe * (C * E + E * per_expert
                                                               + shared * per_expert - 3 * C * hd)
    assert model.active_params() == model.num_params() - n_moe * (E - k) * per_expert
    # FLOPs per token follow the active parameters
    assert model.flops_per_token() - dense.flops_per_token() == \
        6 * (model.active_params() - dense.num_params())
    if not eh and not shared:  # the default width: a token's MLP matches the dense one
        active_mlp_diff = model.active_params() - n_moe * C * E - dense.num_params()
        if hd % k == 0:
            assert active_mlp_diff == 0
        else:
            assert abs(active_mlp_diff) <= n_moe * 3 * C * k


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 2])
def test_router_losses_stay_out_of_the_lm_loss(name, k):
    """forward() returns the language-model loss alone, in training as in evaluation, so the
    logged training and validation curves compare; router_loss() is what training adds."""
    mod = load(name)
    model = moe_gpt(mod, moe_top_k=k, n_layer=3, moe_every=1, aux_loss_coef=0.5, z_loss_coef=0.1)
    idx, tgt = tokens((4, 16), seed=3), tokens((4, 16), seed=4)
    model.train()
    logits, train_loss = model(idx, tgt)
    rl = model.router_loss()
    by_hand = sum(0.5 * m.aux_loss + 0.1 * m.z_loss for m in model.moe_layers())
    ce = F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1))
    torch.testing.assert_close(train_loss, ce, atol=1e-6, rtol=0)
    assert rl.item() > 0.1
    torch.testing.assert_close(rl, by_hand, atol=1e-6, rtol=0)
    figures = model.router_figures()
    moes = model.moe_layers()
    assert figures["aux_loss"].item() == pytest.approx(sum(m.aux_loss.item() for m in moes) / 3)
    assert figures["z_loss"].item() == pytest.approx(sum(m.z_loss.item() for m in moes) / 3)
    model.eval()
    with torch.no_grad():
        _, eval_loss = model(idx, tgt)
    torch.testing.assert_close(eval_loss, ce.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_aux_free_balancing_adds_no_switch_loss(name):
    """--balance aux_free (DeepSeek-V3) balances with the routing offsets alone: whatever
    aux_loss_coef says, the training loss holds the z-loss and no Switch term."""
    mod = load(name)
    for balance in ("aux", "aux_free"):
        model = moe_gpt(mod, n_layer=2, moe_every=1, aux_loss_coef=0.5, z_loss_coef=0.1,
                         balance=balance).train()
        model(tokens((4, 16), seed=3))
        z_only = sum(0.1 * m.z_loss for m in model.moe_layers())
        aux = sum(0.5 * m.aux_loss for m in model.moe_layers())
        assert aux.item() > 0.5
        want = z_only if balance == "aux_free" else z_only + aux
        torch.testing.assert_close(model.router_loss(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k,shared,aux", [(1, 0, 0.0), (2, 0, 0.0), (2, 1, 0.01), (1, 1, 0.01)])
def test_every_parameter_gets_a_gradient(name, k, shared, aux):
    """With aux_loss_coef = z_loss_coef = 0 the router still learns: its gradient comes
    through the gates (Switch's p for k = 1, renormalized gates for k = 2)."""
    mod = load(name)
    model = moe_gpt(mod, moe_top_k=k, n_shared_experts=shared, aux_loss_coef=aux,
                     z_loss_coef=aux / 10, moe_every=1).train()
    idx, tgt = tokens((4, 16), seed=5), tokens((4, 16), seed=6)
    _, loss = model(idx, tgt)
    (loss + model.router_loss()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, pname
    for moe in model.moe_layers():
        assert moe.router.weight.grad.abs().max() > 1e-8
        for e in range(4):
            used = bool(moe.counts[e] > 0)
            assert (moe.w_in.grad[e].abs().max() > 0) == used
            assert (moe.w_out.grad[e].abs().max() > 0) == used
        assert (moe.counts > 0).sum() >= 3


@pytest.mark.parametrize("name", ALL)
def test_cached_generation_with_moe_equals_uncached(name):
    mod = load(name)
    model = moe_gpt(mod, n_shared_experts=1, moe_every=2)
    prompt = tokens((3, 5))
    a = mod.generate(model, prompt, 11, temperature=0, use_cache=True)
    b = mod.generate(model, prompt, 11, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    assert len(set(a[:, 5:].flatten().tolist())) > 3


@pytest.mark.parametrize("name", ALL)
def test_compiled_moe_does_not_recompile_as_routing_changes(name, monkeypatch):
    """compile_model leaves the loop over experts (sizes change with the routing) eager; the
    rest compiles once. The `eager` backend traces as torch.compile does, without codegen."""
    mod = load(name)
    model = moe_gpt(mod, grouped_mm="false").train()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real_compile(m, backend="eager"))
    compiled = mod.compile_model(model)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(4):  # new tokens: new expert counts
            x = tokens((2, 16), seed)
            loss = compiled(x, x)[1]
            torch.testing.assert_close(loss, model(x, x)[1])
            loss.backward()
    torch._dynamo.reset()


@needs_grouped
@pytest.mark.parametrize("name", ALL)
def test_grouped_moe_model_compiles_to_one_graph(name):
    """With the grouped matmul (bf16, dropless) no size in an MoE layer depends on the
    routing, so torch.compile traces the whole model, router losses included, as one graph.
    (torch.bincount for the expert counts broke the graph at every MoE layer.)"""
    mod = load(name)
    model = moe_gpt(mod, grouped_mm="true", n_layer=2, moe_every=1).train()
    x = tokens((2, 16))

    def loss(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, x)[1] + model.router_loss()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(x)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", ALL)
def test_router_losses_reach_the_router_through_the_compiled_model(name, monkeypatch):
    """The router losses are tensors the compiled forward leaves on the MoE layers; training
    adds model.router_loss() to the compiled model's loss. Through AOTAutograd (the
    `aot_eager` backend: torch.compile's autograd graphs, without codegen) the router's
    gradient of that sum equals the eager one, and the router losses are part of it."""
    mod = load(name)
    model = moe_gpt(mod, grouped_mm="false", aux_loss_coef=0.5, z_loss_coef=0.1).train()
    x, y = tokens((2, 16), seed=7), tokens((2, 16), seed=8)

    def router_grads(run, with_router_loss=True):
        model.zero_grad(set_to_none=True)
        loss = run(x, y)[1]
        (loss + model.router_loss() if with_router_loss else loss).backward()
        return [moe.router.weight.grad.clone() for moe in model.moe_layers()]

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real_compile(m, backend="aot_eager"))
    torch._dynamo.reset()
    compiled = router_grads(mod.compile_model(model))
    torch._dynamo.reset()
    eager, lm_only = router_grads(model), router_grads(model, with_router_loss=False)
    assert len(eager) == 2
    for c, e, lm in zip(compiled, eager, lm_only):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-5)
        assert (e - lm).abs().max() > 0.1 * e.abs().max()  # the router losses' share is real


# ---------------------------------------------------------------------------------------
# 5.3 Expert parallelism: processes that each hold some experts against one that holds all
# ---------------------------------------------------------------------------------------
EP_CASES = {  # name: (world, MoE config, dtype, tolerance)
    "top2": (2, dict(moe_top_k=2), torch.float64, 1e-10),
    "switch+shared": (2, dict(moe_top_k=1, n_shared_experts=1), torch.float64, 1e-10),
    "all to rank 0": (2, dict(moe_top_k=2), torch.float64, 1e-10),  # rank 1's experts get nothing
    "one expert per rank": (4, dict(moe_top_k=2), torch.float64, 1e-10),
    "grouped matmul": (2, dict(moe_top_k=2, grouped_mm="true"), torch.float32, 1e-5),
}


def ep_layer(mod, case):
    """The layer of a case, the same on every process (same seed), and its input and
    upstream gradient for the whole batch (rank r takes chunk r of the batch)."""
    world, kw, dtype, _ = EP_CASES[case]
    moe = tiny_moe(mod, **kw).to(dtype).train()
    if case == "all to rank 0":
        moe.expert_offset[:2] = 1e4
    return moe, randn(4, 8, 32, dtype=dtype), randn(4, 8, 32, seed=3, dtype=dtype)


def ep_worker(rank, world, store, name, case, out):
    """One process of the expert-parallel layer: forward and backward on its chunk of the
    batch, then everything rank 0 needs to compare with the single-process layer. The
    processes meet through a file: no port to pick."""
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mod = load(name)
    moe, x, upstream = ep_layer(mod, case)
    mod.shard_experts(moe, rank, world)
    x = x.chunk(world)[rank].clone().requires_grad_()
    y = moe(x)
    (y * upstream.chunk(world)[rank]).sum().backward()

    def gathered(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    grads = {}
    for n, p in moe.named_parameters():
        if getattr(p, "expert_shard", False):  # no token reached them: no gradient (train() fills in 0)
            assert p.shape[0] == moe.n_experts // world
            grads[n] = gathered(p.grad if p.grad is not None else torch.zeros_like(p))
        else:  # replicated: what DDP would do, the mean over the ranks
            dist.all_reduce(p.grad)
            grads[n] = p.grad / world
    result = {"y": gathered(y.detach()), "x_grad": gathered(x.grad), "grads": grads,
              "bytes": gathered(torch.tensor([moe.bytes_sent]))}
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()  # free the process group before Python shuts down (a gloo thread may still hold tensors)


@pytest.mark.parametrize("name", HARNESS)
@pytest.mark.parametrize("case", list(EP_CASES))
def test_expert_parallel_layer_equals_one_process(name, case, tmp_path):
    """Forward and backward of the layer over processes that exchange tokens with
    all_to_all_single (gloo; uneven splits, empty ones too) equal the single-process layer
    on the whole batch, whose loss is the mean of the ranks' losses."""
    world, kw, dtype, tol = EP_CASES[case]
    if kw.get("grouped_mm") and not hasattr(F, "grouped_mm"):
        pytest.skip("F.grouped_mm needs torch >= 2.10")
    out = tmp_path / "ep.pt"
    torch.multiprocessing.spawn(ep_worker, args=(world, str(tmp_path / "store"), name, case, str(out)),
                                nprocs=world)
    ep = torch.load(out, weights_only=True)

    mod = load(name)
    moe, x, upstream = ep_layer(mod, case)
    x.requires_grad_()
    y = moe(x)
    ((y * upstream).sum() / world).backward()
    assert (y.detach() - ep["y"]).abs().max() < tol * y.abs().max()
    assert (x.grad * world - ep["x_grad"]).abs().max() < tol * ep["x_grad"].abs().max()
    assert set(ep["grads"]) == {n for n, _ in moe.named_parameters()}
    for n, p in moe.named_parameters():
        rel = max(tol, 1e-6) if n.startswith("router") else tol  # the router computes in float32
        assert (p.grad - ep["grads"][n]).abs().max() <= rel * p.grad.abs().max(), n
    # the bytes each rank sent: its rows bound for other ranks' experts, and the outputs
    # it computed for other ranks' rows, one row of 32 values each
    chosen, _ = moe.route(x.detach().view(-1, 32))
    n_local = moe.n_experts // world
    home = torch.arange(chosen.size(0)).repeat_interleave(chosen.size(1)) // (chosen.size(0) // world)
    owner = chosen.flatten() // n_local
    for r in range(world):
        rows = int(((home == r) & (owner != r)).sum() + ((home != r) & (owner == r)).sum())
        assert ep["bytes"][r] == rows * 32 * x.element_size(), r
    if case == "all to rank 0":
        assert (owner == 0).all() and ep["grads"]["w_in"][2:].abs().max() == 0
    else:
        assert ep["bytes"].min() > 0


EP_RUN = dict(tokenizer="byte", n_layer=2, n_experts=4, moe_top_k=2, batch_size=4, max_steps=6,
              eval_interval=3, log_interval=1, warmup_steps=2, ckpt_interval=3,
              aux_loss_coef=0.0, balance="aux_free", balance_rate=0.01)  # aux loss: a per-rank product of means


def test_expert_parallel_training_equals_one_process(shakespeare, tmp_path, monkeypatch):
    """Two torchrun processes with --expert_parallel (DDP for the rest of the model, expert
    gradients kept out of it and scaled, the global gradient norm for clipping, the offsets
    balanced on the global load) train loss for loss like one process; the checkpoint holds
    every expert and its Adam moments; a run resumed from one process's checkpoint goes on
    exactly; and the bytes sent per step are reported."""
    mod = load("part05")
    data = small_corpus(tmp_path, shakespeare)
    real_save = mod.save_checkpoint

    def save_and_keep_step_3(path, ckpt):
        real_save(path, ckpt)
        if path.endswith("ckpt.pt") and ckpt["step"] == 3:
            real_save(str(tmp_path / "step3.pt"), ckpt)

    monkeypatch.setattr(mod, "save_checkpoint", save_and_keep_step_3)
    single = mod.main(run_flags(tmp_path, data, out="one", **EP_RUN))
    r = torchrun("part05_moe", run_flags(tmp_path, data, out="ep", expert_parallel=True, **EP_RUN))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "each of 2 processes holds 2 of the 4 experts" in r.stdout
    assert re.search(r"a2a bytes per step \d{1,3}(,\d{3})+ \|", r.stdout)
    ep = read_summary(tmp_path / "ep")
    assert ep["expert_parallel"] and not single["expert_parallel"]
    assert ep["a2a_bytes_per_step"] > 0 and single["a2a_bytes_per_step"] is None
    assert ep["params"] == single["params"]  # the sampled model was rebuilt whole
    lo, le = train_losses(tmp_path / "one"), train_losses(tmp_path / "ep")
    assert sorted(lo) == sorted(le) == list(range(1, 7)) and abs(lo[6] - lo[1]) > 1e-3
    for step in lo:
        assert le[step] == pytest.approx(lo[step], abs=1e-5), step
    assert ep["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)

    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "ep" / "ckpt.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(k.endswith("expert_offset") and a["model"][k].abs().max() > 0 for k in a["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][i][k], v, atol=1e-6, rtol=1e-4)

    (tmp_path / "resumed").mkdir()
    (tmp_path / "step3.pt").rename(tmp_path / "resumed" / "ckpt.pt")
    r = torchrun("part05_moe", run_flags(tmp_path, data, out="resumed", resume=True,
                                         expert_parallel=True, **EP_RUN))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    lr = train_losses(tmp_path / "resumed")
    assert sorted(lr) == [4, 5, 6]
    for step in lr:
        assert lr[step] == pytest.approx(lo[step], abs=1e-5), step


# ---------------------------------------------------------------------------------------
# Flags and checkpoints
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("args", [["--n_experts", "4", "--moe_top_k", "5"],
                                  ["--n_experts", "4", "--moe_top_k", "0"],
                                  ["--capacity_factor", "-1"], ["--balance", "foo"],
                                  ["--moe_every", "0"], ["--compare", "--n_experts", "0"],
                                  ["--n_experts", "-1"], ["--n_shared_experts", "-1"],
                                  ["--expert_hidden", "-2"], ["--balance_rate", "-0.1"],
                                  ["--aux_loss_coef", "-1"], ["--z_loss_coef", "-1"],
                                  ["--expert_parallel", "true", "--n_experts", "0"],
                                  ["--grouped_mm", "fast"]])
def test_bad_flags_exit_2(name, args, tmp_path, capsys):
    expect_flag_error(capsys, load(name), args, tmp_path)


@pytest.mark.parametrize("name", ALL)
def test_good_moe_flags_pass_validation(name):
    mod = load(name)
    harness = [["--compare"], ["--expert_parallel", "true"]] if name in HARNESS else []
    for args in (["--n_experts", "4", "--moe_top_k", "4"], ["--n_experts", "0", "--moe_top_k", "9"],
                 ["--capacity_factor", "0"], ["--balance", "aux_free"], ["--moe_every", "3"],
                 ["--grouped_mm", "false"], *harness):
        mod.validate(mod.parse_args(args))  # no SystemExit


@pytest.mark.parametrize("name", ALL)
def test_grouped_mm_true_without_the_kernel_exits_2(name, capsys, monkeypatch):
    mod = load(name)
    monkeypatch.delattr(mod.F, "grouped_mm", raising=False)
    err = expect_exit_2(capsys, mod.validate, mod.parse_args(["--grouped_mm", "true"]))
    assert "torch >= 2.10" in err
    mod.validate(mod.parse_args(["--grouped_mm", "auto"]))  # auto falls back to the loop


def test_expert_parallel_needs_experts_divisible_by_world(shakespeare, tmp_path):
    data = small_corpus(tmp_path, shakespeare)
    r = torchrun("part05_moe", run_flags(tmp_path, data, out="ep", expert_parallel=True,
                                         **{**EP_RUN, "n_experts": 3}))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("--n_experts 3 must be divisible by the 2" in e for e in errors), r.stderr[-3000:]
    assert not (tmp_path / "ep" / "ckpt.pt").exists()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("field,value", [("n_experts", 8), ("moe_top_k", 1), ("expert_hidden", 24),
                                         ("moe_every", 2), ("n_shared_experts", 1)])
def test_checkpoint_of_another_moe_shape_is_refused(name, field, value, tmp_path, capsys):
    mod = load(name)
    cfg = moe_cfg(mod)
    path = str(tmp_path / "ckpt.pt")
    model = mod.GPT(cfg)
    mod.save_checkpoint(path, {"model": model.state_dict(), "config": dataclasses.asdict(cfg),
                               "step": 1, "val_loss": 1.0})
    assert mod.load_checkpoint(path, cfg, "cpu")["step"] == 1
    with pytest.raises(SystemExit) as e:
        mod.load_checkpoint(path, dataclasses.replace(cfg, **{field: value}), "cpu")
    assert e.value.code == 2
    assert f"--{field}" in capsys.readouterr().err
    # the routing offsets are state: it travels with the weights
    assert any(k.endswith("expert_offset") for k in model.state_dict())


# ---------------------------------------------------------------------------------------
# Training and the milestone
# ---------------------------------------------------------------------------------------
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "16",
        "--batch_size", "8", "--n_experts", "4", "--moe_top_k", "2", "--device", "cpu",
        "--dtype", "float32", "--tokenizer", "byte", "--num_samples", "1",
        "--max_new_tokens", "4", "--warmup_steps", "5", "--learning_rate", "3e-3"]


@pytest.mark.parametrize("name", HARNESS)
def test_expert_load_reports_shares(name, shakespeare):
    mod = load(name)
    cfg = moe_cfg(mod, vocab_size=256, batch_size=8, capacity_factor=1.0, moe_every=1)
    model = moe_gpt(mod, vocab_size=256, capacity_factor=1.0).train()
    data = np.frombuffer(open(shakespeare, "rb").read()[:20_000], dtype=np.uint8)
    layers = mod.expert_load(model, data, cfg, "cpu", torch.float32)
    assert len(layers) == len(model.moe_layers()) == 2
    assert model.training
    for row, moe in zip(layers, model.moe_layers()):
        share = moe.counts.float() / moe.counts.sum()
        assert moe.counts.sum() == 8 * 16 * 2
        assert row["min"] == pytest.approx(share.min().item())
        assert row["max"] == pytest.approx(share.max().item())
        assert row["min"] < row["max"]  # a perturbed router does not spread tokens evenly
        assert row["dropped"] == pytest.approx(moe.dropped / (8 * 16 * 2))
    assert any(r["dropped"] > 0 for r in layers)  # a perturbed router overflows capacity 1.0


def test_milestone_compare(tmp_path, shakespeare):
    """The milestone's table, from a 30-step run of each model. Its figure, the MoE's lower
    validation loss at the same active parameters, is a small gap that opens late (README:
    1.5997 vs 1.6265 nats/byte after 2,000 steps), and a short run cannot show it: after 30
    steps both models have learned the byte statistics that embeddings and attention carry,
    and an MoE whose experts output zeros scores within 0.05 of a working one. Run for 400
    steps (~2.5 s each), the MoE led on 7 seeds of 8, the dense minus the MoE loss ranging
    from -0.05 to +0.39: a weighted coin, not a test. So this checks what 30 steps can: both
    models learned (5.55 nats at the start, 3.75-4.3 after 30 steps over 12 seeds), and the
    MoE is not far behind (at worst 0.17 above the dense loss over those seeds; router-loss
    coefficients 1000 times too large put it 0.48 above at this seed: the bound is 0.3)."""
    mod = load("part05")
    out = tmp_path / "out"
    s = mod.main(TINY + ["--compare", "--data", shakespeare, "--data_dir", str(tmp_path / "data"),
                         "--out_dir", str(out), "--max_steps", "30", "--eval_interval", "15",
                         "--eval_iters", "2"])
    assert read_summary(out) == s
    rows = s["compare"]
    assert set(rows) == {"dense", "moe"}
    keys = {"total_params", "active_params", "tokens_per_s", "val_loss", "val_bpb", "load_min",
            "load_max", "dropped_pct"}
    for r in rows.values():
        assert keys <= set(r)
        assert r["tokens_per_s"] > 0 and r["steps"] == 30
        assert math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(256) - 1.0
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / s["bytes_per_token"])
    dense, moe = rows["dense"], rows["moe"]
    assert moe["val_loss"] < dense["val_loss"] + 0.3
    assert dense["total_params"] == dense["active_params"]
    assert dense["load_min"] is None and dense["layers"] == [] and dense["dropped_pct"] == 0
    assert moe["total_params"] > dense["total_params"]
    assert moe["active_params"] == pytest.approx(dense["active_params"], rel=0.02)
    assert moe["load_min"] == min(layer["min"] for layer in moe["layers"])
    assert moe["load_max"] == max(layer["max"] for layer in moe["layers"])
    assert moe["load_min"] > 0  # the balancing loss kept every expert in use
    assert moe["load_max"] < 1 and len(moe["layers"]) == 2
    assert moe["dropped_pct"] == 0  # dropless by default
    assert (out / "compare" / "dense").is_dir() and (out / "compare" / "moe").is_dir()


@pytest.mark.parametrize("extra,aux_free", [([], False),
                                        (["--balance", "aux_free", "--balance_rate", "0.01",
                                          "--moe_top_k", "1", "--capacity_factor", "1.25"], True)])
def test_main_trains_an_moe(tmp_path, shakespeare, extra, aux_free):
    mod = load("part05")
    out = tmp_path / "out"
    s = mod.main(TINY + ["--data", shakespeare, "--data_dir", str(tmp_path / "data"),
                         "--out_dir", str(out), "--max_steps", "40", "--eval_interval", "20",
                         "--eval_iters", "2"] + extra)
    assert s["steps"] == 40
    assert s["val_loss"] < math.log(256) - 0.5  # it learned something in 40 steps
    assert read_summary(out)["val_loss"] == s["val_loss"]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    sd = ckpt["model"]
    offsets = [v for k, v in sd.items() if k.endswith("expert_offset")]
    assert len(offsets) == 2
    routers = [k for k in sd if k.endswith("router.weight")]
    assert len(routers) == 2 and all(sd[k].dtype == torch.float32 for k in routers)
    if aux_free:  # the offsets moved in steps of balance_rate, at most one per step
        for b in offsets:
            assert b.abs().max() > 0
            steps = b / 0.01
            torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
            assert b.abs().max() <= 40 * 0.01 + 1e-6
    else:
        assert all(torch.equal(b, torch.zeros(4)) for b in offsets)
    cfg = moe_cfg(mod, vocab_size=256, **({"moe_top_k": 1} if aux_free else {}))
    model = mod.GPT(cfg)
    assert s["params"] == model.num_params()


def test_logged_training_loss_is_the_lm_loss_and_router_losses_are_logged_beside_it(tmp_path,
                                                                                    shakespeare):
    """metrics.jsonl's train_loss is the language-model loss, as val_loss is: at step 1 (the
    same weights and batch) it does not move when the Switch loss weighs 100x more, while
    aux_loss and z_loss are their own columns."""
    mod = load("part05")
    first = {}
    for coef in ("0.0", "100.0"):
        out = tmp_path / coef
        mod.main(TINY + ["--data", shakespeare, "--data_dir", str(tmp_path / "data"), "--out_dir",
                         str(out), "--max_steps", "2", "--eval_interval", "2", "--eval_iters", "1",
                         "--log_interval", "1", "--aux_loss_coef", coef])
        first[coef] = next(r for r in read_metrics(out) if r.get("step") == 1 and "train_loss" in r)
    assert first["0.0"]["train_loss"] == first["100.0"]["train_loss"]
    for row in first.values():
        assert row["aux_loss"] > 0.5 and row["z_loss"] > 0  # E * sum f_i P_i: 1 when uniform
