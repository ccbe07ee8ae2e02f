"""Pseudo-label selection inside online self-training, one selector per policy name.

Each selector turns the teacher's softmax on a target batch (N×C×H×W, float32) and the mask of
the crop's real pixels (N×H×W; padding is False) into a :class:`Selection`: labels (255 =
ignored), per-pixel loss weights, and the mask of the pixels it selected (for the logs).

- ``fixed`` (DACS/DAFormer): the teacher's argmax everywhere; every pixel of image i weighs the
  fraction of image i's pixels whose confidence is ≥ ``threshold`` (0.968); optional top and
  bottom rows weigh 0.
- ``cb`` (class-balanced, CBST's rule online): λ_c keeps the top ``portion`` of the pixels
  predicted as c, read off per-class confidence histograms of the last ``window`` target
  batches (summed over the torchrun processes, so every process computes the same λ); a pixel
  gets the label argmax_c p_c/λ_c where that ratio is ≥ 1, weight 1, and is ignored otherwise.
  Weight 1, not the confidence: the thresholds already keep only confident pixels, and weighting
  by confidence again would shrink the rare classes' share of the loss, which is what class
  balance is there to prevent.
- ``global`` (ST online): the same with one λ for all classes.

``ONLINE_SELECTORS`` maps the policy names to the selector classes; ``fixed`` is also registered
in :data:`cbst.registry.SELECTION_POLICIES` (it has no rounds form).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from cbst import distributed
from cbst.labels import IGNORE_INDEX
from cbst.thresholds import assign_pseudo_labels

HISTOGRAM_BINS = 1024
"""Confidence bins of the windowed histograms (a power of two: exact binning in float32)."""


def confidence_histogram(conf: Tensor, rows: Tensor, num_rows: int, bins: int = HISTOGRAM_BINS) -> Tensor:
    """int64 ``num_rows × (bins + 1)``: per row (class) the confidences in bin floor(conf·bins),
    bin ``bins`` holding every value ≥ 1, the binning of :class:`cbst.thresholds.ThresholdEstimator`.

    One ``scatter_add_`` into a tensor of known size, where ``torch.bincount`` would wait for the
    device to learn its output size. ``bins`` must be a power of two (conf·bins exact in float32).
    """
    idx = (conf.float() * bins).floor_().nan_to_num_(0.0).clamp_(0, bins).long()
    flat = (rows * (bins + 1) + idx).flatten()
    counts = torch.zeros(num_rows * (bins + 1), dtype=torch.int64, device=conf.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts.view(num_rows, bins + 1)


def top_portion_thresholds(hist: Tensor, portion: float) -> Tensor:
    """Per row of a :func:`confidence_histogram` (float32): the lower edge of the bin holding the
    ⌊n·portion⌋-th largest confidence, 1.0 where ⌊n·portion⌋ = 0; as the rounds' estimator does."""
    bins = hist.shape[1] - 1
    k = torch.floor(hist.sum(1).double() * portion).long()
    from_top = hist.flip(1).cumsum(1).flip(1)  # values in bins ≥ b
    b = (from_top >= k.unsqueeze(1)).sum(1) - 1  # last bin with ≥ k values above it
    lam = (b.double() / bins).float()
    return torch.where(k > 0, lam, torch.ones_like(lam))


class Selection(NamedTuple):
    labels: Tensor  # int64 N×H×W, IGNORE_INDEX where not used
    weights: Tensor  # float32 N×H×W
    selected: Tensor  # bool N×H×W: the pixels the policy kept (confident ones for fixed)


class FixedSelector:
    """DAFormer's selection: argmax labels weighted per image by its share of confident pixels."""

    def __init__(
        self, num_classes: int, *, threshold: float = 0.968, ignore_top: int = 0, ignore_bottom: int = 0
    ) -> None:
        self.num_classes = num_classes
        self.threshold = threshold
        self.ignore_top, self.ignore_bottom = ignore_top, ignore_bottom

    def select(self, probs: Tensor, valid: Tensor) -> Selection:
        conf, pred = probs.max(dim=1)
        confident = (conf >= self.threshold) & valid
        share = confident.sum((1, 2)).float() / valid.sum((1, 2)).clamp_min(1).float()
        weights = share.view(-1, 1, 1) * valid.float()
        rows = torch.arange(weights.shape[1], device=weights.device)
        kept = (rows >= self.ignore_top) & (rows < weights.shape[1] - self.ignore_bottom)
        weights = weights * kept.view(1, -1, 1)
        labels = torch.where(valid, pred, IGNORE_INDEX)
        return Selection(labels, weights, confident & kept.view(1, -1, 1))

    def thresholds(self) -> Tensor:
        """The confidence threshold of every class (for the logs)."""
        return torch.full((self.num_classes,), self.threshold)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class WindowedSelector:
    """λ from the confidence histograms of the last ``window`` batches (class-wise or global)."""

    class_balanced = True

    def __init__(self, num_classes: int, *, portion: float, window: int, bins: int = HISTOGRAM_BINS) -> None:
        if not 0.0 <= portion <= 1.0:
            raise ValueError(f"portion must be in [0, 1], got {portion}")
        if window < 1:
            raise ValueError(f"window must be at least 1 batch, got {window}")
        if bins & (bins - 1):
            raise ValueError(f"bins must be a power of two, got {bins}")
        self.num_classes, self.portion, self.window, self.bins = num_classes, portion, window, bins
        self.ring: Tensor | None = None  # window × C × (bins + 1) int64, one slot per batch
        self.total: Tensor | None = None  # the ring's sum
        self.slot = 0
        self._lambda: Tensor | None = None

    def _ensure(self, device: torch.device) -> None:
        if self.ring is None:
            self.ring = torch.zeros(
                self.window, self.num_classes, self.bins + 1, dtype=torch.int64, device=device
            )
            self.total = torch.zeros_like(self.ring[0])

    def observe(self, conf: Tensor, pred: Tensor, valid: Tensor) -> None:
        """Add one batch's (confidence, argmax) of the valid pixels, all processes' together."""
        self._ensure(conf.device)
        c = self.num_classes
        rows = torch.where(valid, pred, c)  # row c collects the padding: dropped
        hist = confidence_histogram(conf, rows, c + 1, self.bins)[:c].contiguous()
        distributed.all_reduce_sum(hist)
        self.total += hist - self.ring[self.slot]
        self.ring[self.slot] = hist
        self.slot = (self.slot + 1) % self.window
        self._lambda = None

    def thresholds(self) -> Tensor:
        """λ per class (float32 [C]) of the current window; 1.0 before any batch."""
        if self.total is None:
            return torch.ones(self.num_classes)
        if self._lambda is None:
            if self.class_balanced:
                self._lambda = top_portion_thresholds(self.total, self.portion)
            else:
                lam = top_portion_thresholds(self.total.sum(0, keepdim=True), self.portion)
                self._lambda = lam.expand(self.num_classes).clone()
        return self._lambda

    def select(self, probs: Tensor, valid: Tensor) -> Selection:
        conf, pred = probs.max(dim=1)
        self.observe(conf, pred, valid)
        labels = assign_pseudo_labels(probs, self.thresholds())
        labels = torch.where(valid, labels, IGNORE_INDEX)
        selected = labels != IGNORE_INDEX
        return Selection(labels, selected.float(), selected)

    def state_dict(self) -> dict[str, Any]:
        return {"ring": self.ring, "total": self.total, "slot": self.slot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ring, self.total, self.slot = state["ring"], state["total"], int(state["slot"])
        self._lambda = None


class GlobalWindowedSelector(WindowedSelector):
    """ST online: one λ, the top ``portion`` of all the window's pixels, for every class."""

    class_balanced = False


ONLINE_SELECTORS: dict[str, type] = {
    "fixed": FixedSelector,
    "cb": WindowedSelector,
    "global": GlobalWindowedSelector,
}
"""The online selector of each selection policy name that has one."""


def build_selector(
    policy: str,
    num_classes: int,
    *,
    threshold: float,
    ignore_top: int,
    ignore_bottom: int,
    portion: float,
    window: int,
) -> FixedSelector | WindowedSelector:
    """The online selector of ``policy`` with the run's options (each reads its own)."""
    if policy == "fixed":
        return FixedSelector(
            num_classes, threshold=threshold, ignore_top=ignore_top, ignore_bottom=ignore_bottom
        )
    return ONLINE_SELECTORS[policy](num_classes, portion=portion, window=window)
