"""Shared test helpers: import part files by name, build tiny models of a given lesson,
run main() in a temp folder."""
import dataclasses
import importlib
import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# The classic file beside the checkout, else the copy a part's default run caches in data/
# (a GPU machine gets the repository alone).
SHAKESPEARE = next((p for p in (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                                ROOT / "data" / "tinyshakespeare.txt") if p.exists()),
                   ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
PART_FILES = sorted(p for p in ROOT.glob("part[0-9][0-9]_*.py"))
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


def part_names(first=0, last=99):
    """Module names of the parts numbered first..last: every part from `first` on, for an
    inherited idea; `last` where a later part replaces the idea (its docstring's Replaces:)."""
    return [p.stem for p in PART_FILES if first <= int(p.stem[4:6]) <= last]


# Parts 06+ fine-tune after pretraining, 07+ then train a reward model, 08+ run PPO (and
# skip its control). A test of an earlier lesson that runs their main() gets tiny stages:
# these flags come first, so the test's own flags win. (100 gold pairs: with --block_size 16
# only the shortest, add and multiply, fit, and the reward model needs 10.)
TINY_STAGES = {6: dict(sft_examples=14, sft_val_examples=7, sft_steps=2, sft_eval_interval=2,
                       sft_batch_size=4, sft_method="full", eval_prompts=1, pass_k=1,
                       max_answer_tokens=4),
               7: dict(gold_pairs=100, policy_prompts=7, policy_samples=2, rm_eval_prompts=1, rm_steps=2,
                       rm_eval_interval=2, rm_batch_size=4),
               8: dict(ppo_iters=1, rollout_batch=4, ppo_minibatch=2, ppo_epochs=1, control="false"),
               9: dict(grpo_iters=1, group_size=2, grpo_minibatch=2)}


def stage_flags(name):
    """The TINY_STAGES flags of part `name` (a module or its name): those of every stage it has,
    where its Config still has the field (part09 drops PPO's)."""
    fields = config_fields(importlib.import_module(name) if isinstance(name, str) else name)
    out = {}
    for part, values in TINY_STAGES.items():
        if part_number(name) >= part:
            out.update({k: v for k, v in values.items() if k in fields})
    return [a for k, v in out.items() for a in (f"--{k}", str(v))]


def load(name):
    """Import a part by module name ('part02_train') or number prefix ('part02'). Its main()
    takes the tiny later stages first (stage_flags)."""
    if re.fullmatch(r"part\d\d", name):
        matches = [p.stem for p in PART_FILES if p.stem.startswith(name + "_")]
        assert matches, f"no file for {name}"
        name = matches[0]
    mod = importlib.import_module(name)
    extra = stage_flags(name)
    if extra and not hasattr(mod.main, "full_main"):
        full_main = mod.main

        def main(argv=None):
            return full_main(extra + list(sys.argv[1:] if argv is None else argv))

        main.full_main = full_main
        mod.main = main
    return mod


def part_number(mod):
    """2 for part02_train (a module or its name)."""
    return int(getattr(mod, "__name__", mod)[4:6])


def config_fields(mod):
    """The names of mod.Config's fields."""
    return {f.name for f in dataclasses.fields(mod.Config)}


# Tiny models of a given lesson --------------------------------------------------------------
# What a part switched on by default, and the Config values that switch it off again. A test
# of lesson N runs on every part after N: there these values give lesson N's model (part03
# made the modern stack the default, part04 BPE, part05 Mixture-of-Experts).
SWITCHED_ON = {
    3: dict(pos="learned", bias=True, norm="layernorm", mlp="gelu"),
    4: dict(tokenizer="byte"),
    5: dict(n_experts=0),
}
# The tiny CPU shape every test starts from (each field where the part's Config has it).
TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0,
            flash=True, device="cpu", dtype="float32", seed=0, batch_size=4, eval_iters=2)


def lesson_fields(mod, lesson):
    """Config values that make `mod` (a part after `lesson`) build lesson `lesson`'s model:
    what the parts in between switched on, switched off; and where a later part switched a
    default off again (part06: byte tokens, dense), the lesson's own defaults back.
    {} for the lesson's own part."""
    out = {}
    for part, values in SWITCHED_ON.items():
        if lesson < part <= part_number(mod):
            out.update(values)
    if lesson < part_number(mod):
        own = load(part_names(lesson, lesson)[0]).Config
        switchable = {k for values in SWITCHED_ON.values() for k in values}
        out.update({k: getattr(own, k) for k in switchable if hasattr(own, k)})
    return out


def tiny_cfg(mod, lesson=None, **kw):
    """mod.Config with the TINY shape, the model of `lesson` (lesson_fields; None: the part's
    own defaults), then kw (each kw must be a field of mod.Config)."""
    fields = config_fields(mod)
    base = {k: v for k, v in TINY.items() if k in fields}
    base.update(lesson_fields(mod, part_number(mod) if lesson is None else lesson))
    base.update(kw)
    return mod.Config(**base)


def tiny_gpt(mod, lesson=None, seed=0, perturb=True, **kw):
    """GPT(tiny_cfg(mod, lesson, **kw)) in eval mode, initialized after manual_seed(seed);
    perturb: noise on every weight (perturb_), so logits and routing are far from uniform."""
    torch.manual_seed(seed)
    model = mod.GPT(tiny_cfg(mod, lesson, **kw))
    return (perturb_(model, seed) if perturb else model).eval()


def tokens(shape, seed=1, vocab=64):
    """Random token ids of `shape` from a fixed seed."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    """One thread for tiny models (tests of parts 06-09 use it on every test): on a busy
    2-core machine, OpenMP threads that wait for each other make every small op take
    milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shakespeare():
    assert SHAKESPEARE.exists(), f"test data missing: {SHAKESPEARE}"
    return str(SHAKESPEARE)


def read_summary(out_dir):
    """out_dir/summary.json, the figures a run's main() wrote."""
    return json.loads((Path(out_dir) / "summary.json").read_text())


def unused_port():
    """A port on 127.0.0.1 that nobody listens on (connecting to it is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_strings(n, seed=0, extra=()):
    """n strings for tokenizer round trips: a fixed set of hard cases (NUL, combining marks,
    emoji sequences, BOM, CRLF, the largest code point) plus `extra`, then random mixes of
    ASCII, common words, emoji, joiners, combining marks, CJK and any non-surrogate code point."""
    rng = random.Random(seed)

    def any_code_point():
        while True:
            cp = rng.randrange(0x110000)
            if not 0xD800 <= cp <= 0xDFFF:  # surrogates cannot be encoded as UTF-8
                return chr(cp)

    pieces = [
        lambda: chr(rng.randrange(0x20, 0x7F)),  # ASCII
        lambda: rng.choice(["the", " the", "and", " of", "ing", "\n", "  ", "'s", "123"]),
        lambda: "\x00",  # NUL
        lambda: chr(rng.randrange(0x1F300, 0x1FAFF)),  # emoji
        lambda: "\u200d",  # zero-width joiner (emoji sequences)
        lambda: chr(rng.randrange(0x300, 0x370)),  # combining marks
        lambda: chr(rng.randrange(0x4E00, 0x9FFF)),  # CJK
        lambda: chr(rng.randrange(0x80, 0x800)),  # two-byte characters
        lambda: chr(rng.choice([rng.randrange(0x800, 0xD800), rng.randrange(0xE000, 0x10000)])),
        any_code_point,
    ]
    out = ["", "\x00", "e\u0301", "\U0001F469\u200d\U0001F469\u200d\U0001F467", "\U0010FFFF",
           "\ufeffBOM", "\r\n\t", "\u65e5\u672c\u8a9e", "\U0001F1EB\U0001F1F7", "a\x00b\x00",
           "   ", *extra]
    while len(out) < n:
        out.append("".join(rng.choice(pieces)() for _ in range(rng.randrange(1, 40))))
    return out


def expect_exit_2(capsys, fn, *args):
    """fn(*args) must end with SystemExit(2) and exactly one stderr line 'error: ...'."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def expect_flag_error(capsys, mod, args, tmp_path):
    """main(args) with data that does not exist: the bad flag must be caught first (one
    'error:' line, exit 2, nothing written). Returns the error line."""
    err = expect_exit_2(capsys, mod.main, args + ["--out_dir", str(tmp_path / "out"),
                                                  "--data_dir", str(tmp_path / "d"), "--data",
                                                  str(tmp_path / "missing.txt"), "--device", "cpu"])
    assert "missing.txt" not in err  # the flag is caught before the data is read
    assert not (tmp_path / "out" / "summary.json").exists()
    return err


def randomize_(module, seed=0, scale=0.3):
    """Replace every parameter by noise (biases start at zero, norms at one): next-token
    distributions are far from uniform, so equality tests bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def perturb_(module, seed=0, scale=0.3):
    """Add noise to every parameter: the model (and its routing) is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


# Runs of main(): tiny CPU flags, their outputs, two processes under torchrun -------------
def write(path, content):
    """Write text (UTF-8) or bytes to path, making its folder; returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def small_corpus(tmp_path, shakespeare, n=40_000):
    """A small training file: enough tokens for block_size 32 and a 90/10 split."""
    return write(tmp_path / "corpus.txt", Path(shakespeare).read_text(encoding="utf-8")[:n])


def as_flags(values):
    """{"n_layer": 2, ...} -> ["--n_layer", "2", ...]"""
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


def flags(**kw):
    """main() flags: a tiny CPU float32 run with a 300-token BPE (kw overrides any of it)."""
    base = dict(device="cpu", dtype="float32", seed=0, tokenizer="bpe", vocab_size=300,
                n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=4, max_steps=6,
                eval_interval=3, eval_iters=2, log_interval=1, warmup_steps=2,
                num_samples=1, max_new_tokens=8)
    base.update(kw)
    return as_flags(base)


def run_flags(tmp_path, data, out="out", **kw):
    return flags(data=data, data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / out), **kw)


def read_metrics(out_dir):
    """The rows of out_dir/metrics.jsonl."""
    return [json.loads(s) for s in Path(out_dir, "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir):
    return {d["step"]: d["train_loss"] for d in read_metrics(out_dir) if "train_loss" in d}


def val_losses(out_dir):
    return {d["step"]: d["val_loss"] for d in read_metrics(out_dir) if "val_loss" in d}


def torchrun(name, args, nproc=2, timeout=120):
    """python -m torch.distributed.run: nproc CPU processes (gloo) of a part, one thread each."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={unused_port()}",
           f"{name}.py", *stage_flags(name), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
