"""scripts/mc_eval.py end to end on tiny in-test checkpoints: every arm, its files, the oracle's map, bad inputs."""

import json

import numpy as np
import pytest
import torch

from mc.arms import ArmEvaluator, shuffle_gists
from mc.build import load_controller
from mc.working_context import (GIST, GROUP, RAW, entry_counts, entry_token_ids, materialize, most_compressed_map,
                                tail_mask)
from mc.tree import build_tree
from nanochat.checkpoint import build_model, checkpoint_dir
from nanochat.common import get_report_dir
from nanochat.longrange import LongRange
from nanochat.ruler import TASKS as RULER_TASKS
from nanochat.tasks_file import TasksFileError, load_tasks_file
from scripts import base_train, mc_eval

K, W, R = 8, 64, 16
MC = ["--depth=1", "--width=64", "--max_seq_len=128", "--device_batch_size=2", "--total_batch_size=256",
      "--eval_tokens=256", "--sample_every=-1", "--num_iterations=1", "--mc", f"--mc_block_size={K}",
      f"--mc_wc_budget={W}", f"--mc_recent={R}", "--mc_horizon=8", "--mc_lens_width=64", "--mc_gist_layers=1",
      "--mc_lens_layers=1"]
EVAL = ["--mc_tag=mceval_mc", "--lengths=1,4", "--needle_examples=3", "--batch_size=3", "--recall_pairs=1,3",
        "--recall_examples=2", "--recall_length=2", "--loss_examples=2", "--depth_bins=2", "--full_max_len=128",
        "--ruler_examples=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def checkpoints(tiny_env):
    data = tiny_env["data"]
    mix = [f"--data={data}", f"--data_mix={data}:0.4,needle:0.3,recall:0.3"]
    base_train.main(mix + MC + ["--tag=mceval_mc"])
    base_train.main(mix + MC + ["--tag=mceval_mean", "--mc_gist_type=mean"])
    base_train.main(mix + MC[:8] + ["--tag=mceval_plain"])
    return tiny_env


@pytest.fixture(scope="module")
def results(checkpoints, tmp_path_factory):
    tasks = tmp_path_factory.mktemp("tasks") / "qa.jsonl"
    tasks.write_text("\n".join(json.dumps(item) for item in [
        {"context": "The door code is 4417.", "question": "What is the door code?", "answer": "4417"},
        {"context": "Anna lives in Oslo. " * 5, "question": "Where does Anna live?", "answer": "Oslo"}]) + "\n")
    return mc_eval.main(EVAL + ["--mean_gist_tag=mceval_mean", "--plain_tag=mceval_plain", f"--tasks_file={tasks}"])


def test_every_arm_runs_and_files_are_written(results):
    arms = ["truncation", "full", "mc", "no_read_on", "gists_only", "random", "similarity", "oracle", "shuffled", "mean_gist",
            "plain_truncation", "plain_full"]
    assert results["arms"] == arms and results["lengths"] == [64, 256]
    needle = results["needle"]
    assert set(needle["accuracy"]) == set(arms) - {"full", "plain_full"}  # 256 > --full_max_len
    assert set(needle["accuracy"]["mc"]) == {256} and needle["examples"] == {256: 3}  # 64: too short
    assert all(0 <= a <= 1 for a in needle["accuracy"]["oracle"].values())
    assert set(results["recall"]["accuracy"]["mc"]) == {1, 3} and results["recall"]["length"] == 128
    ruler = results["ruler"]["accuracy"]
    assert set(ruler) == set(RULER_TASKS) and all(256 in ruler[t]["oracle"] and 256 in ruler[t]["mc"] for t in ruler)
    assert all(0 <= v <= 1 for t in ruler for per in ruler[t].values() for v in per.values())
    assert set(ruler["vt"]["plain_full"]) <= {64} and any(s.startswith("ruler niah_multiquery L=64") for s in results["skipped"])
    loss = results["loss"]
    assert set(loss["natural"]["truncation"]) == {64, 256} and set(loss["natural"]["full"]) == {64}
    assert "oracle" not in loss["natural"]
    assert set(loss["facts_far"]["mc"]) == {256} and np.isfinite(loss["facts_far"]["oracle"][256])
    assert set(loss["substitution"]["natural"]) == {64} and "delta" in loss["substitution"]["natural"][64]
    assert set(results["tasks_file"]["accuracy"]) == set(arms) - {"oracle"}
    assert any("too short" in s for s in results["skipped"])
    out = get_report_dir()
    saved = json.loads((out / "mc_eval.json").read_text())
    assert saved["needle"]["accuracy"]["mc"].keys() == {"256"} and saved["W"] == W
    for name in ["mc_eval_needle_length.png", "mc_eval_needle_offset.png", "mc_eval_recall.png",
                 "mc_eval_loss_natural.png", "mc_eval_loss_facts_far.png",
                 *[f"mc_eval_needle_{a}.png" for a in arms if "full" not in a]]:
        assert (out / name).stat().st_size > 1000, name
    section = (out / "section-mc-eval.md").read_text()
    assert "Needle accuracy" in section and "| mean_gist |" in section and "Substitutability" in section


def test_paired_differences_match_the_arm_means(results):
    loss = results["loss"]
    paired = loss["paired"]
    assert set(paired) == {"mc - plain_truncation", "mc - truncation"}
    for pair, per in paired.items():
        a, b = pair.split(" - ")
        assert set(per) == set(loss["natural"]["mc"]) == {64, 256}
        for L, d in per.items():  # every text scores E tokens, so the mean of per-text means is the arms' mean NLL
            assert d["texts"] == 2 and d["mean"] == pytest.approx(loss["natural"][a][L] - loss["natural"][b][L], abs=1e-5)
            assert np.isfinite(d["se"]) and d["se"] >= 0
    assert "Paired per text" in (get_report_dir() / "section-mc-eval.md").read_text()
    d = mc_eval.paired_difference(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 1.0]))
    assert d["mean"] == pytest.approx(5 / 3) and d["texts"] == 3
    assert d["se"] == pytest.approx(np.std([1, 2, 2], ddof=1) / np.sqrt(3))


def test_oracle_expands_the_answer_block(checkpoints):
    model, states, meta = build_model(checkpoint_dir("base", "mceval_mc"), None, "cpu")
    meta = {**meta, "mc_config": {**meta["mc_config"], "partial_gists": False}}  # the per-level cover written out below
    controller = load_controller(model, states, meta)
    ev = ArmEvaluator(controller)
    gen = LongRange(checkpoints["tokenizer"], K)
    L = 256
    exs = [gen.needle(np.random.default_rng(i), L + 1, depth=d, offset=3) for i, d in enumerate([0.05, 0.4])]
    x = torch.from_numpy(np.stack([e.tokens[:-1] for e in exs]))
    evidence = torch.zeros(2, L // K, dtype=torch.bool)
    for b, e in enumerate(exs):
        s, t = e.evidence[0]
        evidence[b, s // K:(t - 1) // K + 1] = True
    maps = ev.oracle_maps(x, evidence)
    base = most_compressed_map(L // K, controller.cfg)
    expected = base.expand(2, -1).clone()
    opened = evidence.view(2, -1, K).any(-1).repeat_interleave(K, 1) & (expected == GROUP)  # LOD2 groups holding the needle
    expected[opened] = GIST
    expected[evidence] = RAW  # the needle's blocks are shown as tokens
    assert torch.equal(maps, expected) and (maps[evidence] == RAW).all() and evidence.sum(1).min() >= 1
    assert ((maps == RAW) & ~evidence).sum() == 2 * (R // K)  # nothing else raw but the tail
    # evidence in four blocks of three groups: each shown raw for K entries beside its group's gist, then the
    # group of the block holding the most evidence opened (block 2 then in place too); the others stay closed
    weights = torch.zeros(1, L // K)
    weights[0, [1, 9, 17, 2]] = torch.tensor([5.0, 4.0, 3.0, 1.0])
    maps = ev.oracle_maps(x[:1], weights)[0]
    assert (maps[[1, 2, 9, 17]] == RAW).all() and (maps[[0, 3, 4, 5, 6, 7]] == GIST).all()
    assert (maps[8:16] == GROUP).sum() == 7 and (maps[16:24] == GROUP).sum() == 7 and entry_counts(maps[None], K)[0] == 62 <= W


def test_arms_score_their_tail_like_a_full_forward(checkpoints):
    """Arms ask the GPT for the logits of the scored tail only (`logits_to_keep`): the same as the tail of a full
    forward, also for working contexts whose rows hold different numbers of entries (random and most compressed maps)."""
    model, states, meta = build_model(checkpoint_dir("base", "mceval_mc"), None, "cpu")
    controller = load_controller(model, states, meta)
    ev = ArmEvaluator(controller)
    x = torch.randint(0, 500, (3, 256))
    levels = controller.tree(x)
    maps = controller.focus(levels, policy="random", generator=torch.Generator().manual_seed(0))
    maps[0] = controller.focus(levels, policy="gists_only")[0]
    wc = materialize(maps, levels, x, controller.cfg, x[:, -1])
    assert wc.n_entries.unique().numel() > 1  # rows of different lengths
    with torch.no_grad():
        full = model(inputs_embeds=wc.embeds, token_ids=entry_token_ids(wc.pos, wc.lod, x, wc.valid, wc.sample),
                     rope=controller.rope(wc))
        tail = ev._wc_tail(controller, wc, x)
        assert torch.allclose(tail, full[tail_mask(wc.valid, ev.tail)].view(3, ev.tail, -1), atol=1e-4)
        assert torch.allclose(ev._gpt_tail(model, x), model(x)[:, -ev.tail:], atol=1e-4)


def test_all_raw_substitution_is_the_full_arm_within_the_trained_length(checkpoints):
    """mc_eval reuses the full arm as the substitution task's all-raw map up to the GPT's trained length (beyond it
    working contexts are laid out in a compressed rotary frame, so there the two differ and both run)."""
    model, states, meta = build_model(checkpoint_dir("base", "mceval_mc"), None, "cpu")
    ev = ArmEvaluator(load_controller(model, states, meta), full_max_len=256)
    x = torch.randint(0, 500, (2, 257))
    for L, same in ((128, True), (256, False)):
        raw = {"raw": torch.full((1, L // K), RAW, dtype=torch.int8)}
        nll = ev.run_maps(x[:, :L], x[:, 1:L + 1], raw)["raw"][0]
        full = ev.run(x[:, :L], x[:, 1:L + 1], ["full"])["full"][0]
        assert torch.equal(nll, full) == same  # reused: the very numbers; beyond: another computation


def test_shuffled_gists_permute_each_level(checkpoints):
    model, states, meta = build_model(checkpoint_dir("base", "mceval_mc"), None, "cpu")
    controller = load_controller(model, states, meta)
    x = torch.randint(0, 500, (2, 2048))
    levels = build_tree(model.transformer.wte(x), controller.gistnet, controller.cfg)
    shuffled, order = shuffle_gists(levels, torch.Generator().manual_seed(0))
    assert [lvl.shape for lvl in shuffled] == [lvl.shape for lvl in levels] and shuffled[0] is levels[0]
    torch.testing.assert_close(shuffled[1], levels[1].gather(1, order[..., None].expand_as(levels[1])))
    assert levels[1].size(1) > 1 and levels[2].size(1) > 1
    for lvl, sh in zip(levels[1:], shuffled[1:]):
        assert lvl.size(1) == 1 or not torch.equal(lvl, sh)  # the top level may be one (partial) node
        for b in range(2):  # a permutation of the nodes of each row
            assert torch.equal(sh[b].sort(0).values, lvl[b].sort(0).values)


def test_synthetic_filler_and_chosen_arms(checkpoints):
    res = mc_eval.main(EVAL[:1] + ["--tasks=needle,recall", "--filler=synthetic", "--arms=mc,oracle,truncation",
                                   "--lengths=2", "--needle_examples=2", "--batch_size=2", "--recall_pairs=2",
                                   "--recall_examples=2", "--needle_decoys=0"])
    assert res["arms"] == ["mc", "oracle", "truncation"] and set(res["needle"]["accuracy"]) == {"mc", "oracle", "truncation"}
    assert res["needle"]["examples"] == {128: 2} and "loss" not in res
    assert any("mean_gist: skipped" in s for s in res["skipped"])


def test_far_lengths_run_the_needle_task_alone_in_smaller_batches(checkpoints, monkeypatch):
    """--far_lengths adds needle lengths (far beyond the trained length) with --far_examples needles each, whose
    batches hold at most --batch_tokens history tokens; the other tasks keep --lengths."""
    rows = []
    run = mc_eval.Runner.run
    monkeypatch.setattr(mc_eval.Runner, "run", lambda self, r, *a, **k: rows.append(r.shape) or run(self, r, *a, **k))
    res = mc_eval.main(EVAL[:1] + ["--tasks=needle,loss", "--filler=synthetic", "--arms=mc,oracle,truncation",
                                   "--lengths=2", "--needle_examples=2", "--batch_size=2", "--loss_examples=2",
                                   "--far_lengths=16,2", "--far_examples=3", "--batch_tokens=1024"])
    assert res["needle"]["examples"] == {128: 2, 1024: 3} and set(res["loss"]["natural"]["mc"]) == {128}
    assert res["needle"]["accuracy"]["oracle"][1024] >= 0 and res["needle"]["hit_rate"]["oracle"][1024] == 1.0
    assert sorted(shape for shape in rows if shape[1] == 1025) == [(1, 1025)] * 3  # 1024 tokens a batch: one row


def test_tasks_file_errors(tmp_path, checkpoints):
    cases = {"missing.jsonl": None, "empty.jsonl": "\n\n",
             "badjson.jsonl": '{"context": "a", "question": "b", "answer": "c"}\n{oops\n',
             "nokey.jsonl": '{"context": "a", "question": "b", "answer": "c"}\n{"context": "a", "question": "b"}\n',
             "notstr.jsonl": '{"context": "a", "question": "b", "answer": 42}\n'}
    expect = {"missing.jsonl": "does not exist", "empty.jsonl": "is empty", "badjson.jsonl": "line 2: not valid JSON",
              "nokey.jsonl": r"line 2: missing key\(s\) \['answer'\]", "notstr.jsonl": "line 1: 'answer' must be a string, got int"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(TasksFileError, match=expect[name]):
            load_tasks_file(tmp_path / name)
    with pytest.raises(SystemExit, match="error: --tasks_file .*line 2: missing key"):
        mc_eval.main(EVAL + ["--tasks=needle", f"--tasks_file={tmp_path / 'nokey.jsonl'}"])


def test_bad_flags(checkpoints, capsys):
    with pytest.raises(SystemExit) as e:
        mc_eval.main(["--help"])
    assert e.value.code == 0 and "--needle_examples" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown arm"):
        mc_eval.main(EVAL + ["--arms=mc,magic"])
    with pytest.raises(SystemExit, match="trained without --mc"):
        mc_eval.main(EVAL[1:] + ["--mc_tag=mceval_plain"])
    with pytest.raises(SystemExit, match="does not exist"):
        mc_eval.main(EVAL[1:] + ["--mc_tag=nope"])
    with pytest.raises(SystemExit, match="--lengths"):
        mc_eval.main(EVAL + ["--lengths=0,-1"])
