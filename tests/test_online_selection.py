"""Online pseudo-label selectors against plain numpy references."""

from __future__ import annotations

import numpy as np
import torch

from cbst.online_selection import (
    HISTOGRAM_BINS,
    ONLINE_SELECTORS,
    FixedSelector,
    GlobalWindowedSelector,
    WindowedSelector,
)
from cbst.registry import SELECTION_POLICIES

C = 5


def _probs(seed: int, n: int = 2, h: int = 6, w: int = 7, sharp: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(n, C, h, w, generator=g)).softmax(1)


def test_fixed_weights_each_image_by_its_share_of_confident_pixels():
    probs = _probs(0)
    valid = torch.ones(2, 6, 7, dtype=torch.bool)
    valid[1, :, 5:] = False  # padding
    sel = FixedSelector(C, threshold=0.9, ignore_top=1, ignore_bottom=2).select(probs, valid)
    p, v = probs.numpy(), valid.numpy()
    conf, pred = p.max(1), p.argmax(1)
    for i in range(2):
        share = ((conf[i] >= 0.9) & v[i]).sum() / v[i].sum()
        for y in range(6):
            for x in range(7):
                expected = share if v[i, y, x] and 1 <= y < 4 else 0.0
                assert abs(float(sel.weights[i, y, x]) - expected) < 1e-6
                assert int(sel.labels[i, y, x]) == (pred[i, y, x] if v[i, y, x] else 255)
    assert 0 < float(sel.weights.max()) < 1


def _stream(batches: int):
    return [
        (
            _probs(10 + b, sharp=2.0 + b % 3),
            torch.rand(2, 6, 7, generator=torch.Generator().manual_seed(b)) > 0.1,
        )
        for b in range(batches)
    ]


def test_cb_thresholds_are_the_top_portion_quantile_of_the_window_within_one_bin():
    portion, window = 0.3, 3
    selector = WindowedSelector(C, portion=portion, window=window)
    seen = []
    for probs, valid in _stream(7):
        sel = selector.select(probs, valid)
        seen.append((probs.max(1).values[valid].numpy(), probs.argmax(1)[valid].numpy()))
        conf = np.concatenate([c for c, _ in seen[-window:]])
        pred = np.concatenate([p for _, p in seen[-window:]])
        lam = selector.thresholds().numpy()
        for c in range(C):
            values = np.sort(conf[pred == c])[::-1]
            k = int(np.floor(len(values) * portion))
            if k == 0:
                assert lam[c] == 1.0
                continue
            exact = values[k - 1]
            assert lam[c] <= exact < lam[c] + 1 / HISTOGRAM_BINS, (c, lam[c], exact)
        # selection: CBST's rule on the current batch, weight 1 on the kept pixels only
        ratio = probs.numpy() / lam[None, :, None, None]
        expected = np.where((ratio.max(1) >= 1) & valid.numpy(), ratio.argmax(1), 255)
        np.testing.assert_array_equal(sel.labels.numpy(), expected)
        np.testing.assert_array_equal(sel.weights.numpy(), (expected != 255).astype(np.float32))


def test_global_uses_one_threshold_the_top_portion_of_all_window_pixels():
    selector = GlobalWindowedSelector(C, portion=0.5, window=2)
    stream = _stream(3)
    for probs, valid in stream:
        selector.select(probs, valid)
    conf = np.concatenate([p.max(1).values[v].numpy() for p, v in stream[-2:]])
    exact = np.sort(conf)[::-1][int(len(conf) * 0.5) - 1]
    lam = selector.thresholds().numpy()
    assert np.all(lam == lam[0]) and lam[0] <= exact < lam[0] + 1 / HISTOGRAM_BINS


def test_a_restored_selector_continues_as_the_original():
    stream = _stream(6)
    a = WindowedSelector(C, portion=0.4, window=3)
    for probs, valid in stream[:4]:
        a.select(probs, valid)
    b = WindowedSelector(C, portion=0.4, window=3)
    b.load_state_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in a.state_dict().items()})
    for probs, valid in stream[4:]:
        assert torch.equal(a.select(probs, valid).labels, b.select(probs, valid).labels)


def test_policy_names_reach_the_online_selectors():
    assert set(ONLINE_SELECTORS) == {"fixed", "cb", "global"} <= set(SELECTION_POLICIES.names())
    assert SELECTION_POLICIES.get("fixed") is FixedSelector
    assert SELECTION_POLICIES.meta("fixed") == {"modes": ("online",)}


def test_histograms_bin_as_the_rounds_estimator_does():
    from cbst.online_selection import confidence_histogram
    from cbst.thresholds import ThresholdEstimator

    conf = torch.cat(
        [torch.rand(500, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, 1.2, 0.0])]
    )
    pred = torch.randint(0, C, (503,), generator=torch.Generator().manual_seed(1))
    rounds = ThresholdEstimator(C, "cb", bins=HISTOGRAM_BINS)
    rounds.update_confidences(conf, pred)
    assert torch.equal(confidence_histogram(conf, pred, C), rounds.state_dict()["hist"])
