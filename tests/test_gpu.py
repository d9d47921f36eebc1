"""CUDA correctness of every part: bf16 autocast, torch.compile, fused AdamW, flash attention
through SDPA, the KV cache, F.grouped_mm, fp16 with GradScaler, and each part's main() on
the GPU. Skipped where no CUDA GPU is present (CI has none); on a GPU machine:
python -m pytest -q tests/test_gpu.py"""

import pytest
import torch

from conftest import (config_fields, load, part_names, part_number, perturb_, read_summary, small_corpus,
                      tiny_cfg, train_losses)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
TRAINED = part_names(2)  # parts with the byte/BPE data path and train()


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 means float32 here: no TF32 in the reference computations."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def gpu_cfg(mod, **kw):
    """conftest's tiny model of the part (MoE included) at 64 wide, 64 tokens of context,
    byte-sized vocabulary; the part's own defaults otherwise."""
    experts = dict(n_experts=4, moe_top_k=2)  # small experts whose rows suit the grouped matmul
    experts = {k: v for k, v in experts.items() if k in config_fields(mod)}
    return tiny_cfg(mod, None, **{"n_embd": 64, "block_size": 64, "vocab_size": 256, **experts, **kw})


def main_args(mod, tmp_path, data, **kw):
    """main() flags for a short GPU run, keeping those the part has."""
    names = config_fields(mod)
    base = dict(data=data, data_dir=tmp_path / "data", out_dir=tmp_path / "out", seed=0,
                tokenizer="bpe", vocab_size=300, n_layer=2, n_embd=64, n_head=4, block_size=64,
                batch_size=16, max_steps=60, eval_interval=30, eval_iters=4, log_interval=10,
                warmup_steps=5, learning_rate=3e-3, num_samples=1, max_new_tokens=16)
    if "tokenizer" not in names:
        del base["vocab_size"]  # the byte parts: 256
    base.update(kw)
    return [a for k, v in base.items() if k in names for a in (f"--{k}", str(v))]


def batch(cfg, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(cfg.vocab_size, (B, cfg.block_size + 1), generator=g)
    return x[:, :-1].to(DEV), x[:, 1:].to(DEV)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def close_grads(got, ref, tol):
    """Every gradient points the same way (cosine > 0.99) and all of them together are
    within `tol` relative error: small ones sum many rounded products, so no per-tensor tol."""
    for n in ref:
        assert torch.cosine_similarity(got[n].flatten().float(), ref[n].flatten().float(), dim=0) > 0.99, n
    flat = lambda g: torch.cat([g[n].flatten().float() for n in ref])  # noqa: E731
    assert rel(flat(got), flat(ref)) < tol


def loss_and_grads(mod, model, x, y, dtype, run=None):
    """Loss and gradients of model, computed by `run` (a compiled wrapper of it) if given."""
    model.zero_grad(set_to_none=True)
    with mod.autocast_ctx(DEV, dtype):
        _, loss = (model if run is None else run)(x, y)
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


@pytest.mark.parametrize("name", TRAINED)
def test_cuda_float32_matches_cpu(name):
    mod = load(name)
    cfg = gpu_cfg(mod)
    torch.manual_seed(0)
    cpu = mod.GPT(cfg)
    gpu = mod.GPT(cfg).to(DEV)
    gpu.load_state_dict(cpu.state_dict())
    x, y = batch(cfg)
    l_cpu, g_cpu = loss_and_grads(mod, cpu, x.cpu(), y.cpu(), torch.float32)
    l_gpu, g_gpu = loss_and_grads(mod, gpu, x, y, torch.float32)
    assert abs(l_gpu.item() - l_cpu.item()) < 1e-4 * l_cpu.item()
    for n in g_cpu:
        assert rel(g_gpu[n].cpu(), g_cpu[n]) < 1e-3, n


@pytest.mark.parametrize("name", TRAINED)
def test_bf16_autocast_is_close_to_float32(name):
    mod = load(name)
    cfg = gpu_cfg(mod)
    torch.manual_seed(0)
    model = mod.GPT(cfg).to(DEV)
    x, y = batch(cfg)
    l32, g32 = loss_and_grads(mod, model, x, y, torch.float32)
    l16, g16 = loss_and_grads(mod, model, x, y, torch.bfloat16)
    assert abs(l16.item() - l32.item()) < 1e-2 * l32.item()
    close_grads(g16, g32, 3e-2)  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("name", TRAINED)
def test_flash_attention_matches_written_out(name):
    """SDPA's fused kernels (flash on sm80+ in bf16) compute the attention written out, with
    the causal mask, a sliding window with a sink, and grouped-query heads where the part has them."""
    mod = load(name)
    variants = [{}]
    if "window" in config_fields(mod):
        variants += [dict(window=16, sink=2, pos="rope"), dict(n_kv_head=2, pos="rope")]
    for kw in variants:
        torch.manual_seed(0)
        model = mod.GPT(gpu_cfg(mod, **kw)).to(DEV)
        x, y = batch(model.cfg)
        for dtype in (torch.float32, torch.bfloat16):
            with mod.autocast_ctx(DEV, dtype):
                fused = model(x)[0].float()
                for m in model.modules():
                    if hasattr(m, "flash"):
                        m.flash = False
                plain = model(x)[0].float()
                for m in model.modules():
                    if hasattr(m, "flash"):
                        m.flash = True
            assert rel(fused, plain) < (1e-5 if dtype == torch.float32 else 2e-2), (kw, dtype)


@pytest.mark.parametrize("name", part_names(4))
def test_compiled_model_matches_eager(name):
    mod = load(name)
    cfg = gpu_cfg(mod)
    torch.manual_seed(0)
    model = mod.GPT(cfg).to(DEV)
    x, y = batch(cfg)
    compiled = (mod.compile_model if part_number(mod) >= 5 else torch.compile)(model)  # part05: the MoE's own
    l_eager, g_eager = loss_and_grads(mod, model, x, y, torch.bfloat16)
    l_comp, g_comp = loss_and_grads(mod, model, x, y, torch.bfloat16, run=compiled)
    assert abs(l_comp.item() - l_eager.item()) < 1e-2 * l_eager.item()
    close_grads(g_comp, g_eager, 3e-2)


@pytest.mark.parametrize("name", TRAINED)
def test_fused_adamw_steps_like_the_plain_one(name):
    """configure_optimizer picks fused AdamW on CUDA; fed the same gradients, its steps equal
    those of the multi-tensor (foreach) implementation."""
    mod = load(name)
    cfg = gpu_cfg(mod)
    torch.manual_seed(0)
    fused_model = mod.GPT(cfg).to(DEV)
    plain_model = mod.GPT(cfg).to(DEV)
    plain_model.load_state_dict(fused_model.state_dict())
    fused = mod.configure_optimizer(fused_model, cfg, DEV)
    plain = mod.configure_optimizer(plain_model, cfg, "cpu")  # the cpu choice: not fused
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for seed in range(3):
        x, y = batch(cfg, seed=seed)
        _, grads = loss_and_grads(mod, fused_model, x, y, torch.float32)
        for n, p in plain_model.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
        fused.step()
        plain.step()
    for (n, p), q in zip(fused_model.named_parameters(), plain_model.parameters()):
        assert rel(p.detach(), q.detach()) < 1e-5, n


@pytest.mark.parametrize("name", part_names(3))
def test_kv_cache_decoding_matches_full_forward_on_cuda(name):
    """Cached decoding (prefill, then one position at a time) gives the logits of running the
    whole sequence, for full attention, a sliding window with a sink, and GQA; greedy
    generation with and without the cache picks the same tokens."""
    mod = load(name)
    for kw in (dict(), dict(window=8, sink=2), dict(n_kv_head=2)):
        torch.manual_seed(0)  # perturbed: next-token distributions far from uniform, so ties are rare
        model = perturb_(mod.GPT(gpu_cfg(mod, pos="rope", **kw)), 0).to(DEV).eval()
        x, _ = batch(model.cfg, B=2)
        x = x[:, :40]
        with torch.no_grad():
            full = model(x)[0]
            cache = model.new_cache()
            steps = [model(x[:, :24], cache=cache)[0]]
            steps += [model(x[:, t:t + 1], cache=cache)[0] for t in range(24, 40)]
        assert rel(torch.cat(steps, dim=1), full) < 1e-5, kw
        prompt = x[:, :8]
        cached = mod.generate(model, prompt, 80, temperature=0, use_cache=True)
        plain = mod.generate(model, prompt, 80, temperature=0, use_cache=False)
        assert torch.equal(cached, plain), kw


@pytest.mark.parametrize("name", part_names(6))
def test_left_padded_generation_matches_each_row_alone_on_cuda(name):
    """6.3/6.5 generate_batch on the GPU: rows of different lengths, left-padded into one batch
    with the attention mask (SDPA with a boolean mask), give each row's greedy tokens alone."""
    mod = load(name)
    torch.manual_seed(0)
    model = perturb_(mod.GPT(gpu_cfg(mod, vocab_size=256 + len(mod.CHAT_TOKENS))), 0).to(DEV).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(256, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    pad, stop = 256 + mod.CHAT_TOKENS.index("<|pad|>"), 256 + mod.CHAT_TOKENS.index("<|end|>")
    together, _ = mod.generate_batch(model, prompts, 16, stop, pad)
    alone = [mod.generate_batch(model, [p], 16, stop, pad)[0][0] for p in prompts]
    assert together == alone


@pytest.mark.parametrize("name", part_names(8, 8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ppo_rollout_and_update_on_cuda(name, dtype):
    """8.2/8.5 on the GPU: the log-probs the update recomputes match the sampler's (float32:
    to 1e-4; in bf16/fp16 autocast the two forwards round differently), and one PPO update
    (a GradScaler for float16) leaves every weight finite and moved."""
    mod = load(name)
    torch.manual_seed(0)
    tok = mod.ByteTokenizer(mod.CHAT_TOKENS)
    cfg = gpu_cfg(mod, vocab_size=tok.vocab_size, temperature=0.9, max_answer_tokens=8, rollout_batch=8,
                  ppo_minibatch=4, ppo_epochs=1)
    policy = perturb_(mod.GPT(cfg), 0).to(DEV)
    rm = mod.RewardModel(perturb_(mod.GPT(cfg), 1).to(DEV))
    actors = mod.make_actors(policy, rm, cfg)
    recs = [{**mod.rl_record(mod.user_turn(p)), "ids": mod.render_chat(tok, mod.user_turn(p), generation_prompt=True)[0]}
            for p in ["Repeat: ab", "1 + 2 =", "Sort: 3 1 2 9", "Reverse: pots"] * 2]
    b = mod.rollout(*actors, tok, recs, cfg, dtype, torch.Generator(device=DEV).manual_seed(0))
    gap = ((b["sample_logp"] - b["logp"]).abs() * b["resp_mask"]).max().item()
    assert gap < (1e-4 if dtype == torch.float32 else 0.25), gap
    rewards, _ = mod.kl_rewards(b["score"], b["logp"], b["ref_logp"], b["resp_mask"], 0.05)
    adv, b["returns"] = mod.gae(rewards, b["values"], b["resp_mask"])
    b["advantages"] = mod.whiten(adv, b["resp_mask"])
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = mod.configure_optimizer(torch.nn.ModuleList([policy, actors[3]]), cfg, DEV)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    for _ in range(3):  # float16: the scaler may skip a first step while it finds its scale
        figures = mod.ppo_update(policy, actors[3], opt, b, cfg, dtype, torch.Generator().manual_seed(0), scaler)
    assert all(torch.isfinite(v) for v in figures.values())
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters())


@pytest.mark.parametrize("name", part_names(9, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grpo_rollout_and_update_on_cuda(name, dtype):
    """9.1/9.4 on the GPU: a group rollout (2 prompts x 4 responses, scored by a reward model
    with a random head, so the groups are not flat) records the sampler's log-probs, which
    the update's forward matches (float32: to 1e-4; in bf16/fp16 autocast the two forwards
    round differently), and one GRPO update (a GradScaler for float16) leaves every weight
    finite and moved."""
    mod = load(name)
    torch.manual_seed(0)
    tok = mod.ByteTokenizer(mod.CHAT_TOKENS)
    cfg = gpu_cfg(mod, vocab_size=tok.vocab_size, temperature=0.9, max_answer_tokens=8, rollout_batch=8, group_size=4,
                  grpo_minibatch=4, num_iterations=1, reward="rm", missing_end_penalty=0.0)
    policy = perturb_(mod.GPT(cfg), 0).to(DEV)
    rm = perturb_(mod.RewardModel(mod.GPT(cfg)), 1).to(DEV)  # the head too: rewards that differ
    actors = mod.make_actors(policy, rm, cfg)
    recs = [{**mod.rl_record(mod.user_turn(p)), "ids": mod.render_chat(tok, mod.user_turn(p), generation_prompt=True)[0]}
            for p in ["Repeat: ab", "Sort: 3 1 2 9"]]
    b, _ = mod.group_rollout(*actors, tok, iter([recs]), cfg, dtype, torch.Generator(device=DEV).manual_seed(0))
    gap = ((b["sample_logp"] - b["logp"]).abs() * b["resp_mask"]).max().item()
    assert gap < (1e-4 if dtype == torch.float32 else 0.25), gap
    assert b["advantages"].abs().sum() > 0 and torch.isfinite(b["advantages"]).all()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = mod.configure_optimizer(policy, cfg, DEV)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    for _ in range(3):  # float16: the scaler may skip a first step while it finds its scale
        figures = mod.grpo_update(policy, opt, b, cfg, dtype, torch.Generator().manual_seed(0), scaler)
    assert set(figures) == {"grpo_loss", "clip_frac", "kl_penalty"}
    assert all(torch.isfinite(v) for v in figures.values())
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_grouped_mm_matches_expert_loop_on_cuda():
    mod = load("part05")
    torch.manual_seed(0)
    model = mod.GPT(gpu_cfg(mod, n_experts=8, moe_top_k=2)).to(DEV)
    moe = model.moe_layers()[0]
    xs = torch.randn(4, 64, model.cfg.n_embd, device=DEV)
    with mod.autocast_ctx(DEV, torch.bfloat16):
        assert moe.use_grouped(xs, torch.bfloat16) == (torch.cuda.get_device_capability() >= (8, 0))
    outs, grads = [], []
    for mode in ("true", "false"):
        moe.grouped_mm = mode
        model.zero_grad(set_to_none=True)
        with mod.autocast_ctx(DEV, torch.bfloat16):
            out = moe(xs)
        out.float().pow(2).mean().backward()
        outs.append(out.float())
        grads.append([moe.w_in.grad.clone(), moe.w_out.grad.clone(), moe.router.weight.grad.clone()])
    assert rel(outs[0], outs[1]) < 1e-2
    for g_grouped, g_loop in zip(*grads):
        assert rel(g_grouped, g_loop) < 2e-2


@pytest.mark.parametrize("name", TRAINED)
def test_main_trains_on_cuda(name, tmp_path, shakespeare):
    """Each part's main() on the GPU with its CUDA defaults (bf16 autocast; torch.compile,
    fused AdamW and pinned batches from part04): the loss falls, the summary says cuda."""
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare, n=100_000)
    mod.main(main_args(mod, tmp_path, data, device="cuda", dtype="auto"))
    s = read_summary(tmp_path / "out")
    assert s["device"] == "cuda"
    losses = train_losses(tmp_path / "out")
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first - 0.5, losses
    if "mfu" in s and any(k in torch.cuda.get_device_name() for k in ("H100", "H200", "A100")):
        assert 0 < s["mfu"] < 1


@pytest.mark.parametrize("name", part_names(4))
def test_fp16_with_grad_scaler_on_cuda(name, tmp_path, shakespeare):
    mod = load(name)
    data = small_corpus(tmp_path, shakespeare, n=100_000)
    mod.main(main_args(mod, tmp_path, data, device="cuda", dtype="float16", compile="false"))
    losses = train_losses(tmp_path / "out")
    assert all(v == v for v in losses.values())  # no NaN reached the weights
    assert losses[max(losses)] < losses[min(losses)] - 0.5, losses


def test_part00_measures_the_gpu(tmp_path):
    mod = load("part00")
    s = mod.main(["--device", "cuda", "--out_dir", str(tmp_path), "--bench_seconds", "0.1"])
    env = s["environment"]
    assert env["gpu"] == torch.cuda.get_device_name() and env["compile"]["ok"]
    if torch.cuda.get_device_capability() >= (8, 0):
        assert env["sdpa"]["flash_attention"] == "ok" and env["bf16"]
        # tensor cores: bf16 matmuls run several times faster than float32 ones
        assert max(s["matmul_tflops"]["bfloat16"].values()) > 2 * max(s["matmul_tflops"]["float32"].values())
    assert s["bandwidth_gbs"] > 100  # any GPU's memory moves more than 100 GB/s


def test_part01_memorizes_on_cuda(tmp_path):
    mod = load("part01")
    s = mod.main(["--device", "cuda", "--out_dir", str(tmp_path)])
    assert s["final_loss"] < 0.05 and s["exact_match"]


@pytest.mark.parametrize("name", part_names(10))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_byte_latent_model_on_cuda_matches_the_cpu_and_trains(name, dtype):
    """10.2 on the GPU: entropy patches, the patch pooling (index_add_), the gather of each
    byte's context and the three block stacks give the CPU's float32 logits (bf16 autocast:
    close), and a few AdamW steps under autocast lower the loss."""
    mod = load(name)
    torch.manual_seed(0)
    cfg = mod.Config(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=261, local_layers=1)
    entropy_model = perturb_(mod.GPT(mod.Config(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=261)), 0)
    x = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    threshold = mod.next_byte_entropy(entropy_model.eval(), x).median().item()
    cpu = mod.ByteLatent(cfg, entropy_model, threshold)
    want = cpu(x)[0]
    gpu = mod.ByteLatent(cfg, entropy_model.to(DEV), threshold).to(DEV)
    gpu.load_state_dict(cpu.state_dict())
    with mod.autocast_ctx(DEV, dtype):
        got = gpu(x.to(DEV))[0].float().cpu()
    assert (got - want).abs().max() < (1e-3 if dtype == torch.float32 else 0.1)
    opt = mod.configure_optimizer(gpu, cfg, DEV)
    y = torch.roll(x, -1, 1).to(DEV)
    losses = []
    for _ in range(30):
        with mod.autocast_ctx(DEV, dtype):
            loss = gpu(x.to(DEV), y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name", part_names(10))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_concept_models_train_on_cuda(name, dtype):
    """10.3 on the GPU: the sentence autoencoder and the Base-LCM train with fit() under
    autocast (their loss falls), the concepts come out unit-length in float32, and greedy
    decoding runs on the device."""
    mod = load(name)
    torch.manual_seed(0)
    cfg = mod.Config(n_layer=1, n_head=2, n_embd=64, concept_dim=16, concept_layers=1, sentence_len=32,
                     lcm_context=8, batch_size=4, max_steps=60, max_seconds=0, warmup_steps=5, log_interval=1000,
                     learning_rate=3e-3)
    sentences = ["Speak, speak.", "First Citizen:", "All:", mod.END_OF_TEXT]
    ae = mod.SentenceAutoencoder(cfg).to(DEV)
    fitted = mod.fit(ae, lambda gen: mod.sentence_batch(sentences, DEV), cfg, DEV, dtype, "ae")
    assert fitted["train_loss"] < 1.0
    with mod.autocast_ctx(DEV, dtype):
        concepts = mod.embed_sentences(ae, sentences, DEV)
        decoded = ae.decode(concepts, cfg.sentence_len)
    assert concepts.dtype == torch.float32 and torch.allclose(concepts.norm(dim=1), torch.ones(4, device=DEV), atol=1e-2)
    assert len(decoded) == 4
    seqs = [concepts.cpu()[torch.randperm(4)] for _ in range(10)]
    lcm = mod.BaseLCM(cfg).to(DEV)
    x, mask = mod.concept_windows(seqs, cfg, DEV, torch.Generator().manual_seed(0))
    before = lcm(x, mask)[1].item()
    mod.fit(lcm, lambda g: mod.concept_windows(seqs, cfg, DEV, g), cfg, DEV, dtype, "lcm")
    assert lcm(x, mask)[1].item() < before
