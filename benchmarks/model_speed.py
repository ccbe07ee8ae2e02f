"""Parameter counts and CPU times (2 threads, batch 1) of the models: forward, and forward + backward.

``forward`` is eval mode under ``inference_mode`` (the pseudo-label pass and evaluation);
``train step`` is train mode, forward, a mean-logit loss and backward, per image (batch 2 / 2).
Both are means over ``--runs`` after one warm-up. The default size is the embedded synthetic
benchmark's frames (128x256, ``cbst demo``); ``--archs`` picks the models (default: every one
that builds in seconds on a CPU, i.e. all but the MiT-B2...B5 and ViT-B/L variants).

Usage: ``python benchmarks/model_speed.py [--runs 3] [--size 128,256] [--archs small,daformer_mit_b0]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from cbst.models import build_model

CPU_ARCHS: tuple[str, ...] = (
    "small",
    "small_demo",
    "deeplabv2_resnet101",
    "resnet38",
    "segformer_mit_b0",
    "segformer_mit_b1",
    "daformer_mit_b0",
    "dinov2_vit_s14",
)


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """Mean wall time of ``runs`` eval forwards after one warm-up."""
    model.eval()
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(runs):
            model(x)
    return (time.perf_counter() - start) / runs


def train_step_seconds(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """Mean wall time per image of ``runs`` train-mode forward + backward passes after one warm-up."""
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).mean().backward()

    step()
    start = time.perf_counter()
    for _ in range(runs):
        step()
    return (time.perf_counter() - start) / runs / x.shape[0]


def main() -> None:
    """Print one line per model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", default="128,256", help="H,W of the input")
    parser.add_argument("--archs", default=",".join(CPU_ARCHS), help="comma list of architectures")
    args = parser.parse_args()
    torch.set_num_threads(2)
    h, w = (int(v) for v in args.size.split(","))
    print(f"input 3x{h}x{w}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.archs.split(","):
        torch.manual_seed(0)
        model = build_model(name, 19)
        params = sum(p.numel() for p in model.parameters())
        forward = forward_seconds(model, torch.randn(1, 3, h, w), args.runs)
        train = train_step_seconds(model, torch.randn(2, 3, h, w), args.runs)
        print(
            f"{name:22s} {params / 1e6:8.2f} M params  {forward * 1000:9.1f} ms/forward  "
            f"{train * 1000:9.1f} ms/train step per image"
        )


if __name__ == "__main__":
    main()
