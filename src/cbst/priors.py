"""Class-wise spatial priors q_c(y, x) for CBST-SP (docs/method.md §5).

The original only loads a downloaded ``prior_array.mat`` (C × 1024 × 2048, class-first) and
multiplies it into the target softmax maps; no code computes it. This module computes it from
source labels as the paper describes, converts the original file, and applies a prior to
probabilities of any resolution. Choices:

- **Counting**: every label map (trainIds, 255 = ignore) is resized with nearest-neighbour to the
  target resolution ``size`` (GTA5 1052×1914 → Cityscapes 1024×2048) and count_c(y, x) = number of
  maps with class c at (y, x).
- **Smoothing**: a Gaussian of standard deviation ``sigma`` pixels, default 1/30 of the shorter
  side (≈34 px at 1024×2048), i.e. a kernel of ≈200 px: a large window in the spirit of the
  paper, which keeps the coarse layout (sky on top, road at the bottom) and drops scene detail.
- **Normalisation**: q_c = (smoothed count_c + eps) / max_(y,x)(smoothed count_c + eps).
  ``eps`` (in images) is an additive floor, so no location rules a class out completely; a class
  never seen gets a uniform prior of 1 (no spatial information). Scaling each class to a maximum
  of 1 keeps q·p ≤ p ≤ ~1, the range the threshold histograms resolve best, and leaves p unchanged
  where a class is most frequent. Per-class factors cancel inside a class's own threshold
  (λ_c is a quantile of the same scaled values); they only shift the argmax between
  classes, and dividing by the maximum rather than the sum keeps that shift mild (a sum
  normalisation would multiply each class by ~1/(H·W)·(its spatial spread), favouring compact
  classes strongly, and would make the confidences tiny for the global policy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cbst.errors import ConfigError
from cbst.io import DataError, write_npy
from cbst.labels import IGNORE_INDEX
from cbst.transforms import crop_grid

MAT_VARIABLE = "prior_array"


def default_sigma(size: tuple[int, int]) -> float:
    """The default Gaussian standard deviation: 1/30 of the shorter side, in pixels."""
    return min(size) / 30.0


def _resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a trainId map to (H, W) (pixel-centre convention)."""
    if label.shape == size:
        return label
    return cv2.resize(label, (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def _accumulate(counts: np.ndarray, label: np.ndarray, num_classes: int) -> None:
    """Add one label map to counts (C·H·W int32) in place, ignoring IGNORE_INDEX."""
    flat = label.reshape(-1).astype(np.int64)
    position = np.flatnonzero(flat != IGNORE_INDEX)
    classes = flat[position]
    if classes.size and classes.max() >= num_classes:
        raise ValueError(
            f"label value {int(classes.max())} is neither a trainId below {num_classes} nor {IGNORE_INDEX}"
        )
    # Each position carries one class, so the indices are unique and a fancy += is a bincount.
    counts[classes * flat.size + position] += 1


def _normalise(counts: np.ndarray, sigma: float, eps: float) -> np.ndarray:
    """Smooth each class map, add the floor and scale it to a maximum of 1."""
    prior = counts.astype(np.float32)
    for c in range(prior.shape[0]):
        if sigma > 0:
            prior[c] = cv2.GaussianBlur(
                prior[c], (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT
            )
        prior[c] += eps
        prior[c] /= prior[c].max()
    return prior


def compute_spatial_prior(
    label_maps: Iterable[np.ndarray],
    num_classes: int,
    size: tuple[int, int],
    *,
    sigma: float | None = None,
    eps: float = 1.0,
    progress: bool = True,
) -> np.ndarray:
    """The spatial prior (float32 C×H×W, each class max 1, min > 0) of trainId label maps."""
    if eps <= 0:
        raise ConfigError(f"eps must be > 0 so that no location rules a class out, got {eps}")
    height, width = size
    sigma = default_sigma(size) if sigma is None else sigma
    counts = np.zeros(num_classes * height * width, dtype=np.int32)
    if progress:
        from tqdm import tqdm

        total = len(label_maps) if isinstance(label_maps, Sized) else None
        label_maps = tqdm(label_maps, total=total, desc="prior", unit="label")
    for label in label_maps:
        label = np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"expected an H×W trainId map, got shape {label.shape}")
        _accumulate(counts, _resize_label(label.astype(np.uint8), size), num_classes)
    return _normalise(counts.reshape(num_classes, height, width), sigma, eps)


class _LabelMaps:
    """TrainId maps of a dataset's labels (the images are not decoded), with a length for the bar."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self.dataset)):
            label = self.dataset.label(i)
            if label is None:
                raise DataError(f"{self.dataset.samples[i].image}: image has no label to count")
            yield label


def spatial_prior_from_dataset(dataset: Any, size: tuple[int, int], **kw: Any) -> np.ndarray:
    """The spatial prior of a dataset's labels (see ``compute_spatial_prior`` for ``kw``)."""
    return compute_spatial_prior(_LabelMaps(dataset), dataset.protocol.num_classes, size, **kw)


def _read_array(path: Path) -> np.ndarray:
    """The raw array of a .npy or the original's .mat prior file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() == ".mat":
        try:
            import scipy.io  # optional: only the original's .mat priors need it
        except ImportError:
            raise DataError(
                f"{path}: reading a MATLAB .mat prior needs scipy (pip install 'cbst[mat]'), "
                "or convert it once with 'cbst prior' on a machine that has it"
            ) from None
        try:
            data = scipy.io.loadmat(str(path))
        except NotImplementedError:
            raise DataError(
                f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save it with save(..., '-v7')"
            ) from None
        except (scipy.io.matlab.MatReadError, OSError, ValueError, TypeError) as exc:
            raise DataError(f"{path}: cannot read MATLAB file ({exc})") from None
        if MAT_VARIABLE not in data:
            names = sorted(k for k in data if not k.startswith("__"))
            raise DataError(f"{path}: no variable {MAT_VARIABLE!r} (found: {names})")
        return np.asarray(data[MAT_VARIABLE])
    _check_npy_header(path)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read .npy file ({exc})") from None


def _check_npy_header(path: Path) -> None:
    """Refuse a .npy file whose header declares more data than the file holds, before loading.

    ``np.load`` allocates what the header declares first: a 100-byte file claiming 700 GiB
    would exhaust memory.
    """
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(fh, max_header_size=10000)
            start = fh.tell()
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: not a .npy file ({exc})") from None
    if dtype.kind not in "biuf":
        raise DataError(f"{path}: prior of dtype {dtype} (expected float32 probabilities in [0, 1])")
    needed = math.prod(shape) * dtype.itemsize
    available = path.stat().st_size - start
    if needed > available:
        raise DataError(
            f"{path}: header declares a {dtype} array of shape {shape} ({needed} bytes) but the file "
            f"holds {available} bytes of data (truncated or damaged)"
        )


PRIOR_SLACK = 1e-3
"""How far above 1 a prior value may lie (rounding in other tools' conversions)."""


def _check_values(path: Path, prior: np.ndarray) -> None:
    """A prior is a per-class map in [0, 1] with some mass in every class."""
    if not np.isfinite(prior).all() or (prior < 0).any():
        raise DataError(f"{path}: prior holds negative or non-finite values")
    if prior.max() > 1 + PRIOR_SLACK:
        raise DataError(
            f"{path}: prior values reach {float(prior.max()):g}, above 1 (0-255 image values?); "
            "a prior holds per-class weights in [0, 1]"
        )
    empty = [c for c in range(prior.shape[0]) if not prior[c].any()]
    if empty:
        raise DataError(
            f"{path}: prior is zero everywhere for class(es) {empty}, which would never be "
            "pseudo-labelled; recount it ('cbst prior') with --eps > 0"
        )


def _resize_prior(prior: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a C×h×w prior to (H, W) (half-pixel convention, like apply_prior)."""
    out = F.interpolate(torch.from_numpy(prior)[None], size=size, mode="bilinear", align_corners=False)
    return out[0].numpy()


def load_prior(path: str | Path, num_classes: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """A prior as float32 C×H×W from .npy or the original's ``prior_array.mat``.

    Class-first (C, H, W) is expected, as the original uses; an (H, W, C) array is accepted and
    transposed (class-first wins when both readings fit). Resized bilinearly to ``size`` if given.
    """
    path = Path(path)
    array = _read_array(path)
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 3-D prior ({num_classes}×H×W), got shape {array.shape}")
    if array.shape[0] != num_classes:
        if array.shape[2] != num_classes:
            raise DataError(
                f"{path}: prior has shape {array.shape}, expected {num_classes} "
                f"classes first ({num_classes}×H×W) or last (H×W×{num_classes})"
            )
        array = array.transpose(2, 0, 1)
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: prior of dtype {array.dtype} (expected float32 probabilities in [0, 1])")
    if 0 in array.shape:
        raise DataError(f"{path}: empty prior of shape {array.shape}")
    prior = np.ascontiguousarray(array, dtype=np.float32)
    _check_values(path, prior)
    if size is not None and prior.shape[1:] != tuple(size):
        prior = _resize_prior(prior, tuple(size))
    return prior


def save_prior(path: str | Path, prior: np.ndarray) -> None:
    """Write a C×H×W prior as a float32 .npy, atomically."""
    prior = np.asarray(prior, dtype=np.float32)
    if prior.ndim != 3:
        raise ValueError(f"expected a C×H×W prior, got shape {prior.shape}")
    write_npy(path, prior)


def apply_prior(probs: Tensor, prior: Tensor | np.ndarray) -> Tensor:
    """probs (N×C×H×W or C×H×W) times the prior, resized bilinearly on probs' device to H×W."""
    prior = torch.as_tensor(prior).to(device=probs.device, dtype=probs.dtype)
    if prior.dim() != 3 or prior.shape[0] != probs.shape[-3]:
        raise ValueError(f"prior {tuple(prior.shape)} does not match probabilities {tuple(probs.shape)}")
    if prior.shape[1:] != probs.shape[-2:]:
        prior = F.interpolate(
            prior[None], size=tuple(probs.shape[-2:]), mode="bilinear", align_corners=False
        )[0]
    return probs * prior


def prior_at_crops(prior: Tensor, geometries: Tensor, crop_hw: tuple[int, int]) -> Tensor:
    """The prior (C×H×W, of the whole image at any resolution) sampled bilinearly at the pixels
    of training crops: N×C×h×w for the crops' N geometries (:func:`cbst.transforms.crop_grid`;
    pixels outside the image take the border's value)."""
    grids = torch.cat([crop_grid(g, crop_hw, prior.device)[0] for g in geometries])
    source = prior[None].expand(len(grids), -1, -1, -1)
    return F.grid_sample(source, grids, mode="bilinear", padding_mode="border", align_corners=False)
