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
import sys
from pathlib import Path

import numpy as np
import torch

from cbst.checkpoints import save_checkpoint
from cbst.cli import CLIError
from cbst.io import check_output_file
from cbst.labels import PROTOCOLS
from cbst.models import ARCHS, SegmentationNet, build_model, load_strict, read_state_dict
from cbst.models.layouts import layouts_fit, load_weights

HELP = "convert MXNet .params / PyTorch state_dict weights into a cbst checkpoint"
DEFAULT_PROTOCOL = {19: "cityscapes19", 16: "cityscapes16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cbst convert``."""
    parser.add_argument("input", metavar="INPUT", help=".params (MXNet) or .pth/.pt (state_dict) file")
    parser.add_argument("--arch", required=True, choices=ARCHS, help="network the weights belong to")
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
        "--uda-model",
        choices=("student", "teacher"),
        default="student",
        help="which network of a UDA checkpoint (DAFormer's model./ema_model.) to read (default: student)",
    )
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


def _load(args: argparse.Namespace, path: Path) -> tuple[SegmentationNet, int]:
    """Build the model and fill it from ``path``; returns (model, number of tensors read)."""
    if path.suffix == ".params":
        if args.arch != "resnet38":
            raise CLIError(f"{path}: MXNet .params files hold ResNet-38 weights; use --arch resnet38")
        from cbst.models.resnet38 import resnet38_state_dict_from_params
        from cbst.mxnet import load_params

        params = load_params(path)
        if not isinstance(params, dict):
            raise CLIError(f"{path}: an unnamed NDArray list; expected named arg:/aux: arrays")
        if not args.imagenet and any(k.endswith("linear1000_weight") for k in params):
            raise CLIError(f"{path}: holds the ImageNet classifier linear1000; add --imagenet")
        _warn_stored_gammas(path, params)
        state = resnet38_state_dict_from_params(
            params, args.num_classes, imagenet=args.imagenet, source=str(path)
        )
        with torch.device("meta"):  # every tensor comes from the file: skip the random init
            model = build_model(args.arch, args.num_classes)
        model.load_state_dict(state, assign=True)
        return model, len(params)
    if layouts_fit(args.arch):
        model = build_model(args.arch, args.num_classes)
        layout, tensors = load_weights(model, path, uda_model=args.uda_model)
        print(f"{path}: {layout} layout")
        return model, tensors
    state = read_state_dict(path)
    if args.imagenet and args.arch != "deeplabv2_resnet101":
        raise CLIError(
            "--imagenet with a PyTorch file is only for deeplabv2_resnet101 (torchvision ResNet-101)"
        )
    model = build_model(args.arch, args.num_classes)
    if args.imagenet:
        model.load_pretrained(path)
    else:
        load_strict(model, state, str(path))
    return model, len(state)


def _warn_stored_gammas(path: Path, params: dict[str, np.ndarray]) -> None:
    """Warn, naming the layers, when BN gammas differ from 1: the converted model ignores them.

    ResNet-38 A1 is built with ``fix_gamma=True``. MXNet's plain CPU and cuDNN kernels then use
    1 (cuDNN also writes 1 back, so released files hold 1), but its oneDNN CPU kernel applies the
    stored value, so such a file may have been meant either way.
    """
    layers = [
        name.split(":", 1)[-1][: -len("_gamma")]
        for name, value in params.items()
        if name.endswith("_gamma") and not np.all(value == 1)
    ]
    if layers:
        print(
            f"cbst convert: warning: {path}: batch-norm gamma != 1 in {len(layers)} layers "
            f"({', '.join(layers)}); ResNet-38 uses gamma = 1 (MXNet fix_gamma=True, as its CPU "
            "and cuDNN kernels do), so these values are ignored",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    """Convert INPUT and write the checkpoint."""
    path = Path(args.input)
    if not path.is_file():
        raise CLIError(f"{path}: file not found")
    check_output_file(args.out, overwrite=args.overwrite, inputs=(path,))
    protocol = _protocol(args)
    model, tensors = _load(args, path)
    n_params = sum(p.numel() for p in model.parameters())
    save_checkpoint(
        args.out,
        model,
        arch=args.arch,
        num_classes=args.num_classes,
        protocol=protocol,
        extra={"converted_from": str(path), "imagenet_init": args.imagenet},
    )
    head = (
        "; head (conv6a, classifier) initialised He-normal"
        if args.imagenet and args.arch == "resnet38"
        else ""
    )
    print(f"loaded {tensors} tensors from {path}{head}")
    print(f"wrote {args.out}: {args.arch}, {args.num_classes} classes ({protocol}), {n_params:,} parameters")
    return 0
