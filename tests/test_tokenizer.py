"""Tokenizer: training, encode/decode, special tokens, save/load and its error messages (offline, CPU)."""

import json
import os

import pytest
import torch
from pydoc_data.topics import topics

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer

VOCAB_SIZE = 400
TRICKY_TEXT = "Héllo wörld! 你好, мир 🙂🚀  tabs\there\n\n  trailing spaces   \r\nnumbers 1234567 3.14 <|bos|>"


def training_docs():
    """~30 KB of English prose from Python's bundled help topics, as separate documents."""
    return [topics[name] for name in sorted(topics)[:12]]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter(training_docs()), VOCAB_SIZE)


def test_training_text_is_small():
    n_chars = sum(len(doc) for doc in training_docs())
    assert 5_000 < n_chars < 100_000


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == VOCAB_SIZE
    n_regular = VOCAB_SIZE - len(SPECIAL_TOKENS)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.encode_special(name) == n_regular + i
    assert tok.bos_token_id == n_regular
    assert tok.id_to_token(tok.bos_token_id) == "<|bos|>"
    assert tok.id_to_token(ord("a")) == "a"  # ids 0..255 are the raw bytes
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_round_trip(tok):
    for text in [TRICKY_TEXT, "", " ", "\n", "a", "🙂", training_docs()[0][:2000]]:
        assert tok.decode(tok.encode(text)) == text


def test_compresses_training_like_text(tok):
    text = training_docs()[0]
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_special_text_is_ordinary(tok):
    # "<|bos|>" typed by a user must not become the real BOS token
    assert tok.bos_token_id not in tok.encode("<|bos|>")


def test_prepend_append(tok):
    body = tok.encode("hello world")
    bos, end = tok.bos_token_id, tok.encode_special("<|assistant_end|>")
    assert tok.encode("hello world", prepend="<|bos|>") == [bos] + body
    assert tok.encode("hello world", prepend=bos, append="<|assistant_end|>") == [bos] + body + [end]
    assert tok.decode(tok.encode("hi", prepend=bos)) == "<|bos|>hi"


def test_batch_equals_single(tok):
    texts = [TRICKY_TEXT, "hello world", "", training_docs()[1][:500]]
    batch = tok.encode(texts, prepend="<|bos|>", num_threads=2)
    assert batch == [tok.encode(t, prepend="<|bos|>") for t in texts]
    with pytest.raises(TypeError):
        tok.encode(("a", "b"))


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.shape == (VOCAB_SIZE,) and tb.dtype == torch.int32
    assert (tb[-len(SPECIAL_TOKENS):] == 0).all()
    assert (tb[:256] == 1).all()
    ids = tok.encode(TRICKY_TEXT, prepend="<|bos|>")
    assert int(tb[ids].sum()) == len(TRICKY_TEXT.encode("utf-8"))


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["token_bytes.pt", "tokenizer.json", "tokenizer.tiktoken"]
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.identity() == tok.identity() and len(tok.identity()) == 16
    assert loaded.encode(TRICKY_TEXT) == tok.encode(TRICKY_TEXT)
    assert loaded.special_tokens == tok.special_tokens
    assert (loaded.token_bytes() == tok.token_bytes()).all()


def test_get_tokenizer_uses_base_dir(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("MC_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts.tok_train") as err:
        get_tokenizer()
    assert str(tmp_path / "tokenizer") in str(err.value)
    tok.save(tmp_path / "tokenizer")
    assert get_tokenizer().identity() == tok.identity()


def test_identity_differs_between_tokenizers(tok):
    other = Tokenizer.train_from_iterator(iter(training_docs()), VOCAB_SIZE + 8)
    assert other.identity() != tok.identity()


def test_corrupt_ranks_file(tok, tmp_path):
    tok.save(tmp_path)
    path = tmp_path / "tokenizer.tiktoken"
    lines = path.read_text().splitlines()
    lines[300] = "not-base64!! xx"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="corrupt tokenizer file .*line 301"):
        Tokenizer.load(tmp_path)


def test_truncated_ranks_file(tok, tmp_path):
    tok.save(tmp_path)
    path = tmp_path / "tokenizer.tiktoken"
    path.write_text("\n".join(path.read_text().splitlines()[:-5]) + "\n")
    with pytest.raises(ValueError, match="inconsistent tokenizer"):
        Tokenizer.load(tmp_path)


def test_corrupt_meta_and_token_bytes(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="corrupt tokenizer file .*tokenizer.json"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version=99"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "token_bytes.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt tokenizer file .*token_bytes.pt"):
        Tokenizer.load(tmp_path)


def test_missing_file_names_it(tok, tmp_path):
    tok.save(tmp_path)
    os.remove(tmp_path / "token_bytes.pt")
    with pytest.raises(FileNotFoundError, match="token_bytes.pt.*scripts.tok_train"):
        Tokenizer.load(tmp_path)


def test_bad_vocab_size():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        Tokenizer.train_from_iterator(iter(["hello"]), 100)
    with pytest.raises(ValueError, match="more text"):
        Tokenizer.train_from_iterator(iter(["hello world"]), 512)
