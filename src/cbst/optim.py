"""Optimisers and learning-rate schedules, built from the model's parameter groups and the config.

Every network gives its parameter groups with lr and weight-decay multipliers
(:meth:`cbst.models.base.SegmentationNet.lr_groups`, in its family's convention: DeepLab's head
x10, ResNet-38's biases x2 without decay). :func:`build_optimizer` turns them into an optimiser
by name: ``sgd`` (the original codes', with momentum) or ``adamw`` (the transformer recipe:
DAFormer trains with AdamW, lr 6e-5, weight decay 0.01 and the head at x10). :func:`lr_at` is
the schedule: one of the original's policies over the whole run, optionally after a linear
warm-up of ``warmup_iters`` iterations (DAFormer: 1,500, then poly with power 1.0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cbst.config import LR_POLICIES, OPTIMIZERS

WARMUP_RATIO = 1e-6
"""The warm-up starts at this fraction of the scheduled lr (mmcv's and DAFormer's value)."""


def _groups(model_or_groups: nn.Module | Sequence[dict]) -> list[dict]:
    """The parameter groups of a model (its ``lr_groups()``) or the groups given."""
    if isinstance(model_or_groups, nn.Module):
        return list(model_or_groups.lr_groups())
    return list(model_or_groups)


def build_optimizer(
    model_or_groups: nn.Module | Sequence[dict],
    base_lr: float,
    *,
    name: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The optimiser ``name`` with one group per parameter group, scaled by its multipliers.

    Each group ``{"params", "lr_mult", "wd_mult"}`` gets ``lr = base_lr * lr_mult`` and
    ``weight_decay = weight_decay * wd_mult``, and keeps its multipliers so that :func:`set_lr`
    can follow the schedule. ``momentum`` is SGD's; ``betas`` AdamW's (its decay is decoupled).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    groups = []
    for group in _groups(model_or_groups):
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        lr_mult, wd_mult = float(group.get("lr_mult", 1.0)), float(group.get("wd_mult", 1.0))
        groups.append(
            {
                "params": params,
                "lr": base_lr * lr_mult,
                "weight_decay": weight_decay * wd_mult,
                "lr_mult": lr_mult,
                "wd_mult": wd_mult,
            }
        )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=base_lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay)


def lr_at(
    policy: str,
    base_lr: float,
    it: int,
    total: int,
    *,
    steps: Sequence[int] = (),
    power: float = 0.9,
    warmup_iters: int = 0,
) -> float:
    """The learning rate of iteration ``it`` of ``total`` under one of the original's policies.

    With ``warmup_iters`` > 0 the first iterations scale it linearly from
    :data:`WARMUP_RATIO` of its value up to all of it at iteration ``warmup_iters``
    (``lr * (1 - (1 - it / warmup_iters) * (1 - WARMUP_RATIO))``, as mmcv's linear warm-up).
    """
    progress = min(max(it, 0) / max(total, 1), 1.0)
    if policy == "fixed":
        lr = base_lr
    elif policy == "poly":
        lr = max(base_lr * (1.0 - progress) ** power, min(base_lr / 100, 1e-8))
    elif policy == "linear":
        lr = max(base_lr * (1.0 - progress), min(base_lr / 100, 1e-6))
    elif policy == "step":
        lr = base_lr * 0.1 ** sum(1 for s in steps if it >= s)
    else:
        raise ValueError(f"unknown lr policy {policy!r}; expected one of {', '.join(LR_POLICIES)}")
    if warmup_iters > 0 and it < warmup_iters:
        lr *= 1.0 - (1.0 - max(it, 0) / warmup_iters) * (1.0 - WARMUP_RATIO)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times the group's stored multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
