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


def markers_in_fill_order(rows):
    """Document ids in the order the lanes took their documents. Rows [N, B, T+1] are filled batch by batch,
    row by row; a document starts at its BOS, which may be the last token of a row (then the next row of the
    lane opens with a re-inserted BOS and the marker)."""
    starts = []
    N, B, L = rows.shape
    for b in range(B):
        flat = rows[:, b].reshape(-1)
        for p in np.flatnonzero(flat == ord("<") + 1):
            start = p - 1  # the document's BOS
            if start % L == 0 and start > 0 and flat[start - 1] == 0:
                start -= 1  # it ended the previous row; this row's BOS is the re-inserted one
            marker = flat[p:p + 16]
            marker = marker[marker != 0][:7]  # "<docNN>", skipping a BOS re-inserted inside it
            if len(marker) == 7:  # (not cut off by the end of the rows)
                starts.append((start // L, b, start % L, decode(marker[4:6])))
    return [doc for *_, doc in sorted(starts)]


def test_nothing_lost_and_long_document_continues(data_dir):
    """With BOS tokens removed, the rows spell out the documents: val in order (one lane); train in B lanes
    (row b of every batch), each lane spelling whole documents in turn, taken from the stream in order."""
    loader = DataLoader(ByteTokenizer(), 3, 64, data_dir, split="val")
    rows = np.stack([loader.next_rows() for _ in range(10)])  # [10, B, T+1]
    val = "".join(docs_of(data_dir, "val"))
    assert stream_text(rows).startswith(val * 3)  # val is not shuffled: every epoch in file order
    B = 4
    loader = DataLoader(ByteTokenizer(), B, 128, data_dir, seed=3)
    rows = np.stack([loader.next_rows() for _ in range(60)])  # [60, B, T+1]
    stream = [doc for epoch in range(8) for doc in docs_of(data_dir, shuffle_seed=(3, epoch))]
    started = markers_in_fill_order(rows)
    assert len(started) > 80  # two epochs or more
    assert started == [re.match(r"<doc(\d\d)>", doc).group(1) for doc in stream[:len(started)]]
    for b in range(B):  # every lane spells whole documents back to back (the last one still being read)
        pieces = re.split(r"(?=<)", stream_text(rows[:, b]))[1:]  # "<" only opens a document
        assert all(piece in stream for piece in pieces[:-1]) and any(doc.startswith(pieces[-1]) for doc in stream)
    firsts = [re.findall(r"<doc(\d\d)>", decode(rows[0, b][rows[0, b] != 0]))[0] for b in range(B)]
    assert len(set(firsts)) == B  # the rows of a batch are different documents
    b, i = next((b, i) for i in range(59) for b in range(B) if "<doc07>" in decode(rows[i, b][rows[i, b] != 0]))
    continuation = rows[i + 1, b]
    assert continuation[0] == 0 and (continuation[1:] != 0).all()  # the long document's middle: one BOS


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
    for _ in range(200):  # several epochs of this rank's share
        states.append(loader.state_dict())
        batches.append(next(loader))
    assert states[-1]["epoch"] >= 2 and any(offset > 0 for s in states for _, offset in s["lanes"])
    for i in (0, 1, 17, 50, 199):
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
        rows = np.stack([loader.next_rows() for _ in range(40)])
        seen.append(set(markers_in_fill_order(rows)[:20]))  # this rank's 20 documents of epoch 0
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 40


def test_old_state_is_refused(data_dir):
    old = {"split": "train", "seed": 0, "rank": 0, "world_size": 1, "epoch": 0, "doc_cursor": 3, "token_offset": 5}
    with pytest.raises(ValueError, match="older single-lane loader"):
        DataLoader(ByteTokenizer(), 2, 16, data_dir).load_state_dict(old)


def test_fewer_documents_than_ranks(data_dir):
    """The val split has 2 documents; 4 ranks still get batches: ranks 2 and 3 start on the documents of ranks
    0 and 1, read again in the next epoch."""
    val = docs_of(data_dir, "val")
    assert len(val) == 2
    firsts = []
    for rank in range(4):
        x, y = next(DataLoader(ByteTokenizer(), 2, 512, data_dir, split="val", rank=rank, world_size=4))
        assert x.shape == (2, 512) and (x[:, 0] == 0).all()
        firsts.append(decode(x[0, 1:8]))  # the first row starts with a document: "<docNN>"
    assert firsts == [val[0][:7], val[1][:7], val[0][:7], val[1][:7]] and firsts[0] != firsts[1]
