"""4.6 Hugging Face interop (parts 04 onward): safetensors written and read by hand, the
export round trip (bit-identical weights, identical logits, identical files), what the
Llama / Mistral / Mixtral formats cannot express, bad folders and lying files (one line,
exit 2), --init_from in main(); and, where transformers, safetensors and tokenizers are
installed (requirements-extra.txt), the exported folder against transformers: logits,
tokenizer ids, greedy generations, and checkpoints that transformers itself wrote."""
import dataclasses
import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import (SHAKESPEARE, as_flags, expect_exit_2, expect_flag_error, lesson_fields, load, part_names,
                      random_strings, run_flags, small_corpus, tiny_cfg, tiny_gpt)

ALL = part_names(4)
MOE = part_names(5)
SPECIAL = "<|endoftext|>"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


# ---------------------------------------------------------------------------------------
# Helpers: tiny models, a tokenizer, exported folders
# ---------------------------------------------------------------------------------------
_BPE = {}


def bpe(mod, shakespeare):
    """A 300-token BPE (43 merges, <|endoftext|>) trained on Shakespeare and some Unicode."""
    if mod.__name__ not in _BPE:
        text = Path(shakespeare).read_text(encoding="utf-8")[:20_000]
        text += "h\u00e9llo w\u00f6rld \u65e5\u672c\u8a9e \U0001F600 na\u00efve \u0416\u0443\u043a " * 30
        _BPE[mod.__name__] = mod.BPETokenizer.train(text, 300)
    return _BPE[mod.__name__]


LESSON = 4  # part04's dense Llama on every part, unless a test asks for experts
# The tiny model of this file: conftest's, with 2 kv heads of 4 and a 32-token context.
hf_cfg = partial(tiny_cfg, lesson=LESSON, n_kv_head=2, block_size=32)
hf_gpt = partial(tiny_gpt, lesson=LESSON, n_kv_head=2, block_size=32)


def tiny_model(mod, tokenizer, seed=0, **kw):
    """A GPT for the tokenizer's vocabulary, far from uniform (routing included), in eval mode."""
    return hf_gpt(mod, seed=seed, vocab_size=tokenizer.vocab_size, **kw)


def kinds(name):
    """(id, tokenizer kind, model flags): dense Llama with BPE and with bytes, Mistral's
    sliding window, and from part05 on Mixtral (top-2 and top-3)."""
    out = [("llama-bpe", "bpe", {}), ("llama-bytes", "byte", {}), ("mistral-window", "bpe", {"window": 5})]
    if name in MOE:
        out += [("mixtral", "bpe", {"n_experts": 4}), ("mixtral-top3", "byte", {"n_experts": 4, "moe_top_k": 3})]
    return out


CASES = [(name, *k) for name in ALL for k in kinds(name)]
CASE_IDS = [f"{name[:6]}-{k[0]}" for name in ALL for k in kinds(name)]


def make(mod, kind, shakespeare):
    return bpe(mod, shakespeare) if kind == "bpe" else mod.ByteTokenizer()


def export(mod, model, tokenizer, path):
    mod.export_hf(model, tokenizer, str(path))
    return Path(path)


def main_cpu(mod, args):
    return mod.main(args + ["--device", "cpu"])


def write_safetensors_raw(path, header, data, header_len=None):
    """A safetensors file from parts, so that a test can make it lie."""
    head = json.dumps(header).encode()
    n = len(head) if header_len is None else header_len
    Path(path).write_bytes(n.to_bytes(8, "little") + head + data)


def read_header(path):
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), n, raw


def logits(model, ids):
    with torch.no_grad():
        return model(ids)[0][..., :model.cfg.vocab_size]


# ---------------------------------------------------------------------------------------
# safetensors by hand
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_safetensors_round_trip_and_layout(name, tmp_path):
    mod = load(name)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b.half": torch.randn(7, generator=g).half(),
               "c.bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "view": torch.randn(4, 6, generator=g)[:, 1:3]}  # not contiguous
    path = tmp_path / "t.safetensors"
    mod.save_safetensors(str(path), tensors)
    back = mod.load_safetensors(str(path))
    assert list(back) == sorted(back, key=lambda k: read_header(path)[0][k]["data_offsets"])
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    header, n, raw = read_header(path)
    assert n % 8 == 0 and header["__metadata__"] == {"format": "pt"}  # the data starts 8-byte aligned
    assert header["a"] == {"dtype": "F32", "shape": [3, 5], "data_offsets": header["a"]["data_offsets"]}
    begin, end = header["a"]["data_offsets"]
    assert raw[8 + n + begin:8 + n + end] == tensors["a"].numpy().astype("<f4").tobytes()  # little-endian
    assert len(raw) == 8 + n + max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name", ALL)
def test_safetensors_agrees_with_the_safetensors_package(name, tmp_path):
    st = pytest.importorskip("safetensors.torch")
    mod = load(name)
    g = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(4, 3, generator=g), "h": torch.randn(5, generator=g).half(),
               "b": torch.randn(2, 2, generator=g).bfloat16()}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    mod.save_safetensors(str(ours), tensors)
    st.save_file(tensors, str(theirs), metadata={"format": "pt"})
    for got in (st.load_file(str(ours)), mod.load_safetensors(str(theirs))):
        assert set(got) == set(tensors)
        assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())


def lying_files():
    """(file name, bytes maker, words the error must say): truncated, lying, unsupported files."""
    x = torch.arange(6, dtype=torch.float32).numpy().tobytes()  # 24 bytes
    ok = {"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    return [
        ("short", lambda p: Path(p).write_bytes(b"\x10\x00\x00"), "truncated"),
        ("huge-header", lambda p: write_safetensors_raw(p, ok, x, header_len=2**62), "header claims"),
        ("header-past-end", lambda p: write_safetensors_raw(p, ok, b"", header_len=10_000), "header claims"),
        ("not-json", lambda p: Path(p).write_bytes((8).to_bytes(8, "little") + b"\xff\xfe{{{{{{"), "not a JSON"),
        ("truncated-data", lambda p: write_safetensors_raw(p, ok, x[:20]), "truncated"),
        ("size-lie", lambda p: write_safetensors_raw(
            p, {"t": {"dtype": "F32", "shape": [2**40, 2**10], "data_offsets": [0, 24]}}, x), "takes"),
        ("offset-lie", lambda p: write_safetensors_raw(
            p, {"t": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, x), "lies at bytes"),
        ("offset-past-end", lambda p: write_safetensors_raw(
            p, {"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]}}, x), "lies at bytes"),
        ("overlap", lambda p: write_safetensors_raw(
            p, {"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                "u": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, x), "lies at bytes"),
        ("trailing", lambda p: write_safetensors_raw(p, ok, x + b"\0" * 8), "after the last tensor"),
        ("dtype-i64", lambda p: write_safetensors_raw(
            p, {"t": {"dtype": "I64", "shape": [3], "data_offsets": [0, 24]}}, x), "dtype I64"),
        ("dtype-f64", lambda p: write_safetensors_raw(
            p, {"t": {"dtype": "F64", "shape": [3], "data_offsets": [0, 24]}}, x), "dtype F64"),
        ("negative-shape", lambda p: write_safetensors_raw(
            p, {"t": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}}, x), "malformed"),
        ("no-offsets", lambda p: write_safetensors_raw(p, {"t": {"dtype": "F32", "shape": [6]}}, x), "malformed"),
    ]


@pytest.mark.parametrize("name", ALL)
def test_safetensors_that_lie_exit_2(name, tmp_path, capsys, monkeypatch):
    mod = load(name)
    allocated = []
    real_frombuffer = torch.frombuffer
    monkeypatch.setattr(torch, "frombuffer", lambda buf, **kw: allocated.append(len(buf)) or real_frombuffer(buf, **kw))
    for label, make_file, words in lying_files():
        path = tmp_path / f"{label}.safetensors"
        make_file(path)
        allocated.clear()
        err = expect_exit_2(capsys, mod.load_safetensors, str(path))
        assert str(path) in err and words in err, (label, err)
        assert sum(allocated) <= path.stat().st_size, label  # nothing bigger than the file was made


# ---------------------------------------------------------------------------------------
# Export, and the round trip through --init_from
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,case,kind,flags", CASES, ids=CASE_IDS)
def test_round_trip_is_bit_identical(name, case, kind, flags, shakespeare, tmp_path):
    mod = load(name)
    tok = make(mod, kind, shakespeare)
    model = tiny_model(mod, tok, **flags)
    folder = export(mod, model, tok, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == tok.vocab_size  # the padding rows stay home
    assert config["rms_norm_eps"] == 1e-6 and config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is True
    cfg = dataclasses.replace(hf_cfg(mod, vocab_size=999), init_from=str(folder), sample_only=True,
                              n_layer=7, n_embd=128, n_kv_head=0)  # the folder's shape replaces these
    cfg, tok2, back = mod.load_hf(cfg)
    assert tok2.vocab_size == tok.vocab_size and type(tok2) is type(tok)
    assert getattr(tok2, "name") == tok.name  # the same merges, specials and split pattern
    assert cfg.n_layer == 2 and cfg.n_embd == 32 and cfg.n_kv_head == 2 and cfg.window == flags.get("window", 0)
    V = tok.vocab_size
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        a, b = ours[k], theirs[k]
        if k in ("wte.weight", "lm_head.weight"):
            assert torch.equal(b[V:], torch.zeros_like(b[V:]))  # padding rows: zero
            a, b = a[:V], b[:V]
        assert torch.equal(a, b), k  # bit for bit
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, ids), logits(back.eval(), ids))
    again = export(mod, back, tok2, tmp_path / "again")
    for f in FILES:
        assert (folder / f).read_bytes() == (again / f).read_bytes(), f


@pytest.mark.parametrize("name", ALL)
def test_export_maps_attention_and_mlp_rows(name, shakespeare, tmp_path):
    """q, k, v are c_attn's row blocks; gate and up c_fc's halves (gate first), by value."""
    mod = load(name)
    model = tiny_model(mod, mod.ByteTokenizer())
    t = mod.load_safetensors(str(export(mod, model, mod.ByteTokenizer(), tmp_path) / "model.safetensors"))
    block, C, kv = model.h[1], 32, 2 * 8
    w = block.attn.c_attn.weight
    assert torch.equal(t["model.layers.1.self_attn.q_proj.weight"], w[:C])
    assert torch.equal(t["model.layers.1.self_attn.k_proj.weight"], w[C:C + kv])
    assert torch.equal(t["model.layers.1.self_attn.v_proj.weight"], w[C + kv:])
    x = torch.randn(3, C)
    gate, up = block.mlp.c_fc(x).chunk(2, dim=-1)
    assert torch.equal(x @ t["model.layers.1.mlp.gate_proj.weight"].T, gate)
    assert torch.equal(x @ t["model.layers.1.mlp.up_proj.weight"].T, up)
    assert "lm_head.weight" not in t and t["model.embed_tokens.weight"].shape == (256, C)


@pytest.mark.parametrize("name", MOE)
def test_export_maps_experts(name, tmp_path):
    mod = load(name)
    model = tiny_model(mod, mod.ByteTokenizer(), n_experts=4)
    t = mod.load_safetensors(str(export(mod, model, mod.ByteTokenizer(), tmp_path) / "model.safetensors"))
    moe, x = model.h[0].mlp, torch.randn(5, 32)
    p = "model.layers.0.block_sparse_moe."
    assert torch.equal(t[p + "gate.weight"], moe.router.weight)
    for e in range(4):
        gate, up = (x @ moe.w_in[e]).chunk(2, dim=-1)
        w1, w3, w2 = (t[f"{p}experts.{e}.{w}.weight"] for w in ("w1", "w3", "w2"))
        assert torch.allclose(x @ w1.T, gate, atol=1e-6) and torch.allclose(x @ w3.T, up, atol=1e-6)
        h = torch.randn(5, w2.size(1))
        assert torch.allclose(h @ w2.T, h @ moe.w_out[e], atol=1e-6)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    assert config["num_experts_per_tok"] == 2 and config["intermediate_size"] == moe.w_out.size(1)
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 10000.0  # Mixtral's defaults differ


def refusals(name):
    """(flags, words of the one-line refusal) for what the target formats cannot express."""
    out = [({"pos": "learned"}, "--pos learned"), ({"pos": "sinusoidal"}, "--pos sinusoidal"),
           ({"norm": "layernorm"}, "--norm layernorm"), ({"mlp": "gelu"}, "--mlp gelu"),
           ({"bias": True}, "--bias"), ({"window": 4, "sink": 2}, "--sink")]
    if name in MOE:
        out += [({"n_experts": 4, "balance": "aux_free"}, "--balance aux_free"),
                ({"n_experts": 4, "capacity_factor": 1.25}, "--capacity_factor"),
                ({"n_experts": 4, "n_shared_experts": 1}, "--n_shared_experts"),
                ({"n_experts": 4, "moe_top_k": 1}, "--moe_top_k 1"),
                ({"n_experts": 4, "moe_every": 2}, "--moe_every")]
    return out


REFUSALS = [(name, *r) for name in ALL for r in refusals(name)]


@pytest.mark.parametrize("name,flags,words", REFUSALS,
                         ids=[f"{n[:6]}-{'-'.join(f)}" for n, f, _ in REFUSALS])
def test_export_refuses_what_the_format_cannot_express(name, flags, words, tmp_path, capsys):
    mod = load(name)
    model = mod.GPT(hf_cfg(mod, vocab_size=256, **flags))
    err = expect_exit_2(capsys, mod.export_hf, model, mod.ByteTokenizer(), str(tmp_path / "hf"))
    assert words in err
    assert not (tmp_path / "hf").exists()
    # main() refuses before it trains (and before it reads the data)
    args = as_flags({**lesson_fields(mod, LESSON), **flags})  # part05's default MoE has no dense MLP
    err = expect_flag_error(capsys, mod, args + ["--export_hf", str(tmp_path / "hf")], tmp_path)
    assert words in err


@pytest.mark.parametrize("name", MOE)
def test_export_refuses_trained_routing_offsets_and_accepts_gelu_beside_experts(name, tmp_path, capsys):
    mod = load(name)
    model = mod.GPT(hf_cfg(mod, vocab_size=256, n_experts=4))
    model.h[0].mlp.expert_offset[1] = 0.5  # what --balance aux_free leaves, whatever the flags say now
    err = expect_exit_2(capsys, mod.export_hf, model, mod.ByteTokenizer(), str(tmp_path / "hf"))
    assert "routing offsets" in err
    assert mod.hf_refusal(hf_cfg(mod, vocab_size=256, n_experts=4, mlp="gelu")) is None  # no dense MLP is left
    assert "--mlp gelu" in mod.hf_refusal(hf_cfg(mod, vocab_size=256, mlp="gelu"))


@pytest.mark.parametrize("name", ALL)
def test_export_refuses_two_ids_for_the_same_bytes(name, tmp_path, capsys):
    mod = load(name)
    tok = mod.BPETokenizer([(97, 98), (256, 99), (98, 99), (97, 258)], [SPECIAL])  # abc twice
    err = expect_exit_2(capsys, mod.hf_tokenizer_json, tok)
    assert "same bytes" in err


# ---------------------------------------------------------------------------------------
# Bad folders: one line, exit 2
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """An exported dense part04 model with BPE: parts 04 and 05 both read it."""
    mod = load(ALL[0])
    tok = bpe(mod, str(SHAKESPEARE))
    return export(mod, tiny_model(mod, tok), tok, tmp_path_factory.mktemp("hf") / "good")


@pytest.fixture
def folder(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "good"))


def edit_json(path, **changes):
    obj = json.loads(Path(path).read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    Path(path).write_text(json.dumps(obj))


def edit_tensors(path, fn):
    """Rewrite a safetensors file after fn(tensors); written here, so any dtype can go in."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
    tensors = load(ALL[0]).load_safetensors(str(path))
    fn(tensors)
    header, data = {}, b""
    for k, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    write_safetensors_raw(path, header, data)


BAD_FOLDERS = {
    "no-folder": (lambda d: shutil.rmtree(d), "no such folder"),
    "no-config": (lambda d: (d / "config.json").unlink(), "config.json: no such file"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{"), "not a JSON file"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: no such file"),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
                  "truncated"),
    "architecture": (lambda d: edit_json(d / "config.json", architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
    "hidden-size": (lambda d: edit_json(d / "config.json", hidden_size=48, head_dim=None, intermediate_size=128),
                    "model.embed_tokens.weight is (300, 32); config.json implies (300, 48)"),
    "layers": (lambda d: edit_json(d / "config.json", num_hidden_layers=3), "no tensor model.layers.2"),
    "fewer-layers": (lambda d: edit_json(d / "config.json", num_hidden_layers=1), "model.layers.1"),
    "kv-heads": (lambda d: edit_json(d / "config.json", num_key_value_heads=4), "k_proj.weight is (16, 32)"),
    "vocab": (lambda d: edit_json(d / "config.json", vocab_size=280), "vocab_size 280"),
    "intermediate": (lambda d: edit_json(d / "config.json", intermediate_size=100), "intermediate_size 100"),
    "rope-scaling": (lambda d: edit_json(d / "config.json", rope_parameters={"rope_type": "linear", "factor": 2.0}),
                     "RoPE"),
    "rope-theta": (lambda d: edit_json(d / "config.json", rope_theta=5e5, rope_parameters=None), "rope_theta 500000"),
    "rms-eps": (lambda d: edit_json(d / "config.json", rms_norm_eps=1e-5), "rms_norm_eps 1e-05"),
    "bias": (lambda d: edit_json(d / "config.json", attention_bias=True), "biases"),
    "act": (lambda d: edit_json(d / "config.json", hidden_act="gelu"), "hidden_act 'gelu'"),
    "head-dim": (lambda d: edit_json(d / "config.json", head_dim=16), "head_dim 16"),
    "untied": (lambda d: (edit_json(d / "config.json", tie_word_embeddings=False), edit_tensors(
        d / "model.safetensors", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))),
               "untied"),
    "untied-missing": (lambda d: edit_json(d / "config.json", tie_word_embeddings=None), "untied"),
    "extra-tensor": (lambda d: edit_tensors(d / "model.safetensors",
                                            lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})),
                     "q_proj.bias"),
    "wrong-shape": (lambda d: edit_tensors(d / "model.safetensors",
                                           lambda t: t.update({"model.norm.weight": torch.ones(31)})),
                    "model.norm.weight is (31,)"),
    "dtype": (lambda d: edit_tensors(d / "model.safetensors",
                                     lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.float64)})),
              "dtype F64"),
    "tokenizer-order": (lambda d: edit_json(d / "tokenizer.json", model={
        **json.loads((d / "tokenizer.json").read_text())["model"],
        "vocab": {**json.loads((d / "tokenizer.json").read_text())["model"]["vocab"], "!": 34, "\"": 33}}),
                        "ids 0-255 are not the 256 bytes"),
    "tokenizer-normalizer": (lambda d: edit_json(d / "tokenizer.json", normalizer={"type": "NFC"}), "normalizer"),
    "tokenizer-not-bpe": (lambda d: edit_json(d / "tokenizer.json", model={"type": "WordPiece", "vocab": {}}),
                          "not a plain byte-level BPE"),
}


@pytest.mark.parametrize("name", ALL)
def test_bad_folders_exit_2(name, pristine, tmp_path, capsys):
    mod = load(name)
    for i, (case, (corrupt, words)) in enumerate(BAD_FOLDERS.items()):
        folder = Path(shutil.copytree(pristine, tmp_path / case))
        corrupt(folder)
        if i < 6:  # through main() and its flags
            err = expect_exit_2(capsys, main_cpu, mod, ["--init_from", str(folder), "--sample_only",
                                                          "--out_dir", str(tmp_path / "out")])
        else:  # the same function main() calls, without parsing the flags again
            cfg = dataclasses.replace(hf_cfg(mod, vocab_size=300), init_from=str(folder), sample_only=True)
            err = expect_exit_2(capsys, mod.load_hf, cfg)
        assert words in err, (case, err)


@pytest.mark.parametrize("name", ALL)
def test_sharded_folder_with_its_index(name, folder, capsys, tmp_path):
    """The weights split over two files named by model.safetensors.index.json."""
    mod = load(name)
    tensors = mod.load_safetensors(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, part in shards.items():
        mod.save_safetensors(str(folder / shard), {k: tensors[k].half() for k in part})  # F16 read too
    index = {"metadata": {}, "weight_map": {k: s for s, part in shards.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = dataclasses.replace(hf_cfg(mod, vocab_size=300), init_from=str(folder), sample_only=True)
    _, _, model = mod.load_hf(cfg)
    assert torch.equal(model.ln_f.weight, tensors["model.norm.weight"].half().float())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "shard files in the folder" in expect_exit_2(capsys, mod.load_hf, cfg)
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "other tensors" in expect_exit_2(capsys, mod.load_hf, cfg)
    # an export never writes beside a sharded checkpoint's index
    err = expect_exit_2(capsys, mod.export_hf, model, mod.ByteTokenizer(), str(folder))
    assert "sharded" in err


@pytest.mark.parametrize("name", ALL)
def test_part_specific_architectures(name, folder, tmp_path, capsys):
    """part04 has no MoE: a Mixtral folder gets one line; part05 reads it (top-1 refused)."""
    mod = load(name)
    config = json.loads((folder / "config.json").read_text())
    edit_json(folder / "config.json", architectures=["MixtralForCausalLM"], model_type="mixtral",
              num_local_experts=2, num_experts_per_tok=1)
    err = expect_exit_2(capsys, main_cpu, mod, ["--init_from", str(folder), "--sample_only",
                                                  "--out_dir", str(tmp_path / "out")])
    assert ("num_experts_per_tok 1" if name in MOE else "MixtralForCausalLM") in err, err
    edit_json(folder / "config.json", **{**config, "model_type": "llama_v2"})
    assert "model_type 'llama_v2'" in expect_exit_2(capsys, main_cpu, mod, [
        "--init_from", str(folder), "--sample_only", "--out_dir", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------
# main(): --export_hf after training and with --sample_only; --init_from trains and samples
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", part_names(4, 5))  # part06's --init_from is the base of SFT: its own test
def test_main_exports_trains_from_and_samples_a_folder(name, shakespeare, tmp_path, capsys):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare)
    extra = lesson_fields(mod, LESSON)  # dense: Llama
    mod.main(run_flags(tmp_path, data, "a", max_steps=3, export_hf=str(tmp_path / "hf_a"), **extra))
    exported = tmp_path / "hf_a"
    assert sorted(p.name for p in exported.iterdir()) == sorted(FILES)
    # --sample_only exports the same best.pt again, file for file
    mod.main(run_flags(tmp_path, data, "a", sample_only=True, export_hf=str(tmp_path / "hf_b"), **extra))
    for f in FILES:
        assert (exported / f).read_bytes() == (tmp_path / "hf_b" / f).read_bytes(), f
    # --init_from: a new run starts from the folder's weights (a learning rate of ~0 keeps them)
    capsys.readouterr()
    mod.main(run_flags(tmp_path, data, "b", max_steps=2, init_from=str(exported), learning_rate=1e-12,
                       min_lr=0, weight_decay=0, n_layer=3, n_embd=64, **extra))
    out = capsys.readouterr().out
    assert f"init_from {exported}: LlamaForCausalLM" in out
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["n_layer"] == 1 and ckpt["config"]["n_embd"] == 32  # the folder's shape
    start = mod.load_safetensors(str(exported / "model.safetensors"))
    V = json.loads((exported / "config.json").read_text())["vocab_size"]
    assert torch.allclose(ckpt["model"]["wte.weight"][:V], start["model.embed_tokens.weight"], atol=1e-8)
    assert torch.allclose(ckpt["model"]["h.0.attn.c_proj.weight"], start["model.layers.0.self_attn.o_proj.weight"],
                          atol=1e-8)
    assert (tmp_path / "b" / "tokenizer.json").exists()  # --sample_only of that run finds its BPE
    mod.main(run_flags(tmp_path, data, "b", sample_only=True, max_new_tokens=4, **extra))
    # --init_from with --sample_only samples the folder as it is, and may export it again
    mod.main(run_flags(tmp_path, data, "c", sample_only=True, init_from=str(exported),
                       export_hf=str(tmp_path / "hf_c"), **extra))
    for f in FILES:
        assert (exported / f).read_bytes() == (tmp_path / "hf_c" / f).read_bytes(), f
    assert not (tmp_path / "c" / "tokenizer.json").exists()  # sampling writes nothing in out_dir


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("args,words", [(["--resume"], "--resume"), (["--tokenizer_file", "x.json"], "--tokenizer_file")])
def test_init_from_refuses_resume_and_another_tokenizer(name, args, words, tmp_path, capsys):
    mod = load(name)
    (tmp_path / "x.json").write_text("{}")
    args = [a.replace("x.json", str(tmp_path / "x.json")) for a in args]
    err = expect_flag_error(capsys, mod, ["--init_from", str(tmp_path)] + args, tmp_path)
    assert words in err


@pytest.mark.parametrize("name", MOE)
def test_compare_refuses_interop(name, tmp_path, capsys):
    mod = load(name)
    assert "--compare" in expect_flag_error(capsys, mod, ["--compare", "--export_hf", str(tmp_path / "x")], tmp_path)


# ---------------------------------------------------------------------------------------
# Against transformers (skipped where requirements-extra.txt is not installed)
# ---------------------------------------------------------------------------------------
def hf_load(folder, **kw):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name,case,kind,flags", CASES, ids=CASE_IDS)
def test_transformers_gives_our_logits_and_greedy_text(name, case, kind, flags, shakespeare, tmp_path):
    mod = load(name)
    tok = make(mod, kind, shakespeare)
    model = tiny_model(mod, tok, **flags)
    # transformers' default expert kernel (grouped_mm) wants rows of a multiple of 16 bytes on
    # a CPU; top-3's experts are 21 wide, so that case runs its loop over experts ("eager")
    kw = {"experts_implementation": "eager"} if flags.get("moe_top_k") == 3 else {}
    hf, hf_tok = hf_load(export(mod, model, tok, tmp_path / "hf"), **kw)
    hf.generation_config.eos_token_id = None  # ours does not stop at <|endoftext|>
    assert type(hf).__name__ == json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"][0]
    ids = torch.randint(0, tok.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    ours = logits(model, ids)
    with torch.no_grad():
        theirs = hf(ids).logits
    assert theirs.shape == ours.shape  # no padding ids on their side
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - theirs).abs().max() < 1e-3 * ours.std()  # and far from a loose tolerance
    # greedy generation with the caches: the same ids (as long as the context is not full)
    prompt = torch.tensor([tok.encode("First Citizen:\nWe")])
    n = 32 - prompt.size(1)
    ours = mod.generate(model, prompt, n, temperature=0)[0].tolist()
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                         pad_token_id=0)[0].tolist()
    assert ours == theirs and len(ours) == 32
    assert hf_tok.decode(theirs) == tok.decode(ours)


@pytest.mark.parametrize("name", ALL)
def test_transformers_comparison_can_fail(name, shakespeare, tmp_path):
    """The mapping matters: swapping gate and up in the folder moves the logits far past 1e-4."""
    mod = load(name)
    tok = bpe(mod, shakespeare)
    model = tiny_model(mod, tok)
    folder = export(mod, model, tok, tmp_path / "hf")
    edit_tensors(folder / "model.safetensors", lambda t: t.update({
        "model.layers.0.mlp.gate_proj.weight": t["model.layers.0.mlp.up_proj.weight"],
        "model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.gate_proj.weight"]}))
    hf, _ = hf_load(folder)
    ids = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (logits(model, ids) - hf(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_transformers_tokenizer_gives_our_ids(name, kind, shakespeare, tmp_path):
    mod = load(name)
    tok = make(mod, kind, shakespeare)
    _, hf_tok = hf_load(export(mod, tiny_model(mod, tok, n_layer=1), tok, tmp_path / "hf"))
    strings = random_strings(400, seed=11, extra=("First Citizen:\nBefore we proceed", "<|endoftext", "<|", "|>"))
    strings += [s[:len(s) // 2] + SPECIAL + s[len(s) // 2:] + SPECIAL for s in strings[:150]]  # specials inside
    special = getattr(tok, "special", {}).get(SPECIAL)
    for s in strings:
        pieces = s.split(SPECIAL) if special is not None else [s]
        want = []
        for i, piece in enumerate(pieces):  # ordinary text between the special tokens
            want += ([special] if i else []) + tok.encode(piece)
        got = hf_tok(s, add_special_tokens=True)["input_ids"]
        assert got == want, repr(s)
        assert hf_tok.decode(got) == tok.decode(want) == s, repr(s)
    assert (special is None) == (kind == "byte")  # BPE has <|endoftext|>, bytes have none
    assert special is None or hf_tok.eos_token_id == special


def hf_reference(mod, tmp_path, arch, **config):
    """A random checkpoint that transformers itself builds and saves, with our byte tokenizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    transformers.logging.set_verbosity_error()
    base = dict(vocab_size=256, hidden_size=32, intermediate_size=mod.swiglu_hidden(32), num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6,
                tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(config)
    torch.manual_seed(3)
    model = getattr(transformers, arch)(getattr(transformers, arch.replace("ForCausalLM", "Config"))(**base))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    return model.eval()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("arch,shard", [("LlamaForCausalLM", None), ("LlamaForCausalLM", "20KB"),
                                        ("MistralForCausalLM", None), ("MixtralForCausalLM", None)])
def test_checkpoints_written_by_transformers_load(name, arch, shard, tmp_path, capsys):
    mod = load(name)
    extra = {"sliding_window": 6} if arch == "MistralForCausalLM" else {}
    if arch == "MixtralForCausalLM":
        extra = {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 24}
    hf = hf_reference(mod, tmp_path, arch, **extra)
    folder = tmp_path / "ref"
    hf.save_pretrained(str(folder), **({"max_shard_size": shard} if shard else {}))
    assert (folder / "model.safetensors.index.json").exists() == bool(shard)
    (folder / "tokenizer.json").write_text(json.dumps(mod.hf_tokenizer_json(mod.ByteTokenizer())))
    cfg = dataclasses.replace(hf_cfg(mod, vocab_size=256), init_from=str(folder), sample_only=True)
    if arch == "MixtralForCausalLM" and name not in MOE:
        assert "MixtralForCausalLM" in expect_exit_2(capsys, mod.load_hf, cfg)
        return
    cfg, _, ours = mod.load_hf(cfg)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (logits(ours.eval(), ids) - hf(ids).logits).abs().max() < 1e-4
    # an untied head is refused, not silently tied
    untied = hf_reference(mod, tmp_path, "LlamaForCausalLM", tie_word_embeddings=False)
    untied.save_pretrained(str(tmp_path / "untied"))
    shutil.copy(folder / "tokenizer.json", tmp_path / "untied")
    cfg = dataclasses.replace(cfg, init_from=str(tmp_path / "untied"))
    assert "untied" in expect_exit_2(capsys, mod.load_hf, cfg)
