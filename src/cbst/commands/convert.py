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
from dataclasses import dataclass
from pathlib import Path

from cbst import options
from cbst.errors import CLIError
from cbst.options import INTEGER, TEXT, option
from cbst.registry import ARCHITECTURES

HELP = "convert MXNet .params / PyTorch state_dict weights into a cbst checkpoint"
DEFAULT_PROTOCOL = {19: "cityscapes19", 16: "cityscapes16"}
UDA_CHOICES = ("student", "teacher")
"""The networks of a UDA checkpoint ``--uda-model`` chooses between (``cbst.models.layouts``)."""


def _protocol_names() -> list[str]:
    from cbst.labels import PROTOCOLS  # the label tables: read when the parser is built

    return sorted(PROTOCOLS)


@options.declared
@dataclass
class ConvertOptions:
    """The options of ``cbst convert``."""

    input: str = option(
        help=".params (MXNet) or .pth/.pt (state_dict) file", metavar="INPUT", positional=True, path=True
    )
    arch: str = option(
        help="network the weights belong to", flags=("--arch", "--model"), choices=ARCHITECTURES.names
    )
    num_classes: int = option(help="number of output classes", type=INTEGER, range="positive")
    output: str = option(
        help="checkpoint to write", flags=("--output", "--out"), metavar="MODEL.pt", path=True
    )
    protocol: str | None = option(
        None,
        "label protocol (default: cityscapes19 for 19 classes, cityscapes16 for 16)",
        type=TEXT,
        choices=_protocol_names,
    )
    overwrite: bool = option(False, "replace an existing --output file")
    imagenet: bool = option(False, "INPUT is an ImageNet classifier: drop its FC and initialise the head")
    uda_model: str | None = option(
        None,
        "which network of a UDA checkpoint (DAFormer's model./ema_model.) to read, for the "
        "transformer architectures (default: student)",
        type=TEXT,
        choices=UDA_CHOICES,
    )
    verbose: bool = option(
        False, "when the weights do not fit --arch, list every differing key (default: the first few)"
    )


OPTIONS = ConvertOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cbst convert``."""
    options.add_arguments(parser, OPTIONS)


def _protocol(args: ConvertOptions) -> str:
    """The protocol given, or the default for the class count, checked against it."""
    from cbst.labels import PROTOCOLS

    name = args.protocol or DEFAULT_PROTOCOL.get(args.num_classes)
    if name is None:
        raise CLIError(f"no default protocol for {args.num_classes} classes; pass --protocol")
    if PROTOCOLS[name].num_classes != args.num_classes:
        raise CLIError(f"protocol {name} has {PROTOCOLS[name].num_classes} classes, not {args.num_classes}")
    return name


def run(parsed: argparse.Namespace) -> int:
    """Convert INPUT and write the checkpoint."""
    from cbst.checkpoints import save_checkpoint  # torch: only when the command runs
    from cbst.io import check_output_file
    from cbst.models.transformer import TransformerSegNet

    args = options.from_args(OPTIONS, parsed)
    path = Path(args.input)
    if not path.is_file():
        raise CLIError(f"{path}: file not found")
    check_output_file(args.output, overwrite=args.overwrite, option="--output", inputs=(path,))
    protocol = _protocol(args)
    cls = ARCHITECTURES.get(args.arch)
    if issubclass(cls, TransformerSegNet):
        extra = {"uda_model": args.uda_model or "student"}
    elif args.uda_model is not None:
        raise CLIError(f"--uda-model: only for the transformer architectures, not {args.arch}")
    else:  # --verbose: a does-not-fit error names every differing key, not the first few
        extra = {"limit": None} if args.verbose else {}
    converted = cls.convert(path, args.num_classes, imagenet=args.imagenet, **extra)
    model = converted.model
    n_params = sum(p.numel() for p in model.parameters())
    save_checkpoint(
        args.output,
        model,
        arch=args.arch,
        num_classes=args.num_classes,
        protocol=protocol,
        extra={"converted_from": str(path), "imagenet_init": args.imagenet},
    )
    print(f"loaded {converted.tensors} tensors from {path}{converted.note}")
    print(
        f"wrote {args.output}: {args.arch}, {args.num_classes} classes ({protocol}), {n_params:,} parameters"
    )
    return 0
