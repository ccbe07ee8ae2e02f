"""Parameter counts and CPU forward time (2 threads, eval mode, batch 1) of every model at 256x512.

Usage: ``python benchmarks/model_speed.py [--runs 3] [--size 256,512]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from cbst.models import build_model
from cbst.registry import ARCHITECTURES


def forward_seconds(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    """Mean wall time of ``runs`` forwards after one warm-up."""
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(runs):
            model(x)
    return (time.perf_counter() - start) / runs


def main() -> None:
    """Print one line per model."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", default="256,512", help="H,W of the input")
    args = parser.parse_args()
    torch.set_num_threads(2)
    h, w = (int(v) for v in args.size.split(","))
    x = torch.randn(1, 3, h, w)
    print(f"input 1x3x{h}x{w}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in ARCHITECTURES:
        model = build_model(name, 19).eval()
        params = sum(p.numel() for p in model.parameters())
        seconds = forward_seconds(model, x, args.runs)
        print(f"{name:22s} {params / 1e6:8.2f} M params  {seconds * 1000:9.1f} ms/forward")


if __name__ == "__main__":
    main()
