#!/usr/bin/env bash
# 8-GPU recipe, d20 class (~560M parameters, Chinchilla-style 20 tokens/parameter) on fineweb-edu, the whole pipeline:
# tokenizer -> base pretraining -> base evaluation (bpb, CORE) -> mid-training -> SFT -> RL (GSM8K), each chat
# stage evaluated -> report/report.md with a summary of every metric at every stage (the steps: scripts/multi_gpu.sh).
#
#   bash speedrun.sh            run it (needs 8 CUDA GPUs and the hub; NPROC=<n> for another count)
#   bash speedrun.sh --mc       with MegaContext: the MC model and its plain twin on the long-range mix, mc_eval
#                               comparing them, then the chat stages from the MC model (see scripts/multi_gpu.sh --help)
#   bash speedrun.sh --dry-run  print every command without running it
#   bash speedrun.sh --help     this help
set -euo pipefail
for arg in "$@"; do
    case "$arg" in
        --dry-run|--mc) ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "speedrun.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")"
DEPTH=20 SHARDS=240 DEVICE_BATCH=32 exec bash scripts/multi_gpu.sh "$@"
