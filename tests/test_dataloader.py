"""BOS-aligned packing, epochs, determinism, exact resume and rank splitting of the DataLoader."""

import re

import numpy as np
import pytest
import torch

from nanochat.dataset import prepare, iter_documents
from nanochat.dataloader import DataLoader


class ByteTokenizer:
    """Stand-in tokenizer: id = byte + 1, BOS = 0."""
    bos_token_id = 0

    def encode(self, texts, prepend=None):
        head = [] if prepend is None else [prepend]
        return [head + (np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64) + 1).tolist() for t in texts]


def decode(ids):
    return bytes(int(i) - 1 for i in ids).decode()


def stream_text(rows):
    """All rows' tokens with every BOS removed, as text: the documents' concatenation if nothing is lost."""
    flat = rows.reshape(-1)
    return decode(flat[flat != 0])


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """40 train documents <doc00>..<doc39> of varied length (one ~3000 chars) and 2 val documents."""
    monkeypatch.setenv("MC_BASE_DIR", str(tmp_path / "base"))
    src = tmp_path / "corpus"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(42):
        body = "".join(chr(c) for c in rng.integers(97, 123, size=3000 if i == 7 else int(rng.integers(5, 120))))
        (src / f"{i:02d}.txt").write_text(f"<doc{i:02d}>{body}")
    return prepare(str(src))


def docs_of(data_dir, split="train", shuffle_seed=None):
    return list(iter_documents(data_dir, split, shuffle_seed=shuffle_seed))


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_shift_and_bos(data_dir):
    loader = DataLoader(ByteTokenizer(), 4, 32, data_dir)
    for x, y in take(loader, 20):
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.long
        assert (x[:, 1:] == y[:, :-1]).all()
        assert (x[:, 0] == 0).all()


def test_nothing_lost_and_long_document_continues(data_dir):
    """With BOS tokens removed, the rows spell out the documents in order: cut documents resume on the next row."""
    loader = DataLoader(ByteTokenizer(), 3, 64, data_dir, split="val")
    rows = np.stack([loader.next_rows() for _ in range(10)])  # [10, B, T+1]
    val = "".join(docs_of(data_dir, "val"))
    assert stream_text(rows).startswith(val * 3)  # val is not shuffled: every epoch in file order
    loader = DataLoader(ByteTokenizer(), 4, 128, data_dir, seed=3)
    rows = np.concatenate([loader.next_rows() for _ in range(40)])  # [160, T+1]
    epoch0 = "".join(docs_of(data_dir, shuffle_seed=(3, 0)))
    epoch1 = "".join(docs_of(data_dir, shuffle_seed=(3, 1)))
    assert stream_text(rows).startswith(epoch0 + epoch1)
    long_doc = [i for i, row in enumerate(rows) if "<doc07>" in decode(row[row != 0])][0]
    continuation = rows[long_doc + 1]
    assert continuation[0] == 0 and (continuation[1:] != 0).all()  # a row of the long document's middle: one BOS


def test_deterministic_for_a_seed(data_dir):
    a = take(DataLoader(ByteTokenizer(), 2, 48, data_dir, seed=5), 30)
    b = take(DataLoader(ByteTokenizer(), 2, 48, data_dir, seed=5), 30)
    c = take(DataLoader(ByteTokenizer(), 2, 48, data_dir, seed=6), 30)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


@pytest.mark.parametrize("world_size, rank", [(1, 0), (3, 2)])
def test_exact_resume(data_dir, world_size, rank):
    """A loader restored from state_dict() at any point yields what the uninterrupted one yields next."""
    loader = DataLoader(ByteTokenizer(), 3, 40, data_dir, seed=1, rank=rank, world_size=world_size)
    states, batches = [], []
    for _ in range(100):  # several epochs of this rank's share
        states.append(loader.state_dict())
        batches.append(next(loader))
    assert states[-1]["epoch"] >= 2 and any(s["token_offset"] > 0 for s in states)
    for i in (0, 1, 17, 50, 99):
        resumed = DataLoader(ByteTokenizer(), 3, 40, data_dir, seed=1, rank=rank, world_size=world_size)
        resumed.load_state_dict(states[i])
        for x, y in batches[i:i + 3]:
            rx, ry = next(resumed)
            assert torch.equal(rx, x) and torch.equal(ry, y)


def test_state_mismatch_is_an_error(data_dir):
    state = DataLoader(ByteTokenizer(), 2, 16, data_dir, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        DataLoader(ByteTokenizer(), 2, 16, data_dir).load_state_dict(state)


def test_ranks_read_disjoint_documents(data_dir):
    seen = []
    for rank in (0, 1):
        loader = DataLoader(ByteTokenizer(), 4, 64, data_dir, seed=2, rank=rank, world_size=2)
        rows = np.concatenate([loader.next_rows() for _ in range(20)])
        ids = re.findall(r"<doc(\d\d)>", stream_text(rows))
        seen.append(set(ids[:20]))  # this rank's 20 documents of epoch 0
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 40


def test_fewer_documents_than_ranks(data_dir):
    """The val split has 2 documents; 4 ranks still get batches (from different epochs)."""
    for rank in range(4):
        x, y = next(DataLoader(ByteTokenizer(), 2, 512, data_dir, split="val", rank=rank, world_size=4))
        assert x.shape == (2, 512) and (x[:, 0] == 0).all()
