#!/usr/bin/env bash
# 8-GPU recipe, d32 class (~1.9B parameters) on fineweb-edu.
#   bash run1000.sh            run it (needs 8 CUDA GPUs and the hub)
#   bash run1000.sh --dry-run  print every command
set -euo pipefail
cd "$(dirname "$0")"
DEPTH=32 SHARDS=800 DEVICE_BATCH=8 exec bash scripts/multi_gpu.sh "$@"
