"""Spatial priors: counting, normalisation, .mat/.npy loading and application."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch

from cbst.datasets import Sample, SegmentationDataset
from cbst.io import DataError, write_png
from cbst.labels import CITYSCAPES_19, IGNORE_INDEX
from cbst.priors import apply_prior, compute_spatial_prior, load_prior, save_prior, spatial_prior_from_dataset


def toy_labels(count: int = 6, shape: tuple[int, int] = (40, 60)) -> list[np.ndarray]:
    """Class 0 always in the top half, class 1 in the bottom half, a few ignored pixels."""
    rng = np.random.default_rng(0)
    maps = []
    for _ in range(count):
        label = np.full(shape, 1, dtype=np.uint8)
        label[: shape[0] // 2] = 0
        label[rng.integers(shape[0], size=20), rng.integers(shape[1], size=20)] = IGNORE_INDEX
        maps.append(label)
    return maps


def test_prior_shape_and_normalisation():
    prior = compute_spatial_prior(toy_labels(), 3, (20, 30), sigma=2.0, progress=False)
    assert prior.shape == (3, 20, 30) and prior.dtype == np.float32
    assert np.isfinite(prior).all() and (prior > 0).all()
    np.testing.assert_allclose(prior.reshape(3, -1).max(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(prior[2], 1.0)  # never seen: uniform, no information


def test_prior_follows_the_layout():
    prior = compute_spatial_prior(toy_labels(), 2, (20, 30), progress=False)
    top, bottom = prior[:, :10].mean(axis=(1, 2)), prior[:, 10:].mean(axis=(1, 2))
    assert top[0] > 2 * bottom[0] and bottom[1] > 2 * top[1]


def test_counts_without_smoothing():
    labels = [np.array([[0, 1], [IGNORE_INDEX, 0]], dtype=np.uint8)] * 3
    prior = compute_spatial_prior(labels, 2, (2, 2), sigma=0.0, eps=1.0, progress=False)
    np.testing.assert_allclose(prior[0], np.array([[4, 1], [1, 4]]) / 4)
    np.testing.assert_allclose(prior[1], np.array([[1, 4], [1, 1]]) / 4)
    with pytest.raises(ValueError, match="trainId"):
        compute_spatial_prior([np.full((2, 2), 7, np.uint8)], 2, (2, 2), progress=False)


def test_prior_from_dataset_label_files(tmp_path):
    raw = CITYSCAPES_19.decode(np.where(np.arange(40)[:, None] < 20, 10, 0).repeat(50, axis=1))
    samples = []
    for i in range(2):
        write_png(tmp_path / f"{i}.png", raw)
        samples.append(Sample(image=tmp_path / "never_read.png", label=tmp_path / f"{i}.png", name=str(i)))
    dataset = SegmentationDataset(samples, CITYSCAPES_19)
    prior = spatial_prior_from_dataset(dataset, (20, 25), sigma=1.0, progress=False)
    assert prior.shape == (19, 20, 25)
    assert prior[10, :5].mean() > prior[10, -5:].mean() and prior[0, -5:].mean() > prior[0, :5].mean()


def test_load_prior_mat_npy_and_errors(tmp_path):
    prior = compute_spatial_prior(toy_labels(), 3, (8, 12), sigma=1.0, progress=False)
    scipy.io.savemat(tmp_path / "prior_array.mat", {"prior_array": prior})
    np.testing.assert_array_equal(load_prior(tmp_path / "prior_array.mat", 3), prior)
    scipy.io.savemat(tmp_path / "hwc.mat", {"prior_array": prior.transpose(1, 2, 0)})
    np.testing.assert_array_equal(load_prior(tmp_path / "hwc.mat", 3), prior)
    save_prior(tmp_path / "p.npy", prior)
    resized = load_prior(tmp_path / "p.npy", 3, size=(16, 24))
    assert resized.shape == (3, 16, 24) and resized.dtype == np.float32
    with pytest.raises(DataError, match="prior_array.mat.*19"):
        load_prior(tmp_path / "prior_array.mat", 19)
    scipy.io.savemat(tmp_path / "wrong.mat", {"other": prior})
    with pytest.raises(DataError, match="wrong.mat.*prior_array"):
        load_prior(tmp_path / "wrong.mat", 3)
    (tmp_path / "bad.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="bad.mat"):
        load_prior(tmp_path / "bad.mat", 3)
    with pytest.raises(DataError, match="missing.npy"):
        load_prior(tmp_path / "missing.npy", 3)


def test_apply_prior_resizes_and_multiplies():
    probs = torch.softmax(torch.randn(2, 3, 16, 24), dim=1)
    prior = torch.rand(3, 8, 12) + 0.5
    out = apply_prior(probs, prior)
    expected = torch.nn.functional.interpolate(
        prior[None], size=(16, 24), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(out, probs * expected)
    torch.testing.assert_close(apply_prior(probs[0], prior.numpy()), out[0])
    with pytest.raises(ValueError):
        apply_prior(probs, torch.rand(4, 8, 12))


def test_prior_command_converts_mat(tmp_path, capsys):
    import argparse

    from cbst.commands import prior as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    original = compute_spatial_prior(toy_labels(), 19, (8, 16), sigma=1.0, progress=False)
    scipy.io.savemat(tmp_path / "prior_array.mat", {"prior_array": original})
    args = parser.parse_args(
        [
            "--from-mat",
            str(tmp_path / "prior_array.mat"),
            "--size",
            "8,16",
            "--out",
            str(tmp_path / "prior.npy"),
        ]
    )
    assert command.run(args) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "prior.npy"), original)
    assert "road" in capsys.readouterr().out


def _bilinear_border(image: np.ndarray, y: float, x: float) -> np.ndarray:
    """C-vector of ``image`` (C×H×W) at (y, x) in pixel units, bilinear, clamped at the border."""
    _, h, w = image.shape
    y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    dy, dx = y - y0, x - x0
    top = (1 - dx) * image[:, y0, x0] + dx * image[:, y0, x1]
    bottom = (1 - dx) * image[:, y1, x0] + dx * image[:, y1, x1]
    return (1 - dy) * top + dy * bottom


@pytest.mark.parametrize("geometry", [(40, 60, 5, 7, 0), (40, 60, 30, 50, 1), (20, 30, -3, -4, 1)])
def test_prior_at_crops_samples_the_crops_pixels_of_the_scaled_image(geometry):
    """Crop pixel (i, j) of an image scaled to sh×sw shows its pixel (top + i, left + j) (mirrored
    when flipped); the prior of a coarser grid is read there, pixel centres aligned."""
    from cbst.priors import prior_at_crops

    prior = np.random.default_rng(0).random((3, 8, 12)).astype(np.float32)
    sh, sw, top, left, flipped = geometry
    crop = (6, 9)
    got = prior_at_crops(torch.from_numpy(prior), torch.tensor([geometry, geometry]), crop).numpy()
    assert got.shape == (2, 3, *crop)
    for i in range(crop[0]):
        for j in range(crop[1]):
            x = left + (crop[1] - 1 - j if flipped else j)
            y_prior = (top + i + 0.5) * prior.shape[1] / sh - 0.5
            x_prior = (x + 0.5) * prior.shape[2] / sw - 0.5
            np.testing.assert_allclose(got[1, :, i, j], _bilinear_border(prior, y_prior, x_prior), atol=1e-5)
