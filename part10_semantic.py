"""Part 10 - Beyond tokens: BoundlessBPE, byte patches, concepts, hyperbolic embeddings, quantization.

New in this part
  10.1 BoundlessBPE (Schmidt et al., COLM 2025): after BPE's merges inside pretokens,
       supermerges join two adjacent word pretokens that are each one token into a
       superword (" of" + " the" -> " of the"), chosen by count against the regular merges
       (`--tokenizer boundless`, BoundlessBPETokenizer). Measured against BPE at one
       --vocab_size on the held-out text: bytes per token, Renyi efficiency (alpha 2.5, how
       evenly the vocabulary is used), training time, and the val bpb of the same model
       trained on each tokenization for the same --max_seconds.
  10.2 Entropy patching (Pagnoni et al., 2024, Byte Latent Transformer): a small byte model
       gives each byte's entropy, and a patch starts where it exceeds --patch_threshold (or
       rises by more than --patch_rise). Patch lengths next to BPE's bytes per token, one
       passage drawn with its boundaries (patches.png, patches.txt). Then a minimal
       byte-latent model (ByteLatent: a local encoder pooled per patch, a latent transformer
       over the patches, a local decoder for the bytes): val bpb and training FLOPs per
       byte next to the BPE model's, same training time.
  10.3 Large Concept Model (LCM team, Meta, 2024): a concept is a whole sentence as one unit
       vector, from a sentence autoencoder trained here (SentenceAutoencoder: held-out
       reconstruction, exact and per character); a Base-LCM (BaseLCM: pre-net, causal
       transformer, post-net) regresses the next concept of a document with the MSE. On
       held-out documents: next-concept cosine against repeating the last concept and
       against the mean concept, the rank of the true next sentence among 100, and a
       continuation decoded sentence by sentence until the end-of-text concept.
  10.4 Poincare embeddings (Nickel & Kiela, NeurIPS 2017): a hierarchy's closure pairs
       (--hierarchy TSV; by default the standard library's package tree) in the Poincare
       ball, the softmax loss over sampled negatives, Riemannian SGD with a burn-in, all
       batched; reconstruction mean rank and MAP against a Euclidean embedding at
       dimensions 2, 5 and 10; the 2-D disk drawn (poincare.png).
  10.5 Weight quantization, post-training and weight-only, by hand: int8 with one absmax
       scale per output channel; int4 in groups of --quant_group inputs, packed two values
       to a byte (QuantLinear, and the tied embedding and head as one quantized table),
       against torch.ao.quantization.quantize_dynamic as the library reference.
  10.6 The KV cache in int8 with a scale per head and position (Int8KVCache): bytes per
       token against float32 and bf16, and the val bpb computed through the cache.
  10.7 Compression: each projection matrix by its truncated SVD (LowRankLinear, at
       --svd_energy or --svd_rank), and a student (--student_layers x --student_embd)
       distilled from the model (--distill_alpha x the KL at --distill_temperature, plus the
       rest of the weight on the text's cross-entropy) against the same student
       trained from scratch for the same steps. One table for all (printed, summary.json
       `quant`): size on disk, val bpb and its change, tokens/s of cached greedy decoding
       on the CPU, and agreement (greedy tokens equal to the float model's).
  Part10 keeps the model, the tokenizers, the data path, the trainer and generation; it
  drops the alignment stages of parts 06-09 (the task suite and SFT, the reward model, PPO,
  GRPO), listed under Replaces. Every lesson trains its models in run folders of its own.

Run
  python part10_semantic.py                      # every lesson briefly, in order
  python part10_semantic.py --only boundless     # one lesson (boundless, patches, lcm, poincare, quant)
  python part10_semantic.py --only boundless --vocab_size 16384 --overwrite
  python part10_semantic.py --sample_only --out_dir out/part10/tokens-boundless --tokenizer boundless
  python part10_semantic.py --only poincare --hierarchy closure.tsv --dim 5

Milestone: each lesson's figures (the CPU run's are in the README), in
out/part10/summary.json under the lesson's key: `boundless` {"bpe", "boundless"}, each with
`bytes_per_token`, `renyi_efficiency`, `train_s`, `val_bpb`; `patches` with
`mean_patch_length`, `patch_length_histogram`, `bpe_bytes_per_token`, and `latent` and
`tokens`, each with `val_bpb` and `flops_per_byte`; `lcm` with `cosine`, `cosine_repeat_last`,
`cosine_mean`, `rank_of_next`, `reconstruction_exact`; `poincare` with `poincare` and
`euclidean`, each {DIM: {"mean_rank", "map"}}, and `wall_s`; `quant` with a row per method
(`float32`, `bfloat16`, `int8`, `int4`, `torch_int8`, `svd`, `student`, `scratch`), each with
`bytes`, `val_bpb`, `tokens_per_s`, `agreement`, and `kv_cache`. `--only` updates its
lesson's key and keeps the others.

Replaces: AllToAll, exchange, shard_experts, expert_shards, leave_expert_shards_out_of_ddp
Replaces: fill_expert_grads, a2a_bytes, clip_grad_norm, gather_experts, full_state
Replaces: shard_optimizer_state, rank0_losses, expert_parallel, expert_load, compare
Replaces: Critic, kl_rewards, update_beta, gae, whiten, ppo_losses, ppo_update, explained_variance
Replaces: plot_ppo, ppo, reward_source, critic, ppo_iters, ppo_epochs, ppo_minibatch, ppo_lr, clip
Replaces: value_clip, vf_coef, ent_coef, gamma, lam, kl_coef, target_kl, kl_horizon, ppo_eval_interval
Replaces: render_chat, parse_chat, user_turn, Task, word, parsed, task_of, held_out
Replaces: task_prompts, eval_prompts, demonstrations, read_records, to_messages
Replaces: make_examples, collate, length_grouped, sft_batches, answer, by_level
Replaces: gold_accuracy, pass_at_k, LoRALinear, lora_targets, add_lora, merge_lora
Replaces: trainable, plain_state, validate_sft, sft, grow_vocab, load_model, save_model
Replaces: finetune, print_accuracy, sft_conversations, supervised_finetuning, transcripts
Replaces: chat, corrupt, preference, gold_pairs, policy_samples, on_policy_pairs, split_hh
Replaces: to_pair, preference_pairs, encode_pairs, RewardModel, pad_rows, score_rows
Replaces: pair_margins, reward_loss, validate_reward, train_reward_model, auc, correlation
Replaces: calibration, padding_invariance, reward_stats, plot_rewards, shape_rewards
Replaces: accuracy_by, last_user, shared_prompts, reward_prompts, reward_pairs
Replaces: reward_checks, reward_modeling, fmt, print_checks, scored_samples, score
Replaces: make_actors, response_logprobs, rl_record, read_prompts, prompt_batches, rl_check
Replaces: rollout, masked_mean, judge, check_reward_model, continued_sft, reinforce
Replaces: answer_form, gold_answer, verifier_rewards, group_advantages, take_rows
Replaces: join_rollouts, group_rollout, k3_kl, grpo_loss, grpo_update, plot_grpo, grpo
Replaces: sft_data, sft_examples, sft_val_examples, sft_steps, sft_batch_size, sft_lr
Replaces: group_by_length, sft_eval_interval, sft_patience, sft_method, lora_rank
Replaces: lora_alpha, lora_lr, curriculum, eval_prompts, pass_k, max_answer_tokens, chat
Replaces: preference_data, gold_pairs, policy_prompts, policy_samples, rm_eval_prompts
Replaces: rm_steps, rm_batch_size, rm_lr, rm_eval_interval, margin, center_coef
Replaces: length_penalty, reward_clip, reward_model, score, response, prompt_data
Replaces: rollout_batch, missing_end_penalty, control, reward, format_reward, group_size
Replaces: grpo_iters, num_iterations, grpo_minibatch, grpo_lr, scale_rewards
Replaces: skip_flat_groups, max_draws, loss_type, clip_low, clip_high, beta
Replaces: grpo_eval_interval
"""

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import gc
import hashlib
import heapq
import inspect
import json
import math
import os
import random
import re
import io
import signal
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Literal, get_args, get_origin

try:  # POSIX: file locks for the run folder
    import fcntl
except ImportError:
    fcntl = None
import numpy as np
import regex
import requests
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# ----------------------------------------------------------------------------------------
# Config: every hyperparameter, with the defaults of the milestone run. One flag per field.
# ----------------------------------------------------------------------------------------
@dataclass
class Config:
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 autocast where supported, else float32
    seed: int = 1337  # random seed: the same seed gives the same CPU run
    out_dir: str = "out/part10"  # summary.json (a key per lesson); a run folder per model a lesson trains: tokens-bpe/, tokens-boundless/, entropy/, latent/
    # data
    data: str = SHAKESPEARE_URL  # a .txt file, a folder of .txt files, or an http(s) URL
    data_dir: str = "data"  # where downloads and token caches are kept
    tokenizer: Literal["byte", "bpe", "boundless"] = "byte"  # byte; bpe or 10.1 boundless (BoundlessBPE): trained on the training text, saved as out_dir/tokenizer.json
    tokenizer_file: str = ""  # use this saved BPE tokenizer (JSON) instead of training one
    # model
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # model width
    block_size: int = 128  # context length in tokens (bytes here)
    vocab_size: int = 4096  # BPE: vocabulary to train (256 bytes + merges + special tokens); byte: 256 + the chat tokens
    pos: Literal["learned", "sinusoidal", "rope"] = "rope"  # learned, sinusoidal: added to the input; rope: rotates q and k
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"  # normalization in each block and at the end
    mlp: Literal["gelu", "swiglu"] = "swiglu"  # gelu (4x, GELU) or swiglu (gated, same parameter count)
    n_kv_head: int = 0  # key/value heads, grouped-query attention (0 = n_head: plain multi-head)
    window: int = 0  # sliding-window attention: each query sees the last `window` positions (0 = all)
    sink: int = 0  # with --window: the first `sink` positions stay visible to every query
    bias: bool = False  # biases in Linear layers and LayerNorm
    n_experts: int = 0  # routed experts in each MoE layer (0 = dense MLPs everywhere)
    moe_top_k: int = 2  # experts per token: 1 = Switch, 2 = Mixtral-style (--top_k is sampling)
    expert_hidden: int = 0  # hidden width of one expert (0 = the dense SwiGLU width / moe_top_k)
    moe_every: int = 1  # MoE in every k-th block, dense MLPs in the others
    n_shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeekMoE)
    capacity_factor: float = 0.0  # an expert takes <= cf * tokens * moe_top_k / n_experts (0 = dropless)
    aux_loss_coef: float = 0.01  # weight of the Switch load-balancing loss
    z_loss_coef: float = 0.001  # weight of the router z-loss
    balance: Literal["aux", "aux_free"] = "aux"  # aux: the Switch loss; aux_free: per-expert routing offsets (DeepSeek-V3)
    balance_rate: float = 0.001  # --balance aux_free: step of the per-expert routing offsets
    grouped_mm: Literal["auto", "true", "false"] = "auto"  # experts in one F.grouped_mm call (auto: where torch has a kernel; false: a loop)
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    flash: bool = True  # attention through F.scaled_dot_product_attention (false: written out)
    # training
    batch_size: int = 8  # sequences per step
    max_steps: int = 600  # pretraining steps: a base model that writes text, not yet one that follows instructions
    learning_rate: float = 2e-3  # AdamW learning rate
    weight_decay: float = 0.1  # AdamW weight decay, on matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = off)
    eval_interval: int = 250  # evaluate (and checkpoint at a new best) every this many steps
    eval_iters: int = 20  # batches per split in each evaluation
    log_interval: int = 50  # print a progress line every this many steps
    overwrite: bool = False  # start over in an --out_dir that holds a run (its files are removed)
    max_seconds: float = 30.0  # stop after this many seconds of training steps (0 = run max_steps): each model a lesson compares trains this long
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    warmup_steps: int = 100  # linear learning-rate warmup
    min_lr: float = 2e-4  # the cosine schedule decays to this at max_steps
    ckpt_interval: int = 500  # save out_dir/ckpt.pt every this many steps (and at the end)
    resume: bool = False  # continue from out_dir/ckpt.pt exactly where it stopped
    tensorboard: bool = False  # also log to out_dir/tensorboard (needs the tensorboard package)
    compile: Literal["auto", "true", "false"] = "auto"  # torch.compile the model (auto: on for CUDA)
    dist_timeout: float = 300.0  # torchrun: seconds to wait for the other processes before stopping
    # sampling
    sample_only: bool = False  # load out_dir/ckpt.pt and sample, without training
    prompt: str = ""  # text to continue; empty = start from a newline
    num_samples: int = 2  # samples to print
    max_new_tokens: int = 300  # tokens per sample
    temperature: float = 1.0  # < 1 sharpens the distribution, > 1 flattens it; 0 = greedy
    top_k: int = 0  # sample among the k most likely tokens only (0 = off)
    top_p: float = 1.0  # sample from the smallest set with this much probability (1 = off)
    # Hugging Face interop
    export_hf: str = ""  # after training (or with --sample_only) also write a Hugging Face model folder here
    init_from: str = ""  # with --sample_only: sample from the weights and tokenizer of this Hugging Face folder
    # 10 beyond tokens
    only: Literal["all", "boundless", "patches", "lcm", "poincare", "quant"] = "all"  # run one lesson (all: every lesson briefly, in order)
    patch_threshold: float = 2.7  # 10.2 a patch starts at a byte whose entropy (nats, under the entropy model) exceeds this
    patch_rise: float = 0.0  # 10.2 ... or rises by more than this over the byte before (0 = off)
    entropy_layers: int = 2  # 10.2 blocks of the small byte-level model that gives next-byte entropies
    entropy_embd: int = 64  # 10.2 its width
    local_layers: int = 1  # 10.2 blocks of the byte-latent model's local encoder, and of its local decoder (width n_embd / 2)
    sentence_len: int = 64  # 10.3 the longest sentence, in bytes (a longer one is wrapped at spaces)
    concept_dim: int = 64  # 10.3 the size of a concept: a sentence as a unit vector
    concept_layers: int = 2  # 10.3 blocks of the sentence encoder, and of its decoder
    sentence_batch: int = 32  # 10.3 sentences per autoencoder step
    autoencoder_steps: int = 4000  # 10.3 the autoencoder's schedule: a concept space needs many more steps than a model of text
    autoencoder_seconds: float = 120.0  # 10.3 ... and its time limit (0 = all autoencoder_steps)
    lcm_context: int = 16  # 10.3 concepts the Base-LCM sees at once
    hierarchy: str = ""  # 10.4 a TSV of child<TAB>ancestor pairs (a transitive closure); empty = the standard library's package tree
    dim: int = 0  # 10.4 the one dimension to embed in (0 = 2, 5 and 10, compared)
    poincare_epochs: int = 100  # 10.4 passes over the closure pairs
    poincare_lr: float = 0.2  # 10.4 learning rate of (Riemannian) SGD after the burn-in
    poincare_batch: int = 64  # 10.4 closure pairs per step
    negatives: int = 10  # 10.4 sampled nodes each pair's softmax compares against
    burn_in: int = 10  # 10.4 first epochs at a tenth of --poincare_lr
    quant_group: int = 0  # 10.5 int4 group size along the input (0: 128, or the largest power of two below it that divides every input width)
    decode_tokens: int = 48  # 10.5 greedy tokens each held-out prompt decodes for tokens/s and agreement
    svd_energy: float = 0.9  # 10.7 each projection keeps the rank that holds this much of its squared singular values
    svd_rank: int = 0  # 10.7 ... or this rank everywhere (0 = by --svd_energy)
    student_layers: int = 2  # 10.7 blocks of the distilled student (and of the same model trained from scratch)
    student_embd: int = 64  # 10.7 its width
    distill_temperature: float = 2.0  # 10.7 both distributions are softened by this before the KL
    distill_alpha: float = 0.5  # 10.7 the student's loss: this x the KL to the teacher + (1 - this) x the cross-entropy on the text


# ----------------------------------------------------------------------------------------
# Utilities: errors, command line, device and dtype, autocast, seeding, timing
# ----------------------------------------------------------------------------------------
def die(msg):
    """A user's mistake: one clear line on stderr, exit status 2, no traceback. Under
    torchrun every process meets the same mistake, and rank 0 alone says it."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we want one line
        die(f"{self.prog}: {message}")


def _str2bool(s):
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _field_help(cls):
    """name -> the comment written after the field in the class source."""
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^=]+=.*?#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


def _finite(s):
    v = float(s)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def parse_args(argv=None, cls=Config):
    """Flags generated from the Config fields: `--n_layer 4` and `--n_layer=4` both work.
    A Literal field takes one of its values (--help lists them); a float must be finite."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
    parser = _Parser(description=doc[0] if doc else None,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        choices = get_args(f.type) if get_origin(f.type) is Literal else None
        kind = str if choices else _str2bool if f.type is bool else _finite if f.type is float else f.type
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, choices=choices,
                            nargs="?" if f.type is bool else None,
                            const=True if f.type is bool else None,
                            metavar=None if choices else f.type.__name__.upper(), help=helps.get(f.name, " "))
    return cls(**vars(parser.parse_args(argv)))


def pick_device(name):
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            die(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            die(f"--device {name}: no such GPU ({torch.cuda.device_count()} found)")
        return name
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            die("--device mps: MPS is not available on this machine")
        return name
    if name == "cpu":
        return name
    die(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name, device):
    """The compute dtype of autocast. 'auto': bf16 where the GPU supports it, else float32."""
    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        die(f"--dtype {name!r}: expected auto, float32, bfloat16 or float16")
    if name == "float16" and not device.startswith("cuda"):
        die("--dtype float16 needs a CUDA device (use bfloat16 or float32 here)")
    return DTYPES[name]


def autocast_ctx(device, dtype):
    """Mixed precision: matmuls run in `dtype`, weights and reductions stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def sync(device):
    """Wait for queued GPU work, so that a timer measures the work and not its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


class Timer:
    """`with Timer(device) as t: ...` then `t.seconds`; synchronizes the device at both ends."""

    def __init__(self, device="cpu"):
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(path) as tmp:` write tmp; on success it is renamed over path, so a
    reader never sees half a file and a crash mid-write leaves the old file whole; on failure
    it is removed. The process id in its name keeps torchrun's ranks apart."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def json_safe(obj):
    """obj with NaN and infinities as None: strict JSON, which every reader accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)


def writable_dir(path, flag):
    """Make the folder a flag names, or end with one line saying why it cannot be: checked
    before any data is read or any model built."""
    if os.path.exists(path) and not os.path.isdir(path):
        die(f"{flag} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        die(f"{flag} {path}: cannot write there ({e.strerror or e})")


GPU_BF16_PEAK = [  # dense bf16 tensor-core FLOP/s from the vendors' data sheets
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12), ("L4", 121e12),
    ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]


def gpu_peak_flops(device):
    """The detected GPU's bf16 peak, for MFU; None where unknown (and on CPU)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_BF16_PEAK if key in name), None)


def setup_distributed(timeout):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL with one GPU per
    process where CUDA is available, gloo on CPUs; a collective that waits `timeout` seconds
    for a process fails instead of hanging. Returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=timeout))
        return rank, world, f"cuda:{local_rank}"
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    return rank, world, "cpu"


def rank_world():
    """(this process's rank, the number of processes): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# ----------------------------------------------------------------------------------------
# 2.1 Tokenizer: text <-> bytes
# ----------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, nothing to train, every string representable.
    A character outside ASCII takes 2-4 tokens. 6.1 Special tokens (the chat template's)
    take the ids after the bytes; as with BPETokenizer, text becomes one only where
    encode() allows it."""

    name = "byte"

    def __init__(self, special_tokens=()):
        self.special = {tok: 256 + i for i, tok in enumerate(special_tokens)}
        self.vocab_size = 256 + len(self.special)
        self.text = {i: tok for tok, i in self.special.items()}  # special id -> its text

    def encode(self, text, allowed_special="none"):
        """Text -> ids; allowed_special as in BPETokenizer.encode."""
        ids = []
        for part, special in special_parts(text, self.special, allowed_special):
            ids.extend([self.special[part]] if special else part.encode("utf-8"))
        return ids

    def decode(self, ids):
        # A sampled id sequence may cut a multi-byte character: show U+FFFD, don't fail.
        out = bytearray()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i!r} is not in the vocabulary (0..{self.vocab_size - 1})")
            out += self.text[i].encode("utf-8") if i >= 256 else bytes([i])
        return out.decode("utf-8", errors="replace")


# 6.1 The chat template's special tokens: the roles, the end of a turn, and padding.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>")


def with_chat_tokens(tokenizer):
    """The tokenizer with every chat token: those a saved one lacks (part04-05 saved only
    <|endoftext|>) take the next ids, and the model's embedding grows to match (grow_vocab)."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special]
    if not missing:
        return tokenizer
    if isinstance(tokenizer, ByteTokenizer):
        return ByteTokenizer([*tokenizer.special, *missing])
    if isinstance(tokenizer, BoundlessBPETokenizer):
        return BoundlessBPETokenizer(tokenizer.ranked, [*tokenizer.special, *missing], tokenizer.pattern,
                                     tokenizer.super_ranks)
    return BPETokenizer(list(tokenizer.merges), [*tokenizer.special, *missing], tokenizer.pattern)


def special_parts(text, special, allowed_special="none"):
    """Cut text at the special tokens it may hold -> [(part, is_special)]. allowed_special
    says what the text of a special token becomes:
      "none" (the default): ordinary text, like any other characters, so text from a user
          or a file can never forge a special token (6.1: a user typing <|assistant|>);
      "all", or a set such as {"<|endoftext|>"}: its one id, for text the program writes
          itself (a separator between documents, a chat template);
      "none_raise": a ValueError, for text that must not hold one.
    One parameter for tiktoken's two (allowed_special, disallowed_special), as in minbpe:
    a call wants one of these behaviours, never a mix."""
    if allowed_special == "none_raise":
        found = [t for t in special if t in text]
        if found:
            raise ValueError(f"the text holds special tokens {found}: allowed_special='all' "
                             "makes them their ids, 'none' ordinary text")
    if allowed_special in ("none", "none_raise"):
        allowed = set()
    elif allowed_special == "all":
        allowed = set(special)
    else:
        allowed = set(allowed_special)
        if not allowed <= special.keys():
            raise ValueError(f"allowed_special: {sorted(allowed - special.keys())} are not special tokens")
    if not allowed:
        return [(text, False)]
    # cut at the allowed special tokens, longest first: one may begin another
    alternatives = "|".join(map(regex.escape, sorted(allowed, key=len, reverse=True)))
    return [(part, part in allowed) for part in regex.split(f"({alternatives})", text) if part]


# ----------------------------------------------------------------------------------------
# 4.1 Tokenizer: byte-level BPE, trained on the text
# ----------------------------------------------------------------------------------------
GPT4_SPLIT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
              r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


class BPETokenizer:
    """4.1 Byte-level BPE (GPT-2/GPT-4 style). Text is first cut into chunks by a regex
    (words, numbers, punctuation, spaces: merges never cross a chunk boundary), each chunk
    is UTF-8 bytes, and training repeatedly merges the most frequent adjacent pair of ids
    into a new id. Special tokens such as <|endoftext|> get the ids after the merges; no
    merge makes one, and text becomes one only where encode() is told to allow it."""

    LONG_CHUNK = 64  # bytes: a longer chunk is merged by _merge_long, and not cached
    CACHE_SIZE = 30_000  # chunks kept by encode (~7 MB; Tiny Shakespeare has 15k distinct)

    def __init__(self, merges=(), special_tokens=(), pattern=GPT4_SPLIT):
        merges = [tuple(pair) for pair in merges]
        self._check(merges, special_tokens)
        identity = json.dumps([pattern, list(special_tokens), [list(p) for p in merges]])
        self.name = f"bpe{256 + len(merges) + len(special_tokens)}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}"
        self.pattern = pattern
        self.split = regex.compile(pattern)
        self.merges = {pair: 256 + i for i, pair in enumerate(merges)}  # pair -> new id
        self.vocab = {i: bytes([i]) for i in range(256)}  # id -> the bytes it stands for
        for (a, b), new in self.merges.items():
            self.vocab[new] = self.vocab[a] + self.vocab[b]
        self.special = {tok: 256 + len(self.merges) + i for i, tok in enumerate(special_tokens)}
        self.vocab.update({i: tok.encode("utf-8") for tok, i in self.special.items()})  # their text
        self._cache = {}  # chunk -> ids: real text repeats its chunks a lot

    @staticmethod
    def _check(merges, special_tokens):
        """ValueError unless the ids make one vocabulary: merge r makes id 256 + r out of two
        earlier ids (bytes, or merges 0..r-1) and no merge repeats, so no id means two
        things; the special tokens, distinct non-empty strings, take the ids after them."""
        for rank, pair in enumerate(merges):
            if len(pair) != 2 or not all(type(i) is int and 0 <= i < 256 + rank for i in pair):
                raise ValueError(f"merge {rank} {list(pair)} is not two ids below {256 + rank} "
                                 "(the bytes and the merges before it)")
        repeated = [pair for pair, n in collections.Counter(merges).items() if n > 1]
        if repeated:
            raise ValueError(f"merge {list(repeated[0])} appears twice")
        if (isinstance(special_tokens, str) or not all(isinstance(t, str) and t for t in special_tokens)
                or len(set(special_tokens)) < len(special_tokens)):
            raise ValueError(f"special tokens must be distinct non-empty strings, got {special_tokens!r}")

    @property
    def vocab_size(self):
        return 256 + len(self.merges) + len(self.special)

    @classmethod
    def train(cls, text, vocab_size, special_tokens=("<|endoftext|>",), pattern=GPT4_SPLIT):
        """Learn a vocabulary of vocab_size ids from text: the 256 byte values, then
        vocab_size - 256 - len(special_tokens) merges, then the special tokens. A text with
        fewer distinct pairs gives fewer merges and a smaller vocabulary (a note says so);
        a vocab_size below 256 + len(special_tokens) is a ValueError.

        Pair counts are kept up to date incrementally: a merge only touches the unique
        chunks that contain the merged pair, never the whole corpus. A heap with lazy
        deletion finds the most frequent pair (ties: the smallest pair, for determinism).
        10.1 merge_counts: how often each merge's pair occurred when it was chosen."""
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + "
                             f"{len(special_tokens)} special tokens")
        counts = collections.Counter(regex.findall(pattern, text))
        words = [list(w.encode("utf-8")) for w in counts]  # unique chunks as id lists
        freq = list(counts.values())
        pair_count = collections.Counter()
        where = collections.defaultdict(set)  # pair -> indices of the words that hold it
        for i, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pair_count[pair] += freq[i]
                where[pair].add(i)
        heap = [(-c, pair) for pair, c in pair_count.items()]
        heapq.heapify(heap)
        merges, merge_counts = [], []
        while len(merges) < n_merges and heap:
            neg, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg or neg == 0:
                continue  # a stale entry: the count changed after it was pushed
            new_id = 256 + len(merges)
            merges.append(pair)
            merge_counts.append(-neg)
            changed = set()
            for i in where.pop(pair):
                w, f = words[i], freq[i]
                for p in zip(w, w[1:]):  # take the word's old pairs out ...
                    pair_count[p] -= f
                    changed.add(p)
                words[i] = w = _merge(w, pair, new_id)
                for p in zip(w, w[1:]):  # ... and put its new pairs in
                    pair_count[p] += f
                    where[p].add(i)
                    changed.add(p)
            del pair_count[pair]
            for p in changed:
                if pair_count.get(p, 0) > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
        if len(merges) < n_merges:
            print(f"note: the text has pairs for {len(merges)} merges only: a vocabulary of "
                  f"{256 + len(merges) + len(special_tokens)}, not {vocab_size}")
        tokenizer = cls(merges, special_tokens, pattern)
        tokenizer.merge_counts = merge_counts
        return tokenizer

    def _encode_chunk(self, chunk):
        ids = self._cache.get(chunk)
        if ids is None:
            ids = list(chunk.encode("utf-8"))
            if len(ids) > self.LONG_CHUNK:  # rare (a long word, base64): the heap, no caching
                return self._merge_long(ids)
            while len(ids) > 1:  # merge the pair learned earliest, as training did
                pair = min(zip(ids, ids[1:]), key=lambda p: self.merges.get(p, math.inf))
                if pair not in self.merges:
                    break
                ids = _merge(ids, pair, self.merges[pair])
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()  # bounded memory; the frequent chunks come back at once
            self._cache[chunk] = ids
        return ids

    def _merge_long(self, ids):
        """The merges of the loop above in O(n log n): the loop rescans the whole chunk after
        every merge, O(n^2), and one pre-token of 200 KB (letters without a space) took tens
        of seconds. Here the parts form a linked list (nxt, prv) and a heap holds (new id,
        position) of each neighbour pair that has a merge: the smallest new id is the pair
        learned earliest, the smallest position the leftmost. A pair made by a merge holds
        its new id, so it was learned later and waits its turn: the loop's order exactly."""
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))  # n: the end, -1: the start
        heap = [(self.merges[p], i) for i, p in enumerate(zip(ids, ids[1:])) if p in self.merges]
        heapq.heapify(heap)
        while heap:
            new, i = heapq.heappop(heap)
            j = nxt[i]
            if j == n or self.merges.get((ids[i], ids[j])) != new:
                continue  # stale: i or its neighbour took part in a merge since the push
            ids[i], ids[j] = new, None  # j joins i and leaves the list
            nxt[i] = k = nxt[j]
            if k < n:
                prv[k] = i
            h = prv[i]  # the merged part makes two new pairs, with h on its left and k on its right
            if h >= 0 and (ids[h], new) in self.merges:
                heapq.heappush(heap, (self.merges[ids[h], new], h))
            if k < n and (new, ids[k]) in self.merges:
                heapq.heappush(heap, (self.merges[new, ids[k]], i))
        return [t for t in ids if t is not None]

    def encode(self, text, allowed_special="none"):
        """Text -> ids. allowed_special: what the text of a special token becomes (see
        special_parts): by default ordinary text, so no input can forge one."""
        ids = []
        for part, special in special_parts(text, self.special, allowed_special):
            if special:
                ids.append(self.special[part])
                continue
            for chunk in self.split.findall(part):
                ids.extend(self._encode_chunk(chunk))
        return ids

    def decode(self, ids):
        """Ids -> text. An id outside the vocabulary is a ValueError, not a silent gap; bytes
        that are not UTF-8 (a sample may end inside a character) show as U+FFFD."""
        try:
            data = b"".join(self.vocab[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"id {e.args[0]!r} is not in the vocabulary (0..{self.vocab_size - 1})") from None
        return data.decode("utf-8", errors="replace")

    def save(self, path):
        """Readable JSON: the merges in rank order and the special tokens."""
        obj = {"type": "bpe", "pattern": self.pattern, "special_tokens": list(self.special),
               "merges": [list(p) for p in self.merges]}
        with atomic_path(path) as tmp, open(tmp, "w") as f:  # torchrun: every rank may write it
            json.dump(obj, f)

    @classmethod
    def load(cls, path):
        """A tokenizer saved by save(). ValueError naming the file when it is not one (a
        library raises; the command line turns it into one line and exit 2)."""
        try:
            with open(path) as f:
                obj = json.load(f)
            if obj["type"] != "bpe":  # 10.1 a BoundlessBPE file: its supermerges would be lost
                raise ValueError(f"a {obj['type']!r} tokenizer, not 'bpe' (pass the matching --tokenizer)")
            return cls(obj["merges"], obj["special_tokens"], obj["pattern"])
        except (ValueError, KeyError, TypeError, regex.error) as e:
            raise ValueError(f"{path} is not a BPE tokenizer file ({type(e).__name__}: {e})") from e


def _merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in ids by new_id, left to right."""
    out, i, a, b = [], 0, pair[0], pair[1]
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# ----------------------------------------------------------------------------------------
# 10.1 BoundlessBPE: merges across pretoken boundaries, into superwords
# ----------------------------------------------------------------------------------------
WORD = regex.compile(r" ?\p{L}+")  # the pretokens a supermerge may join: letters, after at most one space


class BoundlessBPETokenizer(BPETokenizer):
    """10.1 BoundlessBPE (Schmidt et al., COLM 2025). BPE never merges across a pretoken
    boundary, so a large vocabulary fills with ever rarer whole words while " of" " the"
    stays two tokens forever. A *supermerge* joins two adjacent units of word pretokens
    (WORD) where each is already one token: " of" + " the" -> the superword " of the", which
    can join " king" later. Training counts supermerges as BPE counts pairs and takes, at
    every step, the more frequent of the next regular merge and the best supermerge.
    Encoding: each pretoken as in BPE, then the supermerges, in the order learned, over each
    run of word pretokens that came out as one token each. `supermerges` lists the ranks of
    `merges` that are supermerges (pair -> id in self.supermerges, not in self.merges)."""

    def __init__(self, merges=(), special_tokens=(), pattern=GPT4_SPLIT, supermerges=()):
        super().__init__(merges, special_tokens, pattern)
        self.ranked = list(self.merges)  # every merge, in rank order (merge r makes id 256 + r)
        self.super_ranks = sorted(set(supermerges))
        if not all(type(r) is int and 0 <= r < len(self.ranked) for r in self.super_ranks):
            raise ValueError(f"supermerge ranks must be ranks of the {len(self.ranked)} merges")
        self.supermerges = {self.ranked[r]: 256 + r for r in self.super_ranks}
        for pair in self.supermerges:  # a pretoken's bytes never meet a supermerge
            del self.merges[pair]
        identity = json.dumps([self.name, self.super_ranks])
        self.name = f"boundless{self.vocab_size}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}"

    @property
    def vocab_size(self):
        return 256 + len(self.merges) + len(self.supermerges) + len(self.special)

    @classmethod
    def train(cls, text, vocab_size, special_tokens=("<|endoftext|>",), pattern=GPT4_SPLIT):
        """Regular BPE first (its merges, each with the count it had when chosen: supermerges
        never change those counts, since a pretoken that is one token has no pair left inside),
        then the two kinds in one order by count. The supermerge counts come from the runs of
        word pretokens, counted once per distinct run as BPE counts distinct chunks; a unit
        of a run is the pretoken's text until a regular merge makes it one token, then that
        token's id, and only pairs of two ids count."""
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # supermerges may fill
            bpe = BPETokenizer.train(text, vocab_size, special_tokens, pattern)  # what BPE's pairs cannot
        regular, counts = list(bpe.merges), bpe.merge_counts
        runs, run = collections.Counter(), []
        for chunk in [*regex.findall(pattern, text), ""]:  # "" ends the last run
            if WORD.fullmatch(chunk):
                run.append(chunk)
                continue
            if len(run) > 1:
                runs[tuple(run)] += 1
            run = []
        words, freq = [list(r) for r in runs], list(runs.values())
        holds = collections.defaultdict(set)  # word pretoken -> the runs it occurs in
        for i, r in enumerate(words):
            for w in r:
                holds[w].add(i)
        becomes_one = collections.defaultdict(list)  # regular rank -> the pretokens it makes one token
        for w in holds:
            ids = bpe._encode_chunk(w)
            if len(ids) == 1:
                becomes_one[ids[0] - 256].append(w)  # a single byte: a rank below 0, at the start
        pair_count, where, heap = collections.Counter(), collections.defaultdict(set), []

        def units_pairs(r):
            return [p for p in zip(r, r[1:]) if type(p[0]) is int and type(p[1]) is int]

        def replace(i, new_units):  # run i's units change: move its pair counts
            changed = units_pairs(words[i])
            for p in changed:
                pair_count[p] -= freq[i]
            words[i] = new_units
            for p in units_pairs(new_units):
                pair_count[p] += freq[i]
                where[p].add(i)
                changed.append(p)
            for p in set(changed):
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))

        def now_one_token(w, token):
            for i in holds[w]:
                replace(i, [token if u == w else u for u in words[i]])

        for rank in sorted(r for r in becomes_one if r < 0):
            for w in becomes_one.pop(rank):
                now_one_token(w, rank + 256)
        merges, supermerges, new_id = [], [], {i: i for i in range(256)}  # BPE's ids -> ours
        k, n_merges = 0, vocab_size - 256 - len(special_tokens)
        while len(merges) < n_merges:
            while heap and pair_count.get(heap[0][1], 0) != -heap[0][0]:
                heapq.heappop(heap)  # stale: the count changed after it was pushed
            best = -heap[0][0] if heap else 0
            if k < len(regular) and counts[k] >= best:  # the next regular merge (it wins ties)
                a, b = regular[k]
                new_id[256 + k] = 256 + len(merges)
                merges.append((new_id[a], new_id[b]))
                for w in becomes_one.pop(k, ()):
                    now_one_token(w, new_id[256 + k])
                k += 1
            elif best > 0:  # a supermerge
                pair, token = heapq.heappop(heap)[1], 256 + len(merges)
                supermerges.append(len(merges))
                merges.append(pair)
                for i in where.pop(pair):
                    replace(i, _merge(words[i], pair, token))
                del pair_count[pair]
            else:
                break
        if len(merges) < n_merges:
            print(f"note: the text has pairs for {len(merges)} merges only: a vocabulary of "
                  f"{256 + len(merges) + len(special_tokens)}, not {vocab_size}")
        return cls(merges, special_tokens, pattern, supermerges)

    def _join_words(self, units):
        """A run of single-token word pretokens -> its superwords, earliest supermerge first."""
        while len(units) > 1:
            pair = min(zip(units, units[1:]), key=lambda p: self.supermerges.get(p, math.inf))
            if pair not in self.supermerges:
                break
            units = _merge(units, pair, self.supermerges[pair])
        return units

    def encode(self, text, allowed_special="none"):
        ids = []
        for part, special in special_parts(text, self.special, allowed_special):
            if special:
                ids.append(self.special[part])
                continue
            run = []  # the word pretokens since the last other one, each one token
            for chunk in self.split.findall(part):
                chunk_ids = self._encode_chunk(chunk)
                if len(chunk_ids) == 1 and WORD.fullmatch(chunk):
                    run.append(chunk_ids[0])
                    continue
                ids.extend(self._join_words(run) + chunk_ids)
                run = []
            ids.extend(self._join_words(run))
        return ids

    def save(self, path):
        obj = {"type": "boundless", "pattern": self.pattern, "special_tokens": list(self.special),
               "merges": [list(p) for p in self.ranked], "supermerges": self.super_ranks}
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(obj, f)

    @classmethod
    def load(cls, path):
        """A tokenizer saved by save(); a file of another kind (BPE's) is a ValueError."""
        try:
            with open(path) as f:
                obj = json.load(f)
            if obj["type"] != "boundless":
                raise ValueError(f"a {obj['type']!r} tokenizer, not 'boundless' (pass the matching --tokenizer)")
            return cls(obj["merges"], obj["special_tokens"], obj["pattern"], obj["supermerges"])
        except (ValueError, KeyError, TypeError, regex.error) as e:
            raise ValueError(f"{path} is not a BoundlessBPE tokenizer file ({type(e).__name__}: {e})") from e


def renyi_efficiency(ids, vocab_size, alpha=2.5):
    """10.1 How evenly a tokenization uses its vocabulary (Zouhar et al., ACL 2023): the Renyi
    entropy of the tokens' unigram distribution, H_a = log(sum_i p_i^a) / (1 - a), over the
    most it can be, log |V|. With a > 1 the frequent tokens weigh more, so a vocabulary
    whose mass sits on a few common words scores low; a -> 1 gives Shannon's -sum p log p."""
    counts = np.bincount(np.asarray(ids, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    h = -(p * np.log(p)).sum() if alpha == 1 else np.log((p ** alpha).sum()) / (1 - alpha)
    return float(h / math.log(vocab_size))


def build_tokenizer(cfg, text=None):
    """The byte tokenizer, or BPE (10.1 or BoundlessBPE): read from --tokenizer_file, from the
    run's out_dir when resuming or sampling, else trained on the training split (not val) and
    saved there. A file that cannot be read or is not a tokenizer ends the run (exit 2)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer(CHAT_TOKENS)
    kind = BoundlessBPETokenizer if cfg.tokenizer == "boundless" else BPETokenizer
    saved = os.path.join(cfg.out_dir, "tokenizer.json")
    if cfg.tokenizer_file or cfg.resume or cfg.sample_only:
        path = cfg.tokenizer_file or saved
        if not os.path.exists(path):
            die(f"no tokenizer at {path}: train first, or pass --tokenizer_file")
        try:
            return with_chat_tokens(kind.load(path))
        except (OSError, ValueError) as e:
            die(e)
    with Timer() as t:
        tokenizer = kind.train(text[: int(0.9 * len(text))], cfg.vocab_size, ("<|endoftext|>", *CHAT_TOKENS))
    tokenizer.save(saved)
    print(f"{kind.__name__.removesuffix('Tokenizer')}: {tokenizer.vocab_size} tokens trained in {t.seconds:.1f} s; saved {saved}")
    return tokenizer


# ----------------------------------------------------------------------------------------
# 2.2 Data: a file, a folder or a URL -> cached token ids -> random training windows
# ----------------------------------------------------------------------------------------
def download(url, dest):
    """Stream `url` to `dest` through a temp file, so an interrupted download leaves nothing."""
    with atomic_path(dest) as tmp, requests.get(url, stream=True, timeout=(10, 60)) as r:
        r.raise_for_status()
        with open(tmp, "wb") as f:
            for chunk in r.iter_content(chunk_size=1 << 20):
                f.write(chunk)


def offline_corpus():
    """Text every CPython ships: the help topics of pydoc (about 0.5 MB of English)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(cfg):
    """Resolve --data to (text, name of what was used). Bad input ends the run (exit 2)."""
    spec = cfg.data
    if spec.startswith(("http://", "https://")):
        # one file per URL: two URLs ending in the same name must not share a cache
        url_hash = hashlib.sha1(spec.encode()).hexdigest()[:10]
        dest = os.path.join(cfg.data_dir, f"{url_hash}-{os.path.basename(spec.split('?')[0]) or 'download.txt'}")
        if spec == SHAKESPEARE_URL:
            dest = os.path.join(cfg.data_dir, "tinyshakespeare.txt")
        if not os.path.exists(dest):
            print(f"downloading {spec} -> {dest}")
            try:
                download(spec, dest)
            except (requests.RequestException, OSError) as e:
                if spec != SHAKESPEARE_URL:
                    die(f"--data {spec}: download failed ({type(e).__name__})")
                print(f"download failed ({type(e).__name__}); using the offline corpus "
                      "pydoc_data.topics instead")
                return offline_corpus(), "pydoc_data.topics"
        spec = dest
    if os.path.isdir(spec):
        files = sorted(f for f in os.listdir(spec) if f.endswith(".txt"))
        if not files:
            die(f"--data {spec}: the folder holds no .txt file")
        parts = []
        for f in files:
            with open(os.path.join(spec, f), "rb") as fh:
                parts.append(decode_text(fh.read(), os.path.join(spec, f)))
        return "\n\n".join(parts), spec
    if not os.path.exists(spec):
        die(f"--data {spec}: no such file or folder")
    if not os.path.isfile(spec):
        die(f"--data {spec}: not a regular file or a folder")
    with open(spec, "rb") as f:
        return decode_text(f.read(), spec), spec


def decode_text(raw, name):
    """UTF-8 bytes -> text. What is not UTF-8 becomes U+FFFD, and the run says how much."""
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    if bad:
        print(f"note: --data {name}: {bad:,} byte sequences of {len(raw):,} bytes are not UTF-8 "
              "text (read as U+FFFD)")
    return text


def load_tokens(cfg, tokenizer, source=None):
    """Token ids of --data as a numpy memmap, encoded once and cached in data_dir.
    `source`: (text, name) when the caller already read --data."""
    text, name = source or load_text(cfg)
    key = hashlib.sha1(f"{tokenizer.name}:{len(text)}:".encode() + text.encode()).hexdigest()[:12]
    dtype = np.uint8 if tokenizer.vocab_size <= 256 else np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    path = os.path.join(cfg.data_dir, f"tokens-{key}.{tokenizer.name}.npy")
    try:  # the .npy header records dtype and length: a cut or foreign file fails here, then is rebuilt
        data = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        ids = np.array(tokenizer.encode(text), dtype=dtype)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # torchrun: every rank may write it
            np.save(f, ids)
        data = np.load(path, mmap_mode="r")
    if len(data) < 10 * (cfg.block_size + 1):  # 10% of it must still hold one window
        die(f"--data {name}: {len(data)} tokens is too short for --block_size {cfg.block_size} "
            f"(at least {10 * (cfg.block_size + 1)} needed for a 90/10 split)")
    return data, name


def split_data(data):
    """The first 90% trains, the last 10% validates."""
    n = int(0.9 * len(data))
    return data[:n], data[n:]


def get_batch(data, batch_size, block_size, device, generator=None, shard=(0, 1)):
    """batch_size random windows: x = data[i : i+T], y = data[i+1 : i+T+1] (the next tokens).
    shard=(rank, world): every rank draws the same windows and keeps its 1/world of them,
    so the ranks together see exactly the batch a single process would."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    rank, world = shard
    ix = ix[rank * batch_size // world:(rank + 1) * batch_size // world]
    offsets = ix.numpy()[:, None] + np.arange(block_size + 1)  # (B, T+1) positions
    window = torch.from_numpy(data[offsets].astype(np.int64))  # (B, T+1), one gather
    x, y = window[:, :-1], window[:, 1:]  # (B, T) each, y shifted by one
    if device.startswith("cuda"):  # page-locked memory lets the copy overlap compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------
def padded_vocab(vocab_size):
    """Round the vocabulary up to a multiple of 64: the LM-head matmul then tiles evenly on
    GPUs (nanoGPT's 50257 -> 50304 is worth ~25%). The extra ids are never targets."""
    return 64 * math.ceil(vocab_size / 64)


# 1.1 Positional embeddings --------------------------------------------------------------
def sinusoidal_table(T, C):
    """(T, C) table: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(same angle).
    Each pair of columns is a rotation at its own frequency, so
    PE[p] . PE[p+d] = sum_i cos(d * w_i): it depends on the distance d alone."""
    pos = torch.arange(T, dtype=torch.float32)[:, None]  # (T, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, C, 2, dtype=torch.float32) / C)  # (C/2,)
    table = torch.zeros(T, C)
    table[:, 0::2] = torch.sin(pos * freq)  # (T, C/2)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class SinusoidalPositions(nn.Module):
    def __init__(self, block_size, n_embd):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(block_size, n_embd), persistent=False)

    def forward(self, pos):  # (T,) -> (T, C)
        return self.table[pos]


# 3.2 RoPE ---------------------------------------------------------------------------------
def rope_angles(positions, head_dim, base=10000.0):
    """cos and sin of the angles (T, head_dim/2): position p turns the feature pair
    (i, i + head_dim/2) by p * base^(-2i/head_dim), fast for small i, slow for large i."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, 1) * (1, hd/2) -> (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each feature pair of x (B, H, T, hd) by its position's angle. A query at p and
    a key at s then meet at angle (p - s): q.k depends on the distance alone, and no
    position vector is ever added to the residual stream."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, hd/2) each: the two halves of each pair
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


# 1.3 Scaled dot-product attention -------------------------------------------------------
def attention(q, k, v, mask, dropout=None):
    """softmax(q k^T / sqrt(d)) v over the keys `mask` allows. q, k, v: (..., T, d)."""
    att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (..., T, d) @ (..., d, T) -> (..., T, T)
    att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)  # softmax in float32 under autocast
    if dropout is not None:
        att = dropout(att)
    return att @ v, att  # (..., T, T) @ (..., T, d) -> (..., T, d)


# 3.5 Sliding window and attention sink ------------------------------------------------------
def attention_mask(q_pos, k_pos, window=0, sink=0):
    """(Tq, Tk) bool from absolute positions: query i sees key j when j <= i and either
    j > i - window (the last `window` positions, itself included) or j < sink (the first
    `sink` positions, which soak up attention a softmax must put somewhere).
    window = 0: plain causal attention. One function serves training and the KV cache."""
    q, k = q_pos[:, None], k_pos[None, :]  # (Tq, 1), (1, Tk)
    allowed = k <= q
    if window > 0:
        allowed = allowed & ((k > q - window) | (k < sink))
    return allowed


# 1.4 Multi-head attention ---------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """n_head heads side by side: one matmul makes q, k, v for all heads, a reshape splits
    them, each head attends on its own slice, and the output projection mixes the heads.
    Grouped-query attention: with n_kv_head < n_head, each key/value head serves
    n_head / n_kv_head query heads, and the KV cache shrinks by that factor."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.flash = cfg.n_head, cfg.flash
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.window, self.sink = cfg.window, cfg.sink
        self.kv_dim = self.n_kv_head * (cfg.n_embd // cfg.n_head)
        self.c_attn = nn.Linear(cfg.n_embd, cfg.n_embd + 2 * self.kv_dim, bias=cfg.bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, pos=None, rope=None, cache=None, layer=0, real=None):
        B, T, C = x.shape
        hd = C // self.n_head
        if pos is None:
            pos = torch.arange(T, device=x.device)
        q, k, v = self.c_attn(x).split([C, self.kv_dim, self.kv_dim], dim=2)  # (B, T, C + 2*kv_dim) -> q, k, v
        # (B, T, C) -> (B, T, n_head, head_dim) -> (B, n_head, T, head_dim); k, v: n_kv_head heads
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_pos = pos
        if cache is not None:  # attend to the cached past as well: (B, Hkv, T, hd) -> (B, Hkv, L, hd)
            k, v, k_pos = cache.update(layer, k, v, pos)
        if self.n_kv_head != self.n_head:  # (B, n_kv_head, L, hd) -> (B, n_head, L, hd)
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        mask = None
        if real is not None:  # 6.3 left-padded rows, real (B, L): the causal mask minus padding keys
            mask = attention_mask(pos, k_pos, self.window, self.sink) & real[:, None, None, k_pos]  # (B, 1, T, L)
            mask = mask | ~real[:, None, -T:, None]  # a padding query sees all: no empty softmax row
        if self.flash:  # the same math in one fused kernel
            p = self.attn_dropout.p if self.training else 0.0
            if mask is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            elif self.window == 0 and k.size(2) == T:  # no cached past: plain causal
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            elif self.window == 0 and T == 1:  # one new token sees every cached key
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:
                mask = attention_mask(pos, k_pos, self.window, self.sink)  # (T, L)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            if mask is None:
                mask = attention_mask(pos, k_pos, self.window, self.sink)
            y, _ = attention(q, k, v, mask, self.attn_dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_head, T, hd) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# 3.4 / 3.6 The KV cache -----------------------------------------------------------------------
class KVCache:
    """The keys and values of every layer for the positions seen so far, so that each new
    token computes only its own q, k, v. Full attention: buffers sized for max_len positions,
    written in place (no copy of the past per token). With window > 0 it is a rolling
    buffer: after each step a layer keeps just the first `sink` positions and the last
    `window` - 1 (the next token makes `window`), so memory stays bounded however long the
    stream runs. Keys are stored already rotated by RoPE at their absolute position, so
    nothing is recomputed when older entries leave."""

    def __init__(self, n_layer, max_len, window=0, sink=0):
        self.max_len, self.window, self.sink = max_len, window, sink
        self.k = [None] * n_layer  # per layer: (B, n_kv_head, L, head_dim)
        self.v = [None] * n_layer
        self.pos = [None] * n_layer  # rolling buffer, per layer: (L,) absolute positions
        self.seen = 0  # tokens processed so far = the position of the next token

    def update(self, layer, k, v, pos):
        """Store the new entries; return every key, value and position to attend to."""
        if self.window == 0:
            if self.k[layer] is None:  # (B, Hkv, max_len, hd), filled from the left
                B, H, _, D = k.shape
                self.k[layer], self.v[layer] = k.new_empty(B, H, self.max_len, D), v.new_empty(B, H, self.max_len, D)
            end = self.seen + k.size(2)
            self.k[layer][:, :, self.seen:end] = k
            self.v[layer][:, :, self.seen:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end], torch.arange(end, device=k.device)
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)  # (B, Hkv, L, hd) + (B, Hkv, T, hd)
            v = torch.cat([self.v[layer], v], dim=2)
            pos = torch.cat([self.pos[layer], pos])
        keep = (pos < self.sink) | (pos > pos[-1] + 1 - self.window)  # what the next query can see
        self.k[layer], self.v[layer], self.pos[layer] = k[:, :, keep], v[:, :, keep], pos[keep]
        return k, v, pos


# 1.5 MLP, GELU, LayerNorm ---------------------------------------------------------------
def gelu(x):
    """GELU(x) = x * Phi(x), Phi the standard normal CDF: a smooth ReLU."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class MLP(nn.Module):
    """Position-wise: widen 4x, GELU, project back."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.dropout(self.c_proj(gelu(self.c_fc(x))))


def swiglu_hidden(n_embd):
    """8C/3: three C x h matrices then hold the 8C^2 parameters of the 4x GELU MLP.
    Rounded to a multiple of 64, which matmul kernels like."""
    return max(64, 64 * round(8 * n_embd / 3 / 64))


class SwiGLU(nn.Module):
    """3.3 silu(x W_gate) * (x W_up), then W_down: the MLP of PaLM, Llama and Mistral. The
    gate decides, feature by feature, how much of the up-projection passes."""

    def __init__(self, cfg, hidden=None):
        super().__init__()
        hidden = hidden or swiglu_hidden(cfg.n_embd)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)  # gate and up in one matmul
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, 2h) -> 2 x (B, T, h) -> (B, T, C)
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


class LayerNorm(nn.Module):
    """Normalize each vector to zero mean and unit variance over its C features, then
    scale and shift with learned weight and bias."""

    def __init__(self, n_embd, bias=True, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None

    def forward(self, x):  # (..., C) -> (..., C)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y


# 3.1 RMSNorm ------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Divide each vector by its root mean square, then scale by a learned gain: no mean to
    subtract, no bias. Cheaper than LayerNorm and as good in practice (Zhang & Sennrich 2019)."""

    def __init__(self, n_embd, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x):  # (..., C) -> (..., C), computed in float32
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg):
    return RMSNorm(cfg.n_embd) if cfg.norm == "rmsnorm" else LayerNorm(cfg.n_embd, bias=cfg.bias)


# 5.1 / 5.2 Mixture of Experts ---------------------------------------------------------------
def expert_hidden(cfg):
    """One expert's hidden width. Default: the dense SwiGLU width split over the top_k
    experts a token visits, so a token's MLP FLOPs equal the dense model's."""
    return cfg.expert_hidden or max(16, swiglu_hidden(cfg.n_embd) // cfg.moe_top_k)


class MoE(nn.Module):
    """A router sends each token to top_k of n_experts SwiGLU experts and mixes their outputs
    with its gate weights: many more parameters, the same FLOPs per token.

    Dispatch without a loop over tokens: the N*top_k (token, expert) assignments are sorted
    by expert, each expert runs once on its contiguous slice, and index_add_ scatters the
    gated outputs back to their tokens. With capacity_factor > 0 an expert takes at most
    capacity_factor * N * top_k / n_experts assignments; the others are dropped, and a token
    whose every assignment was dropped passes through the residual unchanged."""

    def __init__(self, cfg):
        super().__init__()
        E, C, h = cfg.n_experts, cfg.n_embd, expert_hidden(cfg)
        self.n_experts, self.top_k, self.capacity_factor = E, cfg.moe_top_k, cfg.capacity_factor
        self.grouped_mm = cfg.grouped_mm
        self.router = nn.Linear(C, E, bias=False)  # kept and run in float32
        self.w_in = nn.Parameter(torch.randn(E, C, 2 * h) * 0.02)  # per expert: gate and up
        self.w_out = nn.Parameter(torch.randn(E, h, C) * 0.02 / math.sqrt(2 * cfg.n_layer))
        self.register_buffer("expert_offset", torch.zeros(E))  # --balance aux_free: selection only
        self.shared = SwiGLU(cfg, h * cfg.n_shared_experts) if cfg.n_shared_experts else None
        self.aux_loss = self.z_loss = torch.zeros(())
        self.counts = torch.zeros(E)  # assignments per expert in the last forward
        self.dropped = 0  # assignments dropped for capacity in the last forward

    def route(self, flat):
        """(N, C) -> chosen experts (N, k) and their gate weights (N, k); sets the losses."""
        with torch.autocast(flat.device.type, enabled=False):  # small logit gaps decide: float32
            logits = F.linear(flat.float(), self.router.weight.float())  # (N, C) -> (N, E)
        probs = logits.softmax(dim=-1)
        chosen = torch.topk(logits + self.expert_offset, self.top_k, dim=-1).indices  # (N, k)
        gate = probs.gather(1, chosen)  # (N, k): the offsets never reach the gates
        # Mixtral renormalizes over the chosen; Switch (k=1) keeps p, so that the router gets
        # a gradient (a gate renormalized alone would be 1, whatever the router said)
        if self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        # (E,) assignments per expert. Not torch.bincount: its output size depends on the
        # data, which breaks torch.compile's graph at every MoE layer and makes a GPU wait
        ones = torch.ones_like(chosen.flatten())
        self.counts = ones.new_zeros(self.n_experts).scatter_add_(0, chosen.flatten(), ones)
        # Switch load-balancing loss: E * sum_i f_i * P_i, f_i = share of assignments to
        # expert i (not differentiable), P_i = its mean router probability (differentiable).
        # 1 when routing is uniform; up to E when every token goes to one expert.
        f = self.counts.float() / chosen.numel()
        self.aux_loss = self.n_experts * (f * probs.mean(dim=0)).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()  # keeps logits small (ST-MoE)
        return chosen, gate

    def matmul_dtype(self, xs):
        """The dtype the expert matmuls run in: autocast's where it is on, else the input's."""
        device = xs.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else xs.dtype

    def use_grouped(self, xs, dtype):
        """F.grouped_mm (torch >= 2.10) runs every expert in one call. Its kernels want rows
        of a multiple of 16 bytes, in bf16 on a CPU or an sm80+ GPU; a CPU also runs float32,
        but torch.compile does not trace it."""
        if self.grouped_mm != "auto":
            return self.grouped_mm == "true"
        if not hasattr(F, "grouped_mm") or self.w_in.size(1) % 8 or self.w_out.size(1) % 8:
            return False
        if xs.device.type == "cpu":
            return dtype == torch.bfloat16 or (dtype == torch.float32 and not torch.compiler.is_compiling())
        return (xs.device.type == "cuda" and dtype == torch.bfloat16
                and torch.cuda.get_device_capability(xs.device) >= (8, 0))

    def run_experts(self, xs, counts):
        """Expert e's SwiGLU on rows [start_e, start_e + counts[e]) of the sorted xs (M, C)."""
        dtype = self.matmul_dtype(xs)
        if self.use_grouped(xs, dtype):  # one kernel; offs[e] = the row where expert e ends
            offs = torch.cumsum(counts, 0).to(torch.int32)
            h = F.grouped_mm(xs.to(dtype), self.w_in.to(dtype), offs=offs)  # (M, C) -> (M, 2h)
            gate, up = h.chunk(2, dim=-1)  # (M, h) each
            return F.grouped_mm(F.silu(gate) * up, self.w_out.to(dtype), offs=offs)  # (M, h) -> (M, C)
        return self.loop_experts(xs, counts)

    def loop_experts(self, xs, counts):
        """The same, one expert at a time: a Python loop that runs anywhere."""
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate, up = (xs[start:start + n] @ self.w_in[e]).chunk(2, dim=-1)  # (n, C) -> 2 x (n, h)
                outs.append((F.silu(gate) * up) @ self.w_out[e])  # (n, h) -> (n, C)
            start += n
        return torch.cat(outs) if outs else xs[:0]

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (B, T, C) -> (N, C)
        chosen, gate = self.route(flat)  # (N, k) each
        expert_of = chosen.flatten()  # (N, k) -> (N*k,) the expert of each assignment
        order = torch.argsort(expert_of, stable=True)  # (N*k,) assignments grouped by expert
        token_of = order // self.top_k  # (N*k,) the token of each sorted assignment
        gate_of = gate.flatten()[order]  # (N*k,)
        counts, self.dropped = self.counts, 0
        if self.capacity_factor > 0:  # each expert keeps its first `capacity` assignments
            capacity = math.ceil(self.capacity_factor * chosen.numel() / self.n_experts)
            first = torch.cumsum(counts, 0) - counts  # (E,) sorted index where expert e starts
            keep = torch.arange(order.numel(), device=x.device) - first[expert_of[order]] < capacity
            token_of, gate_of, counts = token_of[keep], gate_of[keep], counts.clamp(max=capacity)
            self.dropped = int(order.numel() - keep.sum())
        out = self.run_experts(flat[token_of], counts)  # (M, C) rows in expert order
        # (M, C) * (M, 1), summed into each row's token: (N, C)
        y = torch.zeros_like(flat).index_add_(0, token_of, (out * gate_of[:, None]).to(flat.dtype))
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, T, C)  # (N, C) -> (B, T, C)

    @torch.no_grad()
    def update_offsets(self, rate):
        """Auxiliary-loss-free balancing (DeepSeek-V3): after each step, raise the routing
        offset of experts that got fewer assignments than average, lower it for the others."""
        load = self.counts.float()
        if dist.is_initialized():  # the global batch's load: every rank moves the offsets alike
            dist.all_reduce(load)
        self.expert_offset += rate * torch.sign(load.mean() - load)


# 1.6 The block and the model -------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). The residual
    stream carries the input through untouched; each sublayer only adds to it."""

    def __init__(self, cfg, layer=0):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        if cfg.n_experts and layer % cfg.moe_every == cfg.moe_every - 1:  # 5.4 every k-th block
            self.mlp = MoE(cfg)
        else:
            self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def forward(self, x, pos=None, rope=None, cache=None, layer=0, real=None):
        x = x + self.attn(self.ln_1(x), pos, rope, cache, layer, real)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The decoder: token embeddings (plus learned or sinusoidal positions; RoPE rotates q and
    k inside attention instead), n_layer pre-norm blocks, a final norm, and the LM head,
    which shares its matrix with the token embedding. forward(idx (B, T), targets (B, T) or
    None, cache, mask) -> logits (B, T, vocab), loss or None; with a KVCache, idx continues the
    positions the cache has seen. Targets of -100 (padding, prompts) count in no loss.
    6.3 mask (B, L), True at real tokens, for rows left-padded to one length (generation):
    L covers the cached positions and idx; each row's first real token is its position 0,
    and no real token attends to padding, so a row gives what it gives alone. Right
    padding (training) needs no mask: causal attention never looks ahead.
    7.2 return_hidden: the final hidden states (B, T, C) instead, for a head of another kind
    (a reward, a value)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(padded_vocab(cfg.vocab_size), cfg.n_embd)  # token id -> vector
        if cfg.pos == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # position -> vector
        elif cfg.pos == "sinusoidal":
            self.wpe = SinusoidalPositions(cfg.block_size, cfg.n_embd)
        else:  # rope: positions rotate q and k inside attention; nothing is added here
            self.wpe = None
            cos, sin = rope_angles(torch.arange(cfg.block_size), cfg.n_embd // cfg.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, head_dim/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, padded_vocab(cfg.vocab_size), bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes tokens
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections so
            if name.endswith("c_proj.weight"):  # the stream's variance does not grow with depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights count once

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def active_params(self):
        """Parameters a token uses: every MoE layer counts top_k of its routed experts."""
        routed = [p for m in self.moe_layers() for p in (m.w_in, m.w_out)]
        rest = self.num_params() - sum(p.numel() for p in routed)
        return rest + sum(m.top_k * (m.w_in[0].numel() + m.w_out[0].numel()) for m in self.moe_layers())

    def router_loss(self):
        """What the routers add to the training loss (5.1), summed over the MoE layers: the
        Switch balancing loss (not with --balance aux_free, whose offsets balance instead)
        and the z-loss."""
        aux_coef = self.cfg.aux_loss_coef if self.cfg.balance == "aux" else 0.0
        return sum(aux_coef * m.aux_loss + self.cfg.z_loss_coef * m.z_loss for m in self.moe_layers())

    def router_figures(self):
        """The routers' losses in the last forward, each the mean over the MoE layers."""
        moes = self.moe_layers()
        if not moes:
            return {}
        return {"aux_loss": sum(m.aux_loss for m in moes) / len(moes),
                "z_loss": sum(m.z_loss for m in moes) / len(moes)}

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight in a matmul (2 forward, 4 backward) plus
        attention's QK^T and AV, 12*L*C*T (part00's estimator). Position tables do no matmul;
        experts a token does not visit do none for it."""
        n = self.active_params() - (self.wpe.weight.numel() if isinstance(self.wpe, nn.Embedding) else 0)
        cfg = self.cfg
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @property
    def streams(self):
        """RoPE with a sliding window has no position limit: it can run past block_size."""
        return self.cfg.pos == "rope" and self.cfg.window > 0

    def new_cache(self):
        return KVCache(self.cfg.n_layer, self.cfg.block_size, self.cfg.window, self.cfg.sink)

    def rope(self, start, end):
        """cos, sin for positions start..end-1: a view of the precomputed table, or
        computed afresh when a stream runs past it."""
        if end <= self.rope_cos.size(0):
            return self.rope_cos[start:end], self.rope_sin[start:end]
        pos = torch.arange(start, end, device=self.rope_cos.device)
        return rope_angles(pos, self.cfg.n_embd // self.cfg.n_head)

    def forward(self, idx, targets=None, cache=None, mask=None, return_hidden=False):
        B, T = idx.shape
        start = cache.seen if cache is not None else 0  # position of idx[:, 0]
        if start + T > self.cfg.block_size and not self.streams:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.cfg.block_size}")
        pos = row_pos = torch.arange(start, start + T, device=idx.device)
        if mask is not None:  # 6.3 each row's positions count from its first real token
            if self.cfg.sink or start + T > self.cfg.block_size:
                raise ValueError("a padded batch needs --sink 0 and at most block_size positions")
            row_pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, L) -> (B, T)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(row_pos)  # (B, T, C) + (T, C) or (B, T, C) -> (B, T, C)
        x = self.drop(x)
        rope = None
        if self.wpe is None:
            rope = self.rope(start, start + T) if mask is None else \
                (self.rope_cos[row_pos][:, None], self.rope_sin[row_pos][:, None])  # (B, 1, T, hd/2) each
        for i, block in enumerate(self.h):
            x = block(x, pos, rope, cache, i, mask)
        if cache is not None:
            cache.seen += T
        x = self.ln_f(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)  # (B, T, C) -> (B, T, vocab_size)
        loss = None
        if targets is not None:
            # 2.3 The loss. targets[b, t] is the token that follows idx[b, t] (get_batch made
            # it by shifting the window by one), so every position is a next-token
            # prediction: (B, T, V) logits vs (B, T) targets -> flatten to (B*T, V) vs (B*T,).
            # Cross-entropy is -log p(correct token) in nats, averaged over the B*T positions.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
def configure_optimizer(model, cfg, device):
    """AdamW. Weight decay pulls matrices (embeddings, Linear weights) toward zero; biases
    and norm gains are left alone: shrinking those does not regularize, it distorts."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.startswith("cuda"))


def bits_per_byte(loss, bytes_per_token=1.0):
    """Nats per token -> bits per byte: divide by ln 2 and by the bytes a token stands for,
    so that models with different tokenizers compare on one scale."""
    return loss / math.log(2) / bytes_per_token


@torch.no_grad()
def estimate_loss(model, splits, cfg, device, dtype):
    """2.6 Mean loss over eval_iters batches of each split. The batches come from a
    generator seeded the same way every time: successive evaluations see the same windows
    (less noise between them) and training's random stream is left untouched."""
    model.eval()
    out = {}
    for name, data in splits.items():
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = torch.zeros(cfg.eval_iters)
        for i in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, cfg.block_size, device, gen)
            with autocast_ctx(device, dtype):
                losses[i] = model(x, y)[1].item()
        out[name] = losses.mean().item()
    model.train()
    return out


def get_lr(step, cfg):
    """4.3 Linear warmup from 0 to learning_rate over warmup_steps (Adam's early moment
    estimates are noisy: big steps then can wreck the init), then a cosine decay to min_lr
    at max_steps: large steps while far from a minimum, small ones to settle into it."""
    if step <= cfg.warmup_steps:
        return cfg.learning_rate * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def rng_state():
    """Every random stream, so a resumed run draws the same batches (the data position of
    random-window sampling is the RNG state) and the same dropout masks."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, ckpt):
    """Write to a temp file, then rename: a crash mid-save leaves the old checkpoint whole,
    and a write that fails (a full disk) ends the run with one line."""
    try:
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        full = shutil.disk_usage(os.path.dirname(path) or ".").free < (1 << 26)
        why = "no space left on device" if full else str(e).strip().splitlines()[0]
        die(f"could not write {path}: {why}; the previous checkpoint is intact")


SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pos", "bias",
                "norm", "mlp", "n_kv_head", "window", "sink", "n_experts", "moe_top_k", "expert_hidden",
                "moe_every", "n_shared_experts")


def check_finite(loss, step):
    """A loss that turned NaN or infinite does not come back: stop now, with one line, and
    keep the checkpoints saved before it."""
    if not math.isfinite(loss):
        die(f"training diverged: the loss is {loss} at step {step}; the checkpoints saved "
            "before it are kept (a lower --learning_rate may help)")


def load_checkpoint(path, cfg, device, resume=False):
    """Read a checkpoint (tensors and plain values only: weights_only=True runs no code)
    and check that it holds the model this run asks for (and, to resume, all the rest)."""
    if not os.path.exists(path):
        die(f"no checkpoint at {path}: train first, or point --out_dir at a run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        die(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not (isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt):
        die(f"{path} is not a checkpoint of this project")
    saved, fields = ckpt["config"], {f.name: f.type for f in dataclasses.fields(cfg)}
    other = [k for k in SHAPE_FIELDS if k in saved and saved[k] != getattr(cfg, k)]
    foreign = [k for k in other if get_origin(fields[k]) is Literal and saved[k] not in get_args(fields[k])]
    if foreign:  # a later part's option: no flag of this part gives it
        die(f"{path} was written by another part ({', '.join(f'{k}={saved[k]}' for k in foreign)}); "
            "this part cannot load it")
    if other:
        die(f"{path} holds another model shape; pass "
            + ", ".join(f"--{k} {saved[k]} (this run: {getattr(cfg, k)})" for k in other))
    with torch.device("meta"):  # the names and shapes this part's model has, without memory
        want = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    got = {k: v.shape for k, v in ckpt["model"].items()}
    if got != want:
        odd = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
        die(f"{path} holds the weights of another model (e.g. {odd[0]}): another part or other "
            "flags wrote it")
    missing = [k for k in ("optimizer", "scaler", "step", "best_val", "rng") if k not in ckpt]
    if resume and missing:
        die(f"{path} cannot be resumed here (it has no {', '.join(missing)}: an earlier part wrote it)")
    return ckpt


def compile_model(model):
    """torch.compile, with the MoE's loop over experts left eager: its sizes (expert slices)
    change every step, and compiled code would be recompiled for each new size. The grouped
    matmul has none: it compiles."""
    for moe in model.moe_layers():
        moe.loop_experts = torch.compiler.disable(moe.loop_experts)
    return torch.compile(model)


def train_step(model, raw, opt, scaler, data, cfg, device, dtype):
    """4.2 One optimizer step: grad_accum micro-batches, each forward and backward, then clip
    and step. fp16 scales the loss up so that small gradients do not flush to zero; under
    DDP the gradients are averaged over the ranks once, after the last micro-batch. Returns
    the step's figures as tensors (reading one waits for the GPU): the mean loss and the
    routers' losses (5.1)."""
    opt.zero_grad(set_to_none=True)
    loss_sum, router_sums = torch.zeros((), device=device), {}
    for micro_step in range(cfg.grad_accum):
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, device, shard=rank_world())
        last = micro_step == cfg.grad_accum - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
            with autocast_ctx(device, dtype):
                _, loss = model(x, y)
            # 5.1 the routers' balancing losses join the language-model loss
            scaler.scale((loss + raw.router_loss()) / cfg.grad_accum).backward()
        loss_sum += loss.detach() / cfg.grad_accum
        for k, v in raw.router_figures().items():
            router_sums[k] = router_sums.get(k, 0.0) + v.detach() / cfg.grad_accum
    if cfg.grad_clip > 0:  # one bad batch cannot throw the weights far
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
    scaler.step(opt)  # skips the step if fp16 gradients overflowed
    scaler.update()
    if cfg.balance == "aux_free":  # 5.1 move the routing offsets toward an even load
        for moe in raw.moe_layers():
            moe.update_offsets(cfg.balance_rate)
    return {"train_loss": loss_sum, **router_sums}


def run_state(raw, opt, scaler, cfg, step, best_val, extra=None):
    """4.4 All a resumed run needs to continue exactly: model, optimizer, loss scaler, step,
    and every random stream (with random windows, the RNG state is the data position)."""
    return {"model": raw.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "config": dataclasses.asdict(cfg), "step": step, "best_val": best_val,
            "val_loss": best_val, "rng": rng_state(), **(extra or {})}


@contextlib.contextmanager
def catch_ctrl_c():
    """4.4 While training, Ctrl-C asks for a stop: the loop finishes its step, saves a
    checkpoint and returns; a second Ctrl-C stops at once. Yields the list of presses."""
    pressed = []

    def on_sigint(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
        print("\nCtrl-C: saving a checkpoint after this step (press again to quit at once)")

    in_main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None
    try:
        yield pressed
    finally:  # even when a step or a save fails
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)


def read_metrics(path):
    """The rows of a metrics.jsonl; a line cut short (a run killed mid-write) is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def keep_metrics_until(path, step):
    """A resumed run goes on from its checkpoint's step: rows logged after it (they will be
    logged again) and a line cut short go, so the file reads as one run."""
    if os.path.exists(path):
        rows = [r for r in read_metrics(path) if r["step"] <= step]
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


class Progress:
    """4.5 A run's figures: at each logged step and each evaluation a progress line and a
    metrics.jsonl row (and TensorBoard scalars with --tensorboard), on rank 0. Tokens/s and
    MFU count the steps after the first, whose one-off costs (CUDA start-up, torch.compile)
    would distort them, and leave out evaluation time; elapsed_s counts everything."""

    def __init__(self, cfg, model, device, first_step, append, main_proc=True):
        self.cfg, self.first_step, self.main_proc = cfg, first_step, main_proc
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        peak = gpu_peak_flops(device)
        self.peak = peak * rank_world()[1] if peak else None
        self.flops_per_token = model.flops_per_token()
        self.t0, self.first_s, self.eval_s = time.perf_counter(), 0.0, 0.0
        self.last = {}  # the last logged step's row
        self.metrics = self.writer = None
        if main_proc:
            path = os.path.join(cfg.out_dir, "metrics.jsonl")
            if append:
                keep_metrics_until(path, first_step)
            self.metrics = open(path, "a" if append else "w", buffering=1)
            if cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
                except ImportError:
                    print("note: --tensorboard needs the tensorboard package (requirements-extra.txt)")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for log in (self.metrics, self.writer):
            if log is not None:
                log.close()

    def train_seconds(self):
        return time.perf_counter() - self.t0 - self.eval_s

    @contextlib.contextmanager
    def evaluating(self):
        """Time spent inside stays out of tokens/s and MFU."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.eval_s += time.perf_counter() - t

    def log_step(self, step, lr, figures):
        """figures: name -> float, the training loss first."""
        elapsed = time.perf_counter() - self.t0
        done = step - self.first_step
        if done == 1:
            self.first_s = elapsed
        n, secs = (done - 1, elapsed - self.first_s) if done > 1 else (1, self.first_s)
        tok_s = n * self.tokens_per_step / max(secs - self.eval_s, 1e-9)
        mfu = self.flops_per_token * tok_s / self.peak if self.peak else None
        eta = secs / n * (self.cfg.max_steps - step)
        self.last = {"step": step, **figures, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu,
                     "elapsed_s": elapsed}
        if not self.main_proc:
            return
        shown = " | ".join(f"{k.removeprefix('train_').replace('_', ' ')} "
                           + (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}") for k, v in figures.items())
        print(f"step {step:5d}/{self.cfg.max_steps} | {shown} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
              + (f" | MFU {mfu:.1%}" if mfu is not None else "") + f" | {elapsed:.0f}s, ETA {eta:.0f}s")
        self.metrics.write(json.dumps(json_safe(self.last), allow_nan=False) + "\n")
        if self.writer:
            for k, v in {**figures, "lr": lr}.items():
                self.writer.add_scalar(f"train/{k.removeprefix('train_')}", v, step)

    def log_eval(self, step, losses, best, bytes_per_token):
        if not self.main_proc:
            return
        print(f"eval {step:5d} | train {losses['train']:.4f} | val {losses['val']:.4f} nats/token"
              f" = {bits_per_byte(losses['val'], bytes_per_token):.3f} bpb{' | saved best.pt' if best else ''}")
        self.metrics.write(json.dumps(json_safe({"step": step, "eval_train_loss": losses["train"],
                                                 "val_loss": losses["val"]}), allow_nan=False) + "\n")
        if self.writer:
            self.writer.add_scalar("val/loss", losses["val"], step)


def any_rank(flag, device):
    """torchrun: True on every rank when it is True on any of them (one host sync)."""
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def mean_over_ranks(figures):
    """name -> tensor, averaged over the ranks (each holds its shard's figure) -> name -> float."""
    world = rank_world()[1]
    for v in figures.values():
        if world > 1:
            dist.all_reduce(v)
            v /= world
    return {k: v.item() for k, v in figures.items()}


def train(model, train_data, val_data, cfg, device, dtype, bytes_per_token=1.0, resume=None,
          extra=None):
    """The loop of part02, grown for real runs: train_step (4.2) on the warmup + cosine
    schedule (4.3); every eval_interval steps an evaluation, and best.pt at a new best; every
    ckpt_interval steps ckpt.pt, which continues the run exactly (4.4); figures through
    Progress (4.5). Ctrl-C saves, then returns. Under torchrun each rank trains on its shard
    of every batch, DDP averages the gradients, rank 0 logs and saves. `extra` goes into the
    checkpoints (the tokenizer's name)."""
    rank, world = rank_world()
    raw = model  # the plain module: evaluated and saved; `model` may get wrapped below
    if cfg.compile == "true" or (cfg.compile == "auto" and device.startswith("cuda")):
        model = compile_model(model)
    if world > 1:
        model = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    opt = configure_optimizer(raw, cfg, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    step, best_val, losses = 0, float("inf"), None
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        step, best_val = resume["step"], resume["best_val"]
        set_rng_state(resume["rng"])
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    progress = Progress(cfg, raw, device, step, append=resume is not None, main_proc=rank == 0)
    model.train()
    with catch_ctrl_c() as pressed, progress:
        while step < cfg.max_steps:
            step += 1
            lr = get_lr(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            figures = train_step(model, raw, opt, scaler, train_data, cfg, device, dtype)
            stop = bool(pressed) or 0 < cfg.max_seconds <= progress.train_seconds()
            if world > 1:  # every rank must stop on the same step: they agree at logging steps
                stop = step % cfg.log_interval == 0 and any_rank(stop, device)
            last = stop or step == cfg.max_steps
            if step % cfg.log_interval == 0 or step == progress.first_step + 1 or last:
                progress.log_step(step, lr, mean_over_ranks(figures))
                check_finite(progress.last["train_loss"], step)
            if step % cfg.eval_interval == 0 or last:
                with progress.evaluating():
                    losses = estimate_loss(raw, {"train": train_data, "val": val_data}, cfg, device, dtype)
                    check_finite(losses["val"], step)
                    best = losses["val"] < best_val
                    if best:
                        best_val = losses["val"]
                        state = run_state(raw, opt, scaler, cfg, step, best_val, extra)
                        if rank == 0:
                            save_checkpoint(best_path, state)
                progress.log_eval(step, losses, best, bytes_per_token)
            if step % cfg.ckpt_interval == 0 or last:
                check_finite(figures["train_loss"].item(), step)  # never save a diverged model
                state = run_state(raw, opt, scaler, cfg, step, best_val, extra)
                if rank == 0:
                    save_checkpoint(ckpt_path, state)
            if stop:
                break
    if pressed and rank == 0:
        print(f"stopped at step {step}; continue with --resume")
    return {"train_loss": losses["train"] if losses else float("nan"),
            "final_val_loss": losses["val"] if losses else float("nan"), "val_loss": best_val,
            "steps": step, "tokens_per_s": progress.last.get("tokens_per_s", float("nan")),
            "mfu": progress.last.get("mfu"), "interrupted": bool(pressed)}


def plot_losses(out_dir):
    """4.5 A loss-curve PNG from metrics.jsonl, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
# Inference: 2.5 sampling
# ----------------------------------------------------------------------------------------
def filter_logits(logits, top_k=0, top_p=1.0):
    """(B, V) logits -> the same with -inf outside the kept set: the top_k largest, and/or
    the smallest set of most likely tokens whose probabilities add up to top_p."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # 1st stays
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)  # undo the sort
    return logits


def next_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """(B, V) logits of the last position -> (B, 1) ids: greedy at temperature 0, else
    sampled from the distribution sharpened or flattened by temperature, cut by top_k/top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None,
             use_cache=True):
    """Append max_new_tokens tokens to idx (B, T). 3.4 With the KV cache, the prompt runs
    once (prefill) and each new token then costs a single position (decode); without it,
    every step reruns the whole context. Both produce the same tokens. When a full-attention
    context is full, the cache restarts from the last block_size tokens, which is what the
    uncached path sees; a sliding-window RoPE model streams on with a rolling cache."""
    model.eval()
    T = model.cfg.block_size

    def context(ids):
        return ids if model.streams else ids[:, -T:]  # crop to the context the model has

    cache = model.new_cache() if use_cache else None
    step_input = context(idx)
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache)[0][:, -1, :model.cfg.vocab_size].float()  # (B, T, Vpad) -> (B, V)
        next_id = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
        if cache is None:
            step_input = context(idx)
        elif cache.seen < T or model.streams:
            step_input = next_id  # decode: one new position
        else:
            cache, step_input = model.new_cache(), idx[:, -T:]  # full: prefill the last T again
    return idx


def sample(model, tokenizer, cfg, device):
    """cfg.num_samples continuations of cfg.prompt, seeded by cfg.seed."""
    ids = tokenizer.encode(cfg.prompt or "\n")
    if len(ids) > cfg.block_size:
        print(f"note: the prompt is {len(ids)} tokens; the model sees its last {cfg.block_size}")
        ids = ids[-cfg.block_size:]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, gen)
    return [tokenizer.decode(row.tolist()) for row in out]


@torch.no_grad()
def generate_batch(model, prompts, max_new_tokens, stop_id, pad_id, temperature=0.0, top_k=0,
                   top_p=1.0, generator=None, logprobs=False):
    """6.5 Many prompts (lists of ids, of any lengths) at once with the KV cache: left-padded
    to one length, so every row's next token is at the same column, with a mask (B, L) that
    keeps the padding out of attention and gives each row its own positions (GPT.forward).
    A row stops at stop_id; the batch stops when every row has. Returns each row's new ids
    (stop_id left out) and whether it stopped, i.e. ended within max_new_tokens.
    8.2 logprobs (temperature > 0): also (B, steps) float32, the log-probability of each
    new column's token under the distribution it was sampled from (stop_id included)."""
    model.eval()
    device = model.wte.weight.device
    B, P = len(prompts), max(map(len, prompts))
    idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # right-align: the padding goes on the left
        idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = True
    cache, step_input, new, logps = model.new_cache(), idx, [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(min(max_new_tokens, model.cfg.block_size - P)):
        logits = model(step_input, cache=cache, mask=mask)[0][:, -1, :model.cfg.vocab_size].float()  # (B, V)
        next_id = next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if logprobs:
            logps.append(torch.log_softmax(filter_logits(logits / temperature, top_k, top_p), -1).gather(1, next_id))
        next_id = next_id.masked_fill(done[:, None], pad_id)  # a finished row only pads
        new.append(next_id)
        done |= next_id[:, 0] == stop_id
        if done.all():
            break
        step_input = next_id
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
    rows = torch.cat(new, dim=1).tolist() if new else [[] for _ in range(B)]
    out = [row[:row.index(stop_id)] if stop_id in row else row for row in rows]
    if logprobs:
        return out, [stop_id in row for row in rows], torch.cat(logps, dim=1) if logps else torch.zeros(B, 0)
    return out, [stop_id in row for row in rows]


# ----------------------------------------------------------------------------------------
# 10.2 Entropy patching: where a byte is hard to predict, a new patch begins
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def next_byte_entropy(model, idx):
    """(B, T) byte ids -> (B, T) nats: [:, t] is the entropy of the model's distribution of
    the byte after idx[:, t] (its byte outputs only)."""
    logp = F.log_softmax(model(idx)[0][..., :256].float(), dim=-1)  # (B, T, 256)
    return -(logp.exp() * logp).sum(-1)


def patch_starts(entropy, threshold, rise=0.0):
    """10.2 BLT's patching rule (Pagnoni et al., 2024). entropy (B, N): [:, i] is the entropy
    of byte i + 1 given the bytes before it. -> (B, N + 1) bool, True at each byte that
    starts a patch: byte 0, then every byte whose entropy exceeds the global threshold, or
    (rise > 0) exceeds the entropy of the byte before by more than rise. A patch is thus
    a stretch the small model finds easy; the latent model spends one step on it."""
    start = entropy > threshold
    if rise > 0:
        start[:, 1:] |= entropy[:, 1:] - entropy[:, :-1] > rise
    return torch.cat([torch.ones_like(start[:, :1]), start], dim=1)


@torch.no_grad()
def text_patches(model, data, threshold, rise, block_size):
    """A 1-D array of bytes -> (entropy (n,) nats, starts (n,) bool), in windows of
    block_size bytes: the first byte of a window has no context (entropy NaN) and starts a
    patch. The tail after the last whole window is dropped (n = whole windows)."""
    model.eval()
    device = model.wte.weight.device
    n = len(data) // block_size * block_size
    idx = torch.from_numpy(np.asarray(data[:n], dtype=np.int64)).view(-1, block_size).to(device)
    entropy = torch.cat([next_byte_entropy(model, rows) for rows in idx.split(64)])  # (W, block_size)
    starts = patch_starts(entropy[:, :-1], threshold, rise)  # (W, block_size)
    entropy = torch.cat([torch.full_like(entropy[:, :1], math.nan), entropy[:, :-1]], dim=1)  # of byte t
    return entropy.flatten().cpu().numpy(), starts.flatten().cpu().numpy()


def show_patches(path, text, entropy, starts, threshold):
    """One passage with its patches: text with '|' before each patch (always, path.txt) and
    the entropy curve with the boundaries (path.png, when matplotlib is installed)."""
    marked = "".join(("|" if s and i else "") + c for i, (c, s) in enumerate(zip(text, starts)))
    with open(path + ".txt", "w") as f:
        f.write(marked + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return marked
    fig, ax = plt.subplots(figsize=(max(8, len(text) / 8), 3.5))
    ax.plot(range(len(text)), entropy, marker=".", lw=1)
    ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold {threshold:g} nats")
    for i in np.flatnonzero(starts):
        ax.axvline(i - 0.5, color="tab:red", alpha=0.3, lw=1)
    ax.set_xticks(range(len(text)), [c if c.strip() else "_" for c in text], fontsize=7, family="monospace")
    ax.set_ylabel("next-byte entropy (nats)")
    ax.legend(loc="upper right")
    fig.savefig(path + ".png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return marked


# ----------------------------------------------------------------------------------------
# 10.2 A byte-latent model: bytes pooled into patches, a transformer over the patches
# ----------------------------------------------------------------------------------------
class ByteLatent(nn.Module):
    """10.2 A minimal Byte Latent Transformer (Pagnoni et al., 2024). A frozen entropy model
    cuts the bytes into patches (patch_starts); a local encoder (local_layers blocks of
    width n_embd / 2 over the bytes) is mean-pooled over each patch into one vector; the
    latent transformer (n_layer blocks of width n_embd) runs over the patch vectors; the
    local decoder predicts each byte from its encoder state plus the latent state of the
    last patch that ended before that byte: so a patch's bytes are predicted from the
    patches before it and its own earlier bytes, never from later ones. forward(idx,
    targets) as GPT's, so train() trains it; the expensive latent blocks run once a patch."""

    def __init__(self, cfg, entropy_model, threshold, rise=0.0):
        super().__init__()
        self.cfg, self.threshold, self.rise = cfg, threshold, rise
        self.entropy_model = [entropy_model.eval().requires_grad_(False)]  # a list: not a submodule (not trained, not saved here)
        local = dataclasses.replace(cfg, n_embd=cfg.n_embd // 2, n_layer=cfg.local_layers)
        C, E = cfg.n_embd, local.n_embd
        self.wte = nn.Embedding(padded_vocab(cfg.vocab_size), E)
        self.encoder = nn.ModuleList(Block(local) for _ in range(cfg.local_layers))
        self.up = nn.Linear(E, C, bias=False)  # a pooled patch -> the latent width
        self.latent = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_latent = make_norm(cfg)
        self.down = nn.Linear(C, E, bias=False)  # a latent state -> the byte width
        self.no_patch = nn.Parameter(torch.zeros(E))  # the context of bytes before any patch has ended
        self.decoder = nn.ModuleList(Block(local) for _ in range(cfg.local_layers))
        self.ln_f = make_norm(local)
        self.lm_head = nn.Linear(E, padded_vocab(cfg.vocab_size), bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(GPT._init_weights)
        for name, head_dim in (("local", cfg.n_embd // cfg.n_head // 2), ("latent", cfg.n_embd // cfg.n_head)):
            cos, sin = rope_angles(torch.arange(cfg.block_size), head_dim)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)
        self.patch_len = 4.0  # bytes per patch, measured by each forward (a guess before the first)

    # the trainer's interface, as GPT has it: parameters, routers (MoE blocks, if any)
    num_params, moe_layers, active_params = GPT.num_params, GPT.moe_layers, GPT.active_params
    router_loss, router_figures = GPT.router_loss, GPT.router_figures

    def flops_per_token(self):
        """Training FLOPs per byte: 6 per weight of the local layers at every byte and of the
        latent ones at every patch (1 / patch_len of the bytes), their attention, and the
        entropy model's forward pass (2 per weight)."""
        cfg, E, L = self.cfg, self.cfg.n_embd // 2, self.patch_len
        local = sum(p.numel() for m in (self.wte, self.encoder, self.decoder, self.ln_f) for p in m.parameters())
        latent = self.num_params() - local - self.no_patch.numel()
        attention = 12 * 2 * cfg.local_layers * E * cfg.block_size + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size / L / L
        return 6 * local + 6 * latent / L + attention + self.entropy_model[0].flops_per_token() / 3

    def forward(self, idx, targets=None):
        B, T = idx.shape
        E = self.cfg.n_embd // 2
        starts = patch_starts(next_byte_entropy(self.entropy_model[0], idx), self.threshold, self.rise)  # (B, T + 1)
        patch = starts[:, :T].long().cumsum(1) - 1  # (B, T): the patch of each byte, from 0
        P = int(patch.max()) + 1  # patches in the longest row; shorter rows are padded at the end
        self.patch_len = B * T / starts[:, :T].sum().item()
        pos, rope = torch.arange(T, device=idx.device), (self.local_cos[:T], self.local_sin[:T])
        x = self.wte(idx)  # (B, T, E)
        for block in self.encoder:
            x = block(x, pos, rope)
        # mean-pool each patch: (B, T, E) -> (B * P, E) by patch index -> (B, P, C)
        flat = (patch + P * torch.arange(B, device=idx.device)[:, None]).view(-1)  # (B * T,)
        sums = x.new_zeros(B * P, E).index_add_(0, flat, x.reshape(B * T, E))
        count = torch.bincount(flat, minlength=B * P).clamp(min=1)[:, None].to(x.dtype)
        z = self.up(sums / count).view(B, P, -1)
        for i, block in enumerate(self.latent):  # causal over patches: padding comes last
            z = block(z, pos[:P], (self.latent_cos[:P], self.latent_sin[:P]), layer=i)
        z = self.down(self.ln_latent(z))  # (B, P, E)
        # byte t predicts byte t + 1 from the last patch that ended by t: t's own patch if
        # byte t + 1 starts a new one, else the patch before it (-1: none yet)
        ended = patch - (~starts[:, 1:]).long()  # (B, T), in -1 .. P - 1
        context = torch.cat([self.no_patch.expand(B, 1, E).to(z.dtype), z], dim=1)  # (B, P + 1, E)
        x = x + context.gather(1, (ended + 1)[..., None].expand(B, T, E))
        for block in self.decoder:
            x = block(x, pos, rope)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


# ----------------------------------------------------------------------------------------
# 10.3 Large Concept Model: sentences as vectors, a transformer that predicts the next one
# ----------------------------------------------------------------------------------------
END_OF_TEXT = "End of text."  # the last sentence of every document: its concept ends generation
SENTENCE_END = regex.compile(r"(?<=[.!?;:])\s+")


def documents_of(text, max_len):
    """Text -> documents, each a list of sentences: a document is a paragraph (blank lines
    between), its lines joined by spaces; sentences end at . ! ? ; : and a longer one is
    wrapped at spaces into pieces of at most max_len bytes. Each document ends with
    END_OF_TEXT, as the LCM's training documents do."""
    docs = []
    for paragraph in regex.split(r"\n\s*\n", text):
        sentences = []
        for s in SENTENCE_END.split(" ".join(paragraph.split())):
            piece = ""
            for word in s.split(" "):
                word = word.encode("utf-8")[:max_len].decode("utf-8", errors="ignore")
                if piece and len((piece + " " + word).encode("utf-8")) > max_len:
                    sentences.append(piece)
                    piece = word
                else:
                    piece = f"{piece} {word}" if piece else word
            if piece:
                sentences.append(piece)
        if sentences:
            docs.append(sentences + [END_OF_TEXT])
    return docs


def sentence_batch(sentences, device):
    """Sentences -> (ids (B, L + 1): the bytes then EOS (256), PAD (257) after; lengths (B,))."""
    rows = [list(s.encode("utf-8")) + [256] for s in sentences]
    ids = torch.full((len(rows), max(map(len, rows))), 257, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids.to(device), torch.tensor([len(r) - 1 for r in rows], device=device)


class SentenceAutoencoder(nn.Module):
    """10.3 The concept space, trained here so that the lesson runs offline (the LCM paper
    uses SONAR). The encoder (--concept_layers blocks of width n_embd / 2 over the bytes and
    an end token) reads the sentence; its state at the end token, projected to --concept_dim
    and scaled to unit length, is the concept: one point on a sphere per sentence. The
    decoder (as many blocks) starts from the concept in place of a first token, sees it
    added to every byte it reads too, and writes the bytes back, causally, to the end token."""

    def __init__(self, cfg):
        super().__init__()
        local = dataclasses.replace(cfg, n_embd=cfg.n_embd // 2)
        C = local.n_embd
        self.cfg = cfg
        self.wte = nn.Embedding(258, C)  # bytes, EOS, PAD
        self.encoder = nn.ModuleList(Block(local, i) for i in range(cfg.concept_layers))
        self.ln_enc = make_norm(local)
        self.to_concept = nn.Linear(C, cfg.concept_dim, bias=False)
        self.from_concept = nn.Linear(cfg.concept_dim, C, bias=False)
        self.decoder = nn.ModuleList(Block(local, i) for i in range(cfg.concept_layers))
        self.ln_f = make_norm(local)
        self.lm_head = nn.Linear(C, 258, bias=False)
        self.apply(GPT._init_weights)
        cos, sin = rope_angles(torch.arange(cfg.sentence_len + 2), C // cfg.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def blocks(self, blocks, x):
        T = x.size(1)
        for i, block in enumerate(blocks):
            x = block(x, torch.arange(T, device=x.device), (self.rope_cos[:T], self.rope_sin[:T]), layer=i)
        return x

    def encode(self, ids, lengths):
        """(B, L + 1) bytes + EOS (PAD after) -> (B, concept_dim) unit vectors: the state at
        EOS, which has read the whole sentence (attention is causal; the padding comes after)."""
        h = self.ln_enc(self.blocks(self.encoder, self.wte(ids)))  # (B, L + 1, C)
        last = h[torch.arange(len(ids), device=ids.device), lengths]  # (B, C)
        return F.normalize(self.to_concept(last), dim=-1)

    def decode_logits(self, concepts, ids):
        """Teacher forcing: position 0 holds the concept, position t + 1 the byte t plus the
        concept, and each predicts the next byte (the first, ..., EOS). (B, D), (B, T) ->
        (B, T + 1, 258). The concept at every position: a decoder that sees it only once
        learns to be a language model first, and to read the concept very late."""
        c = self.from_concept(concepts)[:, None]  # (B, 1, C)
        x = torch.cat([c, self.wte(ids) + c], dim=1)
        return self.lm_head(self.ln_f(self.blocks(self.decoder, x)))

    def forward(self, ids, lengths):
        """-> (logits, the reconstruction loss in nats per byte, EOS included)."""
        logits = self.decode_logits(self.encode(ids, lengths), ids[:, :-1])  # (B, L + 1, 258)
        targets = ids.masked_fill(ids == 257, -100)  # the bytes and EOS; no loss on padding
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def decode(self, concepts, max_len):
        """Greedy: (B, D) concepts -> B sentences (each stops at EOS or max_len bytes)."""
        ids = torch.zeros(len(concepts), 0, dtype=torch.long, device=concepts.device)
        for _ in range(max_len + 1):
            nxt = self.decode_logits(concepts, ids)[:, -1, :257].argmax(-1, keepdim=True)  # (B, 1), never PAD
            ids = torch.cat([ids, nxt], dim=1)
            if (ids == 256).any(1).all():
                break
        rows = [r[:r.index(256)] if 256 in r else r for r in ids.tolist()]
        return [bytes(min(b, 255) for b in r).decode("utf-8", errors="replace") for r in rows]


class BaseLCM(nn.Module):
    """10.3 The Base-LCM (LCM team, Meta, 2024): a causal transformer (n_layer blocks) over a
    document's concepts, between a pre-net (concept -> model width) and a post-net (model
    width -> concept), trained to regress the next concept with the mean squared error.
    forward(concepts (B, N, D), mask (B, N)) -> (predictions (B, N, D), loss over the
    positions whose next concept is real)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.pre_net = nn.Linear(cfg.concept_dim, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.post_net = nn.Linear(cfg.n_embd, cfg.concept_dim)
        self.apply(GPT._init_weights)
        cos, sin = rope_angles(torch.arange(cfg.lcm_context), cfg.n_embd // cfg.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, concepts, mask=None):
        B, N, _ = concepts.shape
        x = self.pre_net(concepts)  # (B, N, D) -> (B, N, C)
        for i, block in enumerate(self.h):
            x = block(x, torch.arange(N, device=x.device), (self.rope_cos[:N], self.rope_sin[:N]), layer=i)
        pred = self.post_net(self.ln_f(x))  # (B, N, D): the concept that comes next
        loss = None
        if mask is not None:  # position i predicts concept i + 1 where both are real
            keep = (mask[:, :-1] & mask[:, 1:]).float()[..., None]
            err = ((pred[:, :-1].float() - concepts[:, 1:].float()) ** 2) * keep
            loss = err.sum() / keep.sum().clamp(min=1) / concepts.size(-1)
        return pred, loss


def fit(model, next_batch, cfg, device, dtype, what):
    """10.3 Train a model on batches of its own kind, as part04's train() trains GPT: AdamW,
    warmup + cosine (get_lr), gradient clipping, a loss scaler for float16, a line every
    --log_interval steps; --max_steps steps or --max_seconds, whichever ends first.
    next_batch(generator) -> the forward's arguments; the forward returns (output, loss)."""
    opt = configure_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(1, cfg.max_steps + 1):
        lr = get_lr(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast_ctx(device, dtype):
            loss = model(*next_batch(gen))[1]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        check_finite(losses[-1], step)
        elapsed = time.perf_counter() - t0
        stop = 0 < cfg.max_seconds <= elapsed
        if step == 1 or step % cfg.log_interval == 0 or stop or step == cfg.max_steps:
            print(f"{what} step {step:5d}/{cfg.max_steps} | loss {losses[-1]:.4f} | lr {lr:.2e} | {elapsed:.0f}s")
        if stop:
            break
    model.eval()
    return {"steps": step, "train_loss": float(np.mean(losses[-10:])), "train_s": elapsed}


@torch.no_grad()
def embed_sentences(autoencoder, sentences, device, batch=256):
    """Sentences -> (n, concept_dim) concepts, in batches."""
    return torch.cat([autoencoder.encode(*sentence_batch(sentences[i:i + batch], device))
                      for i in range(0, len(sentences), batch)]).float()


def concept_windows(sequences, cfg, device, gen):
    """A batch of --batch_size windows of at most --lcm_context concepts, each from a random
    document at a random start; right-padded, with the mask of real positions."""
    picks = torch.randint(len(sequences), (cfg.batch_size,), generator=gen).tolist()
    windows = []
    for i in picks:
        seq = sequences[i]
        start = int(torch.randint(max(1, len(seq) - cfg.lcm_context + 1), (1,), generator=gen))
        windows.append(seq[start:start + cfg.lcm_context])
    N = max(len(w) for w in windows)
    x = torch.zeros(len(windows), N, cfg.concept_dim)
    mask = torch.zeros(len(windows), N, dtype=torch.bool)
    for b, w in enumerate(windows):
        x[b, :len(w)], mask[b, :len(w)] = w, True
    return x.to(device), mask.to(device)


@torch.no_grad()
def next_concept_figures(lcm, sequences, train_mean, pool, gen, candidates=100):
    """On held-out documents: the cosine of each predicted next concept to the true one,
    beside two baselines (the last concept again; the mean training concept), and the rank
    of the true next sentence among `candidates` (it and others drawn from `pool`) by
    distance to the prediction (1 best, 50.5 by chance). The end-of-text target is left
    out: it is one fixed point, easy for the model and unfair to the baselines."""
    cos, repeat, mean, ranks = [], [], [], []
    for seq in sequences:
        seq = seq[:lcm.cfg.lcm_context]
        pred = lcm(seq[None].to(lcm.pre_net.weight.device))[0][0].float().cpu()  # (N, D)
        for i in range(len(seq) - 2):  # targets 1 .. N-2: the last is the end of text
            target = seq[i + 1]
            cos.append(F.cosine_similarity(pred[i], target, dim=0))
            repeat.append(F.cosine_similarity(seq[i], target, dim=0))
            mean.append(F.cosine_similarity(train_mean, target, dim=0))
            others = pool[torch.randint(len(pool), (candidates - 1,), generator=gen)]
            others = others[(others - target).norm(dim=1) > 1e-6]  # not the true sentence again
            ranks.append(1 + int(((others - pred[i]).norm(dim=1) < (target - pred[i]).norm()).sum()))
    return {"cosine": float(torch.stack(cos).mean()), "cosine_repeat_last": float(torch.stack(repeat).mean()),
            "cosine_mean": float(torch.stack(mean).mean()), "rank_of_next": float(np.mean(ranks)),
            "candidates": candidates, "predictions": len(cos)}


@torch.no_grad()
def continue_document(lcm, autoencoder, prompt, end, cfg, max_sentences=8):
    """Generation in concept space: predict the next concept, decode it to a sentence, append
    the prediction (scaled to unit length) and go on, until the prediction is near the
    end-of-text concept (cosine > 0.9), --lcm_context concepts, or max_sentences."""
    context, out = prompt.clone(), []
    while len(out) < max_sentences and len(context) < cfg.lcm_context:
        pred = F.normalize(lcm(context[None])[0][0, -1].float(), dim=-1)
        if F.cosine_similarity(pred, end, dim=0) > 0.9:
            break
        out.append(autoencoder.decode(pred[None].to(autoencoder.wte.weight.dtype), cfg.sentence_len)[0])
        context = torch.cat([context, pred[None].to(context.dtype)])
    return out


# ----------------------------------------------------------------------------------------
# 10.4 Poincare embeddings: a hierarchy in the hyperbolic ball
# ----------------------------------------------------------------------------------------
def stdlib_hierarchy():
    """The offline default hierarchy, real and in every CPython: this Python's standard
    library as a tree of packages and modules under one root, "stdlib" (email.mime.text ->
    email.mime -> email -> stdlib), as the pairs (node, ancestor) of its transitive closure."""
    root = sysconfig.get_paths()["stdlib"]
    pairs = []
    for folder, subfolders, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        package = [] if rel == "." else rel.split(os.sep)
        subfolders[:] = sorted(d for d in subfolders if d.isidentifier() and d != "site-packages"
                               and os.path.exists(os.path.join(folder, d, "__init__.py")))
        names = [".".join(package + [d]) for d in subfolders]
        names += [".".join(package + [f[:-3]]) for f in sorted(files)
                  if f.endswith(".py") and f != "__init__.py" and f[:-3].isidentifier()]
        for name in names:
            parts = name.split(".")
            pairs += [(name, ".".join(parts[:i])) for i in range(1, len(parts))] + [(name, "stdlib")]
    return pairs


def read_hierarchy(path):
    """A TSV of (child, ancestor) lines, a transitive closure -> the pairs. A line without two
    fields ends the run (exit 2) naming it."""
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) != 2 or not all(fields):
                    die(f"--hierarchy {path}:{n}: expected child<TAB>ancestor, got {line.strip()[:60]!r}")
                pairs.append(tuple(fields))
    except (OSError, UnicodeDecodeError) as e:
        die(f"--hierarchy {path}: cannot read it ({type(e).__name__})")
    return pairs


def index_hierarchy(pairs, where):
    """(child, ancestor) names -> (names, (P, 2) int64 ids). A node that is its own ancestor,
    or a cycle (a node among its own ancestors, by depth-first search), ends the run."""
    if not pairs:
        die(f"{where}: no (child, ancestor) pairs")
    for child, ancestor in pairs:
        if child == ancestor:
            die(f"{where}: {child!r} is its own parent")
    names = sorted({n for p in pairs for n in p})
    ids = {n: i for i, n in enumerate(names)}
    up = collections.defaultdict(list)
    for child, ancestor in pairs:
        up[ids[child]].append(ids[ancestor])
    state = [0] * len(names)  # 0 unseen, 1 on the path being walked, 2 done
    for start in range(len(names)):
        if state[start]:
            continue
        state[start], path = 1, [(start, iter(up[start]))]
        while path:  # depth-first, without recursion: a deep hierarchy cannot overflow the stack
            node, ancestors = path[-1]
            nxt = next(ancestors, None)
            if nxt is None:
                state[node] = 2
                path.pop()
            elif state[nxt] == 1:
                die(f"{where}: a cycle: {names[nxt]!r} is an ancestor of {names[node]!r} and of itself")
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append((nxt, iter(up[nxt])))
    return names, torch.tensor([[ids[c], ids[a]] for c, a in sorted(set(pairs))], dtype=torch.long)


def poincare_distance(u, v):
    """10.4 The distance of the Poincare ball (Nickel & Kiela, NeurIPS 2017), broadcast over
    leading dimensions: arcosh(1 + 2 |u - v|^2 / ((1 - |u|^2)(1 - |v|^2))). Near the
    origin it is about twice the Euclidean distance; toward the boundary it grows without
    bound, so a tree's exponentially many leaves find room there."""
    sq = ((u - v) ** 2).sum(-1)
    z = 2 * sq / ((1 - (u * u).sum(-1)) * (1 - (v * v).sum(-1))).clamp_min(1e-15)
    # arcosh(1 + z) = log(1 + z + sqrt(z (z + 2))), the root kept off 0: at u = v its
    # gradient would be infinite (times 0: NaN), and siblings do come that close
    return torch.log1p(z + (z * (z + 2)).clamp_min(1e-12).sqrt())


def euclidean_distance(u, v):
    return ((u - v) ** 2).sum(-1).clamp_min(1e-15).sqrt()


def project_to_ball(x, eps=1e-5):
    """Rows of norm >= 1 - eps back onto that sphere, in place: the ball is open."""
    norm = x.norm(dim=-1, keepdim=True)
    x.mul_(torch.where(norm >= 1 - eps, (1 - eps) / norm, torch.ones_like(norm)))
    return x


def embedding_loss(weight, batch, negatives, valid, distance):
    """Nickel & Kiela's loss: for a pair (u, v), a softmax over the negative distances from u
    to v and to K sampled nodes not related to u, -log(e^-d(u,v) / sum e^-d(u,v')). batch
    (B, 2) ids, negatives (B, K) ids, valid (B, K) bool (a sample that hit a relative of u
    is left out); summed over the batch, so each pair's gradient has the same size at any B."""
    u = weight[batch[:, 0]][:, None]  # (B, 1, D)
    v = weight[torch.cat([batch[:, 1:], negatives], dim=1)]  # (B, 1 + K, D)
    logits = -distance(u, v)  # (B, 1 + K)
    logits = logits.masked_fill(torch.cat([torch.zeros_like(valid[:, :1]), ~valid], dim=1), -math.inf)
    return F.cross_entropy(logits, torch.zeros(len(batch), dtype=torch.long, device=weight.device), reduction="sum")


def riemannian_sgd_step(weight, lr):
    """10.4 One Riemannian SGD step in the ball: the Euclidean gradient times the inverse of
    the metric, (1 - |x|^2)^2 / 4 (small near the boundary, where distances are stretched),
    then every point projected back inside."""
    with torch.no_grad():
        scale = (1 - (weight * weight).sum(-1, keepdim=True)) ** 2 / 4
        weight -= lr * scale * weight.grad
        project_to_ball(weight)
    weight.grad = None


def train_embedding(n_nodes, pairs, dim, cfg, geometry="poincare"):
    """Embed the closure pairs (P, 2) in dim dimensions: --poincare_epochs passes over the
    pairs in shuffled batches of --poincare_batch, --negatives samples each (uniform over the
    nodes; those related to u, either way, and u itself left out of its softmax), the first
    --burn_in epochs at a tenth of --poincare_lr (N&K's burn-in: the points find their
    angular places before they move outward). Poincare: Riemannian SGD; Euclidean: plain SGD
    on the same loss. Batched: no Python loop over pairs. -> (n_nodes, dim) float32."""
    gen = torch.Generator().manual_seed(cfg.seed)
    weight = ((torch.rand(n_nodes, dim, generator=gen) * 2 - 1) * 1e-3).requires_grad_()
    related = torch.cat([pairs[:, 0] * n_nodes + pairs[:, 1], pairs[:, 1] * n_nodes + pairs[:, 0]]).unique()
    distance = poincare_distance if geometry == "poincare" else euclidean_distance
    for epoch in range(cfg.poincare_epochs):
        lr = cfg.poincare_lr / 10 if epoch < cfg.burn_in else cfg.poincare_lr
        for batch in pairs[torch.randperm(len(pairs), generator=gen)].split(cfg.poincare_batch):
            negatives = torch.randint(0, n_nodes, (len(batch), cfg.negatives), generator=gen)
            keys = batch[:, :1] * n_nodes + negatives
            valid = ~torch.isin(keys, related) & (negatives != batch[:, :1])
            embedding_loss(weight, batch, negatives, valid, distance).backward()
            if geometry == "poincare":
                riemannian_sgd_step(weight, lr)
            else:
                with torch.no_grad():
                    weight -= lr * weight.grad
                weight.grad = None
    return weight.detach()


@torch.no_grad()
def reconstruction(weight, pairs, distance, chunk=256):
    """Mean rank and MAP of the closure from the embedding, as gensim's
    ReconstructionEvaluation computes them (so that the figures compare): for each node u
    with ancestors, each ancestor's rank among every node that is not one of u's ancestors
    (u itself included, at distance 0: the best rank is 2), and u's average precision.
    Distances from `chunk` nodes at a time: memory grows with the nodes, not their square."""
    ancestors = collections.defaultdict(list)
    for child, ancestor in pairs.tolist():
        ancestors[child].append(ancestor)
    children = sorted(ancestors)
    ranks, precisions = [], []
    for start in range(0, len(children), chunk):
        rows = children[start:start + chunk]
        d = distance(weight[rows][:, None], weight[None])  # (R, N)
        for r, u in enumerate(rows):
            positive = torch.zeros(len(weight), dtype=torch.bool)
            positive[ancestors[u]] = True
            pos, neg = d[r][positive], d[r][~positive]
            rank = (neg[None] < pos[:, None]).sum(1) + 1  # (k,)
            ranks.append(rank)
            ordered = rank.sort().values + torch.arange(len(rank))  # places in the whole ranking
            precisions.append((torch.arange(1, len(rank) + 1) / ordered).mean())
    return float(torch.cat(ranks).double().mean()), float(torch.stack(precisions).double().mean())


def plot_disk(path, weight, names, pairs, labels=12):
    """The 2-D Poincare embedding as a disk, the closure's edges to direct parents faint and
    the nodes nearest the origin (the top levels) labeled (when matplotlib is installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="gray"))
    w = weight.numpy()
    ax.scatter(w[:, 0], w[:, 1], s=4)
    for i in weight.norm(dim=1).argsort()[:labels].tolist():
        ax.annotate(names[i], w[i], fontsize=8)
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
# 10.5 Weight quantization: int8 per output channel, int4 in groups packed two per byte
# ----------------------------------------------------------------------------------------
def quantize_int8(w):
    """(out, in) float -> (int8 (out, in), scale (out, 1)): symmetric, one scale per output
    channel, its absmax mapped to 127. Every weight comes back within half a step (scale / 2)."""
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w, group):
    """(out, in) float -> (uint8 (out, in / 2), scale (out, in / group)): symmetric in groups
    of `group` consecutive inputs of a row, each group's absmax mapped to 7, the values -8..7
    stored as 0..15 and packed two to a byte (the even column in the low nibble)."""
    rows, cols = w.shape
    groups = w.reshape(rows, cols // group, group)  # (out, in) -> (out, groups, group)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 7
    q = (torch.round(groups / scale).clamp(-8, 7) + 8).to(torch.uint8).reshape(rows, cols)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale.squeeze(-1)


def unpack_int4(packed):
    """(out, in / 2) uint8 -> (out, in) int8 in -8..7: the low nibble first."""
    low, high = (packed & 15).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)  # (out, in / 2, 2) -> (out, in)


def dequantize(q, scale, bits, group=0):
    """The float weight a quantized one stands for."""
    if bits == 8:
        return q.float() * scale
    w = unpack_int4(q).float()
    return (w.reshape(len(w), -1, group) * scale[..., None]).reshape(len(w), -1)


class QuantLinear(nn.Module):
    """10.5 A Linear layer that keeps only its quantized weight (int8, or packed int4 with
    its group scales) and computes from it: dequantize, then the matmul in the input's dtype
    (the lesson; a fused int8 kernel would skip the float copy). `source` shares the
    quantized tensors of another layer (the tied embedding and LM head)."""

    def __init__(self, weight, bias, bits, group, source=None):
        super().__init__()
        self.bits, self.group = bits, group
        if source is None:
            q, scale = quantize_int8(weight) if bits == 8 else quantize_int4(weight, group)
        else:
            q, scale = source.qweight, source.scale
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def weight(self):
        return dequantize(self.qweight, self.scale, self.bits, self.group)

    def forward(self, x):
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantEmbedding(nn.Module):
    """The token embedding read from a QuantLinear's quantized table (the tied LM head's):
    only the rows looked up are dequantized."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, idx):
        t = self.table
        rows = t.qweight[idx]  # (B, T, C) int8 or (B, T, C / 2) packed
        if t.bits == 8:
            return rows.float() * t.scale[idx]
        w = unpack_int4(rows.reshape(-1, rows.size(-1))).float()  # (B*T, C)
        return (w.reshape(len(w), -1, t.group) * t.scale[idx].reshape(len(w), -1, 1)).reshape(*idx.shape, -1)


def quant_group(model, group):
    """The int4 group size: --quant_group if it divides every input width (else exit 2);
    0: 128, or the largest power of two below it that divides them all (a narrow model)."""
    widths = {m.in_features for m in model.modules() if isinstance(m, nn.Linear)}
    if group:
        bad = sorted(w for w in widths if w % group or group % 2)
        if bad:
            die(f"--quant_group {group} must be even and divide every input width ({', '.join(map(str, bad))} do not)")
        return group
    group = 128
    while group > 2 and any(w % group for w in widths):
        group //= 2
    return group


def quantize_model(model, bits, group):
    """A copy of the model with every Linear layer, and the tied embedding and LM head as
    one table, quantized to `bits` (8 or 4); norms stay float (a few hundred numbers)."""
    model = copy.deepcopy(model).float()
    head = QuantLinear(model.lm_head.weight.detach(), None, bits, group)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not model.lm_head:
                setattr(module, name, QuantLinear(child.weight.detach(), child.bias, bits, group))
    model.lm_head, model.wte = head, QuantEmbedding(head)
    return model


# ----------------------------------------------------------------------------------------
# 10.6 The KV cache in int8
# ----------------------------------------------------------------------------------------
class Int8KVCache(KVCache):
    """10.6 part03's cache (full attention), its keys and values stored in int8: each new
    key or value vector of a head gets one float16 scale (its absmax / 127), and the cache
    is dequantized when attended to. Per cached token and layer: 2 x kv_heads x (head_dim
    + 2) bytes, against bf16's 2 x kv_heads x head_dim x 2."""

    def __init__(self, n_layer, max_len, window=0, sink=0):
        if window:
            raise ValueError("the int8 KV cache is written for full attention (--window 0)")
        super().__init__(n_layer, max_len)
        self.k_scale, self.v_scale = [None] * n_layer, [None] * n_layer

    @staticmethod
    def quantize(x):
        scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127).clamp_min(1e-8)  # (B, H, T, 1)
        return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale.half()

    def update(self, layer, k, v, pos):
        if self.k[layer] is None:  # (B, Hkv, max_len, hd) int8 and (B, Hkv, max_len, 1) float16
            B, H, _, D = k.shape
            self.k[layer] = torch.empty(B, H, self.max_len, D, dtype=torch.int8, device=k.device)
            self.v[layer] = torch.empty_like(self.k[layer])
            self.k_scale[layer] = torch.empty(B, H, self.max_len, 1, dtype=torch.float16, device=k.device)
            self.v_scale[layer] = torch.empty_like(self.k_scale[layer])
        end = self.seen + k.size(2)
        self.k[layer][:, :, self.seen:end], self.k_scale[layer][:, :, self.seen:end] = self.quantize(k)
        self.v[layer][:, :, self.seen:end], self.v_scale[layer][:, :, self.seen:end] = self.quantize(v)
        keys = (self.k[layer][:, :, :end].float() * self.k_scale[layer][:, :, :end].float()).to(k.dtype)
        values = (self.v[layer][:, :, :end].float() * self.v_scale[layer][:, :, :end].float()).to(v.dtype)
        return keys, values, torch.arange(end, device=k.device)


def kv_bytes_per_token(cfg, kind):
    """Bytes the cache holds per token, over every layer: keys and values of kv_heads heads."""
    heads, head_dim = cfg.n_kv_head or cfg.n_head, cfg.n_embd // cfg.n_head
    per_vector = {"float32": 4 * head_dim, "bfloat16": 2 * head_dim, "int8": head_dim + 2}[kind]
    return 2 * cfg.n_layer * heads * per_vector


@torch.no_grad()
def cached_loss(model, data, cfg, cache_cls, chunk=16, windows=8):
    """Validation loss (nats per token) computed through a KV cache: each window of
    block_size tokens goes in chunks of `chunk`, every chunk attending to the keys and values
    cached before it, so a lossy cache shows in the loss."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    x, y = get_batch(data, windows, cfg.block_size, "cpu", gen)
    cache, losses = cache_cls(cfg.n_layer, cfg.block_size), []
    for start in range(0, cfg.block_size, chunk):
        logits = model(x[:, start:start + chunk], cache=cache)[0]
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y[:, start:start + chunk].flatten()))
    return float(torch.stack(losses).mean())


# ----------------------------------------------------------------------------------------
# 10.7 Compression: low-rank factors, and a smaller student distilled from the model
# ----------------------------------------------------------------------------------------
class LowRankLinear(nn.Module):
    """10.7 W (out, in) ~ U_r S_r V_r^T by truncated SVD: two smaller layers, in -> r -> out,
    r (in + out) weights instead of in x out. At full rank it is W again (to rounding)."""

    def __init__(self, linear, rank):
        super().__init__()
        U, S, Vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        self.down = nn.Linear(linear.in_features, rank, bias=False)
        self.up = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        root = S[:rank].sqrt()  # the singular values split between the two factors
        self.down.weight.data = (root[:, None] * Vh[:rank]).float()
        self.up.weight.data = (U[:, :rank] * root).float()
        if linear.bias is not None:
            self.up.bias.data = linear.bias.detach().clone()

    def forward(self, x):
        return self.up(self.down(x))


def svd_rank(weight, energy=0.0, rank=0):
    """The rank that keeps `energy` of the squared singular values (or `rank` itself);
    a rank <= 0 or above min(out, in) is a ValueError."""
    limit = min(weight.shape)
    if rank:
        if not 0 < rank <= limit:
            raise ValueError(f"rank {rank} of a {tuple(weight.shape)} matrix must be in 1..{limit}")
        return rank
    s2 = torch.linalg.svdvals(weight.detach().double()) ** 2
    return int((s2.cumsum(0) / s2.sum() < energy).sum()) + 1


def factorize_model(model, energy=0.0, rank=0):
    """A copy of the model with every block's projection matrices (attention and MLP)
    replaced by their truncated SVD; the embedding and its tied head stay whole."""
    model = copy.deepcopy(model)
    for block in model.h:
        for module in list(block.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, LowRankLinear(child, svd_rank(child.weight, energy, rank)))
    return model


def distillation_loss(student_logits, teacher_logits, temperature):
    """10.7 Hinton et al.'s knowledge distillation: KL(teacher || student) between the two
    distributions softened by the temperature, times T^2 (so that the gradient keeps its
    size as T grows); zero when the student's logits are the teacher's."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean") * temperature ** 2


class Distilled(nn.Module):
    """A student that learns from its teacher as train() trains any model: forward(idx,
    targets) -> (logits, loss), the loss alpha x distillation_loss + (1 - alpha) x the
    cross-entropy on the text itself (Hinton et al.'s weighted sum: the teacher's soft
    targets say which wrong tokens are nearly right, the text keeps the student honest
    where the teacher is wrong). The frozen teacher is kept out of the student's parameters
    and checkpoints."""

    def __init__(self, student, teacher, temperature, alpha=0.5):
        super().__init__()
        self.student, self.temperature, self.alpha = student, temperature, alpha
        self.teacher = [teacher.eval().requires_grad_(False)]

    num_params, moe_layers, active_params = GPT.num_params, GPT.moe_layers, GPT.active_params
    router_loss, router_figures = GPT.router_loss, GPT.router_figures

    @property
    def cfg(self):
        return self.student.cfg

    def flops_per_token(self):
        return self.student.flops_per_token() + self.teacher[0].flops_per_token() / 3  # + the teacher's forward

    def forward(self, idx, targets=None):
        logits = self.student(idx)[0]
        if targets is None:
            return logits, None
        with torch.no_grad():
            teacher = self.teacher[0](idx)[0]
        V = self.student.cfg.vocab_size
        soft = distillation_loss(logits[..., :V], teacher[..., :V], self.temperature)
        hard = F.cross_entropy(logits[..., :V].float().flatten(0, 1), targets.flatten())
        return logits, self.alpha * soft + (1 - self.alpha) * hard


# ----------------------------------------------------------------------------------------
# 10 The lessons: each trains its models in run folders of its own and returns its figures
# ----------------------------------------------------------------------------------------
LESSON_RUNS = {"boundless": ("tokens-bpe", "tokens-boundless"), "patches": ("entropy", "latent", "tokens-bpe"),
               "lcm": (), "poincare": (), "quant": ("tokens-bpe", "student", "scratch")}
LESSON_FILES = {"boundless": (), "patches": ("patches.txt", "patches.png"), "lcm": ("lcm.pt",),  # in --out_dir
                "poincare": ("poincare.pt", "poincare.png"), "quant": ("int8.pt", "int4.pt")}


def lesson_run(cfg, name, **changes):
    """The config of one model a lesson trains, in its own run folder under --out_dir."""
    return dataclasses.replace(cfg, out_dir=os.path.join(cfg.out_dir, name), **changes)


def held_out_text(text):
    """The split the tokenizers never see: the last 10% (they train on the first 90%)."""
    if not text.strip():
        die("--data: the text is empty or only whitespace: nothing to train a tokenizer on")
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


def token_model(cfg, text, kind, device, dtype, trained):
    """10.1 A tokenizer of `kind` (bpe or boundless) trained on the training text, and the
    model of the run's flags pretrained on its tokens for --max_seconds; its figures, kept in
    `trained` so that a later lesson of the same process reuses them."""
    if kind in trained:
        return trained[kind]
    train_text, val_text = held_out_text(text)
    run = lesson_run(cfg, f"tokens-{kind}", tokenizer=kind)  # its folder was claimed by main()
    cls = BoundlessBPETokenizer if kind == "boundless" else BPETokenizer
    with Timer() as t:
        tokenizer = cls.train(train_text, cfg.vocab_size, ("<|endoftext|>", *CHAT_TOKENS))
    path = os.path.join(run.out_dir, "tokenizer.json")
    tokenizer.save(path)
    ids = tokenizer.encode(val_text)
    print(f"{kind}: {tokenizer.vocab_size} tokens trained in {t.seconds:.1f} s"
          + (f", {len(tokenizer.supermerges)} of them superwords" if kind == "boundless" else ""))
    run, _, model, pretrained = pretrain(dataclasses.replace(run, tokenizer_file=path), device, dtype, 0, 1,
                                         time.perf_counter())
    trained[kind] = {"bytes_per_token": len(val_text.encode("utf-8")) / len(ids),
                     "renyi_efficiency": renyi_efficiency(ids, tokenizer.vocab_size, 2.5),
                     "shannon_efficiency": renyi_efficiency(ids, tokenizer.vocab_size, 1.0),
                     "train_s": t.seconds, "val_bpb": pretrained["val_bpb"], "steps": pretrained["steps"],
                     "vocab_size": tokenizer.vocab_size, "flops_per_byte": model.flops_per_token()
                     / pretrained["bytes_per_token"], "params": model.num_params(),
                     "superwords": len(getattr(tokenizer, "supermerges", ()))}
    return trained[kind]


def boundless_lesson(cfg, text, device, dtype, trained):
    """10.1 BPE against BoundlessBPE at one vocabulary size, on the held-out text: bytes per
    token, Renyi efficiency (alpha 2.5), training time, and the val bpb of the same model
    trained on each tokenization for the same time."""
    figures = {kind: token_model(cfg, text, kind, device, dtype, trained) for kind in ("bpe", "boundless")}
    print(f"10.1 at {cfg.vocab_size} tokens   bytes/token   Renyi eff.   train s   val bpb ({cfg.max_seconds:g} s)")
    for kind, f in figures.items():
        print(f"  {kind:<24} {f['bytes_per_token']:11.3f} {f['renyi_efficiency']:12.4f} {f['train_s']:9.1f} "
              f"{f['val_bpb']:9.3f}")
    return figures


def patches_lesson(cfg, text, device, dtype, trained):
    """10.2 A small byte model's next-byte entropy cuts the text into patches: their lengths
    next to BPE's bytes per token, one passage drawn; then the byte-latent model on those
    patches against the BPE model, same training time: val bpb and training FLOPs per byte.
    The byte models see as many bytes at once as the BPE model's block_size tokens hold."""
    bpe = token_model(cfg, text, "bpe", device, dtype, trained)
    block = round(cfg.block_size * bpe["bytes_per_token"])
    run = lesson_run(cfg, "entropy", tokenizer="byte", n_layer=cfg.entropy_layers, n_embd=cfg.entropy_embd,
                     block_size=block)
    run, tokenizer, entropy_model, small = pretrain(run, device, dtype, 0, 1, time.perf_counter())
    data, _ = load_tokens(run, tokenizer, (text, cfg.data))
    train_data, val_data = split_data(data)
    entropy, starts = text_patches(entropy_model, val_data, cfg.patch_threshold, cfg.patch_rise, block)
    lengths = np.diff(np.flatnonzero(starts), append=len(starts))
    histogram = {(str(n) if n < 16 else "16+"): int(c) for n, c in enumerate(np.bincount(np.minimum(lengths, 16)))
                 if n and c}  # patches of each length, in bytes
    head = bytes(np.asarray(val_data[:4 * block], dtype=np.uint8))  # the passage: a paragraph's first 160 bytes
    first = head.find(b"\n\n") + 2 if b"\n\n" in head[:block] else 0
    passage = head[first:first + min(block, 160)].decode("utf-8", errors="replace")
    if passage.isascii():  # one character per byte: the picture's x axis
        print(show_patches(os.path.join(cfg.out_dir, "patches"), passage, entropy[first:first + len(passage)],
                           starts[first:first + len(passage)], cfg.patch_threshold))
    latent_run = lesson_run(cfg, "latent", tokenizer="byte", vocab_size=run.vocab_size, block_size=block,
                            compile="false")  # the patch count changes every batch: compiled code would recompile
    model = ByteLatent(latent_run, entropy_model, cfg.patch_threshold, cfg.patch_rise).to(device)
    print(f"byte-latent model: {model.num_params():,} parameters (+ {entropy_model.num_params():,} in the "
          f"entropy model); patches at entropy > {cfg.patch_threshold:g} nats")
    result = train(model, train_data, val_data, latent_run, device, dtype, 1.0, None, {"tokenizer": tokenizer.name})
    if result["interrupted"]:
        sys.exit(130)
    model.patch_len = float(lengths.mean())
    figures = {"threshold": cfg.patch_threshold, "rise": cfg.patch_rise, "mean_patch_length": float(lengths.mean()),
               "patch_length_histogram": histogram, "bpe_bytes_per_token": bpe["bytes_per_token"],
               "entropy_model": {"val_bpb": small["val_bpb"], "params": entropy_model.num_params()},
               "latent": {"val_bpb": bits_per_byte(result["val_loss"], 1.0), "steps": result["steps"],
                          "flops_per_byte": model.flops_per_token(), "params": model.num_params()},
               "tokens": {k: bpe[k] for k in ("val_bpb", "steps", "flops_per_byte", "params")}}
    print(f"10.2 patches: {figures['mean_patch_length']:.2f} bytes on average at threshold {cfg.patch_threshold:g} "
          f"(BPE: {bpe['bytes_per_token']:.2f} bytes per token); lengths " +
          ", ".join(f"{n}: {c}" for n, c in histogram.items()))
    for name in ("latent", "tokens"):
        f = figures[name]
        print(f"  {name:<8} val bpb {f['val_bpb']:.3f} after {f['steps']} steps ({cfg.max_seconds:g} s), "
              f"{f['flops_per_byte'] / 1e6:.2f} MFLOPs per byte, {f['params']:,} parameters")
    return figures


def lcm_lesson(cfg, text, device, dtype, trained):
    """10.3 Sentences of --data (a paragraph is a document) into concepts by a sentence
    autoencoder trained here; its held-out reconstruction; then a Base-LCM trained on the
    training documents' concept sequences: next-concept cosine against the baselines, the
    rank of the true next sentence, and a continuation decoded sentence by sentence."""
    docs = [d for d in documents_of(text, cfg.sentence_len) if len(d) > 2]
    if len(docs) < 10:
        die(f"--data: {len(docs)} paragraphs of two or more sentences; the LCM lesson needs at least 10")
    cut = max(1, int(0.9 * len(docs)))
    train_docs, val_docs = docs[:cut], docs[cut:]
    train_sentences = [s for d in train_docs for s in d]
    print(f"10.3 {len(docs):,} documents ({len(train_docs):,} train, {len(val_docs):,} held out), "
          f"{len(train_sentences):,} training sentences of at most {cfg.sentence_len} bytes")
    autoencoder = SentenceAutoencoder(cfg).to(device)
    fitted = fit(autoencoder, lambda gen: sentence_batch(
        [train_sentences[i] for i in torch.randint(len(train_sentences), (cfg.sentence_batch,), generator=gen)],
        device), dataclasses.replace(cfg, max_steps=cfg.autoencoder_steps, max_seconds=cfg.autoencoder_seconds),
        device, dtype, "autoencoder")
    probe = [s for d in val_docs for s in d[:-1]][:200]  # held-out sentences (not the end marker)
    with autocast_ctx(device, dtype):
        decoded = autoencoder.decode(embed_sentences(autoencoder, probe, device).to(device), cfg.sentence_len)
    exact = float(np.mean([a == b for a, b in zip(decoded, probe)]))
    chars = float(np.mean([sum(x == y for x, y in zip(a, b)) / max(len(a), len(b)) for a, b in zip(decoded, probe)]))
    print(f"  held-out reconstruction: {exact:.1%} of {len(probe)} sentences exact, {chars:.1%} of the characters")
    for a, b in list(zip(probe, decoded))[:3]:
        print(f"    {a!r} -> {b!r}")

    concepts = embed_sentences(autoencoder, train_sentences, device).cpu()
    sequences = list(concepts.split([len(d) for d in train_docs]))
    held_out = list(embed_sentences(autoencoder, [s for d in val_docs for s in d], device).cpu()
                    .split([len(d) for d in val_docs]))
    end = embed_sentences(autoencoder, [END_OF_TEXT], device)[0].cpu()
    lcm = BaseLCM(cfg).to(device)
    lcm_fit = fit(lcm, lambda gen: concept_windows(sequences, cfg, device, gen), cfg, device, dtype, "Base-LCM")
    save_checkpoint(os.path.join(cfg.out_dir, "lcm.pt"), {"autoencoder": autoencoder.state_dict(),
                                                          "lcm": lcm.state_dict(), "config": dataclasses.asdict(cfg)})
    lcm = lcm.float().cpu()  # evaluation and generation on the CPU: one document at a time
    pool = torch.cat([s[:-1] for s in held_out])
    figures = next_concept_figures(lcm, held_out, concepts.mean(0), pool, torch.Generator().manual_seed(cfg.seed))
    print(f"  next concept on held-out documents: cosine {figures['cosine']:.3f} (the last one again "
          f"{figures['cosine_repeat_last']:.3f}, the mean concept {figures['cosine_mean']:.3f}); the true next "
          f"sentence ranks {figures['rank_of_next']:.1f} of {figures['candidates']} on average (50.5 by chance)")
    prompt_doc = next((d for d in val_docs if len(d) >= 5), val_docs[0])
    i = val_docs.index(prompt_doc)
    generated = continue_document(lcm, autoencoder.float().cpu(), held_out[i][:2], end, cfg)
    print("  a continuation, decoded sentence by sentence:\n" + "\n".join(
        [f"    > {s}" for s in prompt_doc[:2]] + [f"    + {s}" for s in generated]))
    return {**figures, "reconstruction_exact": exact, "reconstruction_chars": chars,
            "autoencoder": fitted, "lcm": lcm_fit, "documents": len(docs), "continuation": generated}


def poincare_lesson(cfg, text, device, dtype, trained):
    """10.4 A hierarchy embedded in the Poincare ball and, for comparison, in Euclidean space
    of the same dimension, trained on the same pairs with the same loss: reconstruction mean
    rank and MAP at each dimension; the 2-D disk drawn (poincare.png)."""
    where = cfg.hierarchy or "the standard library's package tree"
    names, pairs = index_hierarchy(read_hierarchy(cfg.hierarchy) if cfg.hierarchy else stdlib_hierarchy(), where)
    dims = [cfg.dim] if cfg.dim else [2, 5, 10]
    print(f"10.4 {where}: {len(names):,} nodes, {len(pairs):,} closure pairs; {cfg.poincare_epochs} epochs "
          f"({cfg.burn_in} burn-in), {cfg.negatives} negatives, lr {cfg.poincare_lr:g}")
    figures = {"poincare": {}, "euclidean": {}, "nodes": len(names), "pairs": len(pairs)}
    embeddings = {}  # "poincare-5" -> (nodes, 5), saved with the names in poincare.pt
    with Timer() as t:
        for dim in dims:
            for geometry, distance in (("poincare", poincare_distance), ("euclidean", euclidean_distance)):
                set_seed(cfg.seed)
                weight = train_embedding(len(names), pairs, dim, cfg, geometry)
                mean_rank, map_ = reconstruction(weight, pairs, distance)
                figures[geometry][str(dim)] = {"mean_rank": mean_rank, "map": map_}
                embeddings[f"{geometry}-{dim}"] = weight
                print(f"  {geometry:<9} dim {dim:>2}: mean rank {mean_rank:8.2f}  MAP {map_:.3f}")
                if geometry == "poincare" and dim == 2:
                    plot_disk(os.path.join(cfg.out_dir, "poincare.png"), weight, names, pairs)
    figures["wall_s"] = t.seconds
    save_checkpoint(os.path.join(cfg.out_dir, "poincare.pt"), {"names": names, **embeddings})
    return figures


def saved_bytes(state):
    """The size of a state dict as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


@torch.no_grad()
def decode_figures(model, prompts, reference, new_tokens, dtype=torch.float32):
    """(tokens/s of cached greedy decoding, the fraction of its tokens equal to the reference's)."""
    with autocast_ctx("cpu", dtype), Timer() as t:
        out = generate(model, prompts, new_tokens, temperature=0)
    P = prompts.size(1)
    return len(prompts) * new_tokens / t.seconds, float((out[:, P:] == reference[:, P:]).float().mean())


def quant_lesson(cfg, text, device, dtype, trained):
    """10.5-10.7 The BPE model of 10.1 made smaller, each way measured on the CPU against the
    float32 model: size on disk, val bpb, tokens/s of cached greedy decoding, and agreement
    (the fraction of greedy tokens equal to the float model's on held-out prompts); the KV
    cache in int8; a student distilled from the model against the same student from scratch."""
    token_model(cfg, text, "bpe", device, dtype, trained)  # trained now unless this run has
    run = lesson_run(cfg, "tokens-bpe", tokenizer="bpe", tokenizer_file=os.path.join(
        cfg.out_dir, "tokens-bpe", "tokenizer.json"), device="cpu", dtype="float32", compile="false")
    tokenizer = build_tokenizer(run)
    run = dataclasses.replace(run, vocab_size=tokenizer.vocab_size)
    model = GPT(run)
    model.load_state_dict(load_checkpoint(os.path.join(run.out_dir, "best.pt"), run, "cpu")["model"])
    model.eval()
    data, _ = load_tokens(run, tokenizer, (text, cfg.data))
    train_data, val_data = split_data(data)
    bytes_per_token = len(tokenizer.decode(val_data.tolist()).encode("utf-8")) / len(val_data)
    group = quant_group(model, cfg.quant_group)
    starts = np.linspace(0, len(val_data) - 17, 8).astype(int)  # 8 held-out prompts of 16 tokens
    prompts = torch.from_numpy(np.stack([val_data[s:s + 16] for s in starts]).astype(np.int64))
    reference = generate(model, prompts, cfg.decode_tokens, temperature=0)

    def row(m, state, autocast=torch.float32):
        loss = estimate_loss(m, {"val": val_data}, run, "cpu", autocast)["val"]
        tokens_per_s, agreement = decode_figures(m, prompts, reference, cfg.decode_tokens, autocast)
        return {"bytes": saved_bytes(state), "val_bpb": bits_per_byte(loss, bytes_per_token),
                "tokens_per_s": tokens_per_s, "agreement": agreement}

    rows = {"float32": row(model, model.state_dict()),
            "bfloat16": row(model, copy.deepcopy(model).to(torch.bfloat16).state_dict(), torch.bfloat16)}  # (tied: one table)
    for bits in (8, 4):
        q = quantize_model(model, bits, group)
        rows[f"int{bits}"] = row(q, q.state_dict())
        save_checkpoint(os.path.join(cfg.out_dir, f"int{bits}.pt"), {"model": q.state_dict(), "config": dataclasses.asdict(
            run), "quant": {"bits": bits, "group": group}})  # quantize_model(GPT(config), bits, group) loads it
    with warnings.catch_warnings():  # torch.ao.quantization says it is deprecated; it is the reference
        warnings.simplefilter("ignore")
        import torch.ao.quantization as ao_quantization
        reference_int8 = ao_quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, torch.qint8)
        rows["torch_int8"] = row(reference_int8, reference_int8.state_dict())
    try:
        low_rank = factorize_model(model, cfg.svd_energy, cfg.svd_rank)
    except ValueError as e:
        die(f"--svd_rank: {e}")
    rows["svd"] = row(low_rank, low_rank.state_dict())

    # a student half as deep and wide, distilled for --max_steps against the same from scratch
    student_cfg = dataclasses.replace(run, out_dir=cfg.out_dir, n_layer=cfg.student_layers, n_embd=cfg.student_embd,
                                      max_seconds=0)
    students = {}
    for name in ("student", "scratch"):
        torch.manual_seed(cfg.seed)
        student = GPT(lesson_run(student_cfg, name))
        learner = Distilled(student, model, cfg.distill_temperature, cfg.distill_alpha) if name == "student" else student
        result = train(learner, train_data, val_data, lesson_run(student_cfg, name), "cpu", torch.float32,
                       bytes_per_token, None, {"tokenizer": tokenizer.name})
        if result["interrupted"]:
            sys.exit(130)
        students[name] = student.eval()
    for name, student in students.items():
        rows[name] = row(student, student.state_dict())
    rows["student"]["params"], rows["svd"]["params"] = students["student"].num_params(), low_rank.num_params()

    kv = {"float32": {"bytes_per_token": kv_bytes_per_token(run, "float32"),
                      "val_bpb": bits_per_byte(cached_loss(model, val_data, run, KVCache), bytes_per_token)},
          "bfloat16": {"bytes_per_token": kv_bytes_per_token(run, "bfloat16")},
          "int8": {"bytes_per_token": kv_bytes_per_token(run, "int8"),
                   "val_bpb": bits_per_byte(cached_loss(model, val_data, run, Int8KVCache), bytes_per_token)}}
    base = rows["float32"]
    print(f"10.5-10.7 the BPE model ({model.num_params():,} parameters), on the CPU; int4 groups of {group}")
    print(f"  {'':<11} {'bytes':>10} {'size':>7} {'val bpb':>8} {'change':>8} {'tok/s':>8} {'agreement':>10}")
    for name, r in rows.items():
        print(f"  {name:<11} {r['bytes']:>10,} {r['bytes'] / base['bytes']:>6.1%} {r['val_bpb']:>8.4f} "
              f"{r['val_bpb'] - base['val_bpb']:>+8.4f} {r['tokens_per_s']:>8,.0f} {r['agreement']:>10.1%}")
    print(f"  KV cache per token: float32 {kv['float32']['bytes_per_token']:,} bytes, bf16 "
          f"{kv['bfloat16']['bytes_per_token']:,}, int8 {kv['int8']['bytes_per_token']:,}; cached val bpb "
          f"{kv['float32']['val_bpb']:.4f} (float32) against {kv['int8']['val_bpb']:.4f} (int8)")
    return {**rows, "kv_cache": kv, "int4_group": group, "svd_energy": cfg.svd_energy}


LESSONS = {"boundless": boundless_lesson, "patches": patches_lesson, "lcm": lcm_lesson, "poincare": poincare_lesson,
           "quant": quant_lesson}


# ----------------------------------------------------------------------------------------
# 4.6 Hugging Face interop: the Llama / Mixtral format
# ----------------------------------------------------------------------------------------
# With RoPE, RMSNorm, SwiGLU, grouped-query attention and a tied head this GPT *is* Llama:
# only the names and the layout of a few matrices differ. --export_hf writes the folder that
# transformers, vLLM and llama.cpp's converter read; --init_from reads such a folder back.
# The MoE is Mixtral's: a softmax router, top-k, the chosen gates renormalized.
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ROPE_BASE, RMS_EPS = 10000.0, 1e-6  # what rope_angles and RMSNorm use
HF_ARCHITECTURES = {  # the ones read, with what transformers assumes where config.json is silent
    "LlamaForCausalLM": {"model_type": "llama", "rope_theta": 1e4, "rms_norm_eps": 1e-6,
                         "num_key_value_heads": None, "sliding_window": None},
    "MistralForCausalLM": {"model_type": "mistral", "rope_theta": 1e4, "rms_norm_eps": 1e-6,
                           "num_key_value_heads": 8, "sliding_window": 4096},  # Llama + a sliding window
    "MixtralForCausalLM": {"model_type": "mixtral", "rope_theta": 1e6, "rms_norm_eps": 1e-5,
                           "num_key_value_heads": 8, "sliding_window": None},  # + an MoE in every block
}


def save_safetensors(path, tensors):
    """The safetensors format: 8 bytes (a little-endian u64) giving the header's length, the
    header (JSON: name -> dtype, shape and [begin, end) byte offsets into the data), then the
    tensors' raw little-endian bytes back to back. Reading it runs no code, unlike a pickle."""
    dtype_names = {t: name for name, t in SAFETENSORS_DTYPES.items()}
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # spaces: the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():  # memory order is the file's order on x86 and ARM (little-endian)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def load_safetensors(path):
    """Read a safetensors file, trusting nothing in it: the header's length, then each
    tensor's dtype, shape and offsets are checked against the file's size before anything is
    allocated or read, and the tensors must tile the data exactly, as the format requires."""
    def bad(msg):
        die(f"{path}: {msg}")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                bad(f"truncated: {size} bytes, less than the 8 that give the header's length")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8 or n > 100_000_000:
                bad(f"truncated or not safetensors: the header claims {n:,} bytes, {size - 8:,} follow")
            try:
                header = json.loads(f.read(n))
            except ValueError:  # UnicodeDecodeError too
                header = None
            if not isinstance(header, dict):
                bad("the header is not a JSON object")
            header.pop("__metadata__", None)
            entries, data_size = [], size - 8 - n
            for name, e in header.items():
                shape, offsets = (e.get("shape"), e.get("data_offsets")) if isinstance(e, dict) else (0, 0)
                if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                        and all(type(x) is int and x >= 0 for x in shape + offsets)):
                    bad(f"tensor {name}: a malformed header entry")
                dtype = SAFETENSORS_DTYPES.get(e["dtype"]) if isinstance(e.get("dtype"), str) else None
                if dtype is None:
                    bad(f"tensor {name} has dtype {e.get('dtype')}; this part reads {', '.join(SAFETENSORS_DTYPES)}")
                (begin, end), nbytes = offsets, math.prod(shape) * dtype.itemsize
                if end - begin != nbytes:
                    bad(f"tensor {name}: shape {shape} in {e['dtype']} takes {nbytes:,} bytes, "
                        f"its offsets [{begin}, {end}) say {end - begin:,}")
                entries.append((begin, end, name, dtype, shape))
            at = 0
            for begin, end, name, _, _ in sorted(entries):  # back to back: no gap, no overlap
                if begin != at or end > data_size:
                    bad(f"tensor {name} lies at bytes [{begin}, {end}) of {data_size:,} bytes of data "
                        f"(expected to start at {at}): truncated, or a header that lies")
                at = end
            if at != data_size:
                bad(f"{data_size - at:,} bytes after the last tensor: not the file the header describes")
            tensors = {}
            for begin, end, name, dtype, shape in sorted(entries):
                f.seek(8 + n + begin)
                buf = bytearray(f.read(end - begin))
                if len(buf) != end - begin:
                    bad("the file shrank while being read")
                flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                tensors[name] = flat.view(shape)
    except OSError as e:
        bad(f"cannot be read ({type(e).__name__}: {e})")
    return tensors


def bytes_to_unicode():
    """GPT-2's printable stand-in for each byte, which is how tokenizer.json writes byte-level
    tokens as text: printable Latin-1 bytes stand for themselves, the 68 others for U+0100 on."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def hf_tokenizer_json(tokenizer):
    """Our tokenizer in the `tokenizers` JSON format: a byte-level BPE whose ids 0-255 are the
    bytes, then one token per merge in rank order (merge i makes id 256 + i), then the special
    tokens; our split regex runs first. The byte tokenizer: the 256 bytes, nothing else."""
    b2u = bytes_to_unicode()
    text = {i: b2u[i] for i in range(256)}  # id -> its bytes, written as stand-in characters
    merges, special = [], getattr(tokenizer, "special", {})
    for (a, b), new in sorted(getattr(tokenizer, "merges", {}).items(), key=lambda kv: kv[1]):
        text[new] = text[a] + text[b]
        merges.append(f"{text[a]} {text[b]}")
    vocab = {t: i for i, t in text.items()}
    if len(vocab) != len(text):
        die("--export_hf: two merges of this tokenizer make the same bytes; tokenizer.json maps text to one id")
    steps = [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]
    if isinstance(tokenizer, BPETokenizer):
        split = {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False}
        steps.insert(0, split)
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for s, i in special.items()],
            "normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
            "post_processor": None, "decoder": steps[-1],  # the stand-ins back to bytes
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": merges}}


def tokenizer_from_hf(obj, where):
    """The inverse of hf_tokenizer_json: a tokenizer.json of that shape -> ByteTokenizer or
    BPETokenizer. Other shapes (GPT-2's, Llama's and SmolLM's vocabularies number their tokens
    in another order; some normalize, or add tokens) get one line saying what differs."""
    def bad(msg):
        die(f"{where}: {msg}, which this part's BPETokenizer cannot represent")

    try:
        model, vocab = obj["model"], obj["model"]["vocab"]
        pre = obj.get("pre_tokenizer") or {}
        *split, last = (pre.get("pretokenizers") or [{}]) if pre.get("type") == "Sequence" else [pre]
        options = ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback",
                   "ignore_merges")
        if model.get("type") != "BPE" or any(model.get(k) for k in options) or obj.get("normalizer") \
                or obj.get("post_processor"):
            bad("not a plain byte-level BPE (a normalizer, a post-processor, an unknown token or dropout)")
        b2u = bytes_to_unicode()
        if any(vocab.get(b2u[b]) != b for b in range(256)):
            bad("ids 0-255 are not the 256 bytes in order")
        one_regex = len(split) <= 1 and all(s.get("type") == "Split" and s.get("behavior") == "Isolated"
                                            and not s.get("invert") and "Regex" in s.get("pattern", {}) for s in split)
        if not (one_regex and last.get("type") == "ByteLevel" and last.get("add_prefix_space") is False
                and last.get("use_regex") is False):
            bad("its pre-tokenizer is not one split regex (Isolated) then a byte-level step without a regex")
        pairs = []
        for i, m in enumerate(model.get("merges") or []):
            a, b = m.split(" ") if isinstance(m, str) else m
            ids = vocab.get(a), vocab.get(b), vocab.get(a + b)
            if ids[2] != 256 + i or not all(isinstance(j, int) and j < 256 + i for j in ids[:2]):
                bad(f"merge {i} ({a} {b}) does not make id {256 + i} from earlier ids")
            pairs.append(ids[:2])
        if len(vocab) != 256 + len(pairs):
            bad(f"{len(vocab) - 256 - len(pairs)} tokens of its vocabulary come from no merge")
        added = sorted(obj.get("added_tokens") or [], key=lambda t: t["id"])
        flags = ("normalized", "lstrip", "rstrip", "single_word")
        if [t["id"] for t in added] != list(range(len(vocab), len(vocab) + len(added))) or not all(
                t.get("special") and not any(t.get(k) for k in flags) for t in added):
            bad("its added tokens are not special tokens numbered after the merges")
        special = [t["content"] for t in added]
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        die(f"{where} is not a tokenizers JSON file ({type(e).__name__}: {e})")
    if not split:
        if pairs:
            bad("merges without a split regex")
        return ByteTokenizer(special)
    return BPETokenizer(pairs, special, split[0]["pattern"]["Regex"])


def hf_tensors(model, rows=None):
    """Our parameters under Hugging Face's names, each a view in the layout of HF's Linear
    weights, (out, in): writing into a view writes into our parameter (load_hf does that).
    rows: the embedding rows (default: the tokenizer's vocabulary; the padding stays home)."""
    C, kv = model.cfg.n_embd, model.h[0].attn.kv_dim
    out = {"model.embed_tokens.weight": model.wte.weight[:rows or model.cfg.vocab_size]}  # lm_head: tied
    for i, block in enumerate(model.h):
        p = f"model.layers.{i}."
        q, k, v = block.attn.c_attn.weight.split([C, kv, kv])  # (C + 2*kv, C): the rows of q, then k, then v
        out.update({p + "input_layernorm.weight": block.ln_1.weight, p + "self_attn.q_proj.weight": q,
                    p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                    p + "self_attn.o_proj.weight": block.attn.c_proj.weight,
                    p + "post_attention_layernorm.weight": block.ln_2.weight, **hf_mlp_tensors(block.mlp, p)})
    out["model.norm.weight"] = model.ln_f.weight
    return out


def hf_mlp_tensors(mlp, p):
    if isinstance(mlp, MoE):  # Mixtral: w1 = gate, w3 = up, w2 = down; x @ w here is x @ W.T there
        h, out = mlp.w_out.size(1), {p + "block_sparse_moe.gate.weight": mlp.router.weight}  # (E, C)
        for e in range(mlp.n_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            out.update({q + "w1.weight": mlp.w_in[e, :, :h].T, q + "w3.weight": mlp.w_in[e, :, h:].T,
                        q + "w2.weight": mlp.w_out[e].T})  # (C, 2h) -> 2 x (h, C); (h, C) -> (C, h)
        return out
    gate, up = mlp.c_fc.weight.chunk(2)  # (2h, C) -> 2 x (h, C): c_fc's output is [gate | up]
    return {p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": mlp.c_proj.weight}


def hf_refusal(cfg):
    """What in this model the Llama format cannot express, in one line (None: nothing)."""
    if cfg.tokenizer == "boundless":
        return "--tokenizer boundless: a Hugging Face tokenizer.json cannot merge across pretokens"
    if cfg.pos != "rope":
        return f"--pos {cfg.pos}: Llama's positions are RoPE only"
    if cfg.norm != "rmsnorm":
        return f"--norm {cfg.norm}: Llama normalizes with RMSNorm"
    if cfg.mlp != "swiglu" and not (cfg.n_experts and cfg.moe_every == 1):  # (experts are SwiGLU)
        return f"--mlp {cfg.mlp}: Llama's MLP is SwiGLU"
    if cfg.bias:
        return "--bias: Llama's Linear layers and norms have no biases"
    if cfg.sink:
        return "--sink: Mistral's sliding window has no attention sink"
    if cfg.n_experts:  # Mixtral routes by softmax, top-k, the k gates renormalized; nothing else
        if cfg.moe_top_k == 1:
            return "--moe_top_k 1: Mixtral renormalizes the chosen gates, so one expert's gate would be 1, not p"
        if cfg.balance != "aux":
            return f"--balance {cfg.balance}: Mixtral's router chooses by probability alone"
        if cfg.capacity_factor > 0:
            return "--capacity_factor: Mixtral drops no assignment"
        if cfg.n_shared_experts:
            return "--n_shared_experts: Mixtral has no shared experts"
        if cfg.moe_every > 1:
            return "--moe_every: every Mixtral block is an MoE"
    return None


def hf_config(cfg, tokenizer):
    """config.json: LlamaForCausalLM, or MistralForCausalLM for a sliding window. The RoPE
    base and the RMSNorm epsilon are written out (the defaults differ between models), and
    so are bos/eos: <|endoftext|> for BPE, none for bytes (Llama's default, 1 and 2, would
    be two bytes). vocab_size is the tokenizer's: generation can never pick a padding id."""
    eos = getattr(tokenizer, "special", {}).get("<|endoftext|>")
    config = {"architectures": ["MistralForCausalLM" if cfg.window else "LlamaForCausalLM"],
              "model_type": "mistral" if cfg.window else "llama", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.n_embd, "intermediate_size": swiglu_hidden(cfg.n_embd),
              "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_key_value_heads": cfg.n_kv_head or cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head,
              "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": RMS_EPS,
              "rope_theta": ROPE_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_BASE},
              "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
              "tie_word_embeddings": True, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": None,
              "initializer_range": 0.02, "use_cache": True, "dtype": "float32"}
    if cfg.window:  # Mistral's mask: key j is seen from query i when i - window < j <= i, as ours
        config["sliding_window"] = cfg.window
    if cfg.n_experts:
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=expert_hidden(cfg),
                      num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.moe_top_k,
                      sliding_window=cfg.window or None, router_jitter_noise=0.0, output_router_logits=False,
                      router_aux_loss_coef=cfg.aux_loss_coef)
    return config


def export_hf(model, tokenizer, path):
    """4.6 --export_hf DIR: config.json, model.safetensors (float32), tokenizer.json,
    tokenizer_config.json and generation_config.json."""
    why = hf_refusal(model.cfg)
    if any(m.expert_offset.any() for m in model.moe_layers()):
        why = "the routers carry routing offsets (trained with --balance aux_free); Mixtral's have none"
    if why:
        die(f"--export_hf: {why}")
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        die(f"--export_hf {path}: the folder holds a sharded checkpoint's index; export into another folder")
    config, tok = hf_config(model.cfg, tokenizer), hf_tokenizer_json(tokenizer)
    eos = next((s for s, i in getattr(tokenizer, "special", {}).items() if i == config["eos_token_id"]), None)
    os.makedirs(path, exist_ok=True)
    tensors = hf_tensors(model)
    save_safetensors(os.path.join(path, "model.safetensors"), tensors)
    write_json(os.path.join(path, "config.json"), config)
    write_json(os.path.join(path, "tokenizer.json"), tok)
    write_json(os.path.join(path, "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.cfg.block_size,
                "bos_token": eos, "eos_token": eos, "clean_up_tokenization_spaces": False})
    write_json(os.path.join(path, "generation_config.json"),
               {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    print(f"exported {path}: {config['architectures'][0]}, {sum(t.numel() for t in tensors.values()):,}"
          f" float32 weights in model.safetensors, a {tokenizer.vocab_size}-token tokenizer.json")


def hf_read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        die(f"{path}: no such file (a Hugging Face model folder holds config.json, "
            "model.safetensors and tokenizer.json)")
    except (OSError, ValueError) as e:
        die(f"{path}: not a JSON file ({type(e).__name__}: {e})")
    if not isinstance(obj, dict):
        die(f"{path}: not a JSON object")
    return obj


def config_from_hf(config, cfg, where):
    """config.json -> (cfg with the folder's shape, which replaces the shape flags; the
    embedding's rows), or one line saying what in it this part cannot express."""
    def bad(msg):
        die(f"{where}: {msg}")

    def positive(key, default=None):
        v = config.get(key, default)
        if type(v) is not int or v < 1:
            bad(f"{key} {v!r}: expected a positive integer")
        return v

    arch = (config.get("architectures") or [None])[0]
    if arch not in HF_ARCHITECTURES:
        bad(f"architecture {arch!r}: this part reads {', '.join(HF_ARCHITECTURES)}")
    known = HF_ARCHITECTURES[arch]
    if config.get("model_type", known["model_type"]) != known["model_type"]:
        bad(f"model_type {config.get('model_type')!r} does not go with {arch}")
    C, H, L = positive("hidden_size"), positive("num_attention_heads"), positive("num_hidden_layers")
    kv = config.get("num_key_value_heads", known["num_key_value_heads"])
    kv = H if kv is None else positive("num_key_value_heads", kv)
    if C % H or H % kv or (C // H) % 2:
        bad(f"hidden_size {C}, {H} heads, {kv} key/value heads: heads must split C evenly, in even widths")
    if config.get("head_dim") not in (None, C // H):
        bad(f"head_dim {config['head_dim']}: this part's heads are hidden_size / num_attention_heads = {C // H}")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        bad(f"hidden_act {config['hidden_act']!r}: this part's SwiGLU gates with silu")
    if config.get("attention_bias") or config.get("mlp_bias"):
        bad("attention_bias / mlp_bias: this part's Linear layers have no biases")
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()) \
            or rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1) != 1:
        bad(f"RoPE {config.get('rope_scaling') or rope}: this part's RoPE rotates every feature, unscaled")
    theta = rope.get("rope_theta", config.get("rope_theta", known["rope_theta"]))
    if theta != ROPE_BASE:
        bad(f"rope_theta {theta}: this part's RoPE base is {ROPE_BASE:g}")
    eps = config.get("rms_norm_eps", known["rms_norm_eps"])
    if eps != RMS_EPS:
        bad(f"rms_norm_eps {eps}: this part's RMSNorm adds {RMS_EPS:g}")
    window = config.get("sliding_window", known["sliding_window"]) if known["model_type"] != "llama" else None
    if window is not None and (type(window) is not int or window < 1):
        bad(f"sliding_window {window!r}: expected a positive integer or null")
    shape = dict(n_layer=L, n_head=H, n_embd=C, n_kv_head=0 if kv == H else kv, pos="rope", norm="rmsnorm",
                 mlp="swiglu", bias=False, window=window or 0, sink=0)
    if known["model_type"] == "mixtral":
        E, k = positive("num_local_experts", 8), positive("num_experts_per_tok", 2)
        if not 2 <= k <= E:
            bad(f"num_experts_per_tok {k} of {E} experts: this part's top-{k} gates match Mixtral's for 2 <= k <= E")
        return dataclasses.replace(cfg, **shape, n_experts=E, moe_top_k=k, moe_every=1, n_shared_experts=0,
                                   expert_hidden=positive("intermediate_size")), positive("vocab_size")
    shape["n_experts"] = 0
    if positive("intermediate_size") != swiglu_hidden(C):
        bad(f"intermediate_size {config['intermediate_size']}: this part's SwiGLU is 8C/3 rounded to 64,"
            f" {swiglu_hidden(C)} for hidden_size {C}")
    return dataclasses.replace(cfg, **shape), positive("vocab_size")


def read_hf_weights(path):
    """Every tensor of a folder: model.safetensors, or the shards model.safetensors.index.json names."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            die(f"--init_from {path}: no model.safetensors or model.safetensors.index.json (reads safetensors only)")
        return load_safetensors(os.path.join(path, "model.safetensors"))
    weight_map = hf_read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and f == os.path.basename(f) for f in weight_map.values()):
        die(f"{index}: its weight_map must name shard files in the folder")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_safetensors(os.path.join(path, shard)))
    if set(tensors) != set(weight_map):
        die(f"{index}: the shards hold other tensors than its weight_map lists")
    return tensors


def load_hf(cfg):
    """4.6 --init_from DIR: a local Llama / Mistral folder -> (cfg with the folder's shape,
    its tokenizer, a GPT holding its weights). Every tensor is checked against the shapes
    config.json implies; the padding rows of the embedding start at zero. --block_size stays
    yours (RoPE has no position table). A training run keeps a BPE tokenizer as
    out_dir/tokenizer.json, where --sample_only and --resume look for it."""
    path = cfg.init_from
    if not os.path.isdir(path):
        die(f"--init_from {path}: no such folder")
    where, tok_path = os.path.join(path, "config.json"), os.path.join(path, "tokenizer.json")
    config = hf_read_json(where)
    shaped, rows = config_from_hf(config, cfg, where)
    tokenizer = tokenizer_from_hf(hf_read_json(tok_path), tok_path)
    if not tokenizer.vocab_size <= rows <= padded_vocab(tokenizer.vocab_size):
        die(f"{where}: vocab_size {rows} does not fit the {tokenizer.vocab_size} tokens of its tokenizer.json")
    cfg = dataclasses.replace(shaped, vocab_size=tokenizer.vocab_size,
                              tokenizer="byte" if isinstance(tokenizer, ByteTokenizer) else "bpe")
    tensors = read_hf_weights(path)
    embed = tensors.get("model.embed_tokens.weight")
    model = GPT(cfg)
    with torch.no_grad():
        model.wte.weight[rows:].zero_()
        for name, view in hf_tensors(model, rows).items():
            t = tensors.pop(name, None)
            if t is None:
                die(f"--init_from {path}: no tensor {name}, which config.json implies")
            if t.shape != view.shape:
                die(f"--init_from {path}: {name} is {tuple(t.shape)}; config.json implies {tuple(view.shape)}")
            view.copy_(t)
    head = tensors.pop("lm_head.weight", None)
    if not config.get("tie_word_embeddings", False) and (head is None or not torch.equal(head, embed)):
        die(f"--init_from {path}: an untied lm_head (tie_word_embeddings false); this part ties the head"
            " to the embedding")
    extra = sorted(n for n in tensors if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        die(f"--init_from {path}: {extra[0]} (and {len(extra) - 1} more) is no part of the model in config.json")
    if not cfg.sample_only and isinstance(tokenizer, BPETokenizer):
        saved = os.path.join(cfg.out_dir, "tokenizer.json")
        os.makedirs(cfg.out_dir, exist_ok=True)
        tokenizer.save(saved)
        cfg = dataclasses.replace(cfg, tokenizer_file=saved)
    flags = " ".join(f"--{k} {getattr(cfg, k)}" for k in SHAPE_FIELDS if k not in ("block_size", "vocab_size")
                     and getattr(cfg, k) != getattr(Config, k))
    print(f"init_from {path}: {config['architectures'][0]}, {model.num_params():,} parameters, tokenizer {tokenizer.name};"
          f" shape flags for later runs: {flags or 'none (the defaults)'}")
    return cfg, tokenizer, model


# ----------------------------------------------------------------------------------------
# main: train (or resume), checkpoint, print samples
# ----------------------------------------------------------------------------------------
def in_range(cfg, low, high, *names):
    """Each --name must lie in [low, high); high None: at least low."""
    for name in names:
        v = getattr(cfg, name)
        if v < low or (high is not None and v >= high):
            bound = f"at least {low}" if high is None else f"in [{low}, {high})"
            die(f"--{name} must be {bound}, got {v}")


def validate(cfg):
    """Ranges and the rules that tie flags together; choices and finite floats were checked
    while parsing."""
    if not 0 <= cfg.seed < 2**63:
        die(f"--seed must be in [0, 2**63), got {cfg.seed}")
    in_range(cfg, 1, None, "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size",
             "max_steps", "eval_interval", "eval_iters", "log_interval", "num_samples", "grad_accum",
             "ckpt_interval", "moe_every", "entropy_layers", "entropy_embd", "local_layers", "concept_layers",
             "sentence_batch", "autoencoder_steps", "poincare_epochs", "poincare_batch", "negatives",
             "decode_tokens", "student_layers", "student_embd")
    in_range(cfg, 0, None, "n_kv_head", "window", "sink", "max_seconds", "grad_clip", "weight_decay",
             "max_new_tokens", "temperature", "top_k", "warmup_steps", "min_lr", "n_experts",
             "expert_hidden", "n_shared_experts", "capacity_factor", "aux_loss_coef", "z_loss_coef",
             "balance_rate", "patch_rise", "burn_in", "autoencoder_seconds", "quant_group", "svd_rank")
    in_range(cfg, 2, None, "concept_dim")
    in_range(cfg, 3, None, "lcm_context")
    in_range(cfg, 8, None, "sentence_len")
    in_range(cfg, 0, 1, "dropout", "beta1", "beta2")
    if min(cfg.learning_rate, cfg.dist_timeout) <= 0:
        die("--learning_rate and --dist_timeout must be positive")
    if cfg.dim != 0 and cfg.dim < 2:
        die(f"--dim must be at least 2 (0: compare 2, 5 and 10), got {cfg.dim}")
    if not 0 < cfg.svd_energy <= 1:
        die(f"--svd_energy must be in (0, 1], got {cfg.svd_energy}")
    if not 0 <= cfg.distill_alpha <= 1:
        die(f"--distill_alpha must be in [0, 1], got {cfg.distill_alpha}")
    if cfg.distill_temperature <= 0:
        die(f"--distill_temperature must be positive, got {cfg.distill_temperature}")
    if cfg.only in ("all", "quant"):
        if cfg.student_embd % cfg.n_head or (cfg.student_embd // cfg.n_head) % 2:
            die(f"--student_embd {cfg.student_embd} must split into --n_head {cfg.n_head} heads of an even size")
        if cfg.quant_group and not cfg.n_embd % cfg.n_head:
            with torch.device("meta"):  # the input widths of the model's layers, without memory
                quant_group(GPT(cfg), cfg.quant_group)
    if cfg.poincare_lr <= 0:
        die(f"--poincare_lr must be positive, got {cfg.poincare_lr}")
    if cfg.hierarchy and not os.path.isfile(cfg.hierarchy):
        die(f"--hierarchy {cfg.hierarchy}: no such file")
    if cfg.patch_threshold <= 0:
        die(f"--patch_threshold must be positive (nats of next-byte entropy), got {cfg.patch_threshold}")
    if cfg.only in ("all", "patches", "lcm"):  # 10.2 the entropy model's heads, and the half-width layers
        if cfg.entropy_embd % cfg.n_head or (cfg.entropy_embd // cfg.n_head) % 2:
            die(f"--entropy_embd {cfg.entropy_embd} must split into --n_head {cfg.n_head} heads of an even size")
        if cfg.n_embd % (4 * cfg.n_head):
            die(f"--n_embd {cfg.n_embd} must be a multiple of 4 x --n_head {cfg.n_head}: the byte-latent model's "
                "local layers and the sentence autoencoder have n_head heads of an even size at half the width")
    if cfg.resume:
        die("--resume: part10's lessons train every model from the start (--overwrite runs a lesson again)")
    if not 0 < cfg.top_p <= 1:
        die(f"--top_p must be in (0, 1], got {cfg.top_p}")
    try:
        cfg.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8
        die("--prompt is not UTF-8 text")
    if cfg.n_embd % cfg.n_head:
        die(f"--n_embd {cfg.n_embd} must be divisible by --n_head {cfg.n_head}")
    if cfg.pos == "rope" and (cfg.n_embd // cfg.n_head) % 2:
        die(f"--pos rope needs an even head size, got {cfg.n_embd // cfg.n_head}")
    if cfg.pos == "sinusoidal" and cfg.n_embd % 2:
        die(f"--pos sinusoidal needs an even --n_embd, got {cfg.n_embd}")
    if cfg.n_kv_head and cfg.n_head % cfg.n_kv_head:
        die(f"--n_head {cfg.n_head} must be a multiple of --n_kv_head {cfg.n_kv_head}")
    if cfg.sink and not cfg.window:
        die("--sink needs a sliding window: set --window too")
    if cfg.min_lr > cfg.learning_rate:
        die(f"--min_lr {cfg.min_lr} must not exceed --learning_rate {cfg.learning_rate}")
    if not cfg.sample_only and cfg.vocab_size < 257 + len(CHAT_TOKENS):  # every lesson trains BPE
        die(f"--vocab_size {cfg.vocab_size}: BPE needs at least 256 bytes + {1 + len(CHAT_TOKENS)} special tokens")
    if cfg.tokenizer_file and not os.path.isfile(cfg.tokenizer_file):
        die(f"--tokenizer_file {cfg.tokenizer_file}: no such file")
    if cfg.n_experts and not 1 <= cfg.moe_top_k <= cfg.n_experts:
        die(f"--moe_top_k {cfg.moe_top_k} must be between 1 and --n_experts {cfg.n_experts}")
    if cfg.grouped_mm == "true" and not hasattr(F, "grouped_mm"):
        die(f"--grouped_mm true needs torch >= 2.10 (F.grouped_mm); this is {torch.__version__}")
    if cfg.export_hf and hf_refusal(cfg):  # before training, not after
        die(f"--export_hf: {hf_refusal(cfg)}")
    if not cfg.sample_only:  # the lessons choose their models' tokenizers and train them themselves
        for flag, given in (("--export_hf", cfg.export_hf), ("--tokenizer_file", cfg.tokenizer_file),
                            ("--tokenizer", cfg.tokenizer != "byte"), ("--init_from", cfg.init_from)):
            if given:
                die(f"{flag} goes with --sample_only in part10 (--out_dir out/part10/RUN): the lessons train "
                    "their own tokenizers and models")


RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "summary.json", "samples.txt", "loss.png", "tokenizer.json")
_run_locks = {}  # lock path -> the open lock file of this process's run there


def lock_folder(folder):
    """A second run in `folder` at the same time is refused: a lock that lasts while this
    process lives (part10: --out_dir's own, where the lessons' files and summary.json lie)."""
    writable_dir(folder, "--out_dir")
    path = os.path.join(folder, "run.lock")
    if path in _run_locks:  # an earlier main() of this process: that run is over
        _run_locks.pop(path).close()
    lock = open(path, "a+")
    if fcntl is not None:  # POSIX; elsewhere runs are not locked
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            die(f"--out_dir {folder} is in use by another run (process {holder}); "
                "wait for it to end or pick another --out_dir")
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _run_locks[path] = lock


def claim_run_folder(cfg):
    """A run folder holds one run. A second run in it at the same time is refused (a lock
    that lasts while this process lives), and so is a new run over an earlier one unless
    --overwrite says to start over: its files are then removed first."""
    lock_folder(cfg.out_dir)
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, f))]
    if found and not (cfg.overwrite or cfg.resume):
        die(f"--out_dir {cfg.out_dir} holds a run ({', '.join(found)}): pass --resume to "
            "continue it, --overwrite to start over, or pick another --out_dir")
    for f in found if cfg.overwrite else ():
        os.remove(os.path.join(cfg.out_dir, f))


def free_memory(device):
    """Bytes this device can still give, or None where unknown."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_fits(cfg, device):
    """Refuse a model that cannot fit, before allocating it: weights, gradients and AdamW's
    two moments (16 bytes a parameter), plus one step's activations as part00 estimates
    them, against the memory the device has free. The parameters are counted on the meta
    device (shapes, no storage), from a few blocks when there are many."""
    with torch.device("meta"):
        small = GPT(dataclasses.replace(cfg, n_layer=min(cfg.n_layer, 4)))
    per_block = sum(p.numel() for b in small.h for p in b.parameters()) / len(small.h)
    n = small.num_params() + (cfg.n_layer - len(small.h)) * per_block
    L, C, T, B, V = cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.vocab_size
    activations = L * B * T * C * 34 * 4 + B * T * V * 8  # float32; logits and their gradient
    need, free = 16 * n + activations, free_memory(device)
    if free is not None and need > free:
        die(f"this model needs about {need / 1e9:,.1f} GB ({n / 1e6:,.1f}M parameters, batch "
            f"{B} x {T}) and {device} has {free / 1e9:,.1f} GB free: shrink --n_layer, --n_embd, "
            "--block_size or --batch_size")


def pretrain(cfg, device, dtype, rank, world, t0):
    """Pretrain the base model (parts 02-05's run): returns (cfg, tokenizer, the best model,
    its figures); under torchrun the other ranks get no model."""
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    writable_dir(cfg.data_dir, "--data_dir")
    check_fits(cfg, device)
    text, name = load_text(cfg)
    tokenizer = build_tokenizer(cfg, text)
    cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    data, name = load_tokens(cfg, tokenizer, (text, name))
    train_data, val_data = split_data(data)
    # bits per byte need the bytes a token stands for, measured on the validation text
    bytes_per_token = len(tokenizer.decode(val_data.tolist()).encode("utf-8")) / len(val_data)
    resume = load_checkpoint(ckpt_path, cfg, device, resume=True) if cfg.resume else None
    if resume is not None and resume["step"] >= cfg.max_steps:
        die(f"{ckpt_path} is at step {resume['step']}: nothing to resume with --max_steps "
            f"{cfg.max_steps} (raise it to train on)")
    model = GPT(cfg).to(device)
    if resume is not None:
        model.load_state_dict(resume["model"])
    if rank == 0:
        print(f"data: {name}, {len(data):,} tokens ({len(train_data):,} train, {len(val_data):,} val),"
              f" {bytes_per_token:.2f} bytes per token ({tokenizer.name})")
        print(f"model: {model.num_params():,} parameters ({model.active_params():,} active per token); device {device} x {world}, "
              f"{str(dtype).replace('torch.', '')}; effective batch {cfg.batch_size} x {cfg.block_size}"
              f" x {cfg.grad_accum} = {cfg.batch_size * cfg.block_size * cfg.grad_accum:,} tokens per step")
        if resume is not None:
            print(f"resuming {ckpt_path} at step {resume['step']}")
    try:
        result = train(model, train_data, val_data, cfg, device, dtype, bytes_per_token, resume,
                       {"tokenizer": tokenizer.name})
    except RuntimeError as e:  # torchrun: a process died or froze, and a collective gave up
        if world == 1 or "Timed out" not in str(e):
            raise
        print(f"error: rank {rank}: another process did not answer for --dist_timeout "
              f"{cfg.dist_timeout:g} s; stopping", file=sys.stderr)
        sys.exit(1)
    if world > 1:
        dist.destroy_process_group()
        gc.collect()  # free DDP and the process group now, not while Python shuts down
    if result["interrupted"]:  # Ctrl-C: saved; the shell sees the usual status of an interrupt
        sys.exit(130)
    if rank != 0:
        return cfg, tokenizer, None, None

    model.load_state_dict(load_checkpoint(best_path, cfg, device)["model"])  # the best model
    for text in sample(model, tokenizer, cfg, device):
        print(text + "\n" + "-" * 80)
    plot_losses(cfg.out_dir)

    summary = {"val_loss": result["val_loss"], "val_bpb": bits_per_byte(result["val_loss"], bytes_per_token),
               "train_loss": result["train_loss"], "final_val_loss": result["final_val_loss"],
               "tokens_per_s": result["tokens_per_s"], "wall_s": time.perf_counter() - t0,
               "steps": result["steps"], "data": name, "params": model.num_params(),
               "device": device, "world_size": world, "mfu": result["mfu"],
               "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
               "bytes_per_token": bytes_per_token}
    print(f"val loss {summary['val_loss']:.4f} nats/token = {summary['val_bpb']:.3f} bpb after "
          f"{summary['steps']} steps, {summary['tokens_per_s']:,.0f} tok/s, {summary['wall_s']:.0f} s")
    return cfg, tokenizer, model, summary


def main(argv=None):
    cfg = parse_args(argv)
    validate(cfg)
    rank, world, ddp_device = setup_distributed(cfg.dist_timeout)
    if world > 1:
        die("part10's lessons run in one process: start it with python, not torchrun")
    set_seed(cfg.seed)
    device = ddp_device or pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if device.startswith("cuda"):  # float32 matmuls on tensor cores (TF32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    t0 = time.perf_counter()

    if cfg.sample_only:  # a model a lesson trained (--out_dir out/part10/tokens-boundless --tokenizer boundless)
        if cfg.init_from:  # 4.6 or a Hugging Face folder
            cfg, tokenizer, model = load_hf(cfg)
            model = model.to(device)
        else:
            tokenizer = build_tokenizer(cfg)
            cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
            path = best_path if os.path.exists(best_path) else ckpt_path
            ckpt = load_checkpoint(path, cfg, device)
            model = GPT(cfg).to(device)
            model.load_state_dict(ckpt["model"])
            print(f"loaded {path} (step {ckpt['step']}, val loss {ckpt['val_loss']:.4f})")
        if cfg.export_hf:
            export_hf(model, tokenizer, cfg.export_hf)
        for text in sample(model, tokenizer, cfg, device):
            print(text + "\n" + "-" * 80)
        return None

    lessons = list(LESSONS) if cfg.only == "all" else [cfg.only]
    lock_folder(cfg.out_dir)  # two part10 runs in one --out_dir would overwrite each other's summary.json
    found = [f for name in lessons for f in LESSON_FILES[name] if os.path.exists(os.path.join(cfg.out_dir, f))]
    if found and not cfg.overwrite:  # before any work: a finished lesson is not run over by accident
        die(f"--out_dir {cfg.out_dir} holds the results of an earlier run ({', '.join(found)}): pass --overwrite "
            "to run these lessons again, or pick another --out_dir")
    for run in dict.fromkeys(r for name in lessons for r in LESSON_RUNS[name]):
        claim_run_folder(lesson_run(cfg, run))
    for f in found:
        os.remove(os.path.join(cfg.out_dir, f))
    writable_dir(cfg.data_dir, "--data_dir")
    text, data_name = load_text(cfg)
    path = os.path.join(cfg.out_dir, "summary.json")
    try:  # the figures of lessons this run leaves out stay
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        summary = {}
    trained = {}  # token models trained so far, which a later lesson may reuse
    for name in lessons:
        print(f"\n=== lesson {name} ===")
        start = time.perf_counter()
        summary[name] = {**LESSONS[name](cfg, text, device, dtype, trained), "wall_s": time.perf_counter() - start}
        write_json(path, summary)
    summary.update(data=data_name, device=device, wall_s=time.perf_counter() - t0)
    write_json(path, summary)
    print(f"lessons {', '.join(lessons)} in {summary['wall_s']:.0f} s; wrote {path}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves first): one line, not a traceback
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
