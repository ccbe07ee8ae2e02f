"""Train a segmentation network on labelled source images (GTA5 or SYNTHIA), the model that
self-training starts from (the original's issegm/train_src.py).

Each image gives one crop: scaled by rho ~ U[scale-rate-range] (against --origin-size when given),
cropped to --crop-size, flipped with probability 1/2. SGD with the model's per-parameter lr/wd
multipliers; the loss is mean cross-entropy over labelled pixels of the logits up-sampled to the
crop. After every epoch OUT/checkpoints/epoch_NNNN.pt, OUT/last.pt and one line of OUT/log.jsonl
are written; --resume continues from the last finished epoch and ends with the same weights as an
uninterrupted run with the same --seed. The original's settings are in configs/*_source_*.yaml.
"""

from __future__ import annotations

import argparse

from cbst import options
from cbst.config import SourceTrainConfig

HELP = "train a segmentation network on labelled source images (GTA5/SYNTHIA)"
OPTIONS = SourceTrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cbst train-source``, as ``SourceTrainConfig`` declares them."""
    options.add_arguments(parser, OPTIONS)


def run(args: argparse.Namespace) -> int:
    """Build the configuration from the flags and train."""
    from cbst.sourcetrain import train_source  # torch: loaded to run, not for --help

    config = options.from_args(OPTIONS, args)
    last = train_source(config)
    print(f"trained {config.model} on {config.dataset}: {last}")
    return 0
