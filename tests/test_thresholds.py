"""Thresholds λ, pseudo-label assignment and rare classes against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cbst.labels import IGNORE_INDEX
from cbst.thresholds import ThresholdEstimator, assign_pseudo_labels, rare_classes

PORTIONS = (0.0, 1e-5, 0.003, 0.05, 0.2, 0.5, 0.9, 1.0)


def random_probs(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    """Softmax maps N×C×H×W with class C-1 never predicted and class C-2 rarely predicted."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 2.0
    logits[:, -1] -= 20.0
    logits[:, -2] -= 3.0
    return torch.softmax(logits, dim=1) * scale


def brute_force(probs: torch.Tensor, portion: float, policy: str, subsample: int = 1) -> np.ndarray:
    """λ by a full descending numpy sort of the confidences (docs/method.md §4.3, no original bugs)."""
    p = probs.numpy().astype(np.float32)
    conf = p.max(axis=1).reshape(p.shape[0], -1)[:, ::subsample].reshape(-1)
    pred = p.argmax(axis=1).reshape(p.shape[0], -1)[:, ::subsample].reshape(-1)
    num_classes = p.shape[1]

    def kth(values: np.ndarray) -> float:
        k = math.floor(values.size * portion)
        return float(np.sort(values)[::-1][k - 1]) if k >= 1 else 1.0

    if policy == "global":
        return np.full(num_classes, kth(conf), dtype=np.float32)
    return np.array([kth(conf[pred == c]) for c in range(num_classes)], dtype=np.float32)


def fitted(probs: torch.Tensor, policy: str, **kw) -> ThresholdEstimator:
    est = ThresholdEstimator(probs.shape[1], policy, **kw)
    for image in probs:  # one update per image, like a pseudo-label pass
        est.update(image[None])
    return est


@pytest.mark.parametrize("shape", [(1, 5, 7, 9), (3, 6, 16, 20), (2, 19, 33, 17)])
@pytest.mark.parametrize("policy", ["cb", "global"])
def test_exact_matches_sort(shape, policy):
    probs = random_probs(shape, seed=sum(shape))
    est = fitted(probs, policy, exact=True)
    for portion in PORTIONS:
        expected = brute_force(probs, portion, policy)
        np.testing.assert_array_equal(est.thresholds(portion).numpy(), expected)
    if policy == "cb":  # never-predicted class, and a rare class whose ⌊n·p⌋ is 0
        assert est.class_pixel_counts[-1] == 0 and est.thresholds(1.0)[-1] == 1.0
        n_rare = int(est.class_pixel_counts[-2])
        assert 0 < n_rare and est.thresholds(0.99 / n_rare)[-2] == 1.0


def test_exact_with_subsampling():
    probs = random_probs((2, 4, 13, 11), seed=3)
    est = fitted(probs, "cb", exact=True, subsample=4)
    expected_counts = np.bincount(probs.argmax(1).reshape(2, -1)[:, ::4].reshape(-1).numpy(), minlength=4)
    np.testing.assert_array_equal(est.class_pixel_counts.numpy(), expected_counts)
    for portion in PORTIONS:
        np.testing.assert_array_equal(
            est.thresholds(portion).numpy(), brute_force(probs, portion, "cb", subsample=4)
        )


def check_approx(approx: np.ndarray, exact: np.ndarray, bins: int, tol: float = 0.0) -> None:
    """λ_approx ≤ λ_exact, within 1/bins when λ_exact < 1, and 1.0 when λ_exact ≥ 1."""
    assert (approx <= exact).all()
    inside = exact < 1.0
    assert (exact[inside].astype(np.float64) - approx[inside] < 1.0 / bins + tol).all()
    assert (approx[~inside] == 1.0).all()


@pytest.mark.parametrize("bins,tol", [(256, 0.0), (65536, 0.0), (1000, 1e-7)])
@pytest.mark.parametrize("policy", ["cb", "global"])
def test_approx_within_bound(bins, tol, policy):
    # scale 1.3: some confidences exceed 1 (prior or bicubic overshoot), exercising the overflow bin
    probs = random_probs((3, 7, 24, 31), seed=bins, scale=1.3)
    approx = fitted(probs, policy, bins=bins)
    exact = fitted(probs, policy, exact=True)
    np.testing.assert_array_equal(approx.class_pixel_counts, exact.class_pixel_counts)
    for portion in PORTIONS:
        check_approx(approx.thresholds(portion).numpy(), exact.thresholds(portion).numpy(), bins, tol)


@pytest.mark.parametrize("policy", ["cb", "global"])
def test_approx_selection_is_superset_with_close_extras(policy):
    bins = 128
    probs = random_probs((2, 6, 40, 40), seed=11)
    approx, exact = fitted(probs, policy, bins=bins), fitted(probs, policy, exact=True)
    for portion in (0.05, 0.2, 0.5, 0.8):
        lam_a, lam_e = approx.thresholds(portion), exact.thresholds(portion)
        sel_a = assign_pseudo_labels(probs, lam_a) != IGNORE_INDEX
        sel_e = assign_pseudo_labels(probs, lam_e) != IGNORE_INDEX
        assert not (sel_e & ~sel_a).any()
        extra = (sel_a & ~sel_e).unsqueeze(1)  # N×1×H×W
        lam_e4, lam_a4 = lam_e.view(1, -1, 1, 1), lam_a.view(1, -1, 1, 1)
        close = (probs >= lam_a4 * (1 - 1e-6)) & (probs < lam_e4) & (lam_e4 - probs < 1.0 / bins)
        assert (close.any(dim=1, keepdim=True) | ~extra).all()


def test_tiny_confidences_keep_positive_thresholds():
    probs = random_probs((1, 4, 20, 20), seed=5) * 1e-6  # e.g. a strong prior
    lam = fitted(probs, "cb").thresholds(1.0)
    assert (lam > 0).all() and (lam <= fitted(probs, "cb", exact=True).thresholds(1.0)).all()


def loop_assign(probs: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """docs/method.md §4.4 pixel by pixel: R = P/λ, y = argmax R, selected iff max R ≥ 1."""
    n, c, h, w = probs.shape
    out = np.empty((n, h, w), dtype=np.int64)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                ratio = probs[i, :, y, x].astype(np.float32) / lam.astype(np.float32)
                out[i, y, x] = int(np.argmax(ratio)) if ratio.max() >= 1 else IGNORE_INDEX
    return out


@pytest.mark.parametrize("policy", ["cb", "global"])
def test_assign_matches_pixel_loop(policy):
    probs = random_probs((2, 5, 9, 8), seed=7)
    lam = fitted(probs, policy, exact=True).thresholds(0.4)
    got = assign_pseudo_labels(probs, lam)
    np.testing.assert_array_equal(got.numpy(), loop_assign(probs.numpy(), lam.numpy()))
    np.testing.assert_array_equal(assign_pseudo_labels(probs[1], lam).numpy(), got[1].numpy())


def test_assign_ties_at_one():
    lam = torch.tensor([0.3, 0.3, 0.5])
    probs = torch.tensor(
        [
            [0.3, 0.3, 0.4],  # R = 1, 1, 0.8: tie -> first class, selected
            [0.2, 0.3, 0.5],  # R = 0.67, 1, 1: tie -> class 1
            [0.29, 0.21, 0.5],  # R = 0.97, 0.7, 1: exactly 1 -> class 2
            [0.29, 0.29, 0.42],
        ]
    )  # max R < 1 -> ignored
    probs = probs.T.reshape(1, 3, 1, 4)
    got = assign_pseudo_labels(probs, lam)
    assert got.tolist() == [[[0, 1, 2, IGNORE_INDEX]]]
    np.testing.assert_array_equal(got.numpy(), loop_assign(probs.numpy(), lam.numpy()))


def test_rare_classes_use_predicted_counts_under_global_policy():
    # road, sidewalk, building dominate the predictions; class 5 is never predicted
    counts = torch.tensor([500_000, 200_000, 250_000, 30_000, 15_000, 0, 400, 4_000])
    probs = torch.zeros(1, 8, 1, int(counts.sum()))
    probs[0, torch.repeat_interleave(torch.arange(8), counts), 0, torch.arange(int(counts.sum()))] = 1.0
    est = fitted(probs, "global")
    np.testing.assert_array_equal(est.class_pixel_counts.numpy(), counts.numpy())
    mine_id, priority = rare_classes(est.class_pixel_counts)
    assert mine_id == [5, 6, 7] and priority == [5, 6]
    assert not {0, 1, 2} & set(mine_id)


def test_rare_classes_ties_and_empty():
    assert rare_classes(torch.tensor([5, 0, 5, 0, 100]), number=3, thresh=0.0) == ([1, 3, 0], [])
    assert rare_classes(torch.zeros(4, dtype=torch.int64), number=2) == ([0, 1], [0, 1, 2, 3])


@pytest.mark.parametrize("exact", [False, True])
def test_state_dict_round_trip_and_merge(exact):
    probs = random_probs((4, 5, 12, 10), seed=2)
    whole = fitted(probs, "cb", exact=exact, bins=512)
    first, second = (
        fitted(probs[:2], "cb", exact=exact, bins=512),
        fitted(probs[2:], "cb", exact=exact, bins=512),
    )
    resumed = ThresholdEstimator(5, "cb", exact=exact, bins=512)
    resumed.load_state_dict(first.state_dict())
    for image in probs[2:]:
        resumed.update(image)  # C×H×W input
    first.merge_state_dict(second.state_dict())
    for est in (resumed, first):
        np.testing.assert_array_equal(est.class_pixel_counts, whole.class_pixel_counts)
        for portion in PORTIONS:
            np.testing.assert_array_equal(est.thresholds(portion), whole.thresholds(portion))
    with pytest.raises(ValueError, match="bins"):
        ThresholdEstimator(5, "cb", exact=exact, bins=256).load_state_dict(whole.state_dict())


def test_update_shapes_and_confidence_pairs_agree():
    probs = random_probs((3, 4, 10, 6), seed=9)
    batched, single, pairs = (ThresholdEstimator(4, "cb", exact=True) for _ in range(3))
    batched.update(probs)
    for image in probs:
        single.update(image)
    conf, pred = probs.max(dim=1)
    pairs.update_confidences(conf, pred)
    for est in (single, pairs):
        np.testing.assert_array_equal(est.thresholds(0.3), batched.thresholds(0.3))
    with pytest.raises(ValueError):
        batched.update(torch.rand(2, 5, 3, 3))
    with pytest.raises(ValueError):
        batched.update_confidences(torch.rand(4), torch.tensor([0, 1, 2, 4]))


@pytest.mark.parametrize("exact", [False, True])
def test_all_reduce_single_rank_keeps_statistics(exact, tmp_path):
    dist = torch.distributed
    est = fitted(random_probs((2, 4, 8, 8), seed=4), "cb", exact=exact, bins=64)
    before = est.thresholds(0.5)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        est.all_reduce()
    finally:
        dist.destroy_process_group()
    np.testing.assert_array_equal(est.thresholds(0.5), before)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="policy"):
        ThresholdEstimator(3, "kc")
    with pytest.raises(ValueError, match="portion"):
        ThresholdEstimator(3).thresholds(1.5)
    assert ThresholdEstimator(3).thresholds(0.5).tolist() == [1.0, 1.0, 1.0]
