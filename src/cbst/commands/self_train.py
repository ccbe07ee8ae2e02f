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

from cbst.commands.options import add_runtime_arguments, add_sync_bn_argument, float_list, float_range
from cbst.datasets import DATASETS
from cbst.errors import CLIError
from cbst.online import OPTIMIZERS, OnlineConfig, online_self_train
from cbst.registry import SELECTION_POLICIES
from cbst.selftrain import SelfTrainConfig, self_train

MODES = ("rounds", "online")
MODE_DEFAULTS = ("base_lr", "weight_decay", "batch_images", "crop_size", "scale_rate_range")
"""Options whose default depends on --mode (argparse default None: the mode's config default)."""


def _mode_default(name: str) -> str:
    """'(rounds: X; online: Y)' for the help of an option in ``MODE_DEFAULTS``."""
    values = (
        SelfTrainConfig.__dataclass_fields__[name].default,
        OnlineConfig.__dataclass_fields__[name].default,
    )
    return f"(default rounds: {values[0]}; online: {values[1]})"


HELP = (
    "self-training rounds: ST (--kc-policy global), CBST (cb), CBST-SP (cb + --with-prior), "
    "CRST (+ --mr-weight-kld or --lr-weight-ent)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SelfTrainConfig.__dataclass_fields__
    p.add_argument(
        "--mode",
        choices=MODES,
        default="rounds",
        help="rounds: CBST's offline rounds; online: one run with a mean teacher labelling each target batch, "
        "ClassMix and rare class sampling (DACS/DAFormer), selected by --kc-policy",
    )
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
        "lr_decay",
    ):
        g.add_argument("--" + name.replace("_", "-"), type=float, default=d[name].default)
    g.add_argument("--base-lr", type=float, default=None, help="learning rate " + _mode_default("base_lr"))
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
        choices=SELECTION_POLICIES.names(),
        default=d["kc_policy"].default,
        help="cb = class-balanced thresholds (CBST); global = one threshold (ST); "
        "fixed = DAFormer's confidence-weighted labels (--mode online only)",
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
        "--batch-images",
        type=int,
        default=None,
        help="images per batch, over all processes under torchrun (online: source images, and as many "
        "target images) " + _mode_default("batch_images"),
    )
    add_sync_bn_argument(g)
    g.add_argument(
        "--crop-size",
        type=int,
        default=None,
        help="rounded up to a multiple of 8 " + _mode_default("crop_size"),
    )
    g.add_argument(
        "--scale-rate-range",
        type=float_range,
        default=None,
        help="LO,HI " + _mode_default("scale_rate_range"),
    )
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
    g.add_argument("--weight-decay", type=float, default=None, help=_mode_default("weight_decay"))
    _add_online_arguments(p)
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
    add_runtime_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last finished stage")


def _add_online_arguments(p: argparse.ArgumentParser) -> None:
    """The options of --mode online (DAFormer's defaults; docs/method.md §14)."""
    d = OnlineConfig.__dataclass_fields__
    g = p.add_argument_group("online mode (--mode online)")
    g.add_argument("--max-iters", type=int, default=d["max_iters"].default, help="training iterations")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d["optimizer"].default)
    g.add_argument("--warmup-iters", type=int, default=d["warmup_iters"].default, help="linear lr warm-up")
    g.add_argument("--lr-power", type=float, default=d["lr_power"].default, help="polynomial lr decay power")
    g.add_argument(
        "--ema-alpha",
        type=float,
        default=d["ema_alpha"].default,
        help="the mean teacher's maximum EMA weight",
    )
    g.add_argument(
        "--pseudo-threshold",
        type=float,
        default=d["pseudo_threshold"].default,
        help="fixed: the confidence counted as confident in each image's pseudo-label weight",
    )
    g.add_argument(
        "--pseudo-ignore-top",
        type=int,
        default=0,
        help="fixed: crop rows from the top with pseudo-label weight 0",
    )
    g.add_argument(
        "--pseudo-ignore-bottom", type=int, default=0, help="fixed: crop rows from the bottom with weight 0"
    )
    g.add_argument(
        "--tgt-port",
        type=float,
        default=d["tgt_port"].default,
        help="cb/global: the portion of the (class's) target pixels kept, over the recent batches",
    )
    g.add_argument(
        "--cb-window",
        type=int,
        default=d["cb_window"].default,
        help="cb/global: the iterations whose confidence histograms set the thresholds",
    )
    g.add_argument(
        "--rcs-temperature",
        type=float,
        default=d["rcs_temperature"].default,
        help="rare class sampling temperature T (0 = uniform source images)",
    )
    g.add_argument(
        "--rcs-min-pixels",
        type=int,
        default=d["rcs_min_pixels"].default,
        help="rare class sampling: an image counts as holding a class above this many pixels",
    )
    g.add_argument(
        "--eval-interval", type=int, default=d["eval_interval"].default, help="iterations between evaluations"
    )
    g.add_argument(
        "--log-interval",
        type=int,
        default=d["log_interval"].default,
        help="iterations between log.jsonl records",
    )
    g.add_argument(
        "--checkpoint-interval",
        type=int,
        default=d["checkpoint_interval"].default,
        help="iterations between resumable checkpoints",
    )


ROUNDS_ONLY = ("with_prior", "mr_weight_kld", "mr_weight_src", "lr_weight_ent")
"""Options the online mode has no form of yet: given with --mode online they are an error."""


def _reject_rounds_only(args: argparse.Namespace) -> None:
    """Refuse a rounds-only option set with --mode online rather than ignore it."""
    for name in ROUNDS_ONLY:
        value = getattr(args, name, None)
        if value not in (None, 0, 0.0) and str(value).lower() not in ("false", "none", ""):
            raise CLIError(f"--{name.replace('_', '-')} works with --mode rounds only")


def config_from_args(args: argparse.Namespace) -> SelfTrainConfig | OnlineConfig:
    """The run configuration of ``--mode`` from parsed flags."""
    kind = OnlineConfig if getattr(args, "mode", "rounds") == "online" else SelfTrainConfig
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(kind)
        if hasattr(args, f.name) and not (f.name in MODE_DEFAULTS and getattr(args, f.name) is None)
    }
    if kind is OnlineConfig:
        _reject_rounds_only(args)
    elif str(values.get("with_prior")).lower() in ("false", "none", ""):
        values["with_prior"] = None
    if str(values.get("eval_split")).lower() == "none":
        values["eval_split"] = None
    return kind(**values)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if isinstance(config, OnlineConfig):
        results = online_self_train(config)
        for iteration, metrics in results["iterations"].items():
            print(f"iteration {iteration}: mIoU {100 * metrics['miou']:.1f}")
        return 0
    results = self_train(config)
    for index, metrics in results.items():
        print(f"round {index}: mIoU {100 * metrics['miou']:.1f}")
    print(f"to see the rounds on one page: cbst report {args.output}")
    return 0
