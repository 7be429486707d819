"""Evaluate a base checkpoint: validation bits per byte, a few samples and the CORE metric (see
nanochat/core_eval.py; its bundle is downloaded once, and skipped with one line when it cannot be).

    python -m scripts.base_eval --tag=d4
    python -m scripts.base_eval --tag=d4 --no-core
"""

import argparse
import sys

from nanochat import report
from nanochat.checkpoint import CheckpointError, build_model, resolve_checkpoint_dir
from nanochat.common import autocast_ctx, autocast_dtype, compute_init, get_base_dir, print0
from nanochat.configurator import FlagParser, checked_number
from nanochat.core_eval import CoreError, evaluate_core, fetch_bundle, load_bundle
from nanochat.dataloader import DataLoader
from nanochat.dataset import prepare
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import TokenizerError, get_tokenizer

PROMPTS = ["The capital of France is", "It is a truth universally acknowledged, that",
           "My dear sister,", "The meaning of life is"]


def core_tasks(bundle_dir: str):
    """The CORE tasks of bundle_dir (default: the public bundle, fetched once), or None, with one line printed,
    when the public bundle cannot be fetched. A malformed bundle is an error."""
    try:
        bundle = bundle_dir or fetch_bundle(get_base_dir())
    except CoreError as e:
        print0(f"CORE: evaluation bundle not available offline ({e}): skipped")
        return None
    try:
        return load_bundle(bundle)
    except CoreError as e:
        sys.exit(f"error: {e}")


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="", help="checkpoint directory under checkpoints/base (default: the only/last one)")
    parser.add_argument("--step", type=checked_number(int, 0), default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--data", default="", help="data source for validation (default: the one the model was trained on)")
    parser.add_argument("--eval_tokens", type=checked_number(int, 1), default=2**19, help="validation tokens")
    parser.add_argument("--batch_size", type=checked_number(int, 1), default=8, help="sequences per forward pass")
    parser.add_argument("--max_tokens", type=checked_number(int, 1), default=48, help="tokens per sample")
    parser.add_argument("--temperature", type=checked_number(float, 0), default=0.8, help="sampling temperature (0 = greedy)")
    parser.add_argument("--core", action=argparse.BooleanOptionalAction, default=True, help="evaluate CORE")
    parser.add_argument("--core_max_per_task", type=checked_number(int, 0), default=500,
                        help="CORE examples per task (a fixed random subset; 0 = all)")
    parser.add_argument("--core_bundle", default="", help="CORE bundle directory (default: the public one, fetched "
                        "into $MC_BASE_DIR/eval_bundle)")
    parser.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    args = parser.parse_args(argv)

    _, rank, _, world_size, device = compute_init(args.device_type)
    try:
        ckpt_dir = resolve_checkpoint_dir("base", args.tag)
        model, _, meta = build_model(ckpt_dir, args.step, device)
        tokenizer = get_tokenizer()
    except (CheckpointError, TokenizerError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    tag = ckpt_dir.name
    tasks = core_tasks(args.core_bundle) if args.core else None
    if meta.get("tokenizer") != tokenizer.identity():
        sys.exit(f"error: checkpoint {ckpt_dir} was trained with a different tokenizer than the one in "
                 f"{get_base_dir() / 'tokenizer'}")
    amp_dtype = autocast_dtype(device.type)
    seq_len = model.config.sequence_len
    trained_on = meta["train_config"]
    data_dir = prepare(args.data) if args.data else prepare(trained_on["data"], trained_on.get("text_column", "text"))
    loader = DataLoader(tokenizer, args.batch_size, seq_len, data_dir, split="val", rank=rank, world_size=world_size,
                        device=device)
    steps = max(1, args.eval_tokens // (args.batch_size * seq_len * world_size))
    bpb = evaluate_bpb(model, iter(loader), steps, tokenizer.token_bytes(device), autocast_ctx(device.type, amp_dtype))
    print0(f"checkpoint {tag} step {meta['step']}: val bpb {bpb:.4f} over {steps * args.batch_size * seq_len:,} tokens")

    engine = Engine(model, autocast=lambda: autocast_ctx(device.type, amp_dtype))
    samples = []
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
        row = engine.generate_batch(ids, max_tokens=args.max_tokens, temperature=args.temperature, top_k=50,
                                    seed=i, stop_tokens=[tokenizer.bos_token_id])[0]
        samples.append(tokenizer.decode(row[1:]))
        print0(f"  {samples[-1]!r}")
    core_items = [{"CORE": "skipped (evaluation bundle not available offline)"}] if args.core else []
    if tasks:
        core = evaluate_core(model, tokenizer, tasks, device, args.core_max_per_task, rank, world_size,
                             autocast=lambda: autocast_ctx(device.type, amp_dtype))
        print0(f"{'CORE task':<40} {'examples':>8} {'accuracy':>8} {'centred':>8}")
        for label, r in core["tasks"].items():
            print0(f"{label:<40} {r['examples']:>8} {r['accuracy']:>8.4f} {r['centred']:>8.4f}")
        print0(f"CORE: {core['CORE']:.4f}")
        core_items = ["CORE (centred accuracy per task):", {label: r["centred"] for label, r in core["tasks"].items()},
                      {"CORE": core["CORE"]}]
    if rank == 0:
        report.log_section("base-eval", "Base model evaluation", [
            {"checkpoint": f"{tag} step {meta['step']}", "val bpb": bpb, "val tokens": steps * args.batch_size * seq_len},
            f"Samples (temperature {args.temperature}):", *[f"    {s!r}" for s in samples], *core_items,
        ])


if __name__ == "__main__":
    main()
