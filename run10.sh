#!/usr/bin/env bash
# The main job on one machine: tokenizer -> base pretraining -> evaluation -> mid-training -> SFT ->
# chat evaluation -> report/report.md; then chat with `uv run python -m scripts.chat_cli`.
#
#   bash run10.sh              GPU if one is present (d12-class run), else the CPU preset (~25 min on 2 cores)
#   bash run10.sh --mc         with MegaContext: pretrain with --mc on a long-range data mix, train a plain
#                              model on the same data and steps, compare them with mc_eval (needle, recall,
#                              loss vs history), then mid/SFT the MC model (chat_cli --mc); CPU ~50 min
#   bash run10.sh --cpu        force the CPU preset
#   bash run10.sh --dry-run    print every command without running it
#
# Artifacts (tokenizer, data, checkpoints) go to $MC_BASE_DIR (default ~/.cache/megacontext).
set -euo pipefail
cd "$(dirname "$0")"

DRY_RUN=0
PRESET=auto
MC=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --mc) MC=1 ;;
        --cpu) PRESET=cpu ;;
        --gpu) PRESET=gpu ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
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
    # --mc: histories of 4096 tokens through a working context of W=512 entries
    MC_TRAIN=(--data_mix=fineweb-edu:0.5,needle:0.25,recall:0.15,facts:0.1 --depth=12 --max_seq_len=4096
              --device_batch_size=16 --total_batch_size=524288 --target_param_data_ratio=20 --eval_every=250
              --sample_every=-1)
    MC_FLAGS=(--mc --mc_wc_budget=512 --mc_recent=128 --mc_horizon=64)
    MC_EVAL=()
    MC_MID=()
    MC_SFT=()
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
    # --mc: histories of 1024 tokens through a working context of W=128 entries (K=32, raw tail R=64)
    MC_TRAIN=(--data_mix=books:0.4,needle:0.3,recall:0.2,facts:0.1 --depth=4 --max_seq_len=1024
              --device_batch_size=8 --total_batch_size=8192 --num_iterations=300 --warmup_ratio=0.03
              --warmdown_ratio=0.3 --eval_every=100 --eval_tokens=32768 --sample_every=-1 --log_every=25)
    MC_FLAGS=(--mc --mc_wc_budget=128 --mc_recent=64 --mc_horizon=32)
    MC_EVAL=(--needle_examples=300 --recall_examples=60 --loss_examples=24 --batch_size=16)
    MC_MID=(--data=identity,longdoc_qa:2 --num_conversations=2000 --val_conversations=64 --num_iterations=40
            --device_batch_size=8 --rows_per_step=8 --eval_every=20)
    MC_SFT=(--data=identity,longdoc_qa --num_conversations=1000 --val_conversations=64 --num_iterations=40
            --device_batch_size=8 --rows_per_step=8 --eval_every=20)
fi
echo "run10.sh: preset $PRESET, data $DATA, MegaContext $([ "$MC" -eq 1 ] && echo on || echo off)"

run uv run python -m nanochat.report reset
run uv run python -m scripts.tok_train --data="$DATA" --vocab_size="$VOCAB"
run uv run python -m scripts.tok_eval --data="$DATA"
if [ "$MC" -eq 1 ]; then
    # the MC model and a plain model with the same data, steps and size: the arms of mc_eval
    run uv run python -m scripts.base_train --data="$DATA" "${MC_TRAIN[@]}" "${MC_FLAGS[@]}" --tag=mc
    run uv run python -m scripts.base_train --data="$DATA" "${MC_TRAIN[@]}" --tag=plain
    run uv run python -m scripts.mc_eval --mc_tag=mc --plain_tag=plain "${MC_EVAL[@]}"
    # the chat stages fine-tune the MC model; its GistNet and LensNet ride along for chat_cli --mc
    run uv run python -m scripts.mid_train --source_tag=mc "${MC_MID[@]}"
    run uv run python -m scripts.chat_sft --source_tag=mc "${MC_SFT[@]}"
    CHAT="uv run python -m scripts.chat_cli --mc"
else
    run uv run python -m scripts.base_train --data="$DATA" "${TRAIN[@]}"
    run uv run python -m scripts.base_eval "${EVAL[@]}"
    run uv run python -m scripts.mid_train "${MID[@]}"
    run uv run python -m scripts.chat_sft "${SFT[@]}"
    CHAT="uv run python -m scripts.chat_cli"
fi
run uv run python -m scripts.chat_eval "${CHAT_EVAL[@]}"
run uv run python -m nanochat.report generate
echo "run10.sh: done. Report: report/report.md"
echo "Chat with the model:  $CHAT        (or --prompt \"Who are you?\")"
