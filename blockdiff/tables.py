"""Tables for the terminal that show user text as it is and never cut it.

``print_table(console, header, rows, title)`` on a terminal draws a ``rich`` table whose title, headers
and cells are ``Text`` objects: a path or run name holding ``[bold red]`` or ``[/x]`` is shown literally,
never read as markup (which would restyle the output or raise ``MarkupError``), and long cells fold
instead of ending in an ellipsis. When the output is piped or redirected (where ``rich`` would assume
80 columns and cut), it prints plain text instead: the title, then one line per row with the columns
aligned and the last one unpadded, so ``| grep`` and ``> file`` see every row whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["print_table"]


def print_table(
    console: Console,
    header: Sequence[str],
    rows: Iterable[Sequence],
    title: str | None = None,
    right: Sequence[str] = (),
) -> None:
    """Print ``rows`` (cells shown as ``str(cell)``) under ``header``; columns named in ``right`` are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    if console.is_terminal:
        table = Table(title=Text(title) if title is not None else None)
        for name in header:
            table.add_column(Text(name), justify="right" if name in right else "left", overflow="fold")
        for row in cells:
            table.add_row(*(Text(c) for c in row))
        console.print(table)
        return
    cells = [[c.replace("\n", " ") for c in row] for row in cells]  # one line per row
    widths = [max(len(r[i]) for r in [list(header), *cells]) for i in range(len(header))]
    lines = [title] if title is not None else []
    for row in [list(header), *cells]:
        padded = [c.rjust(w) if name in right else c.ljust(w) for c, w, name in zip(row, widths, header)]
        lines.append("  ".join(padded).rstrip())
    console.file.write("\n".join(lines) + "\n")
    console.file.flush()
