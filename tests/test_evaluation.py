"""Metrics against brute force and the official Cityscapes evaluator; model/folder evaluation; CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cbst.evaluation import ConfusionMatrix, Metrics, evaluate_model, evaluate_predictions, format_table
from cbst.inference import IMAGENET_MEAN, IMAGENET_STD
from cbst.io import DataError, read_label, write_png
from cbst.labels import CITYSCAPES_16, CITYSCAPES_19, CLASSES_13, CLASSES_16

VAL_FRAME = "frankfurt_000000_000294"
TRAIN_FRAMES = ("aachen_000000_000019", "aachen_000001_000019")


# ----------------------------------------------------------------------------- brute force
def brute_force(pred: np.ndarray, target: np.ndarray, c: int) -> dict[str, object]:
    """Per-class IoU, pixel accuracy and mean accuracy by explicit pixel loops over classes."""
    valid = target < c
    iou, acc = [], []
    for k in range(c):
        tp = np.sum(valid & (target == k) & (pred == k))
        fp = np.sum(valid & (target != k) & (pred == k))
        fn = np.sum(valid & (target == k) & (pred != k))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else None)
        if np.sum(target == k):
            acc.append(tp / np.sum(target == k))
    present = [v for v in iou if v is not None]
    return {
        "iou": iou,
        "miou": sum(present) / len(present),
        "pixel_acc": np.sum(valid & (pred == target)) / np.sum(valid),
        "mean_acc": sum(acc) / len(acc),
    }


def random_maps(seed: int, c: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Random pred/target: ignore pixels, class 4 absent from GT but predicted, class 5 absent
    and never predicted, and some predictions outside the class range (255)."""
    rng = np.random.default_rng(seed)
    target = rng.choice([0, 1, 2, 3, 255], size=(2, 31, 47), p=[0.3, 0.25, 0.2, 0.1, 0.15])
    pred = np.where(
        rng.random(target.shape) < 0.6, target, rng.choice([0, 1, 2, 3, 4, 255], size=target.shape)
    )
    return pred.astype(np.int64), target.astype(np.int64)


def test_confusion_matrix_and_metrics_match_brute_force() -> None:
    c = 6
    names = [f"c{i}" for i in range(c)]
    cm = ConfusionMatrix(c)
    preds, targets = zip(*(random_maps(seed) for seed in range(3)))
    for p, t in zip(preds, targets):
        cm.update(torch.from_numpy(p), torch.from_numpy(t))
    pred, target = np.concatenate(preds), np.concatenate(targets)
    expected = np.zeros((c, c), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t < c and p < c:
            expected[t, p] += 1
    assert torch.equal(cm.matrix, torch.from_numpy(expected))
    assert cm.matrix.dtype == torch.int64

    ref = brute_force(pred, target, c)
    m = cm.metrics(names)
    assert m.iou["c5"] is None and ref["iou"][5] is None
    assert m.iou["c4"] == 0.0
    for k, name in enumerate(names[:5]):
        assert m.iou[name] == pytest.approx(ref["iou"][k], abs=1e-12)
    assert m.miou == pytest.approx(ref["miou"], abs=1e-12)
    assert m.pixel_acc == pytest.approx(ref["pixel_acc"], abs=1e-12)
    assert m.mean_acc == pytest.approx(ref["mean_acc"], abs=1e-12)
    assert m.miou_over(["c0", "c5"]) == pytest.approx(ref["iou"][0])


def test_confusion_matrix_merge_reset_and_shape_check() -> None:
    a, b, whole = ConfusionMatrix(6), ConfusionMatrix(6), ConfusionMatrix(6)
    (p1, t1), (p2, t2) = random_maps(1), random_maps(2)
    a.update(torch.from_numpy(p1), torch.from_numpy(t1))
    b.update(torch.from_numpy(p2), torch.from_numpy(t2))
    whole.update(torch.from_numpy(np.concatenate([p1, p2])), torch.from_numpy(np.concatenate([t1, t2])))
    a.merge(b)
    a.all_reduce()  # no process group: a no-op
    assert torch.equal(a.matrix, whole.matrix) and torch.equal(a.gt_pixels, whole.gt_pixels)
    a.reset()
    assert int(a.matrix.sum()) == 0
    with pytest.raises(ValueError):
        a.update(torch.zeros(3, 4, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))


def test_to_json_and_miou13() -> None:
    iou = {name: i / 20 for i, name in enumerate(CLASSES_16)}
    iou["wall"] = None
    m = Metrics(class_names=CLASSES_16, iou=iou, miou=0.4567, pixel_acc=0.9, mean_acc=0.5)
    out = m.to_json()
    assert list(out) == ["miou", "miou13", "pixel_acc", "mean_acc", "iou"]
    assert out["miou13"] == pytest.approx(sum(CLASSES_16.index(n) for n in CLASSES_13) / 20 / 13)
    assert out["iou"]["wall"] is None
    json.dumps(out)
    nineteen = Metrics(
        class_names=("a",), iou={"a": None}, miou=math.nan, pixel_acc=math.nan, mean_acc=math.nan
    )
    assert nineteen.to_json() == {"miou": None, "pixel_acc": None, "mean_acc": None, "iou": {"a": None}}
    back = Metrics.from_json(json.loads(json.dumps(out)))
    assert back.class_names == CLASSES_16 and back.iou == iou and back.miou == 0.4567
    assert math.isnan(Metrics.from_json(nineteen.to_json()).miou)


def test_format_table_exact() -> None:
    iou = {name: i / 20 for i, name in enumerate(CLASSES_16)}
    iou["wall"] = None
    m = Metrics(class_names=CLASSES_16, iou=iou, miou=0.4567, pixel_acc=0.9, mean_acc=0.5)
    expected = (
        "Case|mIoU|mIoU*|Road|Sidewalk|Build|Wall|Fence|Pole|Traffic Light|Traffic Sign|Veg.|Sky|"
        "Person|Rider|Car|Bus|Motor|Bike\n"
        "---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---\n"
        "CBST|45.7|41.5|0.0|5.0|10.0|-|20.0|25.0|30.0|35.0|40.0|45.0|50.0|55.0|60.0|65.0|70.0|75.0"
    )
    assert format_table({"CBST": m}, CLASSES_16) == expected
    header = format_table({}, CITYSCAPES_19.class_names).splitlines()[0]
    assert header.startswith("Case|mIoU|Road|Sidewalk|Build|Wall|") and header.endswith("|Motor|Bike")


# ----------------------------------------------------------------------------- official evaluator
def _paths(testdata: Path, frame: str) -> tuple[Path, Path]:
    """(image, labelIds GT) of a real Cityscapes test frame."""
    city = frame.split("_")[0]
    split = "val" if city == "frankfurt" else "train"
    root = testdata / "cityscapes"
    return (
        root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png",
        root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png",
    )


def _perturb(gt: np.ndarray, seed: int) -> np.ndarray:
    """A plausible labelId prediction: swapped classes, noise blocks (void ids included)."""
    rng = np.random.default_rng(seed)
    pred = gt.copy()
    h, w = gt.shape
    left = np.zeros_like(gt, dtype=bool)
    left[:, : w // 2] = True
    pred[left & (gt == 7)] = 8  # road -> sidewalk on the left half
    pred[~left & (gt == 8)] = 7  # sidewalk -> road on the right half
    pred[gt == 26] = 27  # car -> truck
    pred[(gt == 21) & (rng.random(gt.shape) < 0.3)] = 22  # vegetation -> terrain, sparsely
    ids = [i for i in range(34) if i != 31]  # never predict 'train' (absent from the GT too)
    for _ in range(25):
        bh, bw = rng.integers(h // 40 + 1, h // 6), rng.integers(w // 40 + 1, w // 6)
        y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
        pred[y : y + bh, x : x + bw] = rng.choice(ids)
    return pred


@pytest.fixture(scope="module")
def predictions(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Prediction PNGs for the val frame and two train frames, named as the official tool expects."""
    folder = tmp_path_factory.mktemp("preds")
    frames = (VAL_FRAME, *TRAIN_FRAMES)
    pred_files, gt_files, samples = [], [], []
    for seed, frame in enumerate(frames):
        image, gt = _paths(testdata, frame)
        path = folder / frame.split("_")[0] / f"{frame}_leftImg8bit.png"
        write_png(path, _perturb(read_label(gt), seed).astype(np.uint8))
        pred_files.append(path)
        gt_files.append(gt)
        samples.append((image, gt, frame))
    return {"folder": folder, "pred": pred_files, "gt": gt_files, "samples": samples}


def _official(pred_files: list[Path], gt_files: list[Path]) -> dict:
    """The official cityscapesscripts pixel-level result for the given file lists."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = copy.copy(official.args)
    args.quiet = True
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False  # its pixel-accuracy code uses np.in1d, removed in numpy 2.4
    args.JSONOutput = False
    return official.evaluateImgLists([str(p) for p in pred_files], [str(g) for g in gt_files], args)


def _dataset(samples: list[tuple[Path, Path, str]], protocol=CITYSCAPES_19):
    from cbst.datasets import Sample, SegmentationDataset

    return SegmentationDataset([Sample(i, g, n) for i, g, n in samples], protocol)


def test_agrees_with_official_cityscapes_evaluator(predictions: dict) -> None:
    ours = evaluate_predictions(predictions["folder"], _dataset(predictions["samples"]), progress=False)
    theirs = _official(predictions["pred"], predictions["gt"])
    assert abs(ours.miou - theirs["averageScoreClasses"]) < 1e-4
    for name in CITYSCAPES_19.class_names:
        official_iou = theirs["classScores"][name]
        if math.isnan(official_iou):
            assert ours.iou[name] is None, name
        else:
            assert ours.iou[name] == pytest.approx(official_iou, abs=1e-4), name
    assert ours.iou["train"] is None
    assert 0.15 < ours.miou < 0.95  # the perturbation is neither trivial nor destructive


def test_evaluate_predictions_errors(predictions: dict, tmp_path: Path) -> None:
    dataset = _dataset(predictions["samples"][:1])
    with pytest.raises(DataError, match=VAL_FRAME):
        evaluate_predictions(tmp_path, dataset, progress=False)
    val_pred = predictions["pred"][0]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        (tmp_path / sub / val_pred.name).write_bytes(val_pred.read_bytes())
    with pytest.raises(DataError, match="2 predictions"):
        evaluate_predictions(tmp_path, dataset, progress=False)
    small = tmp_path / "small"
    write_png(small / f"{VAL_FRAME}.png", np.zeros((64, 128), dtype=np.uint8))
    with pytest.raises(DataError, match="differs"):
        evaluate_predictions(small, dataset, progress=False)


# ----------------------------------------------------------------------------- evaluate_model
class MemoryDataset(torch.utils.data.Dataset):
    """A labelled in-memory dataset with the interface of cbst.datasets.SegmentationDataset."""

    def __init__(self, labels: list[np.ndarray], protocol=CITYSCAPES_19) -> None:
        self.labels = labels
        self.protocol = protocol
        self.samples = [SimpleNamespace(image=None, label=None, name=f"img{i}") for i in range(len(labels))]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        label = self.labels[i]
        image = np.zeros(label.shape + (3,), dtype=np.uint8)
        image[..., 0] = np.where(label == 255, 0, label * 10)  # the oracle reads the class here
        return {"image": image, "label": label, "name": f"img{i}", "index": i}


class Oracle(nn.Module):
    """Recovers the class written into the red channel: predicts the ground truth."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = (x[:, :1] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255 / 10
        classes = torch.arange(19, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return -((value - classes) ** 2) * 10


class Constant(nn.Module):
    """Predicts class ``k`` everywhere, at output stride 8."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        out = torch.zeros((n, 19, -(-h // 8), -(-w // 8)), device=x.device) + self.dummy
        out[:, self.k] = 5.0
        return out


@pytest.fixture()
def memory_dataset() -> MemoryDataset:
    rng = np.random.default_rng(0)
    shapes = [(16, 24), (16, 24), (20, 12), (16, 24)]
    labels = [rng.choice([0, 1, 2, 3, 4, 255], size=s).astype(np.uint8) for s in shapes]
    return MemoryDataset(labels)


def test_evaluate_model_oracle_scores_one_and_writes_outputs(
    memory_dataset: MemoryDataset, tmp_path: Path
) -> None:
    m = evaluate_model(
        Oracle(), memory_dataset, device="cpu", batch_size=2, output_dir=tmp_path, progress=False
    )
    assert m.miou == 1.0 and m.pixel_acc == 1.0 and m.mean_acc == 1.0
    assert [n for n, v in m.iou.items() if v is not None] == list(CITYSCAPES_19.class_names[:5])
    for i, label in enumerate(memory_dataset.labels):
        raw = read_label(tmp_path / "labelIds" / f"img{i}.png")
        valid = label != 255
        assert np.array_equal(raw[valid], CITYSCAPES_19.decode(label)[valid])
        color = np.asarray(Image.open(tmp_path / "color" / f"img{i}.png"))
        assert color.shape == label.shape + (3,)


def test_evaluate_model_constant_prediction(memory_dataset: MemoryDataset) -> None:
    m = evaluate_model(
        Constant(2), memory_dataset, device="cpu", batch_size=3, progress=False, flip=True, scales=(0.5, 1.0)
    )
    target = np.concatenate([label.ravel() for label in memory_dataset.labels]).astype(np.int64)
    ref = brute_force(np.full_like(target, 2), target, 19)
    assert m.miou == pytest.approx(ref["miou"], abs=1e-12)
    assert m.iou["building"] == pytest.approx(ref["iou"][2])
    assert m.iou["road"] == 0.0 and m.iou["car"] is None


# ----------------------------------------------------------------------------- command line
def test_evaluate_command_on_real_val_frame(
    predictions: dict,
    testdata: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import cbst.cli

    monkeypatch.setattr(cbst.cli, "COMMANDS", ("evaluate",))  # independent of other commands
    folder = tmp_path / "my_preds"
    folder.mkdir()
    (folder / predictions["pred"][0].name).write_bytes(predictions["pred"][0].read_bytes())
    out = tmp_path / "metrics.json"
    argv = [
        "evaluate",
        "--dataset",
        "cityscapes",
        "--data-root",
        str(testdata / "cityscapes"),
        "--predictions",
        str(folder),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cbst.cli.main(argv) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("Case|mIoU|Road|") and table[2].startswith("my_preds|")
    result = json.loads(out.read_text())
    official = _official(predictions["pred"][:1], predictions["gt"][:1])
    assert result["case"] == "my_preds" and result["split"] == "val" and result["images"] == 1
    assert result["protocol"] == "cityscapes19" and "miou13" not in result
    assert abs(result["miou"] - official["averageScoreClasses"]) < 1e-4
    assert set(result["iou"]) == set(CITYSCAPES_19.class_names)

    assert cbst.cli.main(argv + ["--num-classes", "16", "--case", "sixteen", "--overwrite"]) == 0
    result16 = json.loads(out.read_text())
    assert result16["case"] == "sixteen" and set(result16["iou"]) == set(CITYSCAPES_16.class_names)
    assert "miou13" in result16
    assert capsys.readouterr().out.splitlines()[0].startswith("Case|mIoU|mIoU*|Road|")

    assert cbst.cli.main(argv + ["--output", str(tmp_path / "x")]) == 2  # --output needs a model


def test_evaluate_command_with_checkpoint(
    testdata: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cbst.cli
    from cbst.checkpoints import save_checkpoint
    from cbst.models import build_model

    monkeypatch.setattr(cbst.cli, "COMMANDS", ("evaluate",))
    torch.manual_seed(0)
    ckpt = tmp_path / "small_src.pt"
    save_checkpoint(ckpt, build_model("small", 19), arch="small", num_classes=19, protocol="cityscapes19")
    common = [
        "evaluate",
        "--dataset",
        "cityscapes",
        "--data-root",
        str(testdata / "cityscapes"),
        "--no-progress",
    ]
    out, preds = tmp_path / "m.json", tmp_path / "pred"
    assert (
        cbst.cli.main(
            common
            + [
                "--checkpoint",
                str(ckpt),
                "--test-flipping",
                "--device",
                "cpu",
                "--num-workers",
                "0",
                "--output",
                str(preds),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["case"] == "small_src" and result["protocol"] == "cityscapes19"
    assert (preds / "color" / f"{VAL_FRAME}.png").is_file()
    # the written labelIds, scored as a prediction folder, give the same numbers
    assert (
        cbst.cli.main(common + ["--predictions", str(preds / "labelIds"), "--out", str(out), "--overwrite"])
        == 0
    )
    assert json.loads(out.read_text())["iou"] == result["iou"]
    # a 19-class model cannot be scored under the 16-class protocol
    assert cbst.cli.main(common + ["--checkpoint", str(ckpt), "--num-classes", "16"]) == 2
