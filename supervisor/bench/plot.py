"""--plot PATH: a latency CDF per figure, deadstop, its floors and the peers on the same axes.

matplotlib is an optional extra (`pip install 'deadstop[plot]'`): nothing else
of the benchmark needs it, and it is imported only here, headless (Agg).
"""

from __future__ import annotations

import math
from typing import Any

from .errors import UsageError
from .report import Figure
from .stats import Row


def require() -> Any:
    """matplotlib.pyplot on the Agg backend, or a UsageError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("deadstop bench --plot needs matplotlib, an optional extra: "
                              "pip install 'deadstop[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figures_from_rows(rows: list[Row]) -> list[Figure]:
    """For a benchmark that names no figures: one per section, a curve per latency row with samples."""
    out: dict[str, list[tuple[str, list[int]]]] = {}
    for r in rows:
        if r.unit == "ms" and r.samples:
            out.setdefault(r.section, []).append((r.name, r.samples))
    return list(out.items())


def write(path: str, figures: list[Figure]) -> None:
    """Every figure as a subplot (x: ms, log scale; y: the fraction of trials at or under it), into `path`."""
    plt = require()
    from matplotlib import ticker

    figures = [(title, [(label, s) for label, s in curves if s]) for title, curves in figures]
    figures = [(title, curves) for title, curves in figures if curves]
    cols = 2 if len(figures) > 1 else 1
    rows = max(1, math.ceil(len(figures) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(figures):]:
        ax.set_visible(False)
    for ax, (title, curves) in zip(axes.flat, figures):
        for label, samples in curves:
            xs = sorted(s / 1e6 for s in samples)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            style = "--" if label.startswith("floor") else "-"
            ax.step(xs, ys, style, where="post", label=f"{label} (n={len(xs)})")
        ax.set_xscale("log")
        plain = ticker.FuncFormatter(lambda v, _pos: f"{v:g}")  # 2, not 2x10^0
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("latency, ms (log)")
        ax.set_ylabel("fraction of trials")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
