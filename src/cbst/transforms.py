"""Training-time augmentation: random scale, (mined) crop and horizontal flip.

One ``TrainTransform`` serves source training and self-training (docs/method.md §7.1, §6.2, §2). Its
random numbers come from ``np.random.default_rng([seed, epoch, index])``, so a sample's crop
depends only on the seed, the epoch and the image index: not on the number of data-loader
workers, their scheduling, or whether the run was restarted.

Crops leave the transform as uint8 tensors (image 3 x H x W RGB, label H x W trainIds with
255 = ignore): a quarter of the bytes of float32 to collate, pin and copy to the device, where
``train_epochs`` normalises them with :func:`cbst.inference.normalize`.

Loss convention: the transform returns the full-resolution crop label and the training step
up-samples the logits bilinearly to the crop size (the CRST-PT convention, docs/method.md §7.2). CBST-MX
instead kept the stride-8 logits and sampled the label at the cell centres 4 + 8j (docs/method.md §12.4).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from cbst.labels import IGNORE_INDEX
from cbst.mining import MiningPlan, choose_mined_center, crop_window
from cbst.models import IMAGENET_MEAN

cv2.setNumThreads(0)  # OpenCV's pool competes with PyTorch's and the loader workers'


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from an int or a pair, checked positive."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0:
        raise ValueError(f"crop size must be positive, got {size!r}")
    return h, w


def scale_factor(
    rng: np.random.Generator,
    image_hw: tuple[int, int],
    scale_range: tuple[float, float],
    reference_long_side: int | None,
) -> float:
    """Resize factor ρ·L / long side (against a reference long side L) or ρ (against the image)."""
    rho = float(rng.uniform(scale_range[0], scale_range[1]))
    if reference_long_side is None:
        return rho
    return rho * reference_long_side / max(image_hw)


def resize_pair(image: np.ndarray, label: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale an image (area when shrinking, bilinear when enlarging) and its label (nearest)."""
    h, w = label.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))  # cv2 wants (width, height)
    if size == (w, h):
        return image, label
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return (
        cv2.resize(image, size, interpolation=interp),
        cv2.resize(label, size, interpolation=cv2.INTER_NEAREST),
    )


def extract_window(array: np.ndarray, y0: int, x0: int, crop_hw: tuple[int, int], fill: Any) -> np.ndarray:
    """The crop_hw window at (y0, x0); the parts outside ``array`` are filled with ``fill``."""
    ch, cw = crop_hw
    h, w = array.shape[:2]
    out = np.empty((ch, cw) + array.shape[2:], dtype=array.dtype)
    out[...] = fill
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + ch, h), min(x0 + cw, w)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = array[sy0:sy1, sx0:sx1]
    return out


def random_window(
    rng: np.random.Generator, image_hw: tuple[int, int], crop_hw: tuple[int, int]
) -> tuple[int, int]:
    """A uniform window origin; where the image is smaller than the crop it floats inside it."""
    return tuple(
        int(rng.integers(min(0, n - c), max(0, n - c) + 1))  # type: ignore[return-value]
        for n, c in zip(image_hw, crop_hw)
    )


def crop_grid(
    geometry: torch.Tensor, crop_hw: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid 1×h×w×2 for ``grid_sample``, inside mask h×w) of one training crop.

    ``geometry`` is the transform's (scaled height, scaled width, top, left, flipped): crop
    pixel (i, j) shows pixel (top + i, left + j) of the image resized to the scaled size,
    mirrored when flipped. Half-pixel centres, as the loader's resize uses.
    """
    sh, sw, top, left, flipped = (int(v) for v in geometry)
    ys = torch.arange(top, top + crop_hw[0], device=device, dtype=torch.float32)
    xs = torch.arange(left, left + crop_hw[1], device=device, dtype=torch.float32)
    if flipped:
        xs = xs.flip(0)
    inside = ((ys >= 0) & (ys < sh))[:, None] & ((xs >= 0) & (xs < sw))[None, :]
    gy, gx = torch.meshgrid((2 * ys + 1) / sh - 1, (2 * xs + 1) / sw - 1, indexing="ij")
    return torch.stack((gx, gy), dim=-1)[None], inside


class TrainTransform:
    """Random scale, crop (mined with probability ``mining.port``) and flip, as uint8 tensors.

    Pixels outside the image are filled with the ``mean`` colour (0 after normalisation) and
    labelled 255 (ignored). Each crop also carries its ``domain`` (a tag: 0 source, 1 target)
    and ``geometry`` (scaled height, scaled width, top, left, flipped), from which CRST's LRENT
    resamples the image's cached probabilities to the crop (:mod:`cbst.crst`).
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int],
        *,
        scale_range: tuple[float, float] = (0.7, 1.3),
        reference_long_side: int | None = None,
        flip: bool = True,
        mining: MiningPlan | None = None,
        seed: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        domain: int = 0,
    ) -> None:
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale range must satisfy 0 < lo <= hi, got {scale_range!r}")
        if reference_long_side is not None and reference_long_side <= 0:
            raise ValueError(f"reference long side must be positive, got {reference_long_side}")
        self.crop_hw = _pair(crop_size)
        self.scale_range = (lo, hi)
        self.reference_long_side = reference_long_side
        self.flip = flip
        self.mining = mining
        self.seed = int(seed)
        self.fill = tuple(round(255 * float(m)) for m in mean)
        self.domain = int(domain)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random stream (call before each epoch's loader is created)."""
        self.epoch = int(epoch)

    def set_mining(self, plan: MiningPlan | None) -> None:
        """Use a new rare-class mining plan (each self-training round has its own), or none."""
        self.mining = plan

    def rng(self, index: int, *tail: int) -> np.random.Generator:
        """The random stream of one sample in the current epoch (``tail``: a further stream of
        that sample's, e.g. one per attempt of a retried crop)."""
        return np.random.default_rng([self.seed, self.epoch, int(index), *tail])

    def _window(self, rng: np.random.Generator, label: np.ndarray) -> tuple[int, int]:
        """A mined window with probability ``mining.port`` when a candidate exists, else random."""
        if self.mining is not None:  # it draws whether to mine, with probability ``mining.port``
            center = choose_mined_center(label, self.mining, rng)
            if center is not None:
                y0, x0 = crop_window(center, self.crop_hw, label.shape)
                return int(y0), int(x0)
        return random_window(rng, label.shape, self.crop_hw)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Augment one dataset sample into a uint8 3 x H x W image and a uint8 H x W label."""
        return self.apply(sample, self.rng(sample["index"]))

    def apply(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """``__call__`` with the caller's random stream (online training draws its own)."""
        image, label = sample["image"], sample["label"]
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"{sample.get('name')}: image {image.shape[:2]} and label {label.shape} sizes differ"
            )
        factor = scale_factor(rng, label.shape, self.scale_range, self.reference_long_side)
        image, label = resize_pair(image, label, factor)
        y0, x0 = self._window(rng, label)
        scaled_hw = label.shape
        image = extract_window(image, y0, x0, self.crop_hw, self.fill)
        label = extract_window(label, y0, x0, self.crop_hw, IGNORE_INDEX)
        flipped = self.flip and rng.random() < 0.5
        if flipped:
            image, label = image[:, ::-1], label[:, ::-1]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(np.ascontiguousarray(label)),
            "name": sample["name"],
            "index": sample["index"],
            "domain": self.domain,
            "geometry": torch.tensor([*scaled_hw, y0, x0, int(flipped)]),
        }
