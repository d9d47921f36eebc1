"""Part 08: RLHF with PPO. GAE against a loop written out in float64 (lam 1: discounted
returns minus values; lam 0: one-step TD), whitening; the clipped surrogate (ratio 1 and the
plain policy gradient at the first minibatch, the gradient zero exactly where the clip
formula says, the clip fraction) and the clipped value loss against their formulas and
gradients; the adaptive KL controller and the KL in the reward (zero when the policy is the
reference, the score at each response's last real token); --reward_source checker; the
actors (a frozen reference and reward model, a critic of either kind that learns from a
zero head, values 0 in a first rollout); a short PPO run against the checker that raises
gold accuracy on the copy task; main() end to end (summary, metrics, ppo.pt, the control,
--init_from with --reward_model), --prompt_data, and the refusals (bad flags, bad prompt
files, a reward model of other tokens or a shorter context, a loss that turns NaN).
Inherited by part09 (ROLLOUT): the log-probs the update recomputes equal the sampler's (left
padding, temperatures 0.7 and 1.3, rows that end early and rows that do not) and a row
computed alone; the rollout's layout, its reference log-probs equal to the policy's, and the
score of a reward model (part09: --reward rm) equal to its score of the conversation alone."""
import copy
import dataclasses
import json
import math
import random

import pytest
import torch
import torch.nn as nn

from conftest import (SHAKESPEARE, config_fields, expect_exit_2, expect_flag_error, load, part_names,
                      read_metrics, read_summary, tiny_cfg, tiny_gpt, write)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

PPO = part_names(8, 8)  # the critic, GAE, the value loss, the KL in the reward, --reward_source: part09 drops them
ROLLOUT = part_names(8, 9)  # sampling, log-probs, the reward model's score: part09 keeps them


@pytest.fixture(params=PPO)
def mod(request):
    return load(request.param)


@pytest.fixture(params=ROLLOUT)
def rmod(request):
    return load(request.param)


def chat_tok(mod):
    return mod.ByteTokenizer(mod.CHAT_TOKENS)


def reward_model(mod, tok, seed=0, norm=None):
    """A RewardModel on a tiny, perturbed GPT with a random, non-zero head (as part07's tests)."""
    rm = mod.RewardModel(tiny_gpt(mod, seed=seed, vocab_size=tok.vocab_size, block_size=64), norm).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        rm.head.weight.copy_(torch.randn(rm.head.weight.shape, generator=g))
        rm.head.bias.fill_(0.3)
    return rm


def policy_model(mod, tok, seed=1, end_bias=0.0):
    """A tiny perturbed GPT; end_bias raises the <|end|> logit (a forward hook on lm_head, which
    the sampler and the training forward both go through), so some responses end early."""
    model = tiny_gpt(mod, seed=seed, vocab_size=tok.vocab_size, block_size=64)
    if end_bias:
        bias = torch.zeros(model.lm_head.weight.shape[0])
        bias[tok.special["<|end|>"]] = end_bias
        model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    return model


def logprobs(mod, model, idx, mask, P, temperature):
    """response_logprobs' (logp, entropy): part08's takes a critic (None here), part09's none."""
    critic = (None,) if hasattr(mod, "Critic") else ()
    return mod.response_logprobs(model, *critic, idx, mask, P, temperature)[:2]


# Every PPO field explicit: the defaults are tuned for the milestone run. reward "rm": part09
# scores by the reward model as part08 does (its default is the verifier).
PPO_FIELDS = dict(temperature=1.0, max_answer_tokens=8, rollout_batch=8, ppo_minibatch=4, ppo_epochs=1,
                  ppo_lr=1e-3, clip=0.2, value_clip=0.2, vf_coef=0.1, ent_coef=0.0, gamma=1.0, lam=0.95,
                  kl_coef=0.05, target_kl=0.0, kl_horizon=1000, missing_end_penalty=1.0, reward_clip=5.0,
                  length_penalty=0.0, critic="separate", grad_clip=1.0, ppo_iters=1, ppo_eval_interval=1,
                  log_interval=1, reward_source="model", reward="rm")


def ppo_fields(mod, **kw):
    """PPO_FIELDS with kw, those the part's Config has."""
    return {k: v for k, v in {**PPO_FIELDS, **kw}.items() if k in config_fields(mod)}


def ppo_cfg(mod, tok, out_dir="unused", **kw):
    return tiny_cfg(mod, vocab_size=tok.vocab_size, block_size=64, out_dir=str(out_dir), **ppo_fields(mod, **kw))


PROMPTS = ["Repeat: ab", "Sort: 3 1 2 9 8 7", "1 + 2 =", "Uppercase: xyz", "Larger: 12 or 57", "Reverse: pots",
           "12 * 3 =", "Say hello to everyone here"]  # of different lengths: the prompts are left-padded
EVAL = {"copy": ["Repeat: cat", "Repeat: dog"], "add": ["3 + 4 ="]}  # judge() reads an easy and a hard task


def records(mod, tok, prompts=PROMPTS):
    """RL records as prompt_batches makes them: rl_record plus the rendered "ids"."""
    return [{**mod.rl_record(mod.user_turn(p)), "ids": mod.render_chat(tok, mod.user_turn(p), generation_prompt=True)[0]}
            for p in prompts]


def do_rollout(mod, tok, cfg, policy, rm, seed=0, recs=None):
    actors = mod.make_actors(policy, rm, cfg)
    batch = mod.rollout(*actors, tok, recs or records(mod, tok), cfg, torch.float32, torch.Generator().manual_seed(seed))
    return actors, batch


# 8.4 GAE and whitening ------------------------------------------------------------------------------
def test_gae_matches_a_hand_computation(mod):
    """gae on rows of 6, 4 and 1 response tokens (garbage rewards and values at the padding)
    equals the recursion delta_t = r_t + gamma V_{t+1} - V_t (V = 0 past the last real
    token), A_t = delta_t + gamma lam A_{t+1}, written out here in float64, for gamma 0.9 and
    lam 0.8 and others; lam 1 gives the discounted return minus V, lam 0 the one-step TD
    error; returns = A + V; both are 0 at padding."""
    g = torch.Generator().manual_seed(0)
    B, R = 3, 6
    rewards, values = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    lengths = [6, 4, 1]
    mask = torch.arange(R)[None] < torch.tensor(lengths)[:, None]  # (B, R) bool, as rollout's resp_mask
    r64, v64 = rewards.double(), values.double()
    for gamma, lam in ((0.9, 0.8), (1.0, 0.95), (0.9, 1.0), (1.0, 1.0), (0.7, 0.0)):
        adv, ret = mod.gae(rewards, values, mask, gamma, lam)
        want = torch.zeros(B, R, dtype=torch.float64)
        for i, L in enumerate(lengths):
            running = 0.0
            for t in reversed(range(L)):
                next_v = v64[i, t + 1].item() if t + 1 < L else 0.0
                running = r64[i, t].item() + gamma * next_v - v64[i, t].item() + gamma * lam * running
                want[i, t] = running
        torch.testing.assert_close(adv.double(), want, atol=1e-5, rtol=0, msg=f"gamma {gamma} lam {lam}")
        torch.testing.assert_close(ret.double(), (want + v64) * mask, atol=1e-5, rtol=0)
        assert torch.equal(adv[~mask], torch.zeros((~mask).sum())) and torch.equal(ret[~mask], torch.zeros((~mask).sum()))
        if lam == 1.0:  # Monte Carlo: the discounted return from t on, minus V_t
            mc = torch.zeros(B, R, dtype=torch.float64)
            for i, L in enumerate(lengths):
                for t in range(L):
                    mc[i, t] = sum(gamma ** (k - t) * r64[i, k] for k in range(t, L)) - v64[i, t]
            torch.testing.assert_close(adv.double(), mc, atol=1e-5, rtol=0)
            torch.testing.assert_close(ret.double(), (mc + v64) * mask, atol=1e-5, rtol=0)
        if lam == 0.0:  # one-step TD
            next_v = torch.cat([v64[:, 1:], torch.zeros(B, 1, dtype=torch.float64)], 1) * \
                torch.cat([mask[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], 1)
            torch.testing.assert_close(adv.double(), (r64 + gamma * next_v - v64) * mask, atol=1e-5, rtol=0)


def test_whiten_gives_mean_0_std_1_over_the_real_tokens(mod):
    """whiten: over the real tokens mean 0 and (population) std 1, 0 at padding; what the
    padding holds changes nothing; masked_mean is the mean of the real entries."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g) * 3 + 5
    mask = torch.arange(7)[None] < torch.tensor([7, 3, 5, 1])[:, None]
    w = mod.whiten(x, mask)
    real = w[mask].double()
    assert real.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert real.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(w[~mask], torch.zeros((~mask).sum()))
    torch.testing.assert_close(real, (x[mask].double() - x[mask].double().mean()) / x[mask].double().std(unbiased=False),
                               atol=1e-5, rtol=0)
    other = x.masked_fill(~mask, 1e4)
    torch.testing.assert_close(mod.whiten(other, mask), w, atol=1e-6, rtol=0)
    assert mod.masked_mean(other, mask).item() == pytest.approx(x[mask].mean().item(), abs=1e-5)


# 8.5 The losses -------------------------------------------------------------------------------------
def test_first_minibatch_has_ratio_1_and_the_plain_policy_gradient(mod):
    """At the first minibatch the update's log-probs are the rollout's (the same forward):
    the ratio is 1, the clip fraction and approximate KL 0, the policy loss -mean(A), and
    the gradient of the clipped surrogate w.r.t. every parameter of the policy equals that
    of -masked_mean(A * logp), written out here (advantages at padding are left non-zero:
    the mask must keep them out)."""
    tok = chat_tok(mod)
    cfg = ppo_cfg(mod, tok, temperature=0.7)
    (policy, _, _, _), batch = do_rollout(mod, tok, cfg, policy_model(mod, tok, end_bias=4.0), reward_model(mod, tok))
    idx, mask, P, m = batch["idx"], batch["mask"], batch["P"], batch["resp_mask"]
    assert (~m).any()  # padding after some responses
    A = torch.randn(m.shape, generator=torch.Generator().manual_seed(0))
    logp = mod.response_logprobs(policy, None, idx, mask, P, cfg.temperature)[0]
    torch.testing.assert_close(logp.detach(), batch["logp"], atol=1e-6, rtol=0)
    zero = torch.zeros_like(batch["logp"])
    policy_loss, _, clip_frac, approx_kl = mod.ppo_losses(logp, batch["logp"], A, zero, zero, zero, m,
                                                          cfg.clip, cfg.value_clip)
    assert policy_loss.item() == pytest.approx(-(A * m).sum().item() / m.sum().item(), abs=1e-5)
    assert clip_frac.item() == 0.0 and abs(approx_kl.item()) < 1e-10
    policy_loss.backward()
    clipped = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    logp = mod.response_logprobs(policy, None, idx, mask, P, cfg.temperature)[0]
    (-(A * logp * m).sum() / m.sum()).backward()
    plain = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    assert set(clipped) == set(plain) and plain
    assert sum(g.norm() ** 2 for g in plain.values()).sqrt() > 1e-3
    for n in plain:
        torch.testing.assert_close(clipped[n], plain[n], atol=1e-6, rtol=0, msg=n)


def test_clipping_zeroes_the_gradient_exactly_where_the_formula_says(mod):
    """With logp a leaf and ratios exp(logp - old_logp) spread over [0.5, 1.8]: the policy
    loss is mean(max(-A r, -A clamp(r, 1 - clip, 1 + clip))) over the real tokens (float64
    here); its gradient w.r.t. logp is exactly 0 where A > 0 and r > 1 + clip, where A < 0
    and r < 1 - clip, and at padding, and -A r / N elsewhere; the clip fraction is the share
    of real tokens with |r - 1| > clip."""
    g = torch.Generator().manual_seed(0)
    B, R, clip = 6, 9, 0.2
    mask = torch.arange(R)[None] < torch.tensor([9, 7, 5, 9, 2, 8])[:, None]
    old = -torch.rand(B, R, generator=g) * 4
    log_ratio = torch.empty(B, R).uniform_(math.log(0.5), math.log(1.8), generator=g)
    logp = (old + log_ratio).requires_grad_(True)
    A = torch.randn(B, R, generator=g)
    zero = torch.zeros(B, R)
    policy_loss, _, clip_frac, _ = mod.ppo_losses(logp, old, A, zero, zero, zero, mask, clip, 0.2)
    policy_loss.backward()
    ratio = (logp.detach() - old).exp()
    N = mask.sum()
    frozen = ((A > 0) & (ratio > 1 + clip)) | ((A < 0) & (ratio < 1 - clip))
    assert (frozen & mask).sum() >= 5 and (~frozen & mask & ((ratio - 1).abs() > clip)).sum() >= 5  # both sides occur
    want = torch.where(frozen | ~mask, torch.zeros(B, R), -A * ratio / N)
    assert torch.equal(logp.grad[frozen | ~mask], torch.zeros(int((frozen | ~mask).sum())))
    torch.testing.assert_close(logp.grad, want, atol=1e-7, rtol=1e-5)
    r64, a64 = ratio.double(), A.double()
    by_hand = torch.maximum(-a64 * r64, -a64 * r64.clamp(1 - clip, 1 + clip))[mask].mean().item()
    assert policy_loss.item() == pytest.approx(by_hand, abs=1e-5)
    assert clip_frac.item() == pytest.approx(((ratio - 1).abs() > clip)[mask].float().mean().item(), abs=1e-7)


def test_value_loss_clipping_matches_its_formula(mod):
    """The value loss is 0.5 * mean(max((V - R)^2, (Vc - R)^2)) over the real tokens with
    Vc = old_V + clamp(V - old_V, -value_clip, value_clip) (float64 here); its gradient
    w.r.t. V is 0 where the clipped branch is the larger and V lies outside the clip range
    (Vc is a constant there), (V - R) / N elsewhere, and 0 at padding."""
    g = torch.Generator().manual_seed(1)
    B, R, vc = 5, 8, 0.2
    mask = torch.arange(R)[None] < torch.tensor([8, 3, 6, 1, 7])[:, None]
    old = torch.randn(B, R, generator=g)
    values = (old + torch.empty(B, R).uniform_(-0.6, 0.6, generator=g)).requires_grad_(True)
    returns = old + torch.randn(B, R, generator=g) * 0.5
    zero = torch.zeros(B, R)
    _, value_loss, _, _ = mod.ppo_losses(zero, zero, zero, values, old, returns, mask, 0.2, vc)
    value_loss.backward()
    V, O, Rt = values.detach().double(), old.double(), returns.double()
    Vc = O + (V - O).clamp(-vc, vc)
    assert value_loss.item() == pytest.approx(0.5 * torch.maximum((V - Rt) ** 2, (Vc - Rt) ** 2)[mask].mean().item(),
                                              abs=1e-6)
    dead = ((Vc - Rt) ** 2 > (V - Rt) ** 2) & ((V - O).abs() > vc)
    assert (dead & mask).sum() >= 3 and (~dead & mask & ((V - O).abs() > vc)).sum() >= 3
    want = torch.where(dead | ~mask, torch.zeros(B, R, dtype=torch.float64), (V - Rt) / mask.sum())
    assert torch.equal(values.grad[dead | ~mask], torch.zeros(int((dead | ~mask).sum())))
    torch.testing.assert_close(values.grad.double(), want, atol=1e-7, rtol=1e-5)


# 8.3 The KL controller ------------------------------------------------------------------------------
def test_update_beta_follows_the_kl_and_is_bounded(mod):
    """update_beta: fixed at target 0; beta * (1 + e n / horizon) with e = kl / target - 1
    clipped to +-0.2: it rises while the KL is above the target, falls below it, and moves
    by at most 20% * n / horizon whatever the KL."""
    beta, n, horizon = 0.1, 64, 1000
    assert mod.update_beta(beta, 50.0, 0.0, horizon, n) == beta
    assert mod.update_beta(beta, 5.5, 5.0, horizon, n) == pytest.approx(beta * (1 + 0.1 * n / horizon))
    assert mod.update_beta(beta, 4.5, 5.0, horizon, n) == pytest.approx(beta * (1 - 0.1 * n / horizon))
    assert mod.update_beta(beta, 5.0, 5.0, horizon, n) == pytest.approx(beta)
    assert mod.update_beta(beta, 1e6, 5.0, horizon, n) == pytest.approx(beta * (1 + 0.2 * n / horizon))
    assert mod.update_beta(beta, 0.0, 5.0, horizon, n) == pytest.approx(beta * (1 - 0.2 * n / horizon))
    assert mod.update_beta(beta, -3.0, 5.0, horizon, n) == pytest.approx(beta * (1 - 0.2 * n / horizon))
    for kl in (0.1, 3.0, 5.01, 7.0, 100.0):
        new = mod.update_beta(beta, kl, 5.0, horizon, n)
        assert (new > beta) == (kl > 5.0) and abs(new / beta - 1) <= 0.2 * n / horizon + 1e-12
    assert mod.update_beta(beta, 1e6, 5.0, horizon, 2 * n) > mod.update_beta(beta, 1e6, 5.0, horizon, n)


# 8.2-8.3 Rollouts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_recomputed_logprobs_equal_the_samplers(rmod, temperature):
    """The update's forward (response_logprobs over the rollout's layout: left-padded prompts
    of different lengths, responses right-padded after their <|end|>) gives each response
    token the log-probability the sampler drew it with, to 1e-5, on rows that end early and
    rows that run to --max_answer_tokens, and the same as each row computed alone, without
    padding, at that temperature; recomputed at temperature 1 they differ by > 1e-3."""
    mod = rmod
    tok = chat_tok(mod)
    cfg = ppo_cfg(mod, tok, temperature=temperature)
    recs = records(mod, tok)
    actors, batch = do_rollout(mod, tok, cfg, policy_model(mod, tok, end_bias=4.0), reward_model(mod, tok), recs=recs)
    policy = actors[0]
    ended, m, P = batch["ended"], batch["resp_mask"], batch["P"]
    assert ended.any() and (~ended).any()
    assert len({len(r["ids"]) for r in recs}) > 1
    assert batch["sample_logp"].shape == batch["logp"].shape == m.shape
    assert m.sum(1).tolist() == batch["lengths"].tolist()
    gap = ((batch["sample_logp"] - batch["logp"]).abs() * m).max().item()
    assert gap < 1e-5, gap
    with torch.no_grad():
        for i, r in enumerate(recs):
            resp = batch["idx"][i, P:][m[i]].tolist()
            row = torch.tensor([r["ids"] + resp])
            logits = policy(row)[0][0, len(r["ids"]) - 1:-1, :tok.vocab_size].float() / temperature
            alone = torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]
            torch.testing.assert_close(batch["logp"][i, :len(resp)], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(batch["sample_logp"][i, :len(resp)], alone, atol=1e-5, rtol=0)
        at_one = logprobs(mod, policy, batch["idx"], batch["mask"], P, 1.0)[0]
    assert ((batch["sample_logp"] - at_one).abs() * m).max().item() > 1e-3


def test_kl_is_zero_when_the_policy_is_the_reference(mod):
    """make_actors' reference is a frozen copy: in a rollout its log-probs equal the
    policy's, kl_rewards' KL is 0 at every token and the rewards are the score at the last
    real token, 0 elsewhere. Once the policy moves the KL terms are (logp - ref_logp) at the
    real tokens and 0 at padding."""
    tok = chat_tok(mod)
    cfg = ppo_cfg(mod, tok, temperature=0.7)
    (policy, ref, _, _), batch = do_rollout(mod, tok, cfg, policy_model(mod, tok, end_bias=4.0), reward_model(mod, tok))
    assert ref is not policy
    assert torch.equal(batch["logp"], batch["ref_logp"])
    m = batch["resp_mask"]
    rewards, kl = mod.kl_rewards(batch["score"], batch["logp"], batch["ref_logp"], m, 0.5)
    assert torch.equal(kl, torch.zeros_like(kl))
    want = torch.zeros_like(rewards)
    want[torch.arange(len(want)), m.sum(1) - 1] = batch["score"]
    assert torch.equal(rewards, want)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
        logp = mod.response_logprobs(policy, None, batch["idx"], batch["mask"], batch["P"], cfg.temperature)[0]
    _, kl = mod.kl_rewards(batch["score"], logp, batch["ref_logp"], m, 0.5)
    torch.testing.assert_close(kl, (logp - batch["ref_logp"]) * m, atol=1e-6, rtol=0)
    assert kl[m].abs().min() > 0 and torch.equal(kl[~m], torch.zeros(int((~m).sum())))


def test_rewards_sit_at_the_last_real_token(mod):
    """kl_rewards with beta 0 puts each score exactly at column resp_mask.sum(1) - 1 and 0
    elsewhere; with beta > 0 every real token also gets -beta (logp - ref_logp), padding 0."""
    g = torch.Generator().manual_seed(0)
    B, R = 4, 6
    m = torch.arange(R)[None] < torch.tensor([6, 1, 3, 4])[:, None]
    score, logp, ref_logp = torch.randn(B, generator=g), torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    rewards, kl = mod.kl_rewards(score, logp, ref_logp, m, 0.0)
    want = torch.zeros(B, R)
    want[torch.arange(B), torch.tensor([5, 0, 2, 3])] = score
    assert torch.equal(rewards, want)
    rewards, kl = mod.kl_rewards(score, logp, ref_logp, m, 0.3)
    torch.testing.assert_close(kl, (logp - ref_logp) * m, atol=1e-7, rtol=0)
    torch.testing.assert_close(rewards, want - 0.3 * (logp - ref_logp) * m, atol=1e-6, rtol=0)
    assert torch.equal(rewards[~m], torch.zeros(int((~m).sum())))


def test_rollout_scores_the_conversation_alone(rmod):
    """rollout: the responses are what generate_batch samples from the same seed (<|end|>
    added to an ended row), laid out as idx = [left-padded prompt | right-padded response]
    with a mask True exactly at the real tokens; the raw reward of each row is the
    RewardModel's score of its conversation ids alone (for an ended row, render_chat of the
    prompt, the reply and its <|end|>); the score is the shaped reward (normalized, a length
    penalty, clipped) minus --missing_end_penalty for a row that never ended; replies,
    lengths, ended and the checker's verdicts match; the reference's log-probs (a frozen copy
    of the policy) equal the policy's. Part09: --reward rm."""
    mod = rmod
    tok = chat_tok(mod)
    pad, end = tok.special["<|pad|>"], tok.special["<|end|>"]
    cfg = ppo_cfg(mod, tok, temperature=1.0, length_penalty=0.01, reward_clip=1.5, missing_end_penalty=1.0)
    recs = records(mod, tok)
    norm = {"mean": 0.3, "std": 2.0}
    policy = policy_model(mod, tok, end_bias=4.0)
    actors, batch = do_rollout(mod, tok, cfg, policy, reward_model(mod, tok, norm=norm), seed=5, recs=recs)
    policy, ref, rm = actors[:3]
    new, ended, _ = mod.generate_batch(policy, [r["ids"] for r in recs], cfg.max_answer_tokens, end, pad,
                                       cfg.temperature, generator=torch.Generator().manual_seed(5), logprobs=True)
    assert any(ended) and not all(ended)
    assert batch["ended"].tolist() == ended and batch["replies"] == [tok.decode(ids) for ids in new]
    idx, mask, P, m = batch["idx"], batch["mask"], batch["P"], batch["resp_mask"]
    assert P == max(len(r["ids"]) for r in recs) and torch.equal(m, mask[:, P:])
    raw, checked_template = batch["raw"], 0
    for i, (r, ids, e) in enumerate(zip(recs, new, ended)):
        response = ids + [end] if e else ids
        assert batch["lengths"][i].item() == len(response)
        want_row = [pad] * (P - len(r["ids"])) + r["ids"] + response + [pad] * (idx.size(1) - P - len(response))
        assert idx[i].tolist() == want_row
        assert mask[i].tolist() == [False] * (P - len(r["ids"])) + [True] * (len(r["ids"]) + len(response)) + \
            [False] * (idx.size(1) - P - len(response))
        conversation = r["ids"] + response
        if e and tok.encode(tok.decode(ids)) == ids:
            reply = {"role": "assistant", "content": tok.decode(ids)}
            assert mod.render_chat(tok, r["messages"] + [reply])[0] == conversation
            checked_template += 1
        with torch.no_grad():
            alone = rm(torch.tensor([conversation]), torch.ones(1, len(conversation), dtype=torch.bool))[0]
        assert raw[i].item() == pytest.approx(alone.item(), abs=1e-5)
        shaped = max(-1.5, min(1.5, (alone.item() - 0.3) / 2.0 - 0.01 * len(response))) - (0.0 if e else 1.0)
        assert batch["score"][i].item() == pytest.approx(shaped, abs=1e-5)
    assert checked_template >= 1
    assert batch["right"] == [mod.rl_check(r, reply) for r, reply in zip(recs, batch["replies"])]
    assert batch["right"][-1] is None  # "Say hello ...": no task, no answer
    assert ref is not policy and torch.equal(batch["logp"], batch["ref_logp"])
    assert batch["entropy"].shape == m.shape and (batch["entropy"][m] > 0).all()


def test_reward_source_checker_scores_by_the_checker(mod):
    """--reward_source checker: each response's score is the checker's verdict (1 right, 0
    wrong or nothing to judge it) minus --missing_end_penalty for a response that never
    ended, whatever the reward model says (its raw score is still reported). Here the gold
    answer of half the prompts is the empty reply, which a response that ends at once gives."""
    tok = chat_tok(mod)
    cfg = ppo_cfg(mod, tok, temperature=0.7, reward_source="checker", missing_end_penalty=0.5)
    recs = [{**r, "answer": "" if i % 2 == 0 else None} for i, r in enumerate(records(mod, tok) * 2)]
    _, batch = do_rollout(mod, tok, cfg, policy_model(mod, tok, end_bias=5.0), reward_model(mod, tok), recs=recs)
    right = batch["right"]
    assert True in right and False in right and None in right
    want = [float(bool(r)) - (0.0 if e else 0.5) for r, e in zip(right, batch["ended"].tolist())]
    assert batch["score"].tolist() == pytest.approx(want, abs=1e-7)
    assert len(set(batch["raw"].tolist())) > 1


# 8.1 The actors and the update ------------------------------------------------------------------------
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_update_trains_the_policy_and_critic_alone(mod, critic):
    """make_actors: a reference copy and the reward model, frozen (no parameter asks for a
    gradient), everything in eval mode, a critic head at zero on its own copy of the reward
    model's trunk (separate) or on the policy's (shared). ppo_update over one rollout
    (rewards, GAE, whitened advantages as ppo() makes them) changes the policy and moves
    the critic head from zero; the reference and the reward model stay as they were and
    get no gradient; the rollout's values are 0 (the critic's fresh head)."""
    tok = chat_tok(mod)
    cfg = ppo_cfg(mod, tok, critic=critic, ppo_epochs=2, rollout_batch=8, ppo_minibatch=4, ppo_lr=3e-3)
    policy, rm = policy_model(mod, tok, end_bias=4.0), reward_model(mod, tok)
    start = copy.deepcopy(policy.state_dict())
    rm_start = copy.deepcopy(rm.state_dict())
    actors, batch = do_rollout(mod, tok, cfg, policy, rm)
    policy, ref, rm, crit = actors
    assert ref is not policy and not any(p.requires_grad for p in ref.parameters())
    assert not any(p.requires_grad for p in rm.parameters())
    assert not (policy.training or ref.training or rm.training or crit.training)
    assert torch.equal(crit.head.weight, torch.zeros_like(crit.head.weight))
    if critic == "separate":
        assert crit.trunk is not None and crit.trunk is not rm.gpt
        assert all(p.requires_grad for p in crit.trunk.parameters())
        assert all(torch.equal(a, b) for a, b in zip(crit.trunk.state_dict().values(), rm.gpt.state_dict().values()))
        trunk_start = copy.deepcopy(crit.trunk.state_dict())
    else:
        assert crit.trunk is None
    assert torch.equal(batch["values"], torch.zeros_like(batch["values"]))
    m = batch["resp_mask"]
    rewards, _ = mod.kl_rewards(batch["score"], batch["logp"], batch["ref_logp"], m, cfg.kl_coef)
    advantages, batch["returns"] = mod.gae(rewards, batch["values"], m, cfg.gamma, cfg.lam)
    batch["advantages"] = mod.whiten(advantages, m)
    opt = mod.configure_optimizer(nn.ModuleList([policy, crit]),
                                  dataclasses.replace(cfg, learning_rate=cfg.ppo_lr, weight_decay=0.0), "cpu")
    figures = mod.ppo_update(policy, crit, opt, batch, cfg, torch.float32, torch.Generator().manual_seed(0))
    assert {"ppo_loss", "policy_loss", "value_loss", "clip_frac", "approx_kl"} <= set(figures)
    assert all(math.isfinite(v.item()) for v in figures.values())
    assert crit.head.weight.abs().sum().item() > 0
    assert any(not torch.equal(start[k], v) for k, v in policy.state_dict().items())
    assert all(torch.equal(start[k], v) for k, v in ref.state_dict().items())
    assert all(torch.equal(rm_start[k], v) for k, v in rm.state_dict().items())
    assert all(p.grad is None for p in [*ref.parameters(), *rm.parameters()])
    if critic == "separate":
        assert any(not torch.equal(trunk_start[k], v) for k, v in crit.trunk.state_dict().items())


# 8.6 A short run raises gold accuracy --------------------------------------------------------------
class CheckerReward(nn.Module):
    """A reward model that is the copy task's checker: 1 for a right reply, 0 otherwise
    (the RewardModel interface: forward(idx, mask) -> (B,), norm, cfg, head), so the test
    measures PPO, not a learned reward model."""

    def __init__(self, mod, tok, cfg):
        super().__init__()
        self.mod, self.tok, self.cfg = mod, tok, cfg
        self.head = nn.Linear(1, 1)
        self.norm = {"mean": 0.0, "std": 1.0}

    def forward(self, idx, mask):
        out = []
        for row, real in zip(idx, mask):
            turns = self.mod.parse_chat(self.tok, row[real].tolist())
            out.append(float(turns[-1]["role"] == "assistant"
                             and self.mod.TASK_BY_NAME["copy"].check(turns[-2]["content"], turns[-1]["content"])))
        return torch.tensor(out)


def sampled_accuracy(mod, model, tok, prompts, cfg, n=64, seed=1):
    """The copy checker's accuracy of n answers per prompt at temperature 1."""
    convs = [mod.user_turn(p) for p in prompts for _ in range(n)]
    replies = mod.answer(model, tok, convs, cfg, torch.float32, temperature=1.0,
                         generator=torch.Generator().manual_seed(seed))
    return sum(mod.TASK_BY_NAME["copy"].check(c[0]["content"], r) for c, r in zip(convs, replies)) / len(convs)


def test_a_short_ppo_run_raises_gold_accuracy_on_copy(mod, tmp_path):
    """A tiny policy SFT'd briefly (120 steps) on the copy task with one-letter words (a-d)
    writes the right letter some of the time; 20 PPO iterations of 64 rollouts against the
    checker raise its accuracy at temperature 1 (256 answers) by at least 20 points, and its
    greedy accuracy does not fall. Seed 0: 0.27 -> 0.84 on the rollouts; over seeds 0-7
    the rollouts rise by 0.15-0.57."""
    tok = chat_tok(mod)
    cfg = tiny_cfg(mod, vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_embd=32, n_head=4, seed=0,
                   out_dir=str(tmp_path), sft_steps=120, sft_eval_interval=10**6, sft_batch_size=32, sft_lr=3e-3,
                   warmup_steps=5, **ppo_fields(
                       mod, max_answer_tokens=3, temperature=1.0, rollout_batch=64, ppo_minibatch=32, ppo_epochs=4,
                       ppo_lr=2e-3, kl_coef=0.05, critic="shared", ppo_iters=20, ppo_eval_interval=20,
                       log_interval=10**6))
    task = mod.TASK_BY_NAME["copy"]
    prompts = [f"Repeat: {c}" for c in "abcd"]
    assert all(mod.task_of(p) is task and task.check(p, p[-1]) for p in prompts)
    rng = random.Random(0)
    convs = [("copy", mod.user_turn(p) + [{"role": "assistant", "content": p[-1]}])
             for p in (rng.choice(prompts) for _ in range(256))]
    examples, _ = mod.make_examples(tok, convs, cfg.block_size)
    torch.manual_seed(0)
    policy = mod.GPT(cfg)
    best, _ = mod.sft(policy, tok, examples[20:], examples[:20], cfg, "cpu", torch.float32)
    policy.load_state_dict(best)
    policy.eval()
    rm = CheckerReward(mod, tok, cfg)
    eval_set = {"copy": prompts, "add": ["1 + 2 ="]}
    before = sampled_accuracy(mod, policy, tok, prompts, cfg)
    greedy_before = mod.judge(policy, rm, tok, eval_set, cfg, torch.float32)[0]["copy"]
    assert 0.1 < before < 0.6, before  # sometimes right: something for PPO to reinforce
    batches = mod.prompt_batches(cfg, tok, [mod.rl_record(mod.user_turn(p)) for p in prompts], random.Random(0))
    policy, figures = mod.ppo(policy, rm, tok, batches, eval_set, cfg, "cpu", torch.float32)
    after = sampled_accuracy(mod, policy, tok, prompts, cfg)
    assert after >= before + 0.2, (before, after)
    assert mod.judge(policy, rm, tok, eval_set, cfg, torch.float32)[0]["copy"] >= greedy_before
    gold = [r["gold"] for r in read_metrics(tmp_path) if r["stage"] == "ppo"]
    assert len(gold) == 20 and sum(gold[-5:]) / 5 > sum(gold[:3]) / 3 + 0.1, gold
    assert figures["iterations"] == 20 and figures["logp_gap"] < 1e-4


# 8 Refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,word", [
    (["--clip", "0"], "clip"),
    (["--gamma", "1.5"], "gamma"),
    (["--lam", "-0.1"], "lam"),
    (["--rollout_batch", "10", "--ppo_minibatch", "4"], "ppo_minibatch"),
    (["--temperature", "0"], "temperature"),
    (["--preference_data", "x.jsonl", "--reward_model", "y.pt"], "reward_model"),
])
def test_bad_ppo_flags_exit_2(mod, capsys, tmp_path, args, word):
    """Each bad PPO flag: one 'error:' line naming it, exit 2, before any data is read."""
    assert word in expect_flag_error(capsys, mod, args, tmp_path)


def test_bad_prompt_files_exit_2(mod, capsys, tmp_path):
    """--prompt_data that is empty, holds a record with neither "prompt" nor "messages", a
    non-string "answer", or messages that do not end with a user turn: one line naming the
    file (and record), exit 2, before anything is read or written."""
    good = json.dumps({"prompt": "Say yes", "answer": "yes"})
    files = {
        "empty": "",
        "'prompt'": good + "\n" + json.dumps({"question": "Say no", "answer": "no"}),
        "'answer'": good + "\n" + json.dumps({"prompt": "2 + 2 =", "answer": 4}),
        "user turn": json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    }
    for i, (word, text) in enumerate(files.items()):
        path = write(tmp_path / f"p{i}.jsonl", text)
        err = expect_flag_error(capsys, mod, ["--prompt_data", path], tmp_path / f"r{i}")
        assert word in err and path in err, (word, err)
        if i in (1, 2):
            assert f"{path}:2" in err, err
        assert not (tmp_path / f"r{i}" / "out").exists()


def saved_reward_model(mod, tok, path, block_size):
    """A reward.pt as part07's reward_modeling writes it (kind "reward", the head, the norm)."""
    cfg = tiny_cfg(mod, vocab_size=tok.vocab_size, block_size=block_size, tokenizer="byte")
    rm = mod.RewardModel(tiny_gpt(mod, vocab_size=tok.vocab_size, block_size=block_size))
    mod.save_model(str(path), rm.gpt, cfg, tok, kind="reward", head=rm.head.state_dict(), reward_norm=rm.norm)
    return str(path)


def test_a_reward_model_that_cannot_read_the_policy_exits_2(mod, capsys, tmp_path):
    """--reward_model of another tokenizer (a byte-level one for a BPE run) or of a shorter
    context than the policy writes (32 < --block_size 64; and 32 < the block_size of an
    --init_from policy): one line, exit 2, before pretraining reads the data."""
    tok = chat_tok(mod)
    short = saved_reward_model(mod, tok, tmp_path / "short.pt", 32)
    long = saved_reward_model(mod, tok, tmp_path / "long.pt", 64)
    err = expect_flag_error(capsys, mod, ["--reward_model", long, "--tokenizer", "bpe", "--block_size", "64"], tmp_path / "a")
    assert "other tokens" in err and "long.pt" in err, err
    err = expect_flag_error(capsys, mod, ["--reward_model", short, "--block_size", "64"], tmp_path / "b")
    assert "32" in err and "block_size 64" in err, err
    policy = tiny_gpt(mod, vocab_size=tok.vocab_size, block_size=64)
    sft = str(tmp_path / "sft.pt")
    mod.save_model(sft, policy, tiny_cfg(mod, vocab_size=tok.vocab_size, block_size=64, tokenizer="byte"), tok)
    err = expect_flag_error(capsys, mod, ["--init_from", sft, "--reward_model", short], tmp_path / "c")
    assert "32" in err and "block_size 64" in err, err


def test_a_nan_loss_stops_ppo_naming_the_iteration(mod, tmp_path, capsys, monkeypatch):
    """A loss that turns NaN (ppo_losses patched: the first minibatch of iteration 2) stops
    ppo() with one line naming the iteration and the saved one; ppo.pt still holds the
    finite policy of iteration 1, which load_model reads. NaN at iteration 1: no policy
    saved, and the line says so."""
    tok = chat_tok(mod)
    real = mod.ppo_losses
    for nan_at, saved in ((3, 1), (1, None)):  # 2 minibatches per iteration
        out = tmp_path / f"nan{nan_at}"
        out.mkdir()
        cfg = ppo_cfg(mod, tok, out, rollout_batch=4, ppo_minibatch=2, ppo_epochs=1, ppo_iters=3, ppo_eval_interval=1)
        calls = []

        def nan_once(*args, **kw):
            losses = real(*args, **kw)
            calls.append(1)
            return (losses[0] * float("nan"), *losses[1:]) if len(calls) == nan_at else losses

        monkeypatch.setattr(mod, "ppo_losses", nan_once)
        batches = mod.prompt_batches(cfg, tok, [mod.rl_record(mod.user_turn(p)) for p in PROMPTS], random.Random(0))
        err = expect_exit_2(capsys, mod.ppo, policy_model(mod, tok, end_bias=4.0), reward_model(mod, tok), tok, batches,
                            EVAL, cfg, "cpu", torch.float32)
        monkeypatch.setattr(mod, "ppo_losses", real)
        it = 1 if saved is None else 2
        assert f"iteration {it}" in err and "nan" in err.lower(), err
        assert [r["ppo_iter"] for r in read_metrics(out) if r.get("stage") == "ppo"] == list(range(1, it))
        if saved is None:
            assert "no PPO policy" in err and not (out / "ppo.pt").exists(), err
            continue
        assert f"iteration {saved}" in err and "ppo.pt" in err, err
        assert torch.load(out / "ppo.pt", weights_only=True)["ppo_iter"] == saved
        _, _, loaded = mod.load_model(cfg, str(out / "ppo.pt"), "cpu")
        assert all(torch.isfinite(p).all() for p in loaded.parameters())


# 8 main() -------------------------------------------------------------------------------------------
def main_flags(mod, root, **kw):
    values = dict(data=str(SHAKESPEARE), data_dir=str(root / "data"), out_dir=str(root / "out"), device="cpu",
                  dtype="float32", seed=0, n_layer=1, n_head=2, n_embd=32, block_size=64, max_steps=4, eval_interval=2,
                  eval_iters=1, log_interval=1, warmup_steps=1, num_samples=1, max_new_tokens=4,
                  sft_examples=14, sft_val_examples=7, sft_steps=2, sft_eval_interval=2, sft_batch_size=4,
                  sft_method="full", eval_prompts=1, pass_k=1, max_answer_tokens=4,
                  gold_pairs=100, policy_prompts=7, policy_samples=2, rm_eval_prompts=1, rm_steps=2,
                  rm_eval_interval=2, rm_batch_size=4,
                  **{k: v for k, v in ppo_fields(mod).items() if k not in ("max_answer_tokens", "log_interval")})
    values.update(ppo_iters=2, rollout_batch=4, ppo_minibatch=2, ppo_epochs=1, ppo_eval_interval=1, control="true")
    values.update(kw)  # every stage flag explicit: conftest's load() puts tiny stage flags first
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny main() of part08: pretraining, SFT, the reward model, 2 PPO iterations and
    the control. Returns (flags, out_dir)."""
    mod = load("part08")
    root = tmp_path_factory.mktemp("part08_run")
    assert SHAKESPEARE.exists(), f"test data missing: {SHAKESPEARE}"
    args = main_flags(mod, root)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mod.main(args)
    finally:
        torch.set_num_threads(n)
    return args, root / "out"


def check_accuracy(mod, acc):
    assert set(acc) == {t.name for t in mod.TASKS} | {"easy", "hard", "overall"}, acc
    assert all(0.0 <= v <= 1.0 for v in acc.values())


def test_main_writes_the_documented_summary_and_policy(tiny_run):
    """main(): summary.json holds gold_accuracy {sft, rl, sft_more} (every task, easy, hard,
    overall), rm_score and sampled_accuracy (pass@k, the share of right samples) for the
    same three, kl, wall_s, rl_s and ppo (the last iteration's figures, the sampler's
    log-probs matched); metrics.jsonl has a "ppo" row per iteration and a "ppo_eval" row
    per evaluation; ppo.pt (iteration 2) loads with load_model and, with reward.pt,
    reproduces the RL policy's gold accuracy, sampled accuracy and proxy score."""
    mod = load("part08")
    args, out = tiny_run
    summary = read_summary(out)
    assert set(summary["gold_accuracy"]) == {"sft", "rl", "sft_more"}
    for acc in summary["gold_accuracy"].values():
        check_accuracy(mod, acc)
    assert set(summary["rm_score"]) == {"sft", "rl", "sft_more"}
    assert all(v is None or math.isfinite(v) for v in summary["rm_score"].values())
    assert math.isfinite(summary["kl"]) and summary["wall_s"] > 0 and summary["rl_s"] > 0
    ppo = summary["ppo"]
    sampled = summary["sampled_accuracy"]  # pass@k and the share of right samples, each model
    assert set(sampled) == {"sft", "rl", "sft_more"}
    assert sampled["sft"] == summary["pass_at_k"]  # the same SFT model, prompts and sampler seed
    assert all(0.0 <= v["sampled"]["hard"] <= v["hard"] <= 1.0 for v in sampled.values())
    for key in ("ppo_loss", "policy_loss", "value_loss", "clip_frac", "approx_kl", "score", "kl", "entropy", "length",
                "explained_variance", "beta"):
        assert math.isfinite(ppo[key]), key
    assert ppo["ppo_iter"] == 2 and ppo["kl"] == summary["kl"] and 0 <= ppo["logp_gap"] < 1e-4
    assert 0.0 <= ppo["clip_frac"] <= 1.0 and 0.0 <= ppo["ended"] <= 1.0
    rows = read_metrics(out)
    assert [r["ppo_iter"] for r in rows if r.get("stage") == "ppo"] == [1, 2]
    evals = [r for r in rows if r.get("stage") == "ppo_eval"]
    assert [r["ppo_iter"] for r in evals] == [1, 2]
    assert evals[-1]["gold_hard"] == summary["gold_accuracy"]["rl"]["hard"]
    assert any(r.get("stage") == "sft_more" for r in rows)  # the control trained
    for name in ("sft.pt", "reward.pt", "ppo.pt", "summary.json", "samples.txt"):
        assert (out / name).is_file(), name
    assert torch.load(out / "ppo.pt", weights_only=True)["ppo_iter"] == 2
    cfg = mod.parse_args(args)
    cfg, tok, policy = mod.load_model(cfg, str(out / "ppo.pt"), "cpu")
    _, _, rm = mod.load_model(cfg, str(out / "reward.pt"), "cpu", kind="reward")
    gold, proxy = mod.judge(policy, rm, tok, mod.eval_prompts(cfg), cfg, torch.float32)
    assert gold == pytest.approx(summary["gold_accuracy"]["rl"])
    again = mod.pass_at_k(policy, tok, mod.eval_prompts(cfg), cfg, torch.float32, cfg.pass_k)
    assert again == summary["sampled_accuracy"]["rl"]
    assert proxy == pytest.approx(summary["rm_score"]["rl"], abs=1e-5)


def test_init_from_and_reward_model_skip_the_earlier_stages(tiny_run, tmp_path):
    """--init_from sft.pt --reward_model reward.pt: no pretraining (no ckpt.pt), no reward
    model trained (no reward.pt), no control (--control false: no sft_more); the SFT
    figures equal the first run's (the same policy and reward model), PPO runs and writes
    ppo.pt."""
    mod = load("part08")
    args, out = tiny_run
    run = tmp_path / "run"
    summary = mod.main(args + ["--init_from", str(out / "sft.pt"), "--reward_model", str(out / "reward.pt"),
                               "--out_dir", str(run), "--control", "false"])
    assert read_summary(run)["gold_accuracy"] == summary["gold_accuracy"]
    assert set(summary["gold_accuracy"]) == {"sft", "rl"}
    assert summary["init_from"] == str(out / "sft.pt")
    first = read_summary(out)
    assert summary["gold_accuracy"]["sft"] == first["gold_accuracy"]["sft"]
    assert summary["rm_score"]["sft"] == pytest.approx(first["rm_score"]["sft"], abs=1e-5)
    assert (run / "ppo.pt").is_file() and not (run / "ckpt.pt").exists() and not (run / "reward.pt").exists()
    rows = read_metrics(run)
    assert [r["ppo_iter"] for r in rows if r.get("stage") == "ppo"] == [1, 2]
    assert not any(r.get("stage") in ("sft", "reward", "sft_more") for r in rows)


PROMPT_RECORDS = [
    {"prompt": "Say yes", "answer": "yes"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say no"}], "answer": " no "},
    {"prompt": "Repeat: ab"},  # a built-in task's prompt: its checker judges
    {"prompt": "Tell me a story"},  # nothing can judge it
]


def test_read_prompts_and_prompt_batches(mod, tmp_path, capsys):
    """read_prompts: "prompt" strings and "messages" (ending in a user turn) with optional
    answers, as rl_records; prompt_batches yields rollout_batch of them with their rendered
    ids, every prompt once per epoch, and leaves out (and announces) a prompt too long for
    block_size; rl_check uses the gold answer (spaces aside), else the task's checker, else None."""
    tok = chat_tok(mod)
    path = write(tmp_path / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in PROMPT_RECORDS))
    cfg = ppo_cfg(mod, tok, prompt_data=path, data_dir=str(tmp_path / "d"), rollout_batch=2, ppo_minibatch=1)
    got = mod.read_prompts(cfg)
    assert [r["messages"] for r in got] == [mod.user_turn("Say yes"), PROMPT_RECORDS[1]["messages"],
                                            mod.user_turn("Repeat: ab"), mod.user_turn("Tell me a story")]
    assert [r["prompt"] for r in got] == ["Say yes", "Say no", "Repeat: ab", "Tell me a story"]
    assert [r["answer"] for r in got] == ["yes", " no ", None, None]
    array = write(tmp_path / "prompts.json", json.dumps(PROMPT_RECORDS))
    assert mod.read_prompts(dataclasses.replace(cfg, prompt_data=array)) == got
    batches = mod.prompt_batches(cfg, tok, got, random.Random(0))
    for _ in range(3):  # three epochs of two batches
        epoch = next(batches) + next(batches)
        assert sorted(r["prompt"] for r in epoch) == sorted(r["prompt"] for r in got)
        for r in epoch:
            assert r["ids"] == mod.render_chat(tok, r["messages"], generation_prompt=True)[0]
    assert [mod.rl_check(r, reply) for r, reply in zip(got, ["yes ", "no", "ab", "anything"])] == [True, True, True, None]
    assert [mod.rl_check(r, reply) for r, reply in zip(got, ["no", "yes", "ba", ""])] == [False, False, False, None]
    capsys.readouterr()
    long = got + [mod.rl_record(mod.user_turn("x" * 80))]
    batch = next(mod.prompt_batches(dataclasses.replace(cfg, rollout_batch=4, ppo_minibatch=1), tok, long, random.Random(0)))
    assert "x" * 80 not in [r["prompt"] for r in batch] and "1 of 5 prompts" in capsys.readouterr().out
    err = expect_exit_2(capsys, lambda: next(mod.prompt_batches(cfg, tok, long[-1:], random.Random(0))))
    assert "block_size" in err


def test_built_in_prompt_batches_stay_full_when_some_prompts_are_too_long(rmod, capsys):
    """Built-in RL prompts too long for --block_size are replaced by fresh draws: with a
    block_size that only about half of them fit, every batch still holds rollout_batch
    prompts, each leaving room to answer; with one no prompt fits, the run stops with one
    line naming --block_size (not a crash on an empty batch)."""
    mod = rmod
    tok = chat_tok(mod)
    rng = random.Random(0)
    lengths = sorted(len(mod.render_chat(tok, mod.user_turn(p), generation_prompt=True)[0])
                     for t in mod.TASKS for p in mod.task_prompts(t, 20, False, rng))
    cut = lengths[len(lengths) // 2]
    assert lengths[0] < cut < lengths[-1]
    cfg = dataclasses.replace(ppo_cfg(mod, tok, rollout_batch=6), block_size=cut)
    batches = mod.prompt_batches(cfg, tok, [], random.Random(1))
    for _ in range(5):
        batch = next(batches)
        assert len(batch) == 6 and all(len(r["ids"]) < cut for r in batch)
    err = expect_exit_2(capsys, lambda: next(mod.prompt_batches(dataclasses.replace(cfg, block_size=3),
                                                                tok, [], random.Random(1))))
    assert "--block_size" in err


def test_prompt_data_feeds_the_rollouts(tiny_run, tmp_path, monkeypatch):
    """main() --prompt_data FILE (with --init_from and --reward_model): every rollout's
    prompts come from the file, rendered from its messages; the checker's figure of each
    iteration uses the answers (it is a number: a file prompt without a task or an answer
    could not give one)."""
    mod = load("part08")
    args, out = tiny_run
    path = write(tmp_path / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in PROMPT_RECORDS[:2]))
    seen = []
    real = mod.rollout

    def spy(policy, ref, rm, critic, tokenizer, records, *rest):
        seen.append(records)
        return real(policy, ref, rm, critic, tokenizer, records, *rest)

    monkeypatch.setattr(mod, "rollout", spy)
    run = tmp_path / "run"
    mod.main(args + ["--init_from", str(out / "sft.pt"), "--reward_model", str(out / "reward.pt"),
                     "--out_dir", str(run), "--control", "false", "--prompt_data", path])
    tok = chat_tok(mod)
    want = {"Say yes": ("yes", mod.user_turn("Say yes")), "Say no": (" no ", PROMPT_RECORDS[1]["messages"])}
    assert len(seen) == 2 and all(len(b) == 4 for b in seen)
    for r in (r for b in seen for r in b):
        answer, messages = want[r["prompt"]]
        assert r["answer"] == answer and r["messages"] == messages
        assert r["ids"] == mod.render_chat(tok, messages, generation_prompt=True)[0]
    rows = [r for r in read_metrics(run) if r.get("stage") == "ppo"]
    assert len(rows) == 2 and all(0.0 <= r["gold"] <= 1.0 for r in rows)
