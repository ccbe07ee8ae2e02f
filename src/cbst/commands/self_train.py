"""Self-train a source model on unlabelled target images: ST, CBST, CBST-SP or CRST (solve_AO.py).

Each round pseudo-labels the target training images with class-wise (--kc-policy cb) or one
global (--kc-policy global, i.e. ST) confidence threshold that keeps the top --init-tgt-port
portion, optionally after multiplying by a spatial prior (--with-prior, i.e. CBST-SP), then
trains on those pseudo-labels plus a growing random subset of the source images. CRST's
regularisers (crst_seg.py) add a confidence penalty to the loss (--mr-weight-kld, MRKLD) or make
the pseudo-labels soft (--lr-weight-ent, LRENT). A killed run continues from its last finished
stage with --resume.

--mode online instead trains one run of --max-iters iterations in which a mean teacher labels
each target batch (DACS/DAFormer: ClassMix, rare class sampling), the pseudo-labels selected
by --kc-policy (fixed: DAFormer's confidence weight; cb/global: thresholds from the recent
batches). Its learning rate, weight decay, crop, scale range, optimiser and warm-up default to
DAFormer's values (see --help) wherever the command line and the config leave them unset.

Examples (the original README's GTA5 -> Cityscapes CBST-SP, and SYNTHIA -> Cityscapes CBST):
  cbst self-train --config configs/gta2city_cbst_sp.yaml --data-root GTA5 --data-root-tgt CITYSCAPES \\
      --weights gta_source.pt --output runs/gta2city_cbst_sp
  cbst self-train --config configs/syn2city_cbst.yaml --data-root SYNTHIA --data-root-tgt CITYSCAPES \\
      --weights synthia_source.pt --output runs/syn2city_cbst
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    """The run configuration from parsed flags, the unset mode-dependent options given the
    values of ``--mode``."""
    return options.from_args(OPTIONS, args).with_mode_defaults()


def results_table(output: str) -> str | None:
    """The run's Markdown table (Source row first, then every evaluated round) from results.json."""
    from cbst.evaluation import Metrics, format_table
    from cbst.provenance import describe

    results = json.loads((Path(output) / "results.json").read_text())
    rows = {"Source": results["source"]} if results.get("source") else {}
    rows.update({f"round_{i}": m for i, m in results["rounds"].items()})
    if not rows:
        return None
    metrics = {name: Metrics.from_json(m) for name, m in rows.items()}
    table = format_table(metrics, next(iter(metrics.values())).class_names)
    return f"{table}\n({describe(results['provenance'])})"


def run(args: argparse.Namespace) -> int:
    from cbst import distributed
    from cbst.selftrain import self_train  # torch: loaded to run, not for --help

    config = config_from_args(args)
    if config.mode == "online":
        from cbst.online import OnlineConfig, online_self_train  # torch, as above

        results = online_self_train(OnlineConfig.from_self_train(config))
        for iteration, metrics in results["iterations"].items():
            print(f"iteration {iteration}: mIoU {100 * metrics['miou']:.1f}")
        return 0
    self_train(config)
    table = results_table(config.output) if distributed.is_main() else None  # it alone writes it
    if table:
        print(table)
    print(f"to see the rounds on one page: cbst report {config.output}")
    return 0
