"""Write one self-contained HTML report of a self-training run, or of several side by side.

The page (plots and thumbnails embedded, no server, no JavaScript) shows each run's
configuration and stage times, the paper's table per round coloured by the change against the
source model, mIoU per round, per-class IoU as a heat map, per round the threshold λ and the
share of pseudo-labelled pixels per class, the pseudo-labels' accuracy when it was scored, and
a gallery of target images with their last pseudo-label, prediction and ground truth.

A 'cbst demo' folder stands for its ST, CBST and CBST-SP runs, with its Source row. Runs
compared together must evaluate on the same target val split. A run stopped part-way shows
the rounds it finished.

Examples:
  cbst report cbst-demo                        # writes cbst-demo/report.html
  cbst report runs/gta2city_st runs/gta2city_cbst --source-metrics source.json --out cmp.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "an HTML report of self-training runs (mIoU per round, class shares, pseudo-labels, gallery)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="'cbst self-train' output folders and/or 'cbst demo' folders",
    )
    p.add_argument(
        "--out",
        metavar="FILE.html",
        default=None,
        help="where to write the page (default: RUN_DIR/report.html for one folder, "
        "./report.html for several)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
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


def default_out(runs: list[str]) -> Path:
    """RUN_DIR/report.html for a single folder, report.html here for several."""
    return Path(runs[0]) / "report.html" if len(runs) == 1 else Path("report.html")


def run(args: argparse.Namespace) -> int:
    from cbst.cli import CLIError
    from cbst.io import check_output_file
    from cbst.report import write_report

    if args.images < 0:
        raise CLIError(f"--images must be 0 or more, got {args.images}")
    out = Path(args.out) if args.out else default_out(args.runs)
    check_output_file(
        out,
        overwrite=args.overwrite,
        inputs=(args.source_metrics,),
        replaceable=(default_out(args.runs[:1]).name,),
    )
    write_report(args.runs, out, images=args.images, source_metrics=args.source_metrics, device=args.device)
    print(f"report: {out}")
    return 0
