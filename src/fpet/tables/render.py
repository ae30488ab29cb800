"""A table as data (`Table`) and its Markdown, LaTeX and CSV renderings. Missing values stay empty cells."""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from fpet.tables.collect import Stat


@dataclass(frozen=True)
class Column:
    """A column: its header and how numbers in it are printed (`fmt`, a str.format pattern)."""

    name: str
    fmt: str = "{:.1f}"


@dataclass
class Table:
    """Rows of cells under `columns`; a cell is None (a gap), a str, a number or a `Stat` (mean +- std)."""

    name: str
    title: str
    columns: list[Column]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    paper_protocol: Optional[str] = None
    """What the `paper` rows' accuracy is, when not the FPET paper's protocol (fpet.tables.with_protocol)."""

    def column(self, name: str) -> list[Any]:
        """The cells of column `name`, top to bottom."""
        index = [c.name for c in self.columns].index(name)
        return [row[index] for row in self.rows]


def cell_text(value: Any, fmt: str, pm: str = " ± ") -> str:
    """The printed cell: '' for a gap, `fmt` for numbers, 'mean ± std' for a Stat with a std."""
    if value is None:
        return ""
    if isinstance(value, Stat):
        text = fmt.format(value.mean)
        return text if value.std is None else f"{text}{pm}{fmt.format(value.std).lstrip('+')}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt.format(value)
    return str(value)


def to_markdown(table: Table) -> str:
    """A titled GitHub-Markdown table followed by its notes."""
    lines = [f"### {table.title}", "", "| " + " | ".join(c.name for c in table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    for row in table.rows:
        lines.append("| " + " | ".join(cell_text(v, c.fmt) for v, c in zip(row, table.columns)) + " |")
    lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Text for LaTeX: special characters escaped, ± as $\\pm$, `code` as \\texttt{code}."""
    text = "".join(LATEX_ESCAPES.get(ch, ch) for ch in text).replace("±", r"$\pm$").replace("Δ", r"$\Delta$")
    return re.sub(r"`([^`]*)`", r"\\texttt{\1}", text)


def to_latex(table: Table) -> str:
    """A booktabs `table` environment; the caption carries the title and the notes."""
    spec = "ll" + "r" * (len(table.columns) - 2)
    body = [" & ".join(latex_escape(c.name) for c in table.columns) + r" \\", r"\midrule"]
    for row in table.rows:
        body.append(" & ".join(latex_escape(cell_text(v, c.fmt)) for v, c in zip(row, table.columns)) + r" \\")
    caption = latex_escape(". ".join(n.rstrip(".") for n in [table.title, *table.notes]) + ".")
    return "\n".join([r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                      *body, r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}",
                      rf"\label{{tab:{table.name}}}", r"\end{table}"]) + "\n"


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, Stat):
        return round(value.mean, 6)
    if isinstance(value, float):
        return round(value, 6)
    return value


def to_csv(table: Table) -> str:
    """Raw numbers (no rounding to the printed digits); a Stat column gets a `<name> std` column after it."""
    with_std = [any(isinstance(v, Stat) and v.std is not None for v in table.column(c.name)) for c in table.columns]
    header: list[str] = []
    for column, std in zip(table.columns, with_std):
        header += [column.name, f"{column.name} std"] if std else [column.name]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        cells: list[Any] = []
        for value, std in zip(row, with_std):
            cells.append(_csv_value(value))
            if std:
                cells.append(_csv_value(value.std) if isinstance(value, Stat) and value.std is not None else "")
        writer.writerow(cells)
    return out.getvalue()

