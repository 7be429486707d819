"""Pretraining batches: documents from the parquet shards, tokenized and packed into BOS-aligned rows.

Each row holds T+1 tokens (x = row[:-1], y = row[1:]) and starts with BOS. Documents, each with its
own BOS, are packed one after another; a document that does not fit the rest of a row is cut, and
its remainder opens the next row behind a re-inserted BOS. Nothing is thrown away and rows come
from the stream in order, so a novel flows over consecutive rows (row b+1 continues row b).

The document stream is endless: epoch e is the split in an order shuffled from (seed, e) (train)
or in file order (val). Rank r of W reads positions r, r+W, r+2W, ... of the concatenated epochs,
so ranks read disjoint documents, and a split with fewer documents than ranks still works (ranks
then read the documents in different epochs). The loader's whole state is (doc_cursor,
token_offset): which of this rank's documents is being read, and how far into its tokens.
"""

import itertools
from collections import deque

import numpy as np
import torch

from nanochat.dataset import count_documents, iter_documents

TOKENIZE_DOCS = 64  # documents per batched tokenizer call ...
TOKENIZE_CHARS = 2**22  # ... or fewer, once they hold this many characters (a few novels)


class DataLoader:
    """Endless iterator of (x, y) token batches [B, T] for one rank; resumable via state_dict()."""

    def __init__(self, tokenizer, batch_size: int, seq_len: int, data_dir, split: str = "train", seed: int = 0,
                 rank: int = 0, world_size: int = 1, device="cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.batch_size, self.seq_len = batch_size, seq_len
        self.data_dir, self.split, self.seed = data_dir, split, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.n_docs = count_documents(data_dir, split)  # documents per epoch, all ranks together
        if self.n_docs == 0:
            raise ValueError(f"the {split} split of {data_dir} has no documents")
        self._seek(0, 0)

    def _seek(self, doc_cursor: int, token_offset: int):
        """Position the loader at token `token_offset` of this rank's document number `doc_cursor`."""
        self.doc_cursor, self.token_offset = doc_cursor, token_offset
        self._texts = self._documents(doc_cursor)
        self._tokens = deque()  # token arrays of this rank's documents doc_cursor, doc_cursor+1, ...

    def _documents(self, doc_cursor: int):
        """This rank's document texts from its document number doc_cursor on, across epochs, forever."""
        pos = self.rank + doc_cursor * self.world_size  # position in the concatenation of all epochs
        while True:
            epoch = pos // self.n_docs
            shuffle_seed = (self.seed, epoch) if self.split == "train" else None
            for text in iter_documents(self.data_dir, self.split, start=pos - epoch * self.n_docs,
                                       step=self.world_size, shuffle_seed=shuffle_seed):
                yield text
                pos += self.world_size

    def _current_tokens(self) -> np.ndarray:
        """Tokens (BOS first) of the document at doc_cursor; tokenizes the next few in one call if needed."""
        if not self._tokens:
            texts, chars = [], 0
            for text in itertools.islice(self._texts, TOKENIZE_DOCS):
                texts.append(text)
                chars += len(text)
                if chars >= TOKENIZE_CHARS:
                    break
            ids = self.tokenizer.encode(texts, prepend=self.bos)
            self._tokens.extend(np.asarray(doc, dtype=np.int64) for doc in ids)
        return self._tokens[0]

    def next_rows(self) -> np.ndarray:
        """The next batch as a [B, T+1] array of token ids."""
        B, L = self.batch_size, self.seq_len + 1
        rows = np.empty((B, L), dtype=np.int64)
        for b in range(B):
            filled = 0
            while filled < L:
                doc = self._current_tokens()
                if filled == 0 and self.token_offset > 0:  # the rest of a cut document: re-insert its BOS
                    rows[b, 0] = self.bos
                    filled = 1
                take = min(L - filled, len(doc) - self.token_offset)
                rows[b, filled:filled + take] = doc[self.token_offset:self.token_offset + take]
                filled += take
                self.token_offset += take
                if self.token_offset == len(doc):
                    self._tokens.popleft()
                    self.doc_cursor += 1
                    self.token_offset = 0
        return rows

    def __iter__(self):
        return self

    def __next__(self):
        rows = self.next_rows()
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())  # [B, T] each
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        """Where the loader stands (JSON-able); load_state_dict of it continues with the same next batch."""
        return {"split": self.split, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "epoch": (self.rank + self.doc_cursor * self.world_size) // self.n_docs,
                "doc_cursor": self.doc_cursor, "token_offset": self.token_offset}

    def load_state_dict(self, state: dict):
        """Continue from a state_dict() taken by a loader with the same split, seed, rank and world_size."""
        for key in ("split", "seed", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"dataloader state was saved with {key}={state[key]!r}, this loader has {key}={getattr(self, key)!r}")
        self._seek(state["doc_cursor"], state["token_offset"])
        return self
