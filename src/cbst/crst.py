"""CRST's confidence regularisers (Zou et al., ICCV 2019) on top of CBST's pseudo-labels.

Two options of ``cbst self-train`` (docs/method.md §13):

- **MRKLD** (model regularisation, ``--mr-weight-kld W``): the training loss adds, per labelled
  pixel of a regularised image, ``w · (−1/C) Σ_c log p_c`` (KL(uniform ‖ p) up to the constant
  log C), averaged over those pixels: :func:`kld_regularizer`. Target images get the weight
  ``--mr-weight-kld``, source images ``--mr-weight-src``.
- **LRENT** (label regularisation, ``--lr-weight-ent α``): soft pseudo-labels
  ``q_c ∝ (p_c / λ_c)^(1/α)`` with an entropy-based keep rule, :func:`soft_pseudo_labels`.
  They are never stored: the training step derives them for each crop from the round's
  probability cache (:class:`cbst.probability_cache.ProbabilityCache`, at the output stride) and λ, by
  resampling the probabilities to the crop's geometry (:meth:`CrstLoss.crop_probabilities`).

Everything is computed in float32 from logarithms (log-softmax, ``logsumexp``), so a zero
probability, a λ of 1 or bf16 logits under autocast give finite values, never ``log(0)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cbst.losses import CrossEntropyLoss
from cbst.priors import apply_prior
from cbst.transforms import crop_grid

_TINY = torch.finfo(torch.float32).tiny


def _log_ratio(probs: Tensor, thresholds: Tensor) -> Tensor:
    """log(p_c / λ_c) in float32, with p and λ floored at the smallest normal float (no log 0)."""
    lam = thresholds.to(device=probs.device, dtype=torch.float32).clamp_min(_TINY).view(1, -1, 1, 1)
    return probs.float().clamp_min(_TINY).log() - lam.log()


def soft_pseudo_labels(probs: Tensor, thresholds: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """LRENT's soft pseudo-labels and the pixels they keep.

    ``q_c = (p_c/λ_c)^(1/α) / Σ_j (p_j/λ_j)^(1/α)``; a pixel is kept when
    ``Σ_c q_c(−log p_c) + α Σ_c q_c log q_c < Σ_c q_c(−log λ_c)``. Substituting ``log q_c``
    turns that rule into ``log Σ_j (p_j/λ_j)^(1/α) > 0``, which is what is evaluated (one
    ``logsumexp``, no cancellation). As α → 0, q becomes one-hot at argmax p/λ and the rule
    becomes CBST's max_c p_c/λ_c > 1.

    Args:
        probs: N×C×H×W class probabilities (times the spatial prior for CBST-SP), ≥ 0.
        thresholds: the round's λ, [C]; a λ of 1 (class never selected) is an ordinary value.
        alpha: α > 0 (``--lr-weight-ent``).

    Returns:
        (soft N×C×H×W float32 summing to 1 over classes, keep N×H×W bool).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if probs.dim() != 4 or thresholds.shape != (probs.shape[1],):
        raise ValueError(
            f"probs {tuple(probs.shape)} and thresholds {tuple(thresholds.shape)} do not match "
            "(expected N×C×H×W and [C])"
        )
    scaled = _log_ratio(probs, thresholds) / alpha
    log_z = torch.logsumexp(scaled, dim=1, keepdim=True)
    return (scaled - log_z).exp(), log_z[:, 0] > 0


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """Per pixel ``−(1/C) Σ_c log softmax(logits)_c`` (N×H×W float32): KL(uniform ‖ p) + log C."""
    return -F.log_softmax(logits.float(), dim=1).mean(dim=1)


def kld_regularizer(logits: Tensor, valid: Tensor) -> Tensor:
    """MRKLD's term: the mean over ``valid`` pixels (N×H×W bool) of ``−(1/C) Σ_c log p_c``.

    ``p = softmax(logits)`` (N×C×H×W, any float dtype; computed in float32). 0 without valid
    pixels.
    """
    per_pixel = uniform_cross_entropy(logits)
    return torch.where(valid, per_pixel, 0.0).sum() / valid.sum().clamp(min=1)


class CrstLoss:
    """The training loss of a CRST round: ``loss(logits, labels, batch)`` for ``train_epochs``.

    - Cross-entropy with the labels (mean over labelled pixels); under LRENT a target crop's
      pixels instead take the soft cross-entropy ``−Σ_c q_c log p̂_c`` over its kept pixels,
      averaged together with the source crops' labelled pixels (source labels stay one-hot).
    - Plus MRKLD: Σ over the labelled (LRENT: kept) pixels of regularised images of
      ``w · (−1/C) Σ_c log p̂_c``, divided by their number; ``w`` is ``mr_weight_kld`` for target
      and ``mr_weight_src`` for source crops (the paper's formula: the weight multiplies once).

    The batch carries ``domain`` (1 for target crops), and for LRENT each crop's target image
    ``index`` and ``geometry`` (see :class:`cbst.transforms.TrainTransform`).

    Args:
        cross_entropy: the cross-entropy, which also aligns logits and labels (cbst's
            :class:`~cbst.losses.CrossEntropyLoss` by default).
        mr_weight_kld: MRKLD weight of target pixels (0: none).
        mr_weight_src: MRKLD weight of source pixels (0: none).
        alpha: LRENT's α (``None``: hard labels).
        cache: the round's probability cache (LRENT), on the training device.
        thresholds: the round's λ, [C] (LRENT).
        prior: the spatial prior C×H×W at the target images' resolution, or None.
    """

    def __init__(
        self,
        *,
        cross_entropy: CrossEntropyLoss | None = None,
        mr_weight_kld: float = 0.0,
        mr_weight_src: float = 0.0,
        alpha: float | None = None,
        cache: Any = None,
        thresholds: Tensor | None = None,
        prior: Tensor | None = None,
    ) -> None:
        if alpha is not None and (cache is None or thresholds is None):
            raise ValueError("LRENT needs the round's probability cache and thresholds")
        self.cross_entropy = cross_entropy or CrossEntropyLoss()
        self.weights = {1: float(mr_weight_kld), 0: float(mr_weight_src)}
        self.alpha, self.cache, self.thresholds, self.prior = alpha, cache, thresholds, prior

    def crop_probabilities(
        self, index: int, geometry: Tensor, crop_hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """(C×h×w probabilities of one target crop, h×w mask of its pixels inside the image).

        The image's probabilities come from the cache (up-sampled exactly as for its
        pseudo-label, times the prior) and are sampled bilinearly at the crop's pixels.
        """
        probs = self.cache.get(index)
        if self.prior is not None:
            probs = apply_prior(probs, self.prior)
        grid, inside = crop_grid(geometry, crop_hw, probs.device)
        sampled = F.grid_sample(
            probs[None], grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        return sampled[0], inside

    def _soft_targets(self, batch: dict, crop_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(soft labels N×C×h×w, keep N×h×w) of the batch's target crops (zeros elsewhere)."""
        domain = batch["domain"]  # on the host: no device sync to find the target crops
        soft = keep = None
        for n in torch.nonzero(domain).flatten().tolist():
            probs, inside = self.crop_probabilities(int(batch["index"][n]), batch["geometry"][n], crop_hw)
            q, kept = soft_pseudo_labels(probs[None], self.thresholds, self.alpha)
            if soft is None:
                soft = q.new_zeros((len(domain),) + q.shape[1:])
                keep = inside.new_zeros((len(domain),) + inside.shape)
            soft[n], keep[n] = q[0], kept[0] & inside
        return soft, keep

    def __call__(self, logits: Tensor, labels: Tensor, batch: dict) -> Tensor:
        """The loss of one batch (logits N×C×h'×w' at the output stride, labels N×h×w)."""
        logits, labels = self.cross_entropy.aligned(logits, labels)
        target = batch["domain"].to(labels.device).bool()
        used = labels != self.cross_entropy.ignore_index
        per_pixel = self.cross_entropy.per_pixel(logits, labels)
        if self.alpha is not None and bool(batch["domain"].any()):
            soft, keep = self._soft_targets(batch, tuple(labels.shape[-2:]))
            soft_ce = -(soft * F.log_softmax(logits, dim=1)).sum(dim=1)
            is_target = target.view(-1, 1, 1)
            per_pixel = torch.where(is_target, soft_ce, per_pixel)
            used = torch.where(is_target, keep, used)
        loss = torch.where(used, per_pixel, 0.0).sum() / used.sum().clamp(min=1)
        return loss + self._mrkld(logits, used, target)

    def _mrkld(self, logits: Tensor, used: Tensor, target: Tensor) -> Tensor:
        """Σ over domains of w · Σ_pixels (−1/C) Σ_c log p_c, over the regularised pixels' count."""
        masks = {d: used & (target == bool(d)).view(-1, 1, 1) for d, w in self.weights.items() if w != 0}
        if not masks:
            return torch.zeros((), device=logits.device)
        total = sum(mask.sum() for mask in masks.values()).clamp(min=1)
        return sum(self.weights[d] * kld_regularizer(logits, m) * m.sum() / total for d, m in masks.items())
