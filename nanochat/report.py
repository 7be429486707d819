"""The run report: report/report.md plus PNG plots, assembled from one section file per stage.

Each stage (tokenizer, base training, evaluation, ...) writes its own section with `log_section`;
`generate` stitches a header describing the environment and every section, in stage order,
into report.md. `python -m nanochat.report reset|generate` is used by the recipes.
"""

import datetime
import json
import os
import platform
import subprocess
import sys

from nanochat.common import atomic_write_text, get_report_dir

STAGE_ORDER = ["tokenizer", "tokenizer-eval", "base-train", "base-mc-train", "base-eval", "mid-train", "chat-sft",
               "chat-eval", "mc-eval", "bench"]


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    import torch
    env = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "git commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu cores": os.cpu_count(),
    }
    if torch.cuda.is_available():
        env["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        env["gpu"] = "none"
    return env


def _format_value(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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


def log_section(stage: str, title: str, items):
    """Write (or replace) the section of `stage`."""
    if stage not in STAGE_ORDER:
        raise ValueError(f"unknown report stage {stage!r}; known: {STAGE_ORDER}")
    atomic_write_text(get_report_dir() / f"section-{stage}.md", render_section(title, items))


def reset():
    """Start a new report: remove old sections and plots, record the start time."""
    d = get_report_dir()
    for f in list(d.glob("section-*.md")) + list(d.glob("*.png")) + list(d.glob("report.md")):
        f.unlink()
    atomic_write_text(d / "run.json", json.dumps({"start": datetime.datetime.now().isoformat()}))


def generate() -> str:
    """Assemble report.md from the header and all stage sections; return its path."""
    d = get_report_dir()
    parts = ["# MegaContext run report", "", render_section("Environment", [environment()])]
    for stage in STAGE_ORDER:
        f = d / f"section-{stage}.md"
        if f.exists():
            parts.append(f.read_text())
    run_file = d / "run.json"
    if run_file.exists():
        start = datetime.datetime.fromisoformat(json.loads(run_file.read_text())["start"])
        elapsed = (datetime.datetime.now() - start).total_seconds()
        parts.append(render_section("Total", [{"wall clock": f"{elapsed / 60:.1f} min"}]))
    path = d / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return str(path)


def plot_curves(path, series: dict, xlabel: str, ylabel: str, title: str):
    """Save a line plot of {label: (xs, ys)} to `path` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "reset":
        reset()
    elif command == "generate":
        print(generate())
    else:
        sys.exit("usage: python -m nanochat.report reset|generate")
