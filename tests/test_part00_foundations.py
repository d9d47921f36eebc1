"""Part 00: the CLI generated from Config, device/dtype choice, seeding (the same seed
gives the same CPU run of every part, loss for loss), the estimator, the mixed-precision
facts, and the measured summary."""
import dataclasses
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (ROOT, as_flags, load, part_names, part_number, read_metrics, read_summary,
                      small_corpus)

ALL = part_names(0)


@pytest.mark.parametrize("name", ALL)
def test_cli_types_and_both_spellings(name):
    mod = load(name)
    fields = {f.name: f for f in dataclasses.fields(mod.Config)}
    assert mod.parse_args([]) == mod.Config()  # no flags: the defaults
    int_f = next(f for f in fields.values() if f.type is int)
    float_f = next(f for f in fields.values() if f.type is float)
    bool_f = next(f for f in fields.values() if f.type is bool)
    str_f = next(f for f in fields.values() if f.type is str)
    cfg = mod.parse_args([f"--{int_f.name}", "7", f"--{float_f.name}=0.5",
                          f"--{bool_f.name}={not bool_f.default}", f"--{str_f.name}", "xyz"])
    assert getattr(cfg, int_f.name) == 7 and isinstance(getattr(cfg, int_f.name), int)
    assert getattr(cfg, float_f.name) == 0.5
    assert getattr(cfg, bool_f.name) is (not bool_f.default)
    assert getattr(cfg, str_f.name) == "xyz"
    assert getattr(mod.parse_args([f"--{bool_f.name}"]), bool_f.name) is True  # bare flag
    assert getattr(mod.parse_args([f"--{bool_f.name}", "false"]), bool_f.name) is False


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("args", [["--no_such_flag", "1"], ["--seed", "abc"],
                                  ["--seed=1.5"], ["--device", "tpu"]])
def test_bad_flags_exit_2_with_one_line(name, args):
    path = ROOT / f"{name}.py"
    r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ALL)
def test_device_and_dtype_choice_on_cpu(name):
    mod = load(name)
    if not torch.cuda.is_available():
        assert mod.pick_device("auto") in ("cpu", "mps")
        with pytest.raises(SystemExit) as e:
            mod.pick_device("cuda")
        assert e.value.code == 2
        with pytest.raises(SystemExit):
            mod.pick_dtype("float16", "cpu")  # fp16 needs CUDA
    assert mod.pick_device("cpu") == "cpu"
    assert mod.pick_dtype("auto", "cpu") == torch.float32
    assert mod.pick_dtype("bfloat16", "cpu") == torch.bfloat16
    with mod.autocast_ctx("cpu", torch.bfloat16):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with mod.autocast_ctx("cpu", torch.float32):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
def test_seed_repeats_random_streams(name):
    """set_seed seeds torch, numpy and random: the same seed repeats all three, another
    seed changes all three."""
    mod = load(name)

    def draws(seed):
        mod.set_seed(seed)
        return torch.randn(5).tolist(), np.random.rand(5).tolist(), [random.random() for _ in range(5)]

    a = draws(3)
    assert draws(3) == a
    assert all(x != y for x, y in zip(draws(4), a))


def without_timings(obj):
    """A summary's figures less the measured times (keys ending in _s)."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if not k.endswith("_s")}
    return obj


def seeded_run(mod, tmp_path, data, seed, out):
    """A tiny CPU run of mod's main(): every number the seed decides, as main() wrote it.
    Dropout makes every step draw random numbers; parts 02 on also draw random windows and
    sample at temperature 0.8. Timings are left out: they are measured, not seeded."""
    run = dict(device="cpu", dtype="float32", seed=seed, out_dir=tmp_path / out, n_layer=1,
               n_head=2, n_embd=32, dropout=0.1, max_steps=4, log_interval=1)
    if part_number(mod) >= 2:  # real text (part01 memorizes its built-in paragraph)
        run.update(data=data, data_dir=tmp_path / "data", block_size=16, batch_size=4,
                   eval_interval=2, eval_iters=2, num_samples=1, max_new_tokens=8)
    if part_number(mod) >= 4:  # the default BPE, small
        run.update(vocab_size=300, warmup_steps=2)
    if part_number(mod) >= 10:  # the schedules of part10's own lessons, short
        run.update(autoencoder_steps=4, poincare_epochs=2, dim=2)
    mod.main(as_flags(run))
    if part_number(mod) >= 10:  # a run folder per model the lessons train, and a drawn passage
        folders = sorted(p for p in (tmp_path / out).iterdir() if (p / "metrics.jsonl").exists())
        rows = [{k: v for k, v in row.items() if k.endswith("step") or "loss" in k}
                for folder in folders for row in read_metrics(folder)]
        figures = {k: v for k, v in read_summary(tmp_path / out).items() if k in ("lcm", "poincare")}
        return rows, (tmp_path / out / "patches.txt").read_text() + json.dumps(without_timings(figures))
    rows = [{k: v for k, v in row.items() if k.endswith("step") or "loss" in k}
            for row in read_metrics(tmp_path / out)]
    return rows, (tmp_path / out / "samples.txt").read_text()


@pytest.mark.parametrize("name", part_names(1))
def test_same_seed_same_run(name, tmp_path, shakespeare):
    """--seed: the same seed gives the same CPU run, loss for loss and sample for sample;
    another seed another run. (Part00 trains nothing: its seed feeds the benchmarks' random
    inputs, test_seed_repeats_random_streams checks set_seed there.)"""
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare, n=20_000)
    a, b = seeded_run(mod, tmp_path, data, 7, "a"), seeded_run(mod, tmp_path, data, 7, "b")
    c = seeded_run(mod, tmp_path, data, 8, "c")
    losses = [v for row in a[0] for k, v in row.items() if k != "step"]
    steps = [row["step"] for row in a[0] if "train_loss" in row or "loss" in row]
    assert steps and steps == [1, 2, 3, 4] * (len(steps) // 4)  # (part10: four steps of each of its models)
    assert len(set(losses)) > 3  # the steps differ: four real steps were compared
    assert a == b  # loss for loss, and the same samples
    assert a[0] != c[0]
    for row_a, row_c in zip(a[0], c[0]):  # another seed: other numbers at every step, but
        if row_a.get("rm_step") == 1:  # part07's reward head starts at zero: loss log 2 in every run
            continue
        if row_a.get("grpo_loss") == row_c.get("grpo_loss") == 0.0:  # part09: a tiny model's groups are
            continue  # all wrong, so flat: advantage 0, and the KL 0 at the first step, in every run
        assert all(row_a[k] != row_c[k] for k in row_a if not k.endswith("step")), (row_a, row_c)


def test_estimator_against_hand_computation():
    mod = load("part00")
    # GPT-2 small: L=12, C=768, T=1024, V=50304
    cfg = mod.Config(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
                     batch_size=1, tokens=1e9)
    est = mod.estimate_compute(cfg)
    C, L, T, V = 768, 12, 1024, 50304
    per_block = (2 * C) + (3 * C * C + 3 * C) + (C * C + C) + (2 * C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    n = V * C + T * C + L * per_block + 2 * C
    assert est["params"] == n == 124_475_904
    assert est["flops_per_token"] == 6 * (n - T * C) + 12 * L * C * T
    assert est["train_flops"] == est["flops_per_token"] * 1e9
    m32, m16 = est["memory"]["float32"], est["memory"]["bfloat16"]
    assert m32["weights_gb"] == pytest.approx(4 * n / 1e9)
    assert m16["weights_gb"] == pytest.approx(2 * n / 1e9)
    assert m32["adamw_gb"] == m16["adamw_gb"] == pytest.approx(8 * n / 1e9)
    act16 = L * T * C * (34 + 5 * 12 * T / C) + T * V * 4
    assert m16["activations_gb"] == pytest.approx(act16 / 1e9)
    # A given parameter count is used as it is, without the attention shape terms removed.
    est7b = mod.estimate_compute(mod.Config(params=7e9, tokens=2e12))
    assert est7b["params"] == 7e9 and est7b["train_flops"] > 6 * 7e9 * 2e12


def test_mixed_precision_claims():
    facts = load("part00").mixed_precision_demo("cpu")
    assert math.isinf(facts["fp16_70000"])  # fp16 overflows above 65504 ...
    assert facts["bf16_70000"] == pytest.approx(70000, rel=0.01)  # ... bf16 does not
    assert facts["fp16_1e-8"] == 0.0 and facts["bf16_1e-8"] == pytest.approx(1e-8, rel=0.01)
    assert facts["fp16_grad"] == 0.0  # the fp16 gradient underflowed
    assert facts["fp16_grad_scaled"] == pytest.approx(1e-8, rel=0.01)  # loss scaling saved it


def test_main_writes_measured_summary(tmp_path):
    mod = load("part00")
    out = tmp_path / "p0"
    mod.main(["--out_dir", str(out), "--bench_seconds", "0.02", "--compile_check", "false",
              "--n_layer", "2", "--n_embd", "64", "--n_head", "2"])
    s = read_summary(out)
    for dtype in ("float32", "bfloat16"):
        assert all(v > 0 for v in s["matmul_tflops"][dtype].values())
    assert s["bandwidth_gbs"] > 0
    est = s["estimate"]
    # the time estimate is the FLOPs over the measured peak at the stated MFU
    assert est["seconds"] == pytest.approx(est["train_flops"] / (est["peak_flops_measured"] * 0.4))
    # the peak is the best matmul in the training dtype (bf16 on a GPU, float32 on a CPU)
    assert est["peak_flops_measured"] == pytest.approx(max(s["matmul_tflops"][est["dtype"]].values()) * 1e12)
    assert any("mm" in op for op in s["profile_top_ops"])  # the matmuls show up in the profile
    assert s["environment"]["sdpa"]["math"] == "ok"


def test_bad_values_exit_2(tmp_path):
    mod = load("part00")
    for args in (["--mfu", "0"], ["--n_embd", "10", "--n_head", "3"], ["--n_layer", "0"]):
        with pytest.raises(SystemExit) as e:
            mod.main(args + ["--out_dir", str(tmp_path)])
        assert e.value.code == 2
