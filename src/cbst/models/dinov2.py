"""DINOv2 ViT-S/B/L with patch 14 (timm) and a simple-feature-pyramid + FPN decoder.

Encoder: timm's ``vit_{small,base,large}_patch14_dinov2`` with ``dynamic_img_size=True`` (position
embeddings interpolated to any grid, so any input padded to a multiple of 14 works), built without
weights; its parameter names are timm's, so timm's ``model.safetensors`` loads as it is and the
official torch.hub files after dropping ``mask_token`` (:mod:`cbst.models.layouts`).

Decoder: a ViT has one resolution (stride 14) in every block, so we take four blocks evenly spaced
through the depth (timm's ``forward_intermediates``, with the final layer norm) and build a pyramid
from them as ViTDet does (Li et al., ECCV 2022): the earliest block up-sampled x2 by a transposed
conv (stride 7), the next kept at stride 14, the next two max-pooled to strides 28 and 56. An FPN
then projects every level to 256 channels, adds each coarser level into the next finer one,
smooths each with a 3x3 conv, and the four levels are up-sampled to stride 7, concatenated and fused
by a 3x3 conv before dropout and the 1x1 classifier. Why this decoder: early blocks carry the
spatial detail and late ones the semantics, as a CNN's stages do, so a pyramid over depth plus
top-down fusion gives the head multi-scale context like DAFormer's ASPP does, with plain convs only
(no deformable attention as in ViT-Adapter/Mask2Former), cheap next to the encoder, runnable on a
CPU, and loaded strictly. Output stride 7 (a finer label map than the patch grid); inputs padded
to a multiple of 14.
"""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cbst.models.transformer import DROPOUT, ConvBNReLU, TransformerSegNet, resize_to

PATCH = 14
DECODER_WIDTH = 256
PRETRAIN_IMG_SIZE = 518
"""DINOv2's pre-training resolution: a 37x37 position-embedding grid, as in the released files."""


def block_indices(depth: int, count: int = 4) -> tuple[int, ...]:
    """``count`` block indices evenly spaced through ``depth`` blocks, the last one included
    (12 blocks -> 2, 5, 8, 11; 24 -> 5, 11, 17, 23)."""
    return tuple(depth * (i + 1) // count - 1 for i in range(count))


class Dinov2Encoder(nn.Module):
    """A timm DINOv2 ViT returning four blocks' normalised patch features (NCHW, stride 14)."""

    weights_family = "dinov2"
    """The weights layouts (:mod:`cbst.models.layouts`) of this family fit it."""

    def __init__(self, timm_name: str, *, drop_path_rate: float, img_size: int) -> None:
        super().__init__()
        self.vit = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            img_size=img_size,
        )
        self.indices = block_indices(len(self.vit.blocks))
        self.channels = self.vit.embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's own block-wise checkpointing."""
        self.vit.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Four intermediate blocks (final norm applied), each (N, C, H/14, W/14)."""
        return self.vit.forward_intermediates(
            x, indices=list(self.indices), norm=True, output_fmt="NCHW", intermediates_only=True
        )


class PyramidFPNHead(nn.Module):
    """Simple feature pyramid over four same-stride maps (x2, x1, /2, /4), FPN fusion, classifier."""

    def __init__(self, channels: int, num_classes: int, width: int = DECODER_WIDTH) -> None:
        super().__init__()
        self.rescale = nn.ModuleList(
            [
                nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, stride=2), nn.BatchNorm2d(channels)),
                nn.Identity(),
                nn.MaxPool2d(2, ceil_mode=True),
                nn.MaxPool2d(4, ceil_mode=True),
            ]
        )
        self.lateral = nn.ModuleList(ConvBNReLU(channels, width, 1) for _ in range(4))
        self.smooth = nn.ModuleList(ConvBNReLU(width, width, 3) for _ in range(4))
        self.fuse = ConvBNReLU(4 * width, width, 3)
        self.dropout = nn.Dropout2d(DROPOUT)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.grad_checkpointing = False

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits at twice the patch grid's resolution (stride 7)."""
        levels = [lat(scale(f)) for f, scale, lat in zip(features, self.rescale, self.lateral)]
        for i in range(len(levels) - 1, 0, -1):  # top-down: coarse semantics into finer maps
            levels[i - 1] = levels[i - 1] + resize_to(levels[i], levels[i - 1].shape[-2:])
        size = levels[0].shape[-2:]
        smoothed = [resize_to(smooth(level), size) for level, smooth in zip(levels, self.smooth)]
        return self.classifier(self.dropout(self._fuse(torch.cat(smoothed, dim=1))))

    def _fuse(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-7 fusion conv, the decoder's largest activation: recomputed when checkpointing."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.fuse, x, use_reentrant=False)
        return self.fuse(x)


class Dinov2Seg(TransformerSegNet):
    """DINOv2 ViT encoder + pyramid/FPN decoder; subclasses fix the timm model."""

    timm_name: str = "vit_small_patch14_dinov2"
    output_stride = PATCH // 2
    pad_multiple = PATCH
    no_decay_names = frozenset({"pos_embed", "cls_token", "reg_token"})

    def __init__(
        self,
        num_classes: int,
        *,
        freeze_bn: bool = False,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        img_size: int = PRETRAIN_IMG_SIZE,
    ) -> None:
        """``img_size`` sets the stored position-embedding grid (``img_size / 14`` per side), which must
        match the weights file's; inputs of any size are interpolated to it at run time."""
        super().__init__(freeze_bn)
        self.encoder = Dinov2Encoder(self.timm_name, drop_path_rate=drop_path_rate, img_size=img_size)
        self.decoder = PyramidFPNHead(self.encoder.channels, num_classes)
        self._finish_init(grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the ViT's blocks and the decoder's stride-7 fusion."""
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable


class Dinov2S14(Dinov2Seg):
    """DINOv2 ViT-S/14 (21 M encoder parameters)."""

    timm_name = "vit_small_patch14_dinov2"


class Dinov2B14(Dinov2Seg):
    """DINOv2 ViT-B/14 (86 M encoder parameters)."""

    timm_name = "vit_base_patch14_dinov2"


class Dinov2L14(Dinov2Seg):
    """DINOv2 ViT-L/14 (304 M encoder parameters)."""

    timm_name = "vit_large_patch14_dinov2"
