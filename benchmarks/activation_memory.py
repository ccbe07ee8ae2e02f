"""Training memory of each architecture, estimated without a GPU from counted activations.

For want of a GPU, this counts the bytes autograd keeps for the backward pass: every tensor a
train-mode forward saves (``torch.autograd.graph.saved_tensors_hooks``), each storage once, the
parameters and their views excluded, in fp32. The count is made at the real crop sizes (512x512
and 1024x1024, batch 1) on the meta device, where shapes propagate without memory or compute. As a
cross-check at 128x128, this count (parameters included) agreed with a storage-deduplicated count
of the CPU's real tensors to 1 % for DAFormer-B0 and 4 % for DINOv2-S. Under bf16 autocast
(the training default) most saved tensors are half as large, so these fp32 figures are an upper
bound for it. With gradient
checkpointing the encoder keeps only each block's input (not counted); the recomputation in the
backward pass then holds one block's activations at a time, not counted either.

The batch that fits a GPU of ``G`` GB is ``(G - static - reserve) / activations per image``, with
``static`` = 16 bytes per parameter (fp32 weights, gradients and AdamW's two moments) and
``reserve`` = 1.5 GB (CUDA context, cuDNN/cuBLAS workspaces, allocator slack). The backward pass's
transient buffers and fragmentation are not counted, so real batches are somewhat smaller: measure
with ``benchmarks/gpu_bench.py`` on the GPU itself.

Usage: ``python benchmarks/activation_memory.py [--archs daformer_mit_b5,dinov2_vit_l14]``.
"""

from __future__ import annotations

import argparse
import json

import torch

from cbst.models import build_model

ARCHS: tuple[str, ...] = (
    "segformer_mit_b0",
    "daformer_mit_b0",
    "segformer_mit_b5",
    "daformer_mit_b5",
    "dinov2_vit_s14",
    "dinov2_vit_b14",
    "dinov2_vit_l14",
)
CROPS: tuple[int, ...] = (512, 1024)
GPUS_GB: tuple[int, ...] = (11, 24, 80, 141)
RESERVE_GB = 1.5
STATIC_BYTES_PER_PARAM = 16


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors one train forward of ``x`` saves for backward (each storage once)."""
    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t if t._base is None else t._base  # a view counts as its base tensor
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            total += base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def largest_batch(gpu_gb: int, static_bytes: int, per_image: float) -> int:
    """Images per batch that fit ``gpu_gb`` under this script's model (0: not even one)."""
    free = gpu_gb * 1e9 - static_bytes - RESERVE_GB * 1e9
    return max(0, int(free // per_image))


def measure(arch: str) -> dict:
    """fp32 activation GB per image at each crop, with and without checkpointing, and the batches that fit."""
    with torch.device("meta"):
        model = build_model(arch, 19).train()
    n_params = sum(p.numel() for p in model.parameters())
    static = STATIC_BYTES_PER_PARAM * n_params
    record: dict = {"arch": arch, "params_m": round(n_params / 1e6, 1), "static_gb": round(static / 1e9, 2)}
    for crop in CROPS:
        x = torch.empty(1, 3, crop, crop, device="meta")
        for ckpt in (False, True):
            model.set_grad_checkpointing(ckpt)
            per_image = saved_bytes(model, x)
            key = f"{crop}{'_ckpt' if ckpt else ''}"
            record[f"act_gb_{key}"] = round(per_image / 1e9, 3)
            record[f"batch_fits_{key}"] = {g: largest_batch(g, static, per_image) for g in GPUS_GB}
    return record


def main() -> None:
    """Print one JSON line per architecture."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma list of architectures")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for arch in args.archs.split(","):
        print(json.dumps(measure(arch)), flush=True)


if __name__ == "__main__":
    main()
