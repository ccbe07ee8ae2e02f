"""CRST's regularisers: the two formulas against numpy, the crop resampling, and the pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbst import selftrain
from cbst.crst import CrstLoss, kld_regularizer, soft_pseudo_labels
from cbst.probability_cache import CACHE_FOLDER
from cbst.selftrain import SelfTrainConfig, self_train
from cbst.thresholds import assign_pseudo_labels
from cbst.transforms import TrainTransform

C = 5


def _probs_and_thresholds(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random N×C×H×W probabilities with some exact zeros, and λ with some classes at 1."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(C, 0.5), size=(2, 6, 7)).transpose(0, 3, 1, 2)
    p[rng.random(p.shape) < 0.15] = 0.0  # zero probabilities
    p[:, 0, 0, 0] = 1.0  # at least one non-zero per pixel: a one-hot pixel
    p /= p.sum(axis=1, keepdims=True)
    lam = rng.uniform(0.2, 0.9, C)
    lam[[1, 3]] = 1.0  # classes never selected
    return p, lam


def _numpy_lrent(p: np.ndarray, lam: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, keep, margin) of the issue's formulas written out directly, in float64."""
    lam = lam.reshape(1, -1, 1, 1)
    w = (p / lam) ** (1 / alpha)
    q = w / w.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        q_log_p = np.where(q > 0, q * np.log(p), 0.0)
        q_log_q = np.where(q > 0, q * np.log(q), 0.0)
    lhs = -q_log_p.sum(1) + alpha * q_log_q.sum(1)
    rhs = -(q * np.log(lam)).sum(1)
    return q, lhs < rhs, rhs - lhs


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5])
def test_soft_pseudo_labels_equal_the_direct_formulas(alpha):
    p, lam = _probs_and_thresholds()
    q_ref, keep_ref, margin = _numpy_lrent(p, lam, alpha)
    soft, keep = soft_pseudo_labels(torch.from_numpy(p).float(), torch.from_numpy(lam).float(), alpha)
    assert soft.dtype == torch.float32 and keep.dtype == torch.bool
    assert soft.shape == p.shape and keep.shape == (2, 6, 7)
    np.testing.assert_allclose(soft.numpy(), q_ref, atol=2e-6)
    assert soft[p == 0].abs().max() < 1e-30  # a zero probability gets no label mass
    decided = np.abs(margin) > 1e-4  # float32 against float64: skip ties with the boundary
    assert decided.mean() > 0.95 and 0 < keep_ref[decided].mean() < 1
    np.testing.assert_array_equal(keep.numpy()[decided], keep_ref[decided])


def test_soft_pseudo_labels_are_finite_at_the_extremes():
    probs = torch.zeros(1, C, 2, 2)
    probs[0, 2] = 1.0  # one-hot everywhere: four zero probabilities per pixel
    probs[0, :, 1, 1] = 0.0  # and a pixel with no probability at all (a zero prior)
    soft, keep = soft_pseudo_labels(probs, torch.tensor([1.0, 1.0, 0.5, 1e-30, 1.0]), 1e-3)
    assert torch.isfinite(soft).all()
    assert torch.allclose(soft.sum(1), torch.ones(1, 2, 2))
    assert keep[0].tolist() == [[True, True], [True, False]]


def test_small_alpha_gives_cbst_hard_selection():
    p, lam = _probs_and_thresholds(1)
    probs, thresholds = torch.from_numpy(p).float(), torch.from_numpy(lam).float()
    soft, keep = soft_pseudo_labels(probs, thresholds, 1e-6)
    hard = assign_pseudo_labels(probs, thresholds)
    ratio = (probs / thresholds.view(1, -1, 1, 1)).amax(1)
    clear = (ratio - 1).abs() > 1e-4
    assert torch.equal(keep[clear], (hard != 255)[clear])
    assert torch.equal(soft.argmax(1)[keep], hard[keep])
    assert torch.allclose(soft.amax(1), torch.ones(()), atol=1e-5)  # one-hot


def test_kld_regularizer_equals_the_direct_formula():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (2, C, 4, 6))
    logits[0, 0, 0, 0] = 200.0  # a near-certain pixel: other log p about -200, still finite
    valid = rng.random((2, 4, 6)) < 0.6
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    expected = (-log_p.mean(1))[valid].mean()
    got = kld_regularizer(torch.from_numpy(logits).float(), torch.from_numpy(valid))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert kld_regularizer(torch.zeros(1, C, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool)).item() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 logits under autocast stay finite
        half = kld_regularizer(torch.from_numpy(logits).bfloat16(), torch.from_numpy(valid))
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected, rel=2e-2)


def test_the_transform_reports_the_geometry_of_its_crop():
    h, w = 20, 30
    label = (np.arange(h * w).reshape(h, w) % 250).astype(np.uint8)  # every pixel identifiable
    image = np.zeros((h, w, 3), np.uint8)
    transform = TrainTransform(16, scale_range=(1.0, 1.0), seed=3, domain=1)
    flips = set()
    for index in range(8):
        out = transform({"image": image, "label": label, "name": "a", "index": index})
        sh, sw, top, left, flipped = out["geometry"].tolist()
        window = np.full((16, 16), 255, np.uint8)
        src = label[max(top, 0) : top + 16, max(left, 0) : left + 16]
        window[max(-top, 0) :][: src.shape[0], max(-left, 0) :][:, : src.shape[1]] = src
        assert (sh, sw) == (h, w) and out["domain"] == 1
        assert np.array_equal(out["label"].numpy(), window[:, ::-1] if flipped else window)
        flips.add(flipped)
    assert flips == {0, 1}


class _Cache:
    """A stand-in probability cache: ``get`` returns fixed full-resolution maps."""

    def __init__(self, probs: torch.Tensor) -> None:
        self.probs = probs

    def get(self, index: int) -> torch.Tensor:
        return self.probs[index]


def test_crop_probabilities_follow_the_crop_geometry():
    torch.manual_seed(0)
    probs = torch.rand(1, C, 12, 16).softmax(1)
    loss = CrstLoss(alpha=0.5, cache=_Cache(probs), thresholds=torch.ones(C))
    sampled, inside = loss.crop_probabilities(0, torch.tensor([12, 16, -2, 5, 1]), (8, 8))
    want = torch.zeros(C, 8, 8)
    want[:, 2:] = probs[0, :, 0:6, 5:13]
    assert torch.allclose(sampled[:, 2:], want[:, 2:].flip(-1), atol=1e-6)
    assert inside.sum() == 6 * 8 and not inside[:2].any()
    doubled = F.interpolate(probs, size=(24, 32), mode="bilinear", align_corners=False)
    sampled, inside = loss.crop_probabilities(0, torch.tensor([24, 32, 4, 10, 0]), (8, 8))
    assert inside.all() and torch.allclose(sampled, doubled[0, :, 4:12, 10:18], atol=1e-6)
    loss.prior = torch.full((C, 12, 16), 0.5)  # CBST-SP: the prior multiplies before sampling
    halved, _ = loss.crop_probabilities(0, torch.tensor([24, 32, 4, 10, 0]), (8, 8))
    assert torch.allclose(halved, sampled / 2, atol=1e-6)


class _Net(nn.Module):
    """A tiny deterministic segmentation net (stride 2, no dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, C, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _entropy_after_one_step(weight: float) -> float:
    """Mean prediction entropy on the target crop after one SGD step with MRKLD weight ``weight``."""
    torch.manual_seed(0)
    net = _Net()
    images = torch.randn(2, 3, 16, 16)
    labels = torch.randint(0, C, (2, 16, 16))
    batch = {"domain": torch.tensor([0, 1])}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    CrstLoss(mr_weight_kld=weight)(net(images), labels, batch).backward()
    optimizer.step()
    with torch.no_grad():
        probs = F.interpolate(net(images), size=(16, 16), mode="bilinear").softmax(1)[1]
    return float(-(probs * probs.log()).sum(0).mean())


def test_an_mrkld_step_raises_the_target_entropy():
    assert _entropy_after_one_step(1.0) > _entropy_after_one_step(0.0) + 1e-3


def test_the_mrkld_loss_weights_each_domain_once():
    torch.manual_seed(1)
    logits, labels = torch.randn(2, C, 4, 4), torch.randint(0, C, (2, 4, 4))
    labels[0, 0] = 255
    batch = {"domain": torch.tensor([0, 1])}
    ce = F.cross_entropy(logits, labels, ignore_index=255)
    valid = labels != 255
    per = -F.log_softmax(logits, 1).mean(1)
    both = (0.3 * per[0][valid[0]].sum() + 0.1 * per[1][valid[1]].sum()) / valid.sum()
    assert CrstLoss()(logits, labels, batch).item() == pytest.approx(ce.item(), rel=1e-6)
    got = CrstLoss(mr_weight_kld=0.1, mr_weight_src=0.3)(logits, labels, batch)
    assert got.item() == pytest.approx((ce + both).item(), rel=1e-6)
    target_only = 0.1 * per[1][valid[1]].mean()
    got = CrstLoss(mr_weight_kld=0.1)(logits, labels, batch)
    assert got.item() == pytest.approx((ce + target_only).item(), rel=1e-6)


def test_the_lrent_loss_averages_soft_target_and_hard_source_pixels():
    torch.manual_seed(2)
    logits, labels = torch.randn(2, C, 6, 8), torch.randint(0, C, (2, 6, 8))
    labels[:, 0] = 255
    probs, lam = torch.rand(1, C, 6, 8).softmax(1), torch.tensor([0.3, 0.5, 1.0, 0.4, 0.2])
    geometry = torch.tensor([[0] * 5, [6, 8, 0, 0, 0]])  # the target crop is its whole image
    batch = {"domain": torch.tensor([0, 1]), "index": torch.tensor([3, 0]), "geometry": geometry}
    loss = CrstLoss(alpha=0.25, cache=_Cache(probs), thresholds=lam)(logits, labels, batch)
    q, keep = soft_pseudo_labels(probs, lam, 0.25)
    log_p = F.log_softmax(logits, 1)
    source = F.cross_entropy(logits[:1], labels[:1], ignore_index=255, reduction="sum")
    target = -(q[0] * log_p[1]).sum(0)[keep[0]].sum()  # the target's own labels play no part
    assert 0 < keep.sum() < keep.numel()
    assert loss.item() == pytest.approx(
        ((source + target) / ((labels[0] != 255).sum() + keep.sum())).item(), rel=1e-5
    )


@pytest.fixture()
def crst_config(self_train_config) -> Callable[..., SelfTrainConfig]:
    """The suite's tiny self-training run (30 % target portion, mining 0.8), with LRENT on unless
    the changes say otherwise: ``crst_config(output, **changes)``."""

    def make(output, **kw) -> SelfTrainConfig:
        return self_train_config(
            output, **{"init_tgt_port": 0.3, "mine_port": 0.8, "lr_weight_ent": 0.25, **kw}
        )

    return make


def test_crst_configs_are_the_shared_base_plus_one_weight():
    from cbst.cli import _load_config, build_parser

    configs = Path(__file__).resolve().parents[1] / "configs"
    self_train_parser = build_parser()[1]["self-train"]
    mrkld, lrent = (
        _load_config(str(configs / f"gta2city_crst_{name}.yaml"), self_train_parser)
        for name in ("mrkld", "lrent")
    )
    shared = {k: v for k, v in mrkld.items() if k not in ("mr_weight_kld", "mr_weight_src")}
    assert shared == {k: v for k, v in lrent.items() if k != "lr_weight_ent"}
    assert (mrkld["mr_weight_kld"], lrent["lr_weight_ent"], lrent["kc_policy"]) == (0.1, 0.25, "cb")
    assert (lrent["base_lr"], lrent["num_round"], lrent["init_tgt_port"]) == (5e-5, 3, 0.2)


def test_bad_crst_options_fail_before_any_work(crst_config, tmp_path):
    for name in ("mr_weight_kld", "mr_weight_src", "lr_weight_ent"):
        flag = "--" + name.replace("_", "-")
        with pytest.raises(ValueError, match=f"{flag} must be >= 0"):
            self_train(crst_config(tmp_path / name, **{name: -0.1}))
        assert not (tmp_path / name).exists()


@pytest.mark.slow
def test_a_resumed_lrent_run_equals_an_uninterrupted_one(crst_config, tmp_path, monkeypatch):
    straight = self_train(crst_config(tmp_path / "straight", mr_weight_kld=0.1))
    stats = json.loads((tmp_path / "straight" / "round_1" / "stats.json").read_text())
    assert stats["lrent_alpha"] == 0.25
    fractions = [f for f in stats["kept_fraction"].values() if f is not None]
    assert fractions and all(0 <= f <= 1 for f in fractions)
    assert not (tmp_path / "straight" / "round_1" / CACHE_FOLDER).exists()  # deleted once trained

    real_train = selftrain._train_round

    def killed_in_round_1(cfg, plan, *args, **kw):
        if plan.index == 1:
            raise KeyboardInterrupt
        return real_train(cfg, plan, *args, **kw)

    monkeypatch.setattr(selftrain, "_train_round", killed_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        self_train(crst_config(tmp_path / "killed", mr_weight_kld=0.1))
    assert (tmp_path / "killed" / "round_1" / CACHE_FOLDER / "index.json").is_file()  # kept to resume
    monkeypatch.setattr(selftrain, "_train_round", real_train)
    with pytest.raises(ValueError, match="--lr-weight-ent 0.25 before"):
        self_train(crst_config(tmp_path / "killed", resume=True, lr_weight_ent=0.5))
    resumed = self_train(crst_config(tmp_path / "killed", mr_weight_kld=0.1, resume=True))
    a = torch.load(tmp_path / "straight" / "round_1" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "killed" / "round_1" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed[1]["miou"] == straight[1]["miou"]
    cbst = torch.load(tmp_path / "straight" / "round_0" / "model.pt", weights_only=False)["state_dict"]
    self_train(crst_config(tmp_path / "cbst", num_round=1, lr_weight_ent=0.0))
    plain = torch.load(tmp_path / "cbst" / "round_0" / "model.pt", weights_only=False)["state_dict"]
    assert not all(torch.equal(cbst[k], plain[k]) for k in cbst)  # the regularisers changed training


def test_demo_methods_add_crst_rows_only_on_request():
    from cbst.demo import DEFAULT_METHODS, parse_methods

    assert DEFAULT_METHODS == ("ST", "CBST", "CBST-SP")
    assert parse_methods("all") == ("ST", "CBST", "CBST-SP", "MRKLD", "LRENT")
    assert parse_methods("CBST, LRENT") == ("CBST", "LRENT")
    with pytest.raises(ValueError, match="--methods: unknown method.*'CRST'"):
        parse_methods("CBST,CRST")
