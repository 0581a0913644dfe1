"""One table type for every result the library prints or writes: markdown, CSV and JSON.

A :class:`Table` holds raw values (numbers stay numbers in CSV and JSON) and, per column, how a
value reads in markdown. Studies, sweeps, pruning comparisons, the encoder grid and recovery all
print through it, so a percent, a missing value or a pipe inside a cell reads the same everywhere.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

MISSING = "–"


def is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def percent(v, digits: int = 0) -> str:
    """A rate in 0..1 as a percent ("–" when missing)."""
    return MISSING if is_missing(v) else f"{100 * v:.{digits}f}%"


def percent1(v) -> str:
    return percent(v, 1)


def fixed(digits: int = 3) -> Callable[[Any], str]:
    def fmt(v) -> str:
        return MISSING if is_missing(v) else f"{v:.{digits}f}"
    return fmt


def text(v) -> str:
    return MISSING if v is None else str(v)


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


@dataclass
class Table:
    """``columns`` name the fields; ``rows`` are dicts (or sequences in column order). ``headers``
    (optional) are what markdown prints over each column; ``formats`` map a column to how its values
    read in markdown (default: ``str``, "–" for None)."""

    columns: Sequence[str]
    rows: list = field(default_factory=list)
    headers: Sequence[str] | None = None
    formats: Mapping[str, Callable[[Any], str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.columns = list(self.columns)
        self.rows = [r if isinstance(r, Mapping) else dict(zip(self.columns, r)) for r in self.rows]
        if self.headers is not None and len(self.headers) != len(self.columns):
            raise ValueError(f"{len(self.headers)} headers for {len(self.columns)} columns")

    def add(self, row: Mapping | Sequence) -> None:
        self.rows.append(row if isinstance(row, Mapping) else dict(zip(self.columns, row)))

    def markdown(self) -> str:
        heads = list(self.headers) if self.headers is not None else self.columns
        lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
        for r in self.rows:
            cells = [_cell(self.formats.get(c, text)(r.get(c))) for c in self.columns]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def csv(self) -> str:
        """Every column in order; None and missing fields are empty cells."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in self.columns})
        return buf.getvalue()

    def to_json(self) -> list[dict]:
        return [{c: r.get(c) for c in self.columns} for r in self.rows]

    @classmethod
    def pivot(cls, rows: Iterable[Mapping], *, row: str, col: str, value: str, row_keys: Sequence,
              col_keys: Sequence, corner: str, row_label: Callable[[Any], str] = str,
              col_label: Callable[[Any], str] = str, fmt: Callable[[Any], str] = text,
              fmt_for: Callable[[Any], Callable[[Any], str]] | None = None,
              where: Callable[[Mapping], bool] | None = None) -> "Table":
        """``rows`` (long form) as a grid: one line per ``row_keys`` entry, one column per ``col_keys``
        entry, each cell the ``value`` of the first matching row ("–" where none matches). ``fmt``
        formats a cell, or ``fmt_for(row_key)`` gives the format of a line."""
        cells: dict = {}
        for r in rows:
            if where is None or where(r):
                cells.setdefault((r.get(row), r.get(col)), r.get(value))
        names = [f"c{i}" for i in range(len(col_keys))]
        out = cls(columns=["key", *names], headers=[corner, *(col_label(c) for c in col_keys)],
                  formats={"key": str, **{n: str for n in names}})
        for rk in row_keys:
            f = fmt_for(rk) if fmt_for is not None else fmt
            out.add([row_label(rk), *(f(cells[rk, ck]) if (rk, ck) in cells else MISSING for ck in col_keys)])
        return out


def rows_csv(rows: Iterable[Mapping], columns: Sequence[str]) -> str:
    """Rows (dicts) as CSV text with ``columns`` in order (None and missing fields: empty)."""
    return Table(columns, list(rows)).csv()
