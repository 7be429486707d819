#!/usr/bin/env bash
# The shared body of speedrun.sh and run1000.sh: tokenizer -> base pretraining -> base evaluation -> report.
#
#   DEPTH=20 SHARDS=240 DEVICE_BATCH=32 bash scripts/multi_gpu.sh [--dry-run]
#
#   DEPTH         model depth (the checkpoint is checkpoints/base/d$DEPTH)
#   SHARDS        fineweb-edu train shards to download and train on
#   DEVICE_BATCH  rows per GPU per micro-batch
#   NPROC         GPUs (default 8)
#   --dry-run     print every command without running it
#   -h, --help    this help
set -euo pipefail
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
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
run uv run python -m nanochat.report reset
run uv run python -c "from nanochat.dataset import prepare; prepare('fineweb-edu:$SHARDS')"
run uv run python -m scripts.tok_train --data="fineweb-edu:$SHARDS" --vocab_size=65536 --max_chars=2e9
run uv run python -m scripts.tok_eval --data="fineweb-edu:$SHARDS"
run uv run torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train --data="fineweb-edu:$SHARDS" \
    --depth="$DEPTH" --max_seq_len=2048 --device_batch_size="$DEVICE_BATCH" --total_batch_size=524288 \
    --target_param_data_ratio=20 --save_every=2000
run uv run python -m scripts.base_eval --tag="d$DEPTH" --eval_tokens=20971520 --batch_size="$DEVICE_BATCH"
run uv run python -m nanochat.report generate
