"""What the verbs print: one console, the metric and NELBO tables, JSON records, a progress callback."""

from __future__ import annotations

import contextlib
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from blockdiff import tables
from blockdiff.files import write_text_atomic

console = Console(soft_wrap=True)  # lines are never re-wrapped at 80 columns when piped (tables fit themselves)


@contextlib.contextmanager
def stage_progress():
    """A ``progress(stage, done, total)`` callback for long library calls: a transient bar on stderr when it is a
    terminal (so a minute-long evaluation is never silent), ``None`` when output is piped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    if not err.is_terminal:  # piped or captured: stderr stays for the error, if any
        yield None
        return
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        tasks: dict[str, object] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                for task in tasks.values():
                    bar.update(task, visible=False)
                tasks[stage] = bar.add_task(stage, total=total or None)
            bar.update(tasks[stage], completed=done, total=total or None)

        yield report


def nelbo_record(result) -> dict:
    return {
        "nelbo_nll": result.nll,
        "nelbo_ppl": result.ppl,
        "bpb": result.bpb,
        "tokens": result.num_tokens,
        "block_length": result.block_length,
    }


def write_json(path: str, record: dict) -> None:
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    console.print(f"written to {path}", markup=False)


def print_nelbo(path, result) -> None:
    table = Table(title=escape(f"held-out NELBO bound — {path}"))
    for col in ("block_length", "NELBO (nats/tok)", "PPL ≤", "BPB ≤", "tokens"):
        table.add_column(col, justify="right")
    table.add_row(
        str(result.block_length),
        f"{result.nll:.4f}",
        f"{result.ppl:.2f}",
        f"{result.bpb:.4f}",
        f"{result.num_tokens:,}",
    )
    console.print(table)


def print_metrics(title: str, metrics: dict[str, float], extra: dict[str, float]) -> None:
    header = ["val/nll", "val/ppl", "val/bpb", *extra]
    values = [metrics.get(k, float("nan")) for k in ("val/nll", "val/ppl", "val/bpb")] + list(extra.values())
    row = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
    tables.print_table(console, header, [row], title=title, right=header)
