#!/usr/bin/env bash
# 8-GPU recipe, d20 class (~560M parameters, Chinchilla-style 20 tokens/parameter) on fineweb-edu.
#   bash speedrun.sh            run it (needs 8 CUDA GPUs and the hub)
#   bash speedrun.sh --dry-run  print every command
set -euo pipefail
cd "$(dirname "$0")"
DEPTH=20 SHARDS=240 DEVICE_BATCH=32 exec bash scripts/multi_gpu.sh "$@"
