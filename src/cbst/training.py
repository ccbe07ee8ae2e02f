"""Supervised training: the epoch loop (optimisers and lr schedules: :mod:`cbst.optim`; losses:
:mod:`cbst.losses`).

``train_epochs`` is the loop shared by source training (``cbst.sourcetrain``) and each
self-training round (docs/method.md §7,
§2). Every random choice of an epoch is a function of (seed, epoch): the loader's shuffle, the
transform's crops (``TrainTransform.set_epoch``) and the dropout masks. Resuming from the
checkpoint written after epoch e therefore continues exactly as the uninterrupted run would.

Under torchrun (:mod:`cbst.distributed`) the model is wrapped in DistributedDataParallel and
each process trains on its slice of every global batch of ``batch_size`` images; the order and
crops stay functions of (seed, epoch), and the dropout masks of (seed, epoch, rank).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from cbst import distributed, signals
from cbst.device import autocast, mixed_precision, prefers_channels_last
from cbst.errors import ConfigError, DivergedError
from cbst.inference import normalize
from cbst.losses import CrossEntropyLoss
from cbst.models.base import geometry, unwrap
from cbst.optim import build_optimizer, lr_at, set_lr

LossFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]
"""A training loss ``(logits, labels on the device, the loader's batch) -> scalar``."""


def set_dataset_epoch(dataset: Any, epoch: int) -> None:
    """Call ``set_epoch`` on every transform reachable through Subset/ConcatDataset wrappers."""
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_epoch"):
        transform.set_epoch(epoch)
    for child in getattr(dataset, "datasets", ()):
        set_dataset_epoch(child, epoch)
    if hasattr(dataset, "dataset"):
        set_dataset_epoch(dataset.dataset, epoch)


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and Python in a loader worker from torch's per-worker seed (base seed + id);
    the worker keeps quiet if the main process stops (``signals.quiet_worker``)."""
    signals.quiet_worker(worker_id)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


BATCH_NORM_TOO_SMALL = "Expected more than 1 value per channel when training"
"""The start of torch's message when a training batch norm sees one value per channel."""


def train_forward(model: nn.Module, images: torch.Tensor, **kwargs: Any) -> Any:
    """``model(images, **kwargs)`` in a training step; a batch norm left with one value per channel (one
    crop per process whose coarsest feature map is 1x1, e.g. DINOv2's stride-56 level for crops
    up to 56 px) is a ``ConfigError`` naming the options that set the batch's shape."""
    try:
        return model(images, **kwargs)
    except ValueError as exc:
        if not str(exc).startswith(BATCH_NORM_TOO_SMALL):
            raise
        n, _, h, w = images.shape
        raise ConfigError(
            f"--crop-size/--batch-images: {n} crop(s) of {h}x{w} px per process leave a batch norm of "
            f"{type(unwrap(model)).__name__} one value per channel; give a larger "
            "--crop-size or more images per process"
        ) from None


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed for the global torch RNG (dropout) of one epoch in process ``rank``."""
    entropy = [seed, epoch] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)


class EpochIndexed(Dataset):
    """``data[(epoch, i)]`` is ``dataset[i]`` drawn from epoch ``epoch``'s random stream.

    One loader then spans every epoch of a call: loader workers, which would not see
    ``set_epoch`` calls made in the main process, learn each sample's epoch from its key, so
    they can stay alive and prefetch across epoch boundaries.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        set_dataset_epoch(self.dataset, epoch)
        return self.dataset[index]


class EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(epoch, index)`` keys for ``epochs``, each epoch in its own shuffled order.

    An epoch's order is the one ``DataLoader(shuffle=True, drop_last=True,
    generator=torch.Generator().manual_seed(seed + epoch))`` gives (the loader draws its worker
    base seed from the generator before the permutation); the remainder is dropped. With
    ``world > 1`` the batches are the global ones, and process ``rank`` takes its consecutive
    ``batch_size / world`` keys of each.
    """

    def __init__(
        self, size: int, batch_size: int, epochs: range, seed: int, *, rank: int = 0, world: int = 1
    ) -> None:
        if batch_size % world:
            raise ValueError(f"a batch of {batch_size} cannot be split evenly over {world} processes")
        self.size, self.batch_size, self.epochs, self.seed = size, batch_size, epochs, seed
        self.part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)

    def __len__(self) -> int:
        return len(self.epochs) * (self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in self.epochs:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.size, generator=generator).tolist()
            for start in range(0, self.size - self.batch_size + 1, self.batch_size):
                yield [(epoch, i) for i in order[start : start + self.batch_size][self.part]]


def stack_batch(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate training samples: tensors are stacked through numpy, the rest as ``default_collate``.

    torch's own stacking of small uint8 tensors runs on the intra-op thread pool and can take
    tens of milliseconds per batch when the cores are busy with the network (measured on 2
    cores); numpy's copy is single-threaded and takes microseconds. The result is the same.
    """
    batch: dict[str, Any] = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.from_numpy(np.stack([v.numpy() for v in values]))
        else:
            batch[key] = default_collate(values)
    return batch


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    epochs: range,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """One loader over ``epochs``; each epoch's order and crops depend only on (seed, epoch).

    Workers prefetch (``prefetch_factor`` batches each) across epoch boundaries; ``pin_memory``
    puts batches in page-locked memory so the copy to a CUDA device can overlap compute. Under
    torchrun ``batch_size`` is the global batch, and this process loads its slice of each.
    """
    batches = EpochBatches(
        len(dataset),  # type: ignore[arg-type]
        batch_size,
        epochs,
        seed,
        rank=distributed.rank(),
        world=distributed.world_size(),
    )
    return DataLoader(
        EpochIndexed(dataset),
        batch_sampler=batches,
        collate_fn=stack_batch,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )


def _grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler | None:
    """A loss scaler only where autocast falls back to fp16 (bf16 needs none)."""
    if mixed_precision(device, amp) == torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def train_epochs(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    start_epoch: int = 0,
    batch_size: int,
    base_lr: float,
    lr_policy: str = "fixed",
    device: torch.device | str,
    optimizer: torch.optim.Optimizer | None = None,
    lr_steps: Sequence[int] = (),
    num_workers: int = 0,
    seed: int = 0,
    amp: bool = True,
    channels_last: bool = True,
    log_every: int = 10,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    logger: Any = None,
    progress: bool = True,
    loss_fn: LossFn | None = None,
    sync_bn: bool = False,
    lr_power: float = 0.9,
    warmup_iters: int = 0,
    clip_grad_norm: float | None = None,
    label: str = "",
    epoch_base: int = 0,
) -> dict:
    """Train epochs ``start_epoch .. epochs-1``; the lr schedule spans all ``epochs`` epochs.

    ``on_epoch_end(epoch, stats)`` receives the 0-based index of the finished epoch; callers
    checkpoint there. ``loss_fn(logits, labels, batch)`` is the loss (:mod:`cbst.losses`;
    :class:`~cbst.losses.CrossEntropyLoss` when None; CRST's is :class:`cbst.crst.CrstLoss`).
    ``lr_power`` is the poly policy's power and ``warmup_iters`` a linear warm-up over the first
    iterations (:func:`cbst.optim.lr_at`); ``clip_grad_norm`` clips the gradients' global L2
    norm before each step (None: no clipping). Inputs are normalised with the model's
    ``input_mean``/``input_std``. ``logger.step({"loss", "lr"}, iteration)`` receives every
    logged step (a :class:`cbst.loggers.LoggerGroup`). The progress bar reads
    ``{label}train epoch E/N`` with epochs counted from ``epoch_base`` (a self-training round's
    first epoch). Returns the last epoch's mean loss and the global iteration count. Under
    torchrun ``batch_size`` is the global batch, the model is trained through
    DistributedDataParallel (with SyncBatchNorm layers when ``sync_bn``), every process holds
    the same weights and buffers at each epoch's end, and the logged loss is the mean over all.
    """
    device = torch.device(device)
    iters = len(dataset) // batch_size
    if iters == 0:
        raise ConfigError(f"the dataset has {len(dataset)} samples, fewer than one batch of {batch_size}")
    lr_at(lr_policy, base_lr, 0, 1)  # reject an unknown policy before any work
    model.to(device)
    memory_format = (
        torch.channels_last
        if channels_last and prefers_channels_last(device, amp)
        else torch.contiguous_format
    )
    if memory_format == torch.channels_last:
        model.to(memory_format=memory_format)
    if optimizer is None:
        optimizer = build_optimizer(model, base_lr)
    if loss_fn is None:
        loss_fn = CrossEntropyLoss()
    scaler = _grad_scaler(device, amp)
    net = distributed.data_parallel(model, device, sync_bn=sync_bn)
    progress = progress and distributed.is_main()
    total = epochs * iters
    stats: dict[str, Any] = {"loss": float("nan"), "iterations": start_epoch * iters}
    batches = iter(
        train_loader(
            dataset,
            batch_size=batch_size,
            epochs=range(start_epoch, epochs),
            seed=seed,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
    )
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(_epoch_seed(seed, epoch, distributed.rank()))
        loader = itertools.islice(batches, iters)
        stats = _run_epoch(
            net,
            loader,
            optimizer,
            scaler,
            epoch=epoch,
            first_it=epoch * iters,
            steps=iters,
            total=total,
            base_lr=base_lr,
            lr_policy=lr_policy,
            lr_steps=lr_steps,
            device=device,
            amp=amp,
            memory_format=memory_format,
            log_every=log_every,
            logger=logger,
            progress=progress,
            loss_fn=loss_fn,
            schedule={"power": lr_power, "warmup_iters": warmup_iters},
            clip_grad_norm=clip_grad_norm,
            desc=f"{label}train epoch {epoch - epoch_base + 1}/{epochs - epoch_base}",
        )
        distributed.broadcast_buffers(model)
        _check_finite_weights(model, epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
    return stats


def _run_epoch(
    model: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    *,
    epoch: int,
    first_it: int,
    steps: int,
    total: int,
    base_lr: float,
    lr_policy: str,
    lr_steps: Sequence[int],
    device: torch.device,
    amp: bool,
    memory_format: torch.memory_format,
    log_every: int,
    logger: Any,
    progress: bool = True,
    loss_fn: LossFn,
    schedule: dict[str, Any],
    clip_grad_norm: float | None,
    desc: str = "",
) -> dict:
    """``steps`` batches of ``loader``; the running loss stays on the device between log points.

    Batches hold uint8 images and labels; images are normalised here, on the device, with the
    model's statistics. ``schedule`` holds :func:`cbst.optim.lr_at`'s ``power`` and
    ``warmup_iters``.
    """
    model.train()
    geo = geometry(model)
    loss_sum = torch.zeros((), device=device)
    start, it, lr = time.perf_counter(), first_it, base_lr
    bar = tqdm(
        loader,
        total=steps,
        desc=desc or f"epoch {epoch + 1}",
        leave=False,
        dynamic_ncols=True,
        disable=not progress,
    )
    for step, batch in enumerate(bar, 1):
        it = first_it + step - 1
        lr = lr_at(lr_policy, base_lr, it, total, steps=lr_steps, **schedule)
        set_lr(optimizer, lr)
        images = normalize(batch["image"].to(device, non_blocking=True), geo.input_mean, geo.input_std)
        images = images.contiguous(memory_format=memory_format)
        labels = batch["label"].to(device, non_blocking=True).long()
        with autocast(device, enabled=amp):
            logits = train_forward(model, images)
        loss = loss_fn(logits, labels, batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            _clip(model, clip_grad_norm)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if clip_grad_norm is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            _clip(model, clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        loss_sum += loss.detach()
        if step % log_every == 0 or step == steps:
            mean = _checked_mean(loss_sum, step, epoch, it)
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
            if logger is not None:
                logger.step({"loss": mean, "lr": lr}, it + 1)
    bar.close()
    return {
        "epoch": epoch,
        "loss": _checked_mean(loss_sum, steps, epoch, it),
        "iterations": it + 1,
        "lr": lr,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _clip(model: nn.Module, max_norm: float | None) -> None:
    """Scale the gradients down to a global L2 norm of at most ``max_norm`` (None: leave them)."""
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _checked_mean(loss_sum: torch.Tensor, steps: int, epoch: int, it: int) -> float:
    """The running mean loss (over all processes); a non-finite value stops training with the
    iteration named."""
    mean = distributed.all_reduce_mean(loss_sum.clone()).item() / steps
    if not math.isfinite(mean):
        raise DivergedError(
            f"non-finite training loss at epoch {epoch + 1}, "
            f"iteration {it + 1}; lower the learning rate or disable AMP"
        )
    return mean


def _check_finite_weights(model: nn.Module, epoch: int) -> None:
    """Stop before a checkpoint is written if the last step left NaN or infinite weights."""
    finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    if not bool(finite):  # one device sync per epoch
        raise DivergedError(
            f"non-finite weights after epoch {epoch + 1}; lower the learning rate or disable AMP"
        )
