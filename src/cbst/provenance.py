"""What a result was computed with: precision, device, versions, threads.

The same run gives different numbers in bf16 (CUDA, CPUs with AMX or AVX512-BF16) and in
float32 (most CPUs), so every ``results.json`` and ``metrics.json`` records :func:`provenance`,
and the report shows it.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

import torch

from cbst import __version__
from cbst.device import cpu_has_native_bf16, mixed_precision


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` says)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def precision_name(device: torch.device, amp: bool) -> str:
    """``bf16``, ``float16`` or ``float32``: the autocast dtype ``device`` runs with."""
    dtype = mixed_precision(device, amp)
    return {torch.bfloat16: "bf16", torch.float16: "float16"}.get(dtype, "float32")


def provenance(device: torch.device | str, amp: bool) -> dict[str, Any]:
    """Precision, device, torch and cbst versions, and thread count of a computation on ``device``."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "precision": precision_name(device, amp),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "cbst": __version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's content (hex), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_record(path: str | Path) -> dict[str, str]:
    """What identifies a checkpoint in a results file: its absolute path and content hash."""
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def describe(info: dict[str, Any]) -> str:
    """One line for the console and the report: ``float32 on cpu (AMD EPYC ..., no native bf16), ...``."""
    where = (
        info.get("gpu")
        or f"{info.get('cpu')}, {'native' if info.get('cpu_native_bf16') else 'no native'} bf16"
    )
    return (
        f"{info.get('precision')} on {info.get('device')} ({where}), torch {info.get('torch')}, "
        f"cbst {info.get('cbst')}, {info.get('threads')} threads"
    )
