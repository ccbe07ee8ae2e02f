"""A small dilated residual network for CPU experiments (the embedded synthetic benchmark).

A reduced-width ResNet-18-style encoder: a two-conv stride-4 stem, basic residual blocks at
strides 4 and 8, then dilated blocks (2 and 4) that keep stride 8, and a light ASPP head (1x1 plus
3x3 dilation 2 and 4, concatenated, fused by a 1x1). BN everywhere and Kaiming init so it trains
fast from scratch; BN is trainable (batch statistics in training) unless ``freeze_bn``. About
2.7 M parameters.

``small_demo`` (:class:`SmallDemoNet`) is the same network with the two stride-8 blocks at 128
channels instead of 256: about 1.1 M parameters and 40 % of the FLOPs, the network of ``cbst demo``,
sized so that the whole demo trains in minutes on a CPU without native bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from cbst.models.base import SegmentationNet, lr_group

WIDTHS: tuple[int, int, int, int] = (32, 64, 128, 256)
ASPP_DILATIONS: tuple[int, ...] = (1, 2, 4)
ASPP_WIDTH = 64


def conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN + ReLU with 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(
            inp,
            out,
            kernel,
            stride=stride,
            padding=dilation * (kernel - 1) // 2,
            dilation=dilation,
            bias=False,
        ),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and a (projected when the shape changes) residual shortcut."""

    def __init__(self, inp: int, out: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(inp, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or inp != out
            else nn.Identity()
        )
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity: fast, stable from scratch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(x' + bn(conv(relu(bn(conv(x))))))."""
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class LightASPP(nn.Module):
    """Parallel 1x1 / dilated 3x3 conv-BN-ReLU branches, concatenated and fused by a 1x1."""

    def __init__(self, inp: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            conv_bn_relu(inp, width, 1 if d == 1 else 3, dilation=d) for d in ASPP_DILATIONS
        )
        self.fuse = conv_bn_relu(width * len(ASPP_DILATIONS), width, 1)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at the input's resolution."""
        return self.classifier(self.fuse(torch.cat([b(x) for b in self.branches], dim=1)))


class SmallSegNet(SegmentationNet):
    """Small dilated ResNet, output stride 8 (128x128 -> 16x16).

    ``widths`` (stem, stride 4, stride 8, dilated blocks) and ``aspp_width`` size the network;
    subclasses set them (:class:`SmallDemoNet`).
    """

    output_stride = 8
    pad_multiple = 8
    default_freeze_bn = False
    widths: tuple[int, int, int, int] = WIDTHS
    aspp_width: int = ASPP_WIDTH

    def __init__(self, num_classes: int, *, freeze_bn: bool = False) -> None:
        super().__init__(freeze_bn)
        c1, c2, c3, c4 = self.widths
        self.stem = nn.Sequential(conv_bn_relu(3, c1, stride=2), conv_bn_relu(c1, c1, stride=2))
        self.layer1 = BasicBlock(c1, c2, stride=2)
        self.layer2 = BasicBlock(c2, c3)
        self.layer3 = BasicBlock(c3, c4, dilation=2)
        self.layer4 = BasicBlock(c4, c4, dilation=4)
        self.head = LightASPP(c4, self.aspp_width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.head.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.head.classifier.bias)
        if freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.requires_grad_(False)

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's features at stride 8, what the head reads."""
        x = self.layer2(self.layer1(self.stem(x)))
        return self.layer4(self.layer3(x))

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at stride 8 (with ``return_features``: and the encoder's features)."""
        features = self.encoder_features(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits

    def _lr_groups(self) -> list[dict]:
        """Backbone x1, head x10 (the DeepLab convention), weight decay everywhere."""
        head = list(self.head.parameters())
        head_ids = {id(p) for p in head}
        return [
            lr_group([p for p in self.parameters() if id(p) not in head_ids], 1.0, 1.0),
            lr_group(head, 10.0, 1.0),
        ]


class SmallDemoNet(SmallSegNet):
    """:class:`SmallSegNet` with 128-channel dilated blocks: the demo's network (about 1.1 M parameters).

    Three quarters of the small model's FLOPs are its two 256-channel blocks at stride 8; halving
    their width keeps the stride (the thin classes need it) and the receptive field.
    """

    widths = (32, 64, 128, 128)
