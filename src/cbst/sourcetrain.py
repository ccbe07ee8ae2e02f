"""Source training: the driver behind ``cbst train-source`` (the original's ``train_src.py``).

``train_source`` trains a network on labelled source images with the loop of
:mod:`cbst.training`. After every epoch ``OUT/last.pt`` is replaced by the resumable checkpoint
(weights and optimiser state); every ``save_interval`` epochs, and after the last one, the
weights alone go to ``OUT/checkpoints/epoch_NNNN.pt``, of which the newest ``keep_checkpoints``
stay (a ResNet-38 checkpoint with its SGD momentum is twice the size of its weights, and one
per epoch over 30 epochs would be tens of GB). A killed run resumes from ``last.pt`` and ends
with the same weights as an uninterrupted one. It mirrors :mod:`cbst.selftrain`, the driver of
the self-training rounds.

With ``rcs_temperature`` above 0 an epoch's crops are drawn by Rare Class Sampling
(:class:`cbst.rcs.RareClassCrops`): as many crops as images, each of an image drawn for a
class. The class counts it draws by, and the class-balanced loss weights by, are counted once
into ``OUT/class_pixel_counts.npy``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from cbst import checks, distributed, options, runlock
from cbst.checkpoints import load_checkpoint, save_checkpoint
from cbst.class_counts import run_pixel_counts
from cbst.config import SourceTrainConfig, resume_free
from cbst.datasets import build_dataset
from cbst.device import configure_backends, maybe_compile, seed_everything, select_device
from cbst.errors import CheckpointError, ConfigError
from cbst.evaluation import evaluate_model
from cbst.io import check_output_dir, check_run_folder, write_json, write_text
from cbst.loggers import logger_names, open_loggers
from cbst.losses import class_balance_weights
from cbst.models import build_model
from cbst.models.base import geometry, round_to_stride
from cbst.models.transformer import TransformerSegNet
from cbst.optim import build_optimizer
from cbst.rcs import PROBS_FILE, RareClassCrops, RareClassSampler
from cbst.registry import ARCHITECTURES, LOSSES
from cbst.training import train_epochs
from cbst.transforms import TrainTransform

_SOURCE_INPUTS = options.path_fields(SourceTrainConfig)
# Options that change no finished epoch, so a resumed run may change them (declared with the
# options, in cbst.config); --to-epoch too when the lr policy does not span the whole run.
_SOURCE_RESUME_FREE = resume_free(SourceTrainConfig)
CLASS_COUNTS_FILE = "class_pixel_counts.npy"
CLASS_WEIGHTS_FILE = "class_weights.json"


def checkpoint_path(output: Path, epoch: int) -> Path:
    """``OUT/checkpoints/epoch_NNNN.pt``: the weights-only checkpoint written after ``epoch`` epochs."""
    return output / "checkpoints" / f"epoch_{epoch:04d}.pt"


def _epoch_checkpoints(output: Path) -> dict[int, Path]:
    """The weights-only checkpoints in ``OUT/checkpoints`` by epoch."""
    found = {p.stem.split("_")[1]: p for p in (output / "checkpoints").glob("epoch_*.pt")}
    return {int(epoch): path for epoch, path in found.items() if epoch.isdigit()}


def last_finished_epoch(output: Path) -> int:
    """The epochs ``OUT/last.pt`` holds (0 when there is none): where a resumed run continues."""
    from cbst.checkpoints import read_meta

    last = output / "last.pt"
    return int(read_meta(last).get("epoch") or 0) if last.is_file() else 0


def _prune_checkpoints(output: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` weights-only checkpoints (None keeps every one)."""
    if keep is None:
        return
    epochs = sorted(_epoch_checkpoints(output).items())
    for _, path in epochs[: max(0, len(epochs) - keep)]:
        path.unlink()


def epoch_line(record: dict, to_epoch: int) -> str:
    """An epoch's console line: ``epoch 3/25: loss 0.4123, lr 4.10e-02, 12.3 s, val mIoU 34.5%``."""
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"{record['seconds']:.1f} s"]
    if "val_miou" in record:
        parts.append(f"val mIoU {100 * record['val_miou']:.1f}%")
    return f"epoch {record['epoch']}/{to_epoch}: " + ", ".join(parts)


def _optimizer(model: nn.Module, config: SourceTrainConfig) -> torch.optim.Optimizer:
    """The run's optimiser over the model's parameter groups."""
    return build_optimizer(
        model,
        config.base_lr,
        name=config.optimizer,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def _check_transformer_options(config: SourceTrainConfig) -> None:
    """Refuse ``--drop-path-rate``/``--grad-checkpointing`` for an architecture without them."""
    if issubclass(ARCHITECTURES.get(config.model), TransformerSegNet):
        return
    asked = [
        flag
        for flag, on in (
            ("--drop-path-rate", config.drop_path_rate is not None),
            ("--grad-checkpointing", config.grad_checkpointing),
        )
        if on
    ]
    if asked:
        raise ConfigError(f"{', '.join(asked)}: only for the transformer architectures, not {config.model}")


def _init_model(config: SourceTrainConfig) -> nn.Module:
    """The initial model: from a cbst checkpoint (*.pt) or built with pretrained weights."""
    _check_transformer_options(config)
    if config.weights and config.weights.endswith(".pt"):
        model, meta = load_checkpoint(config.weights)
        if meta.get("arch") != config.model or meta.get("num_classes") != config.num_classes:
            raise CheckpointError(
                f"{config.weights}: checkpoint is {meta.get('arch')} with "
                f"{meta.get('num_classes')} classes, but --model {config.model} "
                f"--num-classes {config.num_classes} was asked for"
            )
        if config.drop_path_rate is not None:
            raise ConfigError("--drop-path-rate: set when the model is built, not for a checkpoint's (*.pt)")
    else:
        extra = {} if config.drop_path_rate is None else {"drop_path_rate": config.drop_path_rate}
        model = build_model(config.model, config.num_classes, pretrained=config.weights, **extra)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _write_config(output: Path, config: SourceTrainConfig) -> None:
    """Lock OUT (creating it) and write the effective configuration as ``OUT/config.yaml``: the
    run starts."""
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
    saved = checks.with_defaults(checks.read_saved_config(path), SourceTrainConfig)
    saved = checks.resolved_paths(saved, _SOURCE_INPUTS)
    current = config.saved_form()
    free = _SOURCE_RESUME_FREE + (("to_epoch",) if config.lr_type in ("fixed", "step") else ())
    diff = checks.changed(saved, current, [k for k in current if k not in free])
    if diff:
        raise checks.resume_refusal(path, saved, current, diff, f"the {finished} finished epochs")


def _class_counts(
    config: SourceTrainConfig, output: Path, data: Any, *, first_start: bool
) -> np.ndarray | None:
    """The source labels' per-image class counts (``OUT/class_pixel_counts.npy``, counted on the
    first start, read on a resume) when the loss or the sampling needs them, else None."""
    if config.class_weight_power == 0 and config.rcs_temperature == 0:
        return None
    path = output / CLASS_COUNTS_FILE
    return run_pixel_counts(path, data, config.num_classes, recount=first_start, progress=config.progress)


def _loss(config: SourceTrainConfig, output: Path, counts: np.ndarray | None, names: Sequence[str]) -> Any:
    """``--loss``, weighted per class by ``counts`` when ``--class-weight-power`` is above 0 (the
    weights are written to ``OUT/class_weights.json``)."""
    loss = LOSSES.get(config.loss)
    if config.class_weight_power == 0 or counts is None:
        return loss()
    weights = class_balance_weights(counts, config.class_weight_power)
    distributed.write_once(
        write_json, output / CLASS_WEIGHTS_FILE, {name: float(w) for name, w in zip(names, weights)}
    )
    return loss(class_weights=weights.tolist())


def _crops(config: SourceTrainConfig, output: Path, data: Any, counts: np.ndarray | None) -> Any:
    """What an epoch trains on: ``data`` itself, or crops drawn from it by Rare Class Sampling
    when ``--rcs-temperature`` is above 0 (its class probabilities go to ``OUT/rcs_class_probs.json``)."""
    if config.rcs_temperature == 0 or counts is None:
        return data
    sampler = RareClassSampler(counts, config.rcs_temperature, config.rcs_min_pixels)
    distributed.write_once(sampler.write_probabilities, output / PROBS_FILE, data.protocol.class_names)
    return RareClassCrops(data, sampler)


def _evaluator(
    config: SourceTrainConfig, protocol: Any, device: torch.device
) -> Callable[[nn.Module], dict] | None:
    """A function returning target-val metrics for a model, or None when no eval set is given."""
    if not config.eval_dataset:
        return None

    val = build_dataset(
        config.eval_dataset,
        config.eval_root,
        split=config.eval_split,
        num_classes=config.num_classes,
        progress=config.progress,
    )
    if val.protocol.name != protocol.name:
        raise ConfigError(
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
    config.validate()
    output = Path(config.output)
    check_output_dir(output)
    check_run_folder(output, "train-source")
    distributed.checked_on_main(lambda: runlock.check_free(output))
    device = select_device(config.device)
    distributed.check_sync_bn(config.sync_bn, device)
    configure_backends(device)
    data = build_dataset(
        config.dataset,
        config.data_root,
        split=config.split,
        num_classes=config.num_classes,
        list_file=config.list_file,
        progress=config.progress,
    )
    checks.require_batch_fits(config.batch_images, len(data), config.data_root)
    protocol = data.protocol

    start_epoch = last_finished_epoch(output)
    if start_epoch and not config.resume:
        raise ConfigError(
            f"{output}: already holds checkpoints; pass --resume to continue or choose another --output"
        )
    if start_epoch:
        _check_resume(output, config, start_epoch)
        model, meta = load_checkpoint(output / "last.pt", expect_protocol=protocol.name)
        _check_transformer_options(config)
        if config.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(device)  # before the optimizer, so its restored state lands on the device
        optimizer = _optimizer(model, config)
        optimizer.load_state_dict(meta["extra"]["optimizer"])
    else:
        seed_everything(config.seed)  # the random initialisation of new layers, too
        model = _init_model(config).to(device)
        optimizer = _optimizer(model, config)
    transform = TrainTransform(
        round_to_stride(config.crop_size, geometry(model).pad_multiple),
        scale_range=config.scale_range,
        reference_long_side=config.origin_size,
        seed=config.seed,
    )
    data = data.with_transform(transform)
    evaluate = _evaluator(config, protocol, device)
    distributed.write_once(_write_config, output, config)
    counts = _class_counts(config, output, data, first_start=start_epoch == 0)
    loss_fn = _loss(config, output, counts, protocol.class_names)
    crops = _crops(config, output, data, counts)
    net = maybe_compile(model, config.compile)  # runs the steps; checkpoints come from model
    loggers = open_loggers(logger_names(config.loggers, config.tensorboard), output)

    def on_epoch_end(epoch: int, stats: dict) -> None:
        done = epoch + 1
        record = {**stats, "epoch": done}
        if evaluate is not None:
            record.update(evaluate(net))  # every process scores its share of the images
        if distributed.is_main():
            save_epoch(record)

    def save_epoch(record: dict) -> None:
        """``last.pt`` (resumable), the weights-only checkpoint, the log record and console line."""
        done = record["epoch"]
        weights = dict(arch=config.model, num_classes=config.num_classes, protocol=protocol.name, epoch=done)
        extra = {"config": asdict(config), "stats": record}
        save_checkpoint(
            output / "last.pt", model, **weights, extra={**extra, "optimizer": optimizer.state_dict()}
        )
        if done % config.save_interval == 0 or done == config.to_epoch:
            save_checkpoint(checkpoint_path(output, done), model, **weights, extra=extra)
            _prune_checkpoints(output, config.keep_checkpoints)
        loggers.record("epoch", record, done)
        print(epoch_line(record, config.to_epoch), flush=True)

    try:
        train_epochs(
            net,
            crops,
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
            logger=loggers,
            progress=config.progress,
            sync_bn=config.sync_bn,
            loss_fn=loss_fn,
            lr_power=config.lr_power,
            warmup_iters=config.warmup_iters,
            clip_grad_norm=config.clip_grad_norm,
        )
    finally:
        loggers.close()
    return output / "last.pt"
