"""Device choice and the speed settings that are safe to turn on by default."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from cbst import distributed
from cbst.errors import ConfigError
from cbst.options import DEVICE


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; any other value is passed to torch.

    Under torchrun ``cuda`` is the GPU of the process's ``LOCAL_RANK``
    (:func:`cbst.distributed.init`), a GPU number is refused, and so is MPS (``auto`` skips it),
    whose tensors the job's collective operations cannot carry.
    """
    try:
        DEVICE.parse(name)
    except ValueError as exc:
        raise ConfigError(f"--device: {exc}") from None
    several = distributed.world_size() > 1
    if several and (name.startswith("cuda:") or name == "mps"):
        raise ConfigError(
            f"--device {name}: under torchrun every process uses the GPU of its LOCAL_RANK "
            "(CUDA only); pass --device cuda, cpu or auto, and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available() and not several:
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: requested but CUDA is not available")
    return device


def configure_backends(device: torch.device, benchmark: bool = True) -> None:
    """cuDNN autotuning and TF32 matmuls on CUDA (no effect elsewhere)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    Only there does bf16 autocast pay on the CPU (about 2x for the small model's training
    step on 2 cores); elsewhere it is emulated and slower, so the CPU keeps float32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def mixed_precision(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype used on ``device``, or None for float32.

    bf16 on CUDA devices that support it (fp16 on older ones) and on CPUs with native bf16;
    float32 elsewhere and whenever ``enabled`` is False (``--no-amp``).
    """
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Autocast to :func:`mixed_precision`'s dtype; a no-op where that is float32."""
    dtype = mixed_precision(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def prefers_channels_last(device: torch.device, amp: bool = True) -> bool:
    """Channels-last is the faster layout for convolutions on CUDA and for bf16 on the CPU."""
    return device.type == "cuda" or mixed_precision(device, amp) is not None


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when ``enabled``, else ``model`` itself.

    The compiled wrapper shares ``model``'s parameters and buffers, so weights loaded into
    ``model`` with ``load_state_dict`` are what the wrapper runs, and the compiled graphs are
    reused; save and load checkpoints through ``model`` (the wrapper prefixes its state_dict
    keys). Compilation happens on the first call of each input shape and train/eval mode.
    """
    return torch.compile(model) if enabled else model
