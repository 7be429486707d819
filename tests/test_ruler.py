"""RULER-style tasks (nanochat/ruler.py): exact rows, answers at the row end, evidence that holds them."""

import numpy as np
import pytest

from nanochat.longrange import LongRange
from nanochat.ruler import TASKS, RulerTasks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def ruler(tiny_env):
    return RulerTasks(tiny_env["tokenizer"], LongRange(tiny_env["tokenizer"], block_size=8))


def decode(tiny_env, ids):
    return tiny_env["tokenizer"].decode([int(i) for i in ids])


@pytest.mark.parametrize("task", TASKS)
def test_rows_end_in_their_answers_and_the_evidence_holds_them(task, ruler, tiny_env):
    for n in (300, 700):
        filler = LongRange(tiny_env["tokenizer"], 8).filler(np.random.default_rng(5), n + 10)
        a = ruler.example(task, np.random.default_rng([n, 1]), n, filler)
        b = ruler.example(task, np.random.default_rng([n, 1]), n, filler)
        assert np.array_equal(a.tokens, b.tokens) and a.answers == b.answers  # a pure function of the rng
        assert a.tokens.shape == (n,) and a.tokens[0] == tiny_env["tokenizer"].bos_token_id
        assert a.answers[-1][1] == n and a.mask.sum() == sum(e - s for s, e in a.answers)
        assert all(s2 >= e1 for (_, e1), (s2, _) in zip(a.answers, a.answers[1:]))  # in order, not overlapping
        spans = sorted(a.evidence)
        assert all(s2 >= e1 for (_, e1), (s2, _) in zip(spans, spans[1:])) and spans[-1][1] <= a.answers[0][0]
        for (s, e), (es, ee) in zip(a.answers, a.evidence):  # each answer is written in its needle
            answer, needle = decode(tiny_env, a.tokens[s:e]).strip(), decode(tiny_env, a.tokens[es:ee])
            assert answer and answer in needle, (task, answer, needle)
        expected = {"niah_multivalue": 4, "niah_multiquery": 4, "vt": 5}.get(task, 1)
        assert len(a.answers) == len(a.evidence) == expected
        if task == "niah_multivalue":  # one key, four values
            assert len({decode(tiny_env, a.tokens[s:e]).split(" for ")[1].split(" is")[0] for s, e in a.evidence}) == 1
        if task == "niah_multikey_haystack":  # the history is mostly needles
            assert decode(tiny_env, a.tokens[:a.answers[0][0]]).count("special magic numbers for") >= (n - 64) // 40


def test_too_short_rows_and_unknown_tasks_fail_clearly(ruler):
    with pytest.raises(ValueError, match="too short"):
        ruler.example("niah_multiquery", np.random.default_rng(0), 60)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.example("niah_triple", np.random.default_rng(0), 300)
