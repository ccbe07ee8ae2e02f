"""The final-score table (:mod:`cbst.report.seeds`) as Markdown, CSV or LaTeX, to paste into a paper.

Every format has the same rows and columns: Case, Round, Seeds, then mIoU (mIoU* for 16-class
runs) and one IoU per class, in percent with one decimal. A group of seed runs shows
``mean ± std`` (LaTeX: ``$mean \\pm std$``; CSV: a ``std`` column after each score); a value
some run leaves undefined is ``-`` (CSV: empty).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

from cbst.report.seeds import ResultRow, ResultTable, Score

LEAD_COLUMNS = ("Case", "Round", "Seeds")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def cell_text(score: Score, plus_minus: str = "±") -> str:
    """A score as the table prints it: ``24.3``, ``24.3 ± 2.2`` for a group, ``-`` if undefined."""
    if score.mean is None:
        return "-"
    return _pct(score.mean) if score.std is None else f"{_pct(score.mean)} {plus_minus} {_pct(score.std)}"


def lead_cells(row: ResultRow) -> list[str]:
    """The row's Case, Round and Seeds texts (seeds as ``0,1,2``; ``?`` for one not recorded)."""
    return [row.name, row.round, ",".join("?" if s is None else str(s) for s in row.seeds)]


def to_markdown(table: ResultTable) -> str:
    """A GitHub-flavoured Markdown table."""
    header = [*LEAD_COLUMNS, *table.columns]
    lines = [header, ["---"] * 3 + ["---:"] * len(table.columns)]
    lines += [lead_cells(r) + [cell_text(s) for s in r.scores] for r in table.rows]
    return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines) + "\n"


def to_csv(table: ResultTable) -> str:
    """CSV: the mean of each score, then its standard deviation (empty for a single run)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*LEAD_COLUMNS, *(f"{c}{suffix}" for c in table.columns for suffix in ("", " std"))])
    for row in table.rows:
        cells = []
        for s in row.scores:
            cells += ["" if s.mean is None else _pct(s.mean), "" if s.std is None else _pct(s.std)]
        writer.writerow(lead_cells(row) + cells)
    return buffer.getvalue()


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped, for text mode."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_cell(score: Score) -> str:
    text = cell_text(score, r"\pm")
    return f"${text}$" if score.std is not None else text


def to_latex(table: ResultTable) -> str:
    """A ``tabular`` environment (no packages needed): names left-aligned, scores right-aligned."""
    header = [*LEAD_COLUMNS, *table.columns]
    lines = [
        r"\begin{tabular}{" + "l" * len(LEAD_COLUMNS) + "r" * len(table.columns) + "}",
        r"\hline",
        " & ".join(latex_escape(h) for h in header) + r" \\",
        r"\hline",
    ]
    lines += [
        " & ".join([latex_escape(c) for c in lead_cells(r)] + [_latex_cell(s) for s in r.scores]) + r" \\"
        for r in table.rows
    ]
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


FORMATS: dict[str, Callable[[ResultTable], str]] = {"md": to_markdown, "csv": to_csv, "latex": to_latex}
"""``cbst report --table`` choices."""
