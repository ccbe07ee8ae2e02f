"""Train a segmentation network on labelled source images (GTA5 or SYNTHIA), the model that
self-training starts from (the original's issegm/train_src.py).

Each image gives one crop: scaled by rho ~ U[scale-rate-range] (against --origin-size when given),
cropped to --crop-size, flipped with probability 1/2. SGD with the model's per-parameter lr/wd
multipliers; the loss is mean cross-entropy over labelled pixels of the logits up-sampled to the
crop. After every epoch OUT/last.pt (weights and optimiser state) and one line of OUT/log.jsonl
are written, and every --save-interval epochs the weights alone as OUT/checkpoints/epoch_NNNN.pt,
of which the newest --keep-checkpoints stay; --resume continues from OUT/last.pt and ends with
the same weights as an uninterrupted run with the same --seed. The original's settings are in configs/*_source_*.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses

from cbst.cli import CLIError
from cbst.commands.options import (
    add_loggers_argument,
    add_runtime_arguments,
    add_sync_bn_argument,
    float_range,
    name_list,
)
from cbst.datasets import DATASETS
from cbst.models import ARCHS
from cbst.sourcetrain import SourceTrainConfig
from cbst.training import LR_POLICIES

HELP = "train a segmentation network on labelled source images (GTA5/SYNTHIA)"


def _int_list(text: str) -> tuple[int, ...]:
    """'10000,20000' -> (10000, 20000); empty -> ()."""
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated iterations, got {text!r}") from None


def _count_or_all(text: str) -> int | None:
    """'2' -> 2; 'all' -> None (keep every checkpoint)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of checkpoints or 'all', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cbst train-source``; defaults come from ``SourceTrainConfig``."""
    d = {f.name: f.default for f in dataclasses.fields(SourceTrainConfig)}
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="gta5", help="source dataset layout")
    data.add_argument("--data-root", help="dataset root directory (required)")
    data.add_argument("--split", default=d["split"], help="split whose images are trained on")
    data.add_argument(
        "--list", dest="list_file", metavar="FILE", help="image list overriding the split's default list"
    )
    data.add_argument(
        "--num-classes",
        type=int,
        choices=(19, 16),
        default=d["num_classes"],
        help="label protocol: 19 (GTA5/Cityscapes) or 16 (SYNTHIA)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=ARCHS, default=d["model"], help="network architecture")
    model.add_argument(
        "--weights",
        metavar="PATH",
        help="initialisation: ImageNet weights (.params/.pth, or 'imagenet' to "
        "use the architecture's default) or a cbst checkpoint (*.pt)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--batch-images",
        type=int,
        default=d["batch_images"],
        help="images per batch, over all processes under torchrun (the original: 16 over 4 GPUs)",
    )
    add_sync_bn_argument(optim)
    optim.add_argument(
        "--crop-size",
        type=int,
        default=d["crop_size"],
        help="square crop side; rounded up to a multiple of 8 (500 -> 504)",
    )
    optim.add_argument(
        "--scale-rate-range",
        type=float_range,
        default=d["scale_range"],
        metavar="LO,HI",
        help="range of the random scale factor rho",
    )
    optim.add_argument(
        "--origin-size",
        type=int,
        metavar="L",
        help="reference long side: images are scaled to rho*L on their long "
        "side (GTA5 1914, SYNTHIA 1280); unset: scale by rho itself",
    )
    optim.add_argument(
        "--lr-type",
        choices=LR_POLICIES,
        default=d["lr_type"],
        help="learning-rate policy over all --to-epoch epochs",
    )
    optim.add_argument("--base-lr", type=float, default=d["base_lr"], help="base learning rate")
    optim.add_argument(
        "--lr-steps",
        type=_int_list,
        default=(),
        metavar="IT,IT,...",
        help="iterations where --lr-type step multiplies the lr by 0.1",
    )
    optim.add_argument("--to-epoch", type=int, default=d["to_epoch"], help="number of epochs to train")
    optim.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="SGD weight decay")
    optim.add_argument("--momentum", type=float, default=d["momentum"], help="SGD momentum")
    optim.add_argument(
        "--seed", type=int, default=d["seed"], help="seed of the shuffle, crops, flips and dropout"
    )

    run = parser.add_argument_group("run")
    run.add_argument("--output", metavar="DIR", help="output directory (required)")
    run.add_argument(
        "--resume", action="store_true", help="continue from the last epoch checkpoint in --output"
    )
    run.add_argument("--tensorboard", action="store_true", help="write TensorBoard logs to OUT/tensorboard")
    add_loggers_argument(run)
    run.add_argument(
        "--keep-checkpoints",
        type=_count_or_all,
        default=d["keep_checkpoints"],
        metavar="N",
        help="weights-only epoch checkpoints kept in OUT/checkpoints, newest first ('all' for "
        "every one); OUT/last.pt, resumable, is always kept",
    )
    run.add_argument(
        "--save-interval",
        type=int,
        default=d["save_interval"],
        metavar="E",
        help="write a weights-only checkpoint every E epochs (and after the last one)",
    )

    add_runtime_arguments(parser)

    ev = parser.add_argument_group("evaluation after each epoch (optional)")
    ev.add_argument("--eval-dataset", choices=DATASETS, help="target dataset to report mIoU on")
    ev.add_argument("--eval-root", metavar="DIR", help="root of the evaluation dataset")
    ev.add_argument("--eval-split", default=d["eval_split"], help="evaluation split")
    ev.add_argument(
        "--eval-long-side",
        type=int,
        metavar="PX",
        help="resize evaluation images to this long side (default: native size)",
    )


def _as_list(value: object) -> list:
    """A YAML list or a parsed tuple as a list; a scalar becomes a one-element list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check(args: argparse.Namespace) -> None:
    """Reject missing required options; ``SourceTrainConfig.validate`` checks the values."""
    for flag in ("data_root", "output"):
        if not getattr(args, flag):
            raise CLIError(f"--{flag.replace('_', '-')} is required")


def run(args: argparse.Namespace) -> int:
    """Build the configuration from the flags and train."""
    from cbst.sourcetrain import train_source

    _check(args)
    try:
        scale_range = float_range(",".join(str(v) for v in _as_list(args.scale_rate_range)))
        lr_steps = _int_list(",".join(str(v) for v in _as_list(args.lr_steps)))
        keep = None if args.keep_checkpoints is None else _count_or_all(str(args.keep_checkpoints))
    except argparse.ArgumentTypeError as exc:
        raise CLIError(str(exc)) from None
    config = SourceTrainConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        output=args.output,
        split=args.split,
        list_file=args.list_file,
        num_classes=args.num_classes,
        model=args.model,
        weights=args.weights,
        batch_images=args.batch_images,
        crop_size=args.crop_size,
        scale_range=scale_range,
        origin_size=args.origin_size,
        lr_type=args.lr_type,
        base_lr=args.base_lr,
        lr_steps=lr_steps,
        to_epoch=args.to_epoch,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        seed=args.seed,
        device=args.device,
        num_workers=args.num_workers,
        amp=args.amp,
        progress=args.progress,
        resume=args.resume,
        eval_dataset=args.eval_dataset,
        eval_root=args.eval_root,
        eval_split=args.eval_split,
        eval_long_side=args.eval_long_side,
        tensorboard=args.tensorboard,
        loggers=name_list(",".join(str(v) for v in _as_list(args.loggers))),
        keep_checkpoints=keep,
        save_interval=args.save_interval,
        compile=args.compile,
        sync_bn=args.sync_bn,
    )
    last = train_source(config)
    print(f"trained {config.model} on {config.dataset}: {last}")
    return 0
