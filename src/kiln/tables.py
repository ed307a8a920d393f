"""Every table the CLI prints, drawn so that a number is never wrapped.

rich folds a cell that does not fit its column, and it assumes 80 columns when stdout is a pipe: a
rel diff of 3.3e-10 came out as ``3.3e-1`` over ``0``. :func:`print_table` draws a rich table only on
a terminal wide enough for every cell (leaving out the columns marked optional first, and returning
their names so the caller can say so). Anywhere else (a pipe, a file, a terminal too narrow) it
prints plain lines: a header, then one line per row, columns padded and two spaces apart, never
wrapped, so that grep, awk and the eye all read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

GAP = "  "


class _Console(Console):
    """rich's Console, but a closed stdout raises BrokenPipeError for ``kiln.cli.main`` to answer
    (rich would exit 1 itself: kiln's code for "outputs over tolerance")."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise  # the BrokenPipeError rich is handling


def make_console(stderr: bool = False) -> Console:
    """The console every kiln command prints with."""
    return _Console(stderr=stderr)


@dataclass(frozen=True)
class Column:
    """``numeric``: right-justified. ``optional``: left out first where the terminal is too narrow."""

    header: str
    numeric: bool = False
    optional: bool = False


def plain_lines(columns: Sequence[Column], rows: Sequence[Sequence[str]], *, header: bool = True,
                indent: str = "") -> list[str]:
    """The table as padded plain-text lines (numbers right-justified, text left-justified)."""
    shown = [list(r) for r in ([[c.header for c in columns]] if header else []) + [list(r) for r in rows]]
    widths = [max((len(r[i]) for r in shown), default=0) for i in range(len(columns))]
    lines = []
    for cells in shown:
        padded = [cell.rjust(w) if c.numeric else cell.ljust(w) for c, cell, w in zip(columns, cells, widths)]
        lines.append((indent + GAP.join(padded)).rstrip())
    return lines


def print_table(console: Console, columns: Sequence[Column], rows: Sequence[Sequence[str]], *,
                title: str | None = None, header: bool = True, styles: Sequence[str | None] | None = None) -> list[str]:
    """Print ``rows`` under ``title`` (a plain line, never folded into the table's width). Returns the
    headers of the optional columns left out to fit the terminal (empty when none were)."""
    if title:
        console.print(title, markup=False, highlight=False, soft_wrap=True)
    if console.is_terminal:
        every = list(range(len(columns)))
        required = [i for i in every if not columns[i].optional]
        for keep in (every, required) if len(required) < len(every) else (every,):
            table = _rich([columns[i] for i in keep], [[row[i] for i in keep] for row in rows], header, styles)
            if Measurement.get(console, console.options.update_width(1 << 16), table).maximum <= console.width:
                console.print(table)
                return [columns[i].header for i in every if i not in keep]
    for line in plain_lines(columns, rows, header=header):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return []


def build_summary(engine) -> list[list[str]]:
    """What a build made, as (what, value) rows: layers and fusions, tactics, precisions, profiles, time."""
    summary, report, plan = engine.summary(), engine.report, engine.plan
    rows = [["passes", ", ".join(f"{k} x{v}" for k, v in plan.get("passes", {}).items() if v) or "none rewrote "
                                                                                                 "anything"],
            ["layers", f"{summary['layers']} ({summary['fused_layers']} fused, from {summary['nodes']} nodes)"],
            ["tactics", ", ".join(f"{k} x{v}" for k, v in summary["tactics"].items())],
            ["precisions", ", ".join(f"{k} x{v}" for k, v in summary["precisions"].items())],
            ["profiles", str(summary["profiles"])]]
    if report is not None:  # built here, not loaded from a file
        rows += [["build time", f"{report.seconds:.1f} s at optimization level {plan['config']['opt_level']}"],
                 ["timing cache", f"{report.cache_hits} hits, {report.cache_misses} misses"]]
    rows += [["weights", f"{summary['weights_bytes'] / 1e6:.1f} MB"], ["aux streams", str(engine.aux_streams)]]
    return rows


def _rich(columns: Sequence[Column], rows: Sequence[Sequence[str]], header: bool,
          styles: Sequence[str | None] | None) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False, show_edge=False,
                  show_header=header)
    for column in columns:
        # drawn only where every cell fits, so nothing is ever cut; no_wrap keeps rich from folding anyway
        table.add_column(column.header, justify="right" if column.numeric else "left", no_wrap=True)
    for index, cells in enumerate(rows):
        table.add_row(*cells, style=styles[index] if styles else None)
    return table
