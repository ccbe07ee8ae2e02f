"""Pseudo-label selection policies, the thresholds λ_c they compute, assignment and rare classes.

docs/method.md §4 and §6.1 describe them. A selection policy is an object of
:data:`cbst.registry.SELECTION_POLICIES` (``--kc-policy``): :class:`SelectionPolicy` turns the
round's per-class confidence statistics (:class:`ConfidenceStats`) and the portion to select
into one threshold per class, and assigns labels with them. cbst's own are
:class:`ClassBalancedPolicy` (``cb``, CBST) and :class:`GlobalPolicy` (``global``, ST).

The original pooled (every 4th) confidence of every target pixel in per-class Python lists and
sorted them: gigabytes of host memory per round. ``ThresholdEstimator`` keeps, by default, one
fixed-size histogram of confidences per class on the device instead, so memory does not grow with
the number of pixels; an exact mode that keeps the values (on the device) is there to verify it.

Definitions (docs/method.md §4.2-§4.3, with the original's bugs fixed as §12.2 says):

- ``cb``: among the n_c pixels predicted (argmax) as class c, λ_c is the ⌊n_c·p⌋-th largest
  confidence; λ_c = 1.0 where that is undefined (class never predicted, or ⌊n_c·p⌋ = 0).
- ``global`` (ST): one λ, the ⌊n·p⌋-th largest confidence over all n pixels, for every class.
- The pools hold no spurious leading 0 (docs/method.md §12.2).
- ``rare_classes`` uses the predicted-pixel counts under both policies, so ST no longer makes
  road/sidewalk/building the "rare" classes (docs/method.md §6.1, §12.2).

Confidences are handled as float32 and assumed finite and ≥ 0 (softmax outputs, possibly times a
prior, possibly a little above 1 after bicubic up-sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cbst.errors import DivergedError
from cbst.labels import IGNORE_INDEX
from cbst.registry import SELECTION_POLICIES

MAX_BINS = 2**24  # keeps conf·bins exact in float64, so every value lands in its true bin


@dataclass(frozen=True)
class ConfidenceStats:
    """Confidence statistics of a set of pixels, one row per group (per class, or pooled).

    Row r describes the pixels whose argmax class is r: their number ``counts[r]``, their
    smallest confidence ``minimum[r]``, and either a histogram of their confidences
    (``histogram``, R × (bins + 1), the last bin holding every value ≥ 1; see
    :class:`ThresholdEstimator`) or, in exact mode, the confidences themselves (``values``).
    """

    counts: Tensor
    minimum: Tensor
    bins: int
    histogram: Tensor | None = None
    values: list[Tensor] | None = None

    @property
    def exact(self) -> bool:
        return self.values is not None

    def pooled(self) -> ConfidenceStats:
        """One row over every pixel, whatever its class."""
        if self.exact:
            pool = torch.cat(self.values) if self.values else torch.empty(0, device=self.counts.device)
            return ConfidenceStats(
                self.counts.sum().reshape(1), self.minimum.min().reshape(1), self.bins, None, [pool]
            )
        return ConfidenceStats(
            self.counts.sum().reshape(1),
            self.minimum.min().reshape(1),
            self.bins,
            self.histogram.sum(0, keepdim=True),
        )

    def top_portion(self, portion: float) -> Tensor:
        """Per row (float32 [R]): the ⌊n·portion⌋-th largest confidence of its n pixels, the λ that
        selects its most confident ``portion``; 1.0 where that is undefined (no pixel, or
        ⌊n·portion⌋ = 0). Approximate from the histogram (see :class:`ThresholdEstimator`'s
        guarantees), exact from the values."""
        return self._exact_top(portion) if self.exact else self._approx_top(portion)

    def _approx_top(self, portion: float) -> Tensor:
        """Lower edge of the bin holding the k-th largest value, raised to the row's minimum."""
        hist = self.histogram
        k = torch.floor(hist.sum(1).double() * portion).long()
        from_top = hist.flip(1).cumsum(1).flip(1)  # values in bins ≥ b
        b = (from_top >= k.unsqueeze(1)).sum(1) - 1  # last bin with ≥ k values above it
        edge = (b.double() / self.bins).float()
        lam = torch.maximum(edge, self.minimum)
        return torch.where(k > 0, lam, torch.ones_like(lam))

    def _exact_top(self, portion: float) -> Tensor:
        """The k-th largest value per row, by selection on the device."""
        lam = torch.ones(len(self.values), dtype=torch.float32, device=self.counts.device)
        for i, pool in enumerate(self.values):
            n = pool.numel()
            k = math.floor(n * portion)
            if k > 0:
                lam[i] = torch.kthvalue(pool, n - k + 1).values
        return lam


class SelectionPolicy:
    """How pseudo-labels are selected: thresholds λ from confidence statistics, then labels.

    A policy implements :meth:`thresholds` (and may override :meth:`assign`). cbst builds one
    object per run, ``SELECTION_POLICIES.get(name)()``, so a policy may keep state between
    calls: the offline rounds call ``thresholds`` once per round on the whole target set's
    statistics; an online variant may call it on each batch's statistics (a
    :class:`ThresholdEstimator` fed with one batch) and, say, keep a running average of λ.
    """

    name: str = ""
    """The name it is registered under (``--kc-policy``), written to the round's ``stats.json``."""

    def thresholds(self, stats: ConfidenceStats, portion: float) -> Tensor:
        """λ per class (float32 [C], on the statistics' device) for selecting ``portion``."""
        raise NotImplementedError

    def assign(self, probs: Tensor, thresholds: Tensor) -> Tensor:
        """Pseudo-labels of ``probs`` (N×C×H×W) under ``thresholds``; ``IGNORE_INDEX`` where a pixel
        is not selected. By default :func:`assign_pseudo_labels`: argmax p/λ where max p/λ ≥ 1."""
        return assign_pseudo_labels(probs, thresholds)


class ClassBalancedPolicy(SelectionPolicy):
    """CBST (``cb``): among the n_c pixels predicted as class c, λ_c is the ⌊n_c·p⌋-th largest
    confidence, so every class contributes its own most confident portion."""

    name = "cb"

    def thresholds(self, stats: ConfidenceStats, portion: float) -> Tensor:
        return stats.top_portion(portion)


class GlobalPolicy(SelectionPolicy):
    """ST (``global``): one λ for every class, the ⌊n·p⌋-th largest confidence of all n pixels."""

    name = "global"

    def thresholds(self, stats: ConfidenceStats, portion: float) -> Tensor:
        return stats.pooled().top_portion(portion).expand(len(stats.counts))


def build_policy(policy: str | SelectionPolicy) -> SelectionPolicy:
    """The policy object of a registered name (an object is returned as it is)."""
    if isinstance(policy, SelectionPolicy):
        return policy
    built = SELECTION_POLICIES.get(policy)()
    if not built.name:
        built.name = policy
    return built


class ThresholdEstimator:
    """Accumulates (confidence, predicted class) statistics and turns them into thresholds λ.

    Approximate mode (default, ``exact=False``): a ``C × (bins + 1)`` int64 histogram on the device.
    Bins ``0..bins-1`` split [0, 1) evenly; bin ``bins`` is an overflow bin holding every
    confidence ≥ 1 (values are clamped into [0, 1] for binning; they are never rescaled). λ is the
    lower edge of the bin holding the exact λ, raised to the smallest confidence seen for that
    class when that is larger (so λ > 0 whenever the confidences are). Guarantees:

    - λ_approx ≤ λ_exact, so the selected set (``assign_pseudo_labels``) is a superset of the exact
      selection;
    - if λ_exact < 1: λ_exact − λ_approx < 1/bins (an absolute bound; it is exact up to float32
      rounding of the edge b/bins, zero when ``bins`` is a power of two), and every extra pixel has,
      for some class c, a confidence in [λ_approx_c, λ_exact_c), i.e. within 1/bins below λ_exact_c;
    - if λ_exact ≥ 1 (more than ⌊n_c·p⌋ confidences ≥ 1, which only overshoot or an
      unnormalised prior can produce): λ_approx = 1.0, and the extras are pixels with a
      confidence in [1, λ_exact).

    The bound is absolute: for tiny confidences (e.g. a strong prior) the relative resolution is
    1/(bins·λ); raise ``bins`` or use the exact mode there.

    Exact mode (``exact=True``): keeps every (subsampled) confidence, per class, on the device and
    returns exactly the value a full descending sort would give. Memory grows with the number of
    pixels (4 bytes each): for verification and small runs.

    ``subsample=k`` keeps every k-th pixel of each image in row-major order (the original kept every
    4th pixel per image *and per class*; counting per image is simpler and equivalent in spirit).
    """

    def __init__(
        self,
        num_classes: int,
        policy: str | SelectionPolicy = "cb",
        *,
        exact: bool = False,
        bins: int = 65536,
        subsample: int = 1,
        device: torch.device | str | None = None,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 2 <= bins <= MAX_BINS:
            raise ValueError(f"bins must be in [2, {MAX_BINS}], got {bins}")
        if subsample < 1:
            raise ValueError(f"subsample must be >= 1, got {subsample}")
        self.num_classes = num_classes
        self.selection = build_policy(policy)
        self.policy = self.selection.name
        self.exact = exact
        self.bins = bins
        self.subsample = subsample
        self.device = torch.device(device) if device is not None else None
        self._counts: Tensor | None = None  # C int64: predicted pixels per class
        self._min: Tensor | None = None  # C float32: smallest confidence per class
        self._hist: Tensor | None = None  # C × (bins+1) int64 (approximate mode)
        self._values: list[list[Tensor]] = []  # per class, chunks of confidences (exact mode)

    # ----------------------------------------------------------------- accumulation
    def _ensure_state(self, device: torch.device) -> torch.device:
        """Allocate empty statistics on the estimator's device (or ``device`` on first use)."""
        if self._counts is None:
            self.device = self.device or device
            c = self.num_classes
            self._counts = torch.zeros(c, dtype=torch.int64, device=self.device)
            self._min = torch.full((c,), math.inf, dtype=torch.float32, device=self.device)
            if self.exact:
                self._values = [[] for _ in range(c)]
            else:
                self._hist = torch.zeros(c, self.bins + 1, dtype=torch.int64, device=self.device)
        return self.device

    def update(self, probs: Tensor) -> None:
        """Add softmax maps (N×C×H×W or C×H×W, already times the prior if one is used)."""
        if probs.dim() == 3:
            probs = probs.unsqueeze(0)
        if probs.dim() != 4 or probs.shape[1] != self.num_classes:
            raise ValueError(
                f"expected probabilities N×{self.num_classes}×H×W or "
                f"{self.num_classes}×H×W, got shape {tuple(probs.shape)}"
            )
        conf, pred = probs.max(dim=1)
        self._accumulate(conf, pred)  # argmax classes are in range: no check, no device sync

    def update_confidences(self, conf: Tensor, pred: Tensor) -> None:
        """Add per-pixel maximum probabilities and argmax classes (same shape; N×H×W, H×W or 1-D)."""
        if conf.shape != pred.shape:
            raise ValueError(f"conf {tuple(conf.shape)} and pred {tuple(pred.shape)} differ in shape")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= self.num_classes):
            raise ValueError(f"predicted classes must lie in [0, {self.num_classes})")
        self._accumulate(conf, pred)

    def _accumulate(self, conf: Tensor, pred: Tensor) -> None:
        """Add (conf, pred) to the counts, minima and histograms (or value pools)."""
        device = self._ensure_state(conf.device)
        conf, pred = self._subsampled(conf, pred)
        conf = conf.to(device=device, dtype=torch.float32)
        pred = pred.to(device=device, dtype=torch.int64)
        if pred.numel() == 0:
            return
        self._counts += torch.bincount(pred, minlength=self.num_classes)
        self._min.scatter_reduce_(0, pred, conf, reduce="amin")
        if self.exact:
            self._append_values(conf, pred)
        else:
            self._hist += self._histogram(conf, pred)

    def _subsampled(self, conf: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
        """Flatten to 1-D, keeping every k-th pixel of each image (row-major)."""
        if conf.dim() >= 3:
            conf, pred = conf.flatten(1), pred.flatten(1)
        else:
            conf, pred = conf.reshape(1, -1), pred.reshape(1, -1)
        k = self.subsample
        return conf[:, ::k].reshape(-1), pred[:, ::k].reshape(-1)

    def _histogram(self, conf: Tensor, pred: Tensor) -> Tensor:
        """One bincount: bin floor(conf·bins) clamped to [0, bins], offset by class."""
        # conf·bins must be exact for the floor to be: it is in float32 when bins is a power of
        # two, and in float64 otherwise (24-bit mantissa × bins ≤ 2^24 fits in 53 bits).
        scaled = conf if self.bins & (self.bins - 1) == 0 else conf.double()
        idx = (scaled * self.bins).floor_().nan_to_num_(0.0).clamp_(0, self.bins).long()
        flat = pred * (self.bins + 1) + idx
        counts = torch.bincount(flat, minlength=self.num_classes * (self.bins + 1))
        return counts.view(self.num_classes, self.bins + 1)

    def _append_values(self, conf: Tensor, pred: Tensor) -> None:
        """Split the confidences by class and keep them (exact mode)."""
        order = torch.argsort(pred, stable=True)
        sizes = torch.bincount(pred, minlength=self.num_classes).tolist()
        for c, chunk in enumerate(torch.split(conf[order], sizes)):
            if chunk.numel():
                self._values[c].append(chunk)

    # ----------------------------------------------------------------- results
    @property
    def class_pixel_counts(self) -> Tensor:
        """Number of (kept) pixels predicted as each class, as int64 [C]."""
        self._ensure_state(self.device or torch.device("cpu"))
        return self._counts.clone()

    def thresholds(self, portion: float) -> Tensor:
        """λ per class (float32 [C]) selecting the most confident ``portion`` of the pixels."""
        if not 0.0 <= portion <= 1.0:
            raise ValueError(f"portion must be in [0, 1], got {portion}")
        self._ensure_state(self.device or torch.device("cpu"))
        if not bool(self._min.isfinite()[self._counts > 0].all()):  # amin keeps any NaN seen
            raise DivergedError(
                "the model's probabilities are not finite (NaN or inf): its "
                "weights have diverged or are corrupt"
            )
        return self.selection.thresholds(self.statistics(), portion).clone()

    def statistics(self) -> ConfidenceStats:
        """The accumulated statistics, one row per class (the tensors themselves, not copies)."""
        self._ensure_state(self.device or torch.device("cpu"))
        if self.exact:
            pools = [torch.cat(v) if v else torch.empty(0, device=self.device) for v in self._values]
            return ConfidenceStats(self._counts, self._min, self.bins, values=pools)
        return ConfidenceStats(self._counts, self._min, self.bins, histogram=self._hist)

    # ----------------------------------------------------------------- persistence / DDP
    def state_dict(self) -> dict[str, Any]:
        """Settings and statistics (tensors on the estimator's device)."""
        self._ensure_state(self.device or torch.device("cpu"))
        state: dict[str, Any] = {
            "num_classes": self.num_classes,
            "policy": self.policy,
            "exact": self.exact,
            "bins": self.bins,
            "subsample": self.subsample,
            "counts": self._counts.clone(),
            "min": self._min.clone(),
        }
        if self.exact:
            state["values"] = [
                torch.cat(v) if v else torch.empty(0, device=self.device) for v in self._values
            ]
        else:
            state["hist"] = self._hist.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics saved by ``state_dict`` (settings must match)."""
        for key in ("num_classes", "policy", "exact", "bins", "subsample"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state has {key}={state[key]!r}, estimator has {getattr(self, key)!r}")
        device = self._ensure_state(state["counts"].device)
        self._counts = state["counts"].to(device).clone()
        self._min = state["min"].to(device).clone()
        if self.exact:
            self._values = [[v.to(device).clone()] if v.numel() else [] for v in state["values"]]
        else:
            self._hist = state["hist"].to(device).clone()

    def merge_state_dict(self, state: dict[str, Any]) -> None:
        """Add another estimator's statistics (e.g. another rank's) to this one."""
        other = ThresholdEstimator(
            self.num_classes, self.selection, exact=self.exact, bins=self.bins, subsample=self.subsample
        )
        other.load_state_dict(state)
        device = self._ensure_state(other.device)
        self._counts += other._counts.to(device)
        self._min = torch.minimum(self._min, other._min.to(device))
        if self.exact:
            for mine, theirs in zip(self._values, other._values):
                mine.extend(t.to(device) for t in theirs)
        else:
            self._hist += other._hist.to(device)

    def all_reduce(self) -> None:
        """Combine the statistics of every torch.distributed rank (no-op when not initialised)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return
        self._ensure_state(self.device or torch.device("cpu"))
        if self.exact:  # variable-size pools: gather them all, then merge the other ranks'
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, _to_cpu(self.state_dict()))
            for rank, state in enumerate(states):
                if rank != dist.get_rank():
                    self.merge_state_dict(state)
            return
        dist.all_reduce(self._counts)
        dist.all_reduce(self._hist)
        dist.all_reduce(self._min, op=dist.ReduceOp.MIN)


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with every tensor (also inside lists) moved to the CPU, for pickling."""

    def move(v: Any) -> Any:
        if torch.is_tensor(v):
            return v.cpu()
        return [move(x) for x in v] if isinstance(v, list) else v

    return {k: move(v) for k, v in state.items()}


def assign_pseudo_labels(probs: Tensor, thresholds: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pseudo-labels (docs/method.md §4.4): argmax of probs/λ, ``ignore_index`` where max probs/λ < 1.

    probs is N×C×H×W or C×H×W (times the prior if one is used); returns int64 N×H×W or H×W.
    The ratio is computed in float32; λ is floored at the smallest normal float so that a λ of 0
    cannot produce 0/0.
    """
    squeeze = probs.dim() == 3
    if squeeze:
        probs = probs.unsqueeze(0)
    if probs.dim() != 4 or thresholds.shape != (probs.shape[1],):
        raise ValueError(
            f"probs {tuple(probs.shape)} and thresholds {tuple(thresholds.shape)} "
            "do not match (expected N×C×H×W or C×H×W and [C])"
        )
    lam = thresholds.to(device=probs.device, dtype=torch.float32)
    lam = lam.clamp_min(torch.finfo(torch.float32).tiny).view(1, -1, 1, 1)
    ratio_max, labels = (probs.float() / lam).max(dim=1)
    labels[ratio_max < 1] = ignore_index
    return labels[0] if squeeze else labels


def rare_classes(
    class_pixel_counts: Tensor, *, number: int = 3, thresh: float = 1e-3
) -> tuple[list[int], list[int]]:
    """(mine_id, mine_id_priority) of docs/method.md §6.1 from the predicted (argmax) pixel counts.

    priority: every class whose share of the predicted pixels is < ``thresh`` (never-predicted
    classes included), ascending class index. mine_id: the ``number`` classes with the smallest
    share, ties broken by class index. With no pixels at all every share counts as 0.
    """
    counts = np.asarray(torch.as_tensor(class_pixel_counts).cpu(), dtype=np.float64)
    total = counts.sum()
    share = counts / total if total > 0 else np.zeros_like(counts)
    priority = [int(c) for c in np.flatnonzero(share < thresh)]
    mine_id = [int(c) for c in np.argsort(share, kind="stable")[:number]]
    return mine_id, priority
