"""The CORE metric (DCLM, arXiv:2406.11794): a base model's accuracy on in-context tasks, each centred on its
random baseline, averaged.

A bundle directory holds core.yaml (`icl_tasks`: label, dataset_uri, num_fewshot, icl_task_type, optional
continuation_delimiter), eval_meta_data.csv (random baselines in percent, columns "Eval Task" and "Random
baseline") and eval_data/<dataset_uri> jsonl files. Three task types, all scored by one forward pass per example
over its candidate sequences:
- multiple_choice: one context, several continuations; the prediction is the lowest mean loss over each
  continuation's tokens.
- schema: several contexts, one continuation; scored like multiple_choice over the shared continuation.
- language_modeling: correct iff the greedy argmax reproduces every continuation token.
Few-shot examples are other examples of the same task drawn with a seed fixed per example, so prompts are the
same on every run. `fetch_bundle` downloads the public bundle once into $MC_BASE_DIR/eval_bundle.
"""

import csv
import contextlib
import http.client
import json
import os
import random
import shutil
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
FETCH_ATTEMPTS = 3
REQUIRED_FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
                   "language_modeling": ("context", "continuation")}


class CoreError(ValueError):
    """A missing, unreadable or malformed evaluation bundle."""


@dataclass
class Task:
    label: str
    task_type: str  # a key of REQUIRED_FIELDS
    num_fewshot: int
    delimiter: str  # between context and continuation
    random_baseline: float  # percent
    examples: list[dict]


def _read_jsonl(path: Path, task_type: str) -> list[dict]:
    """The examples of one task, each checked for the fields its type needs."""
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except ValueError as e:
            raise CoreError(f"{path}:{n}: not valid JSON ({e})") from None
        missing = [k for k in REQUIRED_FIELDS[task_type] if not isinstance(ex, dict) or k not in ex]
        if missing:
            raise CoreError(f"{path}:{n}: a {task_type} example needs {', '.join(missing)}")
        examples.append(ex)
    if not examples:
        raise CoreError(f"{path} has no examples")
    return examples


def load_bundle(bundle_dir) -> list[Task]:
    """The tasks of a bundle directory, in core.yaml's order."""
    d = Path(bundle_dir)
    for name in ("core.yaml", "eval_meta_data.csv"):
        if not (d / name).is_file():
            raise CoreError(f"evaluation bundle {d} has no {name}")
    try:
        entries = yaml.safe_load((d / "core.yaml").read_text())["icl_tasks"]
        with open(d / "eval_meta_data.csv", newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise CoreError(f"evaluation bundle {d}: core.yaml or eval_meta_data.csv is malformed ({type(e).__name__}: {e})") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise CoreError(f"{d / 'core.yaml'}: icl_tasks must be a non-empty list of tasks")
    tasks = []
    for entry in entries:
        label, task_type = entry.get("label"), entry.get("icl_task_type")
        if task_type not in REQUIRED_FIELDS:
            raise CoreError(f"{d / 'core.yaml'}: task {label!r} has unknown icl_task_type {task_type!r}; known: {', '.join(REQUIRED_FIELDS)}")
        if label not in baselines:
            raise CoreError(f"{d / 'eval_meta_data.csv'} has no random baseline for task {label!r}")
        path = d / "eval_data" / str(entry.get("dataset_uri"))
        if not path.is_file():
            raise CoreError(f"task {label!r}: data file {path} does not exist")
        shots = entry.get("num_fewshot", [0])
        tasks.append(Task(label, task_type, int(shots[0] if isinstance(shots, list) else shots),
                          entry.get("continuation_delimiter", " "), baselines[label], _read_jsonl(path, task_type)))
    return tasks


def fetch_bundle(base_dir) -> Path:
    """The public bundle, unpacked under base_dir/eval_bundle (downloaded on first use via a temp file and
    renames). Raises CoreError when it is not there and cannot be fetched: HF_HUB_OFFLINE is set or the
    download failed."""
    dest = Path(base_dir) / "eval_bundle"
    if (dest / "core.yaml").is_file():
        return dest
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise CoreError("HF_HUB_OFFLINE is set")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="eval_bundle.tmp") as tmp:
        archive = Path(tmp) / "eval_bundle.zip"
        for attempt in range(FETCH_ATTEMPTS):
            try:
                with urllib.request.urlopen(BUNDLE_URL, timeout=60) as r, open(archive, "wb") as f:
                    shutil.copyfileobj(r, f, 2**20)
                break
            except (OSError, http.client.HTTPException) as e:
                if attempt == FETCH_ATTEMPTS - 1:
                    raise CoreError(f"download of {BUNDLE_URL} failed after {FETCH_ATTEMPTS} attempts: {e}") from None
                time.sleep(2**attempt)
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise CoreError(f"{BUNDLE_URL} is not a zip archive ({e})") from None
        if not (Path(tmp) / "eval_bundle" / "core.yaml").is_file():
            raise CoreError(f"{BUNDLE_URL} has no eval_bundle/core.yaml")
        try:
            os.replace(Path(tmp) / "eval_bundle", dest)
        except OSError:  # another rank unpacked it first
            if not (dest / "core.yaml").is_file():
                raise
    return dest


def fewshot_examples(task: Task, idx: int) -> list[dict]:
    """num_fewshot other examples of the task, the same ones on every run."""
    others = [i for i in range(len(task.examples)) if i != idx]
    rng = random.Random(1234 + idx)
    return [task.examples[i] for i in rng.sample(others, min(task.num_fewshot, len(others)))]


def build_prompts(task: Task, idx: int) -> list[str]:
    """The texts to tokenize for one example: one per candidate (multiple_choice, schema), or for
    language_modeling the context alone then context + continuation. Shots are separated by a blank line."""
    ex, delim = task.examples[idx], task.delimiter
    if task.task_type == "multiple_choice":
        shots = [s["query"] + delim + str(s["choices"][s["gold"]]) for s in fewshot_examples(task, idx)]
        return ["\n\n".join(shots + [ex["query"] + delim + str(c)]) for c in ex["choices"]]
    if task.task_type == "schema":
        shots = [s["context_options"][s["gold"]] + delim + s["continuation"] for s in fewshot_examples(task, idx)]
        return ["\n\n".join(shots + [c + delim + ex["continuation"]]) for c in ex["context_options"]]
    shots = [s["context"].strip() + delim + s["continuation"] for s in fewshot_examples(task, idx)]
    context = "\n\n".join(shots + [ex["context"].strip() + delim])
    return [context.rstrip(), context + ex["continuation"]]  # stripped: a trailing space would merge into the next token


def _common_length(rows: list[list[int]], reverse: bool = False) -> int:
    """Length of the token prefix (or suffix) all rows share."""
    n = 0
    for column in zip(*(reversed(r) if reverse else r for r in rows)):
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


def candidates(task: Task, idx: int, tokenizer) -> tuple[list[list[int]], list[int]]:
    """Token rows to score and where each row's scored continuation starts (it runs to the row's end)."""
    rows = tokenizer.encode(build_prompts(task, idx), prepend=tokenizer.bos_token_id)
    if task.task_type == "language_modeling":  # rows: context alone, context + continuation
        return rows[1:], [min(_common_length(rows), len(rows[1]) - 1)]
    shortest = min(len(r) for r in rows)  # every row keeps >= 1 context token (BOS) and >= 1 scored token
    if task.task_type == "schema":  # the shared suffix is the continuation
        suffix = max(min(_common_length(rows, reverse=True), shortest - 1), 1)
        return rows, [len(r) - suffix for r in rows]
    start = min(_common_length(rows), shortest - 1)  # multiple_choice: the shared prefix is the context
    return rows, [start] * len(rows)


@torch.no_grad()
def evaluate_example(model, tokenizer, task: Task, idx: int, device, autocast=contextlib.nullcontext) -> bool:
    """Whether the model gets one example right. Rows longer than the model's sequence_len lose tokens on the
    left (the continuation is kept); all rows go through the model in one right-padded batch."""
    rows, starts = candidates(task, idx, tokenizer)
    max_len = model.config.sequence_len
    for i, row in enumerate(rows):
        if len(row) > max_len:
            cut = len(row) - max_len
            rows[i], starts[i] = row[cut:], max(starts[i] - cut, 1)
    ends = [len(r) for r in rows]
    ids = torch.full((len(rows), max(ends)), tokenizer.bos_token_id, dtype=torch.long)  # [C, T]
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    ids = ids.to(device)
    with autocast():
        logits = model(ids).float()  # [C, T, V]; position t predicts token t+1
    if task.task_type == "language_modeling":
        return bool((logits[0, starts[0] - 1:ends[0] - 1].argmax(-1) == ids[0, starts[0]:ends[0]]).all())
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # [C, T-1]
    mean_losses = torch.stack([losses[i, s - 1:e - 1].mean() for i, (s, e) in enumerate(zip(starts, ends))])
    return int(mean_losses.argmin()) == task.examples[idx]["gold"]


def centred(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so chance is 0 and perfect is 1 (random_baseline in percent)."""
    return (accuracy - 0.01 * random_baseline) / (1 - 0.01 * random_baseline)


def evaluate_core(model, tokenizer, tasks: list[Task], device, max_per_task: int = 0, rank: int = 0,
                  world_size: int = 1, autocast=contextlib.nullcontext) -> dict:
    """{"tasks": {label: {"accuracy", "centred", "examples"}}, "CORE": mean centred accuracy}. max_per_task > 0
    scores a fixed random subset of each task; ranks take strided examples and sum their counts."""
    results = {}
    for task in tasks:
        order = list(range(len(task.examples)))
        random.Random(1337).shuffle(order)
        order = order[:max_per_task] if max_per_task > 0 else order
        correct = sum(evaluate_example(model, tokenizer, task, i, device, autocast) for i in order[rank::world_size])
        if world_size > 1 and dist.is_initialized():
            total = torch.tensor([float(correct)], device=device)
            dist.all_reduce(total)
            correct = total.item()
        accuracy = correct / len(order)
        results[task.label] = {"accuracy": accuracy, "centred": centred(accuracy, task.random_baseline),
                               "examples": len(order)}
    core = sum(r["centred"] for r in results.values()) / len(results) if results else float("nan")
    return {"tasks": results, "CORE": core}
