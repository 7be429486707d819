"""Evaluate a chat model: long-document QA (always) and ARC-Easy multiple choice (when the hub is reachable).

    python -m scripts.chat_eval                       # the latest SFT checkpoint
    python -m scripts.chat_eval --source=mid --num_longdoc=500

Long-document QA: held-out generated documents (nanochat/longdoc_qa.py, the "val" seed stream, filler
from the pretraining corpus' val split) sized to fill ~90% of the model's context, like in training;
examples that still do not fit are skipped and counted. A greedy completion is correct when it
contains the answer string. Reported: accuracy overall and by depth of the fact in the document,
and how often a distractor value (a near miss planted in the same document) was produced.
ARC-Easy: the choice letter with the highest logit after <|assistant_start|>, against chance.
Numbers go to report/chat_eval.json and to the report section of the evaluated stage, "chat-eval-<source>"
(the summary shows each stage as a column).
"""

import argparse
import json
import re
import sys
import time

import torch

from nanochat import report
from nanochat.chat_data import load_hub
from nanochat.chat_train import longdoc_setup, pretraining_data
from nanochat.checkpoint import CheckpointError, load_model_and_tokenizer
from nanochat.common import atomic_write_text, autocast_ctx, autocast_dtype, compute_init, get_report_dir
from nanochat.configurator import FlagParser, checked_number
from nanochat.dataset import DataError
from nanochat.engine import Engine
from nanochat.longdoc_qa import longdoc_qa_eval
from nanochat.tokenizer import TokenizerError

DEPTH_BINS = 5  # depth of the asked fact in its document: [0, 0.2), [0.2, 0.4), ... [0.8, 1]
SAMPLE_PROMPTS = ["Who are you?", "What can you do?"]


def greedy_reply(engine, tokenizer, messages: list[dict], context: int, max_tokens: int) -> str:
    """The greedy reply to a conversation that ends with a user turn, within the model's context."""
    stop = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id]
    prompt = tokenizer.render_for_completion(messages)
    row = engine.generate_batch(prompt, max_tokens=max(1, min(max_tokens, context - len(prompt))), temperature=0.0,
                                stop_tokens=stop)[0]
    return tokenizer.decode([t for t in row[len(prompt):] if t not in stop])


def eval_longdoc(engine, tokenizer, examples, context: int, max_tokens: int) -> dict:
    """Greedy completions of longdoc_qa examples; accuracy overall, by depth bin, and distractor rate."""
    results, skipped, shown = [], 0, []
    for example in examples:
        if len(tokenizer.render_conversation(example)[0]) > context + 1:
            skipped += 1  # as in training: a conversation that does not fit the context is not used
            continue
        completion = greedy_reply(engine, tokenizer, example["messages"][:1], context, max_tokens)
        meta = example["meta"]
        results.append({"depth": meta["depth"], "correct": meta["answer"] in completion,
                        "distractor": any(v in completion for v in meta["distractor_values"])})
        if len(shown) < 3:
            shown.append(f"{meta['question']!r} -> {completion.strip()!r} (answer {meta['answer']!r})")
    n = len(results)
    by_depth = []
    for b in range(DEPTH_BINS):
        lo, hi = b / DEPTH_BINS, (b + 1) / DEPTH_BINS
        in_bin = [r for r in results if lo <= r["depth"] < hi or (b == DEPTH_BINS - 1 and r["depth"] == 1.0)]
        by_depth.append({"depth": f"{lo:.1f}-{hi:.1f}", "n": len(in_bin),
                         "accuracy": sum(r["correct"] for r in in_bin) / len(in_bin) if in_bin else None})
    return {"n": n, "skipped_too_long": skipped,
            "accuracy": sum(r["correct"] for r in results) / n if n else None,
            "distractor_rate": sum(r["distractor"] for r in results) / n if n else None,
            "by_depth": by_depth, "examples": shown}


@torch.no_grad()
def eval_multiple_choice(model, tokenizer, conversations, amp) -> dict:
    """Accuracy of the highest-logit choice letter (letters parsed from the 'X. text' lines of the question)."""
    device = model.lm_head.weight.device
    correct, chance = 0, 0.0
    for conv in conversations:
        question, answer = conv["messages"][0]["content"], conv["messages"][1]["content"].strip()
        letters = re.findall(r"^([A-Z0-9])\. ", question, flags=re.MULTILINE)
        letter_ids = [tokenizer.encode(letter)[0] for letter in letters]
        prompt = tokenizer.render_for_completion(conv["messages"][:1])
        with amp:
            logits = model(torch.tensor([prompt], device=device))[0, -1]  # [V]
        choice = letters[int(logits[letter_ids].argmax())]
        correct += choice == answer
        chance += 1 / len(letters)
    n = len(conversations)
    return {"n": n, "accuracy": correct / n, "chance": chance / n}


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft"], help="which stage's checkpoint to evaluate")
    parser.add_argument("--tag", default="", help="checkpoint tag (default: the most recently written)")
    parser.add_argument("--step", type=checked_number(int, 0), default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--num_longdoc", type=checked_number(int, 0), default=200, help="long-document QA examples")
    parser.add_argument("--longdoc_filler", default="pretraining", choices=["pretraining", "synthetic"], help="document filler text")
    parser.add_argument("--max_tokens", type=checked_number(int, 1), default=32, help="longest completion, in tokens")
    parser.add_argument("--num_arc", type=checked_number(int, 0), default=500, help="ARC-Easy questions (0 = skip)")
    parser.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    args = parser.parse_args(argv)

    _, _, _, _, device = compute_init(args.device_type)
    try:
        model, tokenizer, meta, ckpt_dir = load_model_and_tokenizer(args.source, args.tag, args.step, device)
    except (CheckpointError, TokenizerError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    amp_dtype = autocast_dtype(device.type)
    amp = autocast_ctx(device.type, amp_dtype)
    engine = Engine(model, autocast=lambda: autocast_ctx(device.type, amp_dtype))
    context = model.config.sequence_len
    checkpoint = f"{args.source} {ckpt_dir.name} step {meta['step']}"
    t0 = time.perf_counter()

    try:
        _, val_filler, longdoc_cfg = longdoc_setup(tokenizer, context, args.longdoc_filler, *pretraining_data(meta))
    except DataError as e:
        sys.exit(f"error: {e}")
    longdoc = eval_longdoc(engine, tokenizer, longdoc_qa_eval(args.num_longdoc, longdoc_cfg, val_filler), context,
                           args.max_tokens)
    longdoc["doc_words"] = longdoc_cfg.doc_words
    print(f"longdoc_qa ({checkpoint}): accuracy {fmt(longdoc['accuracy'])} over {longdoc['n']} examples "
          f"({longdoc['skipped_too_long']} skipped as too long), distractor rate {fmt(longdoc['distractor_rate'])}")
    for row in longdoc["by_depth"]:
        print(f"  depth {row['depth']}: accuracy {fmt(row['accuracy'])} (n={row['n']})")

    arc = {"skipped": "--num_arc=0"}
    if args.num_arc > 0:
        conversations = load_hub("arc_easy", args.num_arc, seed=0, split="val")
        if conversations:
            model.eval()
            arc = eval_multiple_choice(model, tokenizer, conversations, amp)
            print(f"ARC-Easy: accuracy {arc['accuracy']:.4f} over {arc['n']} questions (chance {arc['chance']:.4f})")
        else:
            arc = {"skipped": "the HF hub is unreachable (offline)"}
            print("ARC-Easy: skipped, the HF hub is unreachable (offline)")
    samples = [greedy_reply(engine, tokenizer, [{"role": "user", "content": p}], context, 64) for p in SAMPLE_PROMPTS]
    elapsed = time.perf_counter() - t0

    results = {"checkpoint": checkpoint, "context": context, "longdoc_qa": longdoc, "arc_easy": arc,
               "samples": dict(zip(SAMPLE_PROMPTS, samples)), "eval_seconds": round(elapsed, 1)}
    path = get_report_dir() / "chat_eval.json"
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    report.log_section(f"chat-eval-{args.source}", f"Chat evaluation ({args.source})", [
        {"checkpoint": checkpoint, "context": context, "evaluation time": f"{elapsed / 60:.2f} min"},
        f"Long-document QA (held out; documents of {longdoc['doc_words']} words, greedy, correct = answer string in the reply):",
        {"examples": longdoc["n"], "skipped (longer than the context)": longdoc["skipped_too_long"],
         "accuracy": fmt(longdoc["accuracy"]), "replies with a distractor value": fmt(longdoc["distractor_rate"]),
         **{f"accuracy at depth {r['depth']} (n={r['n']})": fmt(r["accuracy"]) for r in longdoc["by_depth"]}},
        "Examples:", *[f"    {e}" for e in longdoc["examples"]],
        "ARC-Easy (multiple choice, highest-logit letter):",
        {"skipped": arc["skipped"]} if "skipped" in arc else
        {"questions": arc["n"], "accuracy": fmt(arc["accuracy"]), "chance": fmt(arc["chance"])},
        "Samples (greedy):", *[f"    {p!r} -> {r!r}" for p, r in zip(SAMPLE_PROMPTS, samples)],
    ])
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
