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
import dataclasses
import json
from pathlib import Path

from cbst.commands.options import (
    add_loggers_argument,
    add_runtime_arguments,
    add_sync_bn_argument,
    float_list,
    float_range,
    name_list,
)
from cbst.datasets import DATASETS
from cbst.selftrain import SelfTrainConfig, self_train
from cbst.thresholds import POLICIES

HELP = (
    "self-training rounds: ST (--kc-policy global), CBST (cb), CBST-SP (cb + --with-prior), "
    "CRST (+ --mr-weight-kld or --lr-weight-ent)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SelfTrainConfig.__dataclass_fields__
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d["dataset"].default, help="source dataset")
    g.add_argument("--data-root", required=True, help="source dataset root, in its own layout")
    g.add_argument("--split", default="train", help="source split")
    g.add_argument("--list", dest="list_file", help="source list file (image [TAB label] per line)")
    g.add_argument("--dataset-tgt", choices=DATASETS, default="cityscapes", help="target dataset")
    g.add_argument("--data-root-tgt", required=True, help="target dataset root")
    g.add_argument("--split-tgt", default="train", help="target split to pseudo-label")
    g.add_argument("--list-tgt", help="target list file, e.g. the original's 505-image train.lst")
    g.add_argument(
        "--eval-split", default="val", help="target split evaluated after every round ('none' to skip)"
    )
    g.add_argument("--num-classes", type=int, choices=(19, 16), default=19)
    g.add_argument("--weights", required=True, help="source model: a cbst checkpoint (see cbst convert)")
    g.add_argument("--output", required=True, help="run folder (config, state, rounds)")
    g = p.add_argument_group("round schedule (solve_AO.py flags and defaults)")
    for name in ("num_round", "epoch_per_round"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=d[name].default)
    for name in (
        "init_tgt_port",
        "step_tgt_port",
        "max_tgt_port",
        "init_src_port",
        "step_src_port",
        "max_src_port",
        "base_lr",
        "lr_decay",
    ):
        g.add_argument("--" + name.replace("_", "-"), type=float, default=d[name].default)
    g.add_argument(
        "--source-sample-policy",
        choices=("cumulative", "random"),
        default="cumulative",
        help="cumulative: nested source subsets (constant seed); random: a new draw each round",
    )
    g.add_argument("--seed", "--seed-int", dest="seed", type=int, default=0)
    g = p.add_argument_group("pseudo-labels")
    g.add_argument(
        "--kc-policy",
        choices=POLICIES,
        default=d["kc_policy"].default,
        help="cb = class-balanced thresholds (CBST); global = one threshold (ST)",
    )
    g.add_argument(
        "--with-prior",
        default=None,
        help="spatial prior for CBST-SP: a .npy from "
        "'cbst prior', the original's prior_array.mat, or 'source' to count it on the "
        "source labels now; 'False'/'none' for none",
    )
    g.add_argument(
        "--test-scales",
        type=int,
        default=None,
        help="longer side the target images are resized to for pseudo-labelling (1850 in the README)",
    )
    g.add_argument(
        "--pseudo-scales",
        type=float_list,
        default=(1.0,),
        help="scale factors (after --test-scales) whose probabilities are averaged, "
        "e.g. 0.75,1.0,1.25 (the original allowed one scale)",
    )
    g.add_argument(
        "--no-test-flipping",
        dest="test_flipping",
        action="store_false",
        help="do not average with the horizontally flipped image",
    )
    g.add_argument(
        "--exact-thresholds",
        action="store_true",
        help="exact thresholds (memory grows with pixels) instead of 65536-bin histograms",
    )
    g.add_argument("--pseudo-batch", type=int, default=1, help="images per inference batch")
    g.add_argument(
        "--score-pseudo-labels",
        action="store_true",
        help="log the pseudo-labels' accuracy against the target split's ground truth "
        "(oracle information, as the original's val-phase log; needs labels)",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--batch-images", type=int, default=2, help="images per batch, over all processes under torchrun"
    )
    add_sync_bn_argument(g)
    g.add_argument("--crop-size", type=int, default=500, help="rounded up to a multiple of 8")
    g.add_argument("--scale-rate-range", type=float_range, default=(0.7, 1.3))
    g.add_argument("--origin-size", type=int, default=None, help="source reference long side")
    g.add_argument("--origin-size-tgt", type=int, default=None, help="target reference long side")
    g.add_argument("--mine-port", type=float, default=0.5, help="probability of a rare-class crop (0 = off)")
    g.add_argument("--mine-id-number", type=int, default=3, help="number of rarest classes to mine")
    g.add_argument(
        "--mine-thresh",
        type=float,
        default=0.001,
        help="classes with a predicted share below this are mined first",
    )
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g = p.add_argument_group("CRST regularisers (Zou et al., ICCV 2019; both may be combined)")
    g.add_argument(
        "--mr-weight-kld",
        type=float,
        default=0.0,
        metavar="W",
        help="MRKLD: add W times KL(uniform || prediction) on the pseudo-labelled target pixels "
        "(the authors' scripts: 0.1; their code applied W squared); 0 = off",
    )
    g.add_argument(
        "--mr-weight-src",
        type=float,
        default=0.0,
        metavar="W",
        help="MRKLD's weight on the labelled source pixels (default 0)",
    )
    g.add_argument(
        "--lr-weight-ent",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="LRENT: soft pseudo-labels q ∝ (p/λ)^(1/ALPHA) with an entropy-based selection, "
        "derived from the round's cached probabilities (the authors' scripts: 0.25); 0 = off",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-long-side", type=int, default=None, help="resize val images to this longer side")
    g.add_argument("--eval-flipping", action="store_true", help="flip-averaged evaluation")
    g.add_argument(
        "--no-source-eval",
        dest="source_eval",
        action="store_false",
        help="do not score --weights on the evaluation split before round 0 (the Source row)",
    )
    g = p.add_argument_group("outputs and logs")
    g.add_argument(
        "--save-color",
        action="store_true",
        help="also write colour pseudo-label PNGs (round_N/pseudo_color/) for viewing",
    )
    add_loggers_argument(g)
    g.add_argument(
        "--tensorboard", action="store_true", help="write TensorBoard scalars to OUTPUT/tensorboard"
    )
    add_runtime_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last finished stage")


def config_from_args(args: argparse.Namespace) -> SelfTrainConfig:
    """The run configuration from parsed flags."""
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(SelfTrainConfig) if hasattr(args, f.name)
    }
    if str(values.get("with_prior")).lower() in ("false", "none", ""):
        values["with_prior"] = None
    if str(values.get("eval_split")).lower() == "none":
        values["eval_split"] = None
    if "loggers" in values:  # a comma list on the command line, a list in a --config file
        loggers = values["loggers"]
        values["loggers"] = name_list(",".join(loggers) if isinstance(loggers, (list, tuple)) else loggers)
    return SelfTrainConfig(**values)


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

    config = config_from_args(args)
    self_train(config)
    table = results_table(config.output) if distributed.is_main() else None  # it alone writes it
    if table:
        print(table)
    print(f"to see the rounds on one page: cbst report {args.output}")
    return 0
