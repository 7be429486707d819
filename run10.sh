#!/usr/bin/env bash
# The main job on one machine: tokenizer -> base pretraining -> evaluation -> mid-training -> SFT ->
# chat evaluation -> report/report.md; then chat with `uv run python -m scripts.chat_cli`.
#
#   bash run10.sh              GPU if one is present (d12-class run), else the CPU preset (~25 min on 2 cores)
#   bash run10.sh --cpu        force the CPU preset
#   bash run10.sh --dry-run    print every command without running it
#
# Artifacts (tokenizer, data, checkpoints) go to $MC_BASE_DIR (default ~/.cache/megacontext).
set -euo pipefail
cd "$(dirname "$0")"

DRY_RUN=0
PRESET=auto
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --cpu) PRESET=cpu ;;
        --gpu) PRESET=gpu ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "run10.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

run() {
    echo "+ $*"
    if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

if [ "$DRY_RUN" -eq 0 ]; then
    source scripts/setup_env.sh
fi
if [ "$PRESET" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PRESET=gpu; else PRESET=cpu; fi
fi

if [ "$PRESET" = gpu ]; then
    DATA=fineweb-edu:24
    VOCAB=65536
    TRAIN=(--depth=12 --max_seq_len=2048 --device_batch_size=32 --total_batch_size=524288 --target_param_data_ratio=20
           --eval_every=250 --sample_every=1000)
    EVAL=(--eval_tokens=10485760 --batch_size=32)
    MID=()        # the defaults of scripts/mid_train.py and scripts/chat_sft.py are the d12 GPU settings
    SFT=()
    CHAT_EVAL=()
else
    DATA=books
    VOCAB=4096
    TRAIN=(--depth=4 --max_seq_len=512 --device_batch_size=8 --total_batch_size=8192 --num_iterations=170
           --warmup_ratio=0.03 --warmdown_ratio=0.3 --eval_every=40 --eval_tokens=65536 --sample_every=-1 --log_every=10)
    EVAL=(--eval_tokens=131072 --batch_size=8)
    MID=(--data=identity,longdoc_qa:2 --num_conversations=2000 --val_conversations=64 --num_iterations=60
         --device_batch_size=8 --rows_per_step=16 --eval_every=20)
    SFT=(--data=identity,longdoc_qa --num_conversations=1000 --val_conversations=64 --num_iterations=40
         --device_batch_size=8 --rows_per_step=16 --eval_every=20)
    CHAT_EVAL=(--num_longdoc=200 --num_arc=0)
fi
echo "run10.sh: preset $PRESET, data $DATA"

run uv run python -m nanochat.report reset
run uv run python -m scripts.tok_train --data="$DATA" --vocab_size="$VOCAB"
run uv run python -m scripts.tok_eval --data="$DATA"
run uv run python -m scripts.base_train --data="$DATA" "${TRAIN[@]}"
run uv run python -m scripts.base_eval "${EVAL[@]}"
run uv run python -m scripts.mid_train "${MID[@]}"
run uv run python -m scripts.chat_sft "${SFT[@]}"
run uv run python -m scripts.chat_eval "${CHAT_EVAL[@]}"
run uv run python -m nanochat.report generate
echo "run10.sh: done. Report: report/report.md"
echo "Chat with the model:  uv run python -m scripts.chat_cli        (or --prompt \"Who are you?\")"
