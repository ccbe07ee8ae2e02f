"""Class-balanced loss weights and the weighted cross-entropy, and their use by source training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cbst.errors import ConfigError
from cbst.labels import CITYSCAPES_19
from cbst.losses import CrossEntropyLoss, class_balance_weights
from cbst.registry import LOSSES
from cbst.sourcetrain import train_source


def test_weights_are_inverse_frequency_powers_with_the_plain_loss_scale():
    counts = np.array([[60, 6, 1, 0], [30, 3, 0, 0]])  # 90, 9, 1 and 0 pixels: f = 0.9, 0.09, 0.01, 0
    raw = [0.9**-0.5, 0.09**-0.5, 0.01**-0.5]
    scale = 0.9 * raw[0] + 0.09 * raw[1] + 0.01 * raw[2]
    expected = [r / scale for r in raw] + [0.0]
    np.testing.assert_allclose(class_balance_weights(counts, 0.5), expected, rtol=1e-12)
    np.testing.assert_allclose(class_balance_weights(counts, 0.0), [1, 1, 1, 0])
    with pytest.raises(ValueError, match="labelled pixels"):
        class_balance_weights(np.zeros((2, 3)), 0.5)


def test_weighted_cross_entropy_is_the_weighted_sum_over_the_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = 255
    weights = [0.5, 2.0, 4.0]
    lp, lab = torch.log_softmax(logits, 1).numpy(), labels.numpy()
    terms = [
        -weights[lab[n, y, x]] * lp[n, lab[n, y, x], y, x]
        for n in range(2)
        for y in range(4)
        for x in range(5)
        if lab[n, y, x] != 255
    ]
    loss = CrossEntropyLoss(class_weights=weights)
    assert loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert loss.per_pixel(logits.float(), labels).sum().item() == pytest.approx(sum(terms), rel=1e-5)


def test_train_source_weights_its_loss_by_the_counted_class_shares(
    source_train_config, epoch_losses, tmp_path
):
    plain = train_source(source_train_config(tmp_path / "plain", progress=False))
    weighted = train_source(
        source_train_config(tmp_path / "weighted", progress=False, class_weight_power=0.5)
    )
    out = weighted.parent
    counts = np.load(out / "class_pixel_counts.npy")
    assert counts.shape == (8, 19) and counts.sum() > 0  # the bench's 8 source images
    saved = json.loads((out / "class_weights.json").read_text())
    assert list(saved) == list(CITYSCAPES_19.class_names)
    np.testing.assert_allclose(list(saved.values()), class_balance_weights(counts, 0.5), rtol=1e-12)
    present = counts.sum(0) > 0
    shares = counts.sum(0)[present] / counts.sum()
    assert math.isclose(float(np.dot(shares, np.array(list(saved.values()))[present])), 1.0, rel_tol=1e-9)
    assert epoch_losses(out) != epoch_losses(plain.parent)  # same seed and crops: only the weights differ


def test_class_weights_need_a_loss_that_takes_them(source_train_config, tmp_path):
    @LOSSES.register("unweighted_for_test", override=True)
    def unweighted(*, align: str = "logits"):
        return CrossEntropyLoss(align=align)

    config = source_train_config(tmp_path / "run", loss="unweighted_for_test", class_weight_power=0.5)
    with pytest.raises(ConfigError, match="--class-weight-power.*unweighted_for_test"):
        train_source(config)
    assert not (tmp_path / "run").exists()
