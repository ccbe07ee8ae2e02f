"""DAFormer's ImageNet feature distance against plain numpy loops, and what it may change."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cbst.errors import ConfigError
from cbst.feature_distance import (
    MIN_RATIO,
    FeatureDistance,
    downscale_labels,
    masked_feature_distance,
    thing_class_ids,
)
from cbst.labels import CITYSCAPES_19, IGNORE_INDEX
from cbst.models import build_model

C = 19


def _downscale_loop(labels: np.ndarray, size: tuple[int, int], min_ratio: float) -> np.ndarray:
    """Per cell of f×f pixels (f = ⌈H/h⌉, padding ignored): its most frequent value, ignore
    counted as one, kept where it covers at least ``min_ratio`` of the cell."""
    n, height, width = labels.shape
    h, w = size
    f = max(-(-height // h), -(-width // w))
    out = np.full((n, h, w), IGNORE_INDEX, np.int64)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                counts = np.zeros(C + 1)
                for y in range(i * f, i * f + f):
                    for x in range(j * f, j * f + f):
                        inside = y < height and x < width
                        value = labels[b, y, x] if inside else IGNORE_INDEX
                        counts[C if value == IGNORE_INDEX else value] += 1
                best = int(counts.argmax())
                if counts[best] / (f * f) >= min_ratio and best != C:
                    out[b, i, j] = best
    return out


def _blocky_labels(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Labels of 4×4 blocks with some noise and ignored pixels: cells both pure and mixed."""
    n, h, w = shape
    blocks = rng.integers(0, C, (n, -(-h // 4), -(-w // 4)))
    labels = blocks.repeat(4, 1).repeat(4, 2)[:, :h, :w].copy()
    noise = rng.random(labels.shape) < 0.15
    labels[noise] = rng.integers(0, C, noise.sum())
    labels[rng.random(labels.shape) < 0.1] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("shape, size", [((2, 16, 24), (2, 3)), ((1, 30, 21), (4, 3)), ((1, 9, 9), (9, 9))])
def test_downscaled_labels_match_a_loop_over_the_cells(shape, size):
    labels = _blocky_labels(np.random.default_rng(0), shape)
    got = downscale_labels(torch.from_numpy(labels), size, C, MIN_RATIO)
    np.testing.assert_array_equal(got.numpy(), _downscale_loop(labels, size, MIN_RATIO))


def test_masked_distance_is_the_mean_l2_norm_over_the_masked_pixels():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 5, 3, 4)), rng.normal(size=(2, 5, 3, 4))
    mask = rng.random((2, 3, 4)) < 0.5
    expected = np.mean(
        [np.sqrt(((a[n, :, i, j] - b[n, :, i, j]) ** 2).sum()) for n, i, j in zip(*np.nonzero(mask))]
    )
    got = masked_feature_distance(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(mask))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    empty = masked_feature_distance(
        torch.from_numpy(a), torch.from_numpy(b), torch.zeros(2, 3, 4, dtype=torch.bool)
    )
    assert float(empty) == 0.0  # DAFormer's mean of no pixel would be NaN


def test_thing_classes_are_daformers_train_ids():
    assert thing_class_ids(CITYSCAPES_19.class_names) == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
    with pytest.raises(ConfigError, match="--fd-lambda"):
        thing_class_ids(("road", "sky"))


def _nets() -> tuple[torch.nn.Module, FeatureDistance]:
    torch.manual_seed(0)
    imagenet = build_model("small", C)
    student = copy.deepcopy(imagenet)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, FeatureDistance(imagenet, 0.005, thing_class_ids(CITYSCAPES_19.class_names), C)


def _batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(_blocky_labels(rng, (2, 32, 40)))
    labels[:, :, :16] = 13  # cars: some cells that surely count
    return torch.from_numpy(rng.normal(size=(2, 3, 32, 40)).astype(np.float32)), labels


def test_loss_is_lambda_times_the_thing_pixels_mean_distance():
    student, fd = _nets()
    images, labels = _batch()
    student.eval()
    with torch.no_grad():
        features = student.encoder_features(images).numpy()
        frozen = fd.model.encoder_features(images).numpy()
        loss = float(fd.loss(images, labels, torch.from_numpy(features)))
    cells = _downscale_loop(labels.numpy(), features.shape[-2:], 0.75)
    things = np.isin(cells, [6, 7, 11, 12, 13, 14, 15, 16, 17, 18])
    distances = np.sqrt(((features - frozen) ** 2).sum(1))
    assert things.any() and loss == pytest.approx(0.005 * distances[things].mean(), rel=1e-5)


def test_gradient_reaches_the_student_encoder_only_and_the_frozen_copy_never_changes():
    student, fd = _nets()
    before = copy.deepcopy(fd.model.state_dict())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    images, labels = _batch()
    start = copy.deepcopy(student.state_dict())
    for _ in range(3):
        optimizer.zero_grad()
        student.train()
        logits, features = student(images, return_features=True)
        fd.loss(images, labels, features).backward()
        assert all(p.grad is None for p in fd.model.parameters())
        assert all(p.grad is None for p in student.head.parameters())  # the head is not in the distance
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.layer4.parameters())
        optimizer.step()
    after = fd.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert not fd.model.training
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())
