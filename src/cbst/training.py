"""Supervised training: optimiser, learning-rate policies, loss, the epoch loop and source training.

``train_epochs`` is the loop shared by source training and each self-training round (docs/method.md §7,
§2). Every random choice of an epoch is a function of (seed, epoch): the loader's shuffle, the
transform's crops (``TrainTransform.set_epoch``) and the dropout masks. Resuming from the
checkpoint written after epoch e therefore continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cbst import checks
from cbst.checks import ConfigError
from cbst.device import (autocast, configure_backends, maybe_compile, seed_everything,
                         select_device)
from cbst.inference import normalize
from cbst.io import atomic_path, check_output_dir, make_dirs, write_text
from cbst.labels import IGNORE_INDEX

LR_POLICIES: tuple[str, ...] = ("fixed", "poly", "linear", "step")


def build_optimizer(model: nn.Module, base_lr: float, *, momentum: float = 0.9,
                    weight_decay: float = 5e-4) -> torch.optim.SGD:
    """SGD with one group per ``model.lr_groups()`` entry, scaled by its lr/wd multipliers."""
    groups = []
    for group in model.lr_groups():
        params = [p for p in group["params"] if p.requires_grad]
        if not params:
            continue
        lr_mult, wd_mult = float(group.get("lr_mult", 1.0)), float(group.get("wd_mult", 1.0))
        groups.append({"params": params, "lr": base_lr * lr_mult,
                       "weight_decay": weight_decay * wd_mult,
                       "lr_mult": lr_mult, "wd_mult": wd_mult})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay)


def lr_at(policy: str, base_lr: float, it: int, total: int, *, steps: Sequence[int] = (),
          power: float = 0.9) -> float:
    """The learning rate of iteration ``it`` of ``total`` under one of the original's policies."""
    progress = min(max(it, 0) / max(total, 1), 1.0)
    if policy == "fixed":
        return base_lr
    if policy == "poly":
        return max(base_lr * (1.0 - progress) ** power, min(base_lr / 100, 1e-8))
    if policy == "linear":
        return max(base_lr * (1.0 - progress), min(base_lr / 100, 1e-6))
    if policy == "step":
        return base_lr * 0.1 ** sum(1 for s in steps if it >= s)
    raise ValueError(f"unknown lr policy {policy!r}; expected one of {', '.join(LR_POLICIES)}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times the group's stored multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over valid pixels of logits up-sampled to the label size; 0 if none."""
    logits = logits.float()  # up-sample and reduce in float32 even when the net ran in bf16
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    valid = (labels != ignore_index).sum().clamp(min=1)
    return total / valid


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
    """Seed numpy and Python in a loader worker from torch's per-worker seed (base seed + id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for the global torch RNG (dropout) of one epoch."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> 1)


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
    base seed from the generator before the permutation); the remainder is dropped.
    """

    def __init__(self, size: int, batch_size: int, epochs: range, seed: int) -> None:
        self.size, self.batch_size, self.epochs, self.seed = size, batch_size, epochs, seed

    def __len__(self) -> int:
        return len(self.epochs) * (self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in self.epochs:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.size, generator=generator).tolist()
            for start in range(0, self.size - self.batch_size + 1, self.batch_size):
                yield [(epoch, i) for i in order[start:start + self.batch_size]]


def train_loader(dataset: Dataset, *, batch_size: int, epochs: range, seed: int,
                 num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """One loader over ``epochs``; each epoch's order and crops depend only on (seed, epoch).

    Workers prefetch (``prefetch_factor`` batches each) across epoch boundaries; ``pin_memory``
    puts batches in page-locked memory so the copy to a CUDA device can overlap compute.
    """
    batches = EpochBatches(len(dataset), batch_size, epochs, seed)  # type: ignore[arg-type]
    return DataLoader(EpochIndexed(dataset), batch_sampler=batches, num_workers=num_workers,
                      pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed),
                      prefetch_factor=4 if num_workers > 0 else None,
                      worker_init_fn=_seed_worker if num_workers > 0 else None)


def _grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler | None:
    """A loss scaler only where autocast falls back to fp16 (bf16 needs none)."""
    if amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


def train_epochs(model: nn.Module, dataset: Dataset, *, epochs: int, start_epoch: int = 0,
                 batch_size: int, base_lr: float, lr_policy: str = "fixed",
                 device: torch.device | str, optimizer: torch.optim.Optimizer | None = None,
                 lr_steps: Sequence[int] = (), num_workers: int = 0, seed: int = 0,
                 amp: bool = True, channels_last: bool = True, log_every: int = 10,
                 on_epoch_end: Callable[[int, dict], None] | None = None,
                 writer: Any = None, progress: bool = True) -> dict:
    """Train epochs ``start_epoch .. epochs-1``; the lr schedule spans all ``epochs`` epochs.

    ``on_epoch_end(epoch, stats)`` receives the 0-based index of the finished epoch; callers
    checkpoint there. Returns the last epoch's mean loss and the global iteration count.
    """
    device = torch.device(device)
    iters = len(dataset) // batch_size
    if iters == 0:
        raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one batch "
                         f"of {batch_size}")
    lr_at(lr_policy, base_lr, 0, 1)  # reject an unknown policy before any work
    model.to(device)
    if channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if optimizer is None:
        optimizer = build_optimizer(model, base_lr)
    scaler = _grad_scaler(device, amp)
    total = epochs * iters
    stats: dict[str, Any] = {"loss": float("nan"), "iterations": start_epoch * iters}
    batches = iter(train_loader(dataset, batch_size=batch_size, epochs=range(start_epoch, epochs),
                                seed=seed, num_workers=num_workers,
                                pin_memory=device.type == "cuda"))
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(_epoch_seed(seed, epoch))
        loader = itertools.islice(batches, iters)
        stats = _run_epoch(model, loader, optimizer, scaler, epoch=epoch, first_it=epoch * iters,
                           steps=iters, total=total, base_lr=base_lr, lr_policy=lr_policy,
                           lr_steps=lr_steps, device=device, amp=amp, channels_last=channels_last,
                           log_every=log_every, writer=writer, progress=progress)
        _check_finite_weights(model, epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
    return stats


def _run_epoch(model: nn.Module, loader: Iterable[dict], optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, *, epoch: int, first_it: int, steps: int,
               total: int, base_lr: float, lr_policy: str, lr_steps: Sequence[int],
               device: torch.device, amp: bool, channels_last: bool, log_every: int, writer: Any,
               progress: bool = True) -> dict:
    """``steps`` batches of ``loader``; the running loss stays on the device between log points.

    Batches hold uint8 images and labels; images are normalised here, on the device.
    """
    model.train()
    memory_format = (torch.channels_last if channels_last and device.type == "cuda"
                     else torch.contiguous_format)
    loss_sum = torch.zeros((), device=device)
    start, it, lr = time.perf_counter(), first_it, base_lr
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True,
               disable=not progress)
    for step, batch in enumerate(bar, 1):
        it = first_it + step - 1
        lr = lr_at(lr_policy, base_lr, it, total, steps=lr_steps)
        set_lr(optimizer, lr)
        images = normalize(batch["image"].to(device, non_blocking=True))
        images = images.contiguous(memory_format=memory_format)
        labels = batch["label"].to(device, non_blocking=True).long()
        with autocast(device, enabled=amp):
            logits = model(images)
        loss = segmentation_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        loss_sum += loss.detach()
        if step % log_every == 0 or step == steps:
            mean = _checked_mean(loss_sum, step, epoch, it)
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
            if writer is not None:
                writer.add_scalar("train/loss", mean, it + 1)
                writer.add_scalar("train/lr", lr, it + 1)
    bar.close()
    return {"epoch": epoch, "loss": _checked_mean(loss_sum, steps, epoch, it),
            "iterations": it + 1, "lr": lr, "seconds": round(time.perf_counter() - start, 3)}


def _checked_mean(loss_sum: torch.Tensor, steps: int, epoch: int, it: int) -> float:
    """The running mean loss; a non-finite value stops training with the iteration named."""
    mean = loss_sum.item() / steps
    if not math.isfinite(mean):
        raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}, "
                                 f"iteration {it + 1}; lower the learning rate or disable AMP")
    return mean


def _check_finite_weights(model: nn.Module, epoch: int) -> None:
    """Stop before a checkpoint is written if the last step left NaN or infinite weights."""
    finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    if not bool(finite):  # one device sync per epoch
        raise FloatingPointError(f"non-finite weights after epoch {epoch + 1}; lower the learning "
                                 "rate or disable AMP")


@dataclass
class SourceTrainConfig:
    """Everything ``train_source`` needs; defaults are the original's GTA5 settings (docs/method.md §2.1)."""

    dataset: str
    data_root: str
    output: str
    split: str = "train"
    list_file: str | None = None
    num_classes: int = 19
    model: str = "resnet38"
    weights: str | None = None
    batch_images: int = 16
    crop_size: int = 504
    scale_range: tuple[float, float] = (0.7, 1.3)
    origin_size: int | None = None
    lr_type: str = "fixed"
    base_lr: float = 0.0016
    lr_steps: tuple[int, ...] = ()
    to_epoch: int = 30
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    device: str = "auto"
    num_workers: int = 4
    amp: bool = True
    compile: bool = False
    resume: bool = False
    eval_dataset: str | None = None
    eval_root: str | None = None
    eval_split: str = "val"
    eval_long_side: int | None = None
    tensorboard: bool = False

    def validate(self) -> None:
        """Reject invalid options before anything is read or written; errors name the flag."""
        checks.require_positive(self, "batch_images", "crop_size", "to_epoch", "base_lr")
        checks.require_positive(self, "origin_size", "eval_long_side", optional=True)
        checks.require_non_negative(self, "weight_decay", "momentum", "num_workers")
        checks.require_scale_range(self, "scale_range")
        if self.lr_type not in LR_POLICIES:
            raise ConfigError(f"--lr-type must be one of {', '.join(LR_POLICIES)}, got {self.lr_type!r}")
        if any(step < 0 for step in self.lr_steps):
            raise ConfigError(f"--lr-steps must be iteration numbers >= 0, got {list(self.lr_steps)}")
        if self.eval_dataset and not self.eval_root:
            raise ConfigError("--eval-dataset needs --eval-root")

    def saved_form(self) -> dict:
        """Plain-type dict with the paths absolute: what ``OUT/config.yaml`` holds."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return checks.resolved_paths(data, _SOURCE_INPUTS + ("output",))


_SOURCE_INPUTS = ("data_root", "list_file", "weights", "eval_root")
# Options that change no finished epoch, so a resumed run may change them; --to-epoch too when
# the lr policy does not span the whole run.
_SOURCE_RESUME_FREE = ("output", "resume", "device", "num_workers", "tensorboard", "compile")


def checkpoint_path(output: Path, epoch: int) -> Path:
    """``OUT/checkpoints/epoch_NNNN.pt`` for the checkpoint written after ``epoch`` epochs."""
    return output / "checkpoints" / f"epoch_{epoch:04d}.pt"


def last_finished_epoch(output: Path) -> int:
    """The highest epoch with a checkpoint in ``OUT/checkpoints`` (0 when there is none)."""
    epochs = [int(p.stem.split("_")[1]) for p in (output / "checkpoints").glob("epoch_*.pt")
              if p.stem.split("_")[1].isdigit()]
    return max(epochs, default=0)


def _init_model(config: SourceTrainConfig) -> nn.Module:
    """The initial model: from a cbst checkpoint (*.pt) or built with pretrained weights."""
    from cbst.checkpoints import load_checkpoint
    from cbst.models import build_model

    if config.weights and config.weights.endswith(".pt"):
        model, meta = load_checkpoint(config.weights)
        if meta.get("arch") != config.model or meta.get("num_classes") != config.num_classes:
            raise ValueError(f"{config.weights}: checkpoint is {meta.get('arch')} with "
                             f"{meta.get('num_classes')} classes, but --model {config.model} "
                             f"--num-classes {config.num_classes} was asked for")
        return model
    return build_model(config.model, config.num_classes, pretrained=config.weights)


def _append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (the log survives a crash mid-run)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def _write_config(output: Path, config: SourceTrainConfig) -> None:
    """Create OUT and write the effective configuration as ``OUT/config.yaml``: the run starts."""
    import yaml

    make_dirs(output)
    write_text(output / "config.yaml", yaml.safe_dump(config.saved_form(), sort_keys=False))


def _check_resume(output: Path, config: SourceTrainConfig, finished: int) -> None:
    """Refuse to resume with an option the finished epochs were trained with, changed.

    Paths are compared resolved and the output folder not at all (a run may be moved).
    """
    path = output / "config.yaml"
    if config.to_epoch < finished:
        raise ConfigError(f"--to-epoch {config.to_epoch} is below the {finished} epochs that "
                          f"{output} already holds")
    if not path.is_file():
        return
    saved = checks.resolved_paths(checks.read_saved_config(path), _SOURCE_INPUTS)
    current = config.saved_form()
    free = _SOURCE_RESUME_FREE + (("to_epoch",) if config.lr_type in ("fixed", "step") else ())
    diff = checks.changed(saved, current, [k for k in current if k not in free])
    if diff:
        raise checks.resume_refusal(path, saved, current, diff, f"the {finished} finished epochs")


def _evaluator(config: SourceTrainConfig, protocol: Any,
               device: torch.device) -> Callable[[nn.Module], dict] | None:
    """A function returning target-val metrics for a model, or None when no eval set is given."""
    if not config.eval_dataset:
        return None
    from cbst.datasets import build_dataset
    from cbst.evaluation import evaluate_model

    val = build_dataset(config.eval_dataset, config.eval_root, split=config.eval_split,
                        num_classes=config.num_classes)
    if val.protocol.name != protocol.name:
        raise ValueError(f"evaluation set protocol {val.protocol.name!r} differs from the "
                         f"training protocol {protocol.name!r}")

    def evaluate(model: nn.Module) -> dict:
        metrics = evaluate_model(model, val, device=device, long_side=config.eval_long_side,
                                 progress=False)
        return {"val_miou": float(metrics.miou)}

    return evaluate


def train_source(config: SourceTrainConfig) -> Path:
    """Train on labelled source images, checkpointing every epoch; returns ``OUT/last.pt``."""
    from cbst.checkpoints import load_checkpoint, save_checkpoint
    from cbst.datasets import build_dataset
    from cbst.transforms import TrainTransform

    config.validate()
    output = Path(config.output)
    check_output_dir(output)
    device = select_device(config.device)
    configure_backends(device)
    data = build_dataset(config.dataset, config.data_root, split=config.split,
                         num_classes=config.num_classes, list_file=config.list_file)
    checks.require_batch_fits(config.batch_images, len(data), config.data_root)
    transform = TrainTransform(config.crop_size, scale_range=config.scale_range,
                               reference_long_side=config.origin_size, seed=config.seed)
    data = data.with_transform(transform)
    protocol = data.protocol

    start_epoch = last_finished_epoch(output)
    if start_epoch and not config.resume:
        raise ValueError(f"{output}: already holds checkpoints; pass --resume to continue "
                         f"or choose another --output")
    if start_epoch:
        _check_resume(output, config, start_epoch)
        model, meta = load_checkpoint(checkpoint_path(output, start_epoch),
                                      expect_protocol=protocol.name)
        model.to(device)  # before the optimizer, so its restored state lands on the device
        optimizer = build_optimizer(model, config.base_lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        optimizer.load_state_dict(meta["extra"]["optimizer"])
    else:
        seed_everything(config.seed)  # the random initialisation of new layers, too
        model = _init_model(config).to(device)
        optimizer = build_optimizer(model, config.base_lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    evaluate = _evaluator(config, protocol, device)
    _write_config(output, config)
    net = maybe_compile(model, config.compile)  # runs the steps; checkpoints come from model
    writer = _tensorboard(output) if config.tensorboard else None

    def on_epoch_end(epoch: int, stats: dict) -> None:
        done = epoch + 1
        record = {**stats, "epoch": done}
        if evaluate is not None:
            record.update(evaluate(net))
        extra = {"optimizer": optimizer.state_dict(), "config": asdict(config), "stats": record}
        save_checkpoint(checkpoint_path(output, done), model, arch=config.model,
                        num_classes=config.num_classes, protocol=protocol.name, epoch=done, extra=extra)
        with atomic_path(output / "last.pt") as tmp:
            shutil.copyfile(checkpoint_path(output, done), tmp)
        _append_jsonl(output / "log.jsonl", record)
        if writer is not None and "val_miou" in record:
            writer.add_scalar("val/miou", record["val_miou"], done)
        print(json.dumps(record), flush=True)

    try:
        train_epochs(net, data, epochs=config.to_epoch, start_epoch=start_epoch,
                     batch_size=config.batch_images, base_lr=config.base_lr,
                     lr_policy=config.lr_type, lr_steps=config.lr_steps, device=device,
                     optimizer=optimizer, num_workers=config.num_workers, seed=config.seed,
                     amp=config.amp, on_epoch_end=on_epoch_end, writer=writer)
    finally:
        if writer is not None:
            writer.close()
    return output / "last.pt"


def _tensorboard(output: Path) -> Any:
    """A TensorBoard writer under ``OUT/tensorboard`` (tensorboard is an optional dependency)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the 'tensorboard' package "
                         "(pip install 'cbst[tensorboard]')") from None
    return SummaryWriter(str(output / "tensorboard"))
