"""CORE evaluation on a fixture bundle: prompts, scoring of each task type against a stub model whose answers
are known, centring, left-cropping, malformed bundles, fetching, and scripts.base_eval end to end."""

import json
import math
import zipfile
from types import SimpleNamespace

import pytest
import torch

from nanochat import core_eval
from nanochat.common import get_report_dir
from nanochat.core_eval import (CoreError, Task, build_prompts, centred, evaluate_core, evaluate_example,
                                fetch_bundle, fewshot_examples, load_bundle)
from scripts import base_eval, base_train

# the stub model favours "z" everywhere and a space after "q": the right answers below follow from that
MC = [{"query": "pick", "choices": ["zz", "ab"], "gold": 0},  # right
      {"query": "pick", "choices": ["ab", "zz"], "gold": 0},  # wrong
      {"query": "pick", "choices": ["zz", "zb"], "gold": 0},  # right
      {"query": "pick", "choices": ["cz", "zz"], "gold": 1}]  # right
SCHEMA = [{"context_options": ["pq", "pr"], "continuation": "zz", "gold": 0},  # right
          {"context_options": ["pr", "pq"], "continuation": "zz", "gold": 0},  # wrong
          {"context_options": ["aq", "ar", "as"], "continuation": "zz", "gold": 0}]  # right
LM = [{"context": "abq", "continuation": "zzz"},  # right
      {"context": "abq", "continuation": "zaz"},  # wrong
      {"context": "abc", "continuation": "zzz"},  # wrong: a space does not follow "c"
      {"context": "xxq  ", "continuation": "zz"}]  # right (trailing space trimmed)
RIGHT = {"mc": [True, False, True, True], "schema": [True, False, True], "lm": [True, False, False, True]}
CORE_YAML = """icl_tasks:
- label: mc
  dataset_uri: fixture/mc.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
- label: schema
  dataset_uri: fixture/schema.jsonl
  num_fewshot: [2]
  icl_task_type: schema
  continuation_delimiter: ' '
- label: lm
  dataset_uri: fixture/lm.jsonl
  num_fewshot: [3]
  icl_task_type: language_modeling
"""
BASELINES = "Eval Task,Random baseline\nmc,25.0\nschema,50.0\nlm,0.0\n"


def write_bundle(root):
    """The fixture bundle in root/eval_bundle; returns that directory."""
    d = root / "eval_bundle"
    (d / "eval_data" / "fixture").mkdir(parents=True)
    (d / "core.yaml").write_text(CORE_YAML)
    (d / "eval_meta_data.csv").write_text(BASELINES)
    for name, rows in (("mc", MC), ("schema", SCHEMA), ("lm", LM)):
        (d / "eval_data" / "fixture" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


class CharTokenizer:
    """One token per character (id = code + 1), BOS = 0."""
    bos_token_id = 0

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([prepend] if prepend is not None else []) + [ord(c) + 1 for c in text]


class StubModel:
    """Logits [B, T, 257]: "z" +5 everywhere, " " +10 after "q". Records every batch it is given."""

    def __init__(self, sequence_len=1024):
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.batches = []

    def __call__(self, idx):
        self.batches.append(idx.clone())
        logits = torch.zeros(*idx.shape, 257)
        logits[..., ord("z") + 1] = 5
        logits[..., ord(" ") + 1] += 10 * (idx == ord("q") + 1)
        return logits


@pytest.fixture
def tasks(tmp_path):
    return {t.label: t for t in load_bundle(write_bundle(tmp_path))}


def test_prompts_are_deterministic_few_shot_and_never_show_the_example(tasks):
    mc, schema, lm = tasks["mc"], tasks["schema"], tasks["lm"]
    assert (mc.num_fewshot, mc.delimiter, schema.num_fewshot, lm.num_fewshot) == (1, " ", 2, 3)
    prompts = build_prompts(mc, 0)
    shot = fewshot_examples(mc, 0)[0]
    assert prompts == [f"pick {shot['choices'][shot['gold']]}\n\npick zz", f"pick {shot['choices'][shot['gold']]}\n\npick ab"]
    assert build_prompts(mc, 0) == prompts and [build_prompts(t, 1) for t in tasks.values()] == \
        [build_prompts(t, 1) for t in tasks.values()]
    assert [p.count("\n\n") for p in build_prompts(schema, 2)] == [2, 2, 2]
    assert [p.endswith(f"{c} zz") for p, c in zip(build_prompts(schema, 2), ["aq", "ar", "as"])] == [True] * 3
    context, full = build_prompts(lm, 3)
    assert context.endswith("\n\nxxq") and full == context + " zz" and context.count("\n\n") == 3
    for task in tasks.values():  # num_fewshot = all the others (lm asks for 3 of 3 others): exactly the others
        for i, ex in enumerate(task.examples):
            shots = fewshot_examples(task, i)
            assert len(shots) == min(task.num_fewshot, len(task.examples) - 1) and all(s is not ex for s in shots)
    assert sorted(map(id, fewshot_examples(lm, 0))) == sorted(map(id, lm.examples[1:]))


def test_each_task_type_scores_the_stub_models_answers(tasks):
    for label, task in tasks.items():
        model = StubModel()
        got = [evaluate_example(model, CharTokenizer(), task, i, "cpu") for i in range(len(task.examples))]
        assert got == RIGHT[label], label
        n_rows = [len(b) for b in model.batches]  # one forward per example, every candidate in it
        want = [len(ex.get("choices", ex.get("context_options", [None]))) for ex in task.examples]
        assert n_rows == want, label


def test_centred_accuracy_and_core(tasks):
    assert centred(0.25, 25) == 0 and centred(1, 25) == 1 and math.isclose(centred(0.75, 25), 2 / 3)
    result = evaluate_core(StubModel(), CharTokenizer(), list(tasks.values()), "cpu")
    acc = {k: r["accuracy"] for k, r in result["tasks"].items()}
    assert acc == pytest.approx({"mc": 0.75, "schema": 2 / 3, "lm": 0.5})
    cent = {k: r["centred"] for k, r in result["tasks"].items()}
    assert cent == pytest.approx({"mc": 2 / 3, "schema": 1 / 3, "lm": 0.5})
    assert result["CORE"] == pytest.approx(0.5)
    capped = evaluate_core(StubModel(), CharTokenizer(), list(tasks.values()), "cpu", max_per_task=2)
    assert {r["examples"] for r in capped["tasks"].values()} == {2}


def test_long_examples_are_cropped_on_the_left_keeping_the_continuation():
    lm = Task("lm", "language_modeling", 0, " ", 0.0, [{"context": "a" * 50 + "q", "continuation": "zzz"},
                                                      {"context": "a" * 50 + "c", "continuation": "zzz"}])
    mc = Task("mc", "multiple_choice", 0, " ", 0.0, [{"query": "b" * 50, "choices": ["ab", "zz"], "gold": 1}])
    model = StubModel(sequence_len=8)
    assert [evaluate_example(model, CharTokenizer(), lm, i, "cpu") for i in range(2)] == [True, False]
    assert evaluate_example(model, CharTokenizer(), mc, 0, "cpu")
    assert [b.shape[1] for b in model.batches] == [8, 8, 8]
    assert model.batches[0][0].tolist() == [ord(c) + 1 for c in "aaaq zzz"]


@pytest.mark.parametrize("breaks, message", [
    (lambda d: (d / "core.yaml").unlink(), "has no core.yaml"),
    (lambda d: (d / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,25\n"), "no random baseline for task 'schema'"),
    (lambda d: (d / "core.yaml").write_text(CORE_YAML.replace("icl_task_type: schema", "icl_task_type: essay")),
     "task 'schema' has unknown icl_task_type 'essay'"),
    (lambda d: (d / "eval_data/fixture/lm.jsonl").unlink(), "lm.jsonl does not exist"),
    (lambda d: (d / "eval_data/fixture/mc.jsonl").write_text(json.dumps(MC[0]) + "\n{oops\n"), "mc.jsonl:2: not valid JSON"),
    (lambda d: (d / "eval_data/fixture/schema.jsonl").write_text('{"context_options": ["a"], "gold": 0}\n'),
     "schema.jsonl:1: a schema example needs continuation"),
    (lambda d: (d / "core.yaml").write_text("icl_tasks: []\n"), "icl_tasks must be a non-empty list"),
])
def test_malformed_bundles_are_one_line_errors(tmp_path, breaks, message):
    d = write_bundle(tmp_path)
    breaks(d)
    with pytest.raises(CoreError, match=message) as e:
        load_bundle(d)
    assert "\n" not in str(e.value)


def test_fetch_bundle_downloads_once_and_fails_cleanly(tmp_path, monkeypatch):
    src = write_bundle(tmp_path / "src")
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in src.rglob("*"):
            z.write(f, f.relative_to(src.parent))
    base = tmp_path / "base"
    with pytest.raises(CoreError, match="HF_HUB_OFFLINE is set"):  # conftest sets it
        fetch_bundle(base)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(core_eval, "FETCH_ATTEMPTS", 2)
    monkeypatch.setattr(core_eval.time, "sleep", lambda s: None)
    monkeypatch.setattr(core_eval, "BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")  # a closed port
    with pytest.raises(CoreError, match="failed after 2 attempts"):
        fetch_bundle(base)
    assert list(base.iterdir()) == []  # no temp files left
    monkeypatch.setattr(core_eval, "BUNDLE_URL", archive.as_uri())
    assert fetch_bundle(base) == base / "eval_bundle" and len(load_bundle(base / "eval_bundle")) == 3
    archive.unlink()  # cached: not downloaded again
    assert fetch_bundle(base) == base / "eval_bundle" and sorted(p.name for p in base.iterdir()) == ["eval_bundle"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_env):
    base_train.main([f"--data={tiny_env['data']}", "--depth=1", "--width=64", "--max_seq_len=64",
                     "--device_batch_size=2", "--total_batch_size=256", "--eval_tokens=256", "--sample_every=-1",
                     "--num_iterations=2", "--tag=core"])
    return ["--tag=core", "--eval_tokens=256", "--batch_size=2", "--max_tokens=4"]


def test_base_eval_skips_core_with_one_line_when_offline(tiny_checkpoint, capsys):
    base_eval.main(tiny_checkpoint)
    lines = [l for l in capsys.readouterr().out.splitlines() if "CORE" in l]
    assert lines == ["CORE: evaluation bundle not available offline (HF_HUB_OFFLINE is set): skipped"]
    assert "CORE: skipped" in (get_report_dir() / "section-base-eval.md").read_text()
    base_eval.main([*tiny_checkpoint, "--no-core"])
    assert "CORE" not in capsys.readouterr().out


def test_base_eval_scores_core_on_a_bundle(tiny_checkpoint, tmp_path, capsys):
    base_eval.main([*tiny_checkpoint, f"--core_bundle={write_bundle(tmp_path)}", "--core_max_per_task=0"])
    out = capsys.readouterr().out
    assert all(f"\n{label} " in out for label in ("mc", "schema", "lm"))
    items = json.loads((get_report_dir() / "section-base-eval.json").read_text())["items"]
    core = next(i["CORE"] for i in items if isinstance(i, dict) and "CORE" in i)
    per_task = next(i for i in items if isinstance(i, dict) and "mc" in i)
    assert math.isfinite(core) and -1 <= core <= 1 and set(per_task) == {"mc", "schema", "lm"}
    assert f"CORE: {core:.4f}" in out
    with pytest.raises(SystemExit, match="has no core.yaml"):
        base_eval.main([*tiny_checkpoint, f"--core_bundle={tmp_path}"])
