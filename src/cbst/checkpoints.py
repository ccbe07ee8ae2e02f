"""cbst checkpoints: a model's state_dict plus the metadata needed to rebuild and use it.

A checkpoint is a ``torch.save``'d dict ``{"format": "cbst-checkpoint", "state_dict": ..., "meta":
{arch, num_classes, protocol, mean, std, round, epoch, freeze_bn, cbst_version, ...}}``, written atomically.
Foreign weights (MXNet ``.params``, CRST ``.pth``) become checkpoints through ``cbst convert``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbst import __version__
from cbst.errors import CheckpointError, ConfigError
from cbst.io import DataError, atomic_path, is_torch_archive, read_torch_file, write_failure
from cbst.labels import PROTOCOLS
from cbst.models import SegmentationNet, build_model, load_strict, unwrap
from cbst.registry import ARCHITECTURES

FORMAT = "cbst-checkpoint"


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    *,
    arch: str,
    num_classes: int,
    protocol: str,
    round: int | None = None,
    epoch: int | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s weights and metadata to ``path`` atomically."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHITECTURES.names())}")
    if protocol in PROTOCOLS and PROTOCOLS[protocol].num_classes != num_classes:
        raise ValueError(
            f"protocol {protocol} has {PROTOCOLS[protocol].num_classes} classes, not {num_classes}"
        )
    meta = {
        "arch": arch,
        "num_classes": num_classes,
        "protocol": protocol,
        "mean": list(unwrap(model).input_mean),
        "std": list(unwrap(model).input_std),
        "round": round,
        "epoch": epoch,
        "freeze_bn": getattr(model, "freeze_bn", None),
        "cbst_version": __version__,
        "extra": dict(extra or {}),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        try:
            torch.save({"format": FORMAT, "state_dict": state, "meta": meta}, tmp)
        except RuntimeError as exc:  # PyTorch's archive writer: a full disk or a write error
            raise write_failure(tmp, exc) from exc


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint dict, or a ``CheckpointError`` explaining what the file is instead."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = read_torch_file(path, "PyTorch checkpoint")
    except DataError as exc:
        if is_torch_archive(path):  # a damaged PyTorch file: converting would not help
            raise CheckpointError(str(exc)) from None
        raise CheckpointError(
            f"{exc}; MXNet .params and other foreign weights must first go through 'cbst convert'"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a cbst checkpoint (a bare state_dict or foreign file?); "
            f"run 'cbst convert {path} --arch ARCH --num-classes N --out MODEL.pt' first"
        )
    return obj


def _check_protocol(path: Path, meta: dict[str, Any], expect_protocol: str | None) -> None:
    """Raise unless the checkpoint was trained for ``expect_protocol`` (when given)."""
    if expect_protocol is not None and meta["protocol"] != expect_protocol:
        raise CheckpointError(
            f"{path} was trained for {meta['protocol']} but the dataset uses {expect_protocol}"
        )


def read_meta(path: str | Path, expect_protocol: str | None = None) -> dict[str, Any]:
    """The metadata of a checkpoint, without building the model."""
    meta = dict(_read(Path(path))["meta"])
    _check_protocol(Path(path), meta, expect_protocol)
    return meta


def _read_for(path: Path, expect_protocol: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint dict, its meta), checked against the protocol the caller's data uses."""
    obj = _read(path)
    meta = dict(obj["meta"])
    _check_protocol(path, meta, expect_protocol)
    return obj, meta


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", expect_protocol: str | None = None
) -> tuple[SegmentationNet, dict[str, Any]]:
    """Rebuild the model a checkpoint describes, load its weights, and return ``(model, meta)``."""
    path = Path(path)
    obj, meta = _read_for(path, expect_protocol)
    with torch.device("meta"):  # every tensor comes from the file: skip the random init
        model = build_model(meta["arch"], meta["num_classes"], freeze_bn=meta.get("freeze_bn"))
    try:
        load_strict(model, obj["state_dict"], str(path), assign=True)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return model.to(device), meta


def load_weights_into(
    model: nn.Module, path: str | Path, expect_protocol: str | None = None
) -> dict[str, Any]:
    """Copy a checkpoint's weights into ``model`` (same architecture, any device); returns the meta.

    Unlike :func:`load_checkpoint` this keeps the module, so a ``torch.compile`` wrapper of it
    stays valid and is not compiled again.
    """
    path = Path(path)
    obj, meta = _read_for(path, expect_protocol)
    try:
        load_strict(model, obj["state_dict"], str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return meta
