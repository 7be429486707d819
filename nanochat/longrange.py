"""Long-range synthetic data: token rows whose answers can only be predicted from far history.

Every example is a row of exactly `n` token ids (the caller's T+1 for training), built at the token
level so history lengths, depths and in-block offsets are exact: natural filler tokens with planted
content, and answer tokens within the final tokens of the row (so they fall inside MegaContext's
shared horizon H). Five generators, methods of `LongRange`:

- `needle`: a key -> value needle (" The secret number of the silver falcon is 48213.") at a chosen or
  random depth and offset inside its K-token block, 0-15 decoy needles (other keys, other values) at
  random non-overlapping places, then a query: a newline and the needle's sentence again, whose value
  tokens are the answer, followed by ".". The query is the needle itself, so answering is retrieval
  by key (copying), and the decoys make the key matter.
- `recall`: N key -> value pairs (" silver falcon: 48213.") scattered through the history, then a
  newline and queries for some of the keys in the same format; the answers are the queried values.
- `facts`: entities defined with an attribute early (" Captain Mira Holt was born in Velmere.", in the
  first quarter of the row) and mentioned again later, once each (" Recall that Captain Mira Holt was
  born in Velmere."), the last mention ending the row: the mentioned values are predictable only from
  far history, and `mask` marks them.
- `copy`: a span of the filler repeated at the end of the row (the repeat is predictable only by
  looking back): the dense copy signal that makes a small GPT form its induction circuit within a
  few hundred steps, which retrieval of needles and recall pairs then builds on.
- `memory`: a memory conversation (nanochat.memory_chat: the user tells facts, shares passages, then
  asks for one) in the chat format, ending at the row end with the assistant's answer: retrieval in
  the form a chat needs it (the question paraphrases the fact instead of repeating it).

Keys and values come from word lists (nanochat.longdoc_qa) and random digits. All text pieces are
tokenized once in `LongRange.__init__`; an example is assembled by concatenating pre-tokenized
pieces, which equals tokenizing the sentence because every piece starts at a split-pattern boundary
(a leading space or a digit run), so generating a row costs a few numpy ops and no tokenizer call.
Guarantees, checked per example: keys are unique, values are unique, and every answer value (and
key) occurs in the history exactly once, in its planted sentence (a draw where the filler text holds
it is redone). `Example.answers` are the answer token spans [start, end) in row coordinates,
`evidence` the planted spans (same order) that hold them, `mask` [n] bool the answer tokens.

Filler is natural text when given (a token row from a `DataLoader` over the corpus, e.g. a second
loader over the training data; planted sentences overwrite it) and bland synthetic sentences
otherwise. Everything is drawn from the numpy Generator passed in, so an example is a pure function
of (rng seed, filler row). `MixedLoader` mixes these rows with natural text for training
(`--data_mix`, see `parse_mix`): row i of rank r picks its source and draws its content from
np.random.default_rng([seed, r, i]), so `state_dict()` (row counter + wrapped loaders) resumes exactly.
"""

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from nanochat.dataloader import DataLoader, rows_to_batch
from nanochat.dataset import filler_paragraphs
from nanochat.longdoc_qa import (ADJECTIVES, CREATURES, FILLER_ENDINGS, FILLER_SUBJECTS, FILLER_VERBS, FIRST_NAMES,
                                 LAST_NAMES, PLACE_HEADS, PLACE_TAILS, TITLES)
from nanochat.memory_chat import memory_example

SYNTHETIC = ("needle", "recall", "facts", "copy", "memory")  # source names of the generators in a --data_mix spec
NATURAL_ALIAS = "text"  # --data_mix may name the natural text by this alias instead of the --data value
NEEDLE_ATTRIBUTES = ["secret number", "code word", "password", "lucky number", "hiding place", "favourite thing"]
FACT_RELATIONS = [(" was born in", "word"), (" lives in", "word"), (" keeps the number", "number"),
                  (" has the locker", "number")]
MENTION_PREFIXES = [" Recall that", " As we know,", " Later on,", " Of course,"]
N_DIGITS = 5  # digits of a number value (the first non-zero)
N_SYNTHETIC_SENTENCES = 1024  # pool of pre-tokenized bland filler sentences
COPY_MIN_SPAN = 8  # shortest repeated span of a copy row (tokens)
MEMORY_MIN_ROW = 192  # shortest row for a memory conversation (its facts, question and answer take ~100 tokens)
PLACE_TRIES = 8  # candidate positions per decoy before it is dropped
REDRAWS = 20  # draws of keys/values before giving up on an example whose filler holds them
MAX_PACKED = 4  # most examples in one packed row


class DataMixError(ValueError):
    """A --data_mix spec or a row length the generators cannot work with; the message names the flag."""


@dataclass
class Example:
    tokens: np.ndarray  # [n] int64, the row
    source: str  # "needle" | "recall" | "facts"
    answers: list  # [(start, end)] answer token spans in row coordinates
    evidence: list  # [(start, end)] the planted history span holding each answer (same order)
    mask: np.ndarray  # [n] bool, the answer tokens (predictable only from far history)
    meta: dict = field(default_factory=dict)


def _count(row, seq) -> int:
    """Occurrences of the token sequence seq [m] in row [n]: windows starting with seq[0], compared at once."""
    m = len(seq)
    starts = np.flatnonzero(row[:len(row) - m + 1] == seq[0]) if m <= len(row) else np.zeros(0, dtype=np.int64)
    return int((row[starts[:, None] + np.arange(m)] == seq).all(1).sum())


def _stars_and_bars(rng, lengths, lo: int, hi: int):
    """Start positions for items of `lengths` placed in random order, non-overlapping, inside [lo, hi),
    uniformly over all such placements. Raises ValueError if they do not fit."""
    lengths = np.asarray(lengths, dtype=np.int64)
    slack = hi - lo - int(lengths.sum())
    if slack < 0:
        raise ValueError(f"{len(lengths)} planted spans of {int(lengths.sum())} tokens do not fit in {hi - lo} tokens")
    order = rng.permutation(len(lengths))
    cuts = np.sort(rng.integers(0, slack + 1, size=len(lengths)))  # gap before each item, cumulative
    starts_in_order = lo + cuts + np.concatenate([[0], np.cumsum(lengths[order])[:-1]])
    starts = np.empty(len(lengths), dtype=np.int64)
    starts[order] = starts_in_order
    return starts


def _fit_count(lengths, space: int) -> int:
    """How many of the first items fit (summed lengths) in `space` tokens."""
    return int(np.searchsorted(np.cumsum(lengths), space, side="right"))


class LongRange:
    """Pre-tokenized pieces and the generators. One instance per tokenizer; cheap to call."""

    def __init__(self, tokenizer, block_size: int = 32, max_decoys: int = 15, paragraphs=None):
        self.tokenizer, self.paragraphs = tokenizer, paragraphs  # paragraphs: passages of memory conversations
        self.bos = tokenizer.bos_token_id
        self.block_size, self.max_decoys = block_size, max_decoys

        def enc(texts):
            return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode(list(texts))]

        self.adj, self.creature = enc(f" {w}" for w in ADJECTIVES), enc(f" {w}" for w in CREATURES)
        self.attr = enc(f" The {a} of the" for a in NEEDLE_ATTRIBUTES)
        self.title, self.first, self.last = (enc(f" {w}" for w in ws) for ws in (TITLES, FIRST_NAMES, LAST_NAMES))
        self.relation = enc(r for r, _ in FACT_RELATIONS)
        self.mention = enc(MENTION_PREFIXES)
        self.places = enc(f" {h}{t}" for h in PLACE_HEADS for t in PLACE_TAILS)
        self.pairs2, self.digit1 = enc(f"{i:02d}" for i in range(100)), enc(str(i) for i in range(10))
        self.space, self.is_, self.dot, self.colon, self.newline = enc([" ", " is", ".", ":", "\n"])
        sentences = self._synthetic_sentences(random.Random(0))
        pool = enc(sentences)
        self.syn_len = np.array([len(s) for s in pool])  # [S]
        self.syn_start = np.concatenate([[0], np.cumsum(self.syn_len)[:-1]])  # [S]
        self.syn_flat = np.concatenate(pool)  # all sentences back to back
        self.max_value = max(len(self.space) + 2 * max(map(len, self.pairs2)) + max(map(len, self.digit1)),
                             max(map(len, self.places)))
        longest = lambda pieces: max(map(len, pieces))  # noqa: E731
        self.max_key = longest(self.adj) + longest(self.creature)
        self.max_needle = longest(self.attr) + self.max_key + len(self.is_) + self.max_value + len(self.dot)
        self.max_pair = self.max_key + len(self.colon) + self.max_value + len(self.dot)
        self.max_entity = longest(self.title) + longest(self.first) + longest(self.last)
        self.max_fact = longest(self.mention) + self.max_entity + longest(self.relation) + self.max_value + len(self.dot)

    @staticmethod
    def _synthetic_sentences(rng: random.Random) -> list[str]:
        out = []
        for _ in range(N_SYNTHETIC_SENTENCES):
            subject, thing = rng.sample(FILLER_SUBJECTS, 2)
            s = f"{subject} {rng.choice(FILLER_VERBS)} {thing} {rng.choice(FILLER_ENDINGS)}."
            out.append(" " + s[0].upper() + s[1:])
        return out

    def min_row_len(self, source: str) -> int:
        """Shortest row a generator accepts (BOS + one planted item + its query)."""
        need = {"needle": 2 * self.max_needle + len(self.newline), "recall": 2 * self.max_pair + len(self.newline),  # one pair + one query
                "facts": 4 * (self.max_fact + 1), "copy": 2 * COPY_MIN_SPAN, "memory": MEMORY_MIN_ROW}[source]
        return need + 2

    # ---- pieces --------------------------------------------------------------------------------

    def filler(self, rng, n: int) -> np.ndarray:
        """[n] synthetic filler: BOS, then random bland sentences (vectorised gather), cut to n."""
        k = n // int(self.syn_len.min()) + 1
        idx = rng.integers(0, len(self.syn_len), size=k)
        lens = self.syn_len[idx]
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])  # start of each sentence in the output
        pos = np.arange(n - 1)
        which = np.searchsorted(offsets, pos, side="right") - 1
        return np.concatenate([[self.bos], self.syn_flat[self.syn_start[idx[which]] + pos - offsets[which]]])

    def _number(self, rng) -> tuple[np.ndarray, str]:
        d = rng.integers(0, 10, size=N_DIGITS)
        d[0] = rng.integers(1, 10)
        text = "".join(map(str, d))
        chunks = [self.pairs2[int(text[i:i + 2])] if i + 2 <= N_DIGITS else self.digit1[int(text[i])]
                  for i in range(0, N_DIGITS, 2)]
        return np.concatenate([self.space, *chunks]), text

    def _values(self, rng, m: int, kind: str | None = None) -> tuple[list, list]:
        """m distinct values (tokens with their leading space, text): numbers or place words, per value at random
        unless `kind` ("number" | "word") is given."""
        tokens, texts = [], []
        while len(tokens) < m:
            k = kind or ("number" if rng.random() < 0.5 else "word")
            if k == "number":
                tok, text = self._number(rng)
            else:
                i = int(rng.integers(len(self.places)))
                tok, text = self.places[i], f"{PLACE_HEADS[i // len(PLACE_TAILS)]}{PLACE_TAILS[i % len(PLACE_TAILS)]}"
            if text not in texts:
                tokens.append(tok)
                texts.append(text)
        return tokens, texts

    def _keys(self, rng, m: int) -> tuple[list, list]:
        """m distinct keys "adjective creature" (tokens, text)."""
        flat = rng.choice(len(ADJECTIVES) * len(CREATURES), size=m, replace=False)
        a, c = flat // len(CREATURES), flat % len(CREATURES)
        return ([np.concatenate([self.adj[i], self.creature[j]]) for i, j in zip(a, c)],
                [f"{ADJECTIVES[i]} {CREATURES[j]}" for i, j in zip(a, c)])

    def _row(self, rng, n: int, filler) -> np.ndarray:
        if filler is None:
            return self.filler(rng, n)
        if len(filler) < n:
            raise ValueError(f"filler row of {len(filler)} tokens is shorter than the example row of {n}")
        return np.array(filler[:n], dtype=np.int64)

    @staticmethod
    def _unique_in(row, end: int, seqs) -> bool:
        """Every sequence occurs exactly once in row[:end]."""
        return all(_count(row[:end], s) == 1 for s in seqs)

    # ---- generators ----------------------------------------------------------------------------

    def needle(self, rng, n: int, filler=None, n_decoys: int | None = None, depth: float | None = None,
               offset: int | None = None) -> Example:
        """A needle example of n tokens. depth in [0, 1] (0: the needle starts right after BOS, 1: it ends where
        the query starts; linear in the start position) and offset in [0, K) (needle start % K) are drawn
        uniformly unless given; n_decoys (default uniform in 0..max_decoys) are placed where they fit.
        meta: needle_pos, needle_span, depth, offset, query_start, key_pos, decoy_positions, key, value,
        decoy_keys, decoy_values."""
        K = self.block_size
        for _ in range(REDRAWS):
            m = 1 + (int(rng.integers(0, self.max_decoys + 1)) if n_decoys is None else n_decoys)
            keys, key_texts = self._keys(rng, m)
            values, value_texts = self._values(rng, m)
            attrs = rng.integers(0, len(self.attr), size=m)
            attrs[1:] = np.where(rng.random(m - 1) < 0.5, attrs[0], attrs[1:])  # half the decoys share the attribute
            sentences = [np.concatenate([self.attr[a], k, self.is_, v, self.dot]) for a, k, v in zip(attrs, keys, values)]
            query = np.concatenate([self.newline, sentences[0]])
            q = n - len(query)  # query start = history length
            hi = q - len(sentences[0])  # last legal needle start
            if hi < 1:
                raise DataMixError(f"a row of {n} tokens is too short for a needle example (needs >= {self.min_row_len('needle')})")
            row = self._row(rng, n, filler)
            if depth is None and offset is None:
                p = int(rng.integers(1, hi + 1))
            else:  # depth 0 = the first legal start (after BOS), 1 = the last (the needle ends at the query)
                d = float(rng.random()) if depth is None else float(depth)
                p = 1 + int(round(d * (hi - 1)))
                if offset is not None:
                    p = p // K * K + int(offset)
                    p = p + K if p < 1 else p
                    p = p - K * -(-(p - hi) // K) if p > hi else p
                p = min(max(p, 1), hi)
            occupied = [(p, p + len(sentences[0]))]
            decoy_pos = []
            for s in sentences[1:]:  # at most max_decoys iterations, each vectorised over candidates
                cand = rng.integers(1, max(2, q - len(s) + 1), size=PLACE_TRIES)
                starts, ends = np.array(occupied).T
                free = ~((cand[:, None] < ends) & (starts < cand[:, None] + len(s))).any(1) & (cand + len(s) <= q)
                if free.any():
                    c = int(cand[free.argmax()])
                    decoy_pos.append(c)
                    occupied.append((c, c + len(s)))
            placed = [sentences[0]] + sentences[1:1 + len(decoy_pos)]
            for (start, _), s in zip(occupied, placed):
                row[start:start + len(s)] = s
            row[q:] = query
            key_at = len(self.attr[attrs[0]])
            if self._unique_in(row, q, [values[0], keys[0]]):
                break
        else:
            raise ValueError("needle: the filler keeps containing the planted key or value; use other filler")
        a_end = n - len(self.dot)
        answer = (a_end - len(values[0]), a_end)
        mask = np.zeros(n, dtype=bool)
        mask[answer[0]:answer[1]] = True
        meta = {"needle_pos": p, "needle_span": occupied[0], "depth": (p - 1) / max(1, hi - 1), "offset": p % K, "query_start": q,
                "key_pos": p + key_at, "decoy_positions": decoy_pos, "key": key_texts[0], "value": value_texts[0],
                "decoy_keys": key_texts[1:1 + len(decoy_pos)], "decoy_values": value_texts[1:1 + len(decoy_pos)]}
        return Example(row, "needle", [answer], [occupied[0]], mask, meta)

    def recall(self, rng, n: int, filler=None, n_pairs: int = 8, n_queries: int = 2, window: int | None = None) -> Example:
        """N = n_pairs key -> value pairs scattered over the history, then queries for n_queries of them (fewer
        if they do not fit, or if their answers would not all lie in the last `window` tokens)."""
        for _ in range(REDRAWS):
            keys, key_texts = self._keys(rng, n_pairs)
            values, value_texts = self._values(rng, n_pairs)
            pairs = [np.concatenate([k, self.colon, v, self.dot]) for k, v in zip(keys, values)]
            asked = rng.choice(n_pairs, size=min(n_queries, n_pairs), replace=False)
            room = n - 1 - sum(map(len, pairs)) - len(self.newline)  # tokens left for the queries
            for k in range(len(asked), 0, -1):  # keep the last k queries: they must fit (and end in the window)
                size = sum(len(pairs[i]) for i in asked[len(asked) - k:])
                first_answer = n - size + len(keys[asked[len(asked) - k]]) + len(self.colon)
                if k == 1 or (size <= room and (window is None or first_answer >= n - window)):
                    break
            asked = asked[len(asked) - k:]
            query = np.concatenate([self.newline, *[pairs[i] for i in asked]])
            q = n - len(query)
            row = self._row(rng, n, filler)
            try:
                starts = _stars_and_bars(rng, [len(p) for p in pairs], 1, q)
            except ValueError:
                raise DataMixError(f"a row of {n} tokens is too short for {n_pairs} recall pairs") from None
            for s, p in zip(starts, pairs):
                row[s:s + len(p)] = p
            row[q:] = query
            if self._unique_in(row, q, [values[i] for i in asked] + [keys[i] for i in asked]):
                break
        else:
            raise ValueError("recall: the filler keeps containing a planted key or value; use other filler")
        answers, evidence, at = [], [], q + len(self.newline)
        mask = np.zeros(n, dtype=bool)
        for i in asked:
            start = at + len(keys[i]) + len(self.colon)
            answers.append((start, start + len(values[i])))
            evidence.append((int(starts[i]), int(starts[i]) + len(pairs[i])))
            mask[start:start + len(values[i])] = True
            at += len(pairs[i])
        meta = {"n_pairs": n_pairs, "pair_positions": starts.tolist(), "asked": asked.tolist(), "query_start": q,
                "keys": key_texts, "values": value_texts}
        return Example(row, "recall", answers, evidence, mask, meta)

    def facts(self, rng, n: int, filler=None, n_facts: int = 6, define_frac: float = 0.25) -> Example:
        """Entities defined with an attribute in the first define_frac of the row, mentioned once each in the
        second half (the last mention ends the row: value, then "."). mask = the mentioned values."""
        for _ in range(REDRAWS):
            T_, F_, L_ = (rng.integers(0, len(w), size=n_facts) for w in (TITLES, FIRST_NAMES, LAST_NAMES))
            ids = np.unique(np.stack([T_, F_, L_], 1), axis=0)
            ids = ids[rng.permutation(len(ids))]
            entities = [np.concatenate([self.title[a], self.first[b], self.last[c]]) for a, b, c in ids]
            rel = rng.integers(0, len(FACT_RELATIONS), size=len(entities))
            values, value_texts = [], []
            for r in rel:  # one value per fact, distinct over the document
                tok, text = self._values(rng, 1, FACT_RELATIONS[r][1])
                while text[0] in value_texts:
                    tok, text = self._values(rng, 1, FACT_RELATIONS[r][1])
                values.append(tok[0])
                value_texts.append(text[0])
            claims = [np.concatenate([e, self.relation[r], v, self.dot]) for e, r, v in zip(entities, rel, values)]
            prefixes = [self.mention[i] for i in rng.integers(0, len(self.mention), size=len(claims))]
            defs_end = max(int(n * define_frac), 1 + len(claims[0]))
            k = max(1, _fit_count([len(c) for c in claims], defs_end - 1))  # facts that fit the definition zone
            mentions = [np.concatenate([pre, c]) for pre, c in zip(prefixes[:k], claims[:k])]
            mid = max(n // 2, defs_end)
            last = n - len(mentions[-1])
            k_mid = _fit_count([len(m) for m in mentions[:-1]], last - mid)
            mentions = mentions[:k_mid] + [mentions[-1]]
            facts = list(range(k_mid)) + [k - 1]  # claim index of each mention
            if last < mid:
                raise DataMixError(f"a row of {n} tokens is too short for a facts example (needs >= {self.min_row_len('facts')})")
            row = self._row(rng, n, filler)
            def_pos = _stars_and_bars(rng, [len(claims[i]) for i in facts], 1, defs_end)
            men_pos = np.append(_stars_and_bars(rng, [len(m) for m in mentions[:-1]], mid, last), last).astype(np.int64)
            for s, i in zip(def_pos, facts):
                row[s:s + len(claims[i])] = claims[i]
            for s, m in zip(men_pos, mentions):
                row[s:s + len(m)] = m
            ok = all(_count(row[:men_pos[j]], values[i]) == 1 for j, i in enumerate(facts))
            if ok:
                break
        else:
            raise ValueError("facts: the filler keeps containing a planted value; use other filler")
        answers, evidence = [], []
        mask = np.zeros(n, dtype=bool)
        for j, i in enumerate(facts):
            end = int(men_pos[j]) + len(mentions[j]) - len(self.dot)
            answers.append((end - len(values[i]), end))
            evidence.append((int(def_pos[j]), int(def_pos[j]) + len(claims[i])))
            mask[end - len(values[i]):end] = True
        meta = {"definition_positions": def_pos.tolist(), "mention_positions": men_pos.tolist(),
                "values": [value_texts[i] for i in facts]}
        return Example(row, "facts", answers, evidence, mask, meta)

    def copy(self, rng, n: int, filler=None) -> Example:
        """A span of L tokens (L uniform in [n/8, n/4], at least COPY_MIN_SPAN) repeated at the end of the row,
        its source at a uniformly random earlier place. mask = the repeated tokens after the first (the
        first only says that a repeat begins)."""
        row = self._row(rng, n, filler)
        L = int(rng.integers(max(COPY_MIN_SPAN, n // 8), max(COPY_MIN_SPAN, n // 4) + 1))
        if 2 * L + 1 > n:
            raise DataMixError(f"a row of {n} tokens is too short for a copy example (needs >= {self.min_row_len('copy')})")
        start = int(rng.integers(1, n - 2 * L + 1))
        row[n - L:] = row[start:start + L]
        mask = np.zeros(n, dtype=bool)
        mask[n - L + 1:] = True
        return Example(row, "copy", [(n - L + 1, n)], [(start, start + L)], mask, {"source_pos": start, "span": L})

    def memory(self, rng, n: int, filler=None) -> Example:
        """A memory conversation rendered in the chat format and right-aligned in a row of n tokens: filler before
        its BOS, its final assistant turn (the answer, e.g. "Your locker number is 4821." and <|assistant_end|>)
        at the row end. Its filler turns (passages from `paragraphs`, else synthetic) take up to n/2 words,
        so the fact lies anywhere from just before the question to most of a row back.
        mask = the answer turn's tokens; evidence = an empty span at the conversation's start."""
        seed, words = int(rng.integers(2**62)), n // 2
        while True:  # the same conversation with fewer filler words until it fits
            conversation = memory_example(random.Random(seed), words, self.paragraphs)
            ids, learn = self.tokenizer.render_conversation(conversation)
            if len(ids) <= n:
                break
            if words == 0:
                raise DataMixError(f"a row of {n} tokens is too short for a memory conversation (needs >= {MEMORY_MIN_ROW})")
            words = words * 2 // 3
        row = self._row(rng, n, filler)
        start = n - len(ids)
        row[start:] = ids
        answer = start + int(np.flatnonzero(np.asarray(learn) == 0)[-1]) + 1  # the final run of learned tokens
        mask = np.zeros(n, dtype=bool)
        mask[answer:] = True
        meta = {k: conversation["meta"][k] for k in ("question", "answer", "filler_words")}
        return Example(row, "memory", [(answer, n)], [(start, start)], mask, {**meta, "conversation_start": start})

    def generate(self, source: str, rng, n: int, filler=None) -> Example:
        """A training example of `source` with randomised settings (decoys, pairs, facts)."""
        if source == "needle":
            return self.needle(rng, n, filler)
        if source == "recall":
            most = (n - 2 - len(self.newline)) // self.max_pair - 1  # pairs that surely fit beside one query
            n_pairs = int(rng.integers(1, max(1, min(32, most)) + 1))
            return self.recall(rng, n, filler, n_pairs=n_pairs, n_queries=int(rng.integers(1, 5)))
        if source == "facts":
            return self.facts(rng, n, filler, n_facts=int(rng.integers(2, 9)))
        if source == "copy":
            return self.copy(rng, n, filler)
        if source == "memory":
            return self.memory(rng, n, filler)
        raise ValueError(f"unknown long-range source {source!r}; known: {SYNTHETIC}")

    def packed(self, source: str, rng, n: int, filler=None) -> Example:
        """2..MAX_PACKED examples of `source` back to back in a row of n tokens, each opening with BOS (like packed
        documents). Each piece's length is log-uniform between the shortest row the generator accepts and what
        is left, so the first piece (at positions 0..m, as a short standalone sequence is) is often short:
        a model trained only on full-length rows forgets how to answer after short histories. Keys of
        different pieces are drawn independently (a rare repeated key is a decoy from another document)."""
        lo = self.min_row_len(source)
        lengths, left = [], n
        while left >= 2 * lo and len(lengths) < MAX_PACKED - 1:
            m = int(np.exp(rng.uniform(np.log(lo), np.log(left - lo))))
            lengths.append(m)
            left -= m
        lengths.append(left)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pieces = []
        for start, m in zip(starts, lengths):
            example = self.generate(source, rng, m, None if filler is None else filler[start:start + m])
            example.tokens[0] = self.bos
            pieces.append(example)
        shift = lambda spans, s: [(a + s, b + s) for a, b in spans]  # noqa: E731
        return Example(np.concatenate([e.tokens for e in pieces]), source,
                       [span for e, s in zip(pieces, starts) for span in shift(e.answers, int(s))],
                       [span for e, s in zip(pieces, starts) for span in shift(e.evidence, int(s))],
                       np.concatenate([e.mask for e in pieces]), {"pieces": lengths})


# ---------------------------------------------------------------------------------------------
# training mix

def target_weights(answers, answer_weight: float = 1.0, filler_weight: float = 1.0):
    """Loss weights [B, T] of the targets of a MixedLoader batch (answers [B, T] bool): answer targets count
    answer_weight, the other targets of a long-range row (its filler) filler_weight, natural-text rows 1.
    None when every weight is 1 (the plain mean)."""
    if answer_weight == 1.0 and filler_weight == 1.0:
        return None
    synthetic = answers.any(1, keepdim=True)  # [B, 1]: every long-range row has answers
    other = torch.where(synthetic, filler_weight, 1.0)
    return torch.where(answers, answer_weight, other).float()


def weighted_lm_loss(model, x, y, weights=None):
    """Next-token loss of model on x, y [B, T]: the plain mean, or the mean over the counted targets (y >= 0)
    under weights [B, T] (from `target_weights`)."""
    if weights is None:
        return model(x, y)
    return weighted_mean(model(x, y, loss_reduction="none"), y, weights)


def weighted_mean(per_target, y, weights=None):
    """Mean of per-target losses [B, T] over the counted targets (y >= 0), under weights [B, T] when given."""
    counted = (y >= 0).float() if weights is None else weights * (y >= 0)
    return (per_target * counted).sum() / counted.sum().clamp(min=1e-8)


def parse_mix(spec: str, natural: str, flag: str = "--data_mix") -> dict:
    """'books:0.6,needle:0.2,...' -> {source: weight} normalised to sum 1. The natural text is named by
    `natural` (the --data value) or the alias 'text' (stored as 'text'). Raises DataMixError."""
    mix = {}
    for item in spec.split(","):
        name, sep, weight = item.strip().rpartition(":")
        if not sep or not name:
            raise DataMixError(f"{flag}={spec!r}: item {item.strip()!r} is not SOURCE:WEIGHT")
        name = NATURAL_ALIAS if name == natural else name
        if name not in (NATURAL_ALIAS, *SYNTHETIC):
            raise DataMixError(f"{flag}={spec!r}: unknown source {name!r}; use {natural!r} (the --data) or "
                               f"'{NATURAL_ALIAS}' for natural text, or one of {', '.join(SYNTHETIC)}")
        try:
            w = float(weight)
        except ValueError:
            raise DataMixError(f"{flag}={spec!r}: weight {weight!r} of {name!r} is not a number") from None
        if not w > 0 or not np.isfinite(w):
            raise DataMixError(f"{flag}={spec!r}: weight of {name!r} must be positive, got {weight}")
        if name in mix:
            raise DataMixError(f"{flag}={spec!r}: source {name!r} is listed twice")
        mix[name] = w
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


class MixedLoader:
    """Batches (x, y, answers) [B, T] whose rows come from natural text or the generators: x, y as from a
    DataLoader, answers [B, T] bool marks the targets that are answers (`Example.mask`; none in natural rows).

    Row i of this rank picks its source by np.random.default_rng([seed, rank, i]) and the weights of
    `mix` (from parse_mix), or of `warmup_mix` for the first `warmup_rows` rows (a curriculum: e.g. copy
    rows only, until the induction circuit has formed); a synthetic row is drawn from the same RNG with filler from a second loader
    over the same corpus (seed + 1, so it does not repeat the natural rows), and with probability `pack` it
    holds several shorter examples (`LongRange.packed`). Natural rows come one at a
    time from a batch-1 DataLoader that rotates over batch_size packing lanes (train), so a batch's
    rows are different documents. state = row counter + both loaders' states.
    """

    def __init__(self, tokenizer, batch_size: int, seq_len: int, data_dir, mix: dict, split: str = "train",
                 seed: int = 0, rank: int = 0, world_size: int = 1, device="cpu", block_size: int = 32,
                 warmup_mix: dict | None = None, warmup_rows: int = 0, pack: float = 0.0):
        if not 0 <= pack <= 1:
            raise DataMixError(f"--pack_rows={pack} must lie in [0, 1]")
        self.batch_size, self.seq_len, self.seed, self.rank, self.pack = batch_size, seq_len, seed, rank, pack
        self.mix, self.warmup_mix, self.warmup_rows = dict(mix), dict(warmup_mix or {}), warmup_rows if warmup_mix else 0
        self.tables = [(list(m), np.cumsum(list(m.values()))) for m in (self.mix, self.warmup_mix or self.mix)]
        self.names = list(dict.fromkeys([*self.mix, *self.warmup_mix]))  # every source either mix uses
        paragraphs = filler_paragraphs(data_dir, split) if "memory" in self.names else None
        self.gen = LongRange(tokenizer, block_size, paragraphs=paragraphs)
        for name in self.names:
            if name in SYNTHETIC and seq_len + 1 < self.gen.min_row_len(name):
                raise DataMixError(f"--max_seq_len={seq_len} is too short for '{name}' rows of --data_mix "
                                   f"(needs >= {self.gen.min_row_len(name) - 1} with this tokenizer)")
        # one row at a time, from batch_size lanes in turn (so a batch's rows are different documents)
        loader = lambda s: DataLoader(tokenizer, 1, seq_len, data_dir, split, s, rank, world_size,  # noqa: E731
                                      lanes=batch_size if split == "train" else 1)
        self.natural = loader(seed) if NATURAL_ALIAS in self.names else None
        self.filler = loader(seed + 1) if set(self.names) & set(SYNTHETIC) else None
        self.device = torch.device(device)
        self.row = 0

    def source_of(self, i: int):
        """(source name, rng positioned after the draw) of row i."""
        rng = np.random.default_rng([self.seed, self.rank, i])
        names, cum = self.tables[int(i < self.warmup_rows)]
        k = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(names) - 1)
        return names[k], rng

    def next_row(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [T+1], answer mask [T+1] bool) of the next row."""
        source, rng = self.source_of(self.row)
        self.row += 1
        if source == NATURAL_ALIAS:
            return self.natural.next_rows()[0], np.zeros(self.seq_len + 1, dtype=bool)
        filler = self.filler.next_rows()[0]
        packed = self.pack > 0 and rng.random() < self.pack  # no draw when off: rows stay as without packing
        example = (self.gen.packed if packed else self.gen.generate)(source, rng, self.seq_len + 1, filler)
        return example.tokens, example.mask

    def next_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch: tokens [B, T+1] and answer masks [B, T+1]."""
        tokens, masks = zip(*(self.next_row() for _ in range(self.batch_size)))
        return np.stack(tokens), np.stack(masks)

    def __iter__(self):
        return self

    def __next__(self):
        tokens, masks = self.next_rows()
        x, y = rows_to_batch(tokens, self.device)
        return x, y, torch.from_numpy(masks[:, 1:]).to(self.device)

    def state_dict(self) -> dict:
        return {"kind": "mixed", "mix": self.mix, "warmup_mix": self.warmup_mix, "warmup_rows": self.warmup_rows,
                "pack": self.pack, "seed": self.seed, "rank": self.rank, "row": self.row,
                "natural": self.natural.state_dict() if self.natural else None,
                "filler": self.filler.state_dict() if self.filler else None}

    def load_state_dict(self, state: dict):
        if state.get("kind") != "mixed":
            raise DataMixError("the saved loader state is of a run without --data_mix; resume with the same flags")
        saved = (state["mix"], state.get("warmup_mix", {}), state.get("warmup_rows", 0), state.get("pack", 0.0),
                 state["seed"], state["rank"])
        if saved != (self.mix, self.warmup_mix, self.warmup_rows, self.pack, self.seed, self.rank):
            raise DataMixError(f"the saved loader state has --data_mix {state['mix']}, --warmup_mix "
                               f"{state.get('warmup_mix', {})} for {state.get('warmup_rows', 0)} rows, --pack_rows "
                               f"{state.get('pack', 0.0)}, seed {state['seed']}, rank {state['rank']}; this run has {self.mix}, "
                               f"{self.warmup_mix} for {self.warmup_rows} rows, {self.pack}, {self.seed}, {self.rank}")
        self.row = state["row"]
        for loader, key in ((self.natural, "natural"), (self.filler, "filler")):
            if loader is not None:
                loader.load_state_dict(state[key])
        return self
