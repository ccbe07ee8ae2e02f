"""ClassMix composition and DACS's strong augmentation, against numpy references."""

from __future__ import annotations

import math

import numpy as np
import torch

from cbst.classmix import (
    blur_kernel_size,
    classmix,
    classmix_masks,
    color_jitter,
    gaussian_blur,
    hue_matrices,
    strong_augment,
)

C = 6


def _batch(seed: int = 0, n: int = 4, h: int = 8, w: int = 10):
    g = torch.Generator().manual_seed(seed)
    src_labels = torch.randint(0, C, (n, h, w), generator=g)
    src_labels[0, :3] = 255
    src_labels[1] = torch.where(src_labels[1] < 3, src_labels[1], 255)  # fewer classes, some ignored
    src_labels[2] = 4  # one class
    return (
        torch.rand(n, 3, h, w, generator=g),
        src_labels,
        torch.rand(n, 3, h, w, generator=g),
        torch.randint(0, C, (n, h, w), generator=g),
        torch.rand(n, h, w, generator=g),
    )


def _reference_mask(labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Per image: the ⌈n/2⌉ present classes (255 excluded) with the smallest keys, as plain loops."""
    out = np.zeros(labels.shape, dtype=bool)
    for i in range(len(labels)):
        present = [c for c in np.unique(labels[i]) if c != 255]
        chosen = sorted(present, key=lambda c: keys[i, c])[: math.ceil(len(present) / 2)]
        out[i] = np.isin(labels[i], chosen)
    return out


def test_masks_hold_half_the_classes_of_each_image_rounded_up_and_never_the_ignore_index():
    _, labels, _, _, _ = _batch()
    keys = torch.rand(labels.shape[0], C, generator=torch.Generator().manual_seed(3))
    mask = classmix_masks(labels, C, keys).numpy()
    np.testing.assert_array_equal(mask, _reference_mask(labels.numpy(), keys.numpy()))
    assert not mask[labels.numpy() == 255].any()
    assert mask[2].all()  # a single class: ⌈1/2⌉ = 1 is pasted


def test_every_pasted_pixel_carries_the_source_label_and_weight_one_and_every_other_the_pseudo_label():
    src, labels, tgt, pseudo, weights = _batch(seed=1)
    mixed, mixed_labels, mixed_weights = classmix(
        src, labels, tgt, pseudo, weights, C, torch.Generator().manual_seed(7)
    )
    keys = torch.rand(labels.shape[0], C, generator=torch.Generator().manual_seed(7))  # the same draw
    m = _reference_mask(labels.numpy(), keys.numpy())
    np.testing.assert_array_equal(mixed_labels.numpy(), np.where(m, labels.numpy(), pseudo.numpy()))
    np.testing.assert_array_equal(mixed_weights.numpy(), np.where(m, 1.0, weights.numpy()))
    np.testing.assert_array_equal(mixed.numpy(), np.where(m[:, None], src.numpy(), tgt.numpy()))
    assert 0 < m.mean() < 1


def _gray(x: np.ndarray) -> np.ndarray:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def test_color_jitter_matches_the_blend_formulas_and_leaves_unselected_images_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 5, 7, generator=g)
    factors = torch.tensor([[1.1, 0.9, 1.2], [0.8, 1.15, 0.85], [1.2, 1.2, 1.2]])
    out = color_jitter(x, torch.tensor([True, True, False]), factors, torch.zeros(3)).numpy()
    ref = x.numpy().astype(np.float64)
    f = factors.numpy()[:, :, None, None, None]
    ref = np.clip(ref * f[:, 0], 0, 1)
    mean = _gray(ref).mean((2, 3), keepdims=True)
    ref = np.clip((ref - mean) * f[:, 1] + mean, 0, 1)
    gray = _gray(ref)
    ref = np.clip((ref - gray) * f[:, 2] + gray, 0, 1)
    np.testing.assert_allclose(out[:2], ref[:2], atol=1e-5)
    np.testing.assert_array_equal(out[2], x.numpy()[2])


def test_hue_rotation_keeps_gray_and_luma_and_a_full_turn_is_the_identity():
    m = hue_matrices(torch.tensor([0.0, 1.0, 0.13]))
    torch.testing.assert_close(m[0], torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(m[1], torch.eye(3), atol=1e-5, rtol=0)
    gray = torch.full((3,), 0.4)
    torch.testing.assert_close(m[2] @ gray, gray, atol=1e-5, rtol=0)
    luma = torch.tensor([0.299, 0.587, 0.114])
    rgb = torch.tensor([0.9, 0.2, 0.4])
    torch.testing.assert_close(luma @ (m[2] @ rgb), luma @ rgb, atol=1e-5, rtol=0)


def test_blur_is_a_reflected_separable_gaussian_of_dacs_kernel_size():
    assert [blur_kernel_size(n) for n in (32, 64, 128, 512, 5)] == [3, 7, 13, 51, 1]
    x = torch.rand(2, 3, 32, 20, generator=torch.Generator().manual_seed(0))
    sigma = 0.9
    out = gaussian_blur(x, torch.tensor([sigma, 0.0])).numpy()
    np.testing.assert_array_equal(out[1], x.numpy()[1])  # σ 0: unchanged

    def kernel(k):
        t = np.arange(k) - (k - 1) / 2
        g = np.exp(-(t**2) / (2 * sigma**2))
        return g / g.sum()

    ref = x.numpy()[0].astype(np.float64)
    for axis, size in ((1, 32), (2, 20)):
        k = blur_kernel_size(size)
        pad = [(0, 0)] * 3
        pad[axis] = (k // 2, k // 2)
        padded = np.pad(ref, pad, mode="reflect")
        ref = sum(kernel(k)[j] * np.take(padded, range(j, j + ref.shape[axis]), axis=axis) for j in range(k))
    np.testing.assert_allclose(out[0], ref, atol=1e-5)


def test_strong_augment_keeps_range_and_shape_and_is_a_function_of_the_generator():
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = strong_augment(x, torch.Generator().manual_seed(5))
    b = strong_augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
