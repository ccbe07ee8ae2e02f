"""The library's entry points that need a little glue beyond the modules they call.

``import cbst`` exposes these (and the configuration classes and drivers) lazily, through the
package's ``__getattr__``, so importing the package stays cheap: torch is imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbst.errors import DataError
from cbst.io import read_image
from cbst.models import SegmentationNet


def render_synthetic(
    out_dir: str | Path, *, num_source: int = 400, num_train: int = 200, num_val: int = 100, seed: int = 0
) -> Path:
    """Render the embedded synthetic benchmark into ``out_dir`` (once) and return its root.

    The root holds ``gta5/`` (the source domain) and ``cityscapes/`` (the target domain, splits
    train and val), as ``cbst make-synthetic`` writes them.
    """
    from cbst.synthetic import make_synthetic

    make_synthetic(
        out_dir, seed=seed, num_source=num_source, num_train=num_train, num_val=num_val, progress=False
    )
    return Path(out_dir)


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> SegmentationNet:
    """The model of a cbst checkpoint, in eval mode on ``device``.

    Its ``protocol`` attribute is the label protocol it was trained for (class names, colours)
    and ``checkpoint_meta`` the checkpoint's metadata (architecture, round, epoch, ...).
    """
    from cbst.checkpoints import load_checkpoint
    from cbst.labels import get_protocol

    model, meta = load_checkpoint(checkpoint, device=device)
    model.protocol = get_protocol(meta["protocol"])
    model.checkpoint_meta = meta
    return model.eval()


def _as_image(image: Any, index: int) -> np.ndarray:
    """An HxWx3 uint8 RGB array from an array or an image path."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise DataError(
            f"image {index}: expected an HxWx3 uint8 RGB array or a path, got {array.dtype} {array.shape}"
        )
    return array


def predict(
    model: torch.nn.Module,
    images: Sequence[Any],
    *,
    device: str | torch.device | None = None,
    flip: bool = False,
) -> list[np.ndarray]:
    """The trainId label map (HxW uint8) of each image: HxWx3 uint8 RGB arrays or image paths.

    Runs on ``device`` (default: where the model is), one image at a time so sizes may differ;
    ``flip`` averages with the mirrored image.
    """
    from cbst.inference import IMAGENET_MEAN, IMAGENET_STD, predict_labels

    if device is not None:
        model.to(device)
    where = next(model.parameters()).device
    mean = getattr(model, "input_mean", IMAGENET_MEAN)
    std = getattr(model, "input_std", IMAGENET_STD)
    labels = []
    for index, image in enumerate(images):
        batch = torch.from_numpy(_as_image(image, index)).permute(2, 0, 1)[None].to(where)
        pred = predict_labels(model, batch, flip=flip, mean=mean, std=std)
        labels.append(pred[0].to(torch.uint8).cpu().numpy())
    return labels


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str,
    root: str | Path,
    *,
    split: str = "val",
    num_classes: int = 19,
    device: str = "auto",
) -> dict:
    """Score a checkpoint on a dataset split: ``{"miou", "pixel_acc", "mean_acc", "iou", ...}``
    (fractions), with the checkpoint's path and hash, the image count and the provenance."""
    from cbst.checkpoints import CheckpointError
    from cbst.datasets import build_dataset
    from cbst.device import select_device
    from cbst.evaluation import evaluate_model
    from cbst.provenance import checkpoint_record, provenance

    torch_device = select_device(device)
    data = build_dataset(dataset, root, split=split, num_classes=num_classes)
    model = load_model(checkpoint, device=torch_device)
    if model.protocol.name != data.protocol.name:
        raise CheckpointError(
            f"{checkpoint} was trained for {model.protocol.name} but the dataset uses {data.protocol.name}"
        )
    meta = model.checkpoint_meta
    metrics = evaluate_model(
        model, data, device=torch_device, mean=meta.get("mean"), std=meta.get("std"), progress=False
    )
    return {
        **metrics.to_json(),
        "checkpoint": checkpoint_record(checkpoint),
        "dataset": dataset,
        "split": split,
        "images": len(data),
        "provenance": provenance(torch_device, True),
    }
