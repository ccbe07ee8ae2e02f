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
import time
from dataclasses import dataclass
from pathlib import Path

from cbst import options
from cbst.config import RuntimeSection
from cbst.errors import CLIError
from cbst.options import Size, option

HELP = "render the embedded synthetic GTA5->Cityscapes-like benchmark (no download needed)"


@options.declared
@dataclass
class MakeSyntheticOptions:
    """The options of ``cbst make-synthetic``."""

    output: str = option(
        help="output folder (created; must be empty or hold this same benchmark)",
        metavar="OUT",
        positional=True,
        path=True,
    )
    seed: int = option(0, "random seed of the whole set", flags=("--seed", "--seed-int"))
    num_source: int = option(
        400, "number of source (game, GTA5-layout) images", range="non_negative", metavar="N"
    )
    num_train: int = option(
        200, "number of target (camera, Cityscapes-layout) train images", range="non_negative", metavar="N"
    )
    num_val: int = option(100, "number of target val images", range="non_negative", metavar="N")
    size: tuple[int, int] = option((256, 128), "image size, WIDTHxHEIGHT", type=Size())
    progress: bool = RuntimeSection.progress()


OPTIONS = MakeSyntheticOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_arguments(parser, OPTIONS)


def run(args: argparse.Namespace) -> int:
    from cbst.synthetic import (  # the renderer: only when the command runs, never for --help
        SYNTHETIC_VERSION,
        SyntheticExistsError,
        frequency_table,
        make_synthetic,
    )

    o = options.from_args(OPTIONS, args)
    options.check_ranges(o)
    start = time.perf_counter()
    try:
        summary = make_synthetic(
            Path(o.output),
            o.seed,
            num_source=o.num_source,
            num_train=o.num_train,
            num_val=o.num_val,
            size=o.size,
            progress=o.progress,
        )
    except SyntheticExistsError as exc:
        raise CLIError(str(exc)) from None
    took = time.perf_counter() - start
    c = summary["counts"]
    w, h = summary["size"]
    print(f"synthetic benchmark v{SYNTHETIC_VERSION} (seed {summary['seed']}) in {o.output}")
    print(
        f"  size {w}x{h}; source {c['source']} images (gta5/), target train {c['train']} and "
        f"val {c['val']} images (cityscapes/)"
    )
    print(f"  took {took:.1f} s (rendering {summary.get('render_seconds', 0.0):.1f} s)")
    print("per-class pixel frequency:")
    print(frequency_table(summary))
    return 0
