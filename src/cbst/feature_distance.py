"""DAFormer's ImageNet feature distance: keep the student's encoder near its ImageNet features.

On the source crops, the L2 distance between the student encoder's last-stage features and
those of a frozen copy of the ImageNet-initialised network, averaged over the feature pixels of
"thing" classes, times λ_FD, is added to the source loss (Hoyer et al., CVPR 2022, §3.3;
lhoyer/DAFormer ``mmseg/models/uda/dacs.py``). The label map is down-scaled to the feature
grid first: a feature pixel takes the class that covers at least ``min_ratio`` (0.75) of its
label pixels, and is ignored otherwise. The frozen network runs in eval mode without gradients,
so the loss's gradient reaches the student alone. docs/method.md §14.7 gives the formula.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbst.errors import ConfigError
from cbst.labels import IGNORE_INDEX

THING_CLASSES: tuple[str, ...] = (
    "traffic light",
    "traffic sign",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
"""DAFormer's thing classes, train ids 6, 7 and 11–18 of the 19 Cityscapes classes (its
``imnet_feature_dist_classes``), by name so that a protocol of other classes finds its own."""
MIN_RATIO = 0.75
"""DAFormer's ``imnet_feature_dist_scale_min_ratio``: the share of a feature pixel's label pixels
its class must cover."""


def thing_class_ids(class_names: Sequence[str]) -> list[int]:
    """The train ids of :data:`THING_CLASSES` in a protocol; a one-line error if it has none."""
    ids = [i for i, name in enumerate(class_names) if name in THING_CLASSES]
    if not ids:
        raise ConfigError(
            f"--fd-lambda: the label protocol has none of DAFormer's thing classes ({', '.join(THING_CLASSES)})"
        )
    return ids


def downscale_labels(labels: Tensor, size: tuple[int, int], num_classes: int, min_ratio: float) -> Tensor:
    """Labels N×H×W (int64, ``IGNORE_INDEX`` = none) on a grid of ``size`` = (h, w) cells.

    Each cell covers f×f label pixels, f = ⌈H/h⌉ (= ⌈W/w⌉ for the models' grids; DAFormer's H/h
    when it divides); labels are padded with ``IGNORE_INDEX`` at the bottom and right to h·f × w·f
    (the models' ceil-mode grids). A cell takes the class, "ignored" counted as one, with the
    largest share of its pixels, and ``IGNORE_INDEX`` when that share is below ``min_ratio``.
    """
    h, w = size
    factor = max(-(-labels.shape[-2] // h), -(-labels.shape[-1] // w))
    pad_h, pad_w = h * factor - labels.shape[-2], w * factor - labels.shape[-1]
    padded = F.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    index = torch.where(padded == IGNORE_INDEX, num_classes, padded)
    onehot = F.one_hot(index, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, cls = F.avg_pool2d(onehot, factor).max(dim=1)
    cls = torch.where(cls == num_classes, IGNORE_INDEX, cls)
    return torch.where(ratio < min_ratio, IGNORE_INDEX, cls)


def masked_feature_distance(student: Tensor, frozen: Tensor, mask: Tensor) -> Tensor:
    """Mean over the ``mask`` pixels (N×h×w) of ‖student − frozen‖₂ over the channels (N×K×h×w),
    in float32; 0 when no pixel is masked (DAFormer's mean of nothing would be NaN)."""
    distance = (student.float() - frozen.float()).norm(p=2, dim=1)
    return torch.where(mask, distance, 0.0).sum() / mask.sum().clamp_min(1)


class FeatureDistance:
    """λ_FD times the thing-class feature distance between the student and a frozen ImageNet copy."""

    def __init__(
        self, imagenet: nn.Module, weight: float, class_ids: Sequence[int], num_classes: int
    ) -> None:
        self.model = imagenet.eval().requires_grad_(False)
        self.weight, self.num_classes = float(weight), num_classes
        self.class_ids = torch.tensor(list(class_ids))

    @torch.no_grad()
    def imagenet_features(self, images: Tensor) -> Tensor:
        """The frozen network's last-stage features of normalised images (eval mode, no gradient)."""
        self.model.eval()
        return self.model.encoder_features(images)

    def thing_mask(self, labels: Tensor, size: tuple[int, int]) -> Tensor:
        """Bool N×h×w: the feature pixels whose down-scaled label is a thing class."""
        cells = downscale_labels(labels, size, self.num_classes, MIN_RATIO)
        return torch.isin(cells, self.class_ids.to(cells.device))

    def loss(self, images: Tensor, labels: Tensor, student_features: Tensor) -> Tensor:
        """λ_FD · the masked distance of the student's features of ``images`` (N×K×h×w, from
        the same pass as its source loss) to the frozen network's."""
        frozen = self.imagenet_features(images)
        mask = self.thing_mask(labels, tuple(student_features.shape[-2:]))
        return self.weight * masked_feature_distance(student_features, frozen, mask)
