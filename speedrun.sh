#!/usr/bin/env bash
# 8-GPU recipe, d20 class (~560M parameters, Chinchilla-style 20 tokens/parameter) on fineweb-edu:
# tokenizer -> base pretraining -> base evaluation -> report/report.md (the steps: scripts/multi_gpu.sh).
#
#   bash speedrun.sh            run it (needs 8 CUDA GPUs and the hub; NPROC=<n> for another count)
#   bash speedrun.sh --dry-run  print every command without running it
#   bash speedrun.sh --help     this help
set -euo pipefail
for arg in "$@"; do
    case "$arg" in
        --dry-run) ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "speedrun.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")"
DEPTH=20 SHARDS=240 DEVICE_BATCH=32 exec bash scripts/multi_gpu.sh "$@"
