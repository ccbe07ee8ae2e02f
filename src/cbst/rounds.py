"""The self-training round schedule: target portion, source portion and learning rate per round.

Follows the original's ``solve_AO.py`` loop (docs/method.md §3): after each round the target portion
*p* and source portion *s* grow by their steps while they are below their maxima (so they can
overshoot a maximum by less than one step), the learning rate is divided by √2, and every round
trains ``epoch_per_round`` epochs with epoch numbers continuing across rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cbst.errors import ConfigError

SOURCE_SAMPLE_POLICIES = ("cumulative", "random")


@dataclass(frozen=True)
class RoundPlan:
    """What one round does: its portions, learning rate, epochs and source-subset seed."""

    index: int
    tgt_portion: float
    src_portion: float
    lr: float
    start_epoch: int
    end_epoch: int
    source_seed: int


def _grow(value: float, step: float, maximum: float) -> float:
    """The original's update: add ``step`` only while below ``maximum`` (12 significant digits)."""
    return float(f"{value + step:.12g}") if value < maximum else value


def round_schedule(
    num_round: int,
    *,
    init_tgt_port: float = 0.3,
    step_tgt_port: float = 0.05,
    max_tgt_port: float = 0.5,
    init_src_port: float = 0.3,
    step_src_port: float = 0.0025,
    max_src_port: float = 0.06,
    base_lr: float = 1e-4,
    lr_decay: float = math.sqrt(2.0),
    epoch_per_round: int = 2,
    source_sample_policy: str = "cumulative",
    seed: int = 0,
) -> list[RoundPlan]:
    """The plan of every round; defaults are the original ``solve_AO.py`` defaults."""
    if source_sample_policy not in SOURCE_SAMPLE_POLICIES:
        raise ConfigError(
            f"source_sample_policy must be one of {SOURCE_SAMPLE_POLICIES}, got {source_sample_policy!r}"
        )
    if num_round < 1 or epoch_per_round < 1:
        raise ConfigError("num_round and epoch_per_round must be at least 1")
    plans = []
    p, s = init_tgt_port, init_src_port
    for r in range(num_round):
        plans.append(
            RoundPlan(
                index=r,
                tgt_portion=p,
                src_portion=s,
                lr=base_lr / lr_decay**r,
                start_epoch=r * epoch_per_round,
                end_epoch=(r + 1) * epoch_per_round,
                source_seed=seed if source_sample_policy == "cumulative" else r,
            )
        )
        p = _grow(p, step_tgt_port, max_tgt_port)
        s = _grow(s, step_src_port, max_src_port)
    return plans


def source_subset(num_source: int, portion: float, seed: int) -> np.ndarray:
    """Indices of the round's source images: the first int(N·s) of a seeded permutation.

    Uses numpy's legacy ``RandomState`` so the subsets equal the original's
    ``np.random.seed(seed); np.random.choice(N, n, replace=False)``; with a constant seed
    (``cumulative``) each round's subset is a prefix of the next one's.
    """
    count = int(num_source * portion)
    return np.random.RandomState(seed).permutation(num_source)[:count]
