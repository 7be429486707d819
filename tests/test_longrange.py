"""Long-range generators (needle, recall, facts, copy), the MixedLoader and the --data_mix / --warmup_mix flags."""

import numpy as np
import pytest

from nanochat.dataset import prepare
from nanochat.longrange import DataMixError, LongRange, MixedLoader, _count, parse_mix
from scripts import base_train

K = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def gen(tiny_env):
    return LongRange(tiny_env["tokenizer"], block_size=K)


@pytest.fixture(scope="module")
def data_dir(tiny_env):
    return prepare(tiny_env["data"])


def rng(*seed):
    return np.random.default_rng(list(seed))


def decode(tiny_env, ids):
    return tiny_env["tokenizer"].decode([int(i) for i in ids])


def test_generators_are_deterministic_and_exact_length(gen):
    filler = rng(9).integers(300, 500, size=600)
    for source in ("needle", "recall", "facts", "copy"):
        for f in (None, filler):
            a, b = gen.generate(source, rng(1, 2), 400, f), gen.generate(source, rng(1, 2), 400, f)
            assert np.array_equal(a.tokens, b.tokens) and a.meta == b.meta and a.answers == b.answers
            assert a.tokens.shape == (400,) and a.tokens.dtype == np.int64
            assert a.tokens[0] == (gen.bos if f is None else filler[0])  # planting starts after the first token
            assert not np.array_equal(a.tokens, gen.generate(source, rng(1, 3), 400, f).tokens)
            assert a.mask.sum() == sum(e - s for s, e in a.answers)


def test_needle_answer_once_decoys_differ(gen, tiny_env):
    for i in range(40):
        ex = gen.needle(rng(i), 512, n_decoys=10)
        (s, e), q, m = ex.answers[0], ex.meta["query_start"], ex.meta
        assert e == 511 and decode(tiny_env, ex.tokens[s:e]).strip() == m["value"]  # the value, then "."
        assert _count(ex.tokens[:q], ex.tokens[s:e]) == 1  # present exactly once in the history ...
        p0, p1 = ex.evidence[0]
        assert _count(ex.tokens[p0:p1], ex.tokens[s:e]) == 1  # ... inside the needle
        assert m["value"] not in m["decoy_values"] and len(set(m["decoy_values"])) == len(m["decoy_values"])
        keys = [m["key"], *m["decoy_keys"]]
        assert len(set(keys)) == len(keys) and len(m["decoy_positions"]) >= 5
        text = decode(tiny_env, ex.tokens[:q])
        assert text.count(f" {m['key']} is") == 1
        for key, value in zip(m["decoy_keys"], m["decoy_values"]):
            assert f" {key} is {value}." in text


def test_needle_depth_and_offset_distributions(gen):
    metas = [gen.needle(rng(7, i), 600).meta for i in range(400)]
    depth = np.array([m["depth"] for m in metas])
    offset = np.array([m["offset"] for m in metas])
    assert np.histogram(depth, bins=4, range=(0, 1))[0].min() > 60  # ~100 per quarter
    assert np.bincount(offset, minlength=K).min() > 25  # ~50 per offset
    for depth, off in [(0.0, 3), (0.5, 0), (0.9, 7), (1.0, 5)]:
        m = gen.needle(rng(3), 600, depth=depth, offset=off).meta
        assert m["offset"] == off and m["needle_pos"] % K == off
        assert abs(m["depth"] - depth) < 2 * K / 600


def test_recall_and_facts(gen, tiny_env):
    for i in range(20):
        ex = gen.recall(rng(i), 600, n_pairs=12, n_queries=4, window=40)
        q = ex.meta["query_start"]
        assert ex.answers and all(s >= 600 - 40 for s, _ in ex.answers) and ex.answers[-1][1] == 599
        keys = ex.meta["keys"]
        assert len(set(keys)) == 12 and len(set(ex.meta["values"])) == 12
        for (s, e), (p0, p1) in zip(ex.answers, ex.evidence):
            assert _count(ex.tokens[:q], ex.tokens[s:e]) == 1 and _count(ex.tokens[p0:p1], ex.tokens[s:e]) == 1
    for i in range(20):
        ex = gen.facts(rng(i), 800, n_facts=6)
        assert ex.answers[-1][1] == 799 and len(ex.answers) >= 2
        for (s, e), (d0, d1) in zip(ex.answers, ex.evidence):
            assert d1 <= 200  # defined in the first quarter, mentioned in the second half
            assert s >= 400 and ex.mask[s:e].all()
            assert _count(ex.tokens[:s], ex.tokens[s:e]) == 1 and _count(ex.tokens[d0:d1], ex.tokens[s:e]) == 1
        assert ex.mask.sum() == sum(e - s for s, e in ex.answers)
    with pytest.raises(DataMixError, match="too short"):
        gen.needle(rng(0), 40)


def test_copy_repeats_an_earlier_span_at_the_end(gen):
    filler = rng(4).integers(300, 500, size=600)
    for i in range(20):
        ex = gen.copy(rng(i), 400, filler)
        (s, e), (p0, p1) = ex.answers[0], ex.evidence[0]
        L = p1 - p0
        assert e == 400 and s == 400 - L + 1 and 400 // 8 <= L <= 400 // 4 and 1 <= p0 and p1 <= 400 - L
        assert np.array_equal(ex.tokens[400 - L:], ex.tokens[p0:p1])  # the repeat
        assert np.array_equal(ex.tokens[:400 - L], filler[:400 - L])  # everything else is filler
        assert ex.mask.sum() == L - 1 and ex.mask[s:].all()
    with pytest.raises(DataMixError, match="too short"):
        gen.copy(rng(0), 12)


def test_synthetic_filler_is_text(gen, tiny_env):
    row = gen.filler(rng(5), 300)
    assert row.shape == (300,) and row[0] == gen.bos and (row[1:] != gen.bos).all()
    assert "." in decode(tiny_env, row)


def test_parse_mix():
    mix = parse_mix("books:0.6,needle:0.2,recall:0.1,facts:0.1", "books")
    assert mix == pytest.approx({"text": 0.6, "needle": 0.2, "recall": 0.1, "facts": 0.1})
    assert parse_mix("fineweb-edu:8:3,needle:1", "fineweb-edu:8") == {"text": 0.75, "needle": 0.25}
    for bad, match in [("books:1,nope:1", "unknown source 'nope'"), ("books:0,needle:1", "must be positive"),
                       ("books:-1", "must be positive"), ("books", "SOURCE:WEIGHT"), ("needle:x", "not a number"),
                       ("needle:1,needle:2", "twice"), ("wiki:1", "unknown source")]:
        with pytest.raises(DataMixError, match=match) as e:
            parse_mix(bad, "books")
        assert "--data_mix" in str(e.value)


def test_mixed_loader_resume_and_proportions(tiny_env, data_dir):
    mix = parse_mix(f"{tiny_env['data']}:0.4,needle:0.3,recall:0.2,facts:0.1", tiny_env["data"])
    make = lambda: MixedLoader(tiny_env["tokenizer"], 3, 255, data_dir, mix, seed=5, block_size=K)  # noqa: E731
    loader = make()
    for _ in range(3):
        x, y, answers = next(loader)
    assert x.shape == (3, 255) and (x[:, 1:] == y[:, :-1]).all() and answers.shape == (3, 255)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = make().load_state_dict(state)
    for (x1, y1, a1), (x2, y2, a2) in zip(expected, (next(resumed) for _ in range(3))):
        assert (x1 == x2).all() and (y1 == y2).all() and (a1 == a2).all()
    # answers mark the generators' answer targets (row token j + 1 is target j); natural rows have none
    for i in range(12):
        source, r = loader.source_of(loader.row)
        tokens, mask = loader.next_row()
        assert (mask.sum() > 0) == (source != "text")
        if source == "needle":  # one run of answer tokens: the value, just before the final "."
            at = np.flatnonzero(mask)
            assert at[-1] == 254 and (np.diff(at) == 1).all()
    counts = {}
    for i in range(2000):
        name = loader.source_of(i)[0]
        counts[name] = counts.get(name, 0) + 1
    for name, w in mix.items():
        assert abs(counts[name] / 2000 - w) < 0.04, (name, counts)
    with pytest.raises(DataMixError, match="without --data_mix"):
        make().load_state_dict({"split": "train"})
    with pytest.raises(DataMixError, match="max_seq_len"):
        MixedLoader(tiny_env["tokenizer"], 1, 64, data_dir, {"facts": 1.0}, block_size=K)


def test_warmup_mix_is_a_curriculum(tiny_env, data_dir):
    mix = parse_mix(f"{tiny_env['data']}:0.5,needle:0.5", tiny_env["data"])
    loader = MixedLoader(tiny_env["tokenizer"], 2, 255, data_dir, mix, seed=1, block_size=K, warmup_mix={"copy": 1.0},
                         warmup_rows=10)
    assert [loader.source_of(i)[0] for i in range(10)] == ["copy"] * 10
    later = {loader.source_of(i)[0] for i in range(10, 200)}
    assert later == {"text", "needle"}
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    with pytest.raises(DataMixError, match="warmup_mix"):
        MixedLoader(tiny_env["tokenizer"], 2, 255, data_dir, mix, seed=1, block_size=K).load_state_dict(state)


def test_base_train_data_mix_flag(tiny_env):
    common = [f"--data={tiny_env['data']}", "--depth=1", "--width=64", "--max_seq_len=256", "--device_batch_size=1",
              "--total_batch_size=256", "--eval_tokens=256", "--sample_every=-1", "--num_iterations=1"]
    with pytest.raises(SystemExit, match="--data_mix.*unknown source 'books'"):
        base_train.main(common + ["--data_mix=books:0.5,needle:0.5"])
    with pytest.raises(SystemExit, match="--data_mix.*must be positive"):
        base_train.main(common + ["--data_mix=needle:0"])
    with pytest.raises(SystemExit, match="--max_seq_len=64 is too short"):
        base_train.main(common[:3] + ["--max_seq_len=64"] + common[4:] + ["--data_mix=facts:1"])
    with pytest.raises(SystemExit, match="--warmup_mix.*unknown source 'nope'"):
        base_train.main(common + ["--data_mix=needle:1", "--warmup_mix=nope:1", "--warmup_mix_steps=2"])
    with pytest.raises(SystemExit, match="together"):
        base_train.main(common + ["--data_mix=needle:1", "--warmup_mix=copy:1"])
    with pytest.raises(SystemExit, match="needs a --data_mix"):
        base_train.main(common + ["--warmup_mix=copy:1", "--warmup_mix_steps=2"])
    with pytest.raises(SystemExit, match="--pack_rows"):
        base_train.main(common + ["--pack_rows=0.5"])  # packing needs long-range rows
    with pytest.raises(SystemExit, match="--pack_rows"):
        base_train.main(common + ["--data_mix=needle:1", "--pack_rows=1.5"])


def test_packed_rows_hold_several_short_examples(gen, tiny_env, data_dir):
    filler = rng(9).integers(300, 500, size=1100)
    firsts = []
    for i in range(30):
        for source in ("needle", "recall", "copy"):
            ex = gen.packed(source, rng(i), 1025, filler if i % 2 else None)
            pieces = ex.meta["pieces"]
            starts = np.concatenate([[0], np.cumsum(pieces)[:-1]])
            assert sum(pieces) == 1025 and ex.tokens.shape == (1025,) and 1 <= len(pieces) <= 4
            assert (ex.tokens[starts] == gen.bos).all() and min(pieces) >= gen.min_row_len(source)
            assert ex.mask.sum() == sum(e - s for s, e in ex.answers)
            for (s, e), (p0, p1) in zip(ex.answers, ex.evidence):  # each answer is in its own piece's history
                assert p1 <= s and starts[starts <= s].max() <= p0
                assert _count(ex.tokens[p0:p1], ex.tokens[s:e]) == 1
            firsts.append(pieces[0])
    assert np.median(firsts) < 400 and len(set(firsts)) > 20  # the first piece is often a short history
    mix = parse_mix("needle:1", tiny_env["data"])
    packing = MixedLoader(tiny_env["tokenizer"], 2, 255, data_dir, mix, seed=3, block_size=K, pack=0.5)
    runs = [int((np.diff(packing.next_row()[1].astype(int)) == 1).sum()) for _ in range(40)]  # answers per row
    assert sum(r > 1 for r in runs) >= 10 and sum(r == 1 for r in runs) >= 10
    state = packing.state_dict()
    with pytest.raises(DataMixError, match="pack_rows"):
        MixedLoader(tiny_env["tokenizer"], 2, 255, data_dir, mix, seed=3, block_size=K).load_state_dict(state)
    with pytest.raises(DataMixError, match="pack_rows"):
        MixedLoader(tiny_env["tokenizer"], 2, 255, data_dir, mix, pack=2.0)


def test_memory_rows_end_with_the_answer_to_a_fact_told_earlier(gen, tiny_env, data_dir):
    tok = tiny_env["tokenizer"]
    end = tok.encode_special("<|assistant_end|>")
    distances = []
    for i in range(12):
        ex = gen.memory(rng(i), 700)
        (s, e), m = ex.answers[0], ex.meta
        assert ex.tokens.shape == (700,) and e == 700 and ex.tokens[-1] == end and ex.mask.sum() == e - s
        assert ex.tokens[m["conversation_start"]] == gen.bos
        answer = decode(tiny_env, ex.tokens[s:e - 1])
        assert m["answer"] in answer and answer.endswith(".")
        history = decode(tiny_env, ex.tokens[m["conversation_start"]:s])
        assert history.count(m["answer"]) == 1 and m["question"] in history  # told once, then asked
        distances.append(len(history) - history.index(m["answer"]))
    assert min(distances) < 800 < max(distances)  # characters from the fact to the answer: near and far
    with pytest.raises(DataMixError, match="too short for a memory"):
        gen.memory(rng(0), 60)
    loader = MixedLoader(tok, 2, 511, data_dir, parse_mix("memory:1", tiny_env["data"]), block_size=K)
    x, y, answers = next(loader)
    assert x.shape == (2, 511) and (y[answers] != end).sum() > 0 and (y[:, -1] == end).all()
    assert loader.gen.paragraphs  # passages of the corpus, not synthetic ones
