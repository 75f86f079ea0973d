"""What every benchmark script under experiments/ writes: the machine it ran on and its result files.

``write_report`` puts ``results.json`` (the whole report, raw numbers included) and ``table.md`` (the
environment and definitions as HTML comments, then a markdown table, then optional trailing lines)
into ``out_dir``; ``print_report`` shows the same table on the terminal. Imported by the scripts as
``from _report import ...`` (they run as ``python experiments/NAME.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

__all__ = ["cpu_model", "print_report", "write_report"]


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo (Linux), else whatever ``platform`` knows."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


def write_report(
    out_dir: Path, report: dict, comment: str, columns: list[str], rows: list[list[str]], tail: list[str] = ()
) -> None:
    """``results.json`` and ``table.md`` (``comment`` lines as HTML comments, the table, then ``tail``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
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
