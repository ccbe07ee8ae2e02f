"""The pseudo-label pass of a self-training round (its cache: :mod:`cbst.probability_cache`).

One network pass per image per round: each batch of target images is forwarded once (every
scale and mirror of the test-time plan), its softmax maps are kept at the network's output
resolution (1/stride² of the pixels: 1/64 at stride 8) in a :class:`ProbabilityCache`, and
their up-sampled probabilities (times the spatial prior for CBST-SP) feed the :class:`ThresholdEstimator`. Once
the round's thresholds are known, the pseudo-labels are assigned from the cache, up-sampled on
the device, without decoding or forwarding any image again, and written as labelId PNGs
(0 = not selected) plus colour PNGs by background threads, with ``stats.json``.

Exact mode (``exact=True``) caches float32 maps, so the probabilities assigned from the cache
are bit for bit those :func:`cbst.inference.predict_probs` computes, and the PNGs equal those
of two full passes. The default caches float16 maps, each scale's mirrored pass averaged in at
the output stride (about 1.2 MB per 2048×1024 image and scale), and computes thresholds and
labels from the same rounded maps.
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from cbst import distributed, io
from cbst.crst import soft_pseudo_labels
from cbst.evaluation import write_prediction
from cbst.inference import (
    InferencePlan,
    image_batches,
    image_size,
    loaded_items,
    network_outputs,
)
from cbst.labels import IGNORE_INDEX
from cbst.priors import apply_prior
from cbst.probability_cache import CACHE_FOLDER, ProbabilityCache, ShardedCache
from cbst.thresholds import SelectionPolicy, ThresholdEstimator, rare_classes

__all__ = [
    "CACHE_FOLDER",
    "ProbabilityCache",
    "cache_folder",
    "open_kept_cache",
    "pseudo_label_pass",
    "remove_kept_caches",
]
_RANK_PREFIX = f"{CACHE_FOLDER}_rank"
"""A process's cache folder under torchrun is this prefix and its rank."""


class _GroundTruth(torch.utils.data.Dataset):
    """The trainId labels of a dataset (None where unlabelled), decoded without the images."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> np.ndarray | None:
        return self.dataset.label(i)


def _ground_truth(dataset: Any, num_workers: int) -> Iterator[np.ndarray | None]:
    """Each image's ground truth in dataset order, decoded by loader workers (None if absent)."""
    if all(sample.label is None for sample in dataset.samples):
        return itertools.repeat(None)
    return loaded_items(_GroundTruth(dataset), num_workers)


def _with_prior(probs: Tensor, prior: Tensor | None) -> Tensor:
    return apply_prior(probs, prior) if prior is not None else probs


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def _fill_cache(
    model: torch.nn.Module,
    dataset: Any,
    cache: ProbabilityCache,
    estimator: ThresholdEstimator,
    prior: Tensor | None,
    *,
    batch_size: int,
    num_workers: int,
    amp: bool,
    progress: bool,
) -> list[list[int]]:
    """The round's only network pass: cache every image's maps and feed the estimator.

    Returns the image indices of each batch, so that labels are assigned batch by batch as the
    probabilities were computed (the same shapes give the same floating-point results).
    """
    batches: list[list[int]] = []
    with _bar(len(dataset), "pseudo-label pass", progress) as bar:
        for images, items in image_batches(
            dataset.without_labels(),
            batch_size,
            num_workers=num_workers,
            pin_memory=cache.device.type == "cuda",
        ):
            indices = [item["index"] for item in items]
            outputs = network_outputs(model, images, cache.plan, amp=amp)
            estimator.update(_with_prior(cache.store(indices, outputs, image_size(images)), prior))
            batches.append(indices)
            bar.update(len(items))
    return batches


def _write_labels(
    cache: ProbabilityCache,
    batches: list[list[int]],
    dataset: Any,
    thresholds: Tensor,
    prior: Tensor | None,
    out_dir: Path,
    *,
    policy: SelectionPolicy,
    num_workers: int,
    progress: bool,
    alpha: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Assign and write the pseudo-labels from the cache; (selected pixels per class,
    correct pixels, judged pixels, candidate pixels per class), correct and judged against the
    ground truth where there is one. With ``alpha`` (LRENT) a pixel is selected by CRST's keep
    rule (:func:`cbst.crst.soft_pseudo_labels`), and candidates counts every pixel by its class
    argmax p/λ; otherwise candidates stays 0."""
    protocol = dataset.protocol
    c = protocol.num_classes
    selected = torch.zeros(c, dtype=torch.int64, device=cache.device)
    candidates = torch.zeros(c, dtype=torch.int64, device=cache.device)
    correct = torch.zeros((), dtype=torch.int64, device=cache.device)
    judged = torch.zeros((), dtype=torch.int64, device=cache.device)
    truth = _ground_truth(dataset, num_workers)
    with io.BackgroundWriter() as writer, _bar(len(dataset), "pseudo-labels", progress) as bar:
        for indices in batches:
            probs = _with_prior(cache.get_batch(indices), prior)
            if alpha is None:
                labels = policy.assign(probs, thresholds)
            else:
                soft, keep = soft_pseudo_labels(probs, thresholds, alpha)
                labels = soft.argmax(dim=1)
                candidates += torch.bincount(labels.flatten(), minlength=c)
                labels[~keep] = IGNORE_INDEX
            valid = labels < c
            selected += torch.bincount(labels[valid], minlength=c)
            for n, (index, label) in enumerate(zip(indices, labels.to(torch.uint8).cpu().numpy())):
                name = dataset.samples[index].name
                writer.submit(
                    out_dir / "pseudo_labelIds" / f"{name}.png",
                    write_prediction,
                    out_dir,
                    name,
                    label,
                    protocol,
                    prefix="pseudo_",
                )
                gt = next(truth)
                if gt is not None:
                    gt = torch.from_numpy(gt).to(cache.device, torch.int64)
                    mask = valid[n] & (gt < c)
                    correct += (labels[n][mask] == gt[mask]).sum()
                    judged += mask.sum()
            bar.update(len(indices))
    return selected, correct, judged, candidates


def pseudo_label_pass(
    model: torch.nn.Module,
    dataset: Any,
    out_dir: str | Path,
    *,
    portion: float,
    policy: str | SelectionPolicy = "cb",
    prior: Tensor | None = None,
    long_side: int | None = None,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = True,
    exact: bool = False,
    bins: int = 65536,
    batch_size: int = 1,
    mine_id_number: int = 3,
    mine_thresh: float = 1e-3,
    num_workers: int = 0,
    amp: bool = True,
    progress: bool = True,
    keep_cache: bool = False,
    cache_backend: str = "auto",
    lrent_alpha: float | None = None,
) -> dict:
    """Threshold statistics and pseudo-labels of one round from one network pass.

    Writes ``out_dir/pseudo_labelIds/NAME.png``, ``out_dir/pseudo_color/NAME.png`` and
    ``out_dir/stats.json``; returns the stats. Under torchrun each process labels its share of
    the images (:func:`cbst.distributed.shard`) and writes their PNGs; the threshold statistics
    are combined before any label is assigned, so the thresholds, the labels and ``stats.json``
    (written once, when every process has finished) are those of a one-process pass.

    Args:
        model: the round's model, on the device the pass runs on.
        dataset: the target images (a ``SegmentationDataset``); its labels, when it has them,
            only score the pseudo-labels (``pseudo_label_accuracy``).
        out_dir: the round folder.
        portion: share of the pixels per class (``cb``) or overall (``global``) to select.
        policy: the selection policy, or its name in :data:`cbst.registry.SELECTION_POLICIES`
            (``cb``: CBST, class-wise thresholds; ``global``: ST).
        prior: spatial prior C×H×W at the images' resolution (CBST-SP), or None.
        long_side, scales, flip: the test-time plan (see :func:`cbst.inference.predict_probs`).
        exact: exact thresholds by selection, and a float32 cache whose labels equal those of
            two full passes bit for bit; otherwise histogram thresholds and a float16 cache
            with mirrored passes merged (``ProbabilityCache``'s ``merge_flip``).
        bins: histogram bins of the approximate thresholds.
        batch_size: images per forward pass (consecutive images of equal size).
        mine_id_number, mine_thresh: the rare-class statistics for patch mining.
        num_workers: image-decoding loader processes (0: in this process).
        amp: mixed precision where it pays (`cbst.device.mixed_precision`).
        progress: show progress bars.
        keep_cache: keep the probability cache in ``out_dir/probability_cache`` after the
            round (see :func:`open_kept_cache`); it is deleted otherwise. Under torchrun
            each process keeps its own, ``probability_cache_rankR``, indexed by position in
            its share of the images, complete on disk when the pass returns in any process.
        cache_backend: ``auto`` (device, then host memory, then a file, by available size),
            or ``device``, ``host`` or ``disk`` for everything.
        lrent_alpha: CRST-LRENT's α: select pixels by its entropy rule instead of
            max p/λ ≥ 1; the stats then hold each class's ``kept_fraction``.
    """
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    protocol = dataset.protocol
    started = time.time()
    shard = distributed.shard_dataset(dataset)
    progress = progress and distributed.is_main()
    plan = InferencePlan.for_model(model, long_side, scales, flip)
    estimator = ThresholdEstimator(protocol.num_classes, policy, exact=exact, bins=bins, device=device)
    with ProbabilityCache(
        out_dir / cache_folder(),
        plan,
        device=device,
        backend=cache_backend,
        dtype=torch.float32 if exact else torch.float16,
        keep=keep_cache,
        merge_flip=not exact,
    ) as cache:
        batches = _fill_cache(
            model,
            shard,
            cache,
            estimator,
            prior,
            batch_size=batch_size,
            num_workers=num_workers,
            amp=amp,
            progress=progress,
        )
        estimator.all_reduce()  # every process assigns labels with the same thresholds
        thresholds = estimator.thresholds(portion)
        counts = _write_labels(
            cache,
            batches,
            shard,
            thresholds,
            prior,
            out_dir,
            policy=estimator.selection,
            num_workers=num_workers,
            progress=progress,
            alpha=lrent_alpha,
        )
    selected, correct, judged, candidates = (distributed.all_reduce_sum(count) for count in counts)
    predicted = estimator.class_pixel_counts
    mine_id, priority = rare_classes(predicted, number=mine_id_number, thresh=mine_thresh)
    stats = {
        "portion": portion,
        "policy": estimator.policy,
        "with_prior": prior is not None,
        "thresholds": dict(zip(protocol.class_names, thresholds.tolist())),
        "predicted_pixels": dict(zip(protocol.class_names, predicted.tolist())),
        "selected_pixels": dict(zip(protocol.class_names, selected.tolist())),
        "mine_id": [int(i) for i in mine_id],
        "mine_id_priority": [int(i) for i in priority],
        "selected_fraction": float(selected.sum()) / max(1, int(predicted.sum())),
        "pseudo_label_accuracy": float(correct) / int(judged) if int(judged) else None,
        "seconds": round(time.time() - started, 2),
    }
    if lrent_alpha is not None:
        stats["lrent_alpha"] = lrent_alpha
        stats["kept_fraction"] = {
            name: int(kept) / int(total) if int(total) else None
            for name, kept, total in zip(protocol.class_names, selected.tolist(), candidates.tolist())
        }
    # its barrier also means every process's kept cache is complete on disk (open_kept_cache)
    distributed.write_once(io.write_json, out_dir / "stats.json", stats)
    return stats


def cache_folder() -> str:
    """This process's cache folder in the round folder: :data:`CACHE_FOLDER`, suffixed
    ``_rankR`` under torchrun, where every process caches its own share of the images."""
    return CACHE_FOLDER if distributed.world_size() == 1 else f"{_RANK_PREFIX}{distributed.rank()}"


def _rank_folders(out_dir: Path) -> dict[int, Path]:
    """The per-process cache folders in round folder ``out_dir`` by rank (none after one process)."""
    found = {path.name.removeprefix(_RANK_PREFIX): path for path in out_dir.glob(f"{_RANK_PREFIX}*")}
    return {int(rank): path for rank, path in found.items() if rank.isdigit()}


def open_kept_cache(out_dir: str | Path, *, device: torch.device | str) -> ProbabilityCache | ShardedCache:
    """The probability cache a pass kept (``keep_cache``) in round folder ``out_dir``, for reading.

    One process's cache as :meth:`ProbabilityCache.open` reads it; the caches of a pass under
    torchrun, every rank's, as one :class:`ShardedCache`, whatever the number of processes now
    (a run may resume on another). Every process's cache is complete once the pass returns.
    """
    out_dir = Path(out_dir)
    ranks = _rank_folders(out_dir)
    if not ranks:
        return ProbabilityCache.open(out_dir / CACHE_FOLDER, device=device)
    return ShardedCache(
        [ProbabilityCache.open(out_dir / f"{_RANK_PREFIX}{r}", device=device) for r in range(max(ranks) + 1)]
    )


def remove_kept_caches(out_dir: str | Path) -> None:
    """Delete every probability cache in round folder ``out_dir``: one process's or every rank's.

    Under torchrun call it in one process once no process reads them (``distributed.write_once``).
    """
    out_dir = Path(out_dir)
    for folder in (out_dir / CACHE_FOLDER, *_rank_folders(out_dir).values()):
        shutil.rmtree(folder, ignore_errors=True)
