"""Rare Class Sampling (DAFormer, Hoyer et al. 2022): source images of rare classes drawn more often.

The source labels are counted once (``OUTPUT/rcs_pixel_counts.npy``, one row of per-class pixel
counts per source image, :mod:`cbst.class_counts`). With f_c the share of class c among all
labelled source pixels, a class is drawn with probability

    P(c) = softmax_c((1 − f_c) / T)

over the classes that some source image holds more than ``min_pixels`` pixels of (a class no
image holds enough of cannot be sampled; DAFormer would fail on it). Then one of those images
is drawn uniformly, and its random crop is retried up to ``CROP_ATTEMPTS`` times until it holds
more than ``CROP_RATIO · min_pixels`` pixels of c (the last attempt is kept otherwise). The
probabilities go to ``OUTPUT/rcs_class_probs.json`` (class name -> probability).

Online self-training draws its source crops so (:class:`cbst.online.OnlinePairs`), and source
training with ``--rcs-temperature`` through :class:`RareClassCrops`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from cbst import io

CROP_ATTEMPTS = 10
CROP_RATIO = 0.5
COUNTS_FILE = "rcs_pixel_counts.npy"
PROBS_FILE = "rcs_class_probs.json"


def class_probabilities(counts: np.ndarray, temperature: float, min_pixels: int) -> np.ndarray:
    """P(c) = softmax((1 − f_c)/T) over the classes some image holds > ``min_pixels`` of; 0 elsewhere."""
    if temperature <= 0:
        raise ValueError(f"the RCS temperature must be positive, got {temperature}")
    total = counts.sum()
    freq = counts.sum(0) / max(total, 1)
    eligible = (counts > min_pixels).any(0)
    if not eligible.any():
        raise io.DataError(
            f"no source image holds more than {min_pixels} pixels of any class; lower --rcs-min-pixels"
        )
    logits = np.where(eligible, (1.0 - freq) / temperature, -np.inf)
    logits -= logits[eligible].max()
    probs = np.exp(logits)
    return probs / probs.sum()


class RareClassSampler:
    """Draws (class, source image index) pairs as Rare Class Sampling does."""

    def __init__(self, counts: np.ndarray, temperature: float, min_pixels: int) -> None:
        self.probs = class_probabilities(counts, temperature, min_pixels)
        self.min_pixels = int(min_pixels)
        self.images = [np.flatnonzero(counts[:, c] > min_pixels) for c in range(counts.shape[1])]

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """A class c ~ P, then uniformly an image holding more than ``min_pixels`` of it."""
        c = int(rng.choice(len(self.probs), p=self.probs))
        return c, int(rng.choice(self.images[c]))

    def write_probabilities(self, path: Path, class_names: Sequence[str]) -> None:
        """``rcs_class_probs.json``: class name -> probability (every class, 0 for the ineligible)."""
        io.write_json(path, {name: float(p) for name, p in zip(class_names, self.probs)})


def crop_with_class(
    crop: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]],
    sample: dict[str, Any],
    cls: int,
    min_pixels: int,
    rngs: Callable[[int], np.random.Generator],
) -> dict[str, Any]:
    """``crop(sample, rngs(attempt))`` retried until the crop holds > CROP_RATIO·min_pixels of ``cls``.

    At most ``CROP_ATTEMPTS`` crops; the last is returned when none holds enough.
    """
    for attempt in range(CROP_ATTEMPTS):
        out = crop(sample, rngs(attempt))
        if int((out["label"] == cls).sum()) > CROP_RATIO * min_pixels:
            break
    return out


class RareClassCrops(Dataset):
    """An epoch of ``len(dataset)`` source crops, each image drawn by Rare Class Sampling.

    ``dataset`` serves its images through a ``TrainTransform``; item i of an epoch draws its
    class and image from the transform's stream of (seed, epoch, i) and its crop attempts from
    streams of their own, so an epoch is the same in any process, worker or resumed run.
    """

    def __init__(self, dataset: Any, sampler: RareClassSampler) -> None:
        self.dataset = dataset  # the epoch reaches its transform through here (set_dataset_epoch)
        self.images = dataset.with_transform(None)
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        transform = self.dataset.transform
        cls, image = self.sampler.draw(transform.rng(index))
        return crop_with_class(
            transform.apply,
            self.images[image],
            cls,
            self.sampler.min_pixels,
            lambda attempt: transform.rng(index, attempt),
        )
