"""The run report: report/report.md plus PNG plots, assembled from one section per stage.

Each stage (tokenizer, base training, evaluation, ...) writes its section with `log_section`: the
markdown (section-<stage>.md), its items as JSON (section-<stage>.json), and the time it finished in
the run's timeline (run.json, started by `reset`). `generate` writes report.md: the summary (a report card
of every metric at every stage, like nanochat's; the MegaContext headlines per arm; the other headline
metrics the sections logged), the wall time of every stage, the environment and the size of the code,
then the sections in stage order. The recipes call

    python -m nanochat.report reset|generate
"""

import datetime
import fnmatch
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from nanochat.common import atomic_write_text, get_report_dir
from nanochat.configurator import FlagParser

STAGE_ORDER = ["tokenizer", "tokenizer-eval", "base-train", "base-mc-train", "base-eval", "chat-eval-base", "mid-train",
               "chat-eval-mid", "chat-sft", "chat-eval-sft", "chat-rl", "chat-eval-rl", "mc-eval", "bench"]

# The report card: a row per metric, a column per stage of the chat model. A cell is (section, the paragraph
# the value follows ("" = any), key): the first dict item after such a paragraph that has the key. Chat metrics
# come from scripts/chat_eval.py's section of that source (its first dict is keyed by the metric).
CARD_STAGES = ["base", "mid", "sft", "rl"]
CHAT_METRICS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
CARD = [
    ("val bpb", {"base": ("base-eval", "", "val bpb"), "mid": ("mid-train", "", "final val bpb"),
                 "sft": ("chat-sft", "", "final val bpb")}),
    ("CORE", {"base": ("base-eval", "", "CORE")}),
    *[(metric, {s: (f"chat-eval-{s}", "", metric) for s in CARD_STAGES}) for metric in CHAT_METRICS],
    ("Long-doc QA", {s: (f"chat-eval-{s}", "Long-document QA", "accuracy") for s in CARD_STAGES}),
    ("Chat memory (MC)", {s: (f"chat-eval-{s}", "", "chat memory (MC)") for s in CARD_STAGES}),
]
CARD_NOTE = ("val bpb: base on the pretraining val split, mid and SFT on their held-out conversations (assistant "
             "tokens). — = the stage did not run or did not log the metric; skipped = it could not run (e.g. offline).")
# MegaContext headlines from the mc-eval section (scripts/mc_eval_report.py): keys "<task> accuracy at <n>W (<arm>)"
MC_ARMS = ["truncation", "mc", "full"]
MC_KEY = re.compile(r"(needle|recall) accuracy at (\S+W) \((\w+)\)")

# The other headline rows: (stage, key pattern (fnmatch)). Every key of the stage's dict items that matches is a
# row; a metric a stage did not log has no row.
SUMMARY = [
    ("tokenizer-eval", "bytes/token, */val"),
    ("base-train", "final val bpb"),
    ("base-train", "MFU (mean)"),
    ("base-mc-train", "final val bpb"),
    ("base-mc-train", "final last-H bpb*"),
    ("base-mc-train", "MFU (mean)"),
    ("mid-train", "final val loss"),
    ("chat-sft", "final val loss"),
]

ROOT = Path(__file__).resolve().parents[1]  # the repository
CODE_SUFFIXES = [".py", ".sh", ".md"]
SKIP_DIRS = {"__pycache__", "report", "wandb", "out"}  # not source; hidden folders (.venv, .git) are skipped too


def _git(*args) -> str:
    """stdout of a git command in the repository, "" if git or the repository is missing."""
    try:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def environment() -> dict:
    """Where the run ran: git commit, platform, python, torch, CPU cores, GPUs."""
    import torch
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if commit != "unknown" and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    env = {
        "git commit": commit,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu cores": os.cpu_count(),
    }
    if torch.cuda.is_available():
        env["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = "none"
    return env


def code_files() -> tuple[list[Path], str]:
    """The repository's .py, .sh and .md files and where the list came from: git's tracked files, or a walk
    of the folder (no git) that skips hidden folders and SKIP_DIRS."""
    tracked = [ROOT / p for p in _git("ls-files", "-z").split("\0") if p.endswith(tuple(CODE_SUFFIXES))]
    if tracked:
        return sorted(p for p in tracked if p.is_file()), "git ls-files"
    found = []
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIP_DIRS]
        found += [Path(folder) / n for n in names if n.endswith(tuple(CODE_SUFFIXES))]
    return sorted(found), "files on disk"


def code_size() -> tuple[list[list], str]:
    """Rows [kind, files, lines, bytes] per suffix and a total row; and the source of the file list."""
    files, source = code_files()
    rows = {suffix: [suffix, 0, 0, 0] for suffix in CODE_SUFFIXES}
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        row = rows[path.suffix]
        row[1] += 1
        row[2] += len(data.splitlines())
        row[3] += len(data)
    total = ["total", *(sum(r[i] for r in rows.values()) for i in (1, 2, 3))]
    return [*rows.values(), total], source


def _format_value(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def render_section(title: str, items) -> str:
    """Markdown for a section: dicts become bullet lists, strings are paragraphs, ('img', path) an image."""
    lines = [f"## {title}", ""]
    for item in items:
        if isinstance(item, dict):
            lines += [f"- {k}: {_format_value(v)}" for k, v in item.items()]
        elif isinstance(item, tuple) and item[0] == "img":
            lines.append(f"![{title}]({item[1]})")
        else:
            lines.append(str(item))
        lines.append("")
    return "\n".join(lines)


def _now() -> datetime.datetime:
    return datetime.datetime.now().replace(microsecond=0)


def _read_json(path: Path):
    """The JSON in path, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_run(d: Path) -> dict:
    """run.json: {"start": iso time or None, "sections": [{"stage", "time"}, ...]}; a fresh one when missing."""
    run = _read_json(d / "run.json")
    if not isinstance(run, dict):
        run = {"start": None}
    if not isinstance(run.get("sections"), list):
        run["sections"] = []
    return run


def log_section(stage: str, title: str, items):
    """Write (or replace) the section of `stage`, as markdown and as JSON (the summary's source), and note
    the time in the run's timeline."""
    if stage not in STAGE_ORDER:
        raise ValueError(f"unknown report stage {stage!r}; known: {STAGE_ORDER}")
    d, now, items = get_report_dir(), _now().isoformat(), list(items)
    atomic_write_text(d / f"section-{stage}.md", render_section(title, items))
    data = {"stage": stage, "title": title, "time": now, "items": items}
    atomic_write_text(d / f"section-{stage}.json", json.dumps(data, indent=1, default=str))
    run = _read_run(d)
    run["sections"].append({"stage": stage, "time": now})
    atomic_write_text(d / "run.json", json.dumps(run, indent=1))


def reset():
    """Start a new report: remove old sections and plots, record the start time."""
    d = get_report_dir()
    for pattern in ["section-*.md", "section-*.json", "*.png", "report.md"]:
        for f in d.glob(pattern):
            f.unlink()
    atomic_write_text(d / "run.json", json.dumps({"start": _now().isoformat(), "sections": []}, indent=1))


def _dict_items(section: dict, after: str = ""):
    """The dict items of a section that follow a paragraph starting with `after` ("" = any)."""
    paragraph = ""
    for item in section.get("items", []):
        if isinstance(item, str):
            paragraph = item
        elif isinstance(item, dict) and paragraph.startswith(after):
            yield item


def summary_rows(sections: dict) -> list[list]:
    """[stage, metric, value] for every SUMMARY pattern a key of a stage's dict items matches."""
    return [[stage, key, _format_value(value)] for stage, pattern in SUMMARY for item in _dict_items(sections.get(stage, {}))
            for key, value in item.items() if fnmatch.fnmatchcase(key, pattern)]


def _cell(value) -> str:
    """A card cell: a number to 4 significant digits; any "skipped (why)" as just "skipped"."""
    text = _format_value(value)
    return "skipped" if text.startswith("skipped") else text


def card_rows(sections: dict) -> list[list]:
    """[metric, base, mid, sft, rl] for every CARD metric ("—" where the stage did not log it)."""
    rows = []
    for metric, cells in CARD:
        row = [metric]
        for stage in CARD_STAGES:
            section, after, key = cells.get(stage, ("", "", ""))
            found = [item[key] for item in _dict_items(sections.get(section, {}), after) if key in item]
            row.append(_cell(found[0]) if found else "—")
        rows.append(row)
    return rows


def mc_rows(sections: dict) -> list[list]:
    """[metric, *MC_ARMS] for every task and length the mc-eval section logged under MC_KEY ("—": arm not run)."""
    values = {}  # "needle at 8W" -> {arm: value}
    for item in _dict_items(sections.get("mc-eval", {})):
        for key, value in item.items():
            if match := MC_KEY.fullmatch(key):
                task, length, arm = match.groups()
                values.setdefault(f"{task} at {length}", {})[arm] = _cell(value)
    return [[metric, *(per_arm.get(arm, "—") for arm in MC_ARMS)] for metric, per_arm in values.items()]


def _duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def _parse_time(text):
    try:
        return datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def wall_time_section(run: dict, notes: list) -> str:
    """Markdown: each stage's wall time (since the section written before it, or the start) and the total."""
    start = _parse_time(run.get("start"))
    if start is None:
        notes.append("run.json has no start time (no `python -m nanochat.report reset` before the stages): "
                     "the first stage's wall time and the total are unknown")
    timeline = []  # (time, stage), sorted by time (sections of the same second keep the order written)
    for entry in run["sections"]:
        time = _parse_time(entry.get("time")) if isinstance(entry, dict) else None
        if time is not None:
            timeline.append((time, entry.get("stage", "?")))
    timeline.sort(key=lambda t: t[0])
    rows, previous = [], start
    for time, stage in timeline:
        took = _duration((time - previous).total_seconds()) if previous else "-"
        rows.append([stage, time.strftime("%Y-%m-%d %H:%M:%S"), took])
        previous = time
    total = _duration((timeline[-1][0] - start).total_seconds()) if start and timeline else "-"
    lines = ["## Wall time", ""]
    if rows:
        lines += [_table(["stage", "finished", "wall time"], rows + [["**total**", "", total]]), ""]
    else:
        lines += ["No stage has written a section yet.", ""]
    stages = [stage for _, stage in timeline]
    if len(set(stages)) < len(stages):
        lines += ["A stage run more than once has a row per run; the report shows its last section.", ""]
    return "\n".join(lines)


def generate() -> str:
    """Write report.md: title, summary, wall time, environment, code size, notes, then every stage's section;
    a missing or unreadable file becomes a note. Returns the path."""
    d = get_report_dir()
    notes, texts, sections = [], [], {}  # sections: stage -> its JSON (items etc.)
    for stage in STAGE_ORDER:
        path = d / f"section-{stage}.md"
        if not path.exists():
            continue
        try:
            texts.append(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            notes.append(f"{path.name} is unreadable ({e.__class__.__name__}): section skipped")
            continue
        data = _read_json(d / f"section-{stage}.json")
        if isinstance(data, dict) and isinstance(data.get("items"), list):
            sections[stage] = data
        else:
            notes.append(f"section-{stage}.json is missing or unreadable: the summary leaves out {stage}")
    notes += [f"{f.name}: not a known stage ({', '.join(STAGE_ORDER)}), skipped" for f in sorted(d.glob("section-*.md"))
              if f.stem.removeprefix("section-") not in STAGE_ORDER]

    run = _read_run(d)
    started = str(run.get("start") or "unknown")
    rows, mc = summary_rows(sections), mc_rows(sections)
    wall_time = wall_time_section(run, notes)
    code_rows, code_source = code_size()
    parts = [
        "# MegaContext run report", "",
        f"Generated {_now():%Y-%m-%d %H:%M:%S}; run started {started.replace('T', ' ')}.", "",
        "## Summary", "",
        _table(["metric", *(stage.upper() for stage in CARD_STAGES)], card_rows(sections)), "", CARD_NOTE, "",
        *(["MegaContext evaluation (mc_eval), accuracy per arm:", "", _table(["metric", *MC_ARMS], mc), ""] if mc else []),
        _table(["stage", "metric", "value"], rows) if rows else "No other headline metric has been logged yet.", "",
        wall_time,
        render_section("Environment", [environment()]),
        f"## Code size\n\nThe repository's {', '.join(CODE_SUFFIXES)} files ({code_source}):\n",
        _table(["kind", "files", "lines", "bytes"], [[k, f"{n:,}", f"{l:,}", f"{b:,}"] for k, n, l, b in code_rows]), "",
    ]
    if notes:
        parts += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    parts += ["---", "", *texts]
    path = d / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return str(path)


MARKERS = "os^vD<>pPXh"  # 11 markers beside 10 colours: every series of a plot gets its own (colour, marker)


def series_styles(n: int) -> list[dict]:
    """Matplotlib styles of n series that can be told apart: a colour of tab10 and a marker each, solid lines for
    the first ten, then dashed."""
    return [dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], linestyle="-" if i < 10 else "--")
            for i in range(n)]


def plot_curves(path, series: dict, xlabel: str, ylabel: str, title: str, logx: bool = False):
    """Save a line plot of {label: (xs, ys)} to `path` (PNG), the legend beside the axes (never over the data);
    logx: a base-2 log x-axis (history lengths)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for (label, (xs, ys)), style in zip(series.items(), series_styles(len(series))):
        if len(xs) >= 30:
            style = {**style, "marker": None}
        ax.plot(xs, ys, label=label, **style)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    parser = FlagParser(prog="python -m nanochat.report", description="Start or assemble the run report "
                        "($MC_REPORT_DIR, default ./report).")
    parser.add_argument("command", nargs="?", choices=["reset", "generate"], help="reset: remove the sections and "
                        "plots of the last run and record the start time; generate: write report.md from the sections")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("give a command: reset or generate")
    if args.command == "reset":
        reset()
    else:
        print(generate())


if __name__ == "__main__":
    main()
