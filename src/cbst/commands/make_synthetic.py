"""Render the embedded synthetic benchmark: a small, fair miniature of GTA5 -> Cityscapes.

Writes a source domain ("game", GTA5 layout: OUT/gta5/images, OUT/gta5/labels as labelId palette
PNGs) and a target domain ("camera", Cityscapes layout: OUT/cityscapes/leftImg8bit and
gtFine/*_gtFine_labelIds.png, splits train and val) of procedurally drawn street scenes with all
19 Cityscapes classes, plus OUT/synthetic.json (version, seed, sizes, counts, per-class pixel
frequencies) and OUT/VERSION. The two domains differ in appearance and in layout statistics.
The output is byte-identical for the same --seed and generator version; an existing complete
benchmark with the same parameters is left as it is, and a non-empty OUT holding anything else is
refused. The default set takes well under a minute (about 20 s on 2 CPU cores). See docs/synthetic_benchmark.md.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from cbst.cli import CLIError

HELP = "render the embedded synthetic GTA5->Cityscapes-like benchmark (no download needed)"


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 256x128, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {n}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out", metavar="OUT", help="output folder (created; must be empty or hold this same benchmark)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the whole set")
    parser.add_argument(
        "--num-source",
        type=_count,
        default=400,
        metavar="N",
        help="number of source (game, GTA5-layout) images",
    )
    parser.add_argument(
        "--num-train",
        type=_count,
        default=200,
        metavar="N",
        help="number of target (camera, Cityscapes-layout) train images",
    )
    parser.add_argument(
        "--num-val", type=_count, default=100, metavar="N", help="number of target val images"
    )
    parser.add_argument(
        "--size", type=_size, default=(256, 128), metavar="WxH", help="image size, width x height"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from cbst.synthetic import SYNTHETIC_VERSION, SyntheticExistsError, frequency_table, make_synthetic

    size = args.size
    if isinstance(size, list) and len(size) == 2:  # from a YAML --config
        size = (int(size[0]), int(size[1]))
    if not isinstance(size, tuple):
        try:
            size = _size(str(size))
        except argparse.ArgumentTypeError as exc:
            raise CLIError(f"--size: {exc}") from None
    start = time.perf_counter()
    try:
        summary = make_synthetic(
            Path(args.out),
            args.seed,
            num_source=args.num_source,
            num_train=args.num_train,
            num_val=args.num_val,
            size=size,
            progress=not args.quiet,
        )
    except SyntheticExistsError as exc:
        raise CLIError(str(exc)) from None
    took = time.perf_counter() - start
    c = summary["counts"]
    w, h = summary["size"]
    print(f"synthetic benchmark v{SYNTHETIC_VERSION} (seed {summary['seed']}) in {args.out}")
    print(
        f"  size {w}x{h}; source {c['source']} images (gta5/), target train {c['train']} and "
        f"val {c['val']} images (cityscapes/)"
    )
    print(f"  took {took:.1f} s (rendering {summary.get('render_seconds', 0.0):.1f} s)")
    print("per-class pixel frequency:")
    print(frequency_table(summary))
    return 0
