"""Tables that fit the terminal: columns are dropped by priority until the table fits the width, and the ones
that name a row (a sweep, a job's label) are never cut or wrapped. ``--wide`` (``width=None``) keeps all.

A column of the table either keeps its cells whole (``no_wrap``: names, numbers) or folds them onto more lines
(``fold``: a note or an error); whether a table fits is the sum of those widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class Col:
    key: str
    header: str
    priority: float  # lower is kept longer; the name columns have the lowest
    justify: str = "left"
    fold: bool = False  # may wrap onto several lines (a note); every other column keeps its cells whole
    min_width: int | None = None


def needed_width(cols: list[Col], rows: list[dict[str, Any]]) -> int:
    """The width a table of these columns takes with every no-wrap cell whole (rich's own minimum would let it
    wrap at spaces, "14.632 ±0.64" onto two lines): the widest cell or header per column, a folding column its
    ``min_width`` (or its longest word), and rich's borders and padding (3 per column, 1 more)."""
    from rich.cells import cell_len

    total = 1
    for c in cols:
        cells = [str(r.get(c.key, "")) for r in rows]
        if c.fold:
            words = [w for text in cells + [c.header] for w in text.split()]
            width = max([c.min_width or 0] + [min(cell_len(w), 30) for w in words])
        else:
            width = max([cell_len(c.header)] + [cell_len(x) for x in cells])
        total += width + 3
    return total


def fit(cols: Iterable[Col], rows: list[dict[str, Any]], width: int | None, *, title: str | None = None,
        caption: str | None = None, styles: list[str | None] | None = None):
    """(a rich Table of ``rows`` (dicts of cell text by column key) with as many of ``cols`` as fit ``width``,
    the columns left out). The caption then says which, and that ``--wide`` shows them."""
    keep = list(cols)
    hidden: list[Col] = []
    while True:
        note = caption or ""
        if hidden:
            names = ", ".join(c.header.replace("\n", " ") for c in sorted(hidden, key=lambda c: c.priority))
            note += ("\n" if note else "") + f"not shown at this width: {names} (--wide shows all)"
        table = _build(keep, rows, title, note or None, styles)
        if width is None or len(keep) <= 1 or needed_width(keep, rows) <= width:
            return table, hidden
        drop = max(keep, key=lambda c: c.priority)
        if drop.priority <= 0:  # only the name columns are left: draw them whole, wider than the screen
            return table, hidden
        keep.remove(drop)
        hidden.append(drop)


def _build(cols: list[Col], rows: list[dict[str, Any]], title: str | None, caption: str | None,
           styles: list[str | None] | None):
    from rich.table import Table

    table = Table(title=title, caption=caption, header_style="bold", caption_justify="left")
    for c in cols:
        table.add_column(c.header, justify=c.justify, no_wrap=not c.fold, overflow="fold" if c.fold else "ellipsis",
                         min_width=c.min_width)
    for i, r in enumerate(rows):
        table.add_row(*[str(r.get(c.key, "")) for c in cols], style=styles[i] if styles else None)
    return table


def show(table, width: int | None) -> None:
    """Print a table fitted to ``width`` (None: at its own width, nothing wrapped that need not be)."""
    from rich.console import Console

    Console(width=width or 250).print(table)


def terminal_width(wide: bool) -> int | None:
    """The width to fit tables to: None (everything) with ``--wide`` or when stdout is not a terminal (a file or
    a pipe gets the whole table), else the terminal's (COLUMNS when set)."""
    import sys

    from rich.console import Console

    if wide or not sys.stdout.isatty():
        return None
    return Console().width
