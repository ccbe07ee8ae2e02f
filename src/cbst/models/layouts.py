"""Weights files of the field's layouts, recognised by their keys and renamed to cbst's, loaded strictly.

A layout is a way of naming the tensors of a network in a file. The ones cbst reads into its
transformer families (:class:`~cbst.models.transformer.TransformerSegNet`):

- ``cbst``: cbst's own names (``encoder.*``, ``decoder.*``), a bare state_dict or a checkpoint's;
- ``mit-imagenet``: MiT ImageNet encoders, NVlabs' ``mit_b*.pth`` (its 1000-class ``head.*`` is
  dropped) or the segmentation-models-pytorch hub's ``model.safetensors``; the decoder keeps its
  initialisation;
- ``mmseg``: an mmsegmentation model (``backbone.*``, ``decode_head.*``), e.g. DAFormer's;
- ``mmseg-uda``: a DAFormer/HRDA/MIC UDA checkpoint, whose ``model.*`` (student), ``ema_model.*``
  (teacher) and ``imnet_model.*`` (frozen ImageNet copy) each hold an mmseg model; ``uda_model``
  chooses the student or the teacher;
- ``dinov2-timm``: timm's DINOv2 ``model.safetensors``;
- ``dinov2-hub``: the official torch.hub ``dinov2_vit*14_pretrain.pth`` (``mask_token`` dropped, the
  rest is timm's naming).

Files are read without running code (safetensors, or ``torch.load(weights_only=True)``). An
unknown layout is refused by name; a file that does not fit names the file and the first keys that
are missing, unexpected or mis-shaped, counting the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cbst.errors import DataError, WeightsError
from cbst.io import read_torch_file

UDA_MODELS: dict[str, str] = {"student": "model.", "teacher": "ema_model."}
"""The branch of a UDA checkpoint each ``uda_model`` choice reads (DAFormer's test script: student)."""
SHOWN_KEYS = 5
"""How many keys of each kind an error lists before counting the rest."""

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """A file layout: how to recognise it, which encoder family it fits (the encoder class's
    ``weights_family``; None: any), how to rename it to cbst's keys."""

    name: str
    what: str
    detect: Callable[[set[str]], bool]
    family: str | None
    rename: Callable[[State], State]
    encoder_only: bool


def _prefixed(state: State, prefix: str, drop: Iterable[str] = ()) -> State:
    """``state`` with ``prefix`` before every key, less the keys starting with one of ``drop``."""
    drop = tuple(drop)
    return {prefix + k: v for k, v in state.items() if not (drop and k.startswith(drop))}


def _from_mmseg(state: State) -> State:
    """``backbone.`` -> ``encoder.``, ``decode_head.`` -> ``decoder.`` (other keys kept, to be refused)."""
    renames = (("backbone.", "encoder."), ("decode_head.", "decoder."))
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def _has_prefix(keys: set[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "cbst",
        "cbst's own state_dict",
        lambda keys: all(k.startswith(("encoder.", "decoder.")) for k in keys),
        None,
        dict,
        False,
    ),
    Layout(
        "mmseg",
        "an mmsegmentation model (DAFormer's backbone./decode_head.)",
        lambda keys: _has_prefix(keys, "backbone.") and _has_prefix(keys, "decode_head."),
        "mit",
        _from_mmseg,
        False,
    ),
    Layout(
        "mit-imagenet",
        "MiT ImageNet weights (NVlabs mit_b*.pth / smp hub model.safetensors)",
        lambda keys: "patch_embed1.proj.weight" in keys and "block1.0.attn.q.weight" in keys,
        "mit",
        lambda state: _prefixed(state, "encoder.", drop=("head.",)),
        True,
    ),
    Layout(
        "dinov2-hub",
        "DINOv2 torch.hub weights (dinov2_vit*14_pretrain.pth)",
        lambda keys: "mask_token" in keys and "blocks.0.ls1.gamma" in keys,
        "dinov2",
        lambda state: _prefixed({k: v for k, v in state.items() if k != "mask_token"}, "encoder.vit."),
        True,
    ),
    Layout(
        "dinov2-timm",
        "DINOv2 weights in timm's layout (model.safetensors)",
        lambda keys: (
            "cls_token" in keys and "patch_embed.proj.weight" in keys and "blocks.0.ls1.gamma" in keys
        ),
        "dinov2",
        lambda state: _prefixed(state, "encoder.vit."),
        True,
    ),
)


def read_weights_file(path: Path) -> State:
    """The tensors of a ``.safetensors`` file or a torch file (``state_dict`` unwrapped: mmseg, cbst)."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError  # optional-format reader, only for these files
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = read_torch_file(path)
    except DataError as exc:
        raise WeightsError(str(exc)) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return dict(obj)


def select_uda_model(state: State, uda_model: str, path: Path) -> State:
    """The student's or teacher's mmseg state of a UDA checkpoint; other states pass unchanged."""
    if not _has_prefix(set(state), *UDA_MODELS.values()):
        return state
    if uda_model not in UDA_MODELS:
        raise WeightsError(f"uda_model must be one of {', '.join(UDA_MODELS)}, not {uda_model!r}")
    prefix = UDA_MODELS[uda_model]
    chosen = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not chosen:
        raise WeightsError(f"{path}: a UDA checkpoint without the {uda_model} ({prefix}*) weights")
    return chosen


def detect_layout(state: State, path: Path) -> Layout:
    """The layout ``state``'s keys follow; an unknown one is refused, naming the layouts cbst reads."""
    keys = set(state)
    for layout in LAYOUTS:
        if layout.detect(keys):
            return layout
    first = ", ".join(sorted(keys)[:SHOWN_KEYS])
    known = "; ".join(f"{layout.name} ({layout.what})" for layout in LAYOUTS)
    raise WeightsError(f"{path}: unknown weights layout (keys {first}, ...); cbst reads {known}")


def _listed(kind: str, items: list[str]) -> str:
    """``kind: a, b, c (and N more)``."""
    more = f" (and {len(items) - SHOWN_KEYS} more)" if len(items) > SHOWN_KEYS else ""
    return f"{kind} {', '.join(items[:SHOWN_KEYS])}{more}"


def misfit(own: State, state: State) -> list[str]:
    """What keeps ``state`` from loading strictly into a model with state ``own`` (empty if nothing)."""
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})"
        for k, v in sorted(state.items())
        if k in own and v.shape != own[k].shape
    ]
    found = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched))
    return [_listed(kind, items) for kind, items in found if items]


def load_weights(model: nn.Module, path: Path, *, uda_model: str = "student") -> tuple[str, int]:
    """Fill ``model`` from ``path`` strictly; returns (layout name, number of tensors read).

    Encoder-only layouts (ImageNet/DINOv2 pre-training) leave the decoder as initialised.
    """
    path = Path(path)
    state = select_uda_model(read_weights_file(path), uda_model, path)
    layout = detect_layout(state, path)
    if layout.family is not None and getattr(model.encoder, "weights_family", None) != layout.family:
        raise WeightsError(
            f"{path}: holds {layout.what}, which does not fit {type(model).__name__} "
            f"(its encoder is {type(model.encoder).__name__})"
        )
    renamed = layout.rename(state)
    own = model.state_dict()
    if layout.encoder_only:
        renamed.update({k: v for k, v in own.items() if k.startswith("decoder.")})
    problems = misfit(own, renamed)
    if problems:
        raise WeightsError(
            f"{path}: {layout.name} weights do not fit {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(renamed, strict=True)
    return layout.name, len(state)
