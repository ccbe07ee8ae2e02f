"""Model inference shared by evaluation and the pseudo-label pass.

Follows the original CBST-MX test procedure (docs/method.md §4.1, §8.1): resize so the longer side equals
``long_side``, normalise with the model's RGB mean/std (ImageNet's, docs/method.md §10.3), pad bottom/right with
zeros (after normalisation, i.e. with the mean colour) to a multiple of the model's
``pad_multiple`` (8 for cbst's networks), forward, softmax, optionally
average with the horizontally flipped pass, and bring the probabilities back to the original
resolution. Deviations from the original, all deliberate:

- up-sampling is bilinear on the device instead of per-class bicubic on the CPU, and the result
  is a proper probability map (the original's bicubic maps overshoot [0, 1] slightly);
- several scale factors may be given; their *probabilities* are averaged, as CRST's pseudo-label
  pass does. CRST's test pass averaged *logits* instead (docs/method.md §12.9); the two agree on the argmax
  in the vast majority of pixels, and probabilities are what pseudo-labelling needs;
- optional sliding-window inference (``window``) bounds the memory of very large inputs.

Without a window, ``predict_probs`` is :func:`network_outputs` (the forward passes, kept at the
network's output stride) followed by :func:`combine_outputs` (deterministic up-sampling and
averaging), so a cache of the former reproduces it bit for bit (``cbst.pseudo_labels``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbst import signals
from cbst.device import autocast, prefers_channels_last
from cbst.io import DataError
from cbst.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PLAIN_MODULE_GEOMETRY,
    Geometry,
    geometry,
    round_to_stride,
)


def _identity(item: dict) -> dict:
    """Collate function that leaves a single dataset item as it is (numpy arrays stay numpy)."""
    return item


class _Failure:
    """A ``DataError`` raised while loading an item, carried out of a loader worker as a value."""

    def __init__(self, error: DataError) -> None:
        self.error = error


class _Guarded(torch.utils.data.Dataset):
    """A dataset whose ``DataError``s come back as :class:`_Failure` items."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except DataError as exc:
            return _Failure(exc)


def loaded_items(dataset: Any, num_workers: int = 0) -> Iterator[Any]:
    """The dataset's items in order, loaded by ``num_workers`` prefetching processes (0: here).

    A ``DataError`` raised in a worker is raised here as it was, a one-line message naming the
    file, not wrapped in the loader's multi-line report.
    """
    loader = torch.utils.data.DataLoader(
        _Guarded(dataset),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
        worker_init_fn=signals.quiet_worker,
    )
    for item in loader:
        if isinstance(item, _Failure):
            raise item.error
        yield item


def image_batches(
    dataset: Any, batch_size: int = 1, *, num_workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[Tensor, list[dict]]]:
    """(uint8 N×3×H×W tensor, items) of consecutive equal-size images, in dataset order.

    Items are decoded by ``num_workers`` loader processes (in the main process when 0), which
    prefetch ahead of the consumer. ``pin_memory`` returns page-locked batches, so that a
    ``.to("cuda", non_blocking=True)`` copy overlaps with the GPU's work.
    """
    batch: list[dict] = []
    for item in loaded_items(dataset, num_workers):
        if batch and (len(batch) == batch_size or item["image"].shape != batch[0]["image"].shape):
            yield _stack_images(batch, pin_memory), batch
            batch = []
        batch.append(item)
    if batch:
        yield _stack_images(batch, pin_memory), batch


def _stack_images(items: list[dict], pin_memory: bool) -> Tensor:
    """The items' H×W×3 uint8 images as one N×3×H×W tensor (page-locked with ``pin_memory``)."""
    stacked = torch.from_numpy(np.stack([item["image"] for item in items]))
    return (stacked.pin_memory() if pin_memory else stacked).permute(0, 3, 1, 2)


def normalize(
    images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
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


def image_size(images: Tensor) -> tuple[int, int]:
    """(H, W) of a uint8 batch laid out as :func:`normalize` reads it (N,3,H,W or N,H,W,3)."""
    return tuple(images.shape[2:4]) if images.shape[1] == 3 else tuple(images.shape[1:3])


def long_side_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) after resizing so that the longer side equals ``long_side`` (aspect ratio kept)."""
    factor = long_side / max(height, width)
    return _scaled_size(height, width, factor)


def _scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(h, w) multiplied by ``factor`` and rounded, never below one pixel."""
    return max(1, round(height * factor)), max(1, round(width * factor))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of an NCHW float tensor; antialiased when it shrinks (docs/method.md §4.1).

    CBST-MX shrank with PIL's Lanczos filter; antialiasing plays that part here.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _input_stats(
    geo: Geometry, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) to normalise with: those given, else the model's."""
    return (geo.input_mean if mean is None else mean), (geo.input_std if std is None else std)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    """The device of the model's first parameter (``fallback`` for a parameter-free model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


def _forward_padded(model: nn.Module, x: Tensor, amp: bool, multiple: int) -> Tensor:
    """Softmax probabilities (float32) at the network's output resolution of one forward pass
    of ``x`` zero-padded bottom/right to a multiple of ``multiple`` (the model's ``pad_multiple``,
    docs/method.md §4.1, step 3)."""
    h, w = x.shape[-2:]
    ph, pw = _padded_size(h, w, multiple)
    padded = F.pad(x, (0, pw - w, 0, ph - h)) if (ph, pw) != (h, w) else x
    with autocast(x.device, enabled=amp):
        logits = model(padded)
    return logits.float().softmax(dim=1)


def _padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """(h, w) rounded up to a multiple of ``multiple``."""
    return round_to_stride(height, multiple), round_to_stride(width, multiple)


def _upsample_cropped(probs: Tensor, size: tuple[int, int], multiple: int) -> Tensor:
    """Output-stride probabilities of a pass padded to ``multiple``, up-sampled to the padded
    size and cropped back to the ``size`` (h, w) of the unpadded input."""
    probs = F.interpolate(probs, size=_padded_size(*size, multiple), mode="bilinear", align_corners=False)
    return probs[:, :, : size[0], : size[1]]


def _tile_starts(length: int, tile: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with about 1/3 overlap."""
    if length <= tile:
        return [0]
    stride = max(1, math.ceil(tile * 2 / 3))
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _forward_windowed(model: nn.Module, x: Tensor, window: int | None, amp: bool, multiple: int) -> Tensor:
    """Probabilities of ``x`` at its resolution, by sliding ``window``-px tiles when the longer
    side exceeds it (each padded to ``multiple``)."""
    h, w = x.shape[-2:]
    if window is None or max(h, w) <= window:
        return _upsample_cropped(_forward_padded(model, x, amp, multiple), (h, w), multiple)
    th, tw = min(window, h), min(window, w)
    total: Tensor | None = None
    count = torch.zeros((1, 1, h, w), dtype=torch.float32, device=x.device)
    for top in _tile_starts(h, th):
        for left in _tile_starts(w, tw):
            tile = x[:, :, top : top + th, left : left + tw]
            probs = _upsample_cropped(_forward_padded(model, tile, amp, multiple), (th, tw), multiple)
            if total is None:
                total = x.new_zeros((x.shape[0], probs.shape[1], h, w), dtype=torch.float32)
            total[:, :, top : top + th, left : left + tw] += probs
            count[:, :, top : top + th, left : left + tw] += 1
    return total / count


@dataclass(frozen=True)
class InferencePlan:
    """Which forward passes test-time augmentation runs: the long-side resize, the scale
    factors and the horizontal flip (see :func:`predict_probs`), and the multiple every pass is
    padded to: the network's ``pad_multiple`` (:meth:`for_model` takes it from the model)."""

    long_side: int | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    pad_multiple: int = PLAIN_MODULE_GEOMETRY.pad_multiple

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        long_side: int | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
    ) -> InferencePlan:
        """The plan of these passes for ``model``, padded to its ``pad_multiple``."""
        return cls(long_side, tuple(scales), flip, geometry(model).pad_multiple)

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError("scales must hold at least one factor")
        if any(s <= 0 for s in self.scales) or (self.long_side is not None and self.long_side <= 0):
            raise ValueError(f"scales and long_side must be positive (got {self.scales}, {self.long_side})")
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be positive, got {self.pad_multiple}")

    def base_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the long-side resize (unchanged without one)."""
        return long_side_size(height, width, self.long_side) if self.long_side else (height, width)

    def pass_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Input size (h, w) of every forward pass, in pass order (each scale, then its mirror)."""
        base = self.base_size(height, width)
        sizes = [_scaled_size(base[0], base[1], factor) for factor in self.scales]
        return [size for size in sizes for _ in range(1 + self.flip)]


def _pass_inputs(x: Tensor, plan: InferencePlan) -> Iterator[Tensor]:
    """The normalised inputs of every forward pass of ``plan``, in pass order."""
    x = _resize(x, plan.base_size(*x.shape[-2:]))
    for size in plan.pass_sizes(*x.shape[-2:])[:: 1 + plan.flip]:
        scaled = _resize(x, size)
        yield scaled
        if plan.flip:
            yield scaled.flip(-1)


def _merge_passes(passes: Iterator[Tensor], plan: InferencePlan, size: tuple[int, int]) -> Tensor:
    """Average each scale's pass with its mirrored pass (flipped back), bring every scale to
    ``size`` and average the scales; ``passes`` are probabilities at their pass's input size."""
    result: Tensor | None = None
    for _ in plan.scales:
        probs = next(passes)
        if plan.flip:
            probs = (probs + next(passes).flip(-1)) / 2
        probs = _resize(probs, size)
        result = probs if result is None else result + probs
    return result / len(plan.scales)


@torch.no_grad()
def network_outputs(
    model: nn.Module,
    images: Tensor,
    plan: InferencePlan,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    amp: bool = True,
) -> list[Tensor]:
    """The network half of :func:`predict_probs`: one float32 N×C×h×w softmax map at the
    network's output resolution per forward pass of ``plan`` (a mirrored pass stays mirrored).

    :func:`combine_outputs` turns them into what ``predict_probs`` returns, bit for bit. Where
    :func:`~cbst.device.prefers_channels_last` says so, the model and its inputs are switched
    to channels-last (``images`` may be page-locked: its copy to the device does not block).
    ``mean``/``std`` default to the model's ``input_mean``/``input_std``; ``plan`` must pad to
    the model's ``pad_multiple`` (:meth:`InferencePlan.for_model`).
    """
    geo = geometry(model)
    if plan.pad_multiple != geo.pad_multiple:
        raise ValueError(f"the plan pads to {plan.pad_multiple}, the model to {geo.pad_multiple}")
    model.eval()
    device = _model_device(model, images.device)
    x = normalize(images.to(device, non_blocking=True), *_input_stats(geo, mean, std))
    if prefers_channels_last(device, amp):
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return [_forward_padded(model, inputs, amp, plan.pad_multiple) for inputs in _pass_inputs(x, plan)]


def combine_outputs(outputs: Sequence[Tensor], plan: InferencePlan, size: tuple[int, int]) -> Tensor:
    """The deterministic half of :func:`predict_probs`: up-sample, flip-average and
    scale-average the :func:`network_outputs` of images of ``size`` (h, w) -> N×C×h×w."""
    sizes = plan.pass_sizes(*size)
    if len(outputs) != len(sizes):
        raise ValueError(f"{len(outputs)} network outputs for a plan of {len(sizes)} passes")
    passes = (_upsample_cropped(out.float(), s, plan.pad_multiple) for out, s in zip(outputs, sizes))
    return _merge_passes(passes, plan, size)


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: Tensor,
    *,
    long_side: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    amp: bool = True,
) -> Tensor:
    """Softmax probabilities (N,C,H,W float32, on the model's device) at the input resolution.

    ``images`` is a uint8 RGB batch of equal-size images. ``long_side`` resizes the longer side
    first (the original's ``--test-scales``); each factor in ``scales`` then rescales that,
    and the per-scale probabilities, brought back to H x W, are averaged arithmetically. Inputs
    are normalised with ``mean``/``std`` (the model's by default) and padded to the model's
    ``pad_multiple``.
    """
    plan = InferencePlan.for_model(model, long_side, scales, flip)
    size = image_size(images)
    if window is None:
        return combine_outputs(network_outputs(model, images, plan, mean=mean, std=std, amp=amp), plan, size)
    geo = geometry(model)
    model.eval()
    x = normalize(images.to(_model_device(model, images.device)), *_input_stats(geo, mean, std))
    multiple = plan.pad_multiple
    passes = (_forward_windowed(model, inputs, window, amp, multiple) for inputs in _pass_inputs(x, plan))
    return _merge_passes(passes, plan, size)


@torch.no_grad()
def predict_labels(model: nn.Module, images: Tensor, **kwargs) -> Tensor:
    """Arg-max trainIds (N,H,W int64) of :func:`predict_probs` (same keyword options)."""
    return predict_probs(model, images, **kwargs).argmax(dim=1)
