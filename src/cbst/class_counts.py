"""Per-image, per-class pixel counts of a labelled dataset, counted once per run and kept.

Rare Class Sampling (:mod:`cbst.rcs`) draws source images by them and source training's
class-balanced loss (:func:`cbst.losses.class_balance_weights`) weights classes by them. The
counts are an int64 ``images × classes`` array saved as ``.npy`` in the run's folder, so that a
resumed run reads them instead of decoding every label again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cbst import distributed, io
from cbst.labels import IGNORE_INDEX


def count_class_pixels(
    labels: Callable[[int], np.ndarray], count: int, num_classes: int, *, progress: bool = False
) -> np.ndarray:
    """int64 ``count × num_classes``: pixels of each class in each label ``labels(i)`` (255 ignored)."""
    out = np.zeros((count, num_classes), dtype=np.int64)
    for i in tqdm(range(count), desc="counting source classes", disable=not progress, leave=False):
        label = labels(i).ravel()
        out[i] = np.bincount(label[label != IGNORE_INDEX], minlength=num_classes)[:num_classes]
    return out


def load_pixel_counts(path: Path, count: int, num_classes: int) -> np.ndarray:
    """Counts saved by an earlier start of the run, checked against the dataset's size."""
    try:
        counts = np.load(path)
    except (OSError, ValueError) as exc:
        raise io.DataError(f"{path}: unreadable class counts ({exc}); delete it to count again") from None
    if counts.shape != (count, num_classes):
        raise io.DataError(
            f"{path}: holds counts of {counts.shape} (images × classes), the source has "
            f"{count} images of {num_classes} classes; delete it to count again"
        )
    return counts


def run_pixel_counts(
    path: Path, dataset: Any, num_classes: int, *, recount: bool = False, progress: bool = False
) -> np.ndarray:
    """The counts of ``dataset`` (which has ``label(i)``) kept at ``path``.

    Counted when ``path`` does not exist yet, or when ``recount`` (a run's first start, whose
    folder may hold the counts of an earlier, interrupted start on other data); else read. Under
    torchrun each process counts its share of the labels (:func:`cbst.distributed.shard`), the
    shares are summed and the main process writes the file.
    """
    count = len(dataset)
    if not recount and path.is_file():
        return load_pixel_counts(path, count, num_classes)
    mine = distributed.shard(count)
    counts = np.zeros((count, num_classes), dtype=np.int64)
    counts[mine] = count_class_pixels(
        lambda k: dataset.label(mine[k]), len(mine), num_classes, progress=progress and distributed.is_main()
    )
    counts = distributed.all_reduce_sum(torch.from_numpy(counts)).numpy()
    distributed.write_once(io.write_npy, path, counts)
    return counts
