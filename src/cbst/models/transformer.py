"""What the transformer families (SegFormer, DAFormer, DINOv2) share: encoder + decoder, padding, groups.

A :class:`TransformerSegNet` is an ``encoder`` (a module returning a list of feature maps) and a
``decoder`` (features -> logits at ``output_stride``). Its forward pads the input on the bottom and
right to a multiple of ``pad_multiple`` (what the encoder's patch grid needs) and crops the logits
back to ``ceil(size / output_stride)``, so any input size works and a caller that already pads
(inference, crops) gets exactly ``size / output_stride``. Parameter groups follow DAFormer's
convention: encoder x1 and decoder x10 learning rate, no weight decay on norms, biases, position
embeddings and tokens. Weights files of the field's layouts load through :mod:`cbst.models.layouts`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cbst.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Conversion,
    SegmentationNet,
    TrainingRecipe,
    lr_group,
)
from cbst.models.layouts import load_weights

DROPOUT = 0.1
"""Dropout (``Dropout2d``) before every decoder's classifier, as in SegFormer and DAFormer."""
DECODER_LR_MULT = 10.0
"""Learning-rate multiplier of the decoder (DAFormer: ``decode_head`` lr x10)."""
DAFORMER_RECIPE = TrainingRecipe(optimizer="adamw", base_lr=6e-5, weight_decay=0.01)
"""DAFormer's optimiser (lhoyer/DAFormer ``configs/_base_/schedules/adamw.py``), the transformer
families' recipe; ``configs/_base_/transformer_adamw.yaml`` sets the same (a test checks it)."""


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers."""
    return -(-a // b)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` (NCHW) zero-padded on the bottom and right to a multiple of ``multiple``."""
    h, w = x.shape[-2:]
    pad_h, pad_w = ceil_div(h, multiple) * multiple - h, ceil_div(w, multiple) * multiple - w
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def split_decay(module: nn.Module, no_decay_names: frozenset[str] = frozenset()) -> tuple[list, list]:
    """``module``'s parameters as (with weight decay, without): norms, biases, gammas and the
    named embeddings/tokens (``no_decay_names``, matched on the parameter's own name) go without."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        skip = param.ndim <= 1 or name.rsplit(".", 1)[-1] in no_decay_names
        (no_decay if skip else decay).append(param)
    return decay, no_decay


class ConvBNReLU(nn.Module):
    """Conv (no bias) + BN + ReLU, named as mmcv's ``ConvModule`` (``conv``, ``bn``)."""

    def __init__(self, inp: int, out: int, kernel: int = 1, *, dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        padding = dilation * (kernel - 1) // 2
        self.conv = nn.Conv2d(inp, out, kernel, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn(conv(x)))."""
        return self.activate(self.bn(self.conv(x)))


def resize_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) to ``size``; a no-op when already that size."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear")


class TransformerSegNet(SegmentationNet):
    """Base of the transformer families: ``encoder`` features -> ``decoder`` logits.

    Subclasses set ``output_stride``, ``pad_multiple``, build ``self.encoder``/``self.decoder``
    and name the encoder's embedding/token parameters in ``no_decay_names``.
    """

    output_stride: int = 4
    pad_multiple: int = 32
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD
    default_freeze_bn = False
    training_recipe = DAFORMER_RECIPE
    no_decay_names: frozenset[str] = frozenset()
    encoder: nn.Module
    decoder: nn.Module

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last feature level (MiT: stage 4 at stride 32; DINOv2: the last block)
        of the input padded to ``pad_multiple``."""
        return self.encoder(pad_to_multiple(x, self.pad_multiple))[-1]

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at ``1 / output_stride`` of the input, i.e. ``ceil(H / stride) x ceil(W / stride)``;
        with ``return_features`` also the encoder's last feature level."""
        h, w = x.shape[-2:]
        features = self.encoder(pad_to_multiple(x, self.pad_multiple))
        logits = self.decoder(features)
        logits = logits[..., : ceil_div(h, self.output_stride), : ceil_div(w, self.output_stride)]
        return (logits, features[-1]) if return_features else logits

    def _finish_init(self, grad_checkpointing: bool) -> None:
        """Apply the constructor's options once ``encoder``/``decoder`` exist: checkpointing, frozen BN."""
        self.set_grad_checkpointing(grad_checkpointing)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's blocks in the backward pass (less memory, ~30 % more time)."""
        self.encoder.set_grad_checkpointing(enable)

    def _lr_groups(self) -> list[dict]:
        """Encoder x1, decoder x10; norms, biases, position embeddings and tokens without decay."""
        enc_decay, enc_plain = split_decay(self.encoder, self.no_decay_names)
        dec_decay, dec_plain = split_decay(self.decoder)
        return [
            lr_group(enc_decay, 1.0, 1.0),
            lr_group(enc_plain, 1.0, 0.0),
            lr_group(dec_decay, DECODER_LR_MULT, 1.0),
            lr_group(dec_plain, DECODER_LR_MULT, 0.0),
        ]

    def load_pretrained(self, source: str | Path) -> None:
        """Load a weights file of any layout :mod:`cbst.models.layouts` recognises, strictly."""
        load_weights(self, Path(source))

    @classmethod
    def convert(
        cls, path: Path, num_classes: int, *, imagenet: bool = False, uda_model: str = "student"
    ) -> Conversion:
        """A network of ``num_classes`` outputs filled from a weights file of any layout
        :mod:`cbst.models.layouts` recognises (``cbst convert``), strictly.

        ``imagenet`` needs no special handling: ImageNet/DINOv2 encoder files are recognised by
        their keys and leave the decoder as initialised. ``uda_model`` chooses the student or
        the teacher of a UDA checkpoint.
        """
        model = cls(num_classes, freeze_bn=cls.default_freeze_bn)
        layout, tensors = load_weights(model, Path(path), uda_model=uda_model)
        return Conversion(model, tensors, f" ({layout} layout)")
