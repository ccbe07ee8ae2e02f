"""DeepLab-v2 ResNet-101 exactly as CRST-PT builds it (``deeplab/model.py:Res_Deeplab``).

Caffe-style bottlenecks (stride on the first 1x1 conv), ceil-mode max-pool, dilation 2 in
``layer3`` and 4 in ``layer4`` (every block), and ``layer5`` = four 3x3 convs with dilation 6, 12,
18, 24 whose outputs are summed. The state_dict keys are torchvision's with ``layer5`` instead of
``fc``, so CRST's ``gta_src.pth`` loads with ``strict=True`` and torchvision's ImageNet ResNet-101
fills everything but ``layer5``. BN is frozen by default: eval mode, gamma/beta not trained.
See docs/method.md §10.2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cbst.errors import WeightsError
from cbst.models.base import Conversion, SegmentationNet, load_strict, lr_group, read_state_dict

ASPP_DILATIONS: tuple[int, ...] = (6, 12, 18, 24)
STAGES: tuple[tuple[int, int, int, int], ...] = (  # (blocks, width, stride, dilation)
    (3, 64, 1, 1),
    (4, 128, 2, 1),
    (23, 256, 1, 2),
    (3, 512, 1, 4),
)


class Bottleneck(nn.Module):
    """1x1 (stride) -> 3x3 (dilation) -> 1x1 x4, each with BN, plus an optional projection."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, project: bool) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if project
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual bottleneck with post-activation (ResNet v1)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.relu(self.bn3(self.conv3(h)) + shortcut)


class ASPP(nn.Module):
    """DeepLab-v2 ``Classifier_Module``: parallel dilated 3x3 convs to classes, summed."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in ASPP_DILATIONS
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of the four branches (no pooling branch, BN or dropout)."""
        return sum(conv(x) for conv in self.conv2d_list)


class DeepLabV2(SegmentationNet):
    """DeepLab-v2 with a ResNet-101 backbone, output stride 8 (512x1024 -> 65x129)."""

    output_stride = 8
    pad_multiple = 8
    default_freeze_bn = True

    def __init__(self, num_classes: int, *, freeze_bn: bool = True) -> None:
        super().__init__(freeze_bn)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        inplanes = 64
        for index, (blocks, planes, stride, dilation) in enumerate(STAGES, start=1):
            layer = [Bottleneck(inplanes, planes, stride, dilation, project=True)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes, 1, dilation, project=False) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.layer5 = ASPP(inplanes, num_classes)
        self._init_backbone()
        if freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.requires_grad_(False)

    def _init_backbone(self) -> None:
        """He init for the backbone convs, unit BN (replaced by ImageNet weights in practice)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) and not name.startswith("layer5"):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Ceil-mode arithmetic: one more row and column than 1/8 of a padded input."""
        return height // 8 + 1, width // 8 + 1

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """ResNet-101's ``layer4`` output (2048 channels, the logits' grid), what ASPP reads."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at stride 8 (ceil-mode arithmetic: H -> ceil-ish H/8 + 1); with
        ``return_features`` also the encoder's features."""
        features = self.encoder_features(x)
        logits = self.layer5(features)
        return (logits, features) if return_features else logits

    def _lr_groups(self) -> list[dict]:
        """CRST convention: backbone x1, ASPP ``layer5`` x10; weight decay everywhere."""
        head = list(self.layer5.parameters())
        head_ids = {id(p) for p in head}
        backbone = [p for p in self.parameters() if id(p) not in head_ids]
        return [lr_group(backbone, 1.0, 1.0), lr_group(head, 10.0, 1.0)]

    def load_pretrained(self, source: str | Path) -> None:
        """``"imagenet"`` (torchvision download), a torchvision ``.pth``, or a full CRST ``.pth``."""
        if str(source) == "imagenet":
            from torchvision.models import ResNet101_Weights

            state = ResNet101_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
            label = "torchvision ResNet101_Weights.IMAGENET1K_V1"
        else:
            state, label = read_state_dict(Path(source)), str(source)
        if any(k.startswith("layer5.") for k in state):  # a full CRST model
            load_strict(self, state, label)
            return
        head = {k: v for k, v in self.state_dict().items() if k.startswith("layer5.")}
        load_strict(self, {**head, **{k: v for k, v in state.items() if not k.startswith("fc.")}}, label)

    @classmethod
    def convert(
        cls, path: Path, num_classes: int, *, imagenet: bool = False, limit: int | None = 5
    ) -> Conversion:
        """A bare state_dict of this network, or with ``imagenet`` a torchvision ResNet-101
        classifier (its ``fc`` dropped, the ASPP head initialised)."""
        if not imagenet:
            return super().convert(path, num_classes, limit=limit)
        if path.suffix == ".params":
            raise WeightsError(f"{path}: MXNet .params files hold ResNet-38 weights; use --arch resnet38")
        model = cls(num_classes, freeze_bn=cls.default_freeze_bn)
        model.load_pretrained(path)
        return Conversion(model, len(read_state_dict(path)))
