"""Rendering helpers for evaluation reports: markdown tables and heatmap PNGs (line plots: report.plot_curves)."""

import math
import os


def fmt(v, digits: int = 3) -> str:
    """A table cell: floats rounded, None/NaN as '-', everything else as str."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown_table(header: list, rows: list, digits: int = 3) -> str:
    """A GitHub markdown table of rows (lists of cells) under header."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c, digits) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def heatmap(path, matrix, row_labels, col_labels, title: str, xlabel: str, ylabel: str, vmin=0.0, vmax=1.0):
    """Save matrix (rows x cols, NaN = no data) as an annotated heatmap PNG (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(3, m.shape[1]), 1.2 + 0.5 * max(3, m.shape[0])))
    im = ax.imshow(np.ma.masked_invalid(m), vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not math.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] < (vmin + vmax) / 2 else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
