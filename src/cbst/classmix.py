"""ClassMix and DACS's strong augmentation, batched on the device.

ClassMix (Olsson et al. 2021, as DACS uses it): for each (source crop, target crop) pair, half of
the classes present in the source crop's label, rounded up, are chosen at random; the source
pixels of those classes are pasted, with their labels, onto the target crop, its pseudo-labels
and its pseudo-label weights, and every pasted pixel gets weight 1. Classes are chosen per
image from that image's own label and never include the ignore index (DACS draws from the
whole batch's ``torch.unique`` and can choose 255: docs/method.md §14.6).

The mixed image then gets DACS's strong augmentation: colour jitter with probability 0.8
(brightness, contrast and saturation factors in [0.8, 1.2], hue shift in [−0.2, 0.2] of a turn;
DACS's code applies it when a uniform draw exceeds its ``color_jitter_p`` = 0.2) and a Gaussian
blur with probability 0.5 (σ in [0.15, 1.15], an odd kernel of about a tenth of the crop).
Every random number comes from a caller's ``torch.Generator`` on the CPU (a few per image,
copied to the device); all pixel work is whole-batch tensor operations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cbst.labels import IGNORE_INDEX

JITTER_PROBABILITY = 0.8  # DACS: applied when U(0, 1) > color_jitter_p = 0.2
JITTER_STRENGTH = 0.2
BLUR_PROBABILITY = 0.5
BLUR_SIGMA = (0.15, 1.15)
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
# RGB -> YIQ (NTSC); hue is a rotation of the (I, Q) chroma plane.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def classmix_masks(labels: Tensor, num_classes: int, keys: Tensor) -> Tensor:
    """Bool N×H×W: the pixels of the ⌈n/2⌉ classes with the smallest ``keys`` among the n present.

    ``labels`` (int64 N×H×W, ``IGNORE_INDEX`` = no class) are the source crops' labels; ``keys``
    (N×C, distinct values in [0, 1)) rank the classes of each image (uniform keys make the choice
    a uniform random subset). Ignored pixels are never in the mask.
    """
    n, c = labels.shape[0], num_classes
    flat = labels.flatten(1)
    index = torch.where(flat == IGNORE_INDEX, c, flat)  # column c: "no class"
    counts = torch.zeros(n, c + 1, device=labels.device).scatter_add_(
        1, index, torch.ones_like(index, dtype=torch.float32)
    )
    present = counts[:, :c] > 0
    want = (present.sum(1) + 1) // 2
    ranks = torch.where(present, keys.to(labels.device), 2.0).argsort(1).argsort(1)
    chosen = present & (ranks < want.unsqueeze(1))
    chosen = torch.cat([chosen, chosen.new_zeros(n, 1)], dim=1)
    return chosen.gather(1, index).view_as(labels)


def mix(mask: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """``source`` where ``mask`` else ``target``; ``mask`` is N×H×W, the tensors N×H×W or N×K×H×W."""
    m = mask if source.dim() == mask.dim() else mask.unsqueeze(1)
    return torch.where(m, source, target)


def classmix(
    src_images: Tensor,
    src_labels: Tensor,
    tgt_images: Tensor,
    pseudo_labels: Tensor,
    pseudo_weights: Tensor,
    num_classes: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """(mixed images, mixed labels, mixed weights): source classes pasted onto the target crops."""
    keys = torch.rand(src_labels.shape[0], num_classes, generator=generator)
    mask = classmix_masks(src_labels, num_classes, keys)
    return (
        mix(mask, src_images, tgt_images),
        mix(mask, src_labels, pseudo_labels),
        mix(mask, torch.ones_like(pseudo_weights), pseudo_weights),
    )


def _gray(images: Tensor) -> Tensor:
    """Luma N×1×H×W of RGB images N×3×H×W."""
    w = images.new_tensor(_GRAY).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def hue_matrices(shifts: Tensor) -> Tensor:
    """N×3×3 RGB matrices rotating the YIQ chroma plane by ``shifts`` turns (a linear hue shift)."""
    yiq = torch.tensor(_YIQ, dtype=torch.float32, device=shifts.device)
    angle = 2 * math.pi * shifts.float()
    cos, sin = angle.cos(), angle.sin()
    rot = torch.zeros(len(shifts), 3, 3, device=shifts.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return torch.linalg.inv(yiq) @ rot @ yiq


def color_jitter(images: Tensor, apply: Tensor, factors: Tensor, hue: Tensor) -> Tensor:
    """Brightness, contrast, saturation (``factors`` N×3), then hue (N turns), each clamped to [0, 1],
    on the images (N×3×H×W in [0, 1]) where ``apply`` (bool N); the others unchanged."""
    f = factors.to(images.device, images.dtype).view(-1, 3, 1, 1, 1)
    x = (images * f[:, 0]).clamp(0, 1)
    mean = _gray(x).mean((2, 3), keepdim=True)
    x = ((x - mean) * f[:, 1] + mean).clamp(0, 1)
    gray = _gray(x)
    x = ((x - gray) * f[:, 2] + gray).clamp(0, 1)
    x = torch.einsum("nij,njhw->nihw", hue_matrices(hue.to(images.device)).to(x.dtype), x).clamp(0, 1)
    return torch.where(apply.to(images.device).view(-1, 1, 1, 1), x, images)


def blur_kernel_size(size: int) -> int:
    """DACS's kernel: the largest odd number ≤ ⌈size/10⌉ (at least 1)."""
    k = math.ceil(0.1 * size)
    return max(1, k if k % 2 else k - 1)


def gaussian_kernels(sigmas: Tensor, size: int) -> Tensor:
    """N×size normalised 1-D Gaussians; a σ of 0 gives the identity (a centred delta)."""
    x = torch.arange(size, dtype=torch.float32, device=sigmas.device) - (size - 1) / 2
    s = sigmas.float().unsqueeze(1)
    g = torch.where(s > 0, torch.exp(-(x**2) / (2 * s.clamp_min(1e-6) ** 2)), (x == 0).float())
    return g / g.sum(1, keepdim=True)


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Separable Gaussian blur per image (σ 0 = unchanged), reflected borders, one grouped conv per axis."""
    n, ch, h, w = images.shape
    x = images.reshape(1, n * ch, h, w)
    sig = sigmas.to(images.device).repeat_interleave(ch)
    for axis, size in ((2, h), (3, w)):
        k = blur_kernel_size(size)
        if k == 1:
            continue
        kernel = gaussian_kernels(sig, k).to(images.dtype)
        shape = (n * ch, 1, k, 1) if axis == 2 else (n * ch, 1, 1, k)
        pad = (0, 0, k // 2, k // 2) if axis == 2 else (k // 2, k // 2, 0, 0)
        x = F.conv2d(F.pad(x, pad, mode="reflect"), kernel.view(shape), groups=n * ch)
    original = images.reshape(1, n * ch, h, w)
    return torch.where((sig > 0).view(1, -1, 1, 1), x, original).view(n, ch, h, w)


def strong_augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """DACS's colour jitter and Gaussian blur on images N×3×H×W in [0, 1], random per image."""
    n = images.shape[0]
    apply = torch.rand(n, generator=generator) < JITTER_PROBABILITY
    factors = 1 + JITTER_STRENGTH * (2 * torch.rand(n, 3, generator=generator) - 1)
    hue = JITTER_STRENGTH * (2 * torch.rand(n, generator=generator) - 1)
    blur = torch.rand(n, generator=generator) < BLUR_PROBABILITY
    lo, hi = BLUR_SIGMA
    sigmas = torch.where(blur, lo + (hi - lo) * torch.rand(n, generator=generator), 0.0)
    return gaussian_blur(color_jitter(images, apply, factors, hue), sigmas)
