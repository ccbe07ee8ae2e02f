"""Write one self-contained HTML report of a self-training run, or of several side by side.

The page (plots and thumbnails embedded, no server, no JavaScript) shows each run's
configuration and stage times, the paper's table per round coloured by the change against the
source model, mIoU per round, per-class IoU as a heat map, per round the threshold λ and the
share of pseudo-labelled pixels per class, the pseudo-labels' accuracy when it was scored, and
a gallery of target images with their last pseudo-label, prediction and ground truth. An
online run (--mode online) is drawn over its iterations: mIoU, λ per class and the class shares
of the selected pixels, from its log.jsonl and evaluations.

A 'cbst demo' folder stands for its runs (rounds and online), with its Source row. Runs
compared together must evaluate on the same target val split. A run stopped part-way shows
the rounds it finished.

Runs that differ only in their seed form one row of mean ± std in the page's final-score
table; --table prints that table (one row per run or seed group) on stdout, to paste into a
paper.

Examples:
  cbst report cbst-demo                        # writes cbst-demo/report.html
  cbst report runs/gta2city_st runs/gta2city_cbst --source-metrics source.json --output cmp.html
  cbst report cbst-demo --table latex --no-html   # a 'cbst demo --seeds' folder too
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from cbst import options
from cbst.config import RuntimeSection
from cbst.errors import CLIError
from cbst.options import INTEGER, TEXT, Text, option

TABLE_FORMATS = ("csv", "latex", "md")
"""--table choices: the keys of ``cbst.report.tables.FORMATS`` (named here so that building the
parser imports no plotting or torch)."""

HELP = "an HTML report of self-training runs (mIoU per round, class shares, pseudo-labels, gallery)"


class _Folders(Text):
    """One or more run folders (a YAML list, or one name)."""

    def parse(self, value: object) -> list[str]:
        values = value if isinstance(value, (list, tuple)) else [value]
        return [super(_Folders, self).parse(v) for v in values]


@options.declared
@dataclass
class ReportOptions:
    """The options of ``cbst report``."""

    runs: list[str] = option(
        help="'cbst self-train' output folders and/or 'cbst demo' folders (also 'cbst demo --seeds' "
        "ones; a folder given twice is shown once)",
        type=_Folders(),
        metavar="RUN_DIR",
        positional=True,
        nargs="+",
    )
    output: str | None = option(
        None,
        "where to write the page (default: RUN_DIR/report.html for one folder, ./report.html for several)",
        flags=("--output", "--out"),
        type=TEXT,
        metavar="FILE.html",
        path=True,
    )
    overwrite: bool = option(False, "replace an existing --output file")
    images: int = option(6, "target images in the gallery (0 for none)", range="non_negative", metavar="N")
    val_images: int | None = option(
        None,
        "validation images in the validation gallery (0 for none; default: as many as --images)",
        type=INTEGER,
        range="non_negative",
        metavar="N",
    )
    source_metrics: str | None = option(
        None,
        "the source model's val metrics ('cbst evaluate --metrics'), the baseline of the colours "
        "and the first point of the mIoU plot (default: none)",
        type=TEXT,
        metavar="FILE.json",
        path=True,
    )
    table: str | None = option(
        None,
        "also print the final-score table (last round of each run, seed groups as "
        "mean ± std) on stdout as Markdown, CSV or LaTeX (default: none)",
        type=TEXT,
        choices=TABLE_FORMATS,
    )
    html: bool = option(True, "with --table: print the table only, write no page")
    device: str = RuntimeSection.device()


OPTIONS = ReportOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, OPTIONS)


def default_out(runs: list[str]) -> Path:
    """RUN_DIR/report.html for a single folder, report.html here for several."""
    return Path(runs[0]) / "report.html" if len(runs) == 1 else Path("report.html")


def run(args: argparse.Namespace) -> int:
    from cbst.io import check_output_file
    from cbst.report import final_scores, write_report  # torch: only when the command runs
    from cbst.report.tables import FORMATS

    o = options.from_args(OPTIONS, args)
    val_images = o.images if o.val_images is None else o.val_images
    for flag, value in (("--images", o.images), ("--val-images", val_images)):
        if value < 0:
            raise CLIError(f"{flag} must be 0 or more, got {value}")
    if not o.html and o.table is None:
        raise CLIError("--no-html needs --table (otherwise there is nothing to write)")
    if o.table is not None:
        print(FORMATS[o.table](final_scores(o.runs, o.source_metrics)), end="")
    if o.html:
        out = Path(o.output) if o.output else default_out(o.runs)
        check_output_file(
            out,
            overwrite=o.overwrite,
            option="--output",
            inputs=(o.source_metrics,),
            replaceable=(default_out(o.runs[:1]).name,),
        )
        write_report(
            o.runs,
            out,
            images=o.images,
            val_images=val_images,
            source_metrics=o.source_metrics,
            device=o.device,
        )
        # with --table, stdout holds the table alone (pipe it to a file)
        print(f"report: {out}", file=sys.stderr if o.table else sys.stdout)
    return 0
