#!/usr/bin/env bash
# The README's GPU figures and the GPU correctness checks, on one CUDA GPU, in one go.
#
#   bash bench/gpu.sh LOG_DIR [PHASE ...]    phases: env tests parts suite speed sweep recipe moe rollout
#                                            sft reward ppo grpo semantic (default: all, in that order)
#
# All of them take well over an hour. In a short lease, the figures the README still lacks
# come first: `env moe rollout` (the MoE since its one-graph fix, batched generation),
# then `tests`, then one default run (`grpo`, `sft`, ...) per call.
#
# Each phase writes LOG_DIR/PHASE.log and has a time limit, so one failure or hang does not
# cost the others. data/tinyshakespeare.txt must be there (the parts' default --data is
# cached at that path); NANOGPT_DIR, when set, holds nanoGPT's model.py and a bench.py that
# takes the batch size, run at batch 12 beside ours for a same-machine reference.
set -u
cd "$(dirname "$0")/.."
LOG=${1:?usage: bash bench/gpu.sh LOG_DIR [PHASE ...]}
shift
mkdir -p "$LOG"
PHASES=${*:-env tests parts suite speed sweep recipe moe rollout sft reward ppo grpo semantic}
export PYTHONUNBUFFERED=1
DATA=data/tinyshakespeare.txt

phase() {  # phase NAME SECONDS COMMAND...: run, log, report the exit status and time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name: $*" | tee -a "$LOG/$name.log"
    timeout "$limit" "$@" >>"$LOG/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$LOG/$name.log"
}

for p in $PHASES; do
    case $p in
    env)
        phase env 60 nvidia-smi
        phase env 60 python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
        ;;
    tests)  # the CUDA checks of every part
        phase tests 420 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
        ;;
    parts)  # each part's default run on the GPU, a few hundred steps
        phase parts 60 python part00_foundations.py --device cuda --out_dir out/gpu/part00
        phase parts 60 python part01_transformer.py --device cuda --out_dir out/gpu/part01
        for part in part02_train part03_modern part04_scale part05_moe; do
            phase parts 120 python $part.py --device cuda --max_steps 300 --data $DATA --overwrite \
                --out_dir out/gpu/$part
        done
        phase parts 180 python part06_sft.py --device cuda --max_steps 300 --sft_steps 300 --data $DATA \
            --overwrite --out_dir out/gpu/part06_sft
        phase parts 180 python part07_reward.py --device cuda --max_steps 300 --sft_steps 300 --rm_steps 100 \
            --data $DATA --overwrite --out_dir out/gpu/part07_reward
        phase parts 240 python part08_ppo.py --device cuda --max_steps 300 --sft_steps 300 --rm_steps 100 \
            --ppo_iters 20 --data $DATA --overwrite --out_dir out/gpu/part08_ppo
        phase parts 240 python part09_grpo.py --device cuda --max_steps 300 --sft_steps 300 \
            --grpo_iters 20 --data $DATA --overwrite --out_dir out/gpu/part09_grpo
        phase parts 240 python part10_semantic.py --device cuda --max_steps 300 --data $DATA --overwrite \
            --out_dir out/gpu/part10_semantic
        ;;
    suite)  # the whole CPU test suite, with a CUDA torch present
        phase suite 400 python -m pytest -q -p no:cacheprovider -n 8 tests
        ;;
    speed)  # part04 at the GPT-2 124M shape, batch 12, with a profile; nanoGPT beside it
        phase speed 240 python bench/throughput.py --device cuda --batches 12 --profile
        if [ -n "${NANOGPT_DIR:-}" ]; then
            phase speed 180 bash -c "cd '$NANOGPT_DIR' && python bench.py 12"
        fi
        ;;
    sweep)  # the batch sweep, and nanoGPT at its best batch of the issue (48)
        phase sweep 400 python bench/throughput.py --device cuda --batches 12 16 24 32 48
        if [ -n "${NANOGPT_DIR:-}" ]; then
            phase sweep 180 bash -c "cd '$NANOGPT_DIR' && python bench.py 48"
        fi
        ;;
    recipe)  # part04's GPU recipe from the README: time to 2.10 bpb on Tiny Shakespeare
        phase recipe 300 python part04_scale.py --device cuda --tokenizer byte --n_layer 8 \
            --n_head 8 --n_embd 512 --block_size 256 --batch_size 64 --max_steps 2000 \
            --learning_rate 1e-3 --min_lr 1e-4 --dropout 0.2 --eval_interval 250 --data $DATA --overwrite \
            --out_dir out/gpu/recipe
        phase recipe 30 python bench/time_to_target.py out/gpu/recipe --bpb 2.10
        ;;
    moe)  # part05: the MoE against its dense twin at the GPT-2-small shape
        phase moe 420 python bench/moe_throughput.py --device cuda --profile
        ;;
    rollout)  # batched generation with the KV cache, part06's default shape (random weights: same speed)
        phase rollout 180 python bench/rollout.py --device cuda --batches 1 8 64 256
        ;;
    sft)  # part06: the default run's wall time, then rollout tokens/s with the KV cache at batch 64
        phase sft 420 python part06_sft.py --device cuda --data $DATA --overwrite --out_dir out/gpu/part06
        phase sft 120 python bench/rollout.py --device cuda --init_from out/gpu/part06/sft.pt --batches 1 8 64 256
        ;;
    reward)  # part07: the default run's wall time, then 4x the reward-model steps from its SFT policy
        phase reward 420 python part07_reward.py --device cuda --data $DATA --overwrite --out_dir out/gpu/part07
        phase reward 420 python part07_reward.py --device cuda --init_from out/gpu/part07/sft.pt --rm_steps 2400 \
            --overwrite --out_dir out/gpu/part07_x4
        ;;
    ppo)  # part08: the default run's wall time (pretraining, SFT, reward model, PPO, the control)
        phase ppo 600 python part08_ppo.py --device cuda --data $DATA --overwrite --out_dir out/gpu/part08
        ;;
    grpo)  # part09: the default run's wall time (pretraining, SFT, GRPO against the checker, the control)
        phase grpo 600 python part09_grpo.py --device cuda --data $DATA --overwrite --out_dir out/gpu/part09
        ;;
    semantic)  # part10: every lesson's default run (each model: --max_seconds 30 or --max_steps 600)
        phase semantic 600 python part10_semantic.py --device cuda --data $DATA --overwrite --out_dir out/gpu/part10
        ;;
    *) echo "unknown phase $p" >&2; exit 2 ;;
    esac
done
