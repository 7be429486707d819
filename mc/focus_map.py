"""Focus map: a picture of where an MCSession looks (for /focus in the chat CLI and for reports).

`plot_focus(state_or_session, path)` writes a PNG:
- top: the current working context over the history: tokens along x, one bar coloured by the
  level of detail each stretch is shown at (raw / LOD1 gist / LOD2 gist / uncovered), the raw
  tail (the last R tokens + the partial block) bracketed;
- bottom (when the session recorded edits): every map change over time, event index (refocus or
  budget fit) on y against the history position of the changed blocks on x, expansions and
  collapses in two colours, and the history length at each event as a line (nothing right of it
  existed yet).
Input is `MCSession.state()` (a plain dict) or a session. The figure is drawn with the Agg
backend and written atomically (temp file + rename).
"""

import io
from pathlib import Path

import numpy as np

from nanochat.common import atomic_write_bytes

# LOD map values -> (label, colour)
LEVELS = {0: ("raw tokens", "#d62728"), 1: ("LOD1 gist", "#ff7f0e"), 2: ("LOD2 gist", "#1f77b4"),
          3: ("LOD3+ gist", "#2ca02c"), -1: ("uncovered", "#d9d9d9")}  # deeper levels are drawn as LOD3


def runs(values):
    """Run-length encoding of a 1-D array -> (starts, lengths, values) arrays."""
    values = np.asarray(values)
    if values.size == 0:
        return np.zeros(0, int), np.zeros(0, int), values
    change = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [values.size]]))
    return starts, lengths, values[starts]


def plot_focus(state_or_session, path, title: str | None = None):
    """Write the focus map of a session (or its `state()` dict) to `path` (PNG); returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = state_or_session.state() if hasattr(state_or_session, "state") else state_or_session
    K, T = state["block_size"], state["history_tokens"]
    lod_map = np.minimum(np.asarray(state["lod_map"], dtype=int), 3)  # [n_blocks]
    edits = state.get("edits") or []
    fig, axes = plt.subplots(2 if edits else 1, 1, figsize=(11, 5.5 if edits else 2.4), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 2.2] if edits else [1]})
    ax = axes[0, 0]
    starts, lengths, values = runs(lod_map)
    for level, (label, colour) in LEVELS.items():
        sel = values == level
        bars = list(zip(starts[sel] * K, lengths[sel] * K))
        if level == 0 and T % K:
            bars.append((len(lod_map) * K, T % K))  # the partial block is raw
        if bars:
            ax.broken_barh(bars, (0, 1), facecolors=colour, label=label)
    tail_start = max(0, T - state["recent"] - T % K)
    ax.annotate("", xy=(tail_start, 1.15), xytext=(T, 1.15), arrowprops=dict(arrowstyle="|-|", color="black", lw=1))
    ax.text((tail_start + T) / 2, 1.25, "raw tail", ha="center", va="bottom", fontsize=8)
    mix = state.get("lod_mix", {})
    ax.set_title(title or f"working context: {state['wc_entries']}/{state['wc_budget']} entries over {T:,} tokens "
                          f"({', '.join(f'{k} {v}' for k, v in mix.items())}; "
                          f"{state.get('refocus_count', 0)} refocuses)", fontsize=10)
    ax.set_xlim(0, max(T, 1))
    ax.set_ylim(0, 1.6)
    ax.set_yticks([])
    ax.legend(loc="upper left", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0, -0.25))
    if edits:
        ax2 = axes[1, 0]
        for key, colour, label in (("expanded", "#2ca02c", "expanded"), ("collapsed", "#9467bd", "collapsed")):
            ys = np.concatenate([np.full(len(e[key]), e["event"]) for e in edits])
            xs = np.concatenate([np.asarray(e[key], dtype=float) * K for e in edits])
            if xs.size:
                ax2.scatter(xs + K / 2, ys, s=6, marker="s", color=colour, label=label, linewidths=0)
        events = np.array([e["event"] for e in edits])
        history = np.array([e["history"] for e in edits])
        ax2.plot(history, events, color="black", lw=0.8, label="history length")
        ax2.set_xlim(0, max(T, 1))
        ax2.set_xlabel("history position (tokens)")
        ax2.set_ylabel("event (refocus / budget fit)")
        ax2.legend(loc="upper left", fontsize=8, frameon=False)
    else:
        ax.set_xlabel("history position (tokens)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
