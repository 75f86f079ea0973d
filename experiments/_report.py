"""Where and how every script under experiments/ writes its results: ``experiments/results/<script>/``.

The convention: a script's ``--out`` defaults to ``results_dir(__file__)`` (``experiments/results/<script name>``; a
recipe's runs go to ``experiments/results/<recipe>/<run>``). ``write_report`` puts ``results.json`` (the whole report:
``environment`` from ``_timing.environment()``, settings, raw per-round numbers, results) and ``table.md`` (the
environment header and definitions as HTML comments, then a markdown table, then optional trailing lines) there;
``print_report`` shows the same table on the terminal. Imported by the scripts as ``from _report import ...``
(they run as ``python experiments/NAME.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["RESULTS", "print_report", "results_dir", "write_report"]

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir(script: str, run: str | None = None) -> Path:
    """``experiments/results/<script's file name without .py>`` (``/<run>`` when given), relative to the current
    directory when it lies under it (so printed paths stay short)."""
    out = RESULTS / Path(script).stem / (run or "")
    try:
        return out.relative_to(Path.cwd())
    except ValueError:
        return out


def write_report(
    out_dir: Path, report: dict, comment: str, columns: list[str], rows: list[list[str]], tail: list[str] = ()
) -> None:
    """``results.json`` and ``table.md`` (``comment`` lines as HTML comments, the table, then ``tail``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"<!-- {line} -->" for line in comment.splitlines()]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (out_dir / "table.md").write_text("\n".join([*lines, *tail]) + "\n")


def print_report(
    console, title: str, columns: list[str], rows: list[list[str]], header: str, footer: str, left: str
) -> None:
    """``header``, then a rich table (column ``left`` left-aligned, the others right-aligned), then ``footer``."""
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(header, markup=False)
    console.print(table)
    console.print(footer, markup=False)
