"""Option helpers shared by several subcommands."""

from __future__ import annotations

import argparse


def float_pair(text: str) -> tuple[float, float]:
    """Parse 'a,b' into two floats (e.g. --scale-rate-range 0.7,1.3)."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}") from None
    return lo, hi


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --num-workers, --no-amp and --no-progress."""
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    g.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    g.add_argument("--no-amp", dest="amp", action="store_false", help="disable bf16 autocast on CUDA")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
