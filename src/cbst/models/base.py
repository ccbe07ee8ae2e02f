"""What every segmentation network shares: input normalisation, the base class, strict loading.

``SegmentationNet`` fixes the contract (output stride 8, ``lr_groups()``, BN that stays frozen in
train mode when asked); ``load_strict`` and ``read_state_dict`` load bare PyTorch state_dicts with
errors that name the file and list every key that does not fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

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
        raise FileNotFoundError(f"{path}: pretrained weights not found")
    obj = read_torch_file(path)
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors)")
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
        raise ValueError(f"{label}: does not fit {type(model).__name__}; " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=assign)


OUTPUT_STRIDE = 8
"""Every network's output stride: logits come out at 1/8 of the input's height and width."""


def round_to_stride(size: int) -> int:
    """``size`` rounded up to a multiple of :data:`OUTPUT_STRIDE` (500 -> 504).

    Training crops are rounded so (the original's --crop-size is in pixels), and inference pads
    its inputs so, that the stride-8 output grid covers them exactly.
    """
    return -(-int(size) // OUTPUT_STRIDE) * OUTPUT_STRIDE


class SegmentationNet(nn.Module):
    """Base class: output stride 8 and batch-norm layers that stay in eval mode when frozen."""

    output_stride: int = OUTPUT_STRIDE

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

    def lr_groups(self) -> list[dict]:
        """Parameter groups ``{"params", "lr_mult", "wd_mult"}``; empty groups are dropped."""
        return [g for g in self._lr_groups() if g["params"]]

    def _lr_groups(self) -> list[dict]:
        raise NotImplementedError

    def load_pretrained(self, source: str | Path) -> None:
        """Load a bare state_dict file strictly (families override to add their formats)."""
        if str(source) == "imagenet":
            raise ValueError(f"{type(self).__name__} has no ImageNet weights; give a file")
        load_strict(self, read_state_dict(Path(source)), str(source))
