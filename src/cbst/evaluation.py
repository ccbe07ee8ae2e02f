"""Segmentation metrics, dataset-level evaluation, prediction-folder scoring and result tables.

Metric definition (the official ``cityscapesscripts`` pixel-level evaluator's): counts are
accumulated over the whole dataset, not averaged per image, and for class c

    IoU_c = TP_c / (TP_c + FP_c + FN_c)

where FP_c counts only pixels whose ground truth is a valid (non-ignored) class, and FN_c counts
every valid pixel of class c not predicted as c (including pixels predicted as an id outside the
protocol). A class with TP + FP + FN = 0 (absent from the GT and never predicted) has no IoU
(``None``) and is left out of the mean, as the official evaluator skips its NaN classes. The
original CBST-MX ``ScoreUpdater`` counted such a class as 0 instead (docs/method.md §8.2,
§12.6); on the real Cityscapes val set every class occurs, so the two give the same numbers there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from cbst import distributed
from cbst.inference import IMAGENET_MEAN, IMAGENET_STD, image_batches, predict_labels
from cbst.io import BackgroundWriter, DataError, read_label, write_png
from cbst.labels import TABLE_HEADERS, SubsetMean, subset_means


class ConfusionMatrix:
    """Pixel counts (ground truth x prediction) accumulated on a device with one bincount."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.device = torch.device(device)
        # One extra column holds valid-GT pixels predicted as no class (e.g. a raw id outside
        # the protocol): they are false negatives of their GT class and false positives of none.
        self._counts = torch.zeros((num_classes, num_classes + 1), dtype=torch.int64, device=self.device)

    @property
    def matrix(self) -> Tensor:
        """C x C int64 counts; rows are the ground truth, columns the prediction."""
        return self._counts[:, : self.num_classes]

    @property
    def gt_pixels(self) -> Tensor:
        """Valid ground-truth pixels per class, whatever was predicted there."""
        return self._counts.sum(dim=1)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch; targets equal to 255 (or otherwise >= C) are ignored."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        c = self.num_classes
        pred = pred.to(self.device, torch.int64).reshape(-1)
        target = target.to(self.device, torch.int64).reshape(-1)
        valid = (target >= 0) & (target < c)
        pred = pred[valid]
        pred = torch.where((pred >= 0) & (pred < c), pred, torch.full_like(pred, c))
        index = target[valid] * (c + 1) + pred
        self._counts += torch.bincount(index, minlength=c * (c + 1)).view(c, c + 1)

    def reset(self) -> None:
        """Zero all counts."""
        self._counts.zero_()

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of another matrix of the same size (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class counts into {self.num_classes}")
        self._counts += other._counts.to(self.device)

    def all_reduce(self) -> None:
        """Sum the counts over all processes when torch.distributed is initialised."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self._counts)

    def metrics(self, class_names: Sequence[str]) -> Metrics:
        """The scores of the accumulated counts."""
        return Metrics.from_counts(self.matrix.cpu().numpy(), self.gt_pixels.cpu().numpy(), class_names)


def _mean(values: Iterable[float | None]) -> float:
    """Mean of the values that are not None (NaN when there are none)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else math.nan


@dataclass(frozen=True)
class Metrics:
    """Per-class IoU and the dataset-level means, as fractions in [0, 1]."""

    class_names: tuple[str, ...]
    iou: dict[str, float | None]
    miou: float
    pixel_acc: float
    mean_acc: float

    @classmethod
    def from_counts(cls, matrix: np.ndarray, gt_pixels: np.ndarray, class_names: Sequence[str]) -> Metrics:
        """Scores of a C x C confusion matrix plus the per-class valid GT pixel totals."""
        if len(class_names) != matrix.shape[0]:
            raise ValueError(f"{len(class_names)} class names for a {matrix.shape[0]}-class matrix")
        tp = np.diag(matrix).astype(np.float64)
        fp = matrix.sum(axis=0) - tp
        fn = gt_pixels - tp
        denom = tp + fp + fn
        iou = {
            name: (float(tp[i] / denom[i]) if denom[i] > 0 else None) for i, name in enumerate(class_names)
        }
        acc = [float(tp[i] / gt_pixels[i]) for i in range(len(class_names)) if gt_pixels[i] > 0]
        total = gt_pixels.sum()
        return cls(
            class_names=tuple(class_names),
            iou=iou,
            miou=_mean(iou.values()),
            pixel_acc=float(tp.sum() / total) if total > 0 else math.nan,
            mean_acc=_mean(acc),
        )

    def miou_over(self, names: Iterable[str]) -> float:
        """Mean IoU over a subset of the classes (e.g. ``labels.CLASSES_13`` for mIoU*)."""
        names = list(names)
        unknown = [n for n in names if n not in self.iou]
        if unknown:
            raise KeyError(f"classes {unknown} are not among {self.class_names}")
        return _mean(self.iou[n] for n in names)

    @property
    def subset_means(self) -> tuple[SubsetMean, ...]:
        """The class-subset means reported beside the mIoU: the label protocol's (16 classes:
        the 13-class mIoU*, :data:`cbst.labels.MIOU13`)."""
        return subset_means(self.class_names)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (fractions; NaN and absent classes become null)."""
        out: dict[str, Any] = {"miou": _finite(self.miou)}
        for subset in self.subset_means:
            out[subset.key] = _finite(self.miou_over(subset.classes))
        out.update(pixel_acc=_finite(self.pixel_acc), mean_acc=_finite(self.mean_acc), iou=dict(self.iou))
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Metrics:
        """Rebuild the metrics that ``to_json`` wrote (e.g. a finished round's metrics.json)."""

        def number(value: float | None) -> float:
            return math.nan if value is None else float(value)

        return cls(
            class_names=tuple(data["iou"]),
            iou=dict(data["iou"]),
            miou=number(data["miou"]),
            pixel_acc=number(data["pixel_acc"]),
            mean_acc=number(data["mean_acc"]),
        )


def _finite(value: float) -> float | None:
    """``value``, or None when it is NaN (JSON has no NaN)."""
    return None if math.isnan(value) else value


def _label_tensor(item: dict) -> Tensor:
    """The trainId map of a dataset item, checked against its image size."""
    label = item["label"]
    if label is None:
        raise DataError(f"{item['name']}: sample has no label to evaluate against")
    if label.shape != item["image"].shape[:2]:
        raise DataError(
            f"{item['name']}: label size {label.shape} differs from image size {item['image'].shape[:2]}"
        )
    return torch.from_numpy(np.ascontiguousarray(label))


def write_prediction(
    output_dir: Path, name: str, train_ids: np.ndarray, protocol: Any, *, prefix: str = "", color: bool = True
) -> None:
    """Save a trainId map as ``{prefix}labelIds/NAME.png`` (raw ids, 0 where ignored; the official
    evaluator's input) and, with ``color``, ``{prefix}color/NAME.png``."""
    write_png(output_dir / f"{prefix}labelIds" / f"{name}.png", protocol.decode(train_ids))
    if color:
        write_png(output_dir / f"{prefix}color" / f"{name}.png", protocol.colorize(train_ids))


class RunEvaluation(Protocol):
    """The evaluation options a self-training run carries (rounds and online alike)."""

    eval_long_side: int | None
    eval_flipping: bool
    num_workers: int
    amp: bool
    progress: bool


def evaluate_run(
    cfg: RunEvaluation, model: nn.Module, dataset: Any, device: torch.device | str, desc: str = "evaluate"
) -> Metrics:
    """:func:`evaluate_model` with a run's own evaluation options, so that every stage of a run
    (the source model, each round, each online evaluation) is scored the same way."""
    return evaluate_model(
        model,
        dataset,
        device=device,
        long_side=cfg.eval_long_side,
        flip=cfg.eval_flipping,
        num_workers=cfg.num_workers,
        amp=cfg.amp,
        progress=cfg.progress,
        desc=desc,
    )


def evaluate_model(
    model: nn.Module,
    dataset: Any,
    *,
    device: torch.device | str,
    long_side: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window: int | None = None,
    batch_size: int = 1,
    output_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    amp: bool = True,
    desc: str = "evaluate",
) -> Metrics:
    """Run ``model`` over a labelled dataset and score it; optionally save the predictions.

    Images of equal size are batched together (up to ``batch_size``), decoded by
    ``num_workers`` loader processes ahead of the forward passes, and predictions are written
    by background threads; the confusion matrix stays on ``device``. ``mean``/``std`` default
    to the ImageNet values. Under torchrun each process scores its share of the images
    (:func:`cbst.distributed.shard`) and writes their predictions; the confusion matrices are
    summed, so every process returns the metrics of the whole dataset.
    """
    dataset = distributed.shard_dataset(dataset)
    progress = progress and distributed.is_main()
    device = torch.device(device)
    model.to(device)
    protocol = dataset.protocol
    confusion = ConfusionMatrix(protocol.num_classes, device)
    options = dict(
        long_side=long_side,
        scales=tuple(scales),
        flip=flip,
        window=window,
        mean=mean or IMAGENET_MEAN,
        std=std or IMAGENET_STD,
        amp=amp,
    )
    pin = device.type == "cuda"
    batches = image_batches(dataset, batch_size, num_workers=num_workers, pin_memory=pin)
    with (
        BackgroundWriter() as writer,
        tqdm(total=len(dataset), disable=not progress, unit="img", desc=desc) as bar,
    ):
        for step, (images, batch) in enumerate(batches, 1):
            targets = torch.stack([_label_tensor(item) for item in batch])
            targets = (targets.pin_memory() if pin else targets).to(device, non_blocking=True)
            pred = predict_labels(model, images, **options)
            confusion.update(pred, targets)
            if output_dir is not None:
                for item, train_ids in zip(batch, pred.to(torch.uint8).cpu().numpy()):
                    writer.submit(
                        Path(output_dir) / "labelIds" / f"{item['name']}.png",
                        write_prediction,
                        Path(output_dir),
                        item["name"],
                        train_ids,
                        protocol,
                    )
            bar.update(len(batch))
            if progress and step % 10 == 0:  # the running mIoU costs a device sync
                bar.set_postfix(mIoU=f"{confusion.metrics(protocol.class_names).miou:.3f}", refresh=False)
    confusion.all_reduce()
    return confusion.metrics(protocol.class_names)


_CITYSCAPES_CORE = re.compile(r"[A-Za-z-]+_\d{6}_\d{6}")


def prediction_key(sample_name: str) -> str:
    """The part of a sample name a prediction file must contain: ``city_seq_frame`` for
    Cityscapes names (as the official evaluator matches), the whole name otherwise."""
    match = _CITYSCAPES_CORE.search(sample_name)
    return match.group(0) if match else sample_name


def _contains_key(filename: str, key: str) -> bool:
    """Whether ``key`` occurs in ``filename`` not directly preceded or followed by a digit
    (so ``00001`` does not match ``000010.png``)."""
    return re.search(rf"(?<!\d){re.escape(key)}(?!\d)", filename) is not None


def find_predictions(pred_dir: str | Path, sample_names: Sequence[str]) -> list[Path]:
    """One prediction PNG per sample name, searched recursively; DataError if missing or ambiguous."""
    root = Path(pred_dir)
    if not root.is_dir():
        raise DataError(f"{root}: prediction folder not found")
    files = sorted(p for p in root.rglob("*.png") if p.is_file())
    found = []
    for name in sample_names:
        key = prediction_key(name)
        matches = [p for p in files if key in p.name and _contains_key(p.name, key)]
        if not matches:
            raise DataError(
                f"{root}: no prediction for sample {name!r} (expected a PNG whose name contains {key!r})"
            )
        if len(matches) > 1:
            shown = ", ".join(str(p) for p in matches[:5])
            raise DataError(f"{root}: {len(matches)} predictions match sample {name!r}: {shown}")
        found.append(matches[0])
    return found


def evaluate_predictions(pred_dir: str | Path, dataset: Any, *, progress: bool = True) -> Metrics:
    """Score a folder of raw-id prediction PNGs (Cityscapes labelIds) against a dataset's labels.

    Under torchrun each process reads its share of the files and the counts are summed.
    """
    protocol = dataset.protocol
    files = find_predictions(pred_dir, [s.name for s in dataset.samples])
    confusion = ConfusionMatrix(protocol.num_classes)
    shard = distributed.shard(len(files))
    for index in tqdm(shard, disable=not (progress and distributed.is_main()), unit="img", desc="evaluate"):
        path, name, label = files[index], dataset.samples[index].name, dataset.label(index)
        if label is None:
            raise DataError(f"{name}: sample has no label to evaluate against")
        raw = read_label(path)
        try:
            protocol.check_values(raw, path)
        except ValueError as exc:
            raise DataError(f"{exc}; a prediction must hold raw ids of that table") from None
        if raw.shape != label.shape:
            raise DataError(
                f"{path}: prediction size {raw.shape[::-1]} (WxH) differs from the "
                f"ground truth of {name} {label.shape[::-1]}"
            )
        confusion.update(torch.from_numpy(protocol.encode(raw)), torch.from_numpy(label))
    confusion.all_reduce()
    return confusion.metrics(protocol.class_names)


def _percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal ('-' when undefined)."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def format_table(rows: dict[str, Metrics], class_names: Sequence[str]) -> str:
    """A Markdown table in the original README's format, one row per case (values in %).

    The protocol's subset means follow ``mIoU`` (16-class tables: the 13-class ``mIoU*``);
    classes without a header of the original's get their own name.
    """
    subsets = subset_means(class_names)
    header = ["Case", "mIoU"] + [s.header for s in subsets] + [TABLE_HEADERS.get(c, c) for c in class_names]
    lines = ["|".join(header), "|".join(["---"] * len(header))]
    for case, m in rows.items():
        values = [m.miou] + [m.miou_over(s.classes) for s in subsets] + [m.iou[c] for c in class_names]
        lines.append("|".join([case] + [_percent(v) for v in values]))
    return "\n".join(lines)
