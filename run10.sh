#!/usr/bin/env bash
# The main job on one machine: tokenizer -> base pretraining -> evaluation -> mid-training -> SFT ->
# chat evaluation -> report/report.md; then chat with `.venv/bin/python -m scripts.chat_cli` (add --mc after --mc).
#
#   bash run10.sh              GPU if one is present (d12-class run), else the CPU preset (7 min on 2 cores)
#   bash run10.sh --mc         with MegaContext: a GPT that copies (copy curriculum at T=256, then long-range
#                              pretraining at T=1024), from it an MC model (then a LensNet focus phase) and
#                              its plain twin (same data and steps), mc_eval comparing them (needle,
#                              recall, loss vs history), then mid/SFT of the MC model for chat_cli --mc; CPU 37-67 min
#   bash run10.sh --cpu        force the CPU preset (--gpu: the GPU preset)
#   bash run10.sh --dry-run    print every command without running it
#
# Artifacts (tokenizer, data, checkpoints) go to $MC_BASE_DIR (default ~/.cache/megacontext).
set -euo pipefail

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
cd "$(dirname "$0")"

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
    # --mc (not yet run on a GPU): the CPU recipe's stages at d12, histories of 4096 tokens, W=512
    MC_COPY=(--depth=12 --max_seq_len=512 --device_batch_size=64 --total_batch_size=262144 --num_iterations=300
             --data_mix=copy:0.3,needle:0.35,recall:0.35 --warmup_mix=copy:1 --warmup_mix_steps=100 --filler_weight=0
             --eval_every=100 --sample_every=-1)
    MC_LONG=(--depth=12 --max_seq_len=4096 --device_batch_size=8 --total_batch_size=524288 --num_iterations=2000
             --data_mix=text:0.4,copy:0.1,needle:0.3,recall:0.2 --answer_weight=5 --filler_weight=0
             --eval_every=250 --sample_every=-1)
    MC_TRAIN=(--depth=12 --max_seq_len=4096 --device_batch_size=8 --total_batch_size=524288 --num_iterations=1000
              --data_mix=text:0.2,needle:0.4,recall:0.2,memory:0.2 --pack_rows=0.3 --answer_weight=5 --eval_every=250 --sample_every=-1)
    MC_FOCUS=(--depth=12 --max_seq_len=4096 --device_batch_size=8 --total_batch_size=524288 --num_iterations=300
              --freeze=gpt,mc_gist --data_mix=text:0.1,needle:0.45,recall:0.25,memory:0.2 --eval_every=300 --sample_every=-1)
    PLAIN_TWIN=("${MC_TRAIN[@]}")
    MC_FLAGS=(--mc --mc_wc_budget=512 --mc_recent=128 --mc_horizon=64 --mc_bag_loss_weight=0.1)
    MC_EVAL=()
    MC_MID=(--data=smoltalk:4,longdoc_qa:2,identity:0.5,memory:2)  # the defaults plus memory conversations
    MC_SFT=(--data=smoltalk:4,gsm8k:1,longdoc_qa:1,identity:0.5,memory:1)
else
    DATA=books
    VOCAB=4096
    TRAIN=(--depth=4 --max_seq_len=512 --device_batch_size=8 --total_batch_size=8192 --num_iterations=170
           --warmup_ratio=0.03 --warmdown_ratio=0.3 --eval_every=40 --eval_tokens=65536 --sample_every=-1 --log_every=10)
    EVAL=(--eval_tokens=131072 --batch_size=8 --core_max_per_task=50)  # CORE runs when its bundle can be fetched
    MID=(--data=identity,longdoc_qa:2 --num_conversations=2000 --val_conversations=64 --num_iterations=60
         --device_batch_size=8 --rows_per_step=16 --eval_every=20)
    SFT=(--data=identity,longdoc_qa --num_conversations=1000 --val_conversations=64 --num_iterations=40
         --device_batch_size=8 --rows_per_step=16 --eval_every=20)
    CHAT_EVAL=(--num_longdoc=200 --num_arc=100 --num_arc_challenge=100 --num_mmlu=100 --num_humaneval=16 --num_gsm8k=16)  # hub benchmarks: skipped offline
    # --mc: 1. a copy curriculum at T=256 (copy rows until the induction circuit forms, then needles and
    # recall pairs, loss on the answers); 2. long-range pretraining at T=1024 (books + long-range rows);
    # 3. from there, the same steps and data twice (needles, recall pairs and chat-format memory
    # conversations; 30% of the long-range rows pack several shorter examples, so short histories stay in
    # distribution): with MegaContext (W=128 entries, K=32, raw tail R=32, LensNet horizon H=16, GistNet's
    # bag-of-tokens loss, plus an LM loss over the whole history) and without (the plain twin); 4. a focus
    # phase for the MC model: GPT and GistNet frozen, LensNet alone learns which block to expand. The chat
    # stages then run long enough for the chat skills (150 mid + 100 SFT steps, with memory conversations):
    # the MC GPT has learnt to answer a memory question through working contexts in step 3, so
    # chat_cli --mc recalls a fact told more than 8W tokens earlier
    MC_COPY=(--depth=4 --max_seq_len=256 --device_batch_size=16 --total_batch_size=4096 --num_iterations=400
             --warmdown_ratio=0.3 --data_mix=copy:0.3,needle:0.35,recall:0.35 --warmup_mix=copy:1 --warmup_mix_steps=120
             --filler_weight=0 --eval_every=200 --eval_tokens=16384 --sample_every=-1 --log_every=25)
    MC_LONG=(--depth=4 --max_seq_len=1024 --device_batch_size=8 --total_batch_size=8192 --num_iterations=300
             --warmup_ratio=0.03 --warmdown_ratio=0.3 --data_mix=books:0.4,copy:0.1,needle:0.3,recall:0.2
             --answer_weight=5 --filler_weight=0 --eval_every=100 --eval_tokens=32768 --sample_every=-1 --log_every=25)
    MC_TRAIN=(--depth=4 --max_seq_len=1024 --device_batch_size=8 --total_batch_size=8192 --num_iterations=400
              --warmup_ratio=0.03 --warmdown_ratio=0.3 --data_mix=books:0.2,needle:0.4,recall:0.2,memory:0.2 --pack_rows=0.3
              --answer_weight=5 --eval_every=200 --eval_tokens=32768 --sample_every=-1 --log_every=25)
    MC_FOCUS=(--depth=4 --max_seq_len=1024 --device_batch_size=16 --total_batch_size=16384 --num_iterations=400
              --freeze=gpt,mc_gist --data_mix=books:0.1,needle:0.45,recall:0.25,memory:0.2 --warmup_ratio=0.03
              --warmdown_ratio=0.3 --eval_every=400 --eval_tokens=32768 --sample_every=-1 --log_every=25)
    PLAIN_TWIN=("${MC_TRAIN[@]}")
    MC_FLAGS=(--mc --mc_wc_budget=128 --mc_recent=32 --mc_horizon=16 --mc_bag_loss_weight=0.1)
    MC_EVAL=(--needle_examples=200 --recall_examples=40 --loss_examples=96 --batch_size=16  # 200: +-0.015 near 0.95
             --far_lengths=32,64,128,256,512,1024 --far_examples=32)  # needles up to 1024·W (131,072 tokens)
    # the chat stages add conversations that ask for a fact the user told many turns earlier (memory)
    MC_MID=(--data=identity,longdoc_qa:2,memory:4 --num_conversations=3000 --val_conversations=64 --num_iterations=150
            --device_batch_size=8 --rows_per_step=8 --eval_every=50)
    MC_SFT=(--data=identity,longdoc_qa,memory:2 --num_conversations=1500 --val_conversations=64 --num_iterations=100
            --device_batch_size=8 --rows_per_step=8 --eval_every=50)
fi
echo "run10.sh: preset $PRESET, data $DATA, MegaContext $([ "$MC" -eq 1 ] && echo on || echo off)"

# every stage starts a new run: an earlier run of the same tag (a previous run10.sh) is moved aside to
# checkpoints/<stage>/<tag>.replaced-<time>, not continued and not deleted
NEW=--overwrite

run uv run python -m nanochat.report reset
run uv run python -m scripts.tok_train --data="$DATA" --vocab_size="$VOCAB"
run uv run python -m scripts.tok_eval --data="$DATA"
if [ "$MC" -eq 1 ]; then
    # a GPT that copies, then the MC model and its plain twin (same start, data and steps; the MC model also
    # learns from every target of its histories, --history_lm_weight, as the plain one does; at 4 rather than 1 or 2
    # its GPT is better locally and at retrieval, see docs/architecture.md §11): the arms of mc_eval
    run uv run python -m scripts.base_train --data="$DATA" $NEW "${MC_COPY[@]}" --tag=copy
    run uv run python -m scripts.base_train --data="$DATA" $NEW "${MC_LONG[@]}" --init_from=copy --tag=long
    run uv run python -m scripts.base_train --data="$DATA" $NEW "${MC_TRAIN[@]}" "${MC_FLAGS[@]}" --history_lm_weight=4 --init_from=long --tag=mc_joint
    run uv run python -m scripts.base_train --data="$DATA" $NEW "${MC_FOCUS[@]}" "${MC_FLAGS[@]}" --init_from=mc_joint --tag=mc
    run uv run python -m scripts.base_train --data="$DATA" $NEW "${PLAIN_TWIN[@]}" --init_from=long --tag=plain
    run uv run python -m scripts.mc_eval --mc_tag=mc --plain_tag=plain "${MC_EVAL[@]}"
    # the chat stages fine-tune the MC model; its GistNet and LensNet ride along for chat_cli --mc
    run uv run python -m scripts.mid_train $NEW --source_tag=mc "${MC_MID[@]}"
    run uv run python -m scripts.chat_sft $NEW --source_tag=mc "${MC_SFT[@]}"
    CHAT=".venv/bin/python -m scripts.chat_cli --mc"
else
    run uv run python -m scripts.base_train --data="$DATA" $NEW "${TRAIN[@]}"
    run uv run python -m scripts.base_eval "${EVAL[@]}"
    run uv run python -m scripts.mid_train $NEW "${MID[@]}"
    run uv run python -m scripts.chat_sft $NEW "${SFT[@]}"
    CHAT=".venv/bin/python -m scripts.chat_cli"
fi
run uv run python -m scripts.chat_eval "${CHAT_EVAL[@]}"
run uv run python -m nanochat.report generate
echo "run10.sh: done. Report: report/report.md"
echo "Chat with the model:  $CHAT        (or --prompt \"Who are you?\")"
