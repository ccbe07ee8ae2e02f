"""Self-train a source model on unlabelled target images: ST, CBST, CBST-SP or CRST (solve_AO.py).

Each round pseudo-labels the target training images with class-wise (--kc-policy cb) or one
global (--kc-policy global, i.e. ST) confidence threshold that keeps the top --init-tgt-port
portion, optionally after multiplying by a spatial prior (--with-prior, i.e. CBST-SP), then
trains on those pseudo-labels plus a growing random subset of the source images. CRST's
regularisers (crst_seg.py) add a confidence penalty to the loss (--mr-weight-kld, MRKLD) or make
the pseudo-labels soft (--lr-weight-ent, LRENT). A killed run continues from its last finished
stage with --resume.

Examples (the original README's GTA5 -> Cityscapes CBST-SP, and SYNTHIA -> Cityscapes CBST):
  cbst self-train --config configs/gta2city_cbst_sp.yaml --data-root GTA5 --data-root-tgt CITYSCAPES \\
      --weights gta_source.pt --output runs/gta2city_cbst_sp
  cbst self-train --config configs/syn2city_cbst.yaml --data-root SYNTHIA --data-root-tgt CITYSCAPES \\
      --weights synthia_source.pt --output runs/syn2city_cbst
"""

from __future__ import annotations

import argparse

from cbst import options
from cbst.config import SelfTrainConfig

HELP = (
    "self-training rounds: ST (--kc-policy global), CBST (cb), CBST-SP (cb + --with-prior), "
    "CRST (+ --mr-weight-kld or --lr-weight-ent)"
)
OPTIONS = SelfTrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``cbst self-train``, as ``SelfTrainConfig`` declares them."""
    options.add_arguments(p, OPTIONS)


def config_from_args(args: argparse.Namespace) -> SelfTrainConfig:
    """The run configuration from parsed flags."""
    return options.from_args(OPTIONS, args)


def run(args: argparse.Namespace) -> int:
    from cbst.selftrain import self_train  # torch: loaded to run, not for --help

    config = config_from_args(args)
    results = self_train(config)
    for index, metrics in results.items():
        print(f"round {index}: mIoU {100 * metrics['miou']:.1f}")
    print(f"to see the rounds on one page: cbst report {config.output}")
    return 0
