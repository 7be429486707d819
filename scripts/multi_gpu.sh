#!/usr/bin/env bash
# The shared body of speedrun.sh and run1000.sh: the whole pipeline on NPROC GPUs, like nanochat's speedrun:
# data -> tokenizer -> base pretraining -> base evaluation (bpb, CORE) -> mid-training -> chat eval -> SFT ->
# chat eval -> RL on GSM8K -> chat eval -> report/report.md (its summary: every metric at every stage).
#
#   DEPTH=20 SHARDS=240 DEVICE_BATCH=32 bash scripts/multi_gpu.sh [--mc] [--dry-run]
#
#   DEPTH         model depth (checkpoints under the tag d$DEPTH; mc and plain with --mc)
#   SHARDS        fineweb-edu train shards to download and train on
#   DEVICE_BATCH  rows of 2048 tokens per GPU per micro-batch (the other stages' batches are sized from it)
#   NPROC         GPUs (default 8; 1, 2, 4 or 8: SFT's 32 conversations per step are shared by them)
#   --mc          with MegaContext (run10.sh --mc at this depth): a GPT that copies, pretrained on the long-range
#                 mix at 4096 tokens (20 tokens per parameter), from it the MC model (W=512, then a LensNet focus
#                 phase) and its plain twin, mc_eval comparing them, then mid/SFT/RL of the MC model
#   --dry-run     print every command without running it
#   -h, --help    this help
set -euo pipefail
DRY_RUN=0
MC=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --mc) MC=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "multi_gpu.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
for var in DEPTH SHARDS DEVICE_BATCH; do
    if [ -z "${!var:-}" ]; then echo "multi_gpu.sh: $var is not set (use speedrun.sh or run1000.sh, or see --help)" >&2; exit 2; fi
done
NPROC=${NPROC:-8}
cd "$(dirname "$0")/.."
run() {
    echo "+ $*"
    if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}
if [ "$DRY_RUN" -eq 0 ]; then
    source scripts/setup_env.sh
fi

DATA="fineweb-edu:$SHARDS"
TORCHRUN=(uv run torchrun --standalone --nproc_per_node="$NPROC")
# every training stage starts a new run: an earlier run of the same tag is moved aside to
# checkpoints/<stage>/<tag>.replaced-<time>, not continued and not deleted
NEW=--overwrite
# mid-training packs rows of the model's context; SFT pads one conversation per row (4 per GPU, 32 per step)
MID=(--device_batch_size="$DEVICE_BATCH")
SFT=(--device_batch_size=4 --rows_per_step=32)
if [ "$MC" -eq 1 ]; then
    # the stages of run10.sh --mc (its GPU preset), at this depth: histories of 4096 tokens, W=512, R=128, H=64
    MC_BATCH=$((DEVICE_BATCH / 4))  # rows of 4096 tokens
    MC_COPY=(--depth="$DEPTH" --max_seq_len=512 --device_batch_size=$((DEVICE_BATCH * 2)) --total_batch_size=262144
             --num_iterations=300 --data_mix=copy:0.3,needle:0.35,recall:0.35 --warmup_mix=copy:1 --warmup_mix_steps=100
             --filler_weight=0 --eval_every=100 --sample_every=-1)
    MC_LONG=(--depth="$DEPTH" --max_seq_len=4096 --device_batch_size="$MC_BATCH" --total_batch_size=524288
             --target_param_data_ratio=20 --data_mix=text:0.4,copy:0.1,needle:0.3,recall:0.2 --answer_weight=5
             --filler_weight=0 --eval_every=250 --sample_every=-1 --save_every=2000)
    MC_TRAIN=(--depth="$DEPTH" --max_seq_len=4096 --device_batch_size="$MC_BATCH" --total_batch_size=524288
              --num_iterations=1000 --data_mix=text:0.2,needle:0.5,recall:0.3 --pack_rows=0.3 --answer_weight=5
              --eval_every=250 --sample_every=-1)
    MC_FOCUS=(--depth="$DEPTH" --max_seq_len=4096 --device_batch_size="$MC_BATCH" --total_batch_size=524288
              --num_iterations=300 --freeze=gpt,mc_gist --data_mix=text:0.1,needle:0.55,recall:0.35 --eval_every=300
              --sample_every=-1)
    PLAIN_TWIN=("${MC_TRAIN[@]}")
    MC_FLAGS=(--mc --mc_wc_budget=512 --mc_recent=128 --mc_horizon=64 --mc_bag_loss_weight=0.1)
    # the chat stages add conversations that ask for a fact the user told many turns earlier (memory)
    MID=(--device_batch_size=$((DEVICE_BATCH / 2)) --rows_per_step=128 --data=smoltalk:4,longdoc_qa:2,identity:0.5,memory:2)
    SFT+=(--data=smoltalk:4,gsm8k:1,longdoc_qa:1,identity:0.5,memory:1)
    TAG=mc
    CHAT=".venv/bin/python -m scripts.chat_cli --mc --source=rl"
else
    TAG="d$DEPTH"
    CHAT=".venv/bin/python -m scripts.chat_cli --source=rl"
fi
echo "multi_gpu.sh: depth $DEPTH, $DATA, $NPROC GPUs, MegaContext $([ "$MC" -eq 1 ] && echo on || echo off)"

run uv run python -m nanochat.report reset
run uv run python -c "from nanochat.dataset import prepare; prepare('$DATA')"
run uv run python -m scripts.tok_train --data="$DATA" --vocab_size=65536 --max_chars=2e9
run uv run python -m scripts.tok_eval --data="$DATA"
if [ "$MC" -eq 1 ]; then
    # a GPT that copies, then the MC model and its plain twin (same start, data and steps): the arms of mc_eval
    run "${TORCHRUN[@]}" -m scripts.base_train --data="$DATA" $NEW "${MC_COPY[@]}" --tag=copy
    run "${TORCHRUN[@]}" -m scripts.base_train --data="$DATA" $NEW "${MC_LONG[@]}" --init_from=copy --tag=long
    run "${TORCHRUN[@]}" -m scripts.base_train --data="$DATA" $NEW "${MC_TRAIN[@]}" "${MC_FLAGS[@]}" --history_lm_weight=1 --init_from=long --tag=mc_joint
    run "${TORCHRUN[@]}" -m scripts.base_train --data="$DATA" $NEW "${MC_FOCUS[@]}" "${MC_FLAGS[@]}" --init_from=mc_joint --tag=mc
    run "${TORCHRUN[@]}" -m scripts.base_train --data="$DATA" $NEW "${PLAIN_TWIN[@]}" --init_from=long --tag=plain
    # needle and recall at 8W: the MegaContext rows of the report's summary
    run uv run python -m scripts.mc_eval --mc_tag=mc --plain_tag=plain --recall_length=8
else
    run "${TORCHRUN[@]}" -m scripts.base_train --data="$DATA" $NEW --depth="$DEPTH" --max_seq_len=2048 \
        --device_batch_size="$DEVICE_BATCH" --total_batch_size=524288 --target_param_data_ratio=20 --save_every=2000
    run "${TORCHRUN[@]}" -m scripts.base_eval --tag="$TAG" --eval_tokens=20971520 --batch_size="$DEVICE_BATCH"
fi
# the chat model: mid-training, SFT and RL (from the MC model with --mc; its GistNet and LensNet ride along),
# each evaluated (chat_eval runs in one process); RL continues from the latest SFT checkpoint
run "${TORCHRUN[@]}" -m scripts.mid_train $NEW --source_tag="$TAG" "${MID[@]}"
run uv run python -m scripts.chat_eval --source=mid --tag="$TAG"
run "${TORCHRUN[@]}" -m scripts.chat_sft $NEW --source_tag="$TAG" "${SFT[@]}"
run uv run python -m scripts.chat_eval --source=sft --tag="$TAG"
run "${TORCHRUN[@]}" -m scripts.chat_rl $NEW --source_tag="$TAG"
run uv run python -m scripts.chat_eval --source=rl --tag="$TAG"
run uv run python -m nanochat.report generate
echo "multi_gpu.sh: done. Report: report/report.md"
echo "Chat with the model:  $CHAT        (or --prompt \"Who are you?\")"
