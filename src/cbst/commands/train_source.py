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
import dataclasses

from cbst.cli import CLIError
from cbst.commands.options import add_runtime_arguments, add_sync_bn_argument, float_range
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
    model.add_argument(
        "--drop-path-rate",
        type=float,
        default=None,
        help="stochastic depth at the encoder's last block, for the transformers (default: the "
        "architecture's, 0.1 for MiT as in SegFormer/DAFormer, 0 for DINOv2)",
    )
    model.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute the encoder's blocks in the backward pass (transformers): less activation "
        "memory for larger crops or batches, about a third more time per step",
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
        compile=args.compile,
        sync_bn=args.sync_bn,
        drop_path_rate=args.drop_path_rate,
        grad_checkpointing=args.grad_checkpointing,
    )
    last = train_source(config)
    print(f"trained {config.model} on {config.dataset}: {last}")
    return 0
