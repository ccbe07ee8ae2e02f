"""Segmentation networks: DeepLab-v2 ResNet-101 (CRST), ResNet-38 A1 (CBST) and a small CPU model.

Every model takes a normalised float NCHW **RGB** batch, i.e. pixels scaled to [0, 1] then
``(x - input_mean) / input_std`` per channel (ImageNet statistics for the three here,
docs/method.md §10.3; both original codes feed RGB with these), and returns logits at its
``output_stride``. Each declares its geometry (``output_stride``, ``pad_multiple``) and
``lr_groups()`` (parameter groups with ``lr_mult``/``wd_mult`` in its family's convention); see
:class:`~cbst.models.base.SegmentationNet`. Architectures are looked up by name in
:data:`cbst.registry.ARCHITECTURES`, where a user's module adds its own.
"""

from __future__ import annotations

from pathlib import Path

from cbst.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegmentationNet,
    load_strict,
    read_state_dict,
    round_to_stride,
    unwrap,
)
from cbst.models.deeplabv2 import DeepLabV2
from cbst.models.resnet38 import ResNet38
from cbst.models.small import SmallSegNet
from cbst.registry import ARCHITECTURES


def build_model(
    name: str, num_classes: int, *, pretrained: str | Path | None = None, freeze_bn: bool | None = None
) -> SegmentationNet:
    """Build the architecture registered as ``name`` with ``num_classes`` outputs, optionally
    initialised from ``pretrained``.

    ``pretrained``: ``"imagenet"`` (DeepLab-v2: torchvision weights) or a file: a torchvision or
    CRST ``.pth`` for DeepLab-v2, an MXNet ``.params`` (ImageNet or full model) for ResNet-38, a
    bare state_dict for any model. ``freeze_bn=None`` takes the family default (frozen for the
    two published networks, trainable for ``small``).
    """
    cls = ARCHITECTURES.get(name)
    model = cls(num_classes, freeze_bn=cls.default_freeze_bn if freeze_bn is None else freeze_bn)
    if pretrained is not None:
        model.load_pretrained(pretrained)
    return model


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DeepLabV2",
    "ResNet38",
    "SegmentationNet",
    "SmallSegNet",
    "build_model",
    "load_strict",
    "read_state_dict",
    "round_to_stride",
    "unwrap",
]
