"""bf16 autocast on a CPU without native bf16, at about 1.4 times the float32 cost, for
measuring what the demo's bf16 path computes on machines that lack the hardware.

cbst computes in float32 on a CPU without AVX512-BF16 or AMX (``cbst.device.mixed_precision``),
because PyTorch's bf16 convolutions there fall back to its reference kernels, more than ten times
slower than float32. :func:`emulated_bf16` makes cbst take its bf16 path anyway and computes each
bf16 convolution (forward and backward) with the float32 kernel on the bf16 inputs, rounding the
result to bf16: the products of two bf16 numbers are exact in float32, so this is what the
hardware computes (bf16 operands, float32 accumulation, bf16 result) up to the order of the
sums. Every other operation runs as PyTorch's bf16 autocast runs it. Times measured under it say
nothing about bf16 hardware; the figures (mIoU, IoU) are those of bf16 training and inference.

``python benchmarks/bf16_emulation.py [--runs 5]`` prints, as JSON lines, the time of one
training step of the demo's network (4 crops of 96x96, forward and backward, 2 threads) in
float32, in PyTorch's bf16 autocast and in the emulated one, and this CPU's native bf16 support.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

import cbst.device
from cbst.device import select_device
from cbst.errors import ConfigError
from cbst.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import train_step_seconds  # noqa: E402

_CONVOLUTIONS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)


def _is_bf16(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16


class _Float32Convolutions(TorchDispatchMode):
    """Runs bf16 convolutions (and their gradients) through the float32 kernels, result in bf16;
    ``calls`` counts the convolutions it widened."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS and any(_is_bf16(t) for t in tree_leaves((args, kwargs))):
            self.calls += 1
            widened_args, widened_kwargs = tree_map(lambda t: t.float() if _is_bf16(t) else t, (args, kwargs))
            result = func(*widened_args, **widened_kwargs)
            return tree_map(
                lambda t: (
                    t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                ),
                result,
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_bf16() -> Iterator[_Float32Convolutions]:
    """Within: cbst uses bf16 autocast on the CPU as on one with native bf16 (``--no-amp`` still
    means float32), its convolutions computed as :class:`_Float32Convolutions` says (the mode is
    yielded, so a caller can count them). The report's provenance still records the CPU's own
    (missing) native bf16."""
    with (
        mock.patch.object(cbst.device, "cpu_has_native_bf16", return_value=True),
        _Float32Convolutions() as mode,
    ):
        yield mode


def check_emulation(device: str, amp: bool) -> None:
    """Refuse emulation unless ``--device`` is the CPU (a GPU has bf16 of its own) and the
    settings ask for mixed precision (``amp=False`` is float32)."""
    if not amp:
        raise ConfigError(
            "--emulate-bf16 asks for bf16 but the settings ask for float32 (amp=False, --no-amp)"
        )
    chosen = select_device(device).type if device == "auto" else device.partition(":")[0]
    if chosen != "cpu":
        picked = f" (it picks {chosen} here)" if device == "auto" else ""
        raise ConfigError(f"--emulate-bf16 runs on the cpu only, not with --device {device}{picked}")


PRECISIONS = ("float32", "bf16, PyTorch's kernels", "bf16, emulated")


def _precision(name: str) -> contextlib.ExitStack:
    """The contexts a training step runs under for one of :data:`PRECISIONS`."""
    stack = contextlib.ExitStack()
    if name == PRECISIONS[2]:
        stack.enter_context(emulated_bf16())
    if name != PRECISIONS[0]:
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    return stack


def main() -> None:
    """Time a training step of ``small_demo`` in each precision; one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed steps after one warm-up")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_model("small_demo", 19)
    crops = torch.randn(4, 3, 96, 96)
    for name in PRECISIONS:
        with _precision(name):
            seconds = train_step_seconds(model, crops, args.runs) * len(crops)
        record = {
            "precision": name,
            "seconds_per_step": round(seconds, 4),
            "threads": torch.get_num_threads(),
        }
        print(json.dumps({**record, "cpu_native_bf16": cbst.device.cpu_has_native_bf16()}))


if __name__ == "__main__":
    main()
