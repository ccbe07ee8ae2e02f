"""Inference: shapes, probability maps, flip / multi-scale / window / long-side semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbst.inference import IMAGENET_MEAN, IMAGENET_STD, normalize, predict_labels, predict_probs

C = 5


class PointwiseNet(nn.Module):
    """1x1 convolution, optionally followed by an 8x average pool (output stride 8)."""

    def __init__(self, stride8: bool = True, ceil_plus_one: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, C, 1)
        self.stride8 = stride8
        self.ceil_plus_one = ceil_plus_one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) * 4
        if self.stride8:
            y = F.avg_pool2d(y, 8, ceil_mode=True)
        if self.ceil_plus_one:  # some archs return ceil(H/8)+1 cells
            y = F.pad(y, (0, 1, 0, 1), mode="replicate")
        return y


class LocalNet(nn.Module):
    """A 3x3 convolution at stride 1: translation-equivariant away from tile edges."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 3


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random uint8 batch (N,3,H,W), so that resizing changes little."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, max(1, h // 8), max(1, w // 8)), generator=g)
    return (F.interpolate(low, size=(h, w), mode="bilinear") * 255).round().to(torch.uint8)


def test_normalize_layouts_and_values() -> None:
    x = images(2, 16, 24)
    a = normalize(x)
    b = normalize(x.permute(0, 2, 3, 1))
    assert a.shape == (2, 3, 16, 24) and a.dtype == torch.float32
    assert torch.equal(a, b)
    expected = (x[0, 1, 3, 4].item() / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert a[0, 1, 3, 4].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("ceil_plus_one", [False, True])
def test_shape_and_probabilities(ceil_plus_one: bool) -> None:
    model = PointwiseNet(ceil_plus_one=ceil_plus_one)
    model.train()
    x = images(2, 37, 53)
    probs = predict_probs(model, x)
    assert probs.shape == (2, C, 37, 53) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(2, 37, 53), atol=1e-5)
    assert (probs >= 0).all()
    assert not model.training
    labels = predict_labels(model, x)
    assert labels.dtype == torch.int64 and torch.equal(labels, probs.argmax(1))


def test_flip_of_flip_equivariant_model_changes_nothing() -> None:
    model = PointwiseNet()  # pool cells mirror onto pool cells when W is a multiple of 8
    x = images(1, 40, 64)
    plain = predict_probs(model, x)
    flipped = predict_probs(model, x, flip=True)
    assert torch.allclose(plain, flipped, atol=1e-5)


def test_flip_averages_plain_and_mirrored_passes() -> None:
    model = LocalNet()
    x = images(1, 24, 32)
    expected = (predict_probs(model, x) + predict_probs(model, x.flip(-1)).flip(-1)) / 2
    assert torch.allclose(predict_probs(model, x, flip=True), expected, atol=1e-6)


@pytest.mark.parametrize("long_side", [30, 60, 90])
def test_long_side_returns_original_size(long_side: int) -> None:
    model = PointwiseNet()
    x = images(1, 40, 60)
    probs = predict_probs(model, x, long_side=long_side)
    assert probs.shape == (1, C, 40, 60)
    assert torch.allclose(probs.sum(1), torch.ones(1, 40, 60), atol=1e-5)
    if long_side == 60:  # already that size: identical to no resizing
        assert torch.equal(probs, predict_probs(model, x))


def test_multi_scale_is_mean_of_single_scales() -> None:
    model = PointwiseNet()
    x = images(2, 32, 48)
    single = [predict_probs(model, x, scales=(s,), long_side=40) for s in (0.5, 1.0, 1.5)]
    multi = predict_probs(model, x, scales=(0.5, 1.0, 1.5), long_side=40)
    assert torch.allclose(multi, sum(single) / 3, atol=1e-6)


def test_window_matches_whole_image_for_pointwise_model() -> None:
    model = PointwiseNet(stride8=False)
    x = images(1, 50, 90)
    assert torch.allclose(predict_probs(model, x, window=32), predict_probs(model, x), atol=1e-5)


def test_window_close_to_whole_image_for_local_model() -> None:
    model = LocalNet()
    x = images(1, 60, 100, seed=3)
    whole = predict_probs(model, x)
    tiled = predict_probs(model, x, window=40)
    # 40-px tiles, stride ceil(40*2/3) = 27: rows start at 0, 20; columns at 0, 27, 54, 60.
    # Only pixels on an interior tile edge (zero padding instead of neighbours) may differ.
    edge_rows, edge_cols = [20, 39], [27, 39, 54, 60, 66, 93]
    away = torch.ones(60, 100, dtype=torch.bool)
    away[edge_rows, :] = False
    away[:, edge_cols] = False
    diff = (tiled - whole).abs().amax(1)[0]
    assert diff[away].max() < 1e-5
    assert (tiled.argmax(1) == whole.argmax(1)).float().mean() > 0.95
    assert torch.allclose(tiled.sum(1), torch.ones(1, 60, 100), atol=1e-5)


def test_invalid_options_raise() -> None:
    with pytest.raises(ValueError):
        predict_probs(PointwiseNet(), images(1, 8, 8), scales=())
    with pytest.raises(ValueError):
        predict_probs(PointwiseNet(), images(1, 8, 8), scales=(0.0,))
