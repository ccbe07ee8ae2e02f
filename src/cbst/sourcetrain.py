"""Source training: the driver behind ``cbst train-source`` (the original's ``train_src.py``).

``train_source`` trains a network on labelled source images with the loop of
:mod:`cbst.training`, checkpointing after every epoch; a killed run resumes from its last
checkpoint and ends with the same weights as an uninterrupted one. It mirrors
:mod:`cbst.selftrain`, the driver of the self-training rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbst import checks, distributed, runlock
from cbst.checks import ConfigError
from cbst.device import configure_backends, maybe_compile, seed_everything, select_device
from cbst.io import atomic_path, check_output_dir, check_run_folder, write_text
from cbst.training import LR_POLICIES, build_optimizer, train_epochs


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
    crop_size: int = 500
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
    progress: bool = True
    compile: bool = False
    resume: bool = False
    eval_dataset: str | None = None
    eval_root: str | None = None
    eval_split: str = "val"
    eval_long_side: int | None = None
    tensorboard: bool = False
    sync_bn: bool = False

    def validate(self) -> None:
        """Reject invalid options before anything is read or written; errors name the flag."""
        checks.require_positive(self, "batch_images", "crop_size", "to_epoch", "base_lr")
        checks.require_positive(self, "origin_size", "eval_long_side", optional=True)
        checks.require_non_negative(self, "weight_decay", "momentum", "num_workers")
        checks.require_scale_range(self, "scale_range")
        checks.require_split_batch(self, "batch_images")
        checks.require_batch_memory(self, "batch_images", "crop_size")
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
_SOURCE_RESUME_FREE = ("output", "resume", "device", "num_workers", "progress", "tensorboard", "compile")


def checkpoint_path(output: Path, epoch: int) -> Path:
    """``OUT/checkpoints/epoch_NNNN.pt`` for the checkpoint written after ``epoch`` epochs."""
    return output / "checkpoints" / f"epoch_{epoch:04d}.pt"


def last_finished_epoch(output: Path) -> int:
    """The highest epoch with a checkpoint in ``OUT/checkpoints`` (0 when there is none)."""
    epochs = [
        int(p.stem.split("_")[1])
        for p in (output / "checkpoints").glob("epoch_*.pt")
        if p.stem.split("_")[1].isdigit()
    ]
    return max(epochs, default=0)


def _init_model(config: SourceTrainConfig) -> nn.Module:
    """The initial model: from a cbst checkpoint (*.pt) or built with pretrained weights."""
    from cbst.checkpoints import load_checkpoint
    from cbst.models import build_model

    if config.weights and config.weights.endswith(".pt"):
        model, meta = load_checkpoint(config.weights)
        if meta.get("arch") != config.model or meta.get("num_classes") != config.num_classes:
            raise ValueError(
                f"{config.weights}: checkpoint is {meta.get('arch')} with "
                f"{meta.get('num_classes')} classes, but --model {config.model} "
                f"--num-classes {config.num_classes} was asked for"
            )
        return model
    return build_model(config.model, config.num_classes, pretrained=config.weights)


def _append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk (the log survives a crash mid-run).

    A failed write (a full disk) is cut back off, so the log never ends in half a line.
    """
    with open(path, "ab", buffering=0) as fh:  # unbuffered: a failure surfaces here, not at close
        size = fh.tell()
        try:
            line = memoryview((json.dumps(record) + "\n").encode())
            while line:  # a raw write may take part of the line, and fail on the rest
                line = line[fh.write(line) :]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise OSError(exc.errno, f"cannot write ({exc.strerror or exc})", str(path)) from exc


def _write_config(output: Path, config: SourceTrainConfig) -> None:
    """Lock OUT (creating it) and write the effective configuration as ``OUT/config.yaml``: the
    run starts."""
    import yaml

    runlock.start(output, "cbst train-source")
    write_text(output / "config.yaml", yaml.safe_dump(config.saved_form(), sort_keys=False))


def _check_resume(output: Path, config: SourceTrainConfig, finished: int) -> None:
    """Refuse to resume with an option the finished epochs were trained with, changed.

    Paths are compared resolved and the output folder not at all (a run may be moved).
    """
    path = output / "config.yaml"
    if config.to_epoch < finished:
        raise ConfigError(
            f"--to-epoch {config.to_epoch} is below the {finished} epochs that {output} already holds"
        )
    if not path.is_file():
        return
    saved = checks.resolved_paths(checks.read_saved_config(path), _SOURCE_INPUTS)
    for field in fields(SourceTrainConfig):  # an option newer than the run had its default
        if field.name not in saved and field.default is not MISSING:
            saved[field.name] = field.default
    current = config.saved_form()
    free = _SOURCE_RESUME_FREE + (("to_epoch",) if config.lr_type in ("fixed", "step") else ())
    diff = checks.changed(saved, current, [k for k in current if k not in free])
    if diff:
        raise checks.resume_refusal(path, saved, current, diff, f"the {finished} finished epochs")


def _evaluator(
    config: SourceTrainConfig, protocol: Any, device: torch.device
) -> Callable[[nn.Module], dict] | None:
    """A function returning target-val metrics for a model, or None when no eval set is given."""
    if not config.eval_dataset:
        return None
    from cbst.datasets import build_dataset
    from cbst.evaluation import evaluate_model

    val = build_dataset(
        config.eval_dataset, config.eval_root, split=config.eval_split, num_classes=config.num_classes
    )
    if val.protocol.name != protocol.name:
        raise ValueError(
            f"evaluation set protocol {val.protocol.name!r} differs from the "
            f"training protocol {protocol.name!r}"
        )

    def evaluate(model: nn.Module) -> dict:
        metrics = evaluate_model(
            model,
            val,
            device=device,
            long_side=config.eval_long_side,
            num_workers=config.num_workers,
            amp=config.amp,
            progress=False,
        )
        return {"val_miou": float(metrics.miou)}

    return evaluate


@runlock.releasing
def train_source(config: SourceTrainConfig) -> Path:
    """Train on labelled source images, checkpointing every epoch; returns ``OUT/last.pt``.

    Under torchrun every process trains on its slice of each batch and scores its share of the
    evaluation images; the main process alone writes the configuration, checkpoints, log and
    TensorBoard events.
    """
    from cbst.checkpoints import load_checkpoint, save_checkpoint
    from cbst.datasets import build_dataset
    from cbst.models.base import round_to_stride
    from cbst.transforms import TrainTransform

    config.validate()
    output = Path(config.output)
    check_output_dir(output)
    check_run_folder(output, "train-source")
    runlock.check_free(output)
    device = select_device(config.device)
    distributed.check_sync_bn(config.sync_bn, device)
    configure_backends(device)
    data = build_dataset(
        config.dataset,
        config.data_root,
        split=config.split,
        num_classes=config.num_classes,
        list_file=config.list_file,
    )
    checks.require_batch_fits(config.batch_images, len(data), config.data_root)
    transform = TrainTransform(
        round_to_stride(config.crop_size),
        scale_range=config.scale_range,
        reference_long_side=config.origin_size,
        seed=config.seed,
    )
    data = data.with_transform(transform)
    protocol = data.protocol

    start_epoch = last_finished_epoch(output)
    if start_epoch and not config.resume:
        raise ValueError(
            f"{output}: already holds checkpoints; pass --resume to continue or choose another --output"
        )
    if start_epoch:
        _check_resume(output, config, start_epoch)
        model, meta = load_checkpoint(checkpoint_path(output, start_epoch), expect_protocol=protocol.name)
        model.to(device)  # before the optimizer, so its restored state lands on the device
        optimizer = build_optimizer(
            model, config.base_lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        optimizer.load_state_dict(meta["extra"]["optimizer"])
    else:
        seed_everything(config.seed)  # the random initialisation of new layers, too
        model = _init_model(config).to(device)
        optimizer = build_optimizer(
            model, config.base_lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    evaluate = _evaluator(config, protocol, device)
    distributed.write_once(_write_config, output, config)
    net = maybe_compile(model, config.compile)  # runs the steps; checkpoints come from model
    writer = _tensorboard(output) if config.tensorboard and distributed.is_main() else None

    def on_epoch_end(epoch: int, stats: dict) -> None:
        done = epoch + 1
        record = {**stats, "epoch": done}
        if evaluate is not None:
            record.update(evaluate(net))  # every process scores its share of the images
        if distributed.is_main():
            save_epoch(record)

    def save_epoch(record: dict) -> None:
        """The checkpoint, ``last.pt``, the log line and the TensorBoard point of an epoch."""
        done = record["epoch"]
        extra = {"optimizer": optimizer.state_dict(), "config": asdict(config), "stats": record}
        save_checkpoint(
            checkpoint_path(output, done),
            model,
            arch=config.model,
            num_classes=config.num_classes,
            protocol=protocol.name,
            epoch=done,
            extra=extra,
        )
        with atomic_path(output / "last.pt") as tmp:
            shutil.copyfile(checkpoint_path(output, done), tmp)
        _append_jsonl(output / "log.jsonl", record)
        if writer is not None and "val_miou" in record:
            writer.add_scalar("val/miou", record["val_miou"], done)
        print(json.dumps(record), flush=True)

    try:
        train_epochs(
            net,
            data,
            epochs=config.to_epoch,
            start_epoch=start_epoch,
            batch_size=config.batch_images,
            base_lr=config.base_lr,
            lr_policy=config.lr_type,
            lr_steps=config.lr_steps,
            device=device,
            optimizer=optimizer,
            num_workers=config.num_workers,
            seed=config.seed,
            amp=config.amp,
            on_epoch_end=on_epoch_end,
            writer=writer,
            progress=config.progress,
            sync_bn=config.sync_bn,
        )
    finally:
        if writer is not None:
            writer.close()
    return output / "last.pt"


def _tensorboard(output: Path) -> Any:
    """A TensorBoard writer under ``OUT/tensorboard`` (tensorboard is an optional dependency)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "--tensorboard needs the 'tensorboard' package (pip install 'cbst[tensorboard]')"
        ) from None
    return SummaryWriter(str(output / "tensorboard"))
