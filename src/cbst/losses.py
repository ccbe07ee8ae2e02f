"""Training losses on a network's logits and the batch's labels (:data:`cbst.registry.LOSSES`).

A loss is called as ``loss(logits, labels, batch) -> scalar`` by the training loop
(:func:`cbst.training.train_epochs`): ``logits`` N×C×h×w at the network's output stride (any
float dtype), ``labels`` N×H×W int64 trainIds on the same device (``IGNORE_INDEX`` where
unlabelled), ``batch`` the loader's batch (its ``domain``, ``index`` ... for losses that need
them). Source training, self-training and CRST's regularised loss (:class:`cbst.crst.CrstLoss`)
all use :class:`CrossEntropyLoss` for the cross-entropy itself; source training can weight it
per class by the source's class frequencies (``--class-weight-power``, :func:`class_balance_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cbst.labels import IGNORE_INDEX
from cbst.registry import LOSSES

ALIGNMENTS = ("logits", "labels")


class CrossEntropyLoss:
    """Mean cross-entropy over the labelled pixels; 0 when no pixel is labelled.

    Logits and labels are brought to one grid first: ``align="logits"`` (cbst's, the original
    codes') up-samples the logits bilinearly to the labels' size, ``align="labels"`` takes the
    label of each logit's pixel centre (nearest neighbour), which is cheaper for large crops.
    Everything is computed in float32, even when the network ran in bf16. ``class_weights``
    (one per class, e.g. :func:`class_balance_weights`) multiply each pixel's term by its
    label's weight; the sum is still divided by the number of labelled pixels.
    """

    def __init__(
        self,
        *,
        align: str = "logits",
        ignore_index: int = IGNORE_INDEX,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        if align not in ALIGNMENTS:
            raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
        self.align, self.ignore_index = align, ignore_index
        self.class_weights = (
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        )

    def _weights(self, device: torch.device) -> Tensor | None:
        """``class_weights`` on ``device`` (moved there once)."""
        if self.class_weights is not None and self.class_weights.device != device:
            self.class_weights = self.class_weights.to(device)
        return self.class_weights

    def aligned(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(float32 logits, labels) on one grid, as ``align`` says."""
        logits = logits.float()
        if logits.shape[-2:] == labels.shape[-2:]:
            return logits, labels
        if self.align == "logits":
            return F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False), labels
        small = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")
        return logits, small[:, 0].long()

    def per_pixel(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-pixel cross-entropy (N×H×W float32, 0 at ignored pixels) of aligned inputs."""
        return F.cross_entropy(
            logits,
            labels,
            weight=self._weights(logits.device),
            ignore_index=self.ignore_index,
            reduction="none",
        )

    def __call__(self, logits: Tensor, labels: Tensor, batch: dict[str, Any] | None = None) -> Tensor:
        """The batch's loss: the sum over labelled pixels divided by their number."""
        logits, labels = self.aligned(logits, labels)
        total = F.cross_entropy(
            logits,
            labels,
            weight=self._weights(logits.device),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        valid = (labels != self.ignore_index).sum().clamp(min=1)
        return total / valid


def class_balance_weights(counts: np.ndarray, power: float) -> np.ndarray:
    """Per-class loss weights w_c ∝ f_c^(−power), f_c the class's share of the labelled pixels.

    ``counts`` holds pixels per class (any leading axes, e.g. images × classes, are summed).
    The weights are scaled so that Σ_c f_c·w_c = 1: on the data's class mix the weighted loss
    has the plain loss's scale, so the learning rate keeps its meaning. ``power`` 0 gives all
    ones; 0.5 is the inverse square root of the frequency. A class without pixels gets 0 (no
    label of it is ever seen).
    """
    totals = np.asarray(counts, dtype=np.float64).reshape(-1, np.shape(counts)[-1]).sum(0)
    if totals.sum() <= 0:
        raise ValueError("class weights need labelled pixels; every count is 0")
    freq = totals / totals.sum()
    present = freq > 0
    weights = np.zeros_like(freq)
    weights[present] = freq[present] ** -power
    return weights / (freq * weights).sum()


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over valid pixels of logits up-sampled to the label size; 0 if none."""
    return CrossEntropyLoss(ignore_index=ignore_index)(logits, labels)


def build_loss(name: str, **options: Any) -> Any:
    """The loss registered as ``name`` in :data:`cbst.registry.LOSSES`, built with ``options``."""
    return LOSSES.get(name)(**options)
