"""Convert foreign weights into a cbst checkpoint (weights plus the metadata to rebuild the model).

Inputs: an MXNet ``.params`` file for --arch resnet38 (a released CBST model such as
``gta_rna-a1_cls19_s8_ep-0000.params``, or with --imagenet the ImageNet classifier
``ilsvrc-cls_rna-a1_cls1000_ep-0001.params``, whose missing head gets He-normal weights), or a
PyTorch ``.pth``/``.pt`` bare state_dict (e.g. CRST's ``gta_src.pth`` for --arch
deeplabv2_resnet101, loaded strictly; with --imagenet a torchvision ResNet-101 file, all but
``fc.*``). Every name must match: missing, unexpected and mis-shaped tensors are listed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cbst.checkpoints import save_checkpoint
from cbst.cli import CLIError
from cbst.io import check_output_file
from cbst.labels import PROTOCOLS
from cbst.registry import ARCHITECTURES

HELP = "convert MXNet .params / PyTorch state_dict weights into a cbst checkpoint"
DEFAULT_PROTOCOL = {19: "cityscapes19", 16: "cityscapes16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cbst convert``."""
    parser.add_argument("input", metavar="INPUT", help=".params (MXNet) or .pth/.pt (state_dict) file")
    parser.add_argument(
        "--arch", required=True, choices=ARCHITECTURES.names(), help="network the weights belong to"
    )
    parser.add_argument("--num-classes", type=int, required=True, help="number of output classes")
    parser.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default=None,
        help="label protocol (default: cityscapes19 for 19 classes, cityscapes16 for 16)",
    )
    parser.add_argument("--out", required=True, metavar="MODEL.pt", help="checkpoint to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument(
        "--imagenet",
        action="store_true",
        help="INPUT is an ImageNet classifier: drop its FC and initialise the head",
    )


def _protocol(args: argparse.Namespace) -> str:
    """The protocol given, or the default for the class count, checked against it."""
    name = args.protocol or DEFAULT_PROTOCOL.get(args.num_classes)
    if name is None:
        raise CLIError(f"no default protocol for {args.num_classes} classes; pass --protocol")
    if PROTOCOLS[name].num_classes != args.num_classes:
        raise CLIError(f"protocol {name} has {PROTOCOLS[name].num_classes} classes, not {args.num_classes}")
    return name


def run(args: argparse.Namespace) -> int:
    """Convert INPUT and write the checkpoint."""
    path = Path(args.input)
    if not path.is_file():
        raise CLIError(f"{path}: file not found")
    check_output_file(args.out, overwrite=args.overwrite, inputs=(path,))
    protocol = _protocol(args)
    converted = ARCHITECTURES.get(args.arch).convert(path, args.num_classes, imagenet=args.imagenet)
    model = converted.model
    n_params = sum(p.numel() for p in model.parameters())
    save_checkpoint(
        args.out,
        model,
        arch=args.arch,
        num_classes=args.num_classes,
        protocol=protocol,
        extra={"converted_from": str(path), "imagenet_init": args.imagenet},
    )
    print(f"loaded {converted.tensors} tensors from {path}{converted.note}")
    print(f"wrote {args.out}: {args.arch}, {args.num_classes} classes ({protocol}), {n_params:,} parameters")
    return 0
