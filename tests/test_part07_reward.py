"""Part 07: the reward model. The Bradley-Terry loss against its formula (margin,
centering), the head against the hidden state of the last real token (alone, right- and
left-padded, any pad id) and the padding check against a head that reads padding,
preference records in every format (prompt/chosen/rejected strings, TRL messages, implicit
prompts, Anthropic HH transcripts) against the same ids, accuracy under swapped labels,
reward shaping, the checks (AUC, correlation, calibration) against brute force, corruptions
against the task checkers, on-policy pairs, a short training run that raises held-out pair
accuracy, main() end to end, --score, --preference_data's dropped pairs, the refusals, and
the normalization when there are too few policy samples to measure it."""
import collections
import json
import math
import random
import re

import numpy as np
import pytest
import torch

from conftest import (SHAKESPEARE, expect_exit_2, expect_flag_error, load, part_names, read_metrics,
                      read_summary, tiny_gpt, write)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest

REWARD = part_names(7, 9)  # parts 08-09 optimize against this reward model: its API stays


@pytest.fixture(params=REWARD)
def mod(request):
    return load(request.param)


def chat_tok(mod):
    return mod.ByteTokenizer(mod.CHAT_TOKENS)


def reward_model(mod, tok, seed=0, **kw):
    """A RewardModel on a tiny, perturbed GPT of the part's defaults, with a random,
    non-zero head (a fresh head is zero: every reward 0, and equality tests would not bite)."""
    rm = mod.RewardModel(tiny_gpt(mod, seed=seed, vocab_size=tok.vocab_size, block_size=64, **kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        rm.head.weight.copy_(torch.randn(rm.head.weight.shape, generator=g))
        rm.head.bias.fill_(0.3)
    return rm


def conversation(mod, tok, prompt, reply):
    """The ids the reward model reads: a user turn and the assistant's reply."""
    return mod.render_chat(tok, mod.user_turn(prompt) + [{"role": "assistant", "content": reply}])[0]


# 7.3 The loss -------------------------------------------------------------------------------
def test_reward_loss_is_bradley_terry_with_margin_and_centering(mod):
    """reward_loss is log 2 at equal rewards whatever their value; it falls strictly as the
    chosen reward rises; with a margin m (a number, or one per pair) it is the mean of
    -log sigmoid(r_c - r_r - m) computed here in float64; center_coef adds
    coef * mean((r_c + r_r)^2); its gradient raises r_c and lowers r_r."""
    for v in (-3.0, 0.0, 2.5, 100.0):
        r = torch.full((4,), v)
        assert mod.reward_loss(r, r).item() == pytest.approx(math.log(2), abs=1e-6), v
    rr = torch.tensor([0.7])
    losses = [mod.reward_loss(torch.tensor([c]), rr).item() for c in torch.linspace(-6, 6, 25).tolist()]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses

    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(16, generator=g) * 2, torch.randn(16, generator=g) * 2
    per_pair = torch.rand(16, generator=g) * 2

    def by_hand(m, coef=0.0):
        d = rc.double() - rr.double() - (m.double() if torch.is_tensor(m) else m)
        bt = torch.log1p(torch.exp(-d)).mean().item()  # -log sigmoid(d) = log(1 + e^-d)
        return bt + coef * ((rc.double() + rr.double()) ** 2).mean().item()

    for m in (0.0, 0.5, per_pair):
        assert mod.reward_loss(rc, rr, m).item() == pytest.approx(by_hand(m), abs=1e-5)
        assert mod.reward_loss(rc, rr, m, 0.01).item() == pytest.approx(by_hand(m, 0.01), abs=1e-5)
        extra = mod.reward_loss(rc, rr, m, 0.3).item() - mod.reward_loss(rc, rr, m).item()
        assert extra == pytest.approx(0.3 * ((rc + rr) ** 2).mean().item(), rel=1e-5)
    assert mod.reward_loss(rc, rr, 1.0).item() > mod.reward_loss(rc, rr).item()  # a margin asks for more

    rc, rr = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    mod.reward_loss(rc, rr).backward()
    torch.testing.assert_close(rc.grad, torch.full((3,), -0.5 / 3))  # d/dr_c of -log sigmoid at 0: -1/2
    torch.testing.assert_close(rr.grad, torch.full((3,), 0.5 / 3))


# 7.2 The head reads the last real token ------------------------------------------------------
VARIANTS = {
    "rope": dict(),
    "learned": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "moe": dict(n_experts=4, moe_top_k=2, capacity_factor=0.0),
}
ROWS = [  # (prompt, reply) of different lengths
    ("Reverse: cat", "tac"),
    ("12 + 30 =", "42"),
    ("Sort: 3 1 2 9 8 7", "1 2 3 7 8 9"),
    ("Uppercase: x", "X"),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_reads_the_last_real_token(mod, variant):
    """Each conversation's reward is the same alone, inside a right-padded batch and inside
    a left-padded batch of rows of other lengths (and score_rows, a few rows at a time),
    whatever the pad id; it equals head(final hidden state at the last real position),
    computed here from GPT.forward(return_hidden=True); a different last token changes it.
    GPT.forward(return_hidden=True) then lm_head gives the normal forward's logits."""
    tok = chat_tok(mod)
    rm = reward_model(mod, tok, **VARIANTS[variant])
    rows = [conversation(mod, tok, p, r) for p, r in ROWS]
    assert len(set(map(len, rows))) == len(rows)
    pad = tok.special["<|pad|>"]
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.bool))[0] for row in rows])
        hidden = [rm.gpt(torch.tensor([row]), return_hidden=True) for row in rows]  # (1, T, C) each
        by_hand = torch.stack([rm.head(h[0, -1])[0] for h in hidden])
        torch.testing.assert_close(alone, by_hand, atol=1e-6, rtol=0)
        x = torch.tensor([rows[2]])
        torch.testing.assert_close(rm.gpt.lm_head(hidden[2]), rm.gpt(x)[0], atol=1e-6, rtol=0)
        assert hidden[2].shape == (1, len(rows[2]), rm.cfg.n_embd)

        T = max(map(len, rows))
        for left in (False, True):
            batches = []
            for pad_id in (pad, 0, 97):
                idx, mask = mod.pad_rows(rows, pad_id, "cpu", left=left)
                assert idx.shape == mask.shape == (len(rows), T) and mask.sum().item() == sum(map(len, rows))
                for i, row in enumerate(rows):
                    real = slice(T - len(row), T) if left else slice(0, len(row))
                    assert idx[i, real].tolist() == row and mask[i, real].all()
                    assert mask[i].sum().item() == len(row) and (idx[i][~mask[i]] == pad_id).all()
                batches.append(rm(idx, mask))
                torch.testing.assert_close(batches[-1], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(batches[1], batches[0], atol=1e-5, rtol=0)  # the pad id is never read
            torch.testing.assert_close(batches[2], batches[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(mod.score_rows(rm, rows, pad, torch.float32, left=left, batch=3), alone,
                                       atol=1e-5, rtol=0)
        assert mod.padding_invariance(rm, rows, pad, torch.float32) < 1e-5

        changed = rows[1][:-1] + [tok.encode("!")[0]]  # the last real token: <|end|> -> "!"
        other = rm(torch.tensor([changed]), torch.ones(1, len(changed), dtype=torch.bool))[0]
        assert abs(other - alone[1]).item() > 1e-3
        mixed = [changed, rows[0]]  # and inside a batch, that row alone moves
        for left in (False, True):
            r = rm(*mod.pad_rows(mixed, pad, "cpu", left=left))
            torch.testing.assert_close(r, torch.stack([other, alone[0]]), atol=1e-5, rtol=0)


def test_padding_invariance_catches_a_head_that_reads_padding(mod):
    """padding_invariance, the check of 7.4, is ~1e-6 for the RewardModel and large for a
    broken one whose head reads the last column of the batch (padding, on the right)."""
    tok = chat_tok(mod)
    rm = reward_model(mod, tok)
    rows = [conversation(mod, tok, p, r) for p, r in ROWS]
    pad = tok.special["<|pad|>"]

    class LastColumn(mod.RewardModel):
        def forward(self, idx, mask):
            return self.head(self.gpt(idx, return_hidden=True)[:, -1]).squeeze(-1)

    broken = LastColumn(rm.gpt)
    broken.head.load_state_dict(rm.head.state_dict())
    assert mod.padding_invariance(rm, rows, pad, torch.float32) < 1e-5
    assert mod.padding_invariance(broken, rows, pad, torch.float32) > 1e-2


def test_validation_loss_uses_each_pairs_own_margin(mod):
    """validate_reward: accuracy is the fraction of positive margins; the loss is
    reward_loss with --margin where a pair has none, and the pair's own "margin" where it
    has one (a file's margin wins over the flag)."""
    tok = chat_tok(mod)
    rm = reward_model(mod, tok, seed=1)
    pad = tok.special["<|pad|>"]
    pairs = held_out_pairs(mod, tok, n=3)
    own = torch.tensor([0.5 * (i % 3) for i in range(len(pairs))])
    pairs = [{**p, "margin": m if i % 2 else None} for i, (p, m) in enumerate(zip(pairs, own.tolist()))]
    margins = mod.pair_margins(rm, pairs, pad, torch.float32)
    cfg = mod.Config(margin=1.0)
    want = torch.tensor([m if i % 2 else 1.0 for i, m in enumerate(own.tolist())])
    acc, loss = mod.validate_reward(rm, pairs, pad, cfg, torch.float32)
    assert acc == pytest.approx((margins > 0).float().mean().item())
    assert loss == pytest.approx(mod.reward_loss(margins, torch.zeros_like(margins), want).item(), abs=1e-6)
    assert loss != pytest.approx(mod.reward_loss(margins, torch.zeros_like(margins), 1.0).item(), abs=1e-4)


def test_a_fresh_head_gives_every_reply_reward_zero(mod):
    """RewardModel starts its head at zero (every reward 0: the loss starts at log 2), keeps
    the GPT it was given, and carries the normalization {mean 0, std 1} until told otherwise."""
    tok = chat_tok(mod)
    gpt = tiny_gpt(mod, vocab_size=tok.vocab_size, block_size=64)
    rm = mod.RewardModel(gpt)
    assert rm.gpt is gpt and rm.norm == {"mean": 0.0, "std": 1.0}
    rows = [conversation(mod, tok, p, r) for p, r in ROWS]
    assert torch.equal(mod.score_rows(rm, rows, tok.special["<|pad|>"], torch.float32), torch.zeros(len(rows)))
    assert mod.RewardModel(gpt, {"mean": 2.0, "std": 3.0}).norm == {"mean": 2.0, "std": 3.0}


# 7.1 Preference records -----------------------------------------------------------------------
def test_split_hh_takes_the_last_assistant_turn(mod, capsys):
    """split_hh: the messages before the last assistant turn (user/assistant roles, text
    stripped, one newline inside a turn kept) and that turn's text; a transcript without
    its leading blank line reads the same; one with no assistant turn, or that does not
    start with a human turn, exits 2 naming where it was."""
    text = ("\n\nHuman: Hi!\nWho are you? \n\nAssistant:  A model.\n\nHuman: Reverse: cat"
            "\n\nAssistant: tac ")
    messages, reply = mod.split_hh(text, "f.jsonl:1")
    assert messages == [{"role": "user", "content": "Hi!\nWho are you?"},
                        {"role": "assistant", "content": "A model."},
                        {"role": "user", "content": "Reverse: cat"}]
    assert reply == "tac"
    assert mod.split_hh(text.lstrip("\n"), "x") == (messages, reply)
    assert mod.split_hh("\n\nHuman: hi\n\nAssistant:", "x") == ([{"role": "user", "content": "hi"}], "")
    for bad, word in (("\n\nHuman: hi there", "assistant"), ("Preamble\n\nHuman: hi\n\nAssistant: yo", "Human")):
        err = expect_exit_2(capsys, mod.split_hh, bad, "f.jsonl:9")
        assert "f.jsonl:9" in err and word in err, err


SINGLE = [  # one pair (Reverse: cat -> tac over act) in each record format
    {"prompt": "Reverse: cat", "chosen": "tac", "rejected": "act"},
    {"prompt": [{"role": "user", "content": "Reverse: cat"}],  # TRL conversational
     "chosen": [{"role": "assistant", "content": "tac"}], "rejected": [{"role": "assistant", "content": "act"}]},
    {"chosen": [{"role": "user", "content": "Reverse: cat"}, {"role": "assistant", "content": "tac"}],  # implicit
     "rejected": [{"role": "user", "content": "Reverse: cat"}, {"role": "assistant", "content": "act"}]},
    {"chosen": "\n\nHuman: Reverse: cat\n\nAssistant: tac", "rejected": "\n\nHuman: Reverse: cat\n\nAssistant: act"},
]
TURNS = [{"role": "user", "content": "Hi!\nWho are you?"}, {"role": "assistant", "content": "A model."},
         {"role": "user", "content": "Reverse: cat"}]
HH = "\n\nHuman: Hi!\nWho are you?\n\nAssistant: A model.\n\nHuman: Reverse: cat\n\nAssistant: "
MULTI = [  # a multi-turn pair in each format that can hold one
    {"prompt": TURNS, "chosen": [{"role": "assistant", "content": "tac"}],
     "rejected": [{"role": "assistant", "content": "act"}]},
    {"prompt": TURNS[:1], "chosen": TURNS[1:] + [{"role": "assistant", "content": "tac"}],  # lists extend the prompt
     "rejected": TURNS[1:] + [{"role": "assistant", "content": "act"}]},
    {"chosen": TURNS + [{"role": "assistant", "content": "tac"}],
     "rejected": TURNS + [{"role": "assistant", "content": "act"}]},
    {"chosen": HH + "tac", "rejected": HH + "act"},
]


def test_preference_formats_load_to_the_same_ids(mod, tmp_path):
    """prompt/chosen/rejected strings, TRL conversational records (prompt messages, replies
    as assistant messages), implicit-prompt messages and HH transcripts of one pair give the
    same prompt, replies and encoded ids, single- and multi-turn, as JSON Lines and as a JSON
    array; to_pair carries a record's "margin"; encode_pairs renders chosen and rejected
    with the chat template and leaves out (and counts) a pair longer than block_size."""
    tok = chat_tok(mod)
    for records, turns in ((SINGLE, TURNS[2:]), (MULTI, TURNS)):
        for r in records:
            assert mod.to_pair(r, "x") == (turns, "tac", "act", None), r
        want = [mod.render_chat(tok, turns + [{"role": "assistant", "content": c}])[0] for c in ("tac", "act")]
        for i, r in enumerate(records):
            for path in (write(tmp_path / f"p{i}.jsonl", json.dumps(r) + "\n"),
                         write(tmp_path / f"p{i}.json", json.dumps([r], indent=1))):
                cfg = mod.Config(preference_data=path, data_dir=str(tmp_path / "d"))
                pairs, dropped = mod.preference_pairs(cfg)
                assert dropped == 0 and len(pairs) == 1
                assert pairs[0]["source"] == "file" and pairs[0]["margin"] is None
                encoded, too_long = mod.encode_pairs(tok, pairs, 256)
                assert too_long == 0 and encoded[0]["ids"] == want, (i, path)
    assert mod.to_pair({**SINGLE[0], "margin": 1.5}, "x")[3] == 1.5
    assert mod.to_pair({**SINGLE[3], "margin": 0}, "x")[3] == 0
    cfg = mod.Config(preference_data=write(tmp_path / "m.jsonl", json.dumps({**MULTI[0], "margin": 2}) + "\n"),
                     data_dir=str(tmp_path / "d"))
    assert mod.preference_pairs(cfg)[0][0]["margin"] == 2
    pair = mod.preference(TURNS[2:], "tac", "act" * 30, "file")
    short = mod.preference(TURNS[2:], "tac", "act", "file")
    encoded, too_long = mod.encode_pairs(tok, [pair, short], 40)
    assert too_long == 1 and [p["rejected"] for p in encoded] == ["act"]


def test_bad_preference_records_exit_2(mod, capsys):
    """A record without "chosen" or "rejected", a reply that is neither text nor messages,
    messages that do not end with the assistant, an unknown role, a negative or non-number
    margin: exit 2 with one line naming the record; two HH transcripts that differ before
    the last reply are no pair (None: dropped by the caller)."""
    cases = {
        "rejected": {"prompt": "x", "chosen": "y"},
        "chosen": {"prompt": "x", "rejected": "y"},
        "string": {"prompt": "x", "chosen": 3, "rejected": "y"},
        "assistant": {"prompt": "x", "chosen": [{"role": "user", "content": "y"}], "rejected": "z"},
        "role": {"chosen": [{"role": "robot", "content": "y"}], "rejected": "z"},
        "margin": {**SINGLE[0], "margin": -1},
    }
    for word, record in cases.items():
        err = expect_exit_2(capsys, mod.to_pair, record, "f.jsonl:7")
        assert "f.jsonl:7" in err and word in err, (word, err)
    for margin in ("1", True, float("nan")):
        assert "margin" in expect_exit_2(capsys, mod.to_pair, {**SINGLE[0], "margin": margin}, "f.jsonl:7")
    assert mod.to_pair({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
                       "x") is None


# 7.1 Corruptions and on-policy pairs -----------------------------------------------------------
def test_corruptions_are_wrong_answers_that_look_right(mod):
    """corrupt(), on many prompts of every task: each kind that returns an answer changes
    the gold one as documented (off_by_one: one number +-1 or one letter one step; swap: the
    same characters or items in another order; truncate: the last one dropped; format: the
    gold answer inside other text), and the task's checker rejects it; gold_pairs(every_kind)
    gives exactly those, with their kind, and gold_pairs gives one pair per prompt."""
    rng = random.Random(0)
    prompts = {t.name: mod.task_prompts(t, 60, False, rng) for t in mod.TASKS}
    want, kinds = [], collections.Counter()
    made = random.Random(1)
    for name, ps in prompts.items():
        task = mod.TASK_BY_NAME[name]
        for p in ps:
            gold = task.solve(p)
            sep = " " if " " in gold else ""
            items = gold.split(" ") if sep else list(gold)
            for kind in mod.CORRUPTIONS:
                wrong = mod.corrupt(gold, kind, made)
                if wrong is None:
                    continue
                assert wrong != gold and not task.check(p, wrong), (name, p, kind, wrong)
                if kind == "off_by_one":
                    a, b = re.findall(r"\d+|\D", gold), re.findall(r"\d+|\D", wrong)
                    diff = [(x, y) for x, y in zip(a, b) if x != y]
                    assert len(a) == len(b) and len(diff) == 1, (gold, wrong)
                    x, y = diff[0]
                    assert (abs(int(x) - int(y)) == 1 if x.isdigit() else
                            (ord(y.lower()) - ord(x.lower())) % 26 in (1, 25)), (gold, wrong)
                elif kind == "swap":
                    assert sorted(wrong.split(" ") if sep else wrong) == sorted(items), (gold, wrong)
                elif kind == "truncate":
                    assert wrong == sep.join(items[:-1]), (gold, wrong)
                else:
                    assert gold in wrong and wrong != gold
                want.append((p, gold, wrong, kind))
                kinds[kind] += 1
    assert set(kinds) == set(mod.CORRUPTIONS)  # every kind applies somewhere
    pairs = mod.gold_pairs(prompts, random.Random(1), every_kind=True)  # the same draws, in the same order
    assert [(p["prompt"], p["chosen"], p["rejected"], p["kind"]) for p in pairs] == \
        [(mod.user_turn(p), g, w, k) for p, g, w, k in want]
    assert all(p["source"] == "gold" and mod.TASK_BY_NAME[p["task"]].check(p["prompt"][0]["content"], p["chosen"])
               for p in pairs)
    one = mod.gold_pairs(prompts, random.Random(2))
    assert [p["prompt"][0]["content"] for p in one] == [p for ps in prompts.values() for p in ps]
    assert all(not mod.TASK_BY_NAME[p["task"]].check(p["prompt"][0]["content"], p["rejected"]) for p in one)
    assert len({p["kind"] for p in one}) == len(mod.CORRUPTIONS)  # drawn at random, not always the first


def test_on_policy_pairs_match_every_right_reply_with_every_wrong_one(mod):
    """on_policy_pairs: on each prompt, each distinct right reply against each distinct wrong
    one (repeats count once); a prompt the policy always gets right, or always wrong, gives
    no pair."""
    samples = [{"task": "add", "prompt": "1 + 2 =", "reply": r, "right": r.strip() == "3"}
               for r in ("3", "4", "3", " 3", "5", "4")]
    samples += [{"task": "copy", "prompt": "Repeat: ab", "reply": "ab", "right": True}] * 3
    samples += [{"task": "copy", "prompt": "Repeat: cd", "reply": r, "right": False} for r in ("c", "dc")]
    pairs = mod.on_policy_pairs(samples)
    got = {(p["prompt"][0]["content"], p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("1 + 2 =", c, r) for c in ("3", " 3") for r in ("4", "5")} and len(pairs) == 4
    assert all(p["source"] == "on_policy" and p["task"] == "add" and p["margin"] is None for p in pairs)


# 7.4 Accuracy and the checks ----------------------------------------------------------------------
def held_out_pairs(mod, tok, n=12, seed=0):
    """Gold-vs-corrupted pairs of every kind on held-out prompts of every task, encoded."""
    rng = random.Random(seed)
    prompts = {t.name: mod.task_prompts(t, n, True, rng) for t in mod.TASKS}
    pairs, _ = mod.encode_pairs(tok, mod.gold_pairs(prompts, rng, every_kind=True), 64)
    return pairs


def test_swapping_chosen_and_rejected_turns_accuracy_a_into_1_minus_a(mod):
    """pair_margins is r_chosen - r_rejected; with the labels swapped in every pair the
    margins change sign, and accuracy_by (per source and per kind) turns a into 1 - a."""
    tok = chat_tok(mod)
    rm = reward_model(mod, tok, seed=3)
    pad = tok.special["<|pad|>"]
    pairs = held_out_pairs(mod, tok)
    margins = mod.pair_margins(rm, pairs, pad, torch.float32)
    assert (margins != 0).all()  # no ties: a tie is wrong both ways
    chosen = mod.score_rows(rm, [p["ids"][0] for p in pairs], pad, torch.float32)
    rejected = mod.score_rows(rm, [p["ids"][1] for p in pairs], pad, torch.float32)
    torch.testing.assert_close(margins, chosen - rejected, atol=1e-5, rtol=0)
    swapped, _ = mod.encode_pairs(tok, [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs], 64)
    flipped = mod.pair_margins(rm, swapped, pad, torch.float32)
    torch.testing.assert_close(flipped, -margins, atol=1e-5, rtol=0)
    for key in ("source", "kind"):
        a, b = mod.accuracy_by(margins, pairs, key), mod.accuracy_by(flipped, swapped, key)
        assert set(a) == set(b) and a
        for k in a:
            assert b[k] == pytest.approx(1 - a[k]), (key, k)
    gold = mod.accuracy_by(margins, pairs, "source")["gold"]
    assert gold == pytest.approx((margins > 0).float().mean().item())
    assert 0 < gold < 1


def test_auc_correlation_and_calibration_against_brute_force(mod):
    """auc: the fraction of (right, wrong) pairs where right scores higher, ties half,
    counted here pair by pair (None without both kinds); correlation: numpy's corrcoef
    (None for a constant); calibration: every pair in exactly one bin of confidence
    sigmoid(|margin|), agreement = the fraction of positive margins there, and the error
    the pair-weighted mean of |confidence - agreement|."""
    g = torch.Generator().manual_seed(0)
    for n_pos, n_neg, levels in ((30, 45, 6), (1, 7, 3), (50, 50, 1000)):
        pos = torch.randint(0, levels, (n_pos,), generator=g).float() / 2
        neg = torch.randint(0, levels, (n_neg,), generator=g).float() / 2 - 0.5
        pairs = [(p, q) for p in pos.tolist() for q in neg.tolist()]
        brute = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs)
        assert mod.auc(pos, neg) == pytest.approx(brute / (n_pos * n_neg), abs=1e-12)
        if levels == 6:
            assert sum(p == q for p, q in pairs) > 50  # many ties to count half
    assert mod.auc(torch.tensor([1.0, 2.0]), torch.tensor([0.0])) == 1.0
    assert mod.auc(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert mod.auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert mod.auc(torch.zeros(0), torch.ones(3)) is None and mod.auc(torch.ones(3), torch.zeros(0)) is None

    x = torch.randn(200, generator=g)
    y = 0.6 * x + torch.randn(200, generator=g)
    assert mod.correlation(x, y) == pytest.approx(np.corrcoef(x.numpy(), y.numpy())[0, 1], abs=1e-6)
    assert mod.correlation(x, -2 * x + 1) == pytest.approx(-1.0, abs=1e-9)
    assert mod.correlation(x, torch.full((200,), 3.0)) is None

    margins = torch.cat([torch.randn(300, generator=g) * 2, torch.tensor([0.0, 0.0, 50.0, -50.0])])
    bins, ece = mod.calibration(margins)
    assert sum(b["pairs"] for b in bins) == len(margins)
    conf = torch.sigmoid(margins.abs())
    edges = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    error = 0.0
    for b in bins:
        lo, hi = map(float, b["bin"].split("-"))
        assert lo in edges and hi == pytest.approx(lo + 0.1)
        inside = (conf >= lo) & ((conf < hi) if hi < 1.0 else (conf <= hi))
        assert b["pairs"] == inside.sum().item() > 0
        assert b["agreement"] == pytest.approx((margins[inside] > 0).float().mean().item())
        assert b["confidence"] == pytest.approx(conf[inside].mean().item()) and lo <= b["confidence"] <= hi
        error += b["pairs"] / len(margins) * abs(b["confidence"] - b["agreement"])
    assert ece == pytest.approx(error)
    assert len(bins) == 5


# 7.5 Reward shaping --------------------------------------------------------------------------------
def test_shape_rewards_normalizes_penalizes_length_and_clips(mod):
    """shape_rewards with the reference set's mean and std: the shaped reference set has
    mean 0 and std 1 (no penalty, no clip); a length penalty subtracts that much per token;
    clip bounds every value to [-clip, clip] and leaves the ones inside as they were; clip 0
    is off."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(500, generator=g) * 3 + 2
    lengths = torch.randint(1, 30, (500,), generator=g).float()
    norm = {"mean": raw.mean().item(), "std": raw.std().item()}
    shaped = mod.shape_rewards(raw, lengths, norm)
    assert shaped.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert shaped.std().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(shaped, (raw - norm["mean"]) / norm["std"])
    penalized = mod.shape_rewards(raw, lengths, norm, length_penalty=0.05)
    torch.testing.assert_close(penalized, shaped - 0.05 * lengths)
    clipped = mod.shape_rewards(raw, lengths, norm, length_penalty=0.05, clip=1.5)
    assert clipped.abs().max().item() <= 1.5 and (clipped.abs() == 1.5).any()
    inside = penalized.abs() < 1.5
    torch.testing.assert_close(clipped[inside], penalized[inside])
    torch.testing.assert_close(clipped[~inside], 1.5 * penalized[~inside].sign())
    assert torch.equal(mod.shape_rewards(raw, lengths, norm, 0.05, clip=0.0), penalized)


# 7.3 A short training run ---------------------------------------------------------------------------
EASY = ["copy", "upper", "reverse", "compare"]


def kind_pairs(mod, tok, n, evaluation, seed, kinds=("truncate", "format")):
    rng = random.Random(seed)
    prompts = {t: mod.task_prompts(mod.TASK_BY_NAME[t], n, evaluation, rng) for t in EASY}
    pairs = [p for p in mod.gold_pairs(prompts, rng, every_kind=True) if p["kind"] in kinds]
    return mod.encode_pairs(tok, pairs, 64)[0]


def test_short_reward_training_raises_held_out_pair_accuracy(mod, tmp_path):
    """train_reward_model from a random tiny GPT on 1,200 gold-vs-truncated and
    gold-vs-reformatted pairs of the easy tasks for 150 steps: held-out pair accuracy rises
    from chance (a zero head: every reward 0, loss log 2) to at least 75%; the weights
    returned are the ones validation picked, and metrics.jsonl gets the "reward" rows."""
    tok = chat_tok(mod)
    pad = tok.special["<|pad|>"]
    train, val, test = kind_pairs(mod, tok, 150, False, 0), kind_pairs(mod, tok, 10, False, 1)[:40], \
        kind_pairs(mod, tok, 40, True, 2)
    assert len(train) == 1200 and len(test) == 320
    assert not {json.dumps(p["prompt"]) for p in train} & {json.dumps(p["prompt"]) for p in test}
    cfg = mod.Config(device="cpu", dtype="float32", seed=0, n_layer=2, n_head=4, n_embd=32, block_size=64,
                     vocab_size=tok.vocab_size, rm_steps=150, rm_lr=3e-3, rm_batch_size=16, rm_eval_interval=75,
                     log_interval=50, warmup_steps=10, out_dir=str(tmp_path))
    torch.manual_seed(0)
    rm = mod.RewardModel(mod.GPT(cfg))
    margins = mod.pair_margins(rm, test, pad, torch.float32)
    assert torch.equal(margins, torch.zeros(len(test)))
    acc, loss = mod.validate_reward(rm, test, pad, cfg, torch.float32)
    assert acc == 0.0 and loss == pytest.approx(math.log(2), abs=1e-6)  # ties count as wrong
    best, figures = mod.train_reward_model(rm, train, val, pad, cfg, "cpu", torch.float32)
    rm.load_state_dict(best)
    after = mod.accuracy_by(mod.pair_margins(rm, test, pad, torch.float32), test, "source")["gold"]
    assert after >= 0.75, after  # 0.83-0.97 over seeds 0-5 (cfg.seed and the init's)
    assert mod.validate_reward(rm, test, pad, cfg, torch.float32)[1] < 0.6 * math.log(2)  # 0.25-0.41 x log 2
    val_acc, val_loss = mod.validate_reward(rm, val, pad, cfg, torch.float32)
    assert figures["val_accuracy"] == val_acc and figures["val_loss"] == pytest.approx(val_loss, abs=1e-6)
    assert figures["steps"] == 150 and figures["best_step"] in (75, 150)
    rows = [r for r in read_metrics(tmp_path) if "rm_val_accuracy" in r]
    assert [r["rm_step"] for r in rows] == [75, 150] and all(r["stage"] == "reward" for r in rows)
    assert max(r["rm_val_accuracy"] for r in rows) == figures["val_accuracy"]
    train_rows = [r for r in read_metrics(tmp_path) if "rm_loss" in r]
    assert [r["rm_step"] for r in train_rows] == [50, 100, 150] and all(r["stage"] == "reward" for r in train_rows)


# 7 main() ----------------------------------------------------------------------------------------------
def main_flags(data, out_dir, data_dir, **kw):
    values = dict(data=data, data_dir=data_dir, out_dir=out_dir, device="cpu", dtype="float32", seed=0,
                  n_layer=2, n_embd=32, block_size=64, max_steps=30, eval_interval=15, eval_iters=2,
                  log_interval=100, warmup_steps=5, num_samples=1, max_new_tokens=8, sft_steps=400,
                  sft_examples=700, sft_val_examples=40, sft_eval_interval=100, sft_batch_size=32, sft_lr=5e-3,
                  sft_patience=10, sft_method="full", eval_prompts=3, pass_k=2, max_answer_tokens=8,
                  gold_pairs=140, policy_prompts=28, policy_samples=6, rm_eval_prompts=8, rm_steps=40,
                  rm_batch_size=16, rm_eval_interval=20, rm_lr=3e-4, margin=0.0, center_coef=0.0,
                  length_penalty=0.0, reward_clip=5.0)
    values.update(kw)  # every stage flag explicit: conftest's load() puts tiny stage flags first
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


def compare_demonstrations(mod, path, n=600):
    """SFT data of the 'compare' task alone: a tiny policy learns it within a few hundred
    steps, so its samples at temperature 1 are sometimes right and sometimes wrong (the
    on-policy pairs, the AUC: 6-16 held-out on-policy pairs over seeds 0-3); on the seven
    tasks it would get none right."""
    task = mod.TASK_BY_NAME["compare"]
    return write(path, "".join(json.dumps({"prompt": p, "completion": task.solve(p)}) + "\n"
                               for p in mod.task_prompts(task, n, False, random.Random(0))))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny main() of part07: pretraining, SFT (on 'compare'), the reward model.
    Returns (flags, out_dir)."""
    mod = load("part07")
    root = tmp_path_factory.mktemp("part07_run")
    assert SHAKESPEARE.exists(), f"test data missing: {SHAKESPEARE}"
    args = main_flags(str(SHAKESPEARE), str(root / "out"), str(root / "data"),
                      sft_data=compare_demonstrations(mod, root / "compare.jsonl"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mod.main(args)
    finally:
        torch.set_num_threads(n)
    return args, root / "out"


def test_main_writes_the_documented_summary_and_reward_model(tiny_run):
    """main(): summary.json holds pair_accuracy {gold, on_policy} in [0, 1], auc (None or in
    [0, 1]), length_corr, the calibration bins (every held-out pair once) and their error,
    padding_max_diff < 1e-4, reward_stats, the normalization, wall_s; metrics.jsonl has
    "reward" rows; reward.pt loads with load_model(kind="reward") and, with the SFT policy
    of sft.pt, reproduces the held-out pair accuracy, the AUC and the normalization the run
    reported."""
    mod = load("part07")
    args, out = tiny_run
    summary = read_summary(out)
    acc = summary["pair_accuracy"]
    assert set(acc) == {"gold", "on_policy"}, acc
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert summary["auc"] is None or 0.0 <= summary["auc"] <= 1.0
    assert summary["length_corr"] is None or -1.0 <= summary["length_corr"] <= 1.0
    held_out = sum(summary["pairs"]["held_out"].values())
    assert sum(b["pairs"] for b in summary["calibration"]) == held_out > 0
    assert all(0.0 <= b["agreement"] <= 1.0 and 0.5 <= b["confidence"] <= 1.0 for b in summary["calibration"])
    assert 0.0 <= summary["calibration_error"] <= 0.5
    assert 0.0 <= summary["padding_max_diff"] < 1e-4
    stats = summary["reward_stats"]["all"]
    assert set(stats) == {"mean", "std", "min", "p05", "median", "p95", "max"}
    assert stats["min"] <= stats["p05"] <= stats["median"] <= stats["p95"] <= stats["max"]
    assert set(summary["normalization"]) == {"mean", "std"} and summary["normalization"]["std"] > 0
    assert summary["wall_s"] > 0 and summary["dropped_pairs"] == 0
    assert summary["reward_model"]["steps"] == 40
    assert {"gold", "on_policy"} <= set(summary["pairs"]["train"])
    for name in ("sft.pt", "reward.pt", "samples.txt"):
        assert (out / name).is_file(), name
    assert "reward" in (out / "samples.txt").read_text()
    rows = [r for r in read_metrics(out) if r.get("stage") == "reward"]
    assert [r["rm_step"] for r in rows if "rm_val_accuracy" in r] == [20, 40]

    cfg = mod.parse_args(args)
    cfg, tok, policy = mod.load_model(cfg, str(out / "sft.pt"), "cpu")
    cfg2, tok2, rm = mod.load_model(cfg, str(out / "reward.pt"), "cpu", kind="reward")
    assert isinstance(rm, mod.RewardModel) and tok2.special == tok.special
    assert (cfg2.n_layer, cfg2.n_embd, cfg2.block_size, cfg2.vocab_size) == (2, 32, 64, tok.vocab_size)
    assert rm.norm == pytest.approx(summary["normalization"])
    pad = tok.special["<|pad|>"]
    train, test, train_samples, test_samples = mod.reward_pairs(policy, tok, mod.reward_prompts(cfg), [], cfg, torch.float32)
    test, _ = mod.encode_pairs(tok, test, cfg.block_size)
    assert len(test) == held_out
    margins = mod.pair_margins(rm, test, pad, torch.float32)
    assert mod.accuracy_by(margins, test, "source") == pytest.approx(acc, abs=1e-9)
    rewards = mod.score_rows(rm, [s["ids"] for s in test_samples], pad, torch.float32)
    right = torch.tensor([s["right"] for s in test_samples])
    assert right.any() and (~right).any()
    assert mod.auc(rewards[right], rewards[~right]) == pytest.approx(summary["auc"], abs=1e-9)
    reference = mod.score_rows(rm, [s["ids"] for s in train_samples], pad, torch.float32)
    assert reference.mean().item() == pytest.approx(summary["normalization"]["mean"], abs=1e-6)
    assert reference.std().item() == pytest.approx(summary["normalization"]["std"], abs=1e-6)


def score_line(out):
    m = re.search(r"reward ([-+]\d+\.\d+) \(shaped for RL ([-+]\d+\.\d+)\)(.*)", out)
    assert m, out
    return float(m.group(1)), float(m.group(2)), m.group(3)


def test_score_prints_the_reward_of_one_reply(tiny_run, capsys):
    """--score PROMPT --response TEXT prints the saved reward model's reward for that reply
    (the one computed here from reward.pt), its shaped value with the saved normalization,
    and the task checker's verdict; it writes nothing."""
    mod = load("part07")
    args, out = tiny_run
    before = sorted(p.name for p in out.iterdir())
    cfg, tok, rm = mod.load_model(mod.parse_args(args), str(out / "reward.pt"), "cpu", kind="reward")
    for response, verdict in (("57", "right"), ("12", "wrong")):
        capsys.readouterr()
        assert mod.main(args + ["--score", "Larger: 12 or 57", "--response", response]) is None
        raw, shaped, rest = score_line(capsys.readouterr().out)
        ids = conversation(mod, tok, "Larger: 12 or 57", response)
        with torch.no_grad():
            want = rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool)).item()
        assert raw == pytest.approx(want, abs=6e-4)
        assert shaped == pytest.approx(max(-5.0, min(5.0, (want - rm.norm["mean"]) / rm.norm["std"])), abs=6e-4)
        assert f"compare checker says {verdict}" in rest
    capsys.readouterr()
    mod.main(args + ["--score", "Hello?", "--response", "Hi.", "--reward_model", str(out / "reward.pt")])
    raw, _, rest = score_line(capsys.readouterr().out)
    assert "checker" not in rest
    assert sorted(p.name for p in out.iterdir()) == before


def test_main_refuses_bad_input_and_writes_nothing(tiny_run, tmp_path, capsys):
    """Exit 2 with one 'error:' line, before any data is read and with nothing written:
    --margin -1; --rm_eval_prompts above what a task has held out; --preference_data that is empty, holds a record without "rejected", a
    transcript with no assistant turn, or only pairs whose chosen equals rejected;
    --init_from a reward model (reward.pt read as a policy); --score with --reward_model a
    policy (sft.pt read as a reward model)."""
    mod = load("part07")
    args, out = tiny_run
    assert "margin" in expect_flag_error(capsys, mod, ["--margin", "-1"], tmp_path / "a")
    # multiply has 72 held-out prompts: refused before pretraining, not after SFT
    assert "multiply" in expect_flag_error(capsys, mod, ["--rm_eval_prompts", "100"], tmp_path / "b")
    same = json.dumps({"prompt": "Repeat: ab", "chosen": "ab", "rejected": "ab"})
    files = {
        "empty": ("empty.jsonl", ""),
        "rejected": ("missing.jsonl", json.dumps(SINGLE[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"})),
        "assistant": ("hh.jsonl", json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"})),
        "no usable pair": ("same.jsonl", same + "\n" + json.dumps({"prompt": "x", "chosen": " y", "rejected": "y "})),
    }
    for i, (word, (name, text)) in enumerate(files.items()):
        path = write(tmp_path / name, text)
        err = expect_flag_error(capsys, mod, ["--preference_data", path], tmp_path / f"f{i}")
        assert word in err, err
        assert not (tmp_path / f"f{i}" / "out").exists()
    for i, (extra, word) in enumerate([(["--init_from", str(out / "reward.pt")], "not a policy"),
                                       (["--score", "1 + 2 =", "--response", "3", "--reward_model",
                                         str(out / "sft.pt")], "not a reward model")]):
        run = tmp_path / f"run{i}"
        err = expect_exit_2(capsys, mod.main, main_flags(str(tmp_path / "missing.txt"), str(run),
                                                          str(tmp_path / "d"), sft_steps=2) + extra)
        assert word in err, err
        assert not run.exists() or not any(run.iterdir()), list(run.iterdir())


def test_preference_data_drops_equal_pairs_and_counts_them(tiny_run, tmp_path):
    """--preference_data with --init_from sft.pt: pairs whose chosen equals rejected (spaces
    aside), or whose two transcripts differ before the reply, are dropped and counted in
    summary's dropped_pairs; the others train the reward model, except those whose last
    user turn is a held-out prompt (part06's hash split): they are tested, as source "file"."""
    mod = load("part07")
    args, out = tiny_run
    rng = random.Random(5)
    task = mod.TASK_BY_NAME["compare"]
    prompts = mod.task_prompts(task, 40, False, rng) + mod.task_prompts(task, 4, True, rng)
    records = [{"prompt": p, "chosen": task.solve(p), "rejected": str(min(map(int, re.findall(r"\d+", p))))}
               for p in prompts]
    records += [{"prompt": "Repeat: ab", "chosen": "ab", "rejected": "ab"},
                {"prompt": "Repeat: cd", "chosen": " cd", "rejected": "cd\n"},
                {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}]
    path = write(tmp_path / "pairs.json", json.dumps(records))
    run = tmp_path / "run"
    summary = mod.main(args + ["--init_from", str(out / "sft.pt"), "--preference_data", path,
                               "--out_dir", str(run), "--rm_steps", "4", "--rm_eval_interval", "2"])
    assert summary["dropped_pairs"] == 3 and read_summary(run)["dropped_pairs"] == 3
    pairs = summary["pairs"]
    trained = sum(not mod.held_out(p) for p in prompts)  # split as the built-in prompts are
    assert set(pairs["train"]) == {"file"} and pairs["train"]["file"] + pairs["validation"] == trained
    assert pairs["held_out"]["file"] == len(prompts) - trained > 0
    assert 0.0 <= summary["pair_accuracy"]["file"] <= 1.0
    assert (run / "reward.pt").is_file()


def test_normalization_needs_policy_answers_and_stays_finite(tiny_run, tmp_path, capsys):
    """The normalization of 7.5 is the mean and std of the policy's answers on training
    prompts: --policy_prompts 0 (no answer to measure) is refused (exit 2, one line), and one
    prompt with one sample (no spread) saves std 1 and a finite mean, never NaN (--score's
    shaped reward would be NaN)."""
    mod = load("part07")
    args, out = tiny_run
    run = tmp_path / "run"
    flags = args + ["--init_from", str(out / "sft.pt"), "--out_dir", str(run), "--rm_steps", "2",
                    "--rm_eval_interval", "2", "--policy_samples", "1"]
    assert "policy_prompts" in expect_exit_2(capsys, mod.main, flags + ["--policy_prompts", "0"])
    assert not run.exists() or not any(run.iterdir())
    mod.main(flags + ["--policy_prompts", "1"])
    norm = torch.load(run / "reward.pt", weights_only=True)["reward_norm"]
    assert math.isfinite(norm["mean"]) and norm["std"] == 1.0, norm
