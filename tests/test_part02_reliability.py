"""Reliability of every part that trains: a run folder holds one run (a second one, or a
new one over a finished one, is refused), a resumed run repairs metrics.jsonl and never
writes worse figures over good ones, the token cache rebuilds itself, a full disk or a
diverged loss ends with one line, sizes that cannot fit and bad values are refused before
anything is allocated, checkpoints of another part are refused, Ctrl-C exits with 130."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (ROOT, expect_exit_2, load, part_names, read_metrics, read_summary,
                      run_flags, small_corpus, torchrun, train_losses, write)

# part10's main() runs lessons, each training models in run folders of its own, from the
# start: its run folders and bad input are tested in test_part10_semantic.py
TRAINED = part_names(2, 9)  # parts with a run folder: checkpoints, metrics, samples
RESUMABLE = part_names(4, 9)  # parts with --resume


def byte_flags(tmp_path, data, **kw):
    """A tiny byte-level run (every part from 02 reads the same flags)."""
    mod_flags = dict(tokenizer="byte", vocab_size=256)
    mod_flags.update(kw)
    return run_flags(tmp_path, data, **mod_flags)


def part_flags(mod, args):
    """Keep the flags this part has (part02/03 have no --tokenizer, --warmup_steps ...)."""
    names = {f"--{f}" for f in mod.Config.__dataclass_fields__}
    out, i = [], 0
    while i < len(args):
        if args[i] in names:
            out += args[i:i + 2]
        i += 2
    return out


def strict_json(path):
    """json.load that refuses NaN and Infinity, as strict readers do."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


# ---------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINED)
def test_a_finished_run_is_not_started_over(name, shakespeare, tmp_path, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    args = part_flags(mod, byte_flags(tmp_path, data, max_steps=6, eval_interval=3))
    mod.main(args)
    out = tmp_path / "out"
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "metrics.jsonl", "summary.json")}
    err = expect_exit_2(capsys, mod.main, part_flags(mod, byte_flags(tmp_path, data, max_steps=3,
                                                                      eval_interval=3)))
    assert "holds a run" in err and "--overwrite" in err
    assert ("--resume" in err) == (name in RESUMABLE)
    for f, content in before.items():  # nothing was touched
        assert (out / f).read_bytes() == content, f
    s = mod.main(args[:] + ["--overwrite", "--max_steps", "3"])  # told to: it starts over
    assert s["steps"] == 3 and max(train_losses(out)) == 3
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] <= 3


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
@pytest.mark.parametrize("name", TRAINED)
def test_a_busy_run_folder_is_refused(name, shakespeare, tmp_path, capsys):
    import fcntl
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "run.lock", "w") as other:  # another process's run holds the lock
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242\n")
        other.flush()
        err = expect_exit_2(capsys, mod.main, part_flags(mod, byte_flags(tmp_path, data)))
    assert "in use by another run" in err and "4242" in err
    assert sorted(os.listdir(out)) == ["run.lock"]
    mod.main(part_flags(mod, byte_flags(tmp_path, data, max_steps=2, eval_interval=2)))  # free again


@pytest.mark.parametrize("name", part_names(0))
def test_an_out_dir_that_is_a_file_exits_2_before_any_work(name, tmp_path, capsys):
    mod = load(name)
    target = write(tmp_path / "taken", "a file")
    args = ["--out_dir", target, "--device", "cpu"]
    if name not in part_names(2):
        slow = ["--bench_seconds", "10"] if name.startswith("part00") else []  # checked before this
        err = expect_exit_2(capsys, mod.main, args + slow)
    else:  # checked before the data: this data does not exist
        err = expect_exit_2(capsys, mod.main, args + ["--data", str(tmp_path / "missing.txt")])
    assert "--out_dir" in err and "is a file" in err


@pytest.mark.parametrize("name", TRAINED)
def test_a_data_dir_that_is_a_file_exits_2(name, shakespeare, tmp_path, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    err = expect_exit_2(capsys, mod.main, part_flags(mod, byte_flags(tmp_path, data)) +
                        ["--data_dir", write(tmp_path / "dd", "x")])
    assert "--data_dir" in err and "is a file" in err


# ---------------------------------------------------------------------------------------
# Resuming: metrics.jsonl repaired, good figures never overwritten
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RESUMABLE)
def test_resume_at_or_past_max_steps_keeps_the_good_summary(name, shakespeare, tmp_path, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    mod.main(byte_flags(tmp_path, data, max_steps=6, eval_interval=3))
    out = tmp_path / "out"
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "metrics.jsonl", "summary.json")}
    for steps in (6, 4):
        err = expect_exit_2(capsys, mod.main, byte_flags(tmp_path, data, max_steps=steps,
                                                         eval_interval=3, resume=True))
        assert "at step 6" in err and f"--max_steps {steps}" in err
    for f, content in before.items():
        assert (out / f).read_bytes() == content, f
    assert math.isfinite(strict_json(out / "summary.json")["val_loss"])


@pytest.mark.parametrize("name", RESUMABLE)
def test_a_cut_metrics_line_is_repaired_when_resuming(name, shakespeare, tmp_path):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    mod.main(byte_flags(tmp_path, data, max_steps=6, eval_interval=3, ckpt_interval=3))
    out = tmp_path / "out"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # the run was killed after step 6's checkpoint and in the middle of writing step 7's row
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "train_lo')
    s = mod.main(byte_flags(tmp_path, data, max_steps=9, eval_interval=3, ckpt_interval=3,
                            resume=True))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # all whole
    steps = [r["step"] for r in rows if "train_loss" in r]
    assert steps == list(range(1, 10))  # each step once, in order
    assert s["steps"] == 9 and math.isfinite(s["tokens_per_s"])
    strict_json(out / "summary.json")


@pytest.mark.parametrize("name", RESUMABLE)
def test_resume_drops_rows_logged_after_the_checkpoint(name, shakespeare, tmp_path):
    """Killed after step 5's row, with the checkpoint at step 3: the resumed run logs steps
    4 and 5 again, and the file keeps one row per step."""
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    mod.main(byte_flags(tmp_path, data, max_steps=5, eval_interval=5, ckpt_interval=3))
    out = tmp_path / "out"
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # written at step 5 (the last)
    ckpt["step"] = 3  # as if the kill came before step 5's save
    torch.save(ckpt, out / "ckpt.pt")
    mod.main(byte_flags(tmp_path, data, max_steps=6, eval_interval=5, ckpt_interval=3, resume=True))
    steps = [r["step"] for r in read_metrics(out) if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("name", part_names(0))
def test_summary_json_is_strict_json(name, tmp_path):
    mod = load(name)
    path = str(tmp_path / "s.json")
    mod.write_json(path, {"loss": float("nan"), "rows": [1.5, float("inf")], "n": 3})
    assert strict_json(path) == {"loss": None, "rows": [1.5, None], "n": 3}


# ---------------------------------------------------------------------------------------
# The token cache
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize("cut", ["half", "header"])
def test_a_cut_token_cache_is_rebuilt(name, cut, shakespeare, tmp_path):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    cfg = mod.parse_args(part_flags(mod, byte_flags(tmp_path, data)))
    mapped, _ = mod.load_tokens(cfg, mod.ByteTokenizer())
    tokens = bytes(mapped)  # a copy: the file is about to be cut under the memory map
    del mapped
    full = len(tokens)
    assert full == 40_000
    cache = next((tmp_path / "data").glob("tokens-*"))
    raw = cache.read_bytes()
    cache.write_bytes(raw[: len(raw) // 2] if cut == "half" else raw[:20])
    again, _ = mod.load_tokens(cfg, mod.ByteTokenizer())
    assert len(again) == full and bytes(again) == tokens
    assert cache.read_bytes() == raw  # rebuilt whole


# ---------------------------------------------------------------------------------------
# One line instead of a traceback
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINED)
def test_a_full_disk_while_saving_says_so_and_keeps_the_checkpoint(name, shakespeare, tmp_path,
                                                                   monkeypatch, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # two checkpoints are written, then the disk is full
        calls.append(f)
        if len(calls) > 2:
            with open(f, "wb") as fh:
                fh.write(b"half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(mod.torch, "save", save)
    monkeypatch.setattr(mod.shutil, "disk_usage", lambda p: type("Usage", (), {"free": 1024}))
    args = part_flags(mod, byte_flags(tmp_path, data, max_steps=8, eval_interval=2, ckpt_interval=2,
                                      learning_rate=3e-3, warmup_steps=0))
    err = expect_exit_2(capsys, mod.main, args)
    assert "no space left on device" in err and "previous checkpoint is intact" in err
    assert len(calls) == 3
    out = tmp_path / "out"
    for ckpt in out.glob("*.pt"):  # what was saved before is whole
        assert torch.load(ckpt, weights_only=True)["step"] in (2, 4)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("name", TRAINED)
def test_a_diverged_run_stops_with_one_line(name, shakespeare, tmp_path, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    args = part_flags(mod, byte_flags(tmp_path, data, max_steps=60, eval_interval=2, log_interval=1,
                                      learning_rate=1e6, warmup_steps=0, grad_clip=0.0))
    err = expect_exit_2(capsys, mod.main, args)
    assert err.startswith("error: training diverged") and "at step" in err
    step = int(err.split("at step ")[1].split(";")[0])
    assert step < 60  # it stopped there, not at the end
    for ckpt in (tmp_path / "out").glob("*.pt"):  # what was saved before is a finite model
        state = torch.load(ckpt, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("name", part_names(0))
@pytest.mark.parametrize("flag,value", [("--seed", str(2**64)), ("--seed", "-1"),
                                        ("--learning_rate", "nan"), ("--learning_rate", "inf"),
                                        ("--temperature", "nan"), ("--beta1", "1.0"),
                                        ("--beta2", "-0.1"), ("--mfu", "nan")])
def test_values_that_cannot_work_exit_2(name, flag, value, tmp_path, capsys):
    mod = load(name)
    if flag[2:] not in mod.Config.__dataclass_fields__:
        pytest.skip(f"{name} has no {flag}")
    err = expect_exit_2(capsys, mod.main, [flag, value, "--out_dir", str(tmp_path / "o"),
                                           "--device", "cpu"])
    assert flag in err
    assert not (tmp_path / "o" / "summary.json").exists()


SIZES = [("--block_size", "1000000000"), ("--n_embd", "1000000"), ("--batch_size", "1000000000"),
         ("--n_layer", "100000"), ("--n_experts", "100000000"), ("--vocab_size", "2000000000")]


@pytest.mark.parametrize("name", part_names(1))
@pytest.mark.parametrize("flag,value", SIZES)
def test_sizes_that_cannot_fit_are_refused_before_allocating(name, flag, value, shakespeare, tmp_path,
                                                             capsys, monkeypatch):
    mod = load(name)
    fields = mod.Config.__dataclass_fields__
    if flag[2:] not in fields:
        pytest.skip(f"{name} has no {flag}")
    if flag == "--vocab_size" and "tokenizer" in fields:
        pytest.skip("with BPE the vocabulary is what the tokenizer learns")
    monkeypatch.setattr(mod, "free_memory", lambda device: 8e9)  # the same verdict on any machine
    args = [flag, value, "--out_dir", str(tmp_path / "o"), "--device", "cpu"]
    if name in TRAINED:
        args += ["--data", small_corpus(tmp_path, shakespeare), "--data_dir", str(tmp_path / "d")]
    err = expect_exit_2(capsys, mod.main, args)
    assert "needs about" in err and "8.0 GB free" in err
    mod.check_fits(mod.parse_args([]), "cpu")  # the default run fits


@pytest.mark.parametrize("name", TRAINED)
def test_a_prompt_that_is_not_utf8_exits_2(name, tmp_path, capsys):
    mod = load(name)
    err = expect_exit_2(capsys, mod.main, ["--prompt", "caf\udce9", "--out_dir", str(tmp_path),
                                           "--device", "cpu"])  # how Python passes byte 0xE9
    assert "--prompt" in err and "UTF-8" in err


@pytest.mark.parametrize("name", TRAINED)
def test_data_that_is_not_a_text_file(name, tmp_path, capsys):
    mod = load(name)
    cfg = mod.parse_args(["--data", os.devnull])
    err = expect_exit_2(capsys, mod.load_text, cfg)
    assert "not a regular file" in err
    raw = "plain text ".encode() * 10 + b"\xff\xfe\x00\x81" + "é".encode()
    cfg = mod.parse_args(["--data", write(tmp_path / "mixed.txt", raw)])
    capsys.readouterr()
    text, _ = mod.load_text(cfg)
    out = capsys.readouterr().out
    assert "3 byte sequences" in out and "not UTF-8" in out  # 0xff, 0xfe, 0x81
    assert text.endswith("\ufffd\ufffd\x00\ufffdé")


# ---------------------------------------------------------------------------------------
# Checkpoints of another part
# ---------------------------------------------------------------------------------------
def train_tiny(name, tmp_path, data, out, **kw):
    mod = load(name)
    mod.main(part_flags(mod, byte_flags(tmp_path, data, out=out, max_steps=2, eval_interval=2, **kw)))
    return tmp_path / out


@pytest.mark.parametrize("writer,reader,how,words", [
    ("part05", "part04", "sample_only", "weights of another model"),  # an MoE where part04 has an MLP
    ("part03", "part04", "resume", "cannot be resumed here"),  # no optimizer scaler, no RNG
    ("part03", "part02", "sample_only", "written by another part (pos=rope)"),  # no flag gives RoPE
])
def test_a_checkpoint_of_another_part_exits_2(writer, reader, how, words, shakespeare, tmp_path,
                                              capsys):
    data = small_corpus(tmp_path, shakespeare)
    shape = dict(norm="rmsnorm", mlp="swiglu", bias=False) if reader != "part02" else {}
    src = train_tiny(writer, tmp_path, data, "src", **shape)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "ckpt.pt").write_bytes((src / "ckpt.pt").read_bytes())
    mod = load(reader)
    args = part_flags(mod, byte_flags(tmp_path, data, out="dst", max_steps=4, **shape)) + [f"--{how}"]
    err = expect_exit_2(capsys, mod.main, args)
    assert words in err, err
    assert "None" not in err  # no flag suggested that this part cannot take


# ---------------------------------------------------------------------------------------
# Interrupts and torchrun
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("name", ["part02_train", "part05_moe"])
def test_ctrl_c_while_sampling_exits_130_with_one_line(name, shakespeare, tmp_path):
    """Outside training's own handler (here: sampling a saved run), Ctrl-C ends the run
    with status 130 and one line, as shells expect."""
    data = small_corpus(tmp_path, shakespeare)
    mod = load(name)
    mod.main(part_flags(mod, byte_flags(tmp_path, data, max_steps=2, eval_interval=2)))
    cmd = [sys.executable, str(ROOT / f"{name}.py"), "--sample_only", "--out_dir", str(tmp_path / "out"),
           "--device", "cpu", "--max_new_tokens", "100000", "--num_samples", "1"]
    if name != "part02_train":
        cmd += ["--tokenizer", "byte", "--vocab_size", "256", "--n_layer", "1", "--n_embd", "32",
                "--n_head", "2", "--block_size", "32"]
    else:
        cmd += ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block_size", "32"]
    # A shell's background job (`pytest &`) starts with SIGINT ignored, and children inherit
    # that: the part is started with the default action, as a terminal would start it
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.readline().startswith("loaded")  # sampling has begun
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:  # a failure must not leave it sampling 100,000 tokens beside the other tests
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines() == ["stopped (Ctrl-C)"]


def test_torchrun_with_an_indivisible_batch_says_it_once(shakespeare, tmp_path):
    data = small_corpus(tmp_path, shakespeare)
    r = torchrun("part04_scale", byte_flags(tmp_path, data, batch_size=3))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--batch_size 3 must be divisible by the 2" in errors[0], r.stderr[-2000:]


@pytest.mark.parametrize("name", RESUMABLE)
def test_process_group_timeout_comes_from_the_flag(name, monkeypatch):
    mod = load(name)
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(mod.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mod.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    assert mod.setup_distributed(42.0) == (1, 2, "cpu")
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 42.0
