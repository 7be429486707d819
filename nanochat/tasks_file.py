"""User task files for evaluation: JSONL items {"context": str, "question": str, "answer": str}.

An item becomes one token row: BOS, context + blank line + question, then the answer (with a space in
front unless the question ends in whitespace or the answer starts with it). The answer is scored by
exact match of the model's greedy predictions at its positions (teacher-forced), so it must fit the
scored tail of E tokens. Rows are left-padded with BOS so the history (row minus its last token) is a
multiple of K and at least E tokens, and grouped by padded length into batches.
Every problem is a TasksFileError naming the file and, for an item, its line number.
"""

import json
from pathlib import Path

import numpy as np

KEYS = ("context", "question", "answer")


class TasksFileError(ValueError):
    """A --tasks_file that is missing, empty or malformed; the message names the file and line."""


def load_tasks_file(path) -> list[dict]:
    """Items of a JSONL tasks file (blank lines skipped), each with its line number under "line"."""
    path = Path(path)
    if not path.is_file():
        raise TasksFileError(f"--tasks_file {path} does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise TasksFileError(f"--tasks_file {path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise TasksFileError(f"--tasks_file {path}, line {lineno}: expected a JSON object with keys {list(KEYS)}")
            if missing := [k for k in KEYS if k not in item]:
                raise TasksFileError(f"--tasks_file {path}, line {lineno}: missing key(s) {missing}")
            for k in KEYS:
                if not isinstance(item[k], str):
                    raise TasksFileError(f"--tasks_file {path}, line {lineno}: {k!r} must be a string, "
                                         f"got {type(item[k]).__name__}")
            if not item["answer"].strip():
                raise TasksFileError(f"--tasks_file {path}, line {lineno}: 'answer' is empty")
            items.append({**{k: item[k] for k in KEYS}, "line": lineno})
    if not items:
        raise TasksFileError(f"--tasks_file {path} is empty (no JSONL items)")
    return items


def tokenize_items(items, tokenizer, block_size: int, tail: int, path="") -> list[tuple[np.ndarray, int]]:
    """(row [L+1] int64 with L a multiple of K and >= tail, answer token count) per item."""
    out = []
    for item in items:
        question, answer = item["question"], item["answer"]
        if not (question[-1:].isspace() or answer[:1].isspace()):
            answer = " " + answer
        prompt = tokenizer.encode(item["context"] + "\n\n" + question, prepend=tokenizer.bos_token_id)
        answer_ids = tokenizer.encode(answer)
        if len(answer_ids) > tail:
            raise TasksFileError(f"--tasks_file {path}, line {item['line']}: the answer has {len(answer_ids)} tokens, more "
                                 f"than the {tail} scored final tokens (--tail, at most the checkpoint's R)")
        ids = prompt + answer_ids
        L = max(-(-(len(ids) - 1) // block_size), -(-tail // block_size)) * block_size
        row = np.full(L + 1, tokenizer.bos_token_id, dtype=np.int64)
        row[L + 1 - len(ids):] = ids
        out.append((row, len(answer_ids)))
    return out


def batches(rows, batch_size: int):
    """Group (row, answer_len) pairs of equal length into batches -> (rows [B, L+1], answer lens [B])."""
    by_len = {}
    for row, k in rows:
        by_len.setdefault(len(row), []).append((row, k))
    for n in sorted(by_len):
        group = by_len[n]
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            yield np.stack([r for r, _ in chunk]), [k for _, k in chunk]
