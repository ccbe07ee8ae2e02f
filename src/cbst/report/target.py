"""Work on the target images of a run: per-class pseudo-label accuracy and the two galleries.

They need the target dataset the run pseudo-labelled or evaluated on (its ``config.yaml`` says
where); when it is not readable from here, the report says so and leaves these parts out
instead of failing.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cbst.io import DataError, read_image, read_label
from cbst.report.plots import png_data_uri
from cbst.report.runs import AnyRun, OnlineRun, Round, Run

THUMB_WIDTH = 320


@dataclass
class TargetScan:
    """What one pass over the target training images found.

    ``accuracy[(run path, round index)][class]``: the share of a class's pseudo-labelled pixels
    whose ground truth is that class (None when none was selected); only for runs that scored
    their pseudo-labels. ``presence[i]``: the classes image ``i`` contains (ground truth, or the
    first run's last pseudo-labels when there is none).
    """

    accuracy: dict[tuple[Path, int], dict[str, float | None]]
    presence: list[set[int]]


def target_dataset(run: Run):
    """The run's target training split (with labels when they exist), or a note why not."""
    from cbst.datasets import build_dataset

    cfg = run.config
    options = dict(
        split=cfg.get("split_tgt", "train"),
        num_classes=int(cfg.get("num_classes", 19)),
        list_file=cfg.get("list_tgt"),
        verify="headers",
    )
    problem: Exception | None = None
    for with_labels in (True, False):
        try:
            return build_dataset(
                cfg.get("dataset_tgt", "cityscapes"), cfg["data_root_tgt"], with_labels=with_labels, **options
            ), None
        except (DataError, ValueError, KeyError) as exc:
            problem = exc
    return None, f"target images not readable from here ({problem})"


def _pseudo_train_ids(rnd: Round, name: str, protocol) -> np.ndarray:
    """A round's pseudo-label of one image as trainIds (255 = not selected)."""
    return protocol.encode(read_label(rnd.path / "pseudo_labelIds" / f"{name}.png"))


def scan_targets(dataset, runs: Sequence[Run]) -> TargetScan:
    """One pass over the images: pseudo-label accuracy counts and the classes of each image."""
    protocol, c = dataset.protocol, dataset.protocol.num_classes
    scored = [r for r in runs if r.config.get("score_pseudo_labels")]
    selected = {(r.path, rnd.index): np.zeros(c, np.int64) for r in scored for rnd in r.rounds}
    correct = {key: np.zeros(c, np.int64) for key in selected}
    presence = []
    for i, sample in enumerate(dataset.samples):
        gt = dataset.label(i)
        if gt is None:
            pseudo = _pseudo_train_ids(runs[0].rounds[-1], sample.name, protocol)
            presence.append(set(np.unique(pseudo[pseudo < c]).tolist()))
            continue
        presence.append(set(np.unique(gt[gt < c]).tolist()))
        for run in scored:
            for rnd in run.rounds:
                pseudo = _pseudo_train_ids(rnd, sample.name, protocol)
                mask = (pseudo < c) & (gt < c)
                selected[(run.path, rnd.index)] += np.bincount(pseudo[mask], minlength=c)
                correct[(run.path, rnd.index)] += np.bincount(pseudo[mask & (pseudo == gt)], minlength=c)
    labelled = bool(dataset.samples) and dataset.samples[0].label is not None
    accuracy = (
        {
            key: {
                name: (float(correct[key][k] / n) if n else None)
                for k, (name, n) in enumerate(zip(protocol.class_names, counts))
            }
            for key, counts in selected.items()
        }
        if labelled
        else {}
    )
    return TargetScan(accuracy, presence)


def pick_images(presence: Sequence[set[int]], count: int) -> list[int]:
    """``count`` image indices, rare classes first, the same every time.

    The rare classes are the rarer half of the classes that occur (by the number of images
    containing them). Images are taken greedily: each next one adds the most rare classes not
    shown yet, then has the most rare classes; ties go to the earlier image (names are sorted).
    """
    images_with = {k: sum(k in p for p in presence) for k in set().union(*presence)} if presence else {}
    by_rarity = sorted(images_with, key=lambda k: (images_with[k], k))
    rare = set(by_rarity[: (len(by_rarity) + 1) // 2])
    picked: list[int] = []
    shown: set[int] = set()
    while len(picked) < min(count, len(presence)):
        best = max(
            (i for i in range(len(presence)) if i not in picked),
            key=lambda i: (len((presence[i] & rare) - shown), len(presence[i] & rare), -i),
        )
        picked.append(best)
        shown |= presence[best] & rare
    return picked


def thumbnail(array: np.ndarray, labels: bool = False) -> str:
    """An RGB array as a PNG data URI, at most THUMB_WIDTH wide (label maps keep hard edges)."""
    image = Image.fromarray(np.ascontiguousarray(array))
    if image.width > THUMB_WIDTH:
        height = round(image.height * THUMB_WIDTH / image.width)
        image = image.resize((THUMB_WIDTH, height), Image.NEAREST if labels else Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return png_data_uri(buffer.getvalue())


@dataclass
class GalleryRow:
    """One gallery image: name, the image, per run (pseudo-label or None in the val gallery,
    prediction), ground truth."""

    name: str
    image: str
    runs: list[tuple[str | None, str | None]]
    truth: str | None


def val_dataset(run: AnyRun):
    """The labelled split the run evaluates on, or (None, why not)."""
    from cbst.datasets import build_dataset

    cfg = run.config
    if not cfg.get("eval_split"):
        return None, "the runs were made with --eval-split none"
    try:
        return build_dataset(
            cfg.get("dataset_tgt", "cityscapes"),
            cfg["data_root_tgt"],
            split=cfg["eval_split"],
            num_classes=int(cfg.get("num_classes", 19)),
            verify="headers",
        ), None
    except (DataError, ValueError, KeyError) as exc:
        return None, f"validation images not readable from here ({exc})"


def label_presence(dataset) -> list[set[int]]:
    """The classes each image's ground truth contains (to pick the gallery's images)."""
    c = dataset.protocol.num_classes
    presence = []
    for i in range(len(dataset)):
        gt = dataset.label(i)
        presence.append(set() if gt is None else set(np.unique(gt[gt < c]).tolist()))
    return presence


def prediction_model(run: AnyRun) -> tuple[Path | None, str]:
    """The checkpoint whose predictions the gallery shows, and its name: the last trained
    round's model (an online run's final student), or the source model (the run's initial
    weights) before any round trained (before the online run ended)."""
    if isinstance(run, OnlineRun):
        if (run.path / "model.pt").is_file():
            return run.path / "model.pt", "final student"
    else:
        trained = [r for r in run.rounds if (r.path / "model.pt").is_file()]
        if trained:
            return trained[-1].path / "model.pt", f"round_{trained[-1].index} model"
    weights = Path(str(run.config.get("weights")))
    return (weights, "source model") if weights.is_file() else (None, "no model")


def gallery(
    dataset, runs: Sequence[Run], indices: Sequence[int], device: str, *, pseudo: bool = True
) -> list[GalleryRow]:
    """The gallery rows of ``indices``: with ``pseudo``, the pseudo-labels of each run's last
    round, and the prediction of each run's last trained model (with the run's evaluation
    options), then the ground truth."""
    import torch

    from cbst.checkpoints import load_checkpoint
    from cbst.device import select_device
    from cbst.inference import predict_labels

    protocol = dataset.protocol
    torch_device = select_device(device)
    models = {
        r.path: load_checkpoint(m, device=torch_device)[0] if (m := prediction_model(r)[0]) else None
        for r in runs
    }
    rows = []
    for i in indices:
        sample = dataset.samples[i]
        image = read_image(sample.image)
        tensor = torch.as_tensor(image).permute(2, 0, 1)[None].to(torch_device)
        cells = []
        for run in runs:
            label = None
            if pseudo:
                label = thumbnail(
                    protocol.colorize(_pseudo_train_ids(run.rounds[-1], sample.name, protocol)), True
                )
            model = models[run.path]
            prediction = None
            if model is not None:
                pred = predict_labels(
                    model,
                    tensor,
                    long_side=run.config.get("eval_long_side"),
                    flip=bool(run.config.get("eval_flipping")),
                )
                prediction = thumbnail(protocol.colorize(pred[0].cpu().numpy()), labels=True)
            cells.append((label, prediction))
        gt = dataset.label(i)
        rows.append(
            GalleryRow(
                sample.name,
                thumbnail(image),
                cells,
                thumbnail(protocol.colorize(gt), labels=True) if gt is not None else None,
            )
        )
    return rows
