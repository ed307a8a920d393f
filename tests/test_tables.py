"""kiln.tables: a number is never wrapped, in a narrow terminal or a pipe."""

from __future__ import annotations

import io
import re

from rich.console import Console

from kiln.tables import Column, plain_lines, print_table

COLUMNS = [Column("output"), Column("shape"), Column("dtype"), Column("max abs diff", numeric=True),
           Column("max rel diff", numeric=True), Column("atol", numeric=True, optional=True),
           Column("rtol", numeric=True, optional=True), Column("over", numeric=True), Column("verdict")]
ROWS = [["/model.22/dfl/conv/Conv_output_0_sigmoid_map", "1x84x2100", "float32", "1.35e-07", "3.3e-10", "1e-05",
         "0.0001", "0", "ok"],
        ["boxes", "1x4x2100", "float32", "2.5e-06", "1.1e-07", "1e-05", "0.0001", "0", "ok"]]


def printed(width: int, terminal: bool, columns=COLUMNS, rows=ROWS) -> tuple[str, list[str]]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=terminal, color_system=None)
    left_out = print_table(console, columns, rows, title="a title longer than the table would be at this width, kept "
                                                         "whole")
    return buffer.getvalue(), left_out


def whole(value: str, text: str) -> bool:
    return re.search(rf"(?<![\w.+-]){re.escape(value)}(?![\w.])", text) is not None


def test_piped_output_is_plain_lines_with_every_column():
    text, left_out = printed(80, terminal=False)
    lines = text.splitlines()
    assert lines[0] == "a title longer than the table would be at this width, kept whole" and left_out == []
    assert lines[1].split()[:3] == ["output", "shape", "dtype"] and "atol" in lines[1]
    assert lines[2].split() == ROWS[0] and lines[3].split() == ROWS[1]  # one line per row, nothing folded
    assert whole("3.3e-10", text)


def test_narrow_terminal_never_wraps_a_number():
    for width in (80, 60, 30):
        text, _ = printed(width, terminal=True)
        for value in ("3.3e-10", "1.35e-07", "2.5e-06", "0.0001", "1x84x2100"):
            assert whole(value, text), (width, value, text)


def test_a_terminal_that_fits_draws_a_table_and_leaves_out_optional_columns_first():
    rows = [["y", "2x3", "float32", "1.35e-07", "3.3e-10", "1e-05", "0.0001", "0", "ok"]]
    wide, left_out = printed(120, terminal=True, rows=rows)
    assert left_out == [] and "─" in wide and whole("3.3e-10", wide)
    narrow, left_out = printed(66, terminal=True, rows=rows)
    assert left_out == ["atol", "rtol"] and "─" in narrow and "0.0001" not in narrow and whole("3.3e-10", narrow)
    assert max(len(line) for line in narrow.splitlines()[1:]) <= 66


def test_plain_lines_align_numbers_right_and_text_left():
    lines = plain_lines([Column("name"), Column("ms", numeric=True)], [["a", "1.5"], ["longer", "100.25"]])
    assert lines == ["name        ms", "a          1.5", "longer  100.25"]
    assert plain_lines([Column(""), Column("")], [["layers", "4"]], header=False) == ["layers  4"]
