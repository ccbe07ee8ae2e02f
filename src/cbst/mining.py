"""Small-class patch mining (docs/method.md §6): centre some training crops on a rare-class pixel.

With probability ``port`` a crop is centred on a uniformly drawn pixel of a rare class present in
the label: classes of ``priority`` (share < mine threshold) first, else classes of ``mine_id``
(the few smallest). The rare classes come from ``cbst.thresholds.rare_classes``, which uses the
predicted-pixel counts, so mining favours genuinely rare classes under both threshold policies
(the original mined road/sidewalk/building under ST, docs/method.md §12.2). Ignored pixels (255, e.g.
unselected pseudo-labels) are never seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cbst.labels import IGNORE_INDEX


@dataclass
class MiningPlan:
    """How often to mine (``port``) and which classes to look for, in order of precedence."""

    port: float
    mine_id: list[int] = field(default_factory=list)
    priority: list[int] = field(default_factory=list)


def _seed_region(shape: tuple[int, int], margin: tuple[int, int]) -> tuple[slice, slice]:
    """Rows/cols whose pixels may be seeds: ``margin`` away from the border (all if too small)."""

    def axis(n: int, m: int) -> slice:
        return slice(m, n - m) if n - m > m else slice(0, n)

    return axis(shape[0], margin[0]), axis(shape[1], margin[1])


def _candidates(region: np.ndarray, plan: MiningPlan) -> list[int]:
    """Priority classes present in ``region``, else mine_id classes present."""
    present = np.bincount(region.reshape(-1), minlength=256)
    present[IGNORE_INDEX] = 0
    for group in (plan.priority, plan.mine_id):
        found = [c for c in group if 0 <= c < IGNORE_INDEX and present[c] > 0]
        if found:
            return found
    return []


def choose_mined_center(
    label: np.ndarray, plan: MiningPlan, rng: np.random.Generator, *, margin: tuple[int, int] = (0, 0)
) -> tuple[int, int] | None:
    """(y, x) of a random rare-class pixel to centre the crop on, or None for an ordinary crop.

    ``label`` is the trainId map at the crop's scale; ``margin`` (rows, cols) keeps seeds that far
    from the border, e.g. half the crop size so the window fits without clipping (ignored along an
    axis shorter than twice its margin).
    """
    if plan.port <= 0 or rng.random() >= plan.port:
        return None
    rows, cols = _seed_region(label.shape, margin)
    region = np.asarray(label[rows, cols], dtype=np.uint8)
    candidates = _candidates(region, plan)
    if not candidates:
        return None
    cls = candidates[int(rng.integers(len(candidates)))]
    ys, xs = np.nonzero(region == cls)
    i = int(rng.integers(len(ys)))
    return int(ys[i]) + rows.start, int(xs[i]) + cols.start


def crop_window(
    center: tuple[int, int], crop_hw: tuple[int, int], image_hw: tuple[int, int]
) -> tuple[int, int]:
    """Top-left (y0, x0) of a crop centred on ``center``, shifted to lie inside the image.

    When the crop is larger than the image along an axis, that offset is 0 (the caller pads).
    """

    def axis(c: int, size: int, n: int) -> int:
        return int(min(max(c - size // 2, 0), max(n - size, 0)))

    return axis(center[0], crop_hw[0], image_hw[0]), axis(center[1], crop_hw[1], image_hw[1])
