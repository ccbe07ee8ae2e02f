"""Training loop: lr policies, optimiser groups, loss, overfitting, resume equivalence, CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from cbst.labels import get_protocol
from cbst.losses import segmentation_loss
from cbst.models import IMAGENET_MEAN, IMAGENET_STD
from cbst.models.base import round_to_stride
from cbst.optim import build_optimizer, lr_at, set_lr
from cbst.sourcetrain import SourceTrainConfig, train_source
from cbst.training import train_epochs, train_loader
from cbst.transforms import TrainTransform

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3


class TinyNet(nn.Module):
    """A stand-in segmentation net: stride-2 logits, dropout, and the lr_groups() interface."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.drop = nn.Dropout2d(0.3)
        self.classifier = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(F.relu(self.features(x))))

    def lr_groups(self) -> list[dict]:
        weights = [self.features.weight, self.classifier.weight]
        biases = [self.features.bias, self.classifier.bias]
        return [
            {"params": weights, "lr_mult": 1.0, "wd_mult": 1.0},
            {"params": biases, "lr_mult": 2.0, "wd_mult": 0.0},
        ]


class MemoryDataset(torch.utils.data.Dataset):
    """A stand-in SegmentationDataset: colour-coded 8x8 blocks of a class, easy to learn."""

    protocol = get_protocol("cityscapes19")

    def __init__(self, n: int = 8, size: int = 24, transform=None) -> None:
        rng = np.random.default_rng(0)
        blocks = rng.integers(0, NUM_CLASSES, (n, size // 8, size // 8)).astype(np.uint8)
        self.labels = blocks.repeat(8, axis=1).repeat(8, axis=2)
        self.labels[:, :2] = 255
        palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)
        self.images = palette[np.minimum(self.labels, NUM_CLASSES - 1)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        sample = {"image": self.images[i], "label": self.labels[i], "name": f"m{i}", "index": i}
        return self.transform(sample) if self.transform else sample

    def with_transform(self, transform) -> MemoryDataset:
        copy = MemoryDataset.__new__(MemoryDataset)
        copy.__dict__.update(self.__dict__, transform=transform)
        return copy


def _dataset() -> MemoryDataset:
    return MemoryDataset(transform=TrainTransform(16, scale_range=(0.8, 1.2), seed=3))


def test_lr_policies_follow_the_formulas():
    base = 0.01
    assert lr_at("fixed", base, 70, 100) == base
    assert lr_at("poly", base, 0, 100) == pytest.approx(base)
    assert lr_at("poly", base, 50, 100) == pytest.approx(base * 0.5**0.9)
    assert lr_at("poly", base, 100, 100) == pytest.approx(1e-8)
    assert lr_at("linear", base, 25, 100) == pytest.approx(0.0075)
    assert lr_at("linear", base, 100, 100) == pytest.approx(1e-6)
    assert lr_at("linear", 1e-5, 100, 100) == pytest.approx(1e-7)
    assert [lr_at("step", base, i, 100, steps=(10, 20)) for i in (9, 10, 25)] == pytest.approx(
        [base, base * 0.1, base * 0.01]
    )
    with pytest.raises(ValueError, match="unknown lr policy"):
        lr_at("cosine", base, 0, 1)


def test_optimizer_groups_carry_the_multipliers():
    opt = build_optimizer(TinyNet(), 0.1, momentum=0.8, weight_decay=1e-3)
    (w, b) = opt.param_groups
    assert (w["lr"], w["weight_decay"], w["momentum"]) == pytest.approx((0.1, 1e-3, 0.8))
    assert (b["lr"], b["weight_decay"], b["lr_mult"]) == pytest.approx((0.2, 0.0, 2.0))
    set_lr(opt, 0.5)
    assert (w["lr"], b["lr"]) == pytest.approx((0.5, 1.0))


def test_loss_matches_cross_entropy_on_upsampled_logits():
    logits = torch.randn(2, 5, 4, 5, requires_grad=True)
    labels = torch.randint(0, 5, (2, 31, 37))
    labels[0, :10] = 255
    expected = F.cross_entropy(
        F.interpolate(logits, (31, 37), mode="bilinear", align_corners=False), labels, ignore_index=255
    )
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    empty = segmentation_loss(logits, torch.full((2, 31, 37), 255))
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model, losses = TinyNet(), []
    train_epochs(
        model,
        _dataset(),
        epochs=10,
        batch_size=4,
        base_lr=0.1,
        device="cpu",
        on_epoch_end=lambda e, s: losses.append(s["loss"]),
    )
    assert max(losses[-3:]) < 0.5 * losses[0]


def test_loader_order_and_crops_do_not_depend_on_worker_count():
    data = _dataset()
    runs = [list(train_loader(data, batch_size=4, epochs=range(1, 3), seed=1, num_workers=n)) for n in (0, 2)]
    assert len(runs[0]) == len(runs[1]) == 4  # 2 epochs of 8 // 4 batches, one loader
    for a, b in zip(*runs):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    assert not torch.equal(runs[0][0]["image"], runs[0][2]["image"])  # epochs draw anew


def test_an_epoch_is_the_shuffled_loader_of_its_seed():
    data = _dataset()
    got = list(train_loader(data, batch_size=4, epochs=range(2, 3), seed=1))
    data.transform.set_epoch(2)
    want = torch.utils.data.DataLoader(
        data, batch_size=4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(1 + 2)
    )
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])


def test_uint8_batches_normalise_to_the_float_path():
    """The device-side normalisation gives the tensors the transform used to return."""
    from cbst.inference import normalize

    batch = next(iter(train_loader(_dataset(), batch_size=4, epochs=range(1), seed=0)))
    assert batch["image"].dtype == torch.uint8 and batch["label"].dtype == torch.uint8
    raw = batch["image"].numpy()  # N x 3 x H x W
    shape = (1, 3, 1, 1)
    old = raw.astype(np.float32) * (1.0 / 255.0)  # the float32 path crops used to take
    old -= np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(shape)
    old *= 1.0 / np.asarray(IMAGENET_STD, dtype=np.float32).reshape(shape)
    exact = (raw / 255.0 - np.reshape(IMAGENET_MEAN, shape)) / np.reshape(IMAGENET_STD, shape)
    got = normalize(batch["image"])
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(old))  # bit for bit
    torch.testing.assert_close(got.double(), torch.from_numpy(exact), rtol=0, atol=1e-6)


class _Crash(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    kwargs = dict(epochs=2, batch_size=2, base_lr=0.05, lr_policy="poly", device="cpu", seed=4)
    torch.manual_seed(0)
    straight = TinyNet()
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    train_epochs(straight, _dataset(), **kwargs)

    crashed = TinyNet()
    crashed.load_state_dict(init)
    opt = build_optimizer(crashed, 0.05)

    def save_then_crash(epoch: int, stats: dict) -> None:
        torch.save({"model": crashed.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
        raise _Crash

    with pytest.raises(_Crash):
        train_epochs(crashed, _dataset(), optimizer=opt, on_epoch_end=save_then_crash, **kwargs)

    torch.manual_seed(99)  # the global RNG state of a fresh process differs
    resumed = TinyNet()
    state = torch.load(tmp_path / "ck.pt")
    resumed.load_state_dict(state["model"])
    opt = build_optimizer(resumed, 0.05)
    opt.load_state_dict(state["opt"])
    train_epochs(resumed, _dataset(), optimizer=opt, start_epoch=1, **kwargs)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_train_source_resume_matches_a_straight_run(tmp_path):
    from cbst.checkpoints import read_meta
    from cbst.synthetic import make_synthetic

    make_synthetic(tmp_path / "data", num_source=6, num_train=1, num_val=1, size=(64, 32), progress=False)

    def config(out: str, to_epoch: int, resume: bool = False) -> SourceTrainConfig:
        return SourceTrainConfig(
            dataset="gta5",
            data_root=str(tmp_path / "data" / "gta5"),
            output=str(tmp_path / out),
            model="small",
            batch_images=2,
            crop_size=32,
            base_lr=0.05,
            to_epoch=to_epoch,
            num_workers=0,
            device="cpu",
            resume=resume,
        )

    torch.manual_seed(0)
    last = train_source(config("a", 2))
    torch.manual_seed(1)  # the caller's RNG state must not matter: --seed decides everything
    train_source(config("b", 1))
    with pytest.raises(ValueError, match="--resume"):
        train_source(config("b", 2))
    train_source(config("b", 2, resume=True))
    a = torch.load(last, weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_meta(last)["protocol"] == "cityscapes19" and read_meta(last)["epoch"] == 2
    out = tmp_path / "b"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert [line.count('"epoch": ') for line in (out / "log.jsonl").read_text().splitlines()] == [1, 1]
    assert yaml.safe_load((out / "config.yaml").read_text())["to_epoch"] == 2


def _parser() -> argparse.ArgumentParser:
    from cbst.commands import train_source as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser


def test_command_rounds_the_crop_and_parses_ranges(monkeypatch, tmp_path):
    from cbst.commands import train_source as command

    seen = {}
    monkeypatch.setattr("cbst.sourcetrain.train_source", lambda c: seen.setdefault("c", c))
    args = _parser().parse_args(
        [
            "--data-root",
            "d",
            "--output",
            str(tmp_path),
            "--crop-size",
            "500",
            "--scale-rate-range",
            "0.5,1.5",
            "--lr-steps",
            "10,20",
        ]
    )
    assert command.run(args) == 0
    cfg = seen["c"]
    assert (cfg.crop_size, cfg.scale_range, cfg.lr_steps) == (500, (0.5, 1.5), (10, 20))
    assert cfg.dataset == "gta5"  # the default layout when --dataset is not given
    assert [round_to_stride(size, 8) for size in (500, 504, 505, 1)] == [504, 504, 512, 8]


@pytest.mark.parametrize("name", ["gta5_source_resnet38", "synthia_source_resnet38", "gta5_source_deeplabv2"])
def test_shipped_configs_name_only_known_options(name):
    known = {a.dest for a in _parser()._actions}
    config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    assert set(config) <= known


@pytest.mark.slow
def test_compiled_training_matches_eager_training():
    from cbst.device import maybe_compile

    kwargs = dict(epochs=1, batch_size=4, base_lr=0.05, device="cpu", seed=2, progress=False, amp=False)
    torch.manual_seed(0)
    eager, compiled = TinyNet(), TinyNet()
    compiled.load_state_dict(eager.state_dict())
    train_epochs(eager, _dataset(), **kwargs)
    train_epochs(maybe_compile(compiled, True), _dataset(), **kwargs)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_mixed_precision_only_where_bf16_is_native(monkeypatch, native):
    import cbst.device as dev

    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert dev.mixed_precision(cpu) == (torch.bfloat16 if native else None)
    assert dev.mixed_precision(cpu, enabled=False) is None
    assert dev.prefers_channels_last(cpu) is native
    with dev.autocast(cpu):
        out = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
