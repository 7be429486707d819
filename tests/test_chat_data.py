"""Chat data: longdoc_qa guarantees, identity chats, .jsonl files, the source mix, offline hub skips (offline, CPU)."""

import json
import time

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import chat_data
from nanochat.chat_data import allocate, identity_conversation, load_conversations, load_hub, load_jsonl, parse_spec
from nanochat.longdoc_qa import LongDocQAConfig, book_paragraphs, longdoc_qa, longdoc_qa_eval
from nanochat.memory_chat import memory_chats
from nanochat.tokenizer import validate_conversation


def document_of(example) -> str:
    """The document part of a longdoc_qa user turn (everything before the question)."""
    user = example["messages"][0]["content"]
    return user[:user.rindex("\n\n")]


# -----------------------------------------------------------------------------
# longdoc_qa

def test_longdoc_deterministic_and_seeded():
    cfg = LongDocQAConfig(doc_words=500)
    assert longdoc_qa(6, cfg) == longdoc_qa(6, cfg)
    assert longdoc_qa(3, cfg) == longdoc_qa(6, cfg)[:3]  # example i does not depend on n
    other_seed = longdoc_qa(6, LongDocQAConfig(doc_words=500, seed=1))
    held_out = longdoc_qa_eval(6, cfg)
    for a, b, c in zip(longdoc_qa(6, cfg), other_seed, held_out, strict=True):
        assert a["messages"] != b["messages"] and a["messages"] != c["messages"]


def test_longdoc_answer_once_and_located():
    for example in longdoc_qa(200, LongDocQAConfig(doc_words=800)):
        validate_conversation(example)
        meta, (user, assistant) = example["meta"], example["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        answer, document = meta["answer"], document_of(example)
        assert user["content"].count(answer) == 1 and document.count(answer) == 1
        assert document[meta["fact_offset"]:].startswith(meta["fact"]) and answer in meta["fact"]
        assert answer in assistant["content"]
        assert meta["depth"] == pytest.approx(meta["fact_offset"] / len(document))
        assert user["content"][len(document):].startswith("\n\n")  # the question follows the document


def test_longdoc_depths_spread():
    depths = sorted(e["meta"]["depth"] for e in longdoc_qa(300, LongDocQAConfig(doc_words=1000)))
    assert depths[0] < 0.05 and depths[-1] > 0.95
    bins = [sum(lo <= d < lo + 0.2 for d in depths) for lo in (0.0, 0.2, 0.4, 0.6, 0.8)]
    assert min(bins) > 30, bins  # roughly uniform: 60 expected per bin


@pytest.mark.parametrize("doc_words", [300, 3000])
def test_longdoc_length(doc_words):
    for example in longdoc_qa(20, LongDocQAConfig(doc_words=doc_words)):
        assert abs(example["meta"]["doc_words"] - doc_words) <= 0.05 * doc_words + 5
        assert abs(len(document_of(example).split()) - doc_words) <= 0.05 * doc_words + 5


def test_longdoc_distractors():
    cfg = LongDocQAConfig(doc_words=1500, n_facts=5, n_distractors=10)
    same_attribute = 0
    for example in longdoc_qa(50, cfg):
        meta, document = example["meta"], document_of(example)
        values, facts = meta["distractor_values"], meta["distractor_facts"]
        assert len(values) == len(facts) == 10 and meta["answer"] not in values and len(set(values)) == 10
        assert all(fact in document and value in fact for fact, value in zip(facts, values, strict=True))
        asked = meta["fact"].replace(meta["answer"], "").split()
        for fact, value in zip(facts, values, strict=True):
            frame = fact.replace(value, "").split()  # a near miss: the asked sentence with one entity word changed
            same_attribute += len(frame) == len(asked) and sum(a != b for a, b in zip(frame, asked)) == 1
    assert same_attribute > 0.6 * 50 * 10
    with pytest.raises(ValueError, match="n_distractors"):
        LongDocQAConfig(n_distractors=100)


def test_longdoc_filler_used_and_answer_kept_unique():
    # every paragraph names a 4-digit number, so secret codes often collide with the filler and must be redrawn
    filler = [f"The porter said that room {n} was empty again today, as it had been all week." for n in range(1000, 10000)]
    examples = longdoc_qa(100, LongDocQAConfig(doc_words=3000), filler=filler)
    for example in examples:
        document = document_of(example)
        assert "the porter said that room" in document.lower()
        assert document.count(example["meta"]["answer"]) == 1
    assert len({e["meta"]["answer"] for e in examples}) > 90


def test_book_paragraphs(tmp_path):
    docs = ["Chapter 1\n\nIt is a truth universally acknowledged, that a single man\nin possession of a good fortune.\n\nShort.",
            "Another   book with a first paragraph of enough words to be kept here.\n\n\n"]
    pq.write_table(pa.table({"text": docs}), tmp_path / "shard_00000.parquet")
    assert book_paragraphs(tmp_path, "train") == [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune.",
        "Another book with a first paragraph of enough words to be kept here."]


# -----------------------------------------------------------------------------
# identity

def test_identity():
    conversations = [identity_conversation(random.Random(i)) for i in range(100)]
    assert conversations[:5] == [identity_conversation(random.Random(i)) for i in range(5)]
    for c in conversations:
        validate_conversation(c)
    assert len({json.dumps(c) for c in conversations}) > 50
    text = " ".join(m["content"] for c in conversations for m in c["messages"])
    for phrase in ("MegaContext-nano", "trained from scratch", "gists", "open-source"):
        assert phrase in text


# -----------------------------------------------------------------------------
# memory: a fact told early, asked for many turns later

def test_memory_conversations():
    paragraphs = [f"Paragraph {i} tells of the {w} road and the quiet village by the river." for i, w in enumerate("old new long".split())]
    chats = memory_chats(60, words=120, filler=paragraphs)
    assert chats[:3] == memory_chats(3, words=120, filler=paragraphs) != memory_chats(3, words=120, filler=paragraphs, seed=1)
    assert memory_chats(3, 120, paragraphs, split="val") != chats[:3]
    asked = set()
    for c in chats:
        validate_conversation(c)
        messages, meta = c["messages"], c["meta"]
        *history, question, answer = messages
        value = meta["answer"]
        assert question["content"] == meta["question"] and value in answer["content"]
        assert sum(m["content"].count(value) for m in history) == 1  # told once, in a user turn, never repeated
        told = next(i for i, m in enumerate(history) if value in m["content"])
        assert history[told]["role"] == "user" and told < 6  # among the first turns
        assert 0 <= meta["filler_words"] <= 120 + 20 and len(set(meta["values"])) == 3
        asked.add(question["content"])
    assert len(asked) >= 5  # the fact kinds vary
    distances = [c["meta"]["filler_words"] for c in chats]
    assert min(distances) < 30 and max(distances) > 90  # from adjacent to far
    assert {c["meta"]["source"] for c in load_conversations("memory", 4, seed=0)} == {"memory"}


# -----------------------------------------------------------------------------
# .jsonl files

def test_load_jsonl(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "id": 7},
            [{"role": "system", "content": "be nice"}, {"role": "user", "content": "yo"}]]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert load_jsonl(path) == [{"messages": rows[0]["messages"]}, {"messages": rows[1]}]


@pytest.mark.parametrize("bad_line, error", [
    ("{not json", r"bad\.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', r"bad\.jsonl:2: message 1: expected role 'assistant'"),
    ('{"text": "plain"}', r"bad\.jsonl:2: a conversation is"),
])
def test_load_jsonl_malformed(tmp_path, bad_line, error):
    path = tmp_path / "bad.jsonl"
    path.write_text('[{"role": "user", "content": "fine"}]\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=error):
        load_jsonl(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")


# -----------------------------------------------------------------------------
# the mix

def test_parse_spec():
    assert parse_spec("identity, longdoc_qa:2.5,,data/x.jsonl") == {"identity": 1.0, "longdoc_qa": 2.5, "data/x.jsonl": 1.0}
    with pytest.raises(ValueError, match="unknown chat data source 'smoltak'"):
        parse_spec("identity,smoltak")
    with pytest.raises(ValueError, match="weight after ':' must be > 0"):
        parse_spec("identity:0")
    with pytest.raises(ValueError, match="names no source"):
        parse_spec(" , ")


def test_allocate():
    assert allocate(10, {"a": 1, "b": 1, "c": 1}, {"a": None, "b": None, "c": None}) in ({"a": 4, "b": 3, "c": 3}, {"a": 3, "b": 4, "c": 3}, {"a": 3, "b": 3, "c": 4})
    assert allocate(100, {"a": 3, "b": 1}, {"a": None, "b": None}) == {"a": 75, "b": 25}
    assert allocate(100, {"a": 1, "b": 1, "c": 2}, {"a": 5, "b": None, "c": None}) == {"a": 5, "b": 32, "c": 63}
    assert allocate(100, {"a": 1, "b": 1}, {"a": 5, "b": 7}) == {"a": 5, "b": 7}


def test_load_conversations(tmp_path, capsys):
    cfg = LongDocQAConfig(doc_words=200)
    mix = load_conversations("identity,longdoc_qa:3", 40, seed=0, longdoc=cfg)
    assert mix == load_conversations("identity,longdoc_qa:3", 40, seed=0, longdoc=cfg)
    assert mix != load_conversations("identity,longdoc_qa:3", 40, seed=1, longdoc=cfg)
    sources = [c["meta"]["source"] for c in mix]
    assert sources.count("identity") == 10 and sources.count("longdoc_qa") == 30
    assert sources != sorted(sources)  # shuffled
    assert "identity: 10, longdoc_qa: 30" in capsys.readouterr().out
    val = load_conversations("longdoc_qa", 5, seed=0, split="val", longdoc=cfg)
    assert [c["messages"] for c in val] != [c["messages"] for c in load_conversations("longdoc_qa", 5, seed=0, longdoc=cfg)]

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]) + "\n" for i in range(20)))
    mix = load_conversations(f"identity,{path}", 30, seed=0)
    mine = [c for c in mix if "meta" not in c]
    assert len(mix) == 30 and len(mine) == 15
    val = load_conversations(f"identity,{path}", 30, seed=0, split="val")
    assert [c["messages"][0]["content"] for c in val if "meta" not in c] == ["q19"]  # 5% of 20 lines held out
    assert "q19" not in {c["messages"][0]["content"] for c in mine}


def test_hub_skipped_offline(monkeypatch, capsys):
    # a dataset that is surely not in the local cache, so the real offline load path fails
    monkeypatch.setitem(chat_data.HUB_SOURCES, "smoltalk", ("megacontext-tests/no-such-dataset", None, lambda row: row))
    t0 = time.perf_counter()
    assert load_hub("smoltalk", 10, seed=0) == []
    mix = load_conversations("smoltalk,identity", 8, seed=0)
    assert time.perf_counter() - t0 < 60
    out = capsys.readouterr().out
    assert "chat data: smoltalk unavailable offline (" in out and "), skipped" in out
    assert len(mix) == 8 and all(c["meta"]["source"] == "identity" for c in mix)
    with pytest.raises(ValueError, match="no source is available"):
        load_conversations("smoltalk", 8, seed=0)


def test_hub_probe_without_offline_flag(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(chat_data, "HUB_PROBE_URL", "http://127.0.0.1:9")  # the discard port: refused at once
    t0 = time.perf_counter()
    assert load_hub("gsm8k", 10, seed=0) == []
    assert time.perf_counter() - t0 < 10
    assert "chat data: gsm8k unavailable offline (cannot reach http://127.0.0.1:9" in capsys.readouterr().out
