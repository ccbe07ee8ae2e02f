"""The mean teacher of online self-training: an exponential moving average of the student.

After the student's t-th optimiser step (t = 1, 2, ...) every teacher parameter becomes
``α_t·teacher + (1 − α_t)·student`` with ``α_t = min(1 − 1/(t + 1), ema_alpha)`` (DACS and
DAFormer; docs/method.md §14): the teacher follows the student closely at
first (α_1 = 0.5) and ever more slowly until α reaches ``ema_alpha``.

Buffers are **averaged** the same way when they are floating point (batch-norm running means
and variances) and copied when they are integers (``num_batches_tracked``). The teacher labels
in eval mode, where batch norm normalises with its running statistics, so these must follow the
averaged weights; DAFormer averages parameters only and keeps its teacher's batch norm on batch
statistics instead. Eval mode also turns dropout and drop-path off, as DAFormer does.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def ema_alpha_at(step: int, ema_alpha: float) -> float:
    """α after the student's ``step``-th update: min(1 − 1/(step + 1), ema_alpha)."""
    return min(1.0 - 1.0 / (step + 1), ema_alpha)


class MeanTeacher:
    """A frozen copy of the student whose weights follow the student's by EMA."""

    def __init__(self, student: nn.Module, ema_alpha: float) -> None:
        if not 0.0 <= ema_alpha < 1.0:
            raise ValueError(f"ema_alpha must be in [0, 1), got {ema_alpha}")
        self.ema_alpha = ema_alpha
        self.model = copy.deepcopy(student).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """Fold the student in after its ``step``-th optimiser step (one fused op per kind)."""
        weight = 1.0 - ema_alpha_at(step, self.ema_alpha)
        mine = list(self.model.parameters())
        theirs = [p.detach() for p in student.parameters()]
        torch._foreach_lerp_(mine, theirs, weight)
        floats, float_src = [], []
        for t_buf, s_buf in zip(self.model.buffers(), student.buffers()):
            if t_buf.is_floating_point():
                floats.append(t_buf)
                float_src.append(s_buf)
            else:
                t_buf.copy_(s_buf)
        if floats:
            torch._foreach_lerp_(floats, float_src, weight)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax (float32 N×C×H×W) of normalised images, logits up-sampled to the input size."""
        self.model.eval()
        logits = self.model(images).float()
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.softmax(dim=1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
