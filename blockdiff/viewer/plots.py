"""Figures of runs and traces (matplotlib, the ``plots`` extra), and the helpers every blockdiff figure shares.

``blockdiff plot`` draws the first three; ``blockdiff/sweeps/plots.py`` draws the sweep report's figures with the
same helpers (``read_metrics``, ``moving_average``, ``save``):

* ``training_curves`` — ``train/loss`` (moving average) and ``val/nll`` of one or more runs, one colour per run;
* ``nelbo_by_position`` — held-out NELBO at each position inside a block (does the bound get worse later in a
  block?), one line per run; the numbers come from ``evaluation.nelbo`` (``by_position=True``);
* ``reveal_histogram`` — for a trace: how many tokens each network forward revealed (1 everywhere = AR speed).

Each function takes plain data (run directories, lists of numbers, a ``Trace``) and writes one PNG.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from blockdiff.files import atomic_path  # noqa: E402
from blockdiff.modeling.rundir import RunDir  # noqa: E402
from blockdiff.viewer.trace import Trace  # noqa: E402

__all__ = ["save", "read_metrics", "moving_average", "training_curves", "nelbo_by_position", "reveal_histogram", "plt"]


def save(fig, path: str | Path) -> Path:
    """Lay out, write (120 dpi, as PNG, through a temporary file: never half-written) and close a figure; returns the
    path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def read_metrics(run_dir: str | Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every logged ``key`` (``train/loss``, ``val/nll``, ...) in a run's ``logs/metrics.csv``;
    empty when the run logged none (or has no log)."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(f) if row.get(key)]


def moving_average(values: list[float], k: int) -> list[float]:
    """The mean of each value and the ``k - 1`` before it (fewer at the start)."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def training_curves(runs: list[tuple[str, str | Path]], path: str | Path, smooth: int = 5) -> Path:
    """``train/loss`` (solid, moving average of ``smooth`` logs) and ``val/nll`` (dashed, dots) of each
    ``(label, run directory)`` on one figure."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.get_cmap("tab10")
    for i, (label, run) in enumerate(runs):
        train, val = read_metrics(run, "train/loss"), read_metrics(run, "val/nll")
        if train:
            ax.plot([s for s, _ in train], moving_average([v for _, v in train], smooth), color=colours(i % 10),
                    linewidth=1.1, label=f"{label} train/loss")
        if val:
            ax.plot([s for s, _ in val], [v for _, v in val], color=colours(i % 10), linestyle="--", marker="o",
                    markersize=4, label=f"{label} val/nll")
    ax.set_xlabel("step")
    ax.set_ylabel("NELBO, nats/token (train: moving average)")
    ax.set_title("training and validation curves", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def nelbo_by_position(rows: dict[str, list[float]], path: str | Path) -> Path:
    """``{label: [NELBO at in-block position 0, 1, ...]}`` as one line per run (positions from 1 on the axis)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, values in rows.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    ax.set_xlabel("position inside the block")
    ax.set_ylabel("held-out NELBO, nats/token")
    ax.set_title("NELBO per block position (is the bound worse later in a block?)", fontsize=10)
    longest = max((len(v) for v in rows.values()), default=1)
    ax.set_xticks(range(1, longest + 1, max(1, longest // 16)))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def reveal_histogram(trace: Trace, path: str | Path) -> Path:
    """Forwards by the number of tokens they revealed, over every sample of ``trace``."""
    counts = Counter(n for s in trace.samples for n in s.revealed_per_forward())
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = list(range(0, max(counts, default=0) + 1))
    ax.bar(xs, [counts.get(x, 0) for x in xs], color="#2563eb")
    forwards, tokens = sum(counts.values()), sum(n * c for n, c in counts.items())
    ax.set_xlabel("tokens revealed by one network forward")
    ax.set_ylabel("forwards")
    ax.set_xticks(xs)
    rate = tokens / forwards if forwards else 0.0
    ax.set_title(f"{trace.path.name}: {forwards} forwards revealed {tokens} tokens ({rate:.2f} per forward)",
                 fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path)
