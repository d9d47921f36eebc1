"""Part 09 - GRPO: group-relative advantages, no critic, verifiable rewards.

New in this part
  9.1 Groups: --group_size G responses to each prompt, sampled in one batch with the KV
      cache (the prompt repeated G times in part08's rollout) at --temperature (1 by
      default: the policy's own distribution, diverse enough for a group to disagree),
      rollout_batch / G prompts an iteration.
  9.2 Rewards: verifiable by default (`--reward verifier`): the task's checker gives 1 for
      a right reply and 0 for a wrong one, plus an optional --format_reward for a reply of
      the answer's form; no reward model to hack. `--reward rm` scores with part07's reward
      model instead (--reward_model, or trained here first), on the same prompts.
  9.3 Advantages from the group, not a critic: A = (r - mean of the group) / (std of the
      group + eps), the same for every token of the response (DeepSeekMath, Shao et al.
      2024); `--scale_rewards batch|none` divides by the batch's std or not at all (Dr.
      GRPO). A flat group, all rewards equal, teaches nothing: counted every iteration, and
      with --skip_flat_groups replaced by newly drawn prompts (DAPO's dynamic sampling).
  9.4 The objective: PPO's clipped surrogate over --num_iterations passes of one rollout,
      asymmetric as an option (--clip_low, --clip_high: DAPO's clip-higher), the k3
      estimate of the KL to the reference in the loss with weight --beta (0 allowed), and
      three ways to average tokens (--loss_type grpo|dr_grpo|dapo).
  9.5 Diagnostics as part08's (held-out gold accuracy beside the training reward, KL,
      entropy, clip fraction, response length) plus the fraction of flat groups (grpo.png).
  What GRPO removes from PPO is listed under Replaces: the critic, GAE, the value loss (and
  the whitening, the explained variance and the KL-in-the-reward controller that served them).
  The fair baseline stays: the SFT model trained on its demonstrations for as long as the
  RL phase took (`--control`).

Run
  python part09_grpo.py                            # pretrain, SFT, then GRPO against the checker
  python part09_grpo.py --init_from out/part08/sft.pt --out_dir out/part09_from08
  python part09_grpo.py --init_from ... --reward rm --reward_model out/part07/reward.pt   # a learned reward
  python part09_grpo.py --init_from ... --scale_rewards none --loss_type dr_grpo          # Dr. GRPO

Milestone: held-out greedy gold accuracy on the hard tasks of the GRPO policy against the
SFT model and against the control (the target, +10 points over both, and what the CPU run
measures are in the README).
out/part09/summary.json: `gold_accuracy` {"sft", "sft_more", "rl"} (per task, easy, hard,
overall), `kl`, `flat_group_fraction`, `wall_s`, `grpo` (the last iteration's diagnostics),
`rm_score` (null without a reward model), and the figures of parts 06-07. The RL policy is
out/part09/grpo.pt.

Replaces: AllToAll, exchange, shard_experts, expert_shards, leave_expert_shards_out_of_ddp
Replaces: fill_expert_grads, a2a_bytes, clip_grad_norm, gather_experts, full_state
Replaces: shard_optimizer_state, rank0_losses, expert_parallel, expert_load, compare
Replaces: Critic, kl_rewards, update_beta, gae, whiten, ppo_losses, ppo_update, explained_variance
Replaces: plot_ppo, ppo, reward_source, critic, ppo_iters, ppo_epochs, ppo_minibatch, ppo_lr, clip
Replaces: value_clip, vf_coef, ent_coef, gamma, lam, kl_coef, target_kl, kl_horizon, ppo_eval_interval
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
import signal
import shutil
import sys
import tempfile
import threading
import time
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
    out_dir: str = "out/part09"  # ckpt.pt (pretraining), sft.pt, reward.pt (--reward rm), grpo.pt, metrics.jsonl, summary.json, samples.txt
    # data
    data: str = SHAKESPEARE_URL  # a .txt file, a folder of .txt files, or an http(s) URL
    data_dir: str = "data"  # where downloads and token caches are kept
    tokenizer: Literal["byte", "bpe"] = "byte"  # byte: the tasks work on letters and digits; bpe: trained on the training text, saved as out_dir/tokenizer.json
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
    max_seconds: float = 0.0  # stop after this many seconds of training steps (0 = run max_steps)
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
    init_from: str = ""  # the SFT policy: a part06-07 sft.pt or a Hugging Face folder (no pretraining or SFT then)
    # 6 supervised fine-tuning
    sft_data: str = ""  # instruction data, JSON/JSONL (Alpaca, messages, prompt/completion): file or URL; empty = the built-in tasks
    sft_examples: int = 4000  # built-in demonstrations SFT learns from: a fixed set, as demonstrations are costly
    sft_val_examples: int = 210  # demonstrations kept out of training: early stopping watches their exact match
    sft_steps: int = 2500  # the most SFT steps (early stopping may end sooner)
    sft_batch_size: int = 32  # examples per SFT step, padded to the longest
    sft_lr: float = 1e-3  # peak SFT learning rate: warmup, then cosine decay to a tenth of it
    group_by_length: bool = False  # 6.3 batches of similar lengths: less padding, but here fewer tasks per batch (slower learning)
    sft_eval_interval: int = 100  # SFT steps between validation checks
    sft_patience: int = 4  # stop after this many checks without a better validation score
    sft_method: Literal["full", "lora", "both"] = "full"  # all weights, LoRA adapters, or both from the same base (compared)
    lora_rank: int = 8  # 6.6 rank r of each LoRA adapter
    lora_alpha: float = 16.0  # LoRA's update is scaled by alpha / r
    lora_lr: float = 5e-3  # peak learning rate of the LoRA run (adapters take larger steps than full weights)
    curriculum: bool = False  # 6.4 admit the built-in tasks easy to hard over the first half of SFT
    eval_prompts: int = 50  # held-out prompts per task for gold accuracy
    pass_k: int = 8  # pass@k on the hard tasks: k answers per prompt at temperature 1
    max_answer_tokens: int = 24  # the longest answer evaluation decodes
    chat: bool = False  # talk to --init_from or out_dir/sft.pt (Ctrl-D ends)
    # 7 reward model
    preference_data: str = ""  # pairs, JSON/JSONL (prompt/chosen/rejected, HH transcripts): file or URL; empty = built-in
    gold_pairs: int = 4000  # 7.1a built-in pairs: a training prompt's gold answer against a corrupted one
    policy_prompts: int = 2000  # 7.1b training prompts the SFT policy answers policy_samples times for on-policy pairs
    policy_samples: int = 8  # answers per prompt at temperature 1 (on-policy pairs, the AUC, the normalization)
    rm_eval_prompts: int = 50  # held-out prompts per task for the reward model's checks (multiply has 72)
    rm_steps: int = 600  # reward model training steps
    rm_batch_size: int = 32  # preference pairs per step (chosen and rejected: twice as many rows)
    rm_lr: float = 3e-4  # peak learning rate of the reward model: warmup, then cosine decay to a tenth
    rm_eval_interval: int = 100  # steps between validation checks (the best weights are kept)
    margin: float = 0.0  # 7.3 the loss is -log sigmoid(r_chosen - r_rejected - margin); a pair's own "margin" wins
    center_coef: float = 0.01  # weight of mean((r_chosen + r_rejected)^2), which keeps rewards near 0 (0 = off)
    length_penalty: float = 0.0  # 7.5 shaped reward minus this much per response token
    reward_clip: float = 5.0  # 7.5 shaped rewards clipped to [-reward_clip, reward_clip] (0 = off)
    reward_model: str = ""  # a saved reward model (part07's reward.pt) for --reward rm, the proxy score and --score; empty = train one for --reward rm (out_dir/reward.pt)
    score: str = ""  # print the reward of --response as the reply to this prompt, and exit
    response: str = ""  # the reply --score judges
    # 8 RLHF with PPO
    prompt_data: str = ""  # RL prompts, JSON/JSONL ("prompt" or "messages", optional gold "answer"): file or URL; empty = the built-in tasks
    rollout_batch: int = 64  # responses per iteration: rollout_batch / group_size prompts, group_size responses each
    missing_end_penalty: float = 1.0  # 8.3 subtracted from the score of a response that never writes <|end|>
    control: bool = True  # also train the SFT model on its demonstrations for the RL phase's time (the fair baseline)
    # 9 GRPO
    reward: Literal["verifier", "rm"] = "verifier"  # 9.2 what scores a response: the task's checker (1 right, 0 wrong, + --format_reward) or the reward model
    format_reward: float = 0.0  # 9.2 added to the reward of a reply that ends and has the gold answer's form (digits, letters), right or not
    group_size: int = 8  # 9.1 responses per prompt, G: each is judged against the mean of its group
    grpo_iters: int = 100  # rollout-and-update iterations
    num_iterations: int = 1  # 9.4 passes over each rollout (GRPO's mu; 1: the policy that sampled is the one updated)
    grpo_minibatch: int = 32  # responses per gradient step (must divide --rollout_batch)
    grpo_lr: float = 5e-5  # peak AdamW learning rate of the policy: warmup, then cosine decay to a tenth
    scale_rewards: Literal["group", "batch", "none"] = "group"  # 9.3 divide (r - group mean) by the group's std, the batch's, or nothing (Dr. GRPO)
    skip_flat_groups: bool = True  # 9.3 draw new prompts in place of groups whose rewards are all equal (DAPO's dynamic sampling)
    max_draws: int = 4  # 9.3 with --skip_flat_groups: the most rollouts drawn for one iteration
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"  # 9.4 token averaging: per response then over responses, a constant, over all tokens
    clip_low: float = 0.2  # 9.4 the probability ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # 9.4 above clip_low: DAPO's clip-higher (0.28 there)
    beta: float = 0.04  # 9.4 weight of the k3 KL to the reference in the loss (0 = none, as DAPO and Dr. GRPO)
    grpo_eval_interval: int = 20  # iterations between gold evaluations on the held-out prompts


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
        deletion finds the most frequent pair (ties: the smallest pair, for determinism)."""
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
        merges = []
        while len(merges) < n_merges and heap:
            neg, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg or neg == 0:
                continue  # a stale entry: the count changed after it was pushed
            new_id = 256 + len(merges)
            merges.append(pair)
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
        return cls(merges, special_tokens, pattern)

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


def build_tokenizer(cfg, text=None):
    """The byte tokenizer, or BPE: read from --tokenizer_file, from the run's out_dir when
    resuming or sampling, else trained on the training split (not val) and saved there.
    A file that cannot be read or is not a tokenizer ends the run (exit 2)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer(CHAT_TOKENS)
    saved = os.path.join(cfg.out_dir, "tokenizer.json")
    if cfg.tokenizer_file or cfg.resume or cfg.sample_only:
        path = cfg.tokenizer_file or saved
        if not os.path.exists(path):
            die(f"no tokenizer at {path}: train first, or pass --tokenizer_file")
        try:
            return with_chat_tokens(BPETokenizer.load(path))
        except (OSError, ValueError) as e:
            die(e)
    with Timer() as t:
        tokenizer = BPETokenizer.train(text[: int(0.9 * len(text))], cfg.vocab_size,
                                       ("<|endoftext|>", *CHAT_TOKENS))
    tokenizer.save(saved)
    print(f"BPE: {tokenizer.vocab_size} tokens trained in {t.seconds:.1f} s; saved {saved}")
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
# 6.1 The chat template
# ----------------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant")


def render_chat(tokenizer, messages, generation_prompt=False):
    """messages [{"role": ..., "content": ...}] -> (ids, learn): token ids, and True where
    the token is one SFT learns to write (an assistant turn's content and its <|end|>):
        <|system|>Be brief.<|end|><|user|>Reverse: cat<|end|><|assistant|>tac<|end|>
    The markers are special ids; the content is encoded as text (allowed_special "none"),
    so a user who types "<|assistant|>" gets those 13 characters, never the role token.
    generation_prompt: end with <|assistant|>, where the model starts its answer. The one
    renderer of training, evaluation and --chat (and of parts 07-09)."""
    special, ids, learn = tokenizer.special, [], []
    for m in messages:
        content = tokenizer.encode(m["content"])
        ids += [special[f"<|{m['role']}|>"], *content, special["<|end|>"]]
        learn += [False] + [m["role"] == "assistant"] * (len(content) + 1)
    if generation_prompt:
        ids.append(special["<|assistant|>"])
        learn.append(False)
    return ids, learn


def parse_chat(tokenizer, ids):
    """The inverse of render_chat: ids -> messages (a last turn without <|end|> is kept as
    far as it goes). ValueError where the ids do not follow the template."""
    roles = {tokenizer.special[f"<|{r}|>"]: r for r in ROLES}
    end, messages, role, body = tokenizer.special["<|end|>"], [], None, []
    for i in ids:
        if role is None:
            if i not in roles:
                raise ValueError(f"expected a role token, got id {i}")
            role, body = roles[i], []
        elif i == end:
            messages.append({"role": role, "content": tokenizer.decode(body)})
            role = None
        else:
            body.append(i)
    if role is not None:
        messages.append({"role": role, "content": tokenizer.decode(body)})
    return messages


def user_turn(prompt):
    return [{"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------------------
# 6.2 Data: verifiable tasks, instruction files
# ----------------------------------------------------------------------------------------
class Task:
    """A task whose answers a program can check: make(rng) draws a prompt, solve(prompt)
    gives its gold answer (None for a prompt of another task), check(prompt, answer) is
    exact match, spaces around the answer aside."""

    def __init__(self, name, level, make, solve):
        self.name, self.level, self.make, self.solve = name, level, make, solve

    def check(self, prompt, answer):
        gold = self.solve(prompt)
        return gold is not None and answer.strip() == gold


def word(rng, shortest=3, longest=8):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(shortest, longest)))


def parsed(pattern, answer):
    """solve() from a regex over the prompt and a function of its groups."""
    return lambda prompt: (lambda m: answer(*m.groups()) if m else None)(re.fullmatch(pattern, prompt))


# Easy to hard (the order --curriculum follows). Parts 07-09 use the same suite.
TASKS = [
    Task("copy", "easy", lambda r: f"Repeat: {word(r)}", parsed(r"Repeat: ([a-z]+)", lambda w: w)),
    Task("upper", "easy", lambda r: f"Uppercase: {word(r)}", parsed(r"Uppercase: ([a-z]+)", str.upper)),
    Task("reverse", "easy", lambda r: f"Reverse: {word(r)}", parsed(r"Reverse: ([a-z]+)", lambda w: w[::-1])),
    Task("compare", "easy", lambda r: "Larger: {} or {}".format(*r.sample(range(10, 100), 2)),
         parsed(r"Larger: (\d+) or (\d+)", lambda a, b: str(max(int(a), int(b))) if a != b else None)),
    Task("add", "hard", lambda r: f"{r.randrange(100)} + {r.randrange(100)} =",
         parsed(r"(\d+) \+ (\d+) =", lambda a, b: str(int(a) + int(b)))),
    Task("sort", "hard", lambda r: "Sort: " + " ".join(str(r.randrange(10)) for _ in range(r.randint(4, 7))),
         parsed(r"Sort: ([0-9 ]+)", lambda s: " ".join(sorted(s.split())))),
    Task("multiply", "hard", lambda r: f"{r.randrange(10, 100)} * {r.randrange(2, 10)} =",
         parsed(r"(\d+) \* (\d+) =", lambda a, b: str(int(a) * int(b)))),
]
TASK_BY_NAME = {t.name: t for t in TASKS}


def task_of(prompt):
    """The built-in task a prompt belongs to, or None."""
    return next((t for t in TASKS if t.solve(prompt) is not None), None)


def held_out(prompt):
    """The split is a function of the prompt alone: 1 prompt in 10, by a hash, is for
    evaluation only. No seed, count or part can then put an evaluation prompt in training."""
    return int(hashlib.sha1(prompt.encode()).hexdigest()[:8], 16) % 10 == 0


def task_prompts(task, n, evaluation, rng):
    """n distinct prompts of a task from one side of the split. The generator is unlimited:
    parts 08-09 draw fresh prompts from it, with no answers."""
    out, tries = {}, 0
    while len(out) < n:
        prompt, tries = task.make(rng), tries + 1
        if held_out(prompt) == evaluation:
            out[prompt] = None
        if tries > 200 * n + 1000:
            die(f"task {task.name} has fewer than {n} distinct prompts on its side of the split")
    return list(out)


def eval_prompts(cfg):
    """The held-out test set: cfg.eval_prompts prompts per task, the same in every run of a
    seed and in parts 07-09 (their own random stream, seeded by cfg.seed)."""
    rng = random.Random(f"eval-{cfg.seed}")
    return {t.name: task_prompts(t, cfg.eval_prompts, True, rng) for t in TASKS}


def demonstrations(cfg):
    """The built-in demonstrations: sft_examples + sft_val_examples prompts with gold answers,
    an equal share per task, from the training side of the split. A fixed, limited set, as
    in real SFT, where each demonstration is written by a person."""
    rng = random.Random(f"sft-{cfg.seed}")
    n = cfg.sft_examples + cfg.sft_val_examples
    convs = []
    for i, task in enumerate(TASKS):
        share = n // len(TASKS) + (i < n % len(TASKS))
        convs += [(task.name, user_turn(p) + [{"role": "assistant", "content": task.solve(p)}])
                  for p in task_prompts(task, share, False, rng)]
    rng.shuffle(convs)
    return convs


def read_records(source, cfg, flag="--sft_data"):
    """--sft_data FILE|URL (or another `flag`'s) -> [(where, record)]: a JSON array, or JSON
    Lines (one object a line). A line that is not JSON ends the run naming the file and line."""
    path = source
    if source.startswith(("http://", "https://")):
        path = os.path.join(cfg.data_dir, f"{hashlib.sha1(source.encode()).hexdigest()[:10]}-"
                            f"{os.path.basename(source.split('?')[0]) or 'data.jsonl'}")
        if not os.path.exists(path):
            writable_dir(cfg.data_dir, "--data_dir")
            try:
                download(source, path)
            except (requests.RequestException, OSError) as e:
                die(f"{flag} {source}: download failed ({type(e).__name__})")
    if not os.path.isfile(path):
        die(f"{flag} {source}: " + ("not a file" if os.path.exists(path) else "no such file"))
    with open(path, "rb") as f:
        text = decode_text(f.read(), path)
    if not text.strip():
        die(f"{flag} {source}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            die(f"{source}:{e.lineno}: not valid JSON ({e.msg})")
        return [(f"{source}: record {i + 1}", r) for i, r in enumerate(records)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{source}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                die(f"{source}:{n}: not valid JSON ({e.msg})")
    return out


def to_messages(record, where):
    """One record in a format people use -> messages:
      {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
      {"instruction": ..., "input": ..., "output": ...}      (Alpaca; input may be empty)
      {"prompt": ..., "completion": ...}"""
    def text(key):
        if not isinstance(record.get(key, ""), str):
            die(f"{where}: {key!r} must be a string")
        return record.get(key, "")

    if not isinstance(record, dict):
        die(f"{where}: a record must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            die(f"{where}: 'messages' must be a list of objects")
        for m in messages:
            if m.get("role") not in ROLES:
                die(f"{where}: unknown role {m.get('role')!r} (roles: {', '.join(ROLES)})")
            if not isinstance(m.get("content"), str):
                die(f"{where}: every message needs a string 'content'")
    elif "instruction" in record and "output" in record:
        user = text("instruction") + (f"\n\n{text('input')}" if text("input") else "")
        messages = user_turn(user) + [{"role": "assistant", "content": text("output")}]
    elif "prompt" in record and "completion" in record:
        messages = user_turn(text("prompt")) + [{"role": "assistant", "content": text("completion")}]
    else:
        die(f"{where}: a record needs 'messages', 'instruction' and 'output' (Alpaca), or 'prompt' "
            "and 'completion'")
    if not any(m["role"] == "assistant" for m in messages):
        die(f"{where}: no assistant turn to learn from")
    return messages


def make_examples(tokenizer, convs, block_size):
    """(task, messages) -> training examples {ids, learn, task, messages}; an example longer
    than block_size + 1 tokens is dropped whole (cut, it would teach half an answer) and
    counted. Returns (examples, dropped)."""
    out = []
    for task, messages in convs:
        ids, learn = render_chat(tokenizer, messages)
        if len(ids) - 1 <= block_size:  # inputs ids[:-1], targets ids[1:]
            out.append({"ids": ids, "learn": learn, "task": task, "messages": messages})
    return out, len(convs) - len(out)


# ----------------------------------------------------------------------------------------
# 6.3 Batching and the loss mask
# ----------------------------------------------------------------------------------------
def collate(examples, pad_id, device):
    """Right-pad a batch to its longest example: x (B, T) inputs, y (B, T) targets, -100 (no
    loss) wherever the target is not a token to learn: the prompt and the padding.
    Why mask the prompt: a loss on every token trains the model to write the user's turns
    too, to continue a conversation with a new question, and spends its capacity (and most
    of the loss) on predicting prompts whose random words and numbers cannot be predicted;
    the answer given the prompt is what SFT is for. Why right padding needs no
    attention mask: a causal model never attends ahead, so padding after an example
    changes nothing before it."""
    T = max(len(e["ids"]) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        ids, n = torch.tensor(e["ids"]), len(e["ids"]) - 1
        x[i, :n] = ids[:-1]
        y[i, :n] = ids[1:].masked_fill(~torch.tensor(e["learn"][1:]), -100)
    return x.to(device), y.to(device)


def length_grouped(n_examples, lengths, batch_size, rng, pool=50):
    """One epoch of batches (lists of indices): shuffle, sort each pool of `pool` batches'
    worth by length and cut it into batches, then shuffle the batches. Neighbours in length
    share a batch (little padding), and the batches still come in random order. pool=1:
    random batches. The price: lengths follow the task here, so a grouped batch holds one
    or two tasks, and SFT learns the suite far slower (the README: 16% against 98% exact
    match on the easy tasks after 1,500 steps)."""
    order = list(range(n_examples))
    rng.shuffle(order)
    batches = []
    for s in range(0, n_examples, batch_size * pool):
        chunk = sorted(order[s:s + batch_size * pool], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def sft_batches(examples, cfg, rng):
    """Batches of examples, epoch after epoch. 6.4 --curriculum: the built-in tasks are
    admitted easy to hard (TASKS' order), one more every so often, all of them by the middle
    of SFT; random order (the default) mixes every task from the first step."""
    step, rank = 0, {t.name: i for i, t in enumerate(TASKS)}
    while True:
        pool = examples
        if cfg.curriculum:
            admitted = 1 + int((len(TASKS) - 1) * min(1.0, step / (0.5 * cfg.sft_steps)))
            pool = [e for e in examples if rank.get(e["task"], 0) < admitted] or examples
        lengths = [len(e["ids"]) for e in pool]
        for i, batch in enumerate(length_grouped(len(pool), lengths, cfg.sft_batch_size, rng,
                                                 50 if cfg.group_by_length else 1)):
            yield [pool[j] for j in batch]
            step += 1
            if cfg.curriculum and i + 1 == cfg.sft_eval_interval:  # time to admit more
                break


# ----------------------------------------------------------------------------------------
# 6.5 Evaluation against gold answers
# ----------------------------------------------------------------------------------------
def answer(model, tokenizer, conversations, cfg, dtype, temperature=0.0, generator=None, batch=128):
    """Conversations (each ending in a user turn) -> the model's reply texts: rendered with
    the chat template, decoded in batches with the KV cache, stopped at <|end|>. Greedy at
    temperature 0."""
    replies, special = [], tokenizer.special
    device = model.wte.weight.device
    for s in range(0, len(conversations), batch):
        prompts = [render_chat(tokenizer, c, generation_prompt=True)[0] for c in conversations[s:s + batch]]
        with autocast_ctx(str(device), dtype):
            new, _ = generate_batch(model, prompts, cfg.max_answer_tokens, special["<|end|>"],
                                    special["<|pad|>"], temperature, generator=generator)
        replies += [tokenizer.decode(ids) for ids in new]
    return replies


def by_level(per_task):
    """{task: x} -> the same plus the means over the easy tasks, the hard ones, and all."""
    out = dict(per_task)
    for level in ("easy", "hard"):
        xs = [v for k, v in per_task.items() if TASK_BY_NAME[k].level == level]
        out[level] = sum(xs) / len(xs) if xs else None
    out["overall"] = sum(per_task.values()) / len(per_task)
    return out


def gold_accuracy(model, tokenizer, prompts, cfg, dtype):
    """Exact match of greedy answers on held-out prompts {task: [prompt]}, per task, easy,
    hard and overall."""
    flat = [(t, p) for t, ps in prompts.items() for p in ps]
    replies = answer(model, tokenizer, [user_turn(p) for _, p in flat], cfg, dtype)
    hits = collections.defaultdict(list)
    for (t, p), reply in zip(flat, replies):
        hits[t].append(TASK_BY_NAME[t].check(p, reply))
    return by_level({t: sum(h) / len(h) for t, h in hits.items()})


def pass_at_k(model, tokenizer, prompts, cfg, dtype, k):
    """pass@k on the hard tasks: k answers per prompt at temperature 1, a prompt passes when
    any is right. Well above greedy accuracy, it says the policy can find answers it does
    not yet prefer: what RL (parts 08-09) can turn into greedy accuracy. "sampled": the
    share of all k answers that are right, per task and hard (the mean reward of a sample
    at temperature 1: what RL raises)."""
    hard = [(t, p) for t, ps in prompts.items() if TASK_BY_NAME[t].level == "hard" for p in ps]
    gen = torch.Generator(device=model.wte.weight.device).manual_seed(cfg.seed)
    replies = answer(model, tokenizer, [user_turn(p) for _, p in hard for _ in range(k)], cfg, dtype,
                     temperature=1.0, generator=gen)
    passed, right = collections.defaultdict(list), collections.defaultdict(list)
    for i, (t, p) in enumerate(hard):
        hits = [TASK_BY_NAME[t].check(p, r) for r in replies[i * k:(i + 1) * k]]
        passed[t].append(any(hits))
        right[t] += hits

    def shares(hits):  # {task: [bool]} -> each task's share of True, and their mean "hard"
        per_task = {t: sum(v) / len(v) for t, v in hits.items()}
        return {**per_task, "hard": sum(per_task.values()) / len(per_task) if per_task else None}
    return {"k": k, **shares(passed), "sampled": shares(right)}


# ----------------------------------------------------------------------------------------
# 6.6 LoRA: low-rank adapters
# ----------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """W x + (alpha / r) B A x (Hu et al. 2021, "LoRA"): the base Linear W stays frozen and
    only A (r, in) and B (out, r) train, r (in + out) parameters instead of in * out. B
    starts at zero, so training starts from the base model exactly."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device)
                              / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):  # (B, T, in) -> (B, T, r) -> (B, T, out)
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale

    def merged(self):
        """A plain Linear with W + (alpha / r) B A: the same function, no extra cost."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * (self.B @ self.A))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def lora_targets(model):
    """(parent, name) of every projection LoRA adapts: attention's and the dense MLPs'.
    The embedding (tied to the head), the norms and MoE experts stay frozen."""
    return [(m, name) for m in model.modules() if isinstance(m, (CausalSelfAttention, MLP, SwiGLU))
            for name, child in m.named_children() if isinstance(child, nn.Linear)]


def add_lora(model, rank, alpha):
    """Freeze every weight, then wrap each target Linear in a LoRALinear. The token
    embedding (tied to the head) stays trainable: the chat tokens are new, and with their
    rows frozen at their start the model could not learn to read <|assistant|> or to write
    <|end|> (PEFT: modules_to_save / trainable_token_indices)."""
    model.requires_grad_(False)
    model.wte.weight.requires_grad_(True)
    for parent, name in lora_targets(model):
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


def merge_lora(model):
    """Fold every adapter into its weight: the model is a plain GPT again."""
    for m in list(model.modules()):
        for name, child in m.named_children():
            if isinstance(child, LoRALinear):
                setattr(m, name, child.merged())
    return model


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plain_state(model):
    """A copy of the weights as a plain GPT holds them (adapters merged)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        model = merge_lora(copy.deepcopy(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------
# 6.3-6.6 The SFT loop
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def validate_sft(model, tokenizer, examples, cfg, device, dtype):
    """On demonstrations SFT does not train on: the masked loss, and exact match of the
    greedy reply with the demonstration's last answer."""
    model.eval()
    pad, losses = tokenizer.special["<|pad|>"], []
    for s in range(0, len(examples), cfg.sft_batch_size):
        x, y = collate(examples[s:s + cfg.sft_batch_size], pad, device)
        with autocast_ctx(device, dtype):
            losses.append(model(x, y)[1].item())
    turns = [e["messages"][:max(i for i, m in enumerate(e["messages"]) if m["role"] == "assistant")]
             for e in examples]
    replies = answer(model, tokenizer, turns, cfg, dtype)
    gold = [e["messages"][len(t)]["content"] for e, t in zip(examples, turns)]
    model.train()
    return sum(r.strip() == g.strip() for r, g in zip(replies, gold)) / len(gold), sum(losses) / len(losses)


def sft(model, tokenizer, train_examples, val_examples, cfg, device, dtype, stage="sft", seconds=0.0):
    """Supervised fine-tuning to its plateau: AdamW on the masked next-token loss (6.3) over
    batches of mixed tasks, warmup then cosine decay to a tenth of sft_lr; every
    sft_eval_interval steps the exact match of the validation demonstrations (the masked
    loss breaks ties) picks the best weights to keep; sft_patience checks in a row that
    improve neither the best exact match nor the best loss stop it (early stopping). Rows
    with "stage" go to metrics.jsonl. Returns the best weights (adapters merged) and the
    figures.
    8 seconds > 0 (part08's control): SFT continued from its plateau at the rate it ended
    on, a tenth of sft_lr, for that many seconds of steps (validation not counted)."""
    run = dataclasses.replace(cfg, learning_rate=cfg.sft_lr, min_lr=cfg.sft_lr / 10,
                              max_steps=cfg.sft_steps, warmup_steps=min(cfg.warmup_steps, cfg.sft_steps // 10))
    if seconds:
        run = dataclasses.replace(run, learning_rate=cfg.sft_lr / 10, warmup_steps=0, sft_steps=2**62)
    opt = configure_optimizer(model, run, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    batches, pad = sft_batches(train_examples, cfg, random.Random(cfg.seed)), tokenizer.special["<|pad|>"]
    best, best_state, best_step, best_loss, stale = None, plain_state(model), 0, float("inf"), 0
    tokens = padding = 0
    t0, eval_s = time.perf_counter(), 0.0
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a", buffering=1)
    model.train()
    with metrics:
        for step in range(1, run.sft_steps + 1):
            lr = get_lr(step, run)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = next(batches)
            x, y = collate(batch, pad, device)
            with autocast_ctx(device, dtype):
                _, loss = model(x, y)
            scaler.scale(loss + model.router_loss()).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            tokens, padding = tokens + x.numel(), padding + x.numel() - sum(len(e["ids"]) - 1 for e in batch)
            tok_s = tokens / max(time.perf_counter() - t0 - eval_s, 1e-9)
            out_of_time = seconds and time.perf_counter() - t0 - eval_s >= seconds
            if step % cfg.log_interval == 0:
                check_finite(loss.item(), step)
                print(f"{stage} {step:5d}/{'?' if seconds else cfg.sft_steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                      f"{tok_s:,.0f} tok/s | padding {padding / tokens:.1%}")
                metrics.write(json.dumps({"stage": stage, "sft_step": step, "sft_loss": loss.item(), "sft_lr": lr}) + "\n")
            if step % cfg.sft_eval_interval == 0 or step == run.sft_steps or out_of_time:
                t = time.perf_counter()
                acc, val_loss = validate_sft(model, tokenizer, val_examples, cfg, device, dtype)
                check_finite(val_loss, step)
                better = best is None or (acc, -val_loss) > best
                stale = 0 if better or val_loss < best_loss else stale + 1
                best_loss = min(best_loss, val_loss)
                if better:
                    best, best_state, best_step = (acc, -val_loss), plain_state(model), step
                print(f"{stage} eval {step:5d} | val exact match {acc:.1%} | val loss {val_loss:.4f}"
                      + (" | best" if better else f" | no better for {stale}"))
                metrics.write(json.dumps({"stage": stage, "sft_step": step, "sft_val_accuracy": acc,
                                          "sft_val_loss": val_loss}) + "\n")
                eval_s += time.perf_counter() - t
                if stale >= cfg.sft_patience:
                    print(f"{stage}: early stop at step {step}; best at step {best_step}")
                    break
            if out_of_time:
                break
    return best_state, {"steps": step, "best_step": best_step, "val_accuracy": best[0] if best else None,
                        "val_loss": -best[1] if best else None, "tokens_per_s": tok_s,
                        "padding_fraction": padding / tokens, "train_s": time.perf_counter() - t0,
                        "trainable_params": trainable(model)}


# ----------------------------------------------------------------------------------------
# 6 The SFT stage: base model in, fine-tuned model and gold accuracy out
# ----------------------------------------------------------------------------------------
def grow_vocab(model, state, rows):
    """Load `state`, whose embedding has `rows` real token rows, into a model whose tokenizer
    may have more (the chat tokens a part04-05 tokenizer lacked). A new row starts at the
    mean of the old ones, a neutral token (as transformers' resize_token_embeddings does);
    the padding rows beyond (padded_vocab) are kept where the file has them: they take
    part in the softmax, so the model computes the same loss as before."""
    state = dict(state)
    old = state.pop("wte.weight")
    state.pop("lm_head.weight", None)  # tied to wte
    keep = min(len(old), len(model.wte.weight))
    with torch.no_grad():
        model.wte.weight[:keep] = old[:keep]
        model.wte.weight[rows:model.cfg.vocab_size] = old[:rows].mean(dim=0)
    return state


def load_model(cfg, path, device, kind="policy"):
    """A model to fine-tune or to talk to, and its tokenizer, with every chat token: a
    Hugging Face folder (4.6), or a checkpoint of parts 04-06 (its BPE tokenizer.json beside
    it). The file's shape replaces this run's shape flags. Returns (cfg, tokenizer, model).
    7.2 kind "reward": a reward model (part07's reward.pt), returned as a RewardModel; a
    policy refuses a reward model's file and the reverse."""
    flag = "--init_from" if kind == "policy" else "--reward_model"
    if os.path.isdir(path) and kind == "reward":
        die(f"--reward_model {path} is a folder; a reward model is a reward.pt that part07 wrote")
    if os.path.isdir(path):  # (as sample_only: load_hf writes nothing)
        hf_cfg, tokenizer, model = load_hf(dataclasses.replace(cfg, init_from=path, sample_only=True))
        cfg = dataclasses.replace(hf_cfg, sample_only=cfg.sample_only)
        state, rows = model.state_dict(), tokenizer.vocab_size
    else:
        if not os.path.isfile(path):
            die(f"{flag} {path}: no such folder or checkpoint file")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, corrupt, or not a torch file at all
            die(f"{flag} {path} is not a readable checkpoint ({type(e).__name__})")
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("config"), dict)):
            die(f"{flag} {path} is not a checkpoint of this project")
        if ckpt.get("kind", "policy") != kind:
            die(f"{flag} {path} " + ("is a reward model, not a policy (part08 reads it as --reward_model)"
                                     if kind == "policy" else "is a policy, not a reward model (part07 trains one)"))
        fields = {f.name: f.type for f in dataclasses.fields(Config)}
        shape = {k: ckpt["config"][k] for k in SHAPE_FIELDS if k in ckpt["config"]}
        foreign = [k for k, v in shape.items() if get_origin(fields[k]) is Literal and v not in get_args(fields[k])]
        if foreign:
            die(f"{flag} {path} was written by another part ({', '.join(f'{k}={shape[k]}' for k in foreign)})")
        name = ckpt.get("tokenizer", "byte")
        if name == "byte":
            tokenizer = ByteTokenizer(ckpt.get("special_tokens", ()))
        else:
            file = os.path.join(os.path.dirname(path), "tokenizer.json")
            try:
                tokenizer = BPETokenizer.load(file)
            except (OSError, ValueError) as e:
                die(f"{flag} {path} needs its tokenizer: {e}")
        rows, state = shape.get("vocab_size", tokenizer.vocab_size), ckpt["model"]
        cfg = dataclasses.replace(cfg, **shape, tokenizer="byte" if name == "byte" else "bpe")
    tokenizer = with_chat_tokens(tokenizer)
    cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
    model = GPT(cfg).to(device)
    want = {k: v.shape for k, v in model.state_dict().items() if k not in ("wte.weight", "lm_head.weight")}
    got = {k: v.shape for k, v in state.items() if k not in ("wte.weight", "lm_head.weight")}
    if got != want or "wte.weight" not in state or state["wte.weight"].shape[1] != cfg.n_embd \
            or state["wte.weight"].shape[0] < rows:
        odd = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]] or ["wte.weight"]
        die(f"{flag} {path} holds weights of another shape than its config says (e.g. {odd[0]})")
    model.load_state_dict(grow_vocab(model, state, rows), strict=False)
    if kind == "reward":
        model = RewardModel(model, ckpt.get("reward_norm"))
        try:
            model.head.load_state_dict(ckpt["head"])
        except (KeyError, RuntimeError, AttributeError):
            die(f"--reward_model {path} has no reward head of width {cfg.n_embd}")
    return cfg, tokenizer, model


def save_model(path, model, cfg, tokenizer, **figures):
    """An SFT checkpoint (weights merged, no optimizer: it is a starting point, not a run to
    resume) that --init_from and --chat read."""
    save_checkpoint(path, {"model": plain_state(model), "config": dataclasses.asdict(cfg),
                           "tokenizer": tokenizer.name, "special_tokens": list(tokenizer.special),
                           **figures})


def finetune(base, tokenizer, cfg, device, dtype, train_examples, val_examples, method):
    """One SFT run from a copy of the base model: all weights ("full") or LoRA adapters
    (merged at the end). Saves the best model to out_dir/{sft,lora}.pt; returns it."""
    model = copy.deepcopy(base)
    if method == "lora":
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    print(f"== SFT ({method}): {trainable(model):,} trainable parameters of {base.num_params():,}")
    run = cfg if method == "full" else dataclasses.replace(cfg, sft_lr=cfg.lora_lr)
    best, figures = sft(model, tokenizer, train_examples, val_examples, run, device, dtype,
                        stage="sft" if method == "full" else "lora")
    model = merge_lora(model) if method == "lora" else model
    model.load_state_dict(best)
    model.requires_grad_(True)
    save_model(os.path.join(cfg.out_dir, "sft.pt" if method == "full" else "lora.pt"), model, cfg, tokenizer,
               step=figures["best_step"], val_accuracy=figures["val_accuracy"])
    return model, figures


def print_accuracy(accuracy):
    names = [t.name for t in TASKS] + ["easy", "hard", "overall"]
    print(f"{'model':<8}" + "".join(f"{n:>9}" for n in names))
    for row, acc in accuracy.items():
        print(f"{row:<8}" + "".join(f"{acc[n]:9.1%}" for n in names))


def sft_conversations(cfg):
    """The demonstrations as (task or None, messages): --sft_data's records, shuffled, or the
    built-in tasks'. Read before anything is trained or written: a bad file stops the run
    at once."""
    if not cfg.sft_data:
        return demonstrations(cfg)
    convs = [(None, to_messages(r, where)) for where, r in read_records(cfg.sft_data, cfg)]
    random.Random(cfg.seed).shuffle(convs)
    return convs


def supervised_finetuning(base, tokenizer, convs, cfg, device, dtype):
    """6 The milestone: gold accuracy of the base model, SFT (full and/or LoRA) to its
    plateau, gold accuracy again, pass@k on the hard tasks. Returns the summary's figures."""
    examples, dropped = make_examples(tokenizer, convs, cfg.block_size)
    if dropped:
        print(f"note: {dropped} of {len(convs)} examples are longer than --block_size {cfg.block_size}"
              " tokens and were left out")
    if len(examples) < 2:
        die(f"SFT needs at least 2 examples within --block_size {cfg.block_size}; {len(examples)} of "
            f"{len(convs)} fit")
    n_val = min(cfg.sft_val_examples, len(examples) // 2)  # and at least as many to train on
    val_examples, train_examples = examples[:n_val], examples[n_val:]
    print(f"SFT data: {len(train_examples):,} demonstrations to learn from, {len(val_examples):,} to "
          f"validate on ({cfg.sft_data or 'built-in tasks'}); {len(TASKS)} tasks x {cfg.eval_prompts} "
          "held-out prompts for gold accuracy")
    prompts = eval_prompts(cfg)
    accuracy = {"base": gold_accuracy(base, tokenizer, prompts, cfg, dtype)}
    runs, models = {}, {}
    for method in ("full", "lora") if cfg.sft_method == "both" else (cfg.sft_method,):
        models[method], runs[method] = finetune(base, tokenizer, cfg, device, dtype, train_examples,
                                                val_examples, method)
        accuracy["sft" if method == "full" else "lora"] = gold_accuracy(models[method], tokenizer, prompts, cfg, dtype)
    model = models.get("full", models.get("lora"))  # the SFT model parts 07-09 start from
    print_accuracy(accuracy)
    passed = pass_at_k(model, tokenizer, prompts, cfg, dtype, cfg.pass_k)
    greedy = accuracy["sft" if "full" in models else "lora"]["hard"]
    print(f"pass@{cfg.pass_k} on the hard tasks: {passed['hard']:.1%}; one answer at temperature 1 "
          f"{passed['sampled']['hard']:.1%}, greedy {greedy:.1%}")
    main_run = runs.get("full", runs.get("lora"))
    return model, {"accuracy": accuracy, "pass_at_k": passed, "sft": runs,
                   "trainable_params": {m: r["trainable_params"] for m, r in runs.items()},
                   "padding_fraction": main_run["padding_fraction"], "tokens_per_s": main_run["tokens_per_s"],
                   "sft_examples": len(train_examples), "dropped_examples": dropped}


def transcripts(model, tokenizer, cfg, dtype, n=2):
    """A few held-out prompts per task and the model's replies, for samples.txt."""
    flat = [p for ps in eval_prompts(cfg).values() for p in ps[:n]]
    replies = answer(model, tokenizer, [user_turn(p) for p in flat], cfg, dtype)
    return [f"user: {p}\nassistant: {r}  [{'right' if task_of(p).check(p, r) else 'wrong'}]"
            for p, r in zip(flat, replies)]


def chat(cfg, device, dtype):
    """--chat: talk to a fine-tuned model (--init_from, else out_dir/sft.pt). Each reply
    sees the conversation so far, as far back as block_size allows. Ctrl-D ends."""
    path = cfg.init_from or os.path.join(cfg.out_dir, "sft.pt")
    if not cfg.init_from and not os.path.exists(path):
        die(f"--chat: no fine-tuned model at {path}; train one first (this part's default run), or pass --init_from")
    cfg, tokenizer, model = load_model(cfg, path, device)
    print(f"chatting with {path} (Ctrl-D to end)")
    messages = []
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        while len(render_chat(tokenizer, messages, generation_prompt=True)[0]) >= cfg.block_size:
            if len(messages) == 1:
                break
            messages = messages[2:] if len(messages) > 2 else messages[1:]  # forget the oldest exchange
        if len(render_chat(tokenizer, messages, generation_prompt=True)[0]) >= cfg.block_size:
            print(f"(that message is longer than the model's {cfg.block_size} tokens)")
            messages = []
            continue
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        reply = answer(model, tokenizer, [messages], dataclasses.replace(cfg, max_answer_tokens=cfg.max_new_tokens),
                       dtype, cfg.temperature, gen)[0]
        print(f"model> {reply}")
        messages.append({"role": "assistant", "content": reply})


# ----------------------------------------------------------------------------------------
# 7.1 Preference pairs: built from the task suite, or read from a file
# ----------------------------------------------------------------------------------------
CORRUPTIONS = ("off_by_one", "swap", "truncate", "format")


def corrupt(gold, kind, rng):
    """7.1a A plausible wrong answer made from a gold one, or None where `kind` cannot change it:
      off_by_one  one number 1 higher or lower (in a word, one letter one step along the alphabet)
      swap        two neighbours that differ trade places (characters, or the items of a list)
      truncate    the last character (or list item) dropped
      format      the right content in the wrong form ("The answer is 68.")
    The mistakes a weak model makes look like these: a reward model must tell them apart from
    the gold answer, often by one character."""
    items, sep = (gold.split(" "), " ") if " " in gold else (list(gold), "")
    if kind == "off_by_one":
        numbers = list(re.finditer(r"\d+", gold))
        if numbers:
            m = rng.choice(numbers)
            n = int(m.group()) + (1 if int(m.group()) == 0 else rng.choice((-1, 1)))
            return gold[:m.start()] + str(n) + gold[m.end():]
        i = rng.randrange(len(gold))
        if not gold[i].isalpha():
            return None
        a = "a" if gold[i].islower() else "A"
        return gold[:i] + chr(ord(a) + (ord(gold[i]) - ord(a) + rng.choice((-1, 1))) % 26) + gold[i + 1:]
    if kind == "swap":
        spots = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
        if not spots:
            return None
        i = rng.choice(spots)
        items[i], items[i + 1] = items[i + 1], items[i]
        return sep.join(items)
    if kind == "truncate":
        return sep.join(items[:-1]) if len(items) > 1 else None
    return rng.choice(("The answer is {}.", "{}.", "Answer: {}")).format(gold)


def preference(prompt, chosen, rejected, source, task=None, kind=None, margin=None):
    """A pair: prompt messages (ending in a user turn), the preferred and the other reply."""
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source,
            "task": task, "kind": kind, "margin": margin}


def gold_pairs(prompts, rng, every_kind=False):
    """7.1a Prompts {task: [prompt]} -> gold-vs-corrupted pairs: one corruption per prompt
    drawn at random, or every kind that applies (every_kind, for the held-out checks). A
    corruption the checker would still accept is skipped."""
    pairs = []
    for name, ps in prompts.items():
        task = TASK_BY_NAME[name]
        for p in ps:
            gold = task.solve(p)
            for kind in CORRUPTIONS if every_kind else rng.sample(CORRUPTIONS, len(CORRUPTIONS)):
                wrong = corrupt(gold, kind, rng)
                if wrong is not None and not task.check(p, wrong):
                    pairs.append(preference(user_turn(p), gold, wrong, "gold", name, kind))
                    if not every_kind:
                        break
    return pairs


def policy_samples(model, tokenizer, prompts, cfg, dtype, seed):
    """k = policy_samples answers per prompt at temperature 1 from the policy, each marked
    right or wrong by its task's checker, with "ids": the conversation as the reward model
    reads it. An answer whose conversation is longer than block_size (with its <|end|>) is
    left out. Returns [{"task", "prompt", "reply", "right", "ids"}]."""
    flat = [(name, p) for name, ps in prompts.items() for p in ps for _ in range(cfg.policy_samples)]
    gen = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
    replies = answer(model, tokenizer, [user_turn(p) for _, p in flat], cfg, dtype, temperature=1.0, generator=gen)
    out = []
    for (name, p), r in zip(flat, replies):
        ids = render_chat(tokenizer, user_turn(p) + [{"role": "assistant", "content": r}])[0]
        if len(ids) <= cfg.block_size:
            out.append({"task": name, "prompt": p, "reply": r, "right": TASK_BY_NAME[name].check(p, r), "ids": ids})
    return out


def on_policy_pairs(samples):
    """7.1b On each prompt, every distinct right answer of the policy against every distinct
    wrong one. The pairs lie where the policy's answers do, which is where part08 will ask
    the reward model; a prompt the policy always (or never) gets right gives none."""
    by_prompt = collections.defaultdict(lambda: (set(), set()))
    for s in samples:
        by_prompt[(s["task"], s["prompt"])][0 if s["right"] else 1].add(s["reply"])
    return [preference(user_turn(p), c, r, "on_policy", name)
            for (name, p), (right, wrong) in by_prompt.items() for c in sorted(right) for r in sorted(wrong)]


def split_hh(text, where):
    """An Anthropic HH transcript "\n\nHuman: ...\n\nAssistant: ..." -> (the messages before
    its last assistant turn, that turn's text)."""
    cut = text.rfind("\n\nAssistant:")
    if cut < 0:
        die(f"{where}: a transcript with no assistant turn (no '\\n\\nAssistant:')")
    parts = re.split(r"\n\n(Human|Assistant): ?", "\n\n" + text[:cut].lstrip("\n"))  # ['', who, text, ...]
    if parts[0].strip():
        die(f"{where}: a transcript must start with '\\n\\nHuman:'")
    messages = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
                for who, body in zip(parts[1::2], parts[2::2])]
    return messages, text[cut + len("\n\nAssistant:"):].strip()


def to_pair(record, where):
    """One preference record -> (prompt messages, chosen, rejected, margin):
      {"prompt": str or messages, "chosen": str or messages, "rejected": ...}   (the reply is
          the last assistant message; a list's earlier messages extend the prompt)
      {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}            (Anthropic HH)
      {"chosen": messages, "rejected": messages}        (the prompt is all but the last turn)
    and an optional number "margin" (7.3). Returns None where the two prompts differ."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        die(f"{where}: a preference record needs 'chosen' and 'rejected'")
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin) or margin < 0):
        die(f"{where}: 'margin' must be a number >= 0")
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt = user_turn(prompt)
    elif prompt is not None:  # messages: checked as to_messages checks a conversation
        prompt = to_messages({"messages": prompt + [{"role": "assistant", "content": ""}]}
                             if isinstance(prompt, list) else {"messages": prompt}, where)[:-1]
    replies = []
    for key in ("chosen", "rejected"):
        value = record[key]
        if isinstance(value, str) and prompt is None:
            replies.append(split_hh(value, f"{where}: {key!r}"))
        elif isinstance(value, str):
            replies.append(([], value))
        elif isinstance(value, list):
            messages = to_messages({"messages": value}, f"{where}: {key!r}")
            if messages[-1]["role"] != "assistant":
                die(f"{where}: {key!r} must end with the assistant's reply")
            replies.append((messages[:-1], messages[-1]["content"]))
        else:
            die(f"{where}: {key!r} must be a string or a list of messages")
    (before_c, chosen), (before_r, rejected) = replies
    if before_c != before_r:
        return None
    return (prompt or []) + before_c, chosen, rejected, margin


def preference_pairs(cfg):
    """--preference_data's pairs, read before anything is trained or written; pairs whose
    chosen and rejected replies are equal, or whose two transcripts differ before the last
    reply, are dropped and counted. Returns (pairs, dropped)."""
    pairs, dropped = [], 0
    for where, record in read_records(cfg.preference_data, cfg, "--preference_data"):
        pair = to_pair(record, where)
        if pair is None or pair[1].strip() == pair[2].strip():
            dropped += 1
        else:
            pairs.append(preference(pair[0], pair[1], pair[2], "file", margin=pair[3]))
    if not pairs:
        die(f"--preference_data {cfg.preference_data}: no usable pair ({dropped} dropped: chosen equal "
            "to rejected, or two different conversations)")
    if dropped:
        print(f"note: {dropped} of {dropped + len(pairs)} preference pairs dropped (chosen equal to rejected, "
              "or two different conversations)")
    return pairs, dropped


def encode_pairs(tokenizer, pairs, block_size):
    """Each pair gets "ids": the chosen and the rejected conversation rendered with the chat
    template; a pair with a side longer than block_size is left out and counted."""
    out = []
    for pair in pairs:
        ids = [render_chat(tokenizer, pair["prompt"] + [{"role": "assistant", "content": reply}])[0]
               for reply in (pair["chosen"], pair["rejected"])]
        if max(map(len, ids)) <= block_size:
            out.append({**pair, "ids": ids})
    return out, len(pairs) - len(out)


# ----------------------------------------------------------------------------------------
# 7.2 The reward model
# ----------------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """A language model turned judge (InstructGPT's reward model): the GPT trunk reads the
    prompt and the reply, and a linear head maps the final hidden state of the reply's last
    real token, its <|end|>, to one number. That is the one position that has seen the
    whole reply. The trunk starts as the SFT model, which already reads the chat template
    and the tasks; the head starts at zero, so every reward starts at 0.
    forward(idx (B, T), mask (B, T) True at real tokens, padding on either side) -> (B,).
    norm: the mean and std of the rewards of the SFT policy's answers (7.5)."""

    def __init__(self, gpt, norm=None):
        super().__init__()
        self.gpt, self.cfg = gpt, gpt.cfg
        self.head = nn.Linear(gpt.cfg.n_embd, 1, device=gpt.wte.weight.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.norm = dict(norm or {"mean": 0.0, "std": 1.0})

    def forward(self, idx, mask):
        last = mask.size(1) - 1 - mask.flip(1).long().argmax(1)  # (B,) each row's last real column
        left = not mask[:, 0].all()  # right padding needs no mask: causal attention never looks ahead
        h = self.gpt(idx, mask=mask if left else None, return_hidden=True)  # (B, T, C)
        return self.head(h[torch.arange(idx.size(0), device=idx.device), last]).squeeze(-1).float()  # (B, C) -> (B,)


def pad_rows(rows, pad_id, device, left=False):
    """Token rows of any lengths -> idx (B, T) padded on the right (or left), mask (B, T)
    True at real tokens."""
    T = max(map(len, rows))
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, row in enumerate(rows):
        start = T - len(row) if left else 0
        idx[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, start:start + len(row)] = True
    return idx.to(device), mask.to(device)


@torch.no_grad()
def score_rows(rm, rows, pad_id, dtype, left=False, batch=256):
    """The rewards (float32, on the CPU) of token rows, a padded batch at a time."""
    rm.eval()
    device, out = rm.head.weight.device, []
    for s in range(0, len(rows), batch):
        idx, mask = pad_rows(rows[s:s + batch], pad_id, device, left)
        with autocast_ctx(str(device), dtype):
            out.append(rm(idx, mask).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def pair_margins(rm, pairs, pad_id, dtype):
    """r_chosen - r_rejected of each pair: > 0 where the reward model agrees with the label."""
    r = score_rows(rm, [p["ids"][0] for p in pairs] + [p["ids"][1] for p in pairs], pad_id, dtype)
    return r[:len(pairs)] - r[len(pairs):]


# ----------------------------------------------------------------------------------------
# 7.3 The loss and the training loop
# ----------------------------------------------------------------------------------------
def reward_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    """The Bradley-Terry model (1952), as InstructGPT (Ouyang et al. 2022) trains its reward
    model: P(chosen preferred) = sigmoid(r_c - r_r), and the loss is its negative log,
        -log sigmoid(r_c - r_r)            log 2 at equal rewards, toward 0 as r_c pulls ahead;
        -log sigmoid(r_c - r_r - m)        a margin m (Llama 2: larger for clearer
                                           preferences) asks r_c to lead by m;
        + coef * mean((r_c + r_r)^2)       centering (Eisenstein et al. 2023, TRL's
                                           center_rewards_coefficient): the loss sees only
                                           differences, so rewards could drift anywhere.
    r_chosen, r_rejected: (B,); margin a number or (B,)."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    return loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()


def validate_reward(rm, pairs, pad_id, cfg, dtype):
    """Pair accuracy and loss on pairs the reward model does not train on."""
    margins = pair_margins(rm, pairs, pad_id, dtype)
    m = torch.tensor([cfg.margin if p["margin"] is None else p["margin"] for p in pairs])
    rm.train()
    return (margins > 0).float().mean().item(), reward_loss(margins, torch.zeros_like(margins), m).item()


def train_reward_model(rm, train_pairs, val_pairs, pad_id, cfg, device, dtype):
    """7.3 AdamW on the Bradley-Terry loss over shuffled batches of pairs (each batch's chosen
    and rejected conversations in one forward), warmup then cosine decay to a tenth of
    rm_lr; every rm_eval_interval steps the validation pairs' accuracy (their loss breaks
    ties) picks the weights to keep. Rows with "stage": "reward" go to metrics.jsonl.
    Returns the best weights and the figures."""
    run = dataclasses.replace(cfg, learning_rate=cfg.rm_lr, min_lr=cfg.rm_lr / 10, max_steps=cfg.rm_steps,
                              warmup_steps=min(cfg.warmup_steps, cfg.rm_steps // 10))
    opt = configure_optimizer(rm, run, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    rng, order = random.Random(cfg.seed), []
    best, best_state, best_step, tokens = None, copy.deepcopy(rm.state_dict()), 0, 0
    t0, eval_s = time.perf_counter(), 0.0
    rm.train()
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a", buffering=1) as metrics:
        for step in range(1, cfg.rm_steps + 1):
            lr = get_lr(step, run)
            for group in opt.param_groups:
                group["lr"] = lr
            if len(order) < cfg.rm_batch_size:  # a new epoch, shuffled
                order = rng.sample(range(len(train_pairs)), len(train_pairs))
            batch, order = [train_pairs[i] for i in order[:cfg.rm_batch_size]], order[cfg.rm_batch_size:]
            idx, mask = pad_rows([p["ids"][0] for p in batch] + [p["ids"][1] for p in batch], pad_id, device)
            margin = torch.tensor([cfg.margin if p["margin"] is None else p["margin"] for p in batch], device=device)
            with autocast_ctx(device, dtype):
                r_chosen, r_rejected = rm(idx, mask).chunk(2)  # (2B,) -> (B,), (B,)
            loss = reward_loss(r_chosen, r_rejected, margin, cfg.center_coef)
            scaler.scale(loss + rm.gpt.router_loss()).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            tokens += sum(len(p["ids"][0]) + len(p["ids"][1]) for p in batch)  # counted on the host: no sync
            if step % cfg.log_interval == 0:
                check_finite(loss.item(), step)
                acc = (r_chosen > r_rejected).float().mean().item()
                tok_s = tokens / max(time.perf_counter() - t0 - eval_s, 1e-9)
                print(f"reward {step:5d}/{cfg.rm_steps} | loss {loss.item():.4f} | batch accuracy {acc:.1%} | "
                      f"lr {lr:.2e} | {tok_s:,.0f} tok/s")
                metrics.write(json.dumps({"stage": "reward", "rm_step": step, "rm_loss": loss.item(),
                                          "rm_accuracy": acc, "rm_lr": lr}) + "\n")
            if step % cfg.rm_eval_interval == 0 or step == cfg.rm_steps:
                t = time.perf_counter()
                acc, val_loss = validate_reward(rm, val_pairs, pad_id, cfg, dtype)
                better = best is None or (acc, -val_loss) > best
                if better:
                    best, best_state, best_step = (acc, -val_loss), copy.deepcopy(rm.state_dict()), step
                print(f"reward eval {step:5d} | val pair accuracy {acc:.1%} | val loss {val_loss:.4f}"
                      + (" | best" if better else ""))
                metrics.write(json.dumps({"stage": "reward", "rm_step": step, "rm_val_accuracy": acc,
                                          "rm_val_loss": val_loss}) + "\n")
                eval_s += time.perf_counter() - t
    train_s = time.perf_counter() - t0
    return best_state, {"steps": step, "best_step": best_step, "val_accuracy": best[0], "val_loss": -best[1],
                        "tokens_per_s": tokens / max(train_s - eval_s, 1e-9), "train_s": train_s}


# ----------------------------------------------------------------------------------------
# 7.4 The checks that catch a bad reward model
# ----------------------------------------------------------------------------------------
def auc(pos, neg):
    """The area under the ROC curve: the chance that a random right answer scores above a
    random wrong one (ties count half), counted with a sort (Mann-Whitney), not n^2 pairs.
    None without both kinds."""
    if not len(pos) or not len(neg):
        return None
    neg = neg.sort().values
    below = torch.searchsorted(neg, pos, right=False).double()  # wrong answers scoring below each right one
    tied = torch.searchsorted(neg, pos, right=True).double() - below
    return ((below + 0.5 * tied).sum() / (len(pos) * len(neg))).item()


def correlation(x, y):
    """Pearson's r of two (N,) tensors; None where one is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return (x @ y / denom).item() if denom > 0 else None


def calibration(margins, edges=(0.5, 0.6, 0.7, 0.8, 0.9, 1.0)):
    """Does sigmoid(r_c - r_r) mean what it says? The model's confidence in its own pick is
    sigmoid(|r_c - r_r|); in each confidence bin, the fraction of picks that agree with the
    label should be near the bin's mean confidence. Returns the bins and the expected
    calibration error, the pair-weighted mean of |confidence - agreement|."""
    conf, agree = torch.sigmoid(margins.abs()), (margins > 0).float()
    bins, ece = [], 0.0
    for lo, hi in zip(edges, edges[1:]):
        inside = (conf >= lo) & ((conf < hi) | (hi == edges[-1]))
        if inside.any():
            c, a = conf[inside].mean().item(), agree[inside].mean().item()
            bins.append({"bin": f"{lo:.1f}-{hi:.1f}", "pairs": int(inside.sum()), "confidence": c, "agreement": a})
            ece += inside.sum().item() / len(margins) * abs(c - a)
    return bins, ece


def padding_invariance(rm, rows, pad_id, dtype):
    """The largest change of a reward between its row scored alone and inside a batch of
    rows of other lengths, padded on the right and on the left. A head that read a padding
    position, or attention that let one in, shows up here; float rounding is ~1e-6."""
    if not rows:
        return None
    alone = torch.cat([score_rows(rm, [row], pad_id, dtype) for row in rows])
    return max((score_rows(rm, rows, pad_id, dtype, left=left) - alone).abs().max().item() for left in (False, True))


def reward_stats(rewards):
    """Mean, std and quantiles of (N,) rewards; None for fewer than 2."""
    if len(rewards) < 2:
        return None
    q = torch.quantile(rewards.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.double)).tolist()
    return {"mean": rewards.mean().item(), "std": rewards.std().item(), "min": rewards.min().item(),
            "p05": q[0], "median": q[1], "p95": q[2], "max": rewards.max().item()}


def plot_rewards(path, right, wrong):
    """rewards.png: histograms of the rewards of right and of wrong answers of the SFT policy
    (held-out prompts). Apart: the reward model separates them; overlapping: part08 will
    chase noise. Skipped where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    edges = torch.linspace(min(right.min(), wrong.min()).item(), max(right.max(), wrong.max()).item(), 41).tolist()
    ax.hist(right.tolist(), bins=edges, alpha=0.6, label=f"right answers ({len(right)})")
    ax.hist(wrong.tolist(), bins=edges, alpha=0.6, label=f"wrong answers ({len(wrong)})")
    ax.set_xlabel("reward")
    ax.set_ylabel("answers")
    ax.set_title("Rewards of the SFT policy's answers on held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------
# 7.5 Reward shaping for RL
# ----------------------------------------------------------------------------------------
def shape_rewards(raw, lengths, norm, length_penalty=0.0, clip=0.0):
    """What part08 optimizes, from the reward model's raw scores raw (N,) of replies
    lengths (N,) tokens long:
        (raw - mean) / std         norm's mean and std are those of the SFT policy's own
                                   answers: 0 is a typical SFT answer, +1 one std better,
                                   whatever scale training left the rewards on;
        - length_penalty * length  a price per token, against a reward that pays for length;
        clamp to [-clip, clip]     far outside the SFT answers the reward model has seen
                                   nothing, so no reward there is worth chasing (0 = off)."""
    shaped = (raw - norm["mean"]) / norm["std"] - length_penalty * lengths
    return shaped.clamp(-clip, clip) if clip > 0 else shaped


# ----------------------------------------------------------------------------------------
# 7 The reward-model stage: SFT policy in, reward model and its checks out
# ----------------------------------------------------------------------------------------
def accuracy_by(margins, pairs, key):
    """Pair accuracy per value of a pair's `key` ("source": gold, on_policy, file; "kind")."""
    groups = collections.defaultdict(list)
    for m, p in zip(margins.tolist(), pairs):
        if p[key]:
            groups[p[key]].append(m > 0)
    return {k: sum(v) / len(v) for k, v in groups.items()}


def last_user(pair):
    """The text a pair is split by: its last user turn, as a built-in prompt is (held_out)."""
    return next((m["content"] for m in reversed(pair["prompt"]) if m["role"] == "user"), "")


def shared_prompts(n, rng):
    """n training prompts shared equally among the tasks: {task: [prompt]}."""
    return {t.name: task_prompts(t, n // len(TASKS) + (i < n % len(TASKS)), False, rng) for i, t in enumerate(TASKS)}


def reward_prompts(cfg):
    """The prompts of the reward stage, drawn before anything is trained (a task with too
    few prompts for the flags stops the run at once): held-out ones for the checks (the
    evaluation side of part06's split), training ones for on-policy samples and for gold
    pairs. Returns (rng, test, policy, gold), rng to draw the corruptions with."""
    rng = random.Random(f"pairs-{cfg.seed}")
    test_prompts = {t.name: task_prompts(t, cfg.rm_eval_prompts, True, rng) for t in TASKS}
    return rng, test_prompts, shared_prompts(cfg.policy_prompts, rng), shared_prompts(cfg.gold_pairs, rng)


def reward_pairs(policy, tokenizer, prompts, file_pairs, cfg, dtype):
    """The training pairs (from training prompts: gold-vs-corrupted and on-policy, or
    --preference_data's), the held-out test pairs of every source, the policy's held-out
    samples (the AUC, the length correlation) and its training samples (the normalization).
    File pairs are split by part06's hash of their last user turn, so no test pair is
    trained on."""
    rng, test_prompts, train_prompts, gold_prompts = prompts
    t0 = time.perf_counter()
    train_samples = policy_samples(policy, tokenizer, train_prompts, cfg, dtype, cfg.seed)
    test_samples = policy_samples(policy, tokenizer, test_prompts, cfg, dtype, cfg.seed + 1)
    right = sum(s["right"] for s in train_samples + test_samples) / max(len(train_samples) + len(test_samples), 1)
    print(f"policy samples: {len(train_samples) + len(test_samples):,} answers at temperature 1 in "
          f"{time.perf_counter() - t0:.0f} s, {right:.1%} right")
    test = gold_pairs(test_prompts, rng, every_kind=True) + on_policy_pairs(test_samples)
    if file_pairs:
        test += [p for p in file_pairs if held_out(last_user(p))]
        train = [p for p in file_pairs if not held_out(last_user(p))]
    else:
        train = gold_pairs(gold_prompts, rng) + on_policy_pairs(train_samples)
    return train, test, train_samples, test_samples


def reward_checks(rm, tokenizer, test, samples, pad, dtype):
    """7.4 Every check on held-out data: pair accuracy per source and per corruption, their
    calibration, the AUC of the policy's right against wrong answers (all tasks pooled, as
    part08's batches mix them, and per task), the reward-length correlation, padding
    invariance and the distribution of rewards. Returns (checks, the samples' rewards)."""
    margins = pair_margins(rm, test, pad, dtype)
    bins, ece = calibration(margins)
    rewards = score_rows(rm, [s["ids"] for s in samples], pad, dtype)
    right = torch.tensor([s["right"] for s in samples], dtype=torch.bool)
    lengths = torch.tensor([len(tokenizer.encode(s["reply"])) for s in samples], dtype=torch.float)
    per_task = {}
    for t in TASKS:
        mine = torch.tensor([s["task"] == t.name for s in samples], dtype=torch.bool)
        per_task[t.name] = auc(rewards[right & mine], rewards[~right & mine])
    stats = {"all": reward_stats(rewards), "right": reward_stats(rewards[right]), "wrong": reward_stats(rewards[~right])}
    return {"pair_accuracy": {"gold": None, "on_policy": None, **accuracy_by(margins, test, "source")},
            "pair_accuracy_by_kind": accuracy_by(margins, test, "kind"),
            "auc": auc(rewards[right], rewards[~right]), "auc_per_task": per_task,
            "length_corr": correlation(rewards, lengths), "calibration": bins, "calibration_error": ece,
            "padding_max_diff": padding_invariance(rm, [s["ids"] for s in samples[:64:3]], pad, dtype),
            "reward_stats": stats}, rewards


def reward_modeling(policy, tokenizer, prompts, file_pairs, cfg, device, dtype):
    """7 The milestone: pairs (of reward_prompts(cfg)), the reward model trained from the SFT
    policy, its checks, its normalization; saves out_dir/reward.pt. Returns (the reward
    model, the summary's figures, scored samples for samples.txt)."""
    pad = tokenizer.special["<|pad|>"]
    train, test, train_samples, test_samples = reward_pairs(policy, tokenizer, prompts, file_pairs, cfg, dtype)
    train, dropped = encode_pairs(tokenizer, train, cfg.block_size)
    test, dropped_test = encode_pairs(tokenizer, test, cfg.block_size)
    if dropped + dropped_test:
        print(f"note: {dropped + dropped_test} pairs are longer than --block_size {cfg.block_size} tokens "
              "and were left out")
    random.Random(cfg.seed).shuffle(train)
    n_val = min(len(train) // 10, 500)  # validation pairs from the training side, for model selection
    val, train = train[:n_val], train[n_val:]
    if not val:
        die(f"the reward model needs at least 10 training pairs within --block_size; {len(train)} fit")
    count = collections.Counter(p["source"] for p in train)
    print(f"preference pairs: {len(train):,} to train on ({', '.join(f'{n:,} {s}' for s, n in count.items())}), "
          f"{len(val):,} to validate on, {len(test):,} held out")
    rm = RewardModel(copy.deepcopy(policy))
    print(f"== reward model: {sum(p.numel() for p in rm.parameters()):,} parameters")
    best, run = train_reward_model(rm, train, val, pad, cfg, device, dtype)
    rm.load_state_dict(best)
    reference = score_rows(rm, [s["ids"] for s in train_samples], pad, dtype)  # 7.5 the SFT answers
    rm.norm = {"mean": reference.mean().item() if len(reference) else 0.0,
               "std": max(reference.std().item(), 1e-6) if len(reference) > 1 else 1.0}
    save_model(os.path.join(cfg.out_dir, "reward.pt"), rm.gpt, cfg, tokenizer, kind="reward",
               head=rm.head.state_dict(), reward_norm=rm.norm, step=run["best_step"], val_accuracy=run["val_accuracy"])
    checks, rewards = reward_checks(rm, tokenizer, test, test_samples, pad, dtype)
    print_checks(checks)
    right = torch.tensor([s["right"] for s in test_samples], dtype=torch.bool)
    if right.any() and not right.all():
        plot_rewards(os.path.join(cfg.out_dir, "rewards.png"), rewards[right], rewards[~right])
    checks.update(normalization=rm.norm, reward_model=run, pairs={
        "train": dict(count), "validation": len(val), "held_out": dict(collections.Counter(p["source"] for p in test)),
        "too_long": dropped + dropped_test})
    return rm, checks, scored_samples(test_samples, rewards, rm.norm)


def fmt(x, spec=".3f"):
    """A figure that may be missing (None: no pairs or samples of that kind)."""
    return "n/a" if x is None else format(x, spec)


def print_checks(c):
    print("held-out pair accuracy: " + ", ".join(f"{k} {fmt(v, '.1%')}" for k, v in c["pair_accuracy"].items())
          + " (gold by corruption: " + ", ".join(f"{k} {v:.1%}" for k, v in c["pair_accuracy_by_kind"].items()) + ")")
    print(f"AUC right vs wrong answers of the SFT policy: {fmt(c['auc'])} ("
          + ", ".join(f"{k} {fmt(v)}" for k, v in c["auc_per_task"].items()) + ")")
    print(f"reward-length correlation {fmt(c['length_corr'])}; padding changes a reward by at most "
          f"{fmt(c['padding_max_diff'], '.1e')}; calibration error {c['calibration_error']:.3f}")
    print("calibration: " + "; ".join(f"{b['bin']}: {b['agreement']:.1%} of {b['pairs']}" for b in c["calibration"]))
    stats = c["reward_stats"]
    print("rewards of the SFT policy's answers: " + "; ".join(
        f"{k} mean {v['mean']:+.2f}, std {v['std']:.2f}" for k, v in stats.items() if v))


def scored_samples(samples, rewards, norm, n=2):
    """A few held-out answers per task with their rewards, for samples.txt."""
    lines, seen = [], collections.Counter()
    for s, r in zip(samples, rewards.tolist()):
        if seen[(s["task"], s["right"])] < n:
            seen[(s["task"], s["right"])] += 1
            lines.append(f"user: {s['prompt']}\nassistant: {s['reply']}  [{'right' if s['right'] else 'wrong'}] "
                         f"reward {r:+.2f} (normalized {(r - norm['mean']) / norm['std']:+.2f})")
    return lines


def score(cfg, device, dtype):
    """--score PROMPT --response TEXT: a saved reward model's reward for one reply."""
    path = cfg.reward_model or os.path.join(cfg.out_dir, "reward.pt")
    if not cfg.reward_model and not os.path.exists(path):
        die(f"--score: no reward model at {path}; run part07 first, or pass --reward_model")
    cfg, tokenizer, rm = load_model(cfg, path, device, kind="reward")
    ids = render_chat(tokenizer, user_turn(cfg.score) + [{"role": "assistant", "content": cfg.response}])[0]
    if len(ids) > cfg.block_size:
        die(f"--score: prompt and response are {len(ids)} tokens; the model reads at most {cfg.block_size}")
    raw = score_rows(rm, [ids], tokenizer.special["<|pad|>"], dtype)
    n = torch.tensor([float(len(tokenizer.encode(cfg.response)))])
    shaped = shape_rewards(raw, n, rm.norm, cfg.length_penalty, cfg.reward_clip)
    task = task_of(cfg.score)
    verdict = ""
    if task:
        verdict = f"; the {task.name} checker says " + ("right" if task.check(cfg.score, cfg.response) else "wrong")
    print(f"reward {raw.item():+.3f} (shaped for RL {shaped.item():+.3f}){verdict}")
    return raw.item()


# ----------------------------------------------------------------------------------------
# 8.1 The actors: policy, reference, reward model
# ----------------------------------------------------------------------------------------
def make_actors(policy, rm, cfg):
    """8.1 The policy (trained), a frozen reference copy of it (the KL anchor) and the frozen
    reward model (None: the verifier scores, 9.2). All stay in eval mode through RL: dropout
    would make the update's log-probs differ from the sampler's, so the first ratio would
    not be 1."""
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    if rm is not None:
        rm.requires_grad_(False).eval()
    return policy.eval(), ref, rm


def response_logprobs(model, idx, mask, P, temperature):
    """One forward over (B, L) rows, a prompt left-padded to P columns and then a response,
    -> per response token (B, R = L - P): the log-probability of the token under the
    sampling distribution softmax(logits / temperature), in float32 (in bf16 a ratio of
    1.01 is rounding) and the entropy of that distribution. Position t predicts token
    t + 1, so the response's tokens are predicted from columns P - 1 .. L - 2."""
    h = model(idx, mask=mask, return_hidden=True)  # (B, L, C)
    h_resp = h[:, P - 1:-1]  # (B, L, C) -> (B, R, C)
    logits = model.lm_head(h_resp)[..., :model.cfg.vocab_size].float() / temperature  # (B, R, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, idx[:, P:, None]).squeeze(-1)  # (B, R, V) -> (B, R)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, R)
    return logp, entropy


# ----------------------------------------------------------------------------------------
# 8.2 Rollouts: prompts without answers, one sampled response each
# ----------------------------------------------------------------------------------------
def rl_record(messages, answer=None):
    """An RL prompt: the conversation so far (ending in a user turn), its last user turn (what
    a built-in task's checker reads) and an optional gold answer."""
    return {"messages": messages, "prompt": messages[-1]["content"], "answer": answer}


def read_prompts(cfg):
    """--prompt_data's records, read before anything is trained or written: {"prompt": text}
    or {"messages": [..., a user turn]}, and an optional gold "answer" (a string) that only
    the checker reads (exact match, spaces aside); prompts of the built-in tasks need none."""
    out = []
    for where, r in read_records(cfg.prompt_data, cfg, "--prompt_data"):
        if not isinstance(r, dict) or not (isinstance(r.get("prompt"), str) or "messages" in r):
            die(f"{where}: a prompt record needs 'prompt' (a string) or 'messages'")
        if isinstance(r.get("prompt"), str):
            messages = user_turn(r["prompt"])
        else:
            messages = to_messages({"messages": r["messages"]} if not isinstance(r["messages"], list) else
                                   {"messages": r["messages"] + [{"role": "assistant", "content": ""}]}, where)[:-1]
            if not messages or messages[-1]["role"] != "user":
                die(f"{where}: 'messages' must end with a user turn, which the policy answers")
        if r.get("answer") is not None and not isinstance(r["answer"], str):
            die(f"{where}: 'answer' must be a string")
        if cfg.reward == "verifier" and r.get("answer") is None and task_of(messages[-1]["content"]) is None:
            die(f"{where}: --reward verifier needs a gold 'answer' for a prompt of no built-in task")
        out.append(rl_record(messages, r.get("answer")))
    if not out:
        die(f"--prompt_data {cfg.prompt_data}: no prompts")
    return out


def prompt_batches(cfg, tokenizer, file_prompts, rng):
    """Batches of rollout_batch RL prompts, forever, each with "ids" (rendered up to
    <|assistant|>): fresh prompts of the built-in tasks from the training side of part06's
    split, each task equally likely (the generator is unlimited; no answer comes with
    them), or --prompt_data's, shuffled epoch by epoch. A prompt that leaves the model no
    room to answer (block_size) is left out (a built-in one is replaced by a fresh draw);
    none left ends the run."""
    def encoded(records):
        out = []
        for r in records:
            ids = render_chat(tokenizer, r["messages"], generation_prompt=True)[0]
            if len(ids) < cfg.block_size:
                out.append({**r, "ids": ids})
        return out

    if file_prompts:
        pool = encoded(file_prompts)
        if not pool:
            die(f"--prompt_data: every prompt is at least --block_size {cfg.block_size} tokens long")
        if len(pool) < len(file_prompts):
            print(f"note: {len(file_prompts) - len(pool)} of {len(file_prompts)} prompts are too long for "
                  f"--block_size {cfg.block_size} and were left out")
    order = []
    while True:
        if not file_prompts:
            batch = []
            for _ in range(100):  # fresh draws until the batch is full (too long prompts left out)
                count = collections.Counter(rng.choice(TASKS).name for _ in range(cfg.rollout_batch - len(batch)))
                batch += encoded(rl_record(user_turn(p)) for name, n in count.items()
                                 for p in task_prompts(TASK_BY_NAME[name], n, False, rng))
                if len(batch) == cfg.rollout_batch:
                    break
            if not batch:
                die(f"--block_size {cfg.block_size} leaves no room to answer the built-in prompts")
            rng.shuffle(batch)
            yield batch
            continue
        while len(order) < cfg.rollout_batch:
            order += rng.sample(range(len(pool)), len(pool))
        yield [pool[i] for i in order[:cfg.rollout_batch]]
        order = order[cfg.rollout_batch:]


def rl_check(record, reply):
    """The checker's verdict on a reply: its gold answer, else its built-in task's check, else
    None (nothing can tell). With --reward verifier it is the reward (9.2)."""
    if record["answer"] is not None:
        return reply.strip() == record["answer"].strip()
    task = task_of(record["prompt"])
    return task.check(record["prompt"], reply) if task else None


@torch.no_grad()
def rollout(policy, ref, rm, tokenizer, records, cfg, dtype, generator):
    """8.2 One batch of experience. Each prompt gets one response, sampled with the KV cache
    at --temperature from the whole distribution (no top-k or top-p: the update must score
    tokens under the distribution they were drawn from) and stopped at <|end|>. The rows are
    then laid out once for every forward that reads them:
        idx  (B, P + R)  the prompt left-padded to P columns, the response right-padded to R
        mask (B, P + R)  True at real tokens; a response's run through its <|end|>, so the
                         padding after it is masked out of every loss and figure
    and the policy (old log-probs), the reference (its log-probs) and the reward model (one
    score per response, where there is one) read them. sample_logp: the sampler's own log-probs,
    which the recomputed ones must equal (a temperature, a mask or a position wrong in
    either shows up there first)."""
    device = policy.wte.weight.device
    pad, end = tokenizer.special["<|pad|>"], tokenizer.special["<|end|>"]
    prompts = [r["ids"] for r in records]
    with autocast_ctx(str(device), dtype):
        new, ended, sample_logp = generate_batch(policy, prompts, cfg.max_answer_tokens, end, pad, cfg.temperature,
                                                 generator=generator, logprobs=True)
    responses = [ids + [end] if e else ids for ids, e in zip(new, ended)]
    prompt_idx, prompt_mask = pad_rows(prompts, pad, device, left=True)
    resp_idx, resp_mask = pad_rows(responses, pad, device)
    idx, mask, P = torch.cat([prompt_idx, resp_idx], 1), torch.cat([prompt_mask, resp_mask], 1), prompt_idx.size(1)
    with autocast_ctx(str(device), dtype):
        logp, entropy = response_logprobs(policy, idx, mask, P, cfg.temperature)
        ref_logp = response_logprobs(ref, idx, mask, P, cfg.temperature)[0]
        raw = rm(idx, mask) if rm is not None else None  # (B,): each row's last real token is its response's last
    lengths = resp_mask.sum(1)
    ended = torch.tensor(ended, device=device)
    replies = [tokenizer.decode(ids) for ids in new]
    right = [rl_check(r, reply) for r, reply in zip(records, replies)]
    if cfg.reward == "verifier":
        score = verifier_rewards(records, replies, ended.tolist(), right, cfg.format_reward).to(device)
    else:
        score = shape_rewards(raw, lengths.float(), rm.norm, cfg.length_penalty, cfg.reward_clip)
    score = score - cfg.missing_end_penalty * (~ended).float()  # 8.3 a response that never ends
    return {"idx": idx, "mask": mask, "P": P, "resp_mask": resp_mask, "logp": logp, "ref_logp": ref_logp,
            "entropy": entropy, "raw": raw, "score": score, "ended": ended,
            "lengths": lengths, "sample_logp": sample_logp.to(device), "replies": replies, "right": right}


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def judge(model, rm, tokenizer, prompts, cfg, dtype):
    """Greedy answers to held-out prompts {task: [prompt]}: the checker's gold accuracy per
    task, easy, hard and overall, and the mean shaped reward-model score of the same answers
    (the proxy RL optimizes; None without a reward model). Side by side they show reward
    hacking: the proxy rising while gold falls."""
    flat = [(t, p) for t, ps in prompts.items() for p in ps]
    replies = answer(model, tokenizer, [user_turn(p) for _, p in flat], cfg, dtype)
    hits, rows = collections.defaultdict(list), []
    for (t, p), reply in zip(flat, replies):
        hits[t].append(TASK_BY_NAME[t].check(p, reply))
        if rm is None:
            continue
        ids = render_chat(tokenizer, user_turn(p) + [{"role": "assistant", "content": reply}])[0]
        if len(ids) <= rm.cfg.block_size:
            rows.append((ids, len(tokenizer.encode(reply)) + 1))  # + 1: the <|end|>
    if not rows:
        return by_level({t: sum(h) / len(h) for t, h in hits.items()}), None
    raw = score_rows(rm, [ids for ids, _ in rows], tokenizer.special["<|pad|>"], dtype)
    shaped = shape_rewards(raw, torch.tensor([float(n) for _, n in rows]), rm.norm, cfg.length_penalty,
                           cfg.reward_clip)
    return by_level({t: sum(h) / len(h) for t, h in hits.items()}), shaped.mean().item()


# ----------------------------------------------------------------------------------------
# 8 The RL stage: the SFT policy against the reward (9.2), and the fair baseline
# ----------------------------------------------------------------------------------------
def check_reward_model(rm_cfg, rm_tokenizer, cfg, tokenizer, path):
    """The reward model must read the policy's tokens (the same tokenizer, by its name, which
    a BPE tokenizer's merges make) and responses as long as the policy writes. tokenizer
    None, before pretraining has made the policy's: its kind and the length alone."""
    same = rm_tokenizer.name == tokenizer.name if tokenizer else (rm_tokenizer.name == "byte") == (cfg.tokenizer == "byte")
    if not same:
        die(f"--reward_model {path} reads other tokens ({rm_tokenizer.name}) than the policy "
            f"({tokenizer.name if tokenizer else cfg.tokenizer})")
    if rm_cfg.block_size < cfg.block_size:
        die(f"--reward_model {path} reads {rm_cfg.block_size} tokens; the policy writes up to --block_size "
            f"{cfg.block_size}")


def continued_sft(model, tokenizer, convs, cfg, device, dtype, seconds):
    """The control: the SFT model trained on its own demonstrations (the same split as
    part06's) for the RL phase's time, at the rate SFT ended on, with no early stop, its
    best validation weights kept. Whatever RL gains beyond this, the demonstrations could
    not give."""
    examples, _ = make_examples(tokenizer, convs, cfg.block_size)
    n_val = min(cfg.sft_val_examples, len(examples) // 2)
    print(f"== control: SFT continued for {seconds:.0f} s, the RL phase's time")
    best, figures = sft(copy.deepcopy(model).train(), tokenizer, examples[n_val:], examples[:n_val],
                        dataclasses.replace(cfg, sft_patience=2**62), device, dtype, "sft_more", seconds)
    control = copy.deepcopy(model)
    control.load_state_dict(best)
    return control, figures


def reinforce(policy, rm, tokenizer, convs, file_prompts, cfg, device, dtype):
    """8 The milestone: held-out gold accuracy and proxy score of the SFT policy, GRPO against
    the reward (9.2), then the control, each judged on the same held-out prompts. Returns
    (the RL policy, the summary's figures)."""
    eval_set = eval_prompts(cfg)
    sft_model = copy.deepcopy(policy)
    gold, proxy = {}, {}
    gold["sft"], proxy["sft"] = judge(sft_model, rm, tokenizer, eval_set, cfg, dtype)
    groups = dataclasses.replace(cfg, rollout_batch=cfg.rollout_batch // cfg.group_size)  # prompts per rollout
    batches = prompt_batches(groups, tokenizer, file_prompts, random.Random(f"rl-{cfg.seed}"))
    policy, run = grpo(policy, rm, tokenizer, batches, eval_set, cfg, device, dtype)
    gold["rl"], proxy["rl"] = judge(policy, rm, tokenizer, eval_set, cfg, dtype)
    control = None
    if cfg.control:
        control, control_run = continued_sft(sft_model, tokenizer, convs, cfg, device, dtype, run["rl_s"])
        gold["sft_more"], proxy["sft_more"] = judge(control, rm, tokenizer, eval_set, cfg, dtype)
    print_accuracy(gold)
    # RL raises the reward of sampled answers, which greedy accuracy does not measure: judge samples too
    sampled = {name: pass_at_k(m, tokenizer, eval_set, cfg, dtype, cfg.pass_k)
               for name, m in (("sft", sft_model), ("rl", policy), ("sft_more", control)) if m is not None}
    print(f"hard tasks, {cfg.pass_k} answers per prompt at temperature 1: " + ", ".join(
        f"{name} {v['sampled']['hard']:.1%} right, pass@{v['k']} {v['hard']:.1%}" for name, v in sampled.items()))
    if rm is not None:
        print("reward-model score of the greedy answers: " + ", ".join(f"{k} {fmt(v, '+.3f')}" for k, v in proxy.items()))
    figures = {"gold_accuracy": gold, "sampled_accuracy": sampled, "rm_score": proxy, "kl": run["kl"], "grpo": run,
               "rl_s": run["rl_s"], "flat_group_fraction": run["flat_group_fraction"]}
    if control is not None:
        figures.update(control_s=control_run["train_s"], control_steps=control_run["steps"])
    return policy, figures


# ----------------------------------------------------------------------------------------
# 9.1-9.3 Groups, verifiable rewards, group-relative advantages
# ----------------------------------------------------------------------------------------
def answer_form(text):
    """The shape of an answer: each run of digits, lowercase or uppercase letters written as
    one character ("12 3" -> "0 0", "Cat" -> "Aa")."""
    return re.sub(r"[0-9]+", "0", re.sub(r"[a-z]+", "a", re.sub(r"[A-Z]+", "A", text.strip())))


def gold_answer(record):
    """An RL record's gold answer: its own, else its built-in task's, else None."""
    if record["answer"] is not None:
        return record["answer"]
    task = task_of(record["prompt"])
    return task.solve(record["prompt"]) if task else None


def verifier_rewards(records, replies, ended, right, format_reward):
    """9.2 The verifiable reward (DeepSeek-R1's rule-based reward): 1 for a right reply, 0 for
    a wrong one (the checker's verdict, `right`), plus format_reward for a reply that ended
    and has the gold answer's form (answer_form), right or not: a partial credit that
    teaches the shape of an answer first. (B,) float32."""
    def well_formed(record, reply, ended):
        gold = gold_answer(record)
        return ended and gold is not None and answer_form(reply) == answer_form(gold)
    return torch.tensor([float(bool(ok)) + format_reward * well_formed(r, reply, e)
                         for r, reply, e, ok in zip(records, replies, ended, right)])


def group_advantages(rewards, group_size, scale="group", eps=1e-4):
    """9.3 GRPO's baseline is the group (Shao et al. 2024, DeepSeekMath): rows g*G .. g*G + G - 1
    answer one prompt, and each response is judged against its siblings,
        A_i = (r_i - mean(r of its group)) / (std(r of its group) + eps)
    the same A_i for every token of the response: no critic, no GAE. scale "batch": divide
    by the std of the whole batch's rewards instead (one scale for all prompts); "none": do
    not divide (Dr. GRPO, Liu et al. 2025: a group's std is smallest for prompts the policy
    nearly always or nearly never gets right, so dividing by it weights those most). std is
    the sample std (n - 1), as TRL computes it. A flat group, every reward equal (all right,
    all wrong), has A = 0 exactly: it carries no signal. Returns (A (B,), flat (B / G,))."""
    r = rewards.float().view(-1, group_size)  # (B,) -> (groups, G)
    flat = (r == r[:, :1]).all(1)
    centered = r - r.mean(1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.float().std() + eps)
    return centered.masked_fill(flat[:, None], 0.0).view(-1), flat


def take_rows(batch, rows):
    """The rollout's rows `rows` (a list of indices), every per-row entry cut alike."""
    return {k: v if k == "P" or v is None else [v[i] for i in rows] if isinstance(v, list) else v[rows]
            for k, v in batch.items()}


def join_rollouts(batches, pad_id):
    """Rollouts as one, in the same layout: the prompts left-padded to the longest P, the
    responses right-padded to the longest R (padding is masked out of every forward)."""
    P, R = max(b["P"] for b in batches), max(b["resp_mask"].size(1) for b in batches)

    def pad(x, left, right, value):  # (B, T) -> (B, left + T + right)
        return torch.cat([x.new_full((x.size(0), left), value), x, x.new_full((x.size(0), right), value)], 1)

    out = {"P": P}
    for k, v in batches[0].items():
        if k == "P" or v is None:
            out.setdefault(k, v)
        elif isinstance(v, list):
            out[k] = [x for b in batches for x in b[k]]
        elif k in ("idx", "mask"):  # [prompt | response] columns
            out[k] = torch.cat([pad(b[k], P - b["P"], R - b["resp_mask"].size(1), pad_id if k == "idx" else False)
                                for b in batches])
        elif v.dim() == 2:  # per response token
            out[k] = torch.cat([pad(b[k], 0, R - b[k].size(1), 0) for b in batches])
        else:  # per response
            out[k] = torch.cat([b[k] for b in batches])
    return out


def group_rollout(policy, ref, rm, tokenizer, batches, cfg, dtype, generator):
    """9.1 One iteration's experience: rollout_batch / G prompts from `batches`, each repeated
    G times so that one call of rollout (8.2) samples all G responses of every prompt in one
    batch with the KV cache; then their rewards' advantages (9.3). --skip_flat_groups
    (DAPO's dynamic sampling, Yu et al. 2025): flat groups are left out and more prompts
    drawn until rollout_batch responses with signal are in hand, at most --max_draws
    rollouts. The batch also holds "drawn_score" and "drawn_right", the mean reward and the
    checker's verdicts of every response drawn (the kept ones alone are a biased sample).
    Returns (the batch, the fraction of the groups drawn that were flat)."""
    kept, flat_groups, groups, scores, right = [], 0, 0, [], []
    for _ in range(cfg.max_draws if cfg.skip_flat_groups else 1):
        records = [r for r in next(batches) for _ in range(cfg.group_size)]
        batch = rollout(policy, ref, rm, tokenizer, records, cfg, dtype, generator)
        batch["advantages"], flat = group_advantages(batch["score"], cfg.group_size, cfg.scale_rewards)
        flat_groups, groups = flat_groups + int(flat.sum()), groups + len(flat)
        scores, right = scores + [batch["score"]], right + batch["right"]
        if not cfg.skip_flat_groups:
            break
        kept.append(take_rows(batch, (~flat).repeat_interleave(cfg.group_size).nonzero()[:, 0].tolist()))
        if sum(len(b["replies"]) for b in kept) >= cfg.rollout_batch:
            break
    if any(b["replies"] for b in kept):  # else no draw had signal: the last, where only the KL term pulls
        batch = join_rollouts(kept, tokenizer.special["<|pad|>"])
        batch = take_rows(batch, list(range(min(cfg.rollout_batch, len(batch["replies"])))))
    batch.update(drawn_score=torch.cat(scores).mean(), drawn_right=right)
    return batch, flat_groups / groups


# ----------------------------------------------------------------------------------------
# 9.4 The objective: the clipped surrogate, the k3 KL, three ways to average tokens
# ----------------------------------------------------------------------------------------
def k3_kl(logp, ref_logp):
    """Per-token KL(policy || reference) from the policy's own samples (Schulman 2020,
    "Approximating KL divergence"; DeepSeekMath's eq. 4), with d = ref_logp - logp:
        k3 = exp(d) - d - 1     >= 0 (e^d >= 1 + d), 0 exactly where the two agree
    unbiased like part08's k1 = logp - ref_logp, but never negative and less noisy; its
    gradient in logp is 1 - exp(d)."""
    d = ref_logp - logp
    return d.exp() - d - 1


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_low, clip_high, beta, loss_type, max_tokens):
    """9.4 The GRPO objective over response tokens (B, R), each response's advantage (B,) given
    to all its tokens:
        ratio = exp(logp - old_logp)
        l_t   = -min(ratio * A, clamp(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * k3_t
    PPO's clipped surrogate (clip_high > clip_low is DAPO's clip-higher: a rare token may
    grow further, which keeps entropy up) with the KL to the reference in the loss, not in
    the reward. loss_type says how tokens are averaged:
        grpo     1/B sum_i 1/|o_i| sum_t l   (DeepSeekMath, Shao et al. 2024: per-response
                                              mean, then mean; a long response's tokens count less)
        dr_grpo  sum_i sum_t l / (B * max_tokens)   (Dr. GRPO, Liu et al. 2025: a constant,
                                              so no length bias)
        dapo     sum_i sum_t l / sum_i |o_i|  (DAPO, Yu et al. 2025: every token of the
                                              batch weighs the same)
    Returns (loss, clip fraction: tokens whose ratio lies outside the clip range, mean k3)."""
    ratio = (logp - old_logp).exp()
    a = advantages[:, None]  # (B,) -> (B, 1): one advantage per response
    surrogate = torch.min(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    kl = k3_kl(logp, ref_logp)
    per_token = (-surrogate + beta * kl) * mask
    if loss_type == "grpo":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (mask.size(0) * max_tokens)
    else:
        loss = per_token.sum() / mask.sum().clamp(min=1)
    clip_frac = masked_mean(((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float(), mask)
    return loss, clip_frac, masked_mean(kl, mask)


def grpo_update(policy, opt, batch, cfg, dtype, generator, scaler=None):
    """9.4 --num_iterations passes over one rollout in shuffled minibatches of
    --grpo_minibatch responses, one AdamW step each (scaler: the run's GradScaler for
    float16), the gradient norm clipped to --grad_clip. The first step of the first pass
    has ratio 1: the plain policy gradient of the group-relative advantages. Returns the
    mean figures (tensors: read once per iteration)."""
    device, params = batch["idx"].device, [p for g in opt.param_groups for p in g["params"]]
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    figures = collections.defaultdict(list)
    for _ in range(cfg.num_iterations):
        for rows in torch.randperm(batch["idx"].size(0), generator=generator).to(device).split(cfg.grpo_minibatch):
            with autocast_ctx(str(device), dtype):
                logp, _ = response_logprobs(policy, batch["idx"][rows], batch["mask"][rows], batch["P"], cfg.temperature)
            loss, clip_frac, kl = grpo_loss(logp, batch["logp"][rows], batch["ref_logp"][rows],
                                            batch["advantages"][rows], batch["resp_mask"][rows], cfg.clip_low,
                                            cfg.clip_high, cfg.beta, cfg.loss_type, cfg.max_answer_tokens)
            loss = loss + policy.router_loss()
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            for k, v in (("grpo_loss", loss), ("clip_frac", clip_frac), ("kl_penalty", kl)):
                figures[k].append(v.detach())
    return {k: torch.stack(v).mean() for k, v in figures.items()}


# ----------------------------------------------------------------------------------------
# 9.5 Diagnostics and the GRPO loop
# ----------------------------------------------------------------------------------------
def plot_grpo(path, rows):
    """grpo.png: the training reward and the gold accuracy of greedy answers to held-out
    prompts over the iterations, and the KL, the entropy and the fraction of flat groups per
    iteration. Skipped where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    evals, iters = [r for r in rows if "gold_hard" in r], [r for r in rows if "entropy" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["grpo_iter"] for r in iters], [r["score"] for r in iters], alpha=0.5, label="training reward")
    left.set_xlabel("GRPO iteration")
    left.set_ylabel("mean reward")
    gold = left.twinx()
    at = [r["grpo_iter"] for r in evals]
    gold.plot(at, [r["gold_hard"] for r in evals], "s-", color="tab:red", label="gold accuracy, hard tasks")
    gold.plot(at, [r["gold_easy"] for r in evals], "^-", color="tab:green", label="gold accuracy, easy tasks")
    gold.set_ylabel("held-out gold accuracy")
    left.legend(loc="upper left", fontsize=8)
    gold.legend(loc="lower right", fontsize=8)
    left.set_title("Training reward and held-out gold")
    for key, label in (("kl", "KL to the reference"), ("entropy", "entropy per token"),
                       ("flat_groups", "fraction of flat groups")):
        right.plot([r["grpo_iter"] for r in iters], [r[key] for r in iters], label=label)
    right.set_xlabel("GRPO iteration")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def grpo(policy, rm, tokenizer, batches, eval_set, cfg, device, dtype):
    """9.1-9.5 The loop: --grpo_iters times, a group rollout and its advantages (9.1-9.3), then
    the update (9.4); a progress line and a metrics.jsonl row ("stage": "grpo") every
    iteration, and every --grpo_eval_interval iterations the gold accuracy of greedy answers
    to the held-out prompts ("stage": "grpo_eval"), saved with the policy to
    out_dir/grpo.pt. The last policy is the result. Returns (the policy, the figures)."""
    policy, ref, rm = make_actors(policy, rm, cfg)
    run = dataclasses.replace(cfg, learning_rate=cfg.grpo_lr, min_lr=cfg.grpo_lr / 10, weight_decay=0.0,
                              max_steps=cfg.grpo_iters, warmup_steps=max(1, cfg.grpo_iters // 10))
    opt = configure_optimizer(policy, run, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    sampler = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffler = torch.Generator().manual_seed(cfg.seed)
    path, saved, flat_fractions, sampled = os.path.join(cfg.out_dir, "grpo.pt"), None, [], 0
    rows, t0, eval_s, last = [], time.perf_counter(), 0.0, {}
    print(f"== GRPO: {trainable(policy):,} policy parameters, no critic; {cfg.grpo_iters} iterations of "
          f"{cfg.rollout_batch // cfg.group_size} prompts x {cfg.group_size} responses; reward: {cfg.reward}")
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a", buffering=1) as metrics:
        for it in range(1, cfg.grpo_iters + 1):
            lr = get_lr(it, run)
            for group in opt.param_groups:
                group["lr"] = lr
            batch, flat = group_rollout(policy, ref, rm, tokenizer, batches, cfg, dtype, sampler)
            figures = grpo_update(policy, opt, batch, cfg, dtype, shuffler, scaler)
            mask = batch["resp_mask"]
            figures.update(score=batch["drawn_score"], kl=((batch["logp"] - batch["ref_logp"]) * mask).sum(1).mean(),
                           entropy=masked_mean(batch["entropy"], mask), length=batch["lengths"].float().mean(),
                           ended=batch["ended"].float().mean(),
                           logp_gap=((batch["sample_logp"] - batch["logp"]).abs() * mask).max())
            if batch["raw"] is not None:
                figures["raw_score"] = batch["raw"].mean()
            last = {k: v.item() for k, v in figures.items()}  # the one read of the iteration's figures
            checked = [r for r in batch["drawn_right"] if r is not None]
            last.update(grpo_iter=it, grpo_lr=lr, flat_groups=flat, gold=sum(checked) / len(checked) if checked else None)
            if not math.isfinite(last["grpo_loss"]):
                die(f"GRPO diverged: the loss is {last['grpo_loss']} at iteration {it}; "
                    + (f"{path} holds the policy of iteration {saved}" if saved else "no GRPO policy was saved")
                    + " (a lower --grpo_lr may help)")
            flat_fractions.append(flat)
            sampled += len(batch["drawn_right"])
            rows.append(last)
            metrics.write(json.dumps({"stage": "grpo", **last}) + "\n")
            if it % cfg.log_interval == 0 or it == 1:
                print(f"grpo {it:4d}/{cfg.grpo_iters} | reward {last['score']:+.3f} | gold {fmt(last['gold'], '.1%')} | "
                      f"flat groups {flat:.0%} | kl {last['kl']:.3f} | entropy {last['entropy']:.3f} | "
                      f"clip {last['clip_frac']:.1%} | len {last['length']:.1f} | {time.perf_counter() - t0 - eval_s:.0f} s")
            if it % cfg.grpo_eval_interval == 0 or it == cfg.grpo_iters:
                t = time.perf_counter()
                gold, proxy = judge(policy, rm, tokenizer, eval_set, cfg, dtype)
                row = {"grpo_iter": it, "kl": last["kl"], "rm_score": proxy, "gold_easy": gold["easy"],
                       "gold_hard": gold["hard"], "gold_overall": gold["overall"]}
                rows.append(row)
                metrics.write(json.dumps({"stage": "grpo_eval", **row}) + "\n")
                print(f"grpo eval {it:4d} | held-out gold easy {fmt(gold['easy'], '.1%')}, hard {fmt(gold['hard'], '.1%')} | "
                      f"rm score {fmt(proxy, '+.3f')} | kl {last['kl']:.3f}")
                save_model(path, policy, cfg, tokenizer, step=it, grpo_iter=it)
                saved, eval_s = it, eval_s + time.perf_counter() - t
    plot_grpo(os.path.join(cfg.out_dir, "grpo.png"), rows)
    return policy, {**last, "rl_s": time.perf_counter() - t0 - eval_s, "iterations": cfg.grpo_iters,
                    "sampled_responses": sampled, "flat_group_fraction": sum(flat_fractions) / len(flat_fractions)}


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
             "ckpt_interval", "moe_every", "sft_examples", "sft_val_examples", "sft_steps", "sft_batch_size",
             "sft_eval_interval", "sft_patience", "lora_rank", "eval_prompts", "pass_k", "max_answer_tokens",
             "policy_prompts", "policy_samples", "rm_eval_prompts", "rm_steps", "rm_batch_size", "rm_eval_interval",
             "rollout_batch", "grpo_iters", "num_iterations", "grpo_minibatch", "max_draws", "grpo_eval_interval")
    in_range(cfg, 0, None, "n_kv_head", "window", "sink", "max_seconds", "grad_clip", "weight_decay",
             "max_new_tokens", "temperature", "top_k", "warmup_steps", "min_lr", "n_experts",
             "expert_hidden", "n_shared_experts", "capacity_factor", "aux_loss_coef", "z_loss_coef",
             "balance_rate", "gold_pairs", "margin", "center_coef", "length_penalty",
             "reward_clip", "missing_end_penalty", "format_reward", "clip_high", "beta")
    in_range(cfg, 2, None, "group_size")
    in_range(cfg, 0, 1, "clip_low")
    in_range(cfg, 0, 1, "dropout", "beta1", "beta2")
    if min(cfg.learning_rate, cfg.dist_timeout, cfg.sft_lr, cfg.lora_lr, cfg.lora_alpha, cfg.rm_lr, cfg.grpo_lr) <= 0:
        die("--learning_rate, --sft_lr, --lora_lr, --lora_alpha, --rm_lr, --grpo_lr and --dist_timeout must be positive")
    if cfg.rollout_batch % cfg.group_size:
        die(f"--rollout_batch {cfg.rollout_batch} is not a multiple of --group_size {cfg.group_size}: "
            "each prompt gets a whole group")
    if cfg.rollout_batch % cfg.grpo_minibatch:
        die(f"--rollout_batch {cfg.rollout_batch} does not divide into minibatches of --grpo_minibatch "
            f"{cfg.grpo_minibatch}")
    if cfg.reward == "rm" and not (cfg.reward_model or cfg.preference_data or cfg.gold_pairs):
        die("--reward rm needs a reward model: pass --reward_model (part07's reward.pt), or let this run train "
            "one from --preference_data or the built-in pairs (--gold_pairs > 0)")
    if cfg.reward == "verifier" and cfg.preference_data:
        die("--preference_data trains a reward model, which --reward verifier does not use: add --reward rm")
    if cfg.temperature == 0 and not (cfg.sample_only or cfg.chat or cfg.score):
        die("--temperature 0 is greedy decoding; GRPO samples its groups: pass a temperature > 0")
    if cfg.preference_data and cfg.reward_model:
        die("--preference_data trains a reward model, --reward_model brings one: pick one")
    if cfg.lora_rank > cfg.n_embd:
        die(f"--lora_rank {cfg.lora_rank} must not exceed the width --n_embd {cfg.n_embd}")
    if cfg.resume and cfg.overwrite:
        die("--resume continues the run in --out_dir, --overwrite starts over: pick one")
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
    if cfg.tokenizer == "bpe" and not cfg.tokenizer_file and cfg.vocab_size < 257 + len(CHAT_TOKENS):
        die(f"--vocab_size {cfg.vocab_size}: BPE needs at least 256 bytes + {1 + len(CHAT_TOKENS)} special tokens")
    if cfg.tokenizer_file and not os.path.isfile(cfg.tokenizer_file):
        die(f"--tokenizer_file {cfg.tokenizer_file}: no such file")
    if cfg.n_experts and not 1 <= cfg.moe_top_k <= cfg.n_experts:
        die(f"--moe_top_k {cfg.moe_top_k} must be between 1 and --n_experts {cfg.n_experts}")
    if cfg.grouped_mm == "true" and not hasattr(F, "grouped_mm"):
        die(f"--grouped_mm true needs torch >= 2.10 (F.grouped_mm); this is {torch.__version__}")
    if cfg.init_from and (cfg.resume or cfg.tokenizer_file):
        die("--init_from starts a run from a folder's weights and tokenizer: drop --resume and --tokenizer_file")
    if cfg.response and not cfg.score:
        die("--response is the reply --score judges: pass --score PROMPT too")
    if cfg.export_hf and hf_refusal(cfg):  # before training, not after
        die(f"--export_hf: {hf_refusal(cfg)}")


RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "summary.json", "samples.txt", "loss.png", "sft.pt", "lora.pt",
             "reward.pt", "rewards.png", "grpo.pt", "grpo.png")
_run_locks = {}  # lock path -> the open lock file of this process's run there


def claim_run_folder(cfg):
    """A run folder holds one run. A second run in it at the same time is refused (a lock
    that lasts while this process lives), and so is a new run over an earlier one unless
    --overwrite says to start over: its files are then removed first."""
    writable_dir(cfg.out_dir, "--out_dir")
    path = os.path.join(cfg.out_dir, "run.lock")
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
            die(f"--out_dir {cfg.out_dir} is in use by another run (process {holder}); "
                "wait for it to end or pick another --out_dir")
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _run_locks[path] = lock
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
    if cfg.batch_size % world:
        die(f"--batch_size {cfg.batch_size} must be divisible by the {world} torchrun processes")
    set_seed(cfg.seed)
    device = ddp_device or pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if device.startswith("cuda"):  # float32 matmuls on tensor cores (TF32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")
    t0 = time.perf_counter()
    if cfg.chat:
        chat(cfg, device, dtype)
        return None
    if cfg.score:
        score(cfg, device, dtype)
        return None

    if cfg.sample_only:
        if cfg.init_from:  # a Hugging Face folder (4.6) or a checkpoint
            cfg, tokenizer, model = load_model(cfg, cfg.init_from, device)
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

    file_pairs, dropped = preference_pairs(cfg) if cfg.preference_data else ([], 0)
    file_prompts = read_prompts(cfg) if cfg.prompt_data else []
    train_rm = cfg.reward == "rm" and not cfg.reward_model  # 9.2 the verifier needs no reward model
    prompts, rm = reward_prompts(cfg) if train_rm else None, None  # a --reward_model still gives the proxy score
    convs = sft_conversations(cfg)  # for SFT, and for the control
    if cfg.init_from:  # the SFT policy: a Hugging Face folder (4.6) or a checkpoint, read
        cfg, tokenizer, model = load_model(cfg, cfg.init_from, device)  # before --overwrite clears
        pretrained = {"init_from": cfg.init_from, "params": model.num_params()}
    if cfg.reward_model:  # 8.1 the reward model to optimize against, checked before any training
        rm_cfg, rm_tokenizer, rm = load_model(cfg, cfg.reward_model, device, kind="reward")
        check_reward_model(rm_cfg, rm_tokenizer, cfg, tokenizer if cfg.init_from else None, cfg.reward_model)
    if rank == 0:  # before anything is written: a busy or finished run folder stops here
        claim_run_folder(cfg)
    if cfg.init_from:
        if isinstance(tokenizer, BPETokenizer):  # the chat tokenizer, beside the run's checkpoints
            tokenizer.save(os.path.join(cfg.out_dir, "tokenizer.json"))
        summary = {"accuracy": {"sft": gold_accuracy(model, tokenizer, eval_prompts(cfg), cfg, dtype)}}
        print_accuracy(summary["accuracy"])
    else:
        cfg, tokenizer, model, pretrained = pretrain(cfg, device, dtype, rank, world, t0)
        if model is None:
            return None
        if cfg.reward_model:
            check_reward_model(rm_cfg, rm_tokenizer, cfg, tokenizer, cfg.reward_model)
        model, summary = supervised_finetuning(model, tokenizer, convs, cfg, device, dtype)
    if cfg.export_hf:
        export_hf(model, tokenizer, cfg.export_hf)
    checks, scored = {}, []
    if train_rm:
        rm, checks, scored = reward_modeling(model, tokenizer, prompts, file_pairs, cfg, device, dtype)
    policy, rl = reinforce(model, rm, tokenizer, convs, file_prompts, cfg, device, dtype)
    samples = transcripts(policy, tokenizer, cfg, dtype) + scored
    with open(os.path.join(cfg.out_dir, "samples.txt"), "w") as f:
        f.write("\n\n".join(samples) + "\n")
    # the pretraining figures as parts 02-05 write them, SFT's, the reward model's, then RL's
    summary = {**pretrained, "pretrain_tokens_per_s": pretrained.get("tokens_per_s"), **summary, **checks,
               "dropped_pairs": dropped, **rl, "tokenizer": tokenizer.name, "device": device,
               "wall_s": time.perf_counter() - t0}
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    hard = ", ".join(f"{k} {v['hard']:.1%}" for k, v in summary["gold_accuracy"].items())
    print(f"GRPO: held-out gold accuracy on the hard tasks {hard}; KL {summary['kl']:.2f} nats per response; "
          f"{summary['wall_s']:.0f} s; wrote {cfg.out_dir}/summary.json")
    return summary


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves first): one line, not a traceback
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
