"""The benchmarks of scripts.chat_eval: ARC-Easy, ARC-Challenge, MMLU (multiple choice), GSM8K (math) and
HumanEval (code).

A benchmark is one `ChatTask` in TASKS: its key in report/chat_eval.json, its flags, where its rows live on
the HF hub, how a row becomes an example (the conversation a model would be fine-tuned on, {"messages":
[user, assistant]}, plus what scoring needs) and how it is scored:
- "choice": the answer is the choice letter with the highest logit right after <|assistant_start|>, among
  the example's "letters" (as in nanochat: the model is not asked to produce the format);
- "generate": a greedy reply, judged by the task's `check(example, reply) -> bool`.
Rows come from the hub through `datasets` (nanochat.chat_data.hub_dataset; HubUnavailable offline) or from
a local .jsonl file of rows in the hub's schema (tests, machines without the hub). ChatCORE, like CORE, is
the mean over the evaluated tasks of the accuracy centred on chance: (accuracy - chance) / (1 - chance),
chance 0 for generative tasks.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanochat import gsm8k
from nanochat.chat_data import choice_conversation, gsm8k_conversation, hub_dataset
from nanochat.execution import run_program
from nanochat.tokenizer import validate_conversation

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ChatTask:
    key: str  # in report/chat_eval.json; its local file flag is --{key}_data
    name: str  # in the report and the printed lines
    flag: str  # the count flag is --num_{flag}
    default_n: int  # examples evaluated by default (0 = skipped unless asked)
    hub: tuple[str, str | None, str]  # (dataset path, config, split)
    convert: Callable[[dict], dict]  # hub row -> example
    kind: str  # "choice" or "generate"
    check: Callable[[dict, str], bool] | None = None  # generate: (example, reply) -> correct
    max_tokens: int = 0  # generate: the longest reply


def arc_example(row: dict) -> dict:
    labels = row["choices"]["label"]
    if row["answerKey"] not in labels:
        raise ValueError(f"answer {row['answerKey']!r} is not one of the choices {labels}")
    return {**choice_conversation(row["question"], labels, row["choices"]["text"], row["answerKey"]), "letters": labels}


def mmlu_example(row: dict) -> dict:
    letters = list(LETTERS[:len(row["choices"])])
    return {**choice_conversation(row["question"], letters, row["choices"], letters[row["answer"]]), "letters": letters}


# -----------------------------------------------------------------------------
# GSM8K: a word problem; correct when the reply's last number is the answer after the solution's "####"

def gsm8k_example(row: dict) -> dict:
    conversation = gsm8k_conversation(row)
    return {**conversation, "answer": gsm8k.answer_of(conversation)}


def gsm8k_correct(example: dict, reply: str) -> bool:
    return gsm8k.reward(reply, example["answer"]) == 1.0


# -----------------------------------------------------------------------------
# HumanEval: the prompt is the start of a program (imports, helpers, a signature and docstring)

def humaneval_example(row: dict) -> dict:
    messages = [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}]
    return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"]}


def extract_code(reply: str) -> str:
    """The first ``` fenced block of a reply (```python or bare; unclosed when the reply was cut off), else the whole reply."""
    fenced = re.search(r"```[a-zA-Z]*\n(.*?)(?:```|\Z)", reply, flags=re.DOTALL)
    return fenced.group(1) if fenced else reply


def humaneval_program(example: dict, reply: str) -> str:
    """The program to run: the prompt, the reply's code, the task's tests and the call of its `check`. A reply
    that defines the entry point replaces the prompt's stub (the prompt still gives imports and helpers); any
    other reply is read as the continuation of the prompt (the function's body)."""
    prompt, code, entry = example["messages"][0]["content"], extract_code(reply), example["entry_point"]
    defines_entry = re.search(rf"^def {re.escape(entry)}\s*\(", code, flags=re.MULTILINE) is not None
    program = f"{prompt}\n\n{code}" if defines_entry else prompt + code
    return f"{program}\n\n{example['test']}\n\ncheck({entry})\n"


def humaneval_passed(example: dict, reply: str) -> bool:
    return run_program(humaneval_program(example, reply)).passed


# -----------------------------------------------------------------------------

TASKS = {task.key: task for task in [
    ChatTask("arc_easy", "ARC-Easy", "arc", 500, ("allenai/ai2_arc", "ARC-Easy", "test"), arc_example, "choice"),
    ChatTask("arc_challenge", "ARC-Challenge", "arc_challenge", 500, ("allenai/ai2_arc", "ARC-Challenge", "test"),
             arc_example, "choice"),
    ChatTask("mmlu", "MMLU", "mmlu", 2000, ("cais/mmlu", "all", "test"), mmlu_example, "choice"),
    ChatTask("gsm8k", "GSM8K", "gsm8k", 200, ("openai/gsm8k", "main", "test"), gsm8k_example, "generate", gsm8k_correct,
             max_tokens=256),
    ChatTask("humaneval", "HumanEval", "humaneval", 164, ("openai/openai_humaneval", None, "test"), humaneval_example,
             "generate", humaneval_passed, max_tokens=512),
]}


def _example(task: ChatTask, row: dict) -> dict:
    """A row as an example of the task, checked; ValueError (KeyError, ...) when the row does not fit."""
    example = task.convert(row)
    validate_conversation(example)
    return example


def load_examples(task: ChatTask, n: int, seed: int = 0, path: str | Path | None = None) -> list[dict]:
    """Up to n examples: the first n rows of a local .jsonl file, else n rows of the hub split in a seeded order
    (HubUnavailable when offline). Hub rows that break the turn format are dropped; a bad file row is a
    ValueError naming file and line."""
    if path is None:
        rows = hub_dataset(*task.hub)
        examples = []
        for row in rows.shuffle(seed=seed).select(range(min(n, len(rows)))):
            try:
                examples.append(_example(task, row))
            except ValueError:
                continue  # a few hub rows break the turn format (e.g. empty turns); they are dropped, not repaired
        return examples
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(examples) == n:
                break
            if not line.strip():
                continue
            try:
                example = _example(task, json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a {task.name} row in the hub's schema ({type(e).__name__}: {e})") from e
            examples.append(example)
    return examples


def chatcore(results: dict[str, dict]) -> tuple[float | None, list[str]]:
    """ChatCORE over the tasks of `results` that were evaluated (a dict with "accuracy" and "chance"), and their keys."""
    keys = [key for key, r in results.items() if r.get("accuracy") is not None]
    if not keys:
        return None, []
    centred = [(results[k]["accuracy"] - results[k]["chance"]) / (1 - results[k]["chance"]) for k in keys]
    return sum(centred) / len(centred), keys
