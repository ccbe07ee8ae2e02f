"""Rare Class Sampling: probabilities, draws and the retried crop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbst.errors import DataError
from cbst.rcs import CROP_ATTEMPTS, RareClassSampler, class_probabilities, crop_with_class


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
