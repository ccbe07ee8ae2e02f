"""Compute the CBST-SP spatial prior from source labels, or convert the original's prior_array.mat.

The prior is counted on the labels of --dataset resized (nearest) to the target resolution --size,
smoothed with a Gaussian (--sigma, default 1/30 of the shorter side), floored (--eps) and scaled
so each class map peaks at 1; it is saved as a float32 C×H×W .npy (see cbst.priors).
"""

from __future__ import annotations

import argparse

import numpy as np

from cbst.cli import CLIError
from cbst.commands.options import add_runtime_arguments
from cbst.datasets import DATASETS

HELP = "compute (or convert) the class-wise spatial prior used by CBST-SP"


def _size(text: str) -> tuple[int, int]:
    """Parse 'H,W' into a pair of positive ints."""
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 1024,2048), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cbst prior``."""
    parser.add_argument("--dataset", choices=DATASETS, help="source dataset whose labels are counted")
    parser.add_argument("--data-root", help="root folder of the dataset")
    parser.add_argument("--split", default="train", help="dataset split")
    parser.add_argument("--list", dest="list_file", help="list file selecting the images")
    parser.add_argument("--num-classes", type=int, default=19, choices=(19, 16))
    parser.add_argument("--size", type=_size, default=(1024, 2048), help="target resolution H,W of the prior")
    parser.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="Gaussian standard deviation in pixels (default: shorter side / 30)",
    )
    parser.add_argument(
        "--eps", type=float, default=1.0, help="additive floor on the smoothed counts, in images"
    )
    parser.add_argument(
        "--from-mat", metavar="MAT", help="convert the original's prior_array.mat instead of counting labels"
    )
    parser.add_argument("--out", default="prior.npy", help="output .npy file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_runtime_arguments(parser, ("progress",))


def _compute(args: argparse.Namespace) -> tuple[np.ndarray, tuple[str, ...]]:
    """Count the prior on the dataset's labels."""
    from cbst.datasets import build_dataset
    from cbst.priors import spatial_prior_from_dataset

    if not args.dataset or not args.data_root:
        raise CLIError("--dataset and --data-root are required unless --from-mat is given")
    dataset = build_dataset(
        args.dataset, args.data_root, split=args.split, num_classes=args.num_classes, list_file=args.list_file
    )
    if len(dataset) == 0:
        raise CLIError(f"{args.data_root}: no labelled images in split {args.split!r}")
    prior = spatial_prior_from_dataset(
        dataset, args.size, sigma=args.sigma, eps=args.eps, progress=args.progress
    )
    return prior, dataset.protocol.class_names


def _convert(args: argparse.Namespace) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read the original's .mat prior (resized to --size if it differs)."""
    from cbst.labels import protocol_for
    from cbst.priors import load_prior

    return (
        load_prior(args.from_mat, args.num_classes, args.size),
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


def run(args: argparse.Namespace) -> int:
    """Compute or convert the prior, save it and print a per-class summary."""
    from cbst.io import check_output_file
    from cbst.priors import save_prior

    check_output_file(args.out, overwrite=args.overwrite, inputs=(args.from_mat,))
    prior, names = _convert(args) if args.from_mat else _compute(args)
    save_prior(args.out, prior)
    print(_summary(prior, names))
    print(f"wrote {args.out}: {prior.shape[0]}×{prior.shape[1]}×{prior.shape[2]} float32")
    return 0
