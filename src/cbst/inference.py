"""Model inference shared by evaluation and the pseudo-label pass.

Follows the original CBST-MX test procedure (spec §2.1, §5.1): resize so the longer side equals
``long_side``, normalise with the ImageNet RGB mean/std (spec §7.3), pad bottom/right with zeros
(after normalisation, i.e. with the mean colour) to a multiple of 8, forward, softmax, optionally
average with the horizontally flipped pass, and bring the probabilities back to the original
resolution. Deviations from the original, all deliberate:

- up-sampling is bilinear on the device instead of per-class bicubic on the CPU, and the result
  is a proper probability map (the original's bicubic maps overshoot [0, 1] slightly);
- several scale factors may be given; their *probabilities* are averaged, as CRST's pseudo-label
  pass does. CRST's test pass averaged *logits* instead (spec §5.2); the two agree on the argmax
  in the vast majority of pixels, and probabilities are what pseudo-labelling needs;
- optional sliding-window inference (``window``) bounds the memory of very large inputs.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbst.device import autocast
from cbst.models import IMAGENET_MEAN, IMAGENET_STD

PAD_MULTIPLE = 8
"""The network's output stride: inputs are zero-padded to a multiple of it (spec §2.1 step 4)."""


def _identity(item: dict) -> dict:
    """Collate function that leaves a single dataset item as it is (numpy arrays stay numpy)."""
    return item


def image_batches(dataset: Any, batch_size: int = 1, *,
                  num_workers: int = 0) -> Iterator[tuple[Tensor, list[dict]]]:
    """(uint8 N×3×H×W tensor, items) of consecutive equal-size images, in dataset order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False,
                                         num_workers=num_workers, collate_fn=_identity)
    batch: list[dict] = []
    for item in loader:
        if batch and (len(batch) == batch_size or item["image"].shape != batch[0]["image"].shape):
            yield _stack_images(batch), batch
            batch = []
        batch.append(item)
    if batch:
        yield _stack_images(batch), batch


def _stack_images(items: list[dict]) -> Tensor:
    """The items' H×W×3 uint8 images as one N×3×H×W tensor."""
    return torch.from_numpy(np.stack([item["image"] for item in items])).permute(0, 3, 1, 2)


def normalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """uint8 RGB images (N,3,H,W or N,H,W,3) -> float32 (N,3,H,W) ``(x/255 - mean)/std``.

    A tensor whose dimension 1 has size 3 is taken as channels-first. Computed as products with
    float32 reciprocals, which gives bit for bit the values of the numpy path that training
    crops were normalised with before they were shipped as uint8 (so CPU training is unchanged).
    """
    if images.ndim != 4:
        raise ValueError(f"expected a 4-D image batch, got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        if images.shape[3] != 3:
            raise ValueError(f"expected 3 RGB channels, got shape {tuple(images.shape)}")
        images = images.permute(0, 3, 1, 2)
    x = images.float().mul_(1.0 / 255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).mul_(s.reciprocal()).contiguous()


def long_side_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after resizing so that the longer side equals ``long_side`` (aspect ratio kept)."""
    factor = long_side / max(height, width)
    return _scaled_size(height, width, factor)


def _scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(h, w) multiplied by ``factor`` and rounded, never below one pixel."""
    return max(1, round(height * factor)), max(1, round(width * factor))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of an NCHW float tensor; antialiased when it shrinks (cf. PIL in §2.1)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter (``fallback`` for a parameter-free model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


def _forward_padded(model: nn.Module, x: Tensor, amp: bool) -> Tensor:
    """Softmax probabilities (float32, same H x W as ``x``) of one zero-padded forward pass."""
    h, w = x.shape[-2:]
    ph = math.ceil(h / PAD_MULTIPLE) * PAD_MULTIPLE
    pw = math.ceil(w / PAD_MULTIPLE) * PAD_MULTIPLE
    padded = F.pad(x, (0, pw - w, 0, ph - h)) if (ph, pw) != (h, w) else x
    with autocast(x.device, enabled=amp):
        logits = model(padded)
    probs = logits.float().softmax(dim=1)
    probs = F.interpolate(probs, size=(ph, pw), mode="bilinear", align_corners=False)
    return probs[:, :, :h, :w]


def _tile_starts(length: int, tile: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with about 1/3 overlap."""
    if length <= tile:
        return [0]
    stride = max(1, math.ceil(tile * 2 / 3))
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _forward_windowed(model: nn.Module, x: Tensor, window: int | None, amp: bool) -> Tensor:
    """Probabilities of ``x``, by sliding ``window``-px tiles when the longer side exceeds it."""
    h, w = x.shape[-2:]
    if window is None or max(h, w) <= window:
        return _forward_padded(model, x, amp)
    th, tw = min(window, h), min(window, w)
    total: Tensor | None = None
    count = torch.zeros((1, 1, h, w), dtype=torch.float32, device=x.device)
    for top in _tile_starts(h, th):
        for left in _tile_starts(w, tw):
            probs = _forward_padded(model, x[:, :, top:top + th, left:left + tw], amp)
            if total is None:
                total = x.new_zeros((x.shape[0], probs.shape[1], h, w), dtype=torch.float32)
            total[:, :, top:top + th, left:left + tw] += probs
            count[:, :, top:top + th, left:left + tw] += 1
    return total / count


def _forward_flip(model: nn.Module, x: Tensor, flip: bool, window: int | None, amp: bool) -> Tensor:
    """Probabilities of ``x``, averaged with those of its mirror image when ``flip`` is set."""
    probs = _forward_windowed(model, x, window, amp)
    if flip:
        mirrored = _forward_windowed(model, x.flip(-1), window, amp).flip(-1)
        probs = (probs + mirrored) / 2
    return probs


@torch.no_grad()
def predict_probs(model: nn.Module, images: Tensor, *, long_side: int | None = None,
                  scales: Sequence[float] = (1.0,), flip: bool = False, window: int | None = None,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  amp: bool = True) -> Tensor:
    """Softmax probabilities (N,C,H,W float32, on the model's device) at the input resolution.

    ``images`` is a uint8 RGB batch of equal-size images. ``long_side`` resizes the longer side
    first (the original's ``--test-scales``); each factor in ``scales`` then rescales that,
    and the per-scale probabilities, brought back to H x W, are averaged arithmetically.
    """
    if not scales:
        raise ValueError("scales must hold at least one factor")
    if any(s <= 0 for s in scales) or (long_side is not None and long_side <= 0):
        raise ValueError(f"scales and long_side must be positive (got {scales}, {long_side})")
    model.eval()
    device = _model_device(model, images.device)
    x = normalize(images.to(device), mean, std)
    height, width = x.shape[-2:]
    base = long_side_size(height, width, long_side) if long_side else (height, width)
    x = _resize(x, base)
    result: Tensor | None = None
    for factor in scales:
        scaled = _resize(x, _scaled_size(base[0], base[1], factor))
        probs = _resize(_forward_flip(model, scaled, flip, window, amp), (height, width))
        result = probs if result is None else result + probs
    return result / len(scales)


@torch.no_grad()
def predict_labels(model: nn.Module, images: Tensor, **kwargs) -> Tensor:
    """Arg-max trainIds (N,H,W int64) of :func:`predict_probs` (same keyword options)."""
    return predict_probs(model, images, **kwargs).argmax(dim=1)
