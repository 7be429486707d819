"""The report card: sections as markdown + JSON, the summary table, wall time per stage, code size, notes for
broken files; the tokenizer stages' sections; the CLIs of nanochat.report and scripts.mc_eval_report."""

import datetime
import json
import os
import subprocess
import sys

import pytest

from nanochat import report
from scripts import mc_eval_report, tok_eval, tok_train

START = datetime.datetime(2025, 1, 1, 12, 0, 0)


@pytest.fixture
def report_dir(tmp_path, monkeypatch):
    """An empty report dir, and a clock that reads START, then one more minute at every call."""
    monkeypatch.setenv("MC_REPORT_DIR", str(tmp_path / "report"))
    ticks = iter(range(1000))
    monkeypatch.setattr(report, "_now", lambda: START + datetime.timedelta(minutes=next(ticks)))
    return tmp_path / "report"


def test_sections_summary_and_wall_time(report_dir):
    report.reset()  # 12:00
    report.log_section("tokenizer", "Tokenizer training", [{"vocab size": 512}])  # 12:01
    report.log_section("base-train", "Base model training", [  # 12:02
        {"data": "books", "steps": 10}, {"initial val bpb": 3.0, "final val bpb": 1.23456, "MFU (mean)": "41.5%"},
        ("img", "base_loss.png"), "Samples:", "    'text'"])
    report.log_section("chat-eval-sft", "Chat evaluation (sft)", [  # 12:03
        {"checkpoint": "sft/d4", "accuracy": "not a headline: no paragraph before it"},
        "Long-document QA (held out):", {"examples": 200, "accuracy": "0.715", "accuracy at depth 0.1 (n=20)": "0.8"}])
    report.log_section("base-train", "Base model training", [{"final val bpb": 1.0, "MFU (mean)": "40.0%"}])  # 12:04, again
    saved = json.loads((report_dir / "section-chat-eval-sft.json").read_text())
    assert saved["stage"] == "chat-eval-sft" and saved["time"] == "2025-01-01T12:03:00" and saved["items"][2]["examples"] == 200
    text = open(report.generate()).read()  # generated at 12:05

    summary = text.split("## Summary")[1].split("##")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "metric" not in line]
    assert "| Long-doc QA | — | — | 0.715 | — |" in rows and "| CORE | — | — | — | — |" in rows  # the report card
    assert rows[-2:] == ["| base-train | final val bpb | 1 |", "| base-train | MFU (mean) | 40.0% |"]  # the last run's
    assert "Generated 2025-01-01 12:05:00; run started 2025-01-01 12:00:00." in text
    wall = text.split("## Wall time")[1].split("##")[0]
    assert "| tokenizer | 2025-01-01 12:01:00 | 1m 00s |" in wall and "| chat-eval-sft | 2025-01-01 12:03:00 | 1m 00s |" in wall
    assert wall.count("| base-train |") == 2 and "| **total** |  | 4m 00s |" in wall and "more than once" in wall
    assert "## Environment" in text and "git commit:" in text and "torch:" in text
    assert text.index("## Summary") < text.index("## Wall time") < text.index("## Environment") < text.index("## Code size")
    assert text.index("## Tokenizer training") < text.index("## Base model training") < text.index("## Chat evaluation")
    assert "## Notes" not in text

    report.reset()  # a new run: sections and the timeline start over
    assert not list(report_dir.glob("section-*")) and json.loads((report_dir / "run.json").read_text())["sections"] == []


def test_broken_files_become_notes(report_dir):
    report.log_section("base-eval", "Base model evaluation", [{"val bpb": 0.9}])  # no reset: start unknown
    report.log_section("base-train", "Base model training", [{"final val bpb": 1.1}])
    report.log_section("mid-train", "Midtraining", [{"final val loss": 2.0}])
    (report_dir / "section-base-eval.json").write_text("{not json")
    (report_dir / "section-mid-train.md").write_bytes(b"\xff\xfe not utf-8")
    (report_dir / "section-typo.md").write_text("## A stage nobody knows\n")
    text = open(report.generate()).read()
    notes = text.split("## Notes")[1].split("---")[0]
    assert "run.json has no start time" in notes
    assert "section-base-eval.json is missing or unreadable" in notes and "section-mid-train.md is unreadable" in notes
    assert "section-typo.md: not a known stage" in notes
    assert "## Base model evaluation" in text and "## Midtraining" not in text and "A stage nobody knows" not in text
    assert "| base-train | final val bpb | 1.1 |" in text and "| base-eval |" not in text.split("## Wall time")[0]
    assert "| **total** |  | - |" in text and "run started unknown" in text
    (report_dir / "run.json").write_text("[]")  # not the expected object: a fresh timeline, no traceback
    assert "run.json has no start time" in open(report.generate()).read()


def test_code_size_from_git_or_the_folder(monkeypatch):
    rows, source = report.code_size()
    assert source == "git ls-files" and [r[0] for r in rows] == [".py", ".sh", ".md", "total"]
    assert rows[0][1] > 50 and rows[-1][1:] == [sum(r[i] for r in rows[:-1]) for i in (1, 2, 3)]
    assert report.code_size() == (rows, source)  # deterministic
    monkeypatch.setattr(report, "_git", lambda *args: "")  # no git: walk the folder
    files, source = report.code_files()
    names = [str(f.relative_to(report.ROOT)) for f in files]
    assert source == "files on disk" and "nanochat/report.py" in names and "run10.sh" in names
    assert not any(part.startswith(".") or part == "__pycache__" for name in names for part in name.split(os.sep))


def test_tokenizer_stages_write_sections(tiny_env, tmp_path, monkeypatch, report_dir):
    monkeypatch.setenv("MC_BASE_DIR", str(tmp_path / "base"))  # keep the session's tokenizer
    monkeypatch.setattr(tok_eval, "load_comparisons", lambda: ({}, ["gpt2", "cl100k_base"]))  # offline, always
    tok_train.main([f"--data={tiny_env['data']}", "--vocab_size=300", "--max_chars=20000", "--doc_cap=5000"])
    section = (report_dir / "section-tokenizer.md").read_text()
    assert "- vocab size: 300 (" in section and "20,000 characters from 2 documents" in section
    tok_eval.main([f"--data={tiny_env['data']}", "--max_docs=3"])
    section = (report_dir / "section-tokenizer-eval.md").read_text()
    assert f"bytes/token, {tiny_env['data']}/val:" in section and "not available offline: gpt2, cl100k_base" in section
    assert "| prose |" in section
    summary = open(report.generate()).read().split("## Wall time")[0]
    assert f"| tokenizer-eval | bytes/token, {tiny_env['data']}/val |" in summary


def needle_results(W=16, K=4):
    """mc_eval's raw results for two arms at lengths W and 8W, with recall and a NaN (as write_outputs gets them)."""
    lengths = [W, 8 * W]
    rec = {arm: {"L": [L for L in lengths for _ in range(4)], "depth": [0.1, 0.4, 0.6, 0.9] * 2,
                 "offset": [0, 1, 2, 3] * 2, "correct": correct, "expanded": [None] * 8}
           for arm, correct in [("mc", [1, 1, 0, 1, 1, 0, 1, 1]), ("truncation", [1, 0, 0, 1, 0, 0, 0, 1])]}
    return {"checkpoint": {"mc": "base/mc", "step": 10, "plain": "", "mean_gist": ""}, "mc_config": {"recent": 4},
            "eval_config": {"filler": "corpus", "depth_bins": 2, "offset_bins": 2}, "W": W, "K": K, "tail": 4,
            "full_max_len": 32, "arms": ["truncation", "mc"], "lengths": lengths, "needle": rec,
            "recall": {"length": 64, "accuracy": {"mc": {1: 1.0, 2: 0.5, 16: float("nan")}}},
            "skipped": ["full: 128 > --full_max_len"]}


def test_mc_eval_section_round_trips_through_its_json(report_dir):
    report_dir.mkdir(parents=True)
    mc_eval_report.write_outputs(needle_results(), report_dir)
    section = (report_dir / "section-mc-eval.md").read_text()
    saved = (report_dir / "mc_eval.json").read_text()
    assert "- needle accuracy at 8W (mc): 0.75" in section and "- needle accuracy at 8W (truncation): 0.25" in section
    (report_dir / "section-mc-eval.md").unlink()
    mc_eval_report.main([])  # rewrites the section and the JSON from the saved JSON
    assert (report_dir / "section-mc-eval.md").read_text() == section and (report_dir / "mc_eval.json").read_text() == saved
    assert "| needle at 8W | 0.25 | 0.75 | — |" in open(report.generate()).read()  # the summary's MC table
    for argv, message in [(["--json=/nonexistent.json"], "cannot read /nonexistent.json"),
                          ([f"--json={report_dir / 'section-mc-eval.json'}"], "is not an mc_eval.json")]:
        with pytest.raises(SystemExit, match=message):
            mc_eval_report.main(argv)


def chat_eval_items(values: dict, longdoc: str, memory: dict | None = None) -> list:
    """A chat_eval section: the summary dict (its keys: report.CHAT_METRICS, and with an MC checkpoint chat
    memory), then long-document QA."""
    return [{**dict(zip(report.CHAT_METRICS, values)), **(memory or {})}, {"checkpoint": "x", "context": 512},
            "Long-document QA (held out):", {"examples": 10, "accuracy": longdoc}]


def summary_tables(text: str) -> list[list[str]]:
    """The summary's tables, each as its rows of cells (header included)."""
    tables, lines = [], text.split("## Summary")[1].split("## Wall time")[0].splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and not lines[i - 1].startswith("|"):
            tables.append([])
        if line.startswith("| "):
            tables[-1].append([cell.strip() for cell in line.strip("|").split("|")])
    return tables


def test_report_card(report_dir):
    report.reset()
    text = open(report.generate()).read()
    [card] = summary_tables(text)  # no MC table, no other headline metric
    assert card[0] == ["metric", "BASE", "MID", "SFT", "RL"] and len(card) == 1 + len(report.CARD)
    assert all(row[1:] == ["—"] * 4 for row in card[1:]) and "No other headline metric" in text  # no stage has run
    report.log_section("base-eval", "Base model evaluation", [{"checkpoint": "d4 step 9", "val bpb": 0.812345},
                                                              "Samples:", {"CORE": "skipped (offline)"}])
    report.log_section("mid-train", "Mid-training", [{"steps": 3}, {"final val loss": 1.5, "final val bpb": 0.61}])
    report.log_section("chat-sft", "Chat SFT", [{"final val loss": 1.2, "final val bpb": 0.55}])
    report.log_section("chat-eval-mid", "Chat evaluation (mid)", chat_eval_items(
        ["0.312", "0.250", "skipped", "skipped", "0.000", "0.041"], "0.400"))
    report.log_section("chat-eval-sft", "Chat evaluation (sft)", chat_eval_items(
        ["0.350", "0.270", "0.260", "skipped", "0.012", "0.070"], "0.500", {"chat memory (MC)": "0.620"}))
    report.log_section("chat-eval-rl", "Chat evaluation (rl)", chat_eval_items(
        ["0.340", "0.280", "skipped", "0.031", "0.010", "0.066"], "0.450"))
    mc_eval_report.write_outputs(needle_results(), report_dir)  # needle at 8W and recall at 4W, arms truncation and mc
    card, mc, others = summary_tables(open(report.generate()).read())
    assert card == [["metric", "BASE", "MID", "SFT", "RL"],
                    ["val bpb", "0.8123", "0.61", "0.55", "—"],
                    ["CORE", "skipped", "—", "—", "—"],
                    ["ARC-Easy", "—", "0.312", "0.350", "0.340"],
                    ["ARC-Challenge", "—", "0.250", "0.270", "0.280"],
                    ["MMLU", "—", "skipped", "0.260", "skipped"],
                    ["GSM8K", "—", "skipped", "skipped", "0.031"],
                    ["HumanEval", "—", "0.000", "0.012", "0.010"],
                    ["ChatCORE", "—", "0.041", "0.070", "0.066"],
                    ["Long-doc QA", "—", "0.400", "0.500", "0.450"],
                    ["Chat memory (MC)", "—", "—", "0.620", "—"]]
    assert mc == [["metric", "truncation", "mc", "full"],
                  ["needle at 8W", "0.25", "0.75", "—"],  # full did not run at 8W
                  ["recall at 4W", "—", "0.75", "—"]]  # the mean over 1 and 2 pairs (16: no result)
    assert ["mid-train", "final val loss", "1.5"] in others and ["chat-sft", "final val loss", "1.2"] in others


@pytest.mark.parametrize("module, names", [("nanochat.report", ["reset", "generate"]), ("scripts.mc_eval_report", ["--json"])])
def test_cli_help_and_unknown_options(module, names, tmp_path):
    env = dict(os.environ, MC_REPORT_DIR=str(tmp_path))
    for flag in ["--help", "-h"]:
        result = subprocess.run([sys.executable, "-m", module, flag], capture_output=True, text=True, env=env,
                                cwd=report.ROOT)
        assert result.returncode == 0 and all(name in result.stdout for name in names + ["usage"]), result.stdout
    result = subprocess.run([sys.executable, "-m", module, "--bogus"], capture_output=True, text=True, env=env,
                            cwd=report.ROOT)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"python -m {module}: error: unrecognized arguments: --bogus (see --help)"]
    assert not list(tmp_path.iterdir())  # nothing written


def test_plot_series_can_be_told_apart(tmp_path, monkeypatch):
    """Every arm of a plot gets its own (colour, marker) pair, also past ten arms; the plot has a log x-axis
    when asked and its legend outside the axes."""
    styles = report.series_styles(14)
    assert len({(s["color"], s["marker"]) for s in styles}) == 14
    assert styles[0]["linestyle"] == "-" and styles[12]["linestyle"] == "--"
    import matplotlib.axes
    seen = {}
    orig = matplotlib.axes.Axes.legend
    monkeypatch.setattr(matplotlib.axes.Axes, "legend",
                        lambda ax, *a, **k: seen.update(xscale=ax.get_xscale(), anchor=k.get("bbox_to_anchor")) or orig(ax, *a, **k))
    series = {f"arm{i}": ([256, 1024, 131072], [0.1 * i, 0.2, 0.3]) for i in range(12)}
    report.plot_curves(tmp_path / "p.png", series, "history", "accuracy", "t", logx=True)
    assert (tmp_path / "p.png").stat().st_size > 0 and seen["xscale"] == "log" and seen["anchor"][0] > 1
