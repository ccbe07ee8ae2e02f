"""Small-class patch mining: seeds are rare-class pixels and crops contain them."""

from __future__ import annotations

import numpy as np
import pytest

from cbst.labels import IGNORE_INDEX
from cbst.mining import MiningPlan, choose_mined_center, crop_window


def scene() -> np.ndarray:
    """Mostly road (0) and ignore, a small blob of class 7 and a smaller blob of class 12."""
    label = np.zeros((60, 80), dtype=np.uint8)
    label[:20] = IGNORE_INDEX
    label[40:44, 70:75] = 7
    label[5:8, 2:4] = 12  # inside the ignored band's rows but overriding it
    return label


def test_centre_is_a_rare_pixel_and_crop_contains_it():
    label, rng = scene(), np.random.default_rng(0)
    plan = MiningPlan(port=1.0, mine_id=[7, 3], priority=[])
    for _ in range(50):
        y, x = choose_mined_center(label, plan, rng)
        assert label[y, x] == 7
        y0, x0 = crop_window((y, x), (32, 32), label.shape)
        assert (label[y0 : y0 + 32, x0 : x0 + 32] == 7).any()


def test_priority_classes_take_precedence():
    label, rng = scene(), np.random.default_rng(1)
    plan = MiningPlan(port=1.0, mine_id=[7], priority=[12, 15])
    assert all(label[choose_mined_center(label, plan, rng)] == 12 for _ in range(30))


def test_no_mining_without_port_or_candidates():
    label, rng = scene(), np.random.default_rng(2)
    assert all(choose_mined_center(label, MiningPlan(0.0, [7], [12]), rng) is None for _ in range(50))
    assert choose_mined_center(label, MiningPlan(1.0, [3, 4], [5]), rng) is None
    assert choose_mined_center(label, MiningPlan(1.0, [IGNORE_INDEX], []), rng) is None
    hits = sum(choose_mined_center(label, MiningPlan(0.5, [7], []), rng) is not None for _ in range(400))
    assert 150 < hits < 250


def test_margin_excludes_border_seeds():
    label, rng = scene(), np.random.default_rng(3)
    plan = MiningPlan(port=1.0, mine_id=[12, 7])
    for _ in range(30):  # class 12 lies within 10 px of the border, so only class 7 qualifies
        y, x = choose_mined_center(label, plan, rng, margin=(10, 5))
        assert label[y, x] == 7 and 10 <= y < 50 and 5 <= x < 75


@pytest.mark.parametrize("center", [(0, 0), (59, 79), (30, 40), (5, 78)])
@pytest.mark.parametrize("crop", [(32, 32), (60, 80), (17, 9)])
def test_crop_window_inside_image_and_contains_centre(center, crop):
    y0, x0 = crop_window(center, crop, (60, 80))
    assert 0 <= y0 <= 60 - crop[0] and 0 <= x0 <= 80 - crop[1]
    assert y0 <= center[0] < y0 + crop[0] and x0 <= center[1] < x0 + crop[1]


def test_crop_window_larger_than_image():
    assert crop_window((3, 4), (100, 100), (10, 20)) == (0, 0)
