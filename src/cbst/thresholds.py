"""Class-balanced thresholds λ_c, pseudo-label assignment and rare-class statistics.

docs/method.md §4 and §6.1 describe them.

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
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cbst.labels import IGNORE_INDEX

POLICIES = ("cb", "global")
MAX_BINS = 2**24  # keeps conf·bins exact in float64, so every value lands in its true bin


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
        policy: str = "cb",
        *,
        exact: bool = False,
        bins: int = 65536,
        subsample: int = 1,
        device: torch.device | str | None = None,
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if policy not in POLICIES:
            raise ValueError(f"unknown threshold policy {policy!r}; choose one of {POLICIES}")
        if not 2 <= bins <= MAX_BINS:
            raise ValueError(f"bins must be in [2, {MAX_BINS}], got {bins}")
        if subsample < 1:
            raise ValueError(f"subsample must be >= 1, got {subsample}")
        self.num_classes = num_classes
        self.policy = policy
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
            raise FloatingPointError(
                "the model's probabilities are not finite (NaN or inf): its "
                "weights have diverged or are corrupt"
            )
        if self.exact:
            lam = self._exact_thresholds(portion)
        else:
            lam = self._approx_thresholds(portion)
        if self.policy == "global":
            lam = lam.expand(self.num_classes)
        return lam.clone()

    def _ranks(self, counts: Tensor, portion: float) -> Tensor:
        """k = ⌊n·p⌋ for each row of counts (int64)."""
        return torch.floor(counts.double() * portion).long()

    def _approx_thresholds(self, portion: float) -> Tensor:
        """Lower edge of the bin holding the k-th largest value, per row (class or global)."""
        hist, low = self._hist, self._min
        if self.policy == "global":
            hist, low = hist.sum(0, keepdim=True), low.min().reshape(1)
        k = self._ranks(hist.sum(1), portion)
        from_top = hist.flip(1).cumsum(1).flip(1)  # values in bins ≥ b
        b = (from_top >= k.unsqueeze(1)).sum(1) - 1  # last bin with ≥ k values above it
        edge = (b.double() / self.bins).float()
        lam = torch.maximum(edge, low)
        return torch.where(k > 0, lam, torch.ones_like(lam))

    def _exact_thresholds(self, portion: float) -> Tensor:
        """The k-th largest kept value per row, by selection on the device."""
        pools = [
            torch.cat(chunks) if chunks else torch.empty(0, device=self.device) for chunks in self._values
        ]
        if self.policy == "global":
            pools = [torch.cat(pools)]
        lam = torch.ones(len(pools), dtype=torch.float32, device=self.device)
        for i, pool in enumerate(pools):
            n = pool.numel()
            k = math.floor(n * portion)
            if k > 0:
                lam[i] = torch.kthvalue(pool, n - k + 1).values
        return lam

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
            self.num_classes, self.policy, exact=self.exact, bins=self.bins, subsample=self.subsample
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
