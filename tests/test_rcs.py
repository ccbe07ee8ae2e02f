"""Rare Class Sampling: probabilities, draws, the retried crop, and source training's crops."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from cbst.errors import DataError
from cbst.rcs import CROP_ATTEMPTS, RareClassCrops, RareClassSampler, class_probabilities, crop_with_class
from cbst.sourcetrain import train_source
from cbst.training import set_dataset_epoch
from cbst.transforms import TrainTransform


def test_probabilities_are_the_softmax_of_one_minus_frequency_over_temperature():
    counts = np.array([[9000, 4000, 100, 0], [8000, 0, 3500, 10]])
    t = 0.1
    f = counts.sum(0) / counts.sum()
    eligible = np.array([True, True, True, False])  # class 3: no image above 3000 pixels
    e = np.exp((1 - f[eligible]) / t)
    expected = np.zeros(4)
    expected[eligible] = e / e.sum()
    np.testing.assert_allclose(class_probabilities(counts, t, 3000), expected)
    assert class_probabilities(counts, 0.01, 3000)[2] > class_probabilities(counts, 0.01, 3000)[0]


def test_draws_follow_the_probabilities_and_pick_images_holding_enough_of_the_class():
    counts = np.array([[5000, 0, 4000], [5000, 3500, 0], [6000, 2000, 100]])
    sampler = RareClassSampler(counts, 0.5, 3000)
    rng = np.random.default_rng(0)
    draws = [sampler.draw(rng) for _ in range(4000)]
    for cls, image in draws:
        assert counts[image, cls] > 3000
    freq = np.bincount([c for c, _ in draws], minlength=3) / len(draws)
    np.testing.assert_allclose(freq, sampler.probs, atol=0.03)
    assert {i for c, i in draws if c == 0} == {0, 1, 2}


def test_no_eligible_class_is_a_data_error_naming_the_option():
    with pytest.raises(DataError, match="--rcs-min-pixels"):
        class_probabilities(np.ones((2, 3), np.int64), 0.01, 3000)


def test_the_crop_is_retried_until_it_holds_enough_of_the_class_at_most_ten_times():
    calls = []

    def crop(sample, rng):
        calls.append(rng)
        hits = 3 if len(calls) == 4 else 1  # the 4th attempt holds 3 pixels of class 5
        return {"label": np.array([5] * hits + [0] * 5)}

    out = crop_with_class(crop, {}, 5, 4, lambda attempt: attempt)  # needs > 0.5·4 = 2 pixels
    assert calls == [0, 1, 2, 3] and (out["label"] == 5).sum() == 3
    calls.clear()
    out = crop_with_class(crop, {}, 7, 4, lambda attempt: attempt)  # never enough: the last kept
    assert calls == list(range(CROP_ATTEMPTS))


def test_probabilities_file_names_every_class(tmp_path):
    sampler = RareClassSampler(np.array([[5000, 4000]]), 0.01, 3000)
    sampler.write_probabilities(tmp_path / "p.json", ["road", "sidewalk"])
    data = json.loads((tmp_path / "p.json").read_text())
    assert list(data) == ["road", "sidewalk"] and abs(sum(data.values()) - 1) < 1e-12


class _Images:
    """A dataset of 16x16 images, image k's label all class 0 but for a block of ``blocks[k]``."""

    def __init__(self, blocks: dict[int, int], count: int) -> None:
        self.labels = [np.zeros((16, 16), np.uint8) for _ in range(count)]
        for k, cls in blocks.items():
            self.labels[k][4:10, 4:10] = cls
        self.transform = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"image": np.zeros((16, 16, 3), np.uint8), "label": self.labels[i], "name": str(i), "index": i}
        return self.transform(item) if self.transform is not None else item

    def with_transform(self, transform):
        other = copy.copy(self)
        other.transform = transform
        return other


def test_source_crops_come_from_the_images_the_sampler_draws_and_repeat_in_every_instance():
    data = _Images({3: 2, 7: 1, 8: 1}, count=20)  # class 2 in one image, class 1 in two
    counts = np.array([np.bincount(label.ravel(), minlength=3) for label in data.labels])
    sampler = RareClassSampler(counts, 0.1, 10)
    transform = TrainTransform(12, scale_range=(1.0, 1.0), seed=4)
    crops, again = (RareClassCrops(data.with_transform(transform), sampler) for _ in range(2))
    drawn = []
    for epoch in range(300):
        set_dataset_epoch(crops, epoch)
        items = [crops[i] for i in range(len(crops))]
        drawn += [item["index"] for item in items]
        if epoch in (0, 299):
            assert [again[i]["label"].tolist() for i in range(len(again))] == [
                x["label"].tolist() for x in items
            ]
    assert len(crops) == 20
    holders = [np.flatnonzero(counts[:, c] > 10) for c in range(3)]
    expected = np.zeros(20)  # each image's chance: the classes it holds, shared among their holders
    for c in range(3):
        expected[holders[c]] += sampler.probs[c] / len(holders[c])
    np.testing.assert_allclose(np.bincount(drawn, minlength=20) / len(drawn), expected, atol=0.03)
    assert expected[3] > 10 / 20  # the image of the rarest class: most crops, not one in twenty


def test_train_source_draws_its_crops_by_rare_class_sampling(source_train_config, epoch_losses, tmp_path):
    plain = train_source(source_train_config(tmp_path / "plain", progress=False)).parent
    out = train_source(
        source_train_config(tmp_path / "rcs", progress=False, rcs_temperature=0.05, rcs_min_pixels=20)
    ).parent
    counts = np.load(out / "class_pixel_counts.npy")
    probs = json.loads((out / "rcs_class_probs.json").read_text())
    np.testing.assert_allclose(list(probs.values()), class_probabilities(counts, 0.05, 20), rtol=1e-12)
    assert epoch_losses(plain) != epoch_losses(out)  # the same seed: only the crops differ
    assert not (plain / "class_pixel_counts.npy").exists()  # counted only when something needs it
