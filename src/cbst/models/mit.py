"""The Mix Transformer (MiT, SegFormer's encoder) assembled from segmentation-models-pytorch's modules.

smp's ``mit_b0`` ... ``mit_b5`` encoders keep the parameter names of NVlabs' original release
(``patch_embed1.proj``, ``block1.0.attn.q``, ``block1.0.mlp.dwconv.dwconv``, ``norm1``, ...), so
NVlabs' ImageNet files, smp's hub files and DAFormer's ``backbone.*`` all fit. We assemble the four
stages from smp's own ``OverlapPatchEmbed``/``Block``/``LayerNorm`` with smp's per-variant settings
(rather than instantiating smp's encoder) for three reasons: the stochastic-depth rates are computed
in Python, so the encoder builds on the meta device; the stages' blocks can be recomputed in the
backward pass (gradient checkpointing, which smp's encoder lacks); and the forward returns the four
stage outputs (strides 4, 8, 16, 32) without smp's placeholder features.
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.encoders.mix_transformer import (
    Block,
    OverlapPatchEmbed,
    mix_transformer_encoders,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

MIT_VARIANTS: tuple[str, ...] = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
DEFAULT_DROP_PATH = 0.1
"""Stochastic depth at the last block (NVlabs' and DAFormer's ``mit_b*`` setting)."""


def drop_path_rates(rate: float, blocks: int) -> list[float]:
    """Linearly increasing rates 0 ... ``rate`` over ``blocks`` blocks (the MiT decay rule)."""
    return [rate * i / (blocks - 1) if blocks > 1 else 0.0 for i in range(blocks)]


class MitEncoder(nn.Module):
    """MiT-B0 ... B5: four stages (patch embedding, transformer blocks, layer norm), strides 4 to 32."""

    weights_family = "mit"
    """The weights layouts (:mod:`cbst.models.layouts`) of this family fit it."""

    def __init__(self, variant: str, *, drop_path_rate: float = DEFAULT_DROP_PATH) -> None:
        super().__init__()
        if variant not in MIT_VARIANTS:
            raise ValueError(f"unknown MiT variant {variant!r}; choose one of {', '.join(MIT_VARIANTS)}")
        cfg = mix_transformer_encoders[variant]["params"]
        dims, depths = cfg["embed_dims"], cfg["depths"]
        self.channels: tuple[int, ...] = tuple(dims)
        self.grad_checkpointing = False
        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
        in_dims = [3, *dims[:-1]]
        for i in range(4):
            first = i == 0
            patch_embed = OverlapPatchEmbed(
                patch_size=7 if first else 3, stride=4 if first else 2, in_chans=in_dims[i], embed_dim=dims[i]
            )
            blocks = [
                Block(
                    dim=dims[i],
                    num_heads=cfg["num_heads"][i],
                    mlp_ratio=cfg["mlp_ratios"][i],
                    qkv_bias=cfg["qkv_bias"],
                    drop_path=next(rates),
                    norm_layer=cfg["norm_layer"],
                    sr_ratio=cfg["sr_ratios"][i],
                )
                for _ in range(depths[i])
            ]
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", nn.Sequential(*blocks))
            setattr(self, f"norm{i + 1}", cfg["norm_layer"](dims[i]))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them."""
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs (NCHW), at strides 4, 8, 16 and 32."""
        features = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            x = getattr(self, f"norm{i}")(x).contiguous()
            features.append(x)
        return features
