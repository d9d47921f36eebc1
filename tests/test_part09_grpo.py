"""Part 09: GRPO. Group-relative advantages against a hand computation (group, batch and no
scaling; rows g*G .. g*G + G - 1 are group g; a flat group, of any value, gives exactly 0 and
is flagged); the k3 KL (non-negative, 0 where the policy agrees with the reference, its
gradient); the GRPO loss against loops written out here (the three token averages on rows of
unequal lengths, padding left out; ratio 1 and the plain policy gradient; asymmetric clipping:
the gradient zero exactly where the clip formula says, the clip fraction); the verifiable
reward and its format credit; group rollouts (a prompt's G rows together, the sampler's
log-probs, the advantages and the flat fraction; --skip_flat_groups: flat groups replaced by
newly drawn ones, rollouts of other widths joined without losing a token or a log-prob, every
group flat); the update (the policy alone trains); a short GRPO run against the checker that
raises gold accuracy on the copy task; main() end to end (summary, metrics, grpo.pt, the
control, --init_from, --reward rm with --reward_model, --prompt_data) and the refusals (bad
flags, a prompt no verifier can judge, a loss that turns NaN)."""
import copy
import dataclasses
import hashlib
import json
import math
import random
import statistics

import pytest
import torch

from conftest import (SHAKESPEARE, config_fields, expect_exit_2, expect_flag_error, load, part_names,
                      read_metrics, read_summary, tiny_cfg, write)
from test_part08_ppo import chat_tok, check_accuracy, policy_model, reward_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

GRPO = part_names(9, 9)  # part10 drops the alignment stages (Replaces:)


@pytest.fixture(params=GRPO)
def mod(request):
    return load(request.param)


# Every GRPO field explicit: the defaults are tuned for the milestone run.
GRPO_FIELDS = dict(temperature=1.0, max_answer_tokens=6, rollout_batch=16, group_size=4, grpo_minibatch=4,
                   num_iterations=1, grpo_lr=1e-3, clip_low=0.2, clip_high=0.2, beta=0.04, loss_type="grpo",
                   scale_rewards="group", skip_flat_groups=False, max_draws=4, reward="verifier", format_reward=0.0,
                   missing_end_penalty=0.0, length_penalty=0.0, reward_clip=5.0, grad_clip=1.0, grpo_iters=1,
                   grpo_eval_interval=1, log_interval=1)


def grpo_fields(mod, **kw):
    """GRPO_FIELDS with kw, those the part's Config has."""
    return {k: v for k, v in {**GRPO_FIELDS, **kw}.items() if k in config_fields(mod)}


def grpo_cfg(mod, tok, out_dir="unused", **kw):
    return tiny_cfg(mod, vocab_size=tok.vocab_size, block_size=64, out_dir=str(out_dir), **grpo_fields(mod, **kw))


def rec(mod, tok, prompt, answer=None):
    """An RL record as prompt_batches makes it: rl_record plus the rendered "ids"."""
    return {**mod.rl_record(mod.user_turn(prompt), answer),
            "ids": mod.render_chat(tok, mod.user_turn(prompt), generation_prompt=True)[0]}


NEVER = "qqqqqqqqqqqqqqqqqqqq"  # a gold answer longer than any reply: every reply is wrong


def spy_rollouts(mod, monkeypatch):
    """Patch mod.rollout to keep (its records, the batch it returned) of every call."""
    seen, real = [], mod.rollout

    def spy(policy, ref, rm, tokenizer, records, *rest):
        batch = real(policy, ref, rm, tokenizer, records, *rest)
        seen.append((records, batch))
        return batch

    monkeypatch.setattr(mod, "rollout", spy)
    return seen


def real_tokens(batch, i):
    """Row i's prompt and response tokens, padding left out."""
    P, idx, mask = batch["P"], batch["idx"][i], batch["mask"][i]
    return idx[:P][mask[:P]].tolist(), idx[P:][batch["resp_mask"][i]].tolist()


# 9.3 Group-relative advantages ------------------------------------------------------------------------
def test_group_advantages_match_a_hand_computation(mod):
    """Rows g*G .. g*G + G - 1 are group g (G 4 and 3 here): "group" gives (r - the group's
    mean) / (its sample std + 1e-4), each group summing to 0 with std 1 (to 1e-3); "batch"
    divides by the sample std of the whole batch instead; "none" only centers. Written out
    here in Python over the rows."""
    g = torch.Generator().manual_seed(0)
    for G in (4, 3):
        rewards = torch.rand(5 * G, generator=g) * 2 - 0.5
        r = rewards.tolist()
        batch_std = statistics.stdev(r)
        for scale in ("group", "batch", "none"):
            adv, flat = mod.group_advantages(rewards, G, scale)
            assert adv.shape == (5 * G,) and flat.tolist() == [False] * 5
            want = []
            for group in range(5):
                rows = r[group * G:(group + 1) * G]
                mean, std = statistics.mean(rows), statistics.stdev(rows)
                div = {"group": std + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale]
                want += [(x - mean) / div for x in rows]
            torch.testing.assert_close(adv, torch.tensor(want), atol=1e-5, rtol=1e-5, msg=f"G {G} {scale}")
            for group in adv.view(-1, G):
                assert abs(group.sum().item()) < 1e-5
                if scale == "group":
                    assert group.std().item() == pytest.approx(1.0, abs=1e-3)


def test_a_flat_group_has_zero_advantage_and_is_flagged(mod):
    """Groups of 8 whose rewards are all equal (all 1, all 0, all 0.3, all -1.7: the last two
    are not exactly their float32 mean, so only the flag can make them 0) get advantage
    exactly 0 under every scaling and are flagged in `flat`; the others are not."""
    G = 8
    groups = [[1.0] * G, [0.3] * 7 + [1.0], [0.0] * G, [0.3] * G, [1.0] * 7 + [0.0], [-1.7] * G]
    rewards = torch.tensor([x for grp in groups for x in grp])
    for scale in ("group", "batch", "none"):
        adv, flat = mod.group_advantages(rewards, G, scale)
        assert flat.tolist() == [True, False, True, True, False, True], scale
        adv = adv.view(-1, G)
        assert torch.equal(adv[flat], torch.zeros(4, G)), (scale, adv[flat])
        assert (adv[~flat] != 0).all()
    adv, _ = mod.group_advantages(torch.tensor([0.3, 0.3, 1.0, 0.0]), 2, "group")
    assert adv[:2].tolist() == [0.0, 0.0] and adv[2].item() == pytest.approx(0.5 / (0.5 ** 0.5 + 1e-4), abs=1e-6)


# 9.4 The k3 KL and the GRPO loss ----------------------------------------------------------------------
def test_k3_kl_is_non_negative_zero_at_agreement_and_has_the_stated_gradient(mod):
    """k3 = exp(d) - d - 1 with d = ref_logp - logp: >= 0 on random log-probs far apart and
    near, exactly 0 where logp == ref_logp, and d k3 / d logp = 1 - exp(ref_logp - logp)."""
    g = torch.Generator().manual_seed(0)
    ref = -torch.rand(2000, generator=g) * 6
    logp = (ref + torch.randn(2000, generator=g) * torch.tensor([0.01, 3.0]).repeat(1000)).requires_grad_(True)
    kl = mod.k3_kl(logp, ref)
    assert (kl >= 0).all()
    d = ref.double() - logp.detach().double()
    torch.testing.assert_close(kl.double(), d.exp() - d - 1, atol=1e-5, rtol=1e-5)
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, 1 - (ref - logp.detach()).exp(), atol=1e-6, rtol=1e-5)
    same = ref.clone()
    assert torch.equal(mod.k3_kl(same, ref), torch.zeros(2000))


LENGTHS = [6, 2, 4, 1]


def loss_batch(seed=0, spread=(0.5, 1.8)):
    """B 4 rows of R 6 response tokens, real for LENGTHS; log-ratios spread over `spread`;
    garbage at padding (finite, far from the real values)."""
    g = torch.Generator().manual_seed(seed)
    B, R = len(LENGTHS), max(LENGTHS)
    mask = torch.arange(R)[None] < torch.tensor(LENGTHS)[:, None]
    old = -torch.rand(B, R, generator=g) * 4
    logp = old + torch.empty(B, R).uniform_(math.log(spread[0]), math.log(spread[1]), generator=g)
    ref = old + torch.randn(B, R, generator=g) * 0.5
    garbage = torch.randn(3, B, R, generator=g) * 3
    old, logp, ref = (torch.where(mask, x, y) for x, y in zip((old, logp, ref), garbage))
    A = torch.tensor([1.3, -0.7, 0.4, -1.1])
    return logp, old, ref, A, mask


def by_hand(logp, old, ref, A, clip_low, clip_high, beta, loss_type, max_tokens):
    """grpo_loss written out in Python floats, token by token over the real ones."""
    per_row, total, count = [], 0.0, 0
    for i, L in enumerate(LENGTHS):
        row = 0.0
        for t in range(L):
            ratio = math.exp(logp[i, t].item() - old[i, t].item())
            a = A[i].item()
            surrogate = min(ratio * a, min(max(ratio, 1 - clip_low), 1 + clip_high) * a)
            d = ref[i, t].item() - logp[i, t].item()
            row += -surrogate + beta * (math.exp(d) - d - 1)
        per_row.append(row / L)
        total += row
        count += L
    B = len(LENGTHS)
    return {"grpo": sum(per_row) / B, "dr_grpo": total / (B * max_tokens), "dapo": total / count}[loss_type]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_averages_tokens_as_its_formula_says(mod, loss_type):
    """On rows of 6, 2, 4 and 1 real tokens with ratios in [0.5, 1.8] (clip_low 0.1,
    clip_high 0.3, beta 0.1): grpo is the mean over responses of each response's token mean,
    dr_grpo the token sum over B * max_tokens (10, neither R nor the token count), dapo the
    token sum over the real tokens, each equal to the loop; the KL figure is the mean k3 of
    the real tokens; what the padding holds changes nothing, and its gradient is 0."""
    logp, old, ref, A, mask = loss_batch()
    logp = logp.requires_grad_(True)
    loss, clip_frac, kl = mod.grpo_loss(logp, old, ref, A, mask, 0.1, 0.3, 0.1, loss_type, 10)
    assert loss.item() == pytest.approx(by_hand(logp, old, ref, A, 0.1, 0.3, 0.1, loss_type, 10), abs=1e-6)
    d = (ref - logp.detach())[mask]
    assert kl.item() == pytest.approx((d.exp() - d - 1).mean().item(), abs=1e-6)
    loss.backward()
    assert torch.equal(logp.grad[~mask], torch.zeros(int((~mask).sum())))
    g = torch.Generator().manual_seed(5)
    other = [torch.where(mask, x.detach(), torch.randn(x.shape, generator=g) * 5) for x in (logp, old, ref)]
    again = mod.grpo_loss(*other, A, mask, 0.1, 0.3, 0.1, loss_type, 10)
    assert again[0].item() == loss.item() and again[1].item() == clip_frac.item() and again[2].item() == kl.item()


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_ratio_1_gives_the_plain_policy_gradient(mod, loss_type):
    """With logp == old_logp (the first minibatch) and beta 0: the clip fraction is 0, the loss
    -sum(A) over the normalizer and d loss / d logp = -A_i / normalizer at each real token of
    row i (grpo: B |o_i|; dr_grpo: B max_tokens; dapo: the real tokens), 0 at padding. With
    beta 0.1 the KL adds beta (1 - exp(ref_logp - logp)) / normalizer."""
    _, old, ref, A, mask = loss_batch()
    B, N, max_tokens = len(LENGTHS), sum(LENGTHS), 8
    lengths = torch.tensor(LENGTHS, dtype=torch.float32)[:, None]
    norm = {"grpo": B * lengths, "dr_grpo": torch.tensor(float(B * max_tokens)), "dapo": torch.tensor(float(N))}[loss_type]
    for beta in (0.0, 0.1):
        logp = old.clone().requires_grad_(True)
        loss, clip_frac, _ = mod.grpo_loss(logp, old, ref, A, mask, 0.2, 0.2, beta, loss_type, max_tokens)
        assert clip_frac.item() == 0.0
        loss.backward()
        kl_grad = beta * (1 - (ref - old).exp())
        want = torch.where(mask, (-A[:, None] + kl_grad) / norm, torch.zeros_like(old))
        torch.testing.assert_close(logp.grad, want, atol=1e-7, rtol=1e-5, msg=f"beta {beta}")
        if beta == 0.0:
            plain = -(A[:, None] * mask / norm).sum().item()
            assert loss.item() == pytest.approx(plain, abs=1e-6)


def test_asymmetric_clipping_zeroes_the_gradient_exactly_where_the_formula_says(mod):
    """clip_low 0.1, clip_high 0.3, beta 0 (dapo: every token 1/N): the gradient w.r.t. logp
    is exactly 0 where A > 0 and ratio > 1.3, where A < 0 and ratio < 0.9, and at padding;
    -A ratio / N elsewhere, non-zero, including A > 0 with ratio in (1.1, 1.3] (a symmetric
    clip of 0.1 would freeze those) and ratios outside the range on the side that does not
    clip; the clip fraction is the share of real tokens with ratio < 0.9 or > 1.3."""
    g = torch.Generator().manual_seed(0)
    B, R, low, high = 8, 12, 0.1, 0.3
    mask = torch.arange(R)[None] < torch.tensor([12, 9, 5, 12, 3, 10, 11, 7])[:, None]
    old = -torch.rand(B, R, generator=g) * 4
    logp = (old + torch.empty(B, R).uniform_(math.log(0.5), math.log(1.8), generator=g)).requires_grad_(True)
    A = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, -0.9, 1.5, -0.2])
    loss, clip_frac, _ = mod.grpo_loss(logp, old, old, A, mask, low, high, 0.0, "dapo", R)
    loss.backward()
    ratio = (logp.detach() - old).exp()
    a = A[:, None].expand(B, R)
    frozen = ((a > 0) & (ratio > 1 + high)) | ((a < 0) & (ratio < 1 - low))
    live = mask & ~frozen
    assert (frozen & mask & (a > 0)).sum() >= 3 and (frozen & mask & (a < 0)).sum() >= 3  # both sides clip
    assert (live & (a > 0) & (ratio > 1 + low) & (ratio <= 1 + high)).sum() >= 3  # the asymmetry matters
    assert (live & (((a > 0) & (ratio < 1 - low)) | ((a < 0) & (ratio > 1 + high)))).sum() >= 3
    assert torch.equal(logp.grad[frozen | ~mask], torch.zeros(int((frozen | ~mask).sum())))
    want = torch.where(live, -a * ratio / mask.sum(), torch.zeros(B, R))
    torch.testing.assert_close(logp.grad, want, atol=1e-7, rtol=1e-5)
    assert (logp.grad[live] != 0).all()
    outside = ((ratio < 1 - low) | (ratio > 1 + high))[mask]
    assert clip_frac.item() == pytest.approx(outside.float().mean().item(), abs=1e-7)


# 9.2 The verifiable reward ---------------------------------------------------------------------------
def test_verifier_rewards_and_the_format_credit(mod):
    """answer_form writes each run of digits, lowercase or uppercase letters as one
    character; verifier_rewards gives 1 for a right reply, 0 for a wrong one, plus
    format_reward for a reply that ended and has the gold answer's form (a built-in task's
    solution, or the record's own "answer"); nothing for a reply that did not end, or to a
    prompt nothing can judge."""
    assert mod.answer_form("12 3") == "0 0" and mod.answer_form("Cat") == "Aa"
    assert mod.answer_form(" 1 2 4 ") == "0 0 0" and mod.answer_form("12 4") == "0 0"
    sort = mod.rl_record(mod.user_turn("Sort: 3 1 2"))
    paris = mod.rl_record(mod.user_turn("Capital of France?"), "Paris")
    story = mod.rl_record(mod.user_turn("Tell me a story"))
    cases = [  # record, reply, ended, reward with format_reward 0.25
        (sort, "1 2 3", True, 1.25), (sort, "1 2 4", True, 0.25), (sort, "12 4", True, 0.0),
        (sort, "1 2 4", False, 0.0), (sort, "1 2 3", False, 1.0), (sort, "a b c", True, 0.0),
        (paris, " Paris ", True, 1.25), (paris, "Rome", True, 0.25), (paris, "rome", True, 0.0),
        (paris, "Rome", False, 0.0), (story, "Once", True, 0.0), (story, "", True, 0.0),
    ]
    recs, replies, ended, want = map(list, zip(*cases))
    right = [mod.rl_check(r, reply) for r, reply in zip(recs, replies)]
    assert right[-2:] == [None, None]
    got = mod.verifier_rewards(recs, replies, ended, right, 0.25)
    assert got.dtype == torch.float32 and got.tolist() == want
    assert mod.verifier_rewards(recs, replies, ended, right, 0.0).tolist() == [float(bool(r)) for r in right]


# 9.1 Group rollouts ----------------------------------------------------------------------------------
# With the <|end|> logit raised by 6 the policy_model ends at once (the empty reply) some of
# the time, by 12 nearly always: a gold answer "" makes the reward 1 exactly then, NEVER makes
# it 0 always.
MIXED = ["Say nothing", "Hush", "Hi"]  # "": right about half the time


def test_group_rollout_lays_out_groups_and_their_advantages(mod):
    """group_rollout (no skipping): the G responses of each of rollout_batch / G prompts are
    rows g*G .. g*G + G - 1 (their prompt tokens are that prompt's, left-padded to P); the
    log-probs the update recomputes equal the sampler's (temperature 0.8) to 1e-5 on the
    real tokens; the reference's equal the policy's; each score is the verifier's (1 right,
    + format_reward for an ended reply of the answer's form) minus --missing_end_penalty for
    a reply that never ended; the advantages are group_advantages of the scores; the flat
    fraction is the share of groups whose scores are all equal (some are, some are not)."""
    tok = chat_tok(mod)
    cfg = grpo_cfg(mod, tok, rollout_batch=16, group_size=4, format_reward=0.5, missing_end_penalty=0.25,
                   temperature=0.8)
    recs = [rec(mod, tok, MIXED[0], ""), rec(mod, tok, "Reverse: abcdefgh", NEVER), rec(mod, tok, MIXED[1], ""),
            rec(mod, tok, "Sort: 3 1 2", None)]
    policy, ref, rm = mod.make_actors(policy_model(mod, tok, end_bias=6.0), None, cfg)
    assert rm is None and ref is not policy
    batch, frac = mod.group_rollout(policy, ref, rm, tok, iter([recs]), cfg, torch.float32,
                                    torch.Generator().manual_seed(0))
    G, m = 4, batch["resp_mask"]
    assert batch["idx"].size(0) == 16 and batch["raw"] is None and "values" not in batch
    for i in range(16):
        r = recs[i // G]
        prompt, _ = real_tokens(batch, i)
        assert prompt == r["ids"] and batch["mask"][i, :batch["P"] - len(r["ids"])].sum() == 0
        reply, ended = batch["replies"][i], bool(batch["ended"][i])
        right = mod.rl_check(r, reply)
        assert batch["right"][i] == right
        gold = r["answer"] if r["answer"] is not None else mod.task_of(r["prompt"]).solve(r["prompt"])
        want = float(bool(right)) + 0.5 * (ended and mod.answer_form(reply) == mod.answer_form(gold)) - 0.25 * (not ended)
        assert batch["score"][i].item() == pytest.approx(want, abs=1e-6), (i, reply, ended)
    assert ((batch["sample_logp"] - batch["logp"]).abs() * m).max().item() < 1e-5
    assert torch.equal(batch["logp"], batch["ref_logp"])
    adv, flat = mod.group_advantages(batch["score"], G, cfg.scale_rewards)
    assert torch.equal(batch["advantages"], adv)
    by_python = [len(set(g)) == 1 for g in batch["score"].view(-1, G).tolist()]
    assert flat.tolist() == by_python and 0 < sum(by_python) < 4
    assert frac == pytest.approx(sum(by_python) / 4)


def test_skip_flat_groups_draws_new_prompts_and_joins_the_rollouts(mod, monkeypatch):
    """--skip_flat_groups with max_draws 4 and rollout_batch 8 (2 prompts of G 4 a draw): the
    first draw has one flat group (NEVER: all 0), the second none, so two rollouts are drawn,
    12 rows kept and the first 8 returned: whole groups, none flat. The draws have different
    prompt and response widths; every returned row keeps its own rollout's real tokens,
    log-probs (the sampler's, the policy's and the reference's), entropy, score, advantage,
    reply and verdict, and the policy's forward over the joined layout gives the same
    log-probs. The flat fraction counts every group drawn (1 of 4), and drawn_score and
    drawn_right every response drawn."""
    tok = chat_tok(mod)
    cfg = grpo_cfg(mod, tok, rollout_batch=8, group_size=4, skip_flat_groups=True, max_draws=4)
    draws = [[rec(mod, tok, "Reverse: abcdefgh", NEVER), rec(mod, tok, "Hi", "")],
             [rec(mod, tok, "Hush", ""), rec(mod, tok, "Say nothing", "")],
             [rec(mod, tok, "Tell me a joke", "")] * 2, [rec(mod, tok, "Tell me a joke", "")] * 2]
    seen = spy_rollouts(mod, monkeypatch)
    policy, ref, rm = mod.make_actors(policy_model(mod, tok, end_bias=6.0), None, cfg)
    batch, frac = mod.group_rollout(policy, ref, rm, tok, iter(draws), cfg, torch.float32,
                                    torch.Generator().manual_seed(0))
    assert len(seen) == 2
    flats = [mod.group_advantages(b["score"], 4)[1].tolist() for _, b in seen]
    assert flats == [[True, False], [False, False]], flats
    assert frac == pytest.approx(0.25)
    assert len({b["P"] for _, b in seen}) == 2 and len({b["resp_mask"].size(1) for _, b in seen}) == 2
    sources = [(seen[0][1], i) for i in range(4, 8)] + [(seen[1][1], i) for i in range(8)]
    assert len(batch["replies"]) == batch["idx"].size(0) == 8 and batch["advantages"].shape == (8,)
    assert not mod.group_advantages(batch["score"], 4)[1].any()
    m = batch["resp_mask"]
    for i, (own, j) in enumerate(sources[:8]):
        assert real_tokens(batch, i) == real_tokens(own, j), i
        n = int(own["lengths"][j])
        assert m[i].sum() == n and batch["lengths"][i] == n and not m[i, n:].any()
        for key in ("logp", "sample_logp", "ref_logp", "entropy"):
            assert torch.equal(batch[key][i, :n], own[key][j, :n]), (i, key)
        for key in ("score", "advantages", "ended"):
            assert batch[key][i] == own[key][j], (i, key)
        assert batch["replies"][i] == own["replies"][j] and batch["right"][i] == own["right"][j]
    prompts = [real_tokens(batch, i)[0] for i in range(8)]
    assert all(prompts[i] == prompts[i // 4 * 4] for i in range(8)) and prompts[0] != prompts[4]
    with torch.no_grad():
        logp, _ = mod.response_logprobs(policy, batch["idx"], batch["mask"], batch["P"], cfg.temperature)
    assert ((logp - batch["logp"]).abs() * m).max().item() < 1e-5
    # the figures of the iteration read every response drawn, the flat group's too
    drawn = [b for _, b in seen]
    assert batch["drawn_right"] == drawn[0]["right"] + drawn[1]["right"]
    assert batch["drawn_score"].item() == pytest.approx(torch.cat([b["score"] for b in drawn]).mean().item())


def test_every_group_flat_gives_zero_advantages(mod, monkeypatch):
    """--skip_flat_groups where every group of every draw is flat (all 1, all 0): max_draws
    rollouts are drawn, and the batch returned has rollout_batch rows, all-zero advantages and
    a flat fraction of 1.0."""
    tok = chat_tok(mod)
    cfg = grpo_cfg(mod, tok, rollout_batch=8, group_size=4, skip_flat_groups=True, max_draws=3)
    draws = iter([[rec(mod, tok, "Hush", ""), rec(mod, tok, "Sort: 3 1 2", NEVER)]] * 5)
    seen = spy_rollouts(mod, monkeypatch)
    actors = mod.make_actors(policy_model(mod, tok, end_bias=12.0), None, cfg)
    batch, frac = mod.group_rollout(*actors, tok, draws, cfg, torch.float32, torch.Generator().manual_seed(0))
    assert len(seen) == 3 and frac == 1.0
    assert batch["idx"].size(0) == 8 and torch.equal(batch["advantages"], torch.zeros(8))
    assert batch["score"].tolist() == [1.0] * 4 + [0.0] * 4  # a flat group of 1s, one of 0s


# 9.4 The update ---------------------------------------------------------------------------------------
def test_grpo_update_trains_the_policy_alone(mod):
    """--reward rm: make_actors freezes the reference (a copy) and the reward model; a group
    rollout scored by the reward model and two passes of grpo_update (num_iterations 2) move
    the policy; the reference and the reward model stay as they were and get no gradient;
    the figures are grpo_loss, clip_frac and kl_penalty, finite, the KL above 0 once the
    policy has moved."""
    tok = chat_tok(mod)
    cfg = grpo_cfg(mod, tok, reward="rm", rollout_batch=8, group_size=4, grpo_minibatch=4, num_iterations=2,
                   grpo_lr=3e-3, beta=0.04)
    policy, rm = policy_model(mod, tok, end_bias=4.0), reward_model(mod, tok)
    start, rm_start = copy.deepcopy(policy.state_dict()), copy.deepcopy(rm.state_dict())
    policy, ref, rm = mod.make_actors(policy, rm, cfg)
    assert ref is not policy and not any(p.requires_grad for p in [*ref.parameters(), *rm.parameters()])
    assert all(p.requires_grad for p in policy.parameters())
    assert not (policy.training or ref.training or rm.training)
    recs = [rec(mod, tok, "Repeat: ab"), rec(mod, tok, "1 + 2 =")]
    batch, _ = mod.group_rollout(policy, ref, rm, tok, iter([recs]), cfg, torch.float32, torch.Generator().manual_seed(0))
    assert batch["raw"] is not None and batch["advantages"].abs().sum() > 0
    opt = mod.configure_optimizer(policy, dataclasses.replace(cfg, learning_rate=cfg.grpo_lr, weight_decay=0.0), "cpu")
    figures = mod.grpo_update(policy, opt, batch, cfg, torch.float32, torch.Generator().manual_seed(0))
    assert set(figures) == {"grpo_loss", "clip_frac", "kl_penalty"}
    assert all(math.isfinite(v.item()) for v in figures.values()) and figures["kl_penalty"].item() > 0
    assert any(not torch.equal(start[k], v) for k, v in policy.state_dict().items())
    assert all(torch.equal(start[k], v) for k, v in ref.state_dict().items())
    assert all(torch.equal(rm_start[k], v) for k, v in rm.state_dict().items())
    assert all(p.grad is None for p in [*ref.parameters(), *rm.parameters()])


# 9.5 A short run raises gold accuracy ----------------------------------------------------------------
def sampled_accuracy(mod, model, tok, prompts, cfg, n=64, seed=1):
    """The copy checker's accuracy of n answers per prompt at temperature 1."""
    convs = [mod.user_turn(p) for p in prompts for _ in range(n)]
    replies = mod.answer(model, tok, convs, cfg, torch.float32, temperature=1.0,
                         generator=torch.Generator().manual_seed(seed))
    return sum(mod.TASK_BY_NAME["copy"].check(c[0]["content"], r) for c, r in zip(convs, replies)) / len(convs)


def test_a_short_grpo_run_raises_gold_accuracy_on_copy(mod, tmp_path):
    """A tiny policy SFT'd briefly (120 steps) on the copy task with one-letter words (a-d)
    writes the right letter more often than chance (1 in 4), not always; 20 GRPO iterations
    of 8 prompts x 8 responses (two passes each) against the verifier raise its accuracy at
    temperature 1 (256 answers) by at least 20 points, and its greedy accuracy does not
    fall. Seed 0: 0.36 -> 0.81; over seeds 0-7 those whose SFT policy beats chance (0, 1, 5,
    6, 7) rise by 0.20-0.57; with the advantages' sign flipped seed 0 falls to 0.0."""
    tok = chat_tok(mod)
    cfg = tiny_cfg(mod, vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_embd=32, n_head=4, seed=0,
                   out_dir=str(tmp_path), sft_steps=120, sft_eval_interval=10**6, sft_batch_size=32, sft_lr=3e-3,
                   warmup_steps=5, **grpo_fields(
                       mod, max_answer_tokens=3, temperature=1.0, rollout_batch=64, group_size=8, grpo_minibatch=32,
                       num_iterations=2, grpo_lr=5e-3, beta=0.04, missing_end_penalty=1.0, grpo_iters=20,
                       grpo_eval_interval=20, log_interval=10**6))
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
    eval_set = {"copy": prompts, "add": ["1 + 2 ="]}
    before = sampled_accuracy(mod, policy, tok, prompts, cfg)
    greedy_before = mod.judge(policy, None, tok, eval_set, cfg, torch.float32)[0]["copy"]
    assert 0.3 < before < 0.6, before  # better than chance, not always right: something to reinforce
    groups = dataclasses.replace(cfg, rollout_batch=cfg.rollout_batch // cfg.group_size)  # prompts per rollout
    batches = mod.prompt_batches(groups, tok, [mod.rl_record(mod.user_turn(p)) for p in prompts], random.Random(0))
    policy, figures = mod.grpo(policy, None, tok, batches, eval_set, cfg, "cpu", torch.float32)
    after = sampled_accuracy(mod, policy, tok, prompts, cfg)
    assert after >= before + 0.2, (before, after)
    assert mod.judge(policy, None, tok, eval_set, cfg, torch.float32)[0]["copy"] >= greedy_before
    gold = [r["gold"] for r in read_metrics(tmp_path) if r["stage"] == "grpo"]
    assert len(gold) == 20 and sum(gold[-5:]) / 5 > sum(gold[:3]) / 3 + 0.1, gold
    assert figures["iterations"] == 20 and figures["logp_gap"] < 1e-4 and 0 <= figures["flat_group_fraction"] <= 1


# 9 Refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,word", [
    (["--group_size", "1"], "group_size"),
    (["--rollout_batch", "6", "--group_size", "4", "--grpo_minibatch", "2"], "multiple of --group_size"),
    (["--rollout_batch", "8", "--group_size", "2", "--grpo_minibatch", "3"], "grpo_minibatch"),
    (["--loss_type", "ppo"], "loss_type"),
    (["--scale_rewards", "std"], "scale_rewards"),
    (["--clip_low", "1"], "clip_low"),
    (["--temperature", "0"], "temperature"),
    (["--reward", "rm", "--gold_pairs", "0"], "--reward rm"),
    (["--preference_data", "x.jsonl"], "--reward verifier"),
])
def test_bad_grpo_flags_exit_2(mod, capsys, tmp_path, args, word):
    """Each bad GRPO flag: one 'error:' line naming it, exit 2, before any data is read."""
    assert word in expect_flag_error(capsys, mod, args, tmp_path)


def test_a_prompt_no_verifier_can_judge_exits_2(mod, capsys, tmp_path):
    """--prompt_data with a prompt of no built-in task and no gold answer: under --reward
    verifier one line naming the file's record and 'answer', exit 2, before anything is read
    or written; read_prompts accepts it under --reward rm (the reward model judges)."""
    lines = [{"prompt": "Say yes", "answer": "yes"}, {"prompt": "Repeat: ab"}, {"prompt": "Tell me a story"}]
    path = write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    err = expect_flag_error(capsys, mod, ["--prompt_data", path], tmp_path / "r")
    assert f"{path}:3" in err and "answer" in err, err
    assert not (tmp_path / "r" / "out").exists()
    tok = chat_tok(mod)
    got = mod.read_prompts(grpo_cfg(mod, tok, reward="rm", prompt_data=path, data_dir=str(tmp_path / "d")))
    assert [r["answer"] for r in got] == ["yes", None, None]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_nan_loss_stops_grpo_naming_the_iteration(mod, tmp_path, capsys, monkeypatch):
    """A loss that turns NaN (grpo_loss patched: the first minibatch of iteration 2) stops
    grpo() with one line naming the iteration and the saved one; grpo.pt still holds the
    finite policy of iteration 1, which load_model reads, and the sft.pt beside it is
    untouched. NaN at iteration 1: no policy saved, and the line says so."""
    tok = chat_tok(mod)
    real = mod.grpo_loss
    for nan_at, saved in ((3, 1), (1, None)):  # 2 minibatches per iteration
        out = tmp_path / f"nan{nan_at}"
        out.mkdir()
        cfg = grpo_cfg(mod, tok, out, rollout_batch=4, group_size=2, grpo_minibatch=2, grpo_iters=3,
                       grpo_eval_interval=1)
        mod.save_model(str(out / "sft.pt"), policy_model(mod, tok), cfg, tok)
        sft = digest(out / "sft.pt")
        calls = []

        def nan_once(*args, **kw):
            losses = real(*args, **kw)
            calls.append(1)
            return (losses[0] * float("nan"), *losses[1:]) if len(calls) == nan_at else losses

        monkeypatch.setattr(mod, "grpo_loss", nan_once)
        batches = mod.prompt_batches(dataclasses.replace(cfg, rollout_batch=2), tok,
                                     [mod.rl_record(mod.user_turn(p), "") for p in MIXED], random.Random(0))
        err = expect_exit_2(capsys, mod.grpo, policy_model(mod, tok, end_bias=6.0), None, tok, batches,
                            {"copy": ["Repeat: cat"], "add": ["3 + 4 ="]}, cfg, "cpu", torch.float32)
        monkeypatch.setattr(mod, "grpo_loss", real)
        it = 1 if saved is None else 2
        assert f"iteration {it}" in err and "nan" in err.lower(), err
        assert [r["grpo_iter"] for r in read_metrics(out) if r.get("stage") == "grpo"] == list(range(1, it))
        assert digest(out / "sft.pt") == sft
        if saved is None:
            assert "no GRPO policy" in err and not (out / "grpo.pt").exists(), err
            continue
        assert f"iteration {saved}" in err and "grpo.pt" in err, err
        assert torch.load(out / "grpo.pt", weights_only=True)["grpo_iter"] == saved
        _, _, loaded = mod.load_model(cfg, str(out / "grpo.pt"), "cpu")
        assert all(torch.isfinite(p).all() for p in loaded.parameters())


# 9 main() ---------------------------------------------------------------------------------------------
def main_flags(mod, root, **kw):
    values = dict(data=str(SHAKESPEARE), data_dir=str(root / "data"), out_dir=str(root / "out"), device="cpu",
                  dtype="float32", seed=0, n_layer=1, n_head=2, n_embd=32, block_size=64, max_steps=4, eval_interval=2,
                  eval_iters=1, log_interval=1, warmup_steps=1, num_samples=1, max_new_tokens=4,
                  sft_examples=14, sft_val_examples=7, sft_steps=2, sft_eval_interval=2, sft_batch_size=4,
                  sft_method="full", eval_prompts=1, pass_k=1, max_answer_tokens=4,
                  gold_pairs=100, policy_prompts=7, policy_samples=2, rm_eval_prompts=1, rm_steps=2,
                  rm_eval_interval=2, rm_batch_size=4,
                  **{k: v for k, v in grpo_fields(mod).items() if k not in ("max_answer_tokens", "log_interval")})
    values.update(grpo_iters=2, rollout_batch=4, group_size=2, grpo_minibatch=2, grpo_eval_interval=1,
                  control="true", skip_flat_groups="false")
    values.update(kw)  # every stage flag explicit: conftest's load() puts tiny stage flags first
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


@pytest.fixture(scope="module", params=GRPO)
def tiny_run(request, tmp_path_factory):
    """One tiny main(): pretraining, SFT, 2 GRPO iterations against the verifier and the
    control. Returns (the module, flags, out_dir)."""
    mod = load(request.param)
    root = tmp_path_factory.mktemp(request.param)
    assert SHAKESPEARE.exists(), f"test data missing: {SHAKESPEARE}"
    args = main_flags(mod, root)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mod.main(args)
    finally:
        torch.set_num_threads(n)
    return mod, args, root / "out"


def test_main_writes_the_documented_summary_and_policy(tiny_run):
    """main() with --reward verifier: summary.json holds gold_accuracy {sft, rl, sft_more}
    (every task, easy, hard, overall), rm_score (None for each: no reward model),
    sampled_accuracy for the same three, kl, flat_group_fraction in [0, 1], wall_s and grpo
    (the last iteration's figures, the sampler's log-probs matched); metrics.jsonl has a
    "grpo" row per iteration and a "grpo_eval" row per evaluation; no reward model is
    trained; grpo.pt (iteration 2) loads with load_model and reproduces the RL policy's
    gold and sampled accuracy."""
    mod, args, out = tiny_run
    summary = read_summary(out)
    assert set(summary["gold_accuracy"]) == {"sft", "rl", "sft_more"}
    for acc in summary["gold_accuracy"].values():
        check_accuracy(mod, acc)
    assert summary["rm_score"] == {"sft": None, "rl": None, "sft_more": None}
    assert math.isfinite(summary["kl"]) and summary["wall_s"] > 0 and summary["rl_s"] > 0
    assert 0.0 <= summary["flat_group_fraction"] <= 1.0
    sampled = summary["sampled_accuracy"]  # pass@k and the share of right samples, each model
    assert set(sampled) == {"sft", "rl", "sft_more"}
    assert sampled["sft"] == summary["pass_at_k"]  # the same SFT model, prompts and sampler seed
    assert all(0.0 <= v["sampled"]["hard"] <= v["hard"] <= 1.0 for v in sampled.values())
    grpo = summary["grpo"]
    for key in ("grpo_loss", "clip_frac", "kl_penalty", "score", "kl", "entropy", "length", "ended"):
        assert math.isfinite(grpo[key]), key
    assert grpo["grpo_iter"] == 2 and grpo["kl"] == summary["kl"] and 0 <= grpo["logp_gap"] < 1e-4
    assert 0.0 <= grpo["clip_frac"] <= 1.0 and 0.0 <= grpo["flat_groups"] <= 1.0
    assert "raw_score" not in grpo and grpo["flat_group_fraction"] == summary["flat_group_fraction"]
    rows = read_metrics(out)
    iters = [r for r in rows if r.get("stage") == "grpo"]
    assert [r["grpo_iter"] for r in iters] == [1, 2]
    assert summary["flat_group_fraction"] == pytest.approx(sum(r["flat_groups"] for r in iters) / 2)
    evals = [r for r in rows if r.get("stage") == "grpo_eval"]
    assert [r["grpo_iter"] for r in evals] == [1, 2]
    assert evals[-1]["gold_hard"] == summary["gold_accuracy"]["rl"]["hard"]
    assert any(r.get("stage") == "sft_more" for r in rows)  # the control trained
    assert not any(r.get("stage") in ("ppo", "reward") for r in rows)
    for name in ("ckpt.pt", "sft.pt", "grpo.pt", "summary.json", "samples.txt"):
        assert (out / name).is_file(), name
    assert not (out / "reward.pt").exists() and not (out / "ppo.pt").exists()
    assert torch.load(out / "grpo.pt", weights_only=True)["grpo_iter"] == 2
    cfg, tok, policy = mod.load_model(mod.parse_args(args), str(out / "grpo.pt"), "cpu")
    gold, proxy = mod.judge(policy, None, tok, mod.eval_prompts(cfg), cfg, torch.float32)
    assert gold == pytest.approx(summary["gold_accuracy"]["rl"]) and proxy is None
    again = mod.pass_at_k(policy, tok, mod.eval_prompts(cfg), cfg, torch.float32, cfg.pass_k)
    assert again == summary["sampled_accuracy"]["rl"]


def test_init_from_skips_pretraining(tiny_run, tmp_path):
    """--init_from sft.pt: no pretraining (no ckpt.pt), no SFT, no control (--control
    false); the SFT figures equal the first run's (the same policy); GRPO runs and writes
    grpo.pt."""
    mod, args, out = tiny_run
    run = tmp_path / "run"
    summary = mod.main(args + ["--init_from", str(out / "sft.pt"), "--out_dir", str(run), "--control", "false"])
    assert read_summary(run)["gold_accuracy"] == summary["gold_accuracy"]
    assert set(summary["gold_accuracy"]) == {"sft", "rl"} and summary["init_from"] == str(out / "sft.pt")
    assert summary["gold_accuracy"]["sft"] == read_summary(out)["gold_accuracy"]["sft"]
    assert (run / "grpo.pt").is_file() and not (run / "ckpt.pt").exists() and not (run / "reward.pt").exists()
    rows = read_metrics(run)
    assert [r["grpo_iter"] for r in rows if r.get("stage") == "grpo"] == [1, 2]
    assert not any(r.get("stage") in ("sft", "reward", "sft_more") for r in rows)


def test_reward_rm_scores_with_the_reward_model(tiny_run, tmp_path, monkeypatch):
    """--reward rm --reward_model FILE (a reward.pt with a random head and a normalization;
    with --init_from): no reward model is trained; every rollout's raw scores are that
    reward model's of its rows and the scores its shaped ones (normalized, the length
    penalty, clipped to --reward_clip 5) minus --missing_end_penalty; every "grpo" row has raw_score; the summary's
    rm_score of the SFT policy is judge()'s with it."""
    mod, args, out = tiny_run
    tok = chat_tok(mod)
    rm = reward_model(mod, tok, norm={"mean": 0.3, "std": 2.0})
    path = str(tmp_path / "rm.pt")
    mod.save_model(path, rm.gpt, tiny_cfg(mod, vocab_size=tok.vocab_size, block_size=64, tokenizer="byte"), tok,
                   kind="reward", head=rm.head.state_dict(), reward_norm=rm.norm)
    seen = spy_rollouts(mod, monkeypatch)
    run = tmp_path / "run"
    summary = mod.main(args + ["--init_from", str(out / "sft.pt"), "--out_dir", str(run), "--control", "false",
                               "--reward", "rm", "--reward_model", path, "--length_penalty", "0.01",
                               "--missing_end_penalty", "0.5"])
    assert not (run / "reward.pt").exists() and (run / "grpo.pt").is_file()
    cfg = mod.parse_args(args)
    _, _, rm = mod.load_model(cfg, path, "cpu", kind="reward")
    _, _, sft = mod.load_model(cfg, str(out / "sft.pt"), "cpu")
    assert rm.norm == {"mean": 0.3, "std": 2.0} and len(seen) == 2
    with torch.no_grad():
        for _, batch in seen:
            raw = rm(batch["idx"], batch["mask"])
            torch.testing.assert_close(batch["raw"], raw, atol=1e-5, rtol=0)
            shaped = ((raw - 0.3) / 2.0 - 0.01 * batch["lengths"].float()).clamp(-5.0, 5.0) - 0.5 * (~batch["ended"]).float()
            torch.testing.assert_close(batch["score"], shaped, atol=1e-5, rtol=0)
    rows = [r for r in read_metrics(run) if r.get("stage") == "grpo"]
    assert len(rows) == 2 and all(math.isfinite(r["raw_score"]) for r in rows)
    proxy = mod.judge(sft, rm, tok, mod.eval_prompts(cfg), dataclasses.replace(cfg, length_penalty=0.01),
                      torch.float32)[1]
    assert summary["rm_score"]["sft"] == pytest.approx(proxy, abs=1e-5)
    assert all(math.isfinite(v) for v in summary["rm_score"].values())


PROMPT_RECORDS = [
    {"prompt": "Say yes", "answer": "yes"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say no"}], "answer": " no "},
    {"prompt": "Repeat: ab"},  # a built-in task's prompt: its checker judges
]


def test_prompt_data_feeds_the_groups(tiny_run, tmp_path, monkeypatch):
    """main() --prompt_data FILE (with --init_from): every rollout's prompts come from the
    file, rendered from its messages, each repeated G times in consecutive rows; the verifier
    uses the file's answers (or the task's checker), so every iteration has a gold figure."""
    mod, args, out = tiny_run
    path = write(tmp_path / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in PROMPT_RECORDS))
    seen = spy_rollouts(mod, monkeypatch)
    run = tmp_path / "run"
    mod.main(args + ["--init_from", str(out / "sft.pt"), "--out_dir", str(run), "--control", "false",
                     "--prompt_data", path])
    tok = chat_tok(mod)
    want = {"Say yes": ("yes", mod.user_turn("Say yes")), "Say no": (" no ", PROMPT_RECORDS[1]["messages"]),
            "Repeat: ab": (None, mod.user_turn("Repeat: ab"))}
    assert len(seen) == 2 and all(len(records) == 4 for records, _ in seen)
    for records, batch in seen:
        assert [r["prompt"] for r in records[::2]] == [r["prompt"] for r in records[1::2]]  # G 2: pairs
        for r, reply, right in zip(records, batch["replies"], batch["right"]):
            answer, messages = want[r["prompt"]]
            assert r["answer"] == answer and r["messages"] == messages
            assert r["ids"] == mod.render_chat(tok, messages, generation_prompt=True)[0]
            assert right == mod.rl_check(r, reply) and right is not None
    rows = [r for r in read_metrics(run) if r.get("stage") == "grpo"]
    assert len(rows) == 2 and all(0.0 <= r["gold"] <= 1.0 for r in rows)
