"""Evaluate a chat model: long-document QA, and the benchmarks of nanochat/chat_tasks.py with ChatCORE.

    python -m scripts.chat_eval                       # the latest SFT checkpoint
    python -m scripts.chat_eval --source=mid --num_longdoc=500 --num_mmlu=0
    python -m scripts.chat_eval --mmlu_data=mmlu_rows.jsonl   # a task's rows from a local file, not the hub

Long-document QA: held-out generated documents (nanochat/longdoc_qa.py, the "val" seed stream, filler
from the pretraining corpus' val split) sized to fill ~90% of the model's context, like in training;
examples that still do not fit are skipped and counted. A greedy completion is correct when it
contains the answer string. Reported: accuracy overall and by depth of the fact in the document,
and how often a distractor value (a near miss planted in the same document) was produced.
Benchmarks (one ChatTask each in nanochat/chat_tasks.py; --num_X=0 skips one): ARC-Easy, ARC-Challenge and
MMLU score the choice letter with the highest logit after <|assistant_start|>, against chance; GSM8K takes
the last number of each greedy reply as its answer (nanochat/gsm8k.py); HumanEval runs each greedy reply with
the task's tests in a limited subprocess (nanochat/execution.py), pass@1.
Their data comes from the HF hub (skipped with one printed line when it is unreachable, never faked) or
from a local .jsonl of rows in the hub's schema (--KEY_data). Questions longer than the context are
skipped and counted. ChatCORE: the mean over the evaluated benchmarks of (accuracy - chance) / (1 - chance).
Chat memory (MegaContext checkpoints only, mc/memory_eval.py): held-out conversations in which the user tells
facts, shares book passages for about --memory_distance working contexts, then asks for one fact; replayed into
the chat of `chat_cli --mc` and answered greedily; correct = the value in the reply.
Numbers go to report/chat_eval.json and to the report section of the evaluated stage, "chat-eval-<source>"
(the summary shows each stage as a column).
"""

import argparse
import json
import sys
import time
from functools import partial

import torch
from torch.nn.utils.rnn import pad_sequence

from nanochat import report
from nanochat.chat_data import HubUnavailable
from nanochat.chat_tasks import TASKS, ChatTask, chatcore, load_examples
from nanochat.chat_train import longdoc_setup, pretraining_data
from nanochat.checkpoint import CheckpointError, load_model_and_tokenizer, load_module_states
from nanochat.common import atomic_write_text, autocast_ctx, autocast_dtype, compute_init, get_report_dir
from nanochat.configurator import FlagParser, checked_number
from nanochat.dataset import DataError, filler_paragraphs, prepare
from nanochat.engine import Engine
from nanochat.longdoc_qa import longdoc_qa_eval
from nanochat.tokenizer import TokenizerError

from mc.build import load_controller
from mc.memory_eval import memory_eval

DEPTH_BINS = 5  # depth of the asked fact in its document: [0, 0.2), [0.2, 0.4), ... [0.8, 1]
SAMPLE_PROMPTS = ["Who are you?", "What can you do?"]
HUB_OFFLINE = "the HF hub is unreachable (offline)"


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
def eval_multiple_choice(model, tokenizer, examples, context: int, amp, batch_size: int) -> dict:
    """Accuracy of the highest-logit letter among each example's "letters", in right-padded batches of
    similar length (causal attention: a row never reads its padding); prompts longer than the context are skipped."""
    device = model.lm_head.weight.device
    prompts = [tokenizer.render_for_completion(example["messages"][:1]) for example in examples]
    order = sorted((i for i, p in enumerate(prompts) if len(p) <= context), key=lambda i: len(prompts[i]))
    correct, chance = 0, 0.0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        letters = [examples[i]["letters"] for i in rows]
        width = max(map(len, letters))
        letter_ids = torch.tensor([[tokenizer.encode(x)[0] for x in ls] + [0] * (width - len(ls)) for ls in letters],
                                  device=device)  # [B, L]: every letter is one byte, so one token
        real = torch.tensor([[j < len(ls) for j in range(width)] for ls in letters], device=device)  # [B, L]
        answers = torch.tensor([ls.index(examples[i]["messages"][1]["content"].strip()) for i, ls in zip(rows, letters)],
                               device=device)  # [B]
        lengths = torch.tensor([len(prompts[i]) for i in rows], device=device)  # [B]
        batch = pad_sequence([torch.tensor(prompts[i]) for i in rows], batch_first=True,
                             padding_value=tokenizer.bos_token_id).to(device)  # [B, T]
        with amp:
            logits = model(batch)  # [B, T, V]
        last = logits[torch.arange(len(rows), device=device), lengths - 1]  # [B, V]
        scores = last.gather(1, letter_ids).masked_fill(~real, float("-inf"))  # [B, L]
        correct += int((scores.argmax(dim=1) == answers).sum())
        chance += float((1 / real.sum(dim=1)).sum())
    n = len(order)
    return {"n": n, "accuracy": correct / n if n else None, "chance": chance / n if n else None,
            "skipped_too_long": len(examples) - n}


def eval_generative(examples, check, reply, tokenizer, context: int) -> dict:
    """Share of replies that `check(example, reply)` accepts (pass@1 with greedy replies), chance 0;
    `reply(messages) -> str`. Prompts that leave no room for a reply in the context are skipped."""
    correct, n, shown = 0, 0, []
    for example in examples:
        if len(tokenizer.render_for_completion(example["messages"][:1])) >= context:
            continue
        completion = reply(example["messages"][:1])
        ok = check(example, completion)
        correct, n = correct + ok, n + 1
        if len(shown) < 3:
            shown.append(f"{'pass' if ok else 'fail'}: {completion[:160]!r}")
    return {"n": n, "accuracy": correct / n if n else None, "chance": 0.0, "skipped_too_long": len(examples) - n,
            "examples": shown}


def load_task(task: ChatTask, n: int, path: str) -> tuple[list[dict], dict | None]:
    """The examples of a task and None, or [] and its {"skipped": reason}; a bad local file exits with an error."""
    if n == 0:
        return [], {"skipped": f"--num_{task.flag}=0"}
    try:
        examples = load_examples(task, n, seed=0, path=path or None)
    except HubUnavailable as e:
        print(f"{task.name}: skipped, {HUB_OFFLINE}: {e}")
        return [], {"skipped": HUB_OFFLINE}
    except (OSError, ValueError) as e:
        sys.exit(f"error: --{task.key}_data: {e}")
    if not examples:
        sys.exit(f"error: --{task.key}_data={path}: no rows" if path else f"error: {task.name}: the hub gave no usable rows")
    return examples, None


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def memory_section(memory: dict) -> list:
    """The report's lines on chat memory (mc/memory_eval.py)."""
    if "skipped" in memory:
        return [f"Chat memory: skipped ({memory['skipped']})."]
    return [f"Chat memory (MegaContext: held-out conversations replayed into chat_cli --mc's session, W={memory['wc_budget']}; "
            f"{memory['filler_words']} words of book passages between the facts and the question; correct = the asked "
            "value in the greedy reply):",
            {"conversations": memory["n"], "accuracy": fmt(memory["accuracy"]),
             f"accuracy with the fact >= 8W back (n={memory['n_from_8W']})": fmt(memory["accuracy_from_8W"]),
             "mean distance of the fact": f"{memory['mean_distance_W']:.1f} W",
             "the value's tokens shown raw at the question (LensNet)": fmt(memory["fact_shown_raw"]),
             "accuracy when they are (the GPT's reading)": fmt(memory["accuracy_when_shown_raw"]),
             "replies with another fact's value": fmt(memory["other_fact_rate"]),
             **{f"accuracy at {b['distance']} (n={b['n']})": fmt(b["accuracy"]) for b in memory["by_distance"] if b["n"]},
             **{f"accuracy on {kind}s (n={b['n']})": fmt(b["accuracy"]) for kind, b in memory["by_kind"].items()}},
            "Examples:", *[f"    {e}" for e in memory["examples"]]]


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="which stage's checkpoint to evaluate")
    parser.add_argument("--tag", default="", help="checkpoint tag (default: the most recently written)")
    parser.add_argument("--step", type=checked_number(int, 0), default=None, help="checkpoint step (default: the last)")
    parser.add_argument("--num_longdoc", type=checked_number(int, 0), default=200, help="long-document QA examples")
    parser.add_argument("--longdoc_filler", default="pretraining", choices=["pretraining", "synthetic"], help="document filler text")
    parser.add_argument("--max_tokens", type=checked_number(int, 1), default=32, help="longest long-document QA completion, in tokens")
    for task in TASKS.values():
        what = "questions" if task.kind == "choice" else "problems"
        parser.add_argument(f"--num_{task.flag}", type=checked_number(int, 0), default=task.default_n,
                            help=f"{task.name} {what} (default {task.default_n}; 0 = skip)")
        parser.add_argument(f"--{task.key}_data", default="", metavar="PATH.jsonl",
                            help=f"{task.name} rows from this file (the schema of the hub's {task.hub[0]}; the first "
                                 f"--num_{task.flag} rows) instead of the hub")
    parser.add_argument("--num_memory", type=checked_number(int, 0), default=50, help="chat memory conversations (MegaContext checkpoints; 0 = skip)")
    parser.add_argument("--memory_distance", type=checked_number(float, 1), default=8.0, help="how far back the asked fact lies at least (about), in working contexts of W tokens")
    parser.add_argument("--batch_size", type=checked_number(int, 1), default=8, help="multiple-choice questions per forward pass")
    parser.add_argument("--device_type", default="", help="cuda|mps|cpu (empty = autodetect)")
    args = parser.parse_args(argv)

    tasks = {task.key: load_task(task, getattr(args, f"num_{task.flag}"), getattr(args, f"{task.key}_data"))
             for task in TASKS.values()}
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

    if "mc_config" not in meta or args.num_memory == 0:
        memory = {"skipped": "not a MegaContext checkpoint" if "mc_config" not in meta else "--num_memory=0"}
        print(f"chat memory: skipped ({memory['skipped']})")
    else:
        try:
            controller = load_controller(model, load_module_states(ckpt_dir, meta["step"], device), meta)
            filler = filler_paragraphs(prepare(*pretraining_data(meta)), "val")
        except (CheckpointError, DataError) as e:
            sys.exit(f"error: {e}")
        memory = memory_eval(controller, tokenizer, args.num_memory, filler, lambda: autocast_ctx(device.type, amp_dtype),
                             args.memory_distance)
        print(f"chat memory ({checkpoint}): accuracy {fmt(memory['accuracy'])} over {memory['n']} conversations, the fact "
              f"{memory['mean_distance_W']:.1f} W back on average ({fmt(memory['accuracy_from_8W'])} of "
              f"{memory['n_from_8W']} from 8W on), the value shown raw {fmt(memory['fact_shown_raw'])} (accuracy then "
              f"{fmt(memory['accuracy_when_shown_raw'])}), another fact's value {fmt(memory['other_fact_rate'])}")

    results = {}
    model.eval()
    for key, (examples, skipped) in tasks.items():
        task = TASKS[key]
        if skipped is not None:
            results[key] = skipped
            continue
        if task.kind == "choice":
            result = eval_multiple_choice(model, tokenizer, examples, context, amp, args.batch_size)
        else:
            reply = partial(greedy_reply, engine, tokenizer, context=context, max_tokens=task.max_tokens)
            result = eval_generative(examples, task.check, reply, tokenizer, context)
        results[key] = {**result, "data": getattr(args, f"{key}_data") or " ".join(filter(None, task.hub))}
        print(f"{task.name}: accuracy {fmt(result['accuracy'])} over {result['n']} (chance {fmt(result['chance'])}, "
              f"{result['skipped_too_long']} skipped as longer than the context)")
    score, score_tasks = chatcore({key: r for key, r in results.items() if "skipped" not in r})
    print(f"ChatCORE: {fmt(score)} over {', '.join(score_tasks) or 'no task'}")
    samples = [greedy_reply(engine, tokenizer, [{"role": "user", "content": p}], context, 64) for p in SAMPLE_PROMPTS]
    elapsed = time.perf_counter() - t0

    results = {"checkpoint": checkpoint, "context": context, "longdoc_qa": longdoc, "chat_memory": memory, **results, "chatcore": score,
               "chatcore_tasks": score_tasks, "samples": dict(zip(SAMPLE_PROMPTS, samples)),
               "eval_seconds": round(elapsed, 1)}
    path = get_report_dir() / "chat_eval.json"
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    names = {key: task.name for key, task in TASKS.items()}
    benchmarks = []
    for key, name in names.items():
        r = results[key]
        benchmarks += [f"{name} ({r.get('data', 'not evaluated')}):",
                       {"skipped": r["skipped"]} if "skipped" in r else
                       {"examples": r["n"], "accuracy": fmt(r["accuracy"]), "chance": fmt(r["chance"]),
                        "skipped (longer than the context)": r["skipped_too_long"]}]
    report.log_section(f"chat-eval-{args.source}", f"Chat evaluation ({args.source})", [
        {**{name: "skipped" if results[key].get("accuracy") is None else fmt(results[key]["accuracy"])
            for key, name in names.items()}, "ChatCORE": "skipped" if score is None else fmt(score),
         **({"chat memory (MC)": "skipped" if "skipped" in memory else fmt(memory["accuracy"])} if "mc_config" in meta else {})},
        {"checkpoint": checkpoint, "context": context, "evaluation time": f"{elapsed / 60:.2f} min",
         "ChatCORE over": ", ".join(score_tasks) or "no task"},
        f"Long-document QA (held out; documents of {longdoc['doc_words']} words, greedy, correct = answer string in the reply):",
        {"examples": longdoc["n"], "skipped (longer than the context)": longdoc["skipped_too_long"],
         "accuracy": fmt(longdoc["accuracy"]), "replies with a distractor value": fmt(longdoc["distractor_rate"]),
         **{f"accuracy at depth {r['depth']} (n={r['n']})": fmt(r["accuracy"]) for r in longdoc["by_depth"]}},
        "Examples:", *[f"    {e}" for e in longdoc["examples"]],
        *memory_section(memory),
        "Benchmarks (multiple choice: the highest-logit letter; GSM8K: the last number of the greedy reply; HumanEval: "
        "pass@1 of the greedy reply, run with its tests):",
        *benchmarks,
        "Samples (greedy):", *[f"    {p!r} -> {r!r}" for p, r in zip(SAMPLE_PROMPTS, samples)],
    ])
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
