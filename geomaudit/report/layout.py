"""Tables that never lose a value: a :class:`Grid` laid out to the width it is printed at, or written as
Markdown or CSV.

A grid has **key columns** (the layer name), repeated in every panel, and **value columns**, optionally in
groups that stay together (the A, B and ratio of one compared pair). Printed as a table at a given width,
the value columns are packed, group by group, into as many panels as it takes for each panel to fit;
nothing is cropped: a panel that still does not fit (a single group wider than the screen) folds its
cells onto more lines instead of cutting them. Without a width (output to a file or a pipe) every grid is one
table at its natural width. ``md`` writes GitHub Markdown tables and ``csv`` one rectangular CSV for all grids,
with the full-precision numbers and the grids' ``context`` (which checkpoint, say) as leading columns.
"""

import csv
import io
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

FORMATS = ("table", "md", "csv")


def fmt(x: float | None, spec: str = ".3g") -> str:
    """A number as printed; ``None`` (an undefined ratio, JSON ``null``) prints as ``undefined``."""
    return "undefined" if x is None else format(x, spec)


@dataclass(frozen=True)
class Value:
    """A cell printed as ``text`` and written to CSV as ``raw`` (the numbers in full precision)."""

    text: str
    raw: str

    def __str__(self) -> str:
        return self.text


def number(x: float | int | None, spec: str = ".3g") -> Value:
    """A numeric cell: printed with ``spec``, in CSV in full precision, empty when undefined."""
    return Value(fmt(x, spec), "" if x is None else repr(x))


Cell = str | Value


@dataclass(frozen=True)
class Column:
    header: str
    group: str = ""  # adjacent columns with the same non-empty group stay in one panel, under one label
    right: bool = True


@dataclass
class Grid:
    """One logical table: ``keys`` columns repeated in every panel, then ``columns``; one cell per column a row."""

    title: str
    keys: list[Column]
    columns: list[Column]
    rows: list[list[Cell]] = field(default_factory=list)
    rules: set[int] = field(default_factory=set)  # a horizontal rule after these rows
    caption: str = ""
    context: dict[str, str] = field(default_factory=dict)  # CSV: leading columns saying where the rows come from
    label: str = ""  # a short title for the panels after the first (default: the title)

    def add_row(self, *cells: Cell, end_section: bool = False) -> None:
        if len(cells) != len(self.keys) + len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells in a grid of {len(self.keys) + len(self.columns)} columns")
        self.rows.append(list(cells))
        if end_section:
            self.rules.add(len(self.rows) - 1)

    def groups(self) -> list[list[int]]:
        """Indices of the value columns, in runs that must stay together."""
        runs: list[list[int]] = []
        for i, col in enumerate(self.columns):
            if runs and col.group and self.columns[runs[-1][0]].group == col.group:
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs


def terminal_width(stream: TextIO) -> int | None:
    """The width to lay tables out to: ``$COLUMNS`` when set, the terminal's width, or ``None`` (a file or a
    pipe: no limit, every table at its natural width)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    isatty = getattr(stream, "isatty", None)
    if isatty and isatty():
        return shutil.get_terminal_size().columns
    return None


def _fold_name(name: str, width: int) -> str:
    """A dotted name broken after dots into lines of at most ``width`` characters where it can be."""
    lines = [""]
    for part in name.replace(".", ".\n").split("\n"):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _rich_table(grid: Grid, columns: Sequence[int], width: int | None = None):
    """A rich table of the key columns and ``columns``. When it is wider than ``width``, the names in the first
    key column are broken after dots to make room; rich folds whatever still does not fit: nothing is cut."""
    from rich.table import Table
    from rich.text import Text

    keys, widths = _widths(grid)
    excess = sum(keys) + sum(widths[i] for i in columns) + 1 - (width or 10**6)
    fold = max(8, keys[0] - 3 - excess) if grid.keys and excess > 0 else None
    grouped = any(grid.columns[i].group for i in columns)
    table = Table()
    for col in grid.keys:
        table.add_column(Text(("\n" if grouped else "") + col.header), overflow="fold",
                         justify="right" if col.right else "left")
    for position, i in enumerate(columns):
        col = grid.columns[i]
        first = position == 0 or grid.columns[columns[position - 1]].group != col.group
        header = f"{col.group if first else ''}\n{col.header}" if grouped else col.header
        table.add_column(Text(header), overflow="fold", justify="right" if col.right else "left")
    n = len(grid.keys)
    for r, row in enumerate(grid.rows):
        cells = [str(c) for c in row[:n] + [row[n + i] for i in columns]]
        if fold:
            cells[0] = _fold_name(cells[0], fold)
        table.add_row(*map(Text, cells), end_section=r in grid.rules)
    return table


def _widths(grid: Grid) -> tuple[list[int], list[int]]:
    """The natural width of each key column and of each value column, with its share of the borders: its
    longest line, one space of padding on either side and one border line (a table has one more)."""
    from rich.cells import cell_len

    def width(header: str, i: int) -> int:
        lines = header.split("\n") + [line for row in grid.rows for line in str(row[i]).split("\n")]
        return max(map(cell_len, lines)) + 3

    n = len(grid.keys)
    firsts = {run[0] for run in grid.groups()}
    return ([width(c.header, i) for i, c in enumerate(grid.keys)],
            [width(f"{c.group if i in firsts else ''}\n{c.header}", n + i) for i, c in enumerate(grid.columns)])


def _pack(runs: list[list[int]], keys: int, widths: list[int], limit: int) -> list[list[int]]:
    """Runs of columns, in order, into panels no wider than ``limit`` (a run wider than it gets a panel alone)."""
    panels: list[list[int]] = []
    used = 0
    for run in runs:
        add = sum(widths[i] for i in run)
        if panels and used + add <= limit:
            panels[-1] += run
            used += add
        else:
            panels.append(list(run))
            used = keys + add
    return panels


def panels(grid: Grid, width: int | None) -> list[list[int]]:
    """The value columns of each panel the grid is printed in at ``width`` (``None``: one panel). When it takes
    several, the columns are spread so that the panels are about equally wide."""
    runs = grid.groups()
    if width is None or len(runs) < 2:
        return [list(range(len(grid.columns)))]
    key_widths, widths = _widths(grid)
    keys = sum(key_widths) + 1
    packed = _pack(runs, keys, widths, width)
    if len(packed) == 1:
        return packed
    low, high = max(keys + sum(widths[i] for i in run) for run in runs), width
    while low < high:  # the narrowest limit that needs no more panels
        middle = (low + high) // 2
        if len(_pack(runs, keys, widths, middle)) <= len(packed):
            high = middle
        else:
            low = middle + 1
    return _pack(runs, keys, widths, high)


def _natural(grid: Grid, columns: Sequence[int]) -> int:
    keys, widths = _widths(grid)
    return sum(keys) + sum(widths[i] for i in columns) + 1


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown(grids: Sequence[Grid]) -> str:
    """GitHub Markdown: per grid, its title, one table with every column, and its caption."""
    parts = []
    for grid in grids:
        cols = grid.keys + grid.columns
        head = [f"{c.group} {c.header}".strip() for c in cols]
        lines = [f"| {' | '.join(map(_md_cell, head))} |",
                 f"|{'|'.join('---:' if c.right else '---' for c in cols)}|"]
        lines += [f"| {' | '.join(_md_cell(str(c)) for c in row)} |" for row in grid.rows]
        block = ([_md_cell(grid.title), ""] if grid.title else []) + lines
        parts.append("\n".join(block + (["", _md_cell(grid.caption)] if grid.caption else [])))
    return "\n\n".join(parts) + "\n"


def csv_text(grids: Sequence[Grid]) -> str:
    """One CSV for all grids (they share their columns): the context columns, then every column; numbers in full
    precision, an undefined value as an empty cell."""
    if not grids:
        return ""
    head = [f"{c.group} {c.header}".strip() for c in grids[0].keys + grids[0].columns]
    context = list(grids[0].context)
    for grid in grids[1:]:
        if [f"{c.group} {c.header}".strip() for c in grid.keys + grid.columns] != head or list(grid.context) != context:
            raise ValueError("grids with different columns cannot share one CSV")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(context + head)
    for grid in grids:
        for row in grid.rows:
            writer.writerow(list(grid.context.values()) + [c.raw if isinstance(c, Value) else c for c in row])
    return out.getvalue()


def write(grids: Sequence[Grid], stream: TextIO, format: str = "table", width: int | None = None) -> None:
    """Write ``grids`` to ``stream`` as ``table`` (laid out to ``width``), ``md`` or ``csv``."""
    if format == "md":
        stream.write(markdown(grids))
    elif format == "csv":
        stream.write(csv_text(grids))
    elif format == "table":
        from rich.console import Console
        from rich.text import Text

        console = Console(file=stream, width=width or 10**6, highlight=False)
        for grid in grids:
            columns = panels(grid, width)
            for i, cols in enumerate(columns):
                title = grid.title if i == 0 else f"{grid.label or grid.title} (continued)"
                if title:
                    console.print(Text(title), soft_wrap=width is None)
                console.print(_rich_table(grid, cols, width), width=width or _natural(grid, cols))
            if grid.caption:
                console.print(Text(grid.caption), soft_wrap=width is None)
    else:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
