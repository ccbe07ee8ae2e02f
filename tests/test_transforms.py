"""TrainTransform: shapes, label integrity, determinism, flip, mining and padding."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cbst.transforms import IMAGENET_MEAN, TrainTransform, scale_factor


def _sample(image: np.ndarray, label: np.ndarray, index: int = 0) -> dict:
    return {"image": image, "label": label, "name": f"img{index}", "index": index}


def _random_sample(h: int = 60, w: int = 80, index: int = 0, classes=(0, 3, 7, 255)) -> dict:
    rng = np.random.default_rng(123)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.choice(np.array(classes, dtype=np.uint8), size=(h, w))
    return _sample(image, label, index)


@dataclass
class _Plan:
    port: float
    mine_id: list
    priority: list


def _install_mining_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """A minimal ``cbst.mining`` with the agreed interface, so the transform's use of it is tested."""

    def choose_mined_center(label, plan, rng):
        if rng.random() >= plan.port:
            return None
        for group in (plan.priority, plan.mine_id):
            present = [k for k in group if (label == k).any()]
            if present:
                ys, xs = np.nonzero(label == present[int(rng.integers(len(present)))])
                j = int(rng.integers(len(ys)))
                return int(ys[j]), int(xs[j])
        return None

    def crop_window(center, crop_hw, image_hw):
        return tuple(min(max(c - k // 2, 0), max(n - k, 0)) for c, k, n in zip(center, crop_hw, image_hw))

    module = types.ModuleType("cbst.mining")
    module.MiningPlan = _Plan
    module.choose_mined_center = choose_mined_center
    module.crop_window = crop_window
    monkeypatch.setitem(sys.modules, "cbst.mining", module)


def test_output_shapes_and_dtypes():
    out = TrainTransform((32, 40), seed=1)(_random_sample(index=5))
    assert out["image"].shape == (3, 32, 40) and out["image"].dtype == torch.uint8
    assert out["label"].shape == (32, 40) and out["label"].dtype == torch.uint8
    assert out["name"] == "img5" and out["index"] == 5


def test_labels_keep_only_existing_classes_under_scaling():
    t = TrainTransform(24, scale_range=(0.3, 2.5), seed=0)
    for index in range(30):
        values = set(t(_random_sample(index=index))["label"].unique().tolist())
        assert values <= {0, 3, 7, 255}


def test_same_seed_epoch_index_is_deterministic_and_epochs_differ():
    sample = _random_sample(index=3)
    a, b = TrainTransform(32, seed=7), TrainTransform(32, seed=7)
    assert torch.equal(a(sample)["image"], b(sample)["image"])
    assert torch.equal(a(sample)["label"], b(sample)["label"])
    b.set_epoch(1)
    assert not torch.equal(a(sample)["image"], b(sample)["image"])
    assert not torch.equal(a(sample)["image"], TrainTransform(32, seed=8)(sample)["image"])


def test_flip_moves_image_and_label_together():
    h, w = 8, 20
    cols = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    image = np.stack([cols * 10, np.zeros_like(cols), np.zeros_like(cols)], axis=-1)
    t = TrainTransform((h, w), scale_range=(1.0, 1.0))
    flipped = set()
    for index in range(20):
        out = t(_sample(image, cols, index))
        assert torch.equal(out["image"][0] // 10, out["label"])
        flipped.add(bool(out["label"][0, 0] == w - 1))
    assert flipped == {True, False}


def test_mining_with_port_one_always_contains_the_rare_class(monkeypatch):
    _install_mining_stand_in(monkeypatch)
    label = np.zeros((64, 64), dtype=np.uint8)
    label[58:61, 2:5] = 9
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    mined = TrainTransform(16, scale_range=(1.0, 1.0), mining=_Plan(1.0, [9], []))
    plain = TrainTransform(16, scale_range=(1.0, 1.0))
    hits = [(mined(_sample(image, label, i))["label"] == 9).any().item() for i in range(20)]
    misses = [(plain(_sample(image, label, i))["label"] == 9).any().item() for i in range(20)]
    assert all(hits) and not all(misses)
    plain.set_mining(_Plan(1.0, [9], []))
    assert (plain(_sample(image, label, 0))["label"] == 9).any()


def test_crops_are_mined_with_probability_port():
    """With the real mining module: a rare patch a random 16x16 crop almost never holds (about 1 %
    of crops) is in about half of the crops at ``port`` 0.5, since the port is drawn once."""
    from cbst.mining import MiningPlan

    label = np.zeros((64, 64), dtype=np.uint8)
    label[58:61, 2:5] = 9
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    mined = TrainTransform(16, scale_range=(1.0, 1.0), flip=False, mining=MiningPlan(0.5, [9]))
    share = np.mean([(mined(_sample(image, label, i))["label"] == 9).any().item() for i in range(1000)])
    assert 0.44 < share < 0.58


def test_padding_when_the_image_is_smaller_than_the_crop():
    sample = _random_sample(10, 12, classes=(1, 2))
    out = TrainTransform(32, scale_range=(1.0, 1.0))(sample)
    label = out["label"]
    assert int((label != 255).sum()) == 120
    pad = out["image"][:, label == 255].T
    assert torch.equal(
        pad, torch.tensor([[round(255 * m) for m in IMAGENET_MEAN]] * len(pad), dtype=torch.uint8)
    )  # the mean colour: ~0 once normalised


def test_scale_is_measured_against_the_reference_long_side():
    rng = np.random.default_rng(0)
    assert scale_factor(rng, (100, 200), (1.0, 1.0), 400) == pytest.approx(2.0)
    assert scale_factor(rng, (100, 200), (1.5, 1.5), None) == pytest.approx(1.5)
    out = TrainTransform((208, 408), scale_range=(1.0, 1.0), reference_long_side=400)(
        _random_sample(100, 200, classes=(4,))
    )
    assert int((out["label"] == 4).sum()) == 200 * 400
