"""The one table printer: aligned plain-text columns, or a markdown table.

Every console table of the package goes through :func:`format_rows` (cells already text) or
:func:`format_frame` (a DataFrame, formatted per column). The output is plain text whatever
the stream, so logs, pipes and tests see the same bytes as a terminal: columns two spaces
apart, text left-aligned, numbers right-aligned, trailing blanks stripped.

>>> print("\\n".join(format_rows(["name", "n"], [["fc1", "10"], ["fc2.weight", "7"]], "lr")))
name         n
fc1         10
fc2.weight   7
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

Formatter = Callable[[Any], str]
GAP = "  "


def format_rows(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    align: str | None = None,
    *,
    indent: int = 0,
) -> list[str]:
    """Text cells as aligned lines: the header, then one line per row.

    Args:
        header: column titles.
        rows: cells, each row as long as ``header``.
        align: one letter per column, ``l`` (left) or ``r`` (right); ``None`` is all right.
        indent: spaces before every line.

    Returns:
        The lines, without newlines and without trailing blanks.

    Raises:
        ValueError: a row or ``align`` whose length differs from the header's, or an
            alignment letter other than ``l``/``r``.
    """
    align = "r" * len(header) if align is None else align
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(
            f"align {align!r} must hold one 'l' or 'r' per column ({len(header)} columns)"
        )
    for k, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(
                f"row {k} has {len(row)} cells, the header {len(header)}; give one per column"
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return (" " * indent + GAP.join(parts)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def frame_cells(
    df: pd.DataFrame,
    formats: Mapping[str, Formatter] | None = None,
    floatfmt: str = "{:.4g}",
) -> tuple[list[str], list[list[str]], str]:
    """A DataFrame as ``(header, rows, align)`` text cells for :func:`format_rows`.

    Args:
        df: the table; its index is left out.
        formats: per-column ``value -> text``; other floats use ``floatfmt``, the rest ``str``.
        floatfmt: ``str.format`` pattern for floats without a formatter.

    Returns:
        Column titles, text rows, and ``r`` for numeric columns, ``l`` for the others.
    """
    from pandas.api.types import is_numeric_dtype

    formats = dict(formats or {})
    header = [str(c) for c in df.columns]

    def cell(column: str, value: Any) -> str:
        if column in formats:
            return formats[column](value)
        return floatfmt.format(value) if isinstance(value, float) else str(value)

    rows = [
        [cell(c, v) for c, v in zip(header, values, strict=True)]
        for values in df.itertuples(index=False, name=None)
    ]
    align = "".join("r" if is_numeric_dtype(df[c]) else "l" for c in df.columns)
    return header, rows, align


def format_frame(
    df: pd.DataFrame,
    formats: Mapping[str, Formatter] | None = None,
    floatfmt: str = "{:.4g}",
    *,
    indent: int = 0,
) -> str:
    """A DataFrame as an aligned plain-text table (:func:`frame_cells`, :func:`format_rows`)."""
    header, rows, align = frame_cells(df, formats, floatfmt)
    return "\n".join(format_rows(header, rows, align, indent=indent))


def markdown_frame(
    df: pd.DataFrame, formats: Mapping[str, Formatter] | None = None, floatfmt: str = "{:.4g}"
) -> str:
    """A DataFrame as a GitHub-flavoured markdown table, cells as :func:`frame_cells` writes them."""
    header, rows, _ = frame_cells(df, formats, floatfmt)
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


__all__ = ["format_frame", "format_rows", "frame_cells", "markdown_frame"]
