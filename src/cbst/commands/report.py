"""Write one self-contained HTML report of a self-training run, or of several side by side.

The page (plots and thumbnails embedded, no server, no JavaScript) shows each run's
configuration and stage times, the paper's table per round coloured by the change against the
source model, mIoU per round, per-class IoU as a heat map, per round the threshold λ and the
share of pseudo-labelled pixels per class, the pseudo-labels' accuracy when it was scored, and
a gallery of target images with their last pseudo-label, prediction and ground truth.

A 'cbst demo' folder stands for its ST, CBST and CBST-SP runs, with its Source row. Runs
compared together must evaluate on the same target val split. A run stopped part-way shows
the rounds it finished.

Runs that differ only in their seed form one row of mean ± std in the page's final-score
table; --table prints that table (one row per run or seed group) on stdout, to paste into a
paper.

Examples:
  cbst report cbst-demo                        # writes cbst-demo/report.html
  cbst report runs/gta2city_st runs/gta2city_cbst --source-metrics source.json --out cmp.html
  cbst report cbst-demo --table latex --no-html   # a 'cbst demo --seeds' folder too
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TABLE_FORMATS = ("csv", "latex", "md")
"""--table choices: the keys of ``cbst.report.tables.FORMATS`` (named here so that building the
parser imports no plotting or torch)."""

HELP = "an HTML report of self-training runs (mIoU per round, class shares, pseudo-labels, gallery)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="'cbst self-train' output folders and/or 'cbst demo' folders (also 'cbst demo --seeds' ones)",
    )
    p.add_argument(
        "--out",
        metavar="FILE.html",
        default=None,
        help="where to write the page (default: RUN_DIR/report.html for one folder, "
        "./report.html for several)",
    )
    p.add_argument(
        "--images", type=int, default=6, metavar="N", help="target images in the gallery (0 for none)"
    )
    p.add_argument(
        "--source-metrics",
        metavar="FILE.json",
        default=None,
        help="the source model's val metrics ('cbst evaluate --out'), the baseline of "
        "the colours and the first point of the mIoU plot",
    )
    p.add_argument(
        "--device", default="auto", help="where the gallery's predictions run: auto, cpu, cuda, mps"
    )
    p.add_argument(
        "--table",
        choices=TABLE_FORMATS,
        default=None,
        help="also print the final-score table (last round of each run, seed groups as "
        "mean ± std) on stdout as Markdown, CSV or LaTeX",
    )
    p.add_argument("--no-html", action="store_true", help="with --table: print the table only, write no page")


def default_out(runs: list[str]) -> Path:
    """RUN_DIR/report.html for a single folder, report.html here for several."""
    return Path(runs[0]) / "report.html" if len(runs) == 1 else Path("report.html")


def run(args: argparse.Namespace) -> int:
    from cbst.cli import CLIError
    from cbst.report import final_scores, write_report
    from cbst.report.tables import FORMATS

    if args.images < 0:
        raise CLIError(f"--images must be 0 or more, got {args.images}")
    if args.no_html and args.table is None:
        raise CLIError("--no-html needs --table (otherwise there is nothing to write)")
    if args.table is not None:
        print(FORMATS[args.table](final_scores(args.runs, args.source_metrics)), end="")
    if not args.no_html:
        out = Path(args.out) if args.out else default_out(args.runs)
        write_report(
            args.runs, out, images=args.images, source_metrics=args.source_metrics, device=args.device
        )
        # with --table, stdout holds the table alone (pipe it to a file)
        print(f"report: {out}", file=sys.stderr if args.table else sys.stdout)
    return 0
