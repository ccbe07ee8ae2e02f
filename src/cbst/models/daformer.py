"""DAFormer (Hoyer et al., CVPR 2022): the MiT encoder with the context-aware fusion decoder.

Decoder (``DAFormerHead`` with the ``daformer_sepaspp_mitb5`` config): each encoder stage is embedded
to 256 channels by a linear layer over its tokens (``embed_layers.{0..3}.proj``), up-sampled
bilinearly to stride 4 and concatenated in stage order (1,024 channels); the fusion is an ASPP
without image pooling whose branches are a 1x1 conv (dilation 1) and depthwise-separable 3x3 convs
at dilations 6, 12 and 18 (depthwise conv + BN + ReLU, pointwise conv + BN + ReLU), each to 256
channels (``fuse_layer.aspp_modules.{0..3}``); the branches are concatenated and fused by a 3x3
conv + BN + ReLU (``fuse_layer.bottleneck``); then dropout 0.1 and the 1x1 classifier (``conv_seg``).
The module names equal those of DAFormer's mmsegmentation code, so its released checkpoints
(``decode_head.*``) load strictly. Output stride 4; inputs padded to a multiple of 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cbst.models.segformer import MitSegNet, MLPEmbedding
from cbst.models.transformer import DROPOUT, ConvBNReLU, resize_to

EMBED_DIM = 256
ASPP_DILATIONS: tuple[int, ...] = (1, 6, 12, 18)


class SeparableConvBNReLU(nn.Module):
    """mmcv's ``DepthwiseSeparableConvModule``: depthwise 3x3 (dilated) then pointwise 1x1, each + BN + ReLU."""

    def __init__(self, inp: int, out: int, dilation: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(inp, inp, 3, dilation=dilation, groups=inp)
        self.pointwise_conv = ConvBNReLU(inp, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """pointwise(depthwise(x))."""
        return self.pointwise_conv(self.depthwise_conv(x))


class SeparableASPP(nn.Module):
    """ASPP without image pooling: 1x1 for dilation 1, separable 3x3 otherwise, then a 3x3 bottleneck."""

    def __init__(self, inp: int, width: int, dilations: tuple[int, ...] = ASPP_DILATIONS) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(inp, width, 1) if d == 1 else SeparableConvBNReLU(inp, width, d) for d in dilations
        )
        self.bottleneck = ConvBNReLU(width * len(dilations), width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Branches concatenated, fused to ``width`` channels."""
        return self.bottleneck(torch.cat([branch(x) for branch in self.aspp_modules], dim=1))


class DAFormerHead(nn.Module):
    """Per-stage MLP embeddings at stride 4, fused by the separable ASPP, then the classifier."""

    def __init__(self, channels: tuple[int, ...], num_classes: int, embed_dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.embed_layers = nn.ModuleDict(
            {str(i): MLPEmbedding(c, embed_dim) for i, c in enumerate(channels)}
        )
        self.fuse_layer = SeparableASPP(embed_dim * len(channels), embed_dim)
        self.dropout = nn.Dropout2d(DROPOUT)
        self.conv_seg = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Embed each stage, up-sample to the finest map, concatenate in stage order, fuse, classify."""
        size = features[0].shape[-2:]
        embedded = [resize_to(self.embed_layers[str(i)](f), size) for i, f in enumerate(features)]
        return self.conv_seg(self.dropout(self.fuse_layer(torch.cat(embedded, dim=1))))


class DAFormer(MitSegNet):
    """MiT encoder + DAFormer's context-aware fusion decoder; subclasses fix the ``variant``."""

    variant: str = "mit_b5"

    def _decoder(self, channels: Sequence[int], num_classes: int) -> nn.Module:
        return DAFormerHead(channels, num_classes)


class DAFormerB0(DAFormer):
    """DAFormer's decoder on MiT-B0 (for CPUs and tests)."""

    variant = "mit_b0"


class DAFormerB5(DAFormer):
    """DAFormer as published: MiT-B5 encoder (85 M parameters with the decoder)."""

    variant = "mit_b5"
