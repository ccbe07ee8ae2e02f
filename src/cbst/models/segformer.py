"""SegFormer (Xie et al., NeurIPS 2021): the MiT encoder with the all-MLP decoder, B0 ... B5.

Decoder: each of the four stages is embedded to E channels by a linear layer over its tokens
(E = 256 for B0/B1, 768 for B2-B5), up-sampled bilinearly to stride 4, concatenated (deepest stage
first, as in SegFormer), fused by a 1x1 conv + BN + ReLU, dropout 0.1 and a 1x1 classifier. Module
names follow mmsegmentation's ``SegFormerHead`` (``linear_c4.proj``, ``linear_fuse.conv``/``.bn``,
``linear_pred``). Output stride 4; inputs padded to a multiple of 32 (the encoder's deepest stride).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cbst.models.mit import DEFAULT_DROP_PATH, MitEncoder
from cbst.models.transformer import DROPOUT, ConvBNReLU, TransformerSegNet, resize_to


class MLPEmbedding(nn.Module):
    """A linear map of every position's channels (mmseg's ``MLP``: ``proj`` over the tokens), NCHW in/out."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, E, H, W)."""
        n, _, h, w = x.shape
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(n, -1, h, w)


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder over the four stage features, logits at the first stage's stride."""

    def __init__(self, channels: tuple[int, ...], embed_dim: int, num_classes: int) -> None:
        super().__init__()
        for i, c in enumerate(channels, start=1):
            setattr(self, f"linear_c{i}", MLPEmbedding(c, embed_dim))
        self.linear_fuse = ConvBNReLU(embed_dim * len(channels), embed_dim)
        self.dropout = nn.Dropout2d(DROPOUT)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Embed, up-sample to the finest map, concatenate deepest first, fuse, classify."""
        size = features[0].shape[-2:]
        embedded = [
            resize_to(getattr(self, f"linear_c{i}")(f), size) for i, f in enumerate(features, start=1)
        ]
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(embedded[::-1], dim=1))))


class MitSegNet(TransformerSegNet):
    """A MiT encoder with the decoder ``_decoder`` builds; subclasses fix the ``variant``."""

    variant: str = "mit_b0"
    output_stride = 4
    pad_multiple = 32

    def __init__(
        self,
        num_classes: int,
        *,
        freeze_bn: bool = False,
        drop_path_rate: float = DEFAULT_DROP_PATH,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__(freeze_bn)
        self.encoder = MitEncoder(self.variant, drop_path_rate=drop_path_rate)
        self.decoder = self._decoder(self.encoder.channels, num_classes)
        self._finish_init(grad_checkpointing)

    def _decoder(self, channels: Sequence[int], num_classes: int) -> nn.Module:
        """The family's decoder over the encoder's four feature levels."""
        raise NotImplementedError


class SegFormer(MitSegNet):
    """MiT encoder + all-MLP decoder; subclasses fix the ``variant`` and ``embed_dim``."""

    embed_dim: int = 256

    def _decoder(self, channels: Sequence[int], num_classes: int) -> nn.Module:
        return SegFormerHead(channels, self.embed_dim, num_classes)


class SegFormerB0(SegFormer):
    """SegFormer-B0: MiT-B0 (3.3 M parameters), decoder embedding 256."""

    variant, embed_dim = "mit_b0", 256


class SegFormerB1(SegFormer):
    """SegFormer-B1: MiT-B1, decoder embedding 256."""

    variant, embed_dim = "mit_b1", 256


class SegFormerB2(SegFormer):
    """SegFormer-B2: MiT-B2, decoder embedding 768."""

    variant, embed_dim = "mit_b2", 768


class SegFormerB3(SegFormer):
    """SegFormer-B3: MiT-B3, decoder embedding 768."""

    variant, embed_dim = "mit_b3", 768


class SegFormerB4(SegFormer):
    """SegFormer-B4: MiT-B4, decoder embedding 768."""

    variant, embed_dim = "mit_b4", 768


class SegFormerB5(SegFormer):
    """SegFormer-B5: MiT-B5 (82 M parameters), decoder embedding 768."""

    variant, embed_dim = "mit_b5", 768
