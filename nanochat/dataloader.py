"""Pretraining batches: documents from the parquet shards, tokenized and packed into BOS-aligned rows.

Each row holds T+1 tokens (x = row[:-1], y = row[1:]) and starts with BOS. Rows are packed in
lanes: a lane packs documents, each with its own BOS, one after another; a document that does not
fit the rest of a row is cut, and its remainder opens the lane's next row behind a re-inserted BOS.
Nothing is thrown away.

Train batches mix documents: this rank has `lanes` lanes (default: one per row of a batch), the
j-th row comes from lane j mod lanes, and a lane that finishes its document takes the next one of
the rank's document stream. So the rows of a batch are different documents (with one lane a batch
would be consecutive pieces of one novel, and the loss would drift with whichever book is being
read). Val has one lane by default: every row is new text, in order.

The document stream is endless: epoch e is the split in an order shuffled from (seed, e) (train)
or in file order (val). Rank r of W reads positions r, r+W, r+2W, ... of the concatenated epochs,
so ranks read disjoint documents, and a split with fewer documents than ranks still works (ranks
then read the documents in different epochs). Documents are read and tokenized in batches, once,
whatever the number of lanes. The whole state is the stream cursor (documents handed out so far),
each lane's (document, token offset) and the row counter.
"""

import itertools
from collections import deque

import numpy as np
import torch

from nanochat.dataset import count_documents, iter_documents

TOKENIZE_DOCS = 64  # documents per batched tokenizer call ...
TOKENIZE_CHARS = 2**22  # ... or fewer, once they hold this many characters (a few novels)


def rows_to_batch(rows: np.ndarray, device: torch.device):
    """Token rows [B, T+1] -> (x, y) [B, T] on `device` (pinned host memory first for CUDA)."""
    x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class DataLoader:
    """Endless iterator of (x, y) token batches [B, T] for one rank; resumable via state_dict()."""

    def __init__(self, tokenizer, batch_size: int, seq_len: int, data_dir, split: str = "train", seed: int = 0,
                 rank: int = 0, world_size: int = 1, device="cpu", lanes: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.batch_size, self.seq_len = batch_size, seq_len
        self.data_dir, self.split, self.seed = data_dir, split, seed
        self.rank, self.world_size = rank, world_size
        self.n_lanes = lanes or (batch_size if split == "train" else 1)
        self.device = torch.device(device)
        self.n_docs = count_documents(data_dir, split)  # documents per epoch, all ranks together
        if self.n_docs == 0:
            raise ValueError(f"the {split} split of {data_dir} has no documents")
        self._seek(0, 0, [(-1, 0)] * self.n_lanes)

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

    def _seek(self, row: int, doc_cursor: int, lanes):
        """Position the loader: row counter, stream cursor, and each lane at (document number, token offset)."""
        self.row, self.doc_cursor = row, doc_cursor
        self._texts = self._documents(doc_cursor)
        self._tokens = deque()  # token arrays of the stream's next documents doc_cursor, doc_cursor+1, ...
        self.lanes = [[doc, offset, None] for doc, offset in lanes]  # [document number, offset, tokens]
        for lane in self.lanes:
            if lane[0] >= 0:  # resuming inside a document: read just that one again
                text = next(self._documents(lane[0]))
                lane[2] = np.asarray(self.tokenizer.encode([text], prepend=self.bos)[0], dtype=np.int64)

    def _next_document(self) -> tuple[int, np.ndarray]:
        """(number, tokens with BOS first) of the stream's next document; tokenizes the next few in one call."""
        if not self._tokens:
            texts, chars = [], 0
            for text in itertools.islice(self._texts, TOKENIZE_DOCS):
                texts.append(text)
                chars += len(text)
                if chars >= TOKENIZE_CHARS:
                    break
            ids = self.tokenizer.encode(texts, prepend=self.bos)
            self._tokens.extend(np.asarray(doc, dtype=np.int64) for doc in ids)
        self.doc_cursor += 1
        return self.doc_cursor - 1, self._tokens.popleft()

    def _fill(self, lane: list, row: np.ndarray):
        """Write the lane's next len(row) tokens into row (BOS-aligned, see the module docstring)."""
        L, filled = len(row), 0
        while filled < L:
            if lane[2] is None:
                lane[0], lane[2] = self._next_document()
                lane[1] = 0
            doc, offset = lane[2], lane[1]
            if filled == 0 and offset > 0:  # the rest of a cut document: re-insert its BOS
                row[0] = self.bos
                filled = 1
            take = min(L - filled, len(doc) - offset)
            row[filled:filled + take] = doc[offset:offset + take]
            filled += take
            lane[1] = offset + take
            if lane[1] == len(doc):
                lane[:] = [-1, 0, None]

    def next_rows(self) -> np.ndarray:
        """The next batch as a [B, T+1] array of token ids."""
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for b in range(self.batch_size):
            self._fill(self.lanes[self.row % self.n_lanes], rows[b])
            self.row += 1
        return rows

    def __iter__(self):
        return self

    def __next__(self):
        return rows_to_batch(self.next_rows(), self.device)

    def state_dict(self) -> dict:
        """Where the loader stands (JSON-able); load_state_dict of it continues with the same next batch."""
        return {"split": self.split, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "n_lanes": self.n_lanes, "epoch": (self.rank + self.doc_cursor * self.world_size) // self.n_docs,
                "row": self.row, "doc_cursor": self.doc_cursor, "lanes": [lane[:2] for lane in self.lanes]}

    def load_state_dict(self, state: dict):
        """Continue from a state_dict() taken by a loader with the same split, seed, rank, world_size and lanes."""
        if "lanes" not in state:
            raise ValueError("dataloader state was saved by an older single-lane loader: start the run afresh")
        for key in ("split", "seed", "rank", "world_size", "n_lanes"):
            if state[key] != getattr(self, key):
                raise ValueError(f"dataloader state was saved with {key}={state[key]!r}, this loader has {key}={getattr(self, key)!r}")
        self._seek(state["row"], state["doc_cursor"], [tuple(lane) for lane in state["lanes"]])
        return self
