"""RULER-style synthetic long-context tasks (NVIDIA's RULER benchmark, its recipes re-written here at token level).

Each task plants needles in a haystack (the corpus' val split as filler, or RULER's noise sentences) and ends the
row with a question whose answers are the row's last tokens, so every arm of `scripts.mc_eval` scores the same
positions (teacher-forced exact match of each answer). The needle is RULER's "One of the special magic numbers
for {key} is: {value}." with keys made of two syllables ("Kalo"), which the training generators
(nanochat/longrange.py) never use, and numbers spelt as theirs are (5 digits in 2-digit tokens; RULER's 7-digit
values as the BPE splits them, one token a digit here, were not copied even by full attention over 256 tokens),
so the tasks measure retrieval in sentences, keys and questions the model was not trained on. Tasks:

  niah_single       one needle in noise sentences, asked for its value
  niah_multikey     four needles of different keys in the corpus, one asked
  niah_multikey_haystack  the haystack is needles (about one per 40 tokens, other keys): the key must be matched
  niah_multivalue   four needles of one key, all four values asked (in the order they appear)
  niah_multiquery   four needles of four keys, all four asked (the values in the question's order)
  vt                variable tracking: "VAR ABCDE = 12345." then a chain of four "VAR FGHIJ = VAR ABCDE." spread
                    over the history; asked which variables hold the value (the five names, in chain order)

`RulerTasks.example(task, rng, n, filler)` returns a `nanochat.longrange.Example`: the row of n tokens, the
answer spans, the evidence spans (the needles holding them: what the oracle arm shows) and the answer mask.
Needles are placed at uniform random non-overlapping positions (a pure function of the numpy Generator).
"""

import numpy as np

from nanochat.longdoc_qa import SYLLABLES
from nanochat.longrange import Example, LongRange

TASKS = ("niah_single", "niah_multikey", "niah_multikey_haystack", "niah_multivalue", "niah_multiquery", "vt")
NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
N_NEEDLES = 4  # keys of multikey and multiquery, values of multivalue, hops of vt


class RulerTasks:
    """Assembles RULER rows of exactly n tokens (its sentences tokenized per example: an evaluation, not a hot path);
    numbers and corpus filler come from the training generator (`LongRange`)."""

    def __init__(self, tokenizer, longrange: LongRange):
        self.tok, self.bos, self.numbers = tokenizer, tokenizer.bos_token_id, longrange
        self.noise = self.enc(NOISE)

    def enc(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text), dtype=np.int64)

    def _key(self, rng, taken: set) -> str:
        while True:
            a, b = rng.choice(SYLLABLES, size=2)
            if (key := f"{a.capitalize()}{b}") not in taken:
                taken.add(key)
                return key

    def _value(self, rng, taken: set) -> tuple[np.ndarray, str]:
        """A number value as the training rows spell numbers (`LongRange._number`: 2-digit tokens), and its text."""
        while True:
            tokens, text = self.numbers._number(rng)
            if text not in taken:
                taken.add(text)
                return tokens, text

    def _haystack(self, rng, n: int, filler) -> np.ndarray:
        """BOS and n-1 tokens of RULER's noise sentences, or of the corpus filler row when given."""
        if filler is not None:
            return self.numbers._row(rng, n, filler)
        reps = -(-n // len(self.noise)) + 1
        start = int(rng.integers(0, len(self.noise)))
        return np.concatenate([[self.bos], np.tile(self.noise, reps)[start:start + n - 1]])

    @staticmethod
    def _place(rng, row, pieces, end: int) -> list:
        """Write pieces into row[1:end] at uniform random non-overlapping places, in the given order; their starts."""
        lengths = np.array([len(p) for p in pieces])
        free = end - 1 - int(lengths.sum())
        if free < 0:
            raise ValueError(f"a row of {len(row)} tokens is too short for {len(pieces)} needles and the question")
        gaps = np.sort(rng.integers(0, free + 1, size=len(pieces)))
        starts = 1 + gaps + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for s, p in zip(starts, pieces):
            row[s:s + len(p)] = p
        return [int(s) for s in starts]

    def example(self, task: str, rng, n: int, filler=None) -> Example:
        """A row of n tokens of `task` (TASKS); filler: a corpus row of >= n tokens (None: RULER's noise)."""
        if task not in TASKS:
            raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
        keys, values = set(), set()
        if task == "vt":
            letters = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
            names = ["".join(rng.choice(letters, size=5)) for _ in range(N_NEEDLES + 1)]
            value, _ = self._value(rng, values)
            pieces = [np.concatenate([self.enc(f" VAR {names[0]} ="), value, self.enc(".")])] + \
                     [self.enc(f" VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
            question = np.concatenate([self.enc("\nWhich variables are assigned the value"), value, self.enc("? Answer:")])
            answers = [(self.enc(""), self.enc(f" {name}")) for name in names]  # name i is assigned in piece i
            asked = list(range(len(pieces)))
        else:
            count = {"niah_single": 1, "niah_multikey_haystack": max(N_NEEDLES, (n - 64) // 40)}.get(task, N_NEEDLES)
            key = self._key(rng, keys)
            pairs = [(key if task == "niah_multivalue" else self._key(rng, keys), self._value(rng, values))
                     for _ in range(count)]
            pieces = [np.concatenate([self.enc(f" One of the special magic numbers for {k} is:"), v, self.enc(".")])
                      for k, (v, _) in pairs]
            if task == "niah_multivalue":
                asked = list(range(count))
                question = self.enc(f"\nWhat are all the special magic numbers for {key}? They are:")
                answers = [(self.enc(""), v) for _, (v, _) in pairs]
            elif task == "niah_multiquery":
                asked = list(range(count))
                question = self.enc("\nThe special magic numbers for " + ", ".join(k for k, _ in pairs) + " are:")
                answers = [(self.enc(""), v) for _, (v, _) in pairs]  # in the question's order
            else:
                asked = [int(rng.integers(0, count))]
                k, (v, _) = pairs[asked[0]]
                question = self.enc(f"\nWhat is the special magic number for {k}? The special magic number for {k} is:")
                answers = [(self.enc(""), v)]
        tail = np.concatenate([question, *(np.concatenate(a) for a in answers)])
        q = n - len(tail)
        row = self._haystack(rng, n, None if task in ("niah_single", "niah_multikey_haystack") else filler)
        starts = self._place(rng, row, pieces, q)
        row[q:] = tail
        spans, pos = [], q + len(question)
        for prefix, scored in answers:
            spans.append((pos + len(prefix), pos + len(prefix) + len(scored)))
            pos += len(prefix) + len(scored)
        evidence = [(starts[i], starts[i] + len(pieces[i])) for i in asked]
        mask = np.zeros(n, dtype=bool)
        for s_, e in spans:
            mask[s_:e] = True
        return Example(row, task, spans, evidence, mask, {"task": task})
