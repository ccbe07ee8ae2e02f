"""Compute the CBST-SP spatial prior from source labels, or convert the original's prior_array.mat.

The prior is counted on the labels of --dataset resized (nearest) to the target resolution --size,
smoothed with a Gaussian (--sigma, default 1/30 of the shorter side), floored (--eps) and scaled
so each class map peaks at 1; it is saved as a float32 C×H×W .npy (see cbst.priors).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from cbst import options
from cbst.config import RuntimeSection
from cbst.errors import CLIError
from cbst.options import NUMBER, TEXT, Size, class_counts, option
from cbst.registry import DATASETS

HELP = "compute (or convert) the class-wise spatial prior used by CBST-SP"


@options.declared
@dataclass
class PriorOptions:
    """The options of ``cbst prior``."""

    dataset: str | None = option(
        None,
        "source dataset whose labels are counted (needed unless --from-mat; default: none)",
        type=TEXT,
        choices=DATASETS.names,
    )
    data_root: str | None = option(
        None,
        "root folder of the dataset (needed unless --from-mat; default: none)",
        type=TEXT,
        metavar="DIR",
        path=True,
    )
    split: str = option("train", "dataset split")
    list_file: str | None = option(
        None,
        "list file selecting the images; default: the split's images",
        flags="--list",
        type=TEXT,
        metavar="FILE",
        path=True,
    )
    num_classes: int = option(19, "number of classes of the label protocol", choices=class_counts)
    size: tuple[int, int] = option(
        (2048, 1024),
        "target resolution of the prior, WIDTHxHEIGHT (the older HEIGHT,WIDTH is read too)",
        type=Size(comma_height_first=True),
    )
    sigma: float | None = option(
        None,
        "Gaussian standard deviation in pixels (default: shorter side / 30)",
        type=NUMBER,
        range="positive",
    )
    eps: float = option(1.0, "additive floor on the smoothed counts, in images", range="non_negative")
    from_mat: str | None = option(
        None,
        "convert the original's prior_array.mat instead of counting labels (default: none)",
        type=TEXT,
        metavar="MAT",
        path=True,
    )
    output: str = option(
        "prior.npy", "output .npy file", flags=("--output", "--out"), metavar="FILE", path=True
    )
    overwrite: bool = option(False, "replace an existing --output file")
    progress: bool = RuntimeSection.progress()


OPTIONS = PriorOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cbst prior``."""
    options.add_arguments(parser, OPTIONS)


def _hw(args: PriorOptions) -> tuple[int, int]:
    """The prior's (height, width)."""
    return args.size[1], args.size[0]


def _compute(args: PriorOptions) -> tuple[np.ndarray, tuple[str, ...]]:
    """Count the prior on the dataset's labels."""
    from cbst.datasets import build_dataset  # torch: only when the command runs, never for --help
    from cbst.priors import spatial_prior_from_dataset

    if not args.dataset or not args.data_root:
        raise CLIError("--dataset and --data-root are required unless --from-mat is given")
    dataset = build_dataset(
        args.dataset,
        args.data_root,
        split=args.split,
        num_classes=args.num_classes,
        list_file=args.list_file,
        progress=args.progress,
    )
    if len(dataset) == 0:
        raise CLIError(f"{args.data_root}: no labelled images in split {args.split!r}")
    prior = spatial_prior_from_dataset(
        dataset, _hw(args), sigma=args.sigma, eps=args.eps, progress=args.progress
    )
    return prior, dataset.protocol.class_names


def _convert(args: PriorOptions) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read the original's .mat prior (resized to --size if it differs)."""
    from cbst.labels import protocol_for  # torch: only when the command runs, never for --help
    from cbst.priors import load_prior

    return (
        load_prior(args.from_mat, args.num_classes, _hw(args)),
        protocol_for("cityscapes", args.num_classes).class_names,
    )


def _summary(prior: np.ndarray, names: tuple[str, ...]) -> str:
    """Per class: mean, min and the mean row of the prior mass (0 = top, 1 = bottom)."""
    rows = np.linspace(0.0, 1.0, prior.shape[1])
    lines = [f"{'class':<15} {'mean':>7} {'min':>9} {'centre row':>10}"]
    for name, q in zip(names, prior):
        profile = q.sum(axis=1)
        lines.append(
            f"{name:<15} {q.mean():7.4f} {q.min():9.2e} {float(rows @ profile / profile.sum()):10.3f}"
        )
    return "\n".join(lines)


def run(parsed: argparse.Namespace) -> int:
    """Compute or convert the prior, save it and print a per-class summary."""
    from cbst.io import check_output_file  # torch: only when the command runs, never for --help
    from cbst.priors import save_prior

    args = options.from_args(OPTIONS, parsed)
    options.check_ranges(args)
    check_output_file(args.output, overwrite=args.overwrite, option="--output", inputs=(args.from_mat,))
    prior, names = _convert(args) if args.from_mat else _compute(args)
    save_prior(args.output, prior)
    print(_summary(prior, names))
    print(f"wrote {args.output}: {prior.shape[0]}×{prior.shape[1]}×{prior.shape[2]} float32")
    return 0
