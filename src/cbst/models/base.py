"""What every segmentation network shares: input normalisation, the base class, strict loading.

``SegmentationNet`` fixes the contract every architecture of ``cbst.registry.ARCHITECTURES``
keeps (tested for each by ``tests/test_contracts.py``): its geometry (``output_stride``,
``pad_multiple``), its input statistics, ``lr_groups()``, BN that stays frozen in train mode
when asked, and how it reads weights files (``load_pretrained``, ``convert``). ``load_strict``
and ``read_state_dict`` load bare PyTorch state_dicts with errors that name the file and list
every key that does not fit.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cbst.errors import ConfigError, WeightsError
from cbst.io import read_torch_file

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of the [0, 1]-scaled input, subtracted before the network."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation the mean-subtracted input is divided by."""


def lr_group(params: list[nn.Parameter], lr_mult: float, wd_mult: float) -> dict:
    """One optimiser group of the trainable ``params`` with its multipliers."""
    return {"params": [p for p in params if p.requires_grad], "lr_mult": lr_mult, "wd_mult": wd_mult}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A bare state_dict from a torch file (a cbst checkpoint's ``state_dict`` is unwrapped)."""
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "pretrained weights not found", str(path))
    obj = read_torch_file(path)
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return obj


def some_items(items: list[str], limit: int | None) -> str:
    """The first ``limit`` items and how many more there are (every item when ``limit`` is None)."""
    if limit is None or len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


def load_strict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    label: str,
    *,
    assign: bool = False,
    limit: int | None = 5,
) -> None:
    """``load_state_dict(strict=True)``, with an error naming missing/unexpected/mis-shaped keys.

    The error names the first ``limit`` keys of each kind and counts the rest (a file of another
    architecture differs in hundreds of keys); ``limit=None`` lists them all.
    ``num_batches_tracked`` may be absent (PyTorch < 0.4.1 files such as CRST's): BN fills it in.
    ``assign=True`` adopts the given tensors (for models built on the meta device, no init cost).
    """
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k} (got {tuple(v.shape)}, expected {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{kind}: {some_items(items, limit)}"
            for kind, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if items
        ]
        raise WeightsError(f"{label}: does not fit {type(model).__name__}; " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=assign)


def round_to_stride(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple`` (500 -> 504 for 8).

    Training crops are rounded to the model's ``pad_multiple`` (the original's --crop-size is in
    pixels), and inference pads its inputs so, that the model's output grid covers them exactly.
    """
    return -(-int(size) // int(multiple)) * int(multiple)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside ``torch.compile`` and DistributedDataParallel wrappers (whose geometry
    and parameter groups are the network's)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


@dataclass(frozen=True)
class Geometry:
    """What inference, the probability cache and training crops need to know of a network."""

    output_stride: int
    pad_multiple: int
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD


PLAIN_MODULE_GEOMETRY = Geometry(output_stride=8, pad_multiple=8)
"""Assumed for a bare ``nn.Module`` that declares no geometry (a stand-in network in a test or a
user's script): that of cbst's original networks. Every :class:`SegmentationNet` declares its own."""


def geometry(model: nn.Module) -> Geometry:
    """The geometry ``model`` declares (through compile/DDP wrappers; see :class:`SegmentationNet`)."""
    net = unwrap(model)
    if not hasattr(net, "output_stride"):
        return PLAIN_MODULE_GEOMETRY
    return Geometry(
        int(net.output_stride),
        int(net.pad_multiple),
        tuple(getattr(net, "input_mean", IMAGENET_MEAN)),
        tuple(getattr(net, "input_std", IMAGENET_STD)),
    )


@dataclass(frozen=True)
class TrainingRecipe:
    """The optimiser settings a family is trained with, under the names of the training options
    (``--optimizer``, ``--base-lr``, ``--weight-decay``) that a run would set to follow it.

    Only what does not depend on the schedule's length is declared (a warm-up of 1,500
    iterations suits a 40,000-iteration run, not a short one): ``cbst demo --model`` trains with
    it, and the family's configs in ``configs/`` carry the same values with their schedules.
    """

    optimizer: str
    base_lr: float
    weight_decay: float


@dataclass(frozen=True)
class Conversion:
    """A network filled from an external weights file by :meth:`SegmentationNet.convert`."""

    model: SegmentationNet
    tensors: int
    """Number of tensors read from the file."""
    note: str = ""
    """What the conversion did beyond copying tensors (e.g. a head initialised), for the user."""


class SegmentationNet(nn.Module):
    """Base class of every architecture: its geometry, input statistics and parameter groups.

    Subclasses set ``output_stride`` (logits come out at 1/stride of the padded input's height
    and width), ``pad_multiple`` (inputs are zero-padded bottom/right to a multiple of it, and
    training crops rounded up to it; a multiple of ``output_stride``), ``default_freeze_bn``,
    and implement ``forward``, ``encoder_features`` and ``_lr_groups``. ``input_mean``/``input_std``
    are the RGB statistics of the [0, 1]-scaled input that inference and training normalise with.
    ``training_recipe`` is the family's own optimiser recipe, None where the command-line
    defaults (SGD, the original codes') are the family's.

    ``forward(x)`` returns the logits; ``forward(x, return_features=True)`` returns (logits, the
    encoder's last-stage features), one pass for both, through DistributedDataParallel too (the
    ImageNet feature distance of online self-training compares these features).
    """

    output_stride: int
    pad_multiple: int
    default_freeze_bn: bool = False
    training_recipe: TrainingRecipe | None = None
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, freeze_bn: bool) -> None:
        super().__init__()
        self.freeze_bn = freeze_bn

    def train(self, mode: bool = True) -> SegmentationNet:
        """Set train/eval mode; frozen BN layers keep their running statistics (eval) regardless."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last-stage (bottleneck) features N×K×h×w of normalised images: what the
        head reads, without running the head."""
        raise NotImplementedError

    def lr_groups(self) -> list[dict]:
        """Parameter groups ``{"params", "lr_mult", "wd_mult"}``; empty groups are dropped."""
        return [g for g in self._lr_groups() if g["params"]]

    def _lr_groups(self) -> list[dict]:
        raise NotImplementedError

    def load_pretrained(self, source: str | Path) -> None:
        """Load a bare state_dict file strictly (families override to add their formats)."""
        if str(source) == "imagenet":
            raise ConfigError(f"{type(self).__name__} has no ImageNet weights; give a file")
        load_strict(self, read_state_dict(Path(source)), str(source))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the logits of a padded input of ``height`` x ``width`` (multiples of
        ``pad_multiple``): 1/``output_stride`` of it, unless the family's arithmetic differs."""
        return height // self.output_stride, width // self.output_stride

    @classmethod
    def convert(
        cls, path: Path, num_classes: int, *, imagenet: bool = False, limit: int | None = 5
    ) -> Conversion:
        """A network of ``num_classes`` outputs filled from an external weights file (``cbst
        convert``): here a bare PyTorch state_dict of this network, loaded strictly.

        ``imagenet``: the file is an ImageNet classifier of the backbone, its head initialised
        here; families that can read one (or other formats) override this. ``limit``: how many
        differing keys a does-not-fit error names (None: all of them).
        """
        if path.suffix == ".params":
            raise WeightsError(f"{path}: MXNet .params files hold ResNet-38 weights; use --arch resnet38")
        if imagenet:
            raise WeightsError(f"{path}: {cls.__name__} cannot be initialised from an ImageNet classifier")
        state = read_state_dict(path)
        model = cls(num_classes, freeze_bn=cls.default_freeze_bn)
        load_strict(model, state, str(path), limit=limit)
        return Conversion(model, len(state))
