"""The probability cache of a pseudo-label round: one network pass, labels assigned later.

:class:`ProbabilityCache` keeps, per target image, the softmax maps of every forward pass of the
round's test-time plan at the network's output resolution (1/stride² of the pixels: 1/64 at
stride 8), in GPU memory, host memory or a memory-mapped file under the round folder, by the
room available. It
gives back up-sampled probabilities on the device, exactly as :func:`cbst.inference.predict_probs`
would compute them from the same maps. :mod:`cbst.pseudo_labels` fills it and assigns the
round's pseudo-labels from it; CRST's soft labels can be computed from it the same way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cbst import distributed, io
from cbst.inference import InferencePlan, combine_outputs

CACHE_FOLDER = "probability_cache"
"""Sub-folder of the round folder holding the cache's file (and its index when kept)."""

BACKENDS = ("auto", "device", "host", "disk")
DEVICE_SHARE = 0.25
"""Share of the free GPU memory the cache may take (the rest stays for the forward passes)."""
HOST_SHARE = 0.5
"""Share of the available host memory the cache may take before it spills to its file."""
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


@dataclass
class _Entry:
    """Where one image's maps are stored: in ``data`` (memory tiers) or at ``offset`` (file)."""

    size: tuple[int, int]
    shapes: list[tuple[int, ...]]
    tier: str
    flip: bool
    offset: int = 0
    data: Tensor | None = None

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


def available_host_memory() -> int:
    """Bytes of host memory available to new allocations (MemAvailable on Linux; 0 if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class ProbabilityCache:
    """One round's class probabilities, kept at the network's output stride.

    An entry per image index holds the softmax map of every forward pass of ``plan`` (each
    scale, then its mirror when flipping; C×h×w at the network's output resolution), stored as
    ``dtype`` (float16, or float32 for exact results). Interface:

    - ``put(index, outputs, size)``: store one image's maps; ``size`` is the image's (H, W);
      ``store(indices, outputs, size)`` stores a batch as :func:`cbst.inference.network_outputs`
      returns it and gives back its probabilities, exactly as ``get_batch`` will;
    - ``get(index)``: its probabilities, C×H×W float32 on ``device``, up-sampled there exactly
      as :func:`cbst.inference.predict_probs` does; ``get_batch(indices)`` stacks equal-size
      images (N×C×H×W) and ``outputs(index)`` returns the stored maps themselves;
    - ``close()``: free everything and delete ``folder``, unless ``keep``: then every entry is
      written to ``folder`` with an index, and :meth:`open` reads the cache back later.

    Storage tiers, filled in this order: device memory (CUDA only, up to ``DEVICE_SHARE`` of the
    free memory), host memory (page-locked on CUDA, up to ``HOST_SHARE`` of the available
    memory), then the file ``folder/probabilities.bin``, read back through a memory map.
    ``backend`` other than ``"auto"`` puts everything in one tier.

    ``merge_flip`` averages each scale's pass with its mirror (flipped back) before storing, at
    the output stride, which halves the cache and the up-sampling. Up-sampling is linear and
    commutes with flipping, so this changes the probabilities by float rounding only; it is
    done where no pass pads the width (padding makes the mirror's crop asymmetric).
    """

    def __init__(
        self,
        folder: str | Path,
        plan: InferencePlan,
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float16,
        backend: str = "auto",
        keep: bool = False,
        merge_flip: bool = False,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"cache backend must be one of {BACKENDS}, got {backend!r}")
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"cache dtype must be float16 or float32, got {dtype}")
        self.folder = Path(folder)
        self.plan = plan
        self.device = torch.device(device)
        self.dtype = dtype
        self.keep = keep
        self.merge_flip = merge_flip
        self._budgets = self._tier_budgets(backend)
        self._used = dict.fromkeys(self._budgets, 0)
        self._entries: dict[int, _Entry] = {}
        self._file: Any = None
        self._map: np.memmap | None = None
        self._file_numel = 0

    @property
    def path(self) -> Path:
        """The file of the disk tier."""
        return self.folder / "probabilities.bin"

    def _tier_budgets(self, backend: str) -> dict[str, float]:
        """Bytes each tier may hold, in filling order."""
        if backend != "auto":
            return {backend: math.inf}
        budgets: dict[str, float] = {}
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budgets["device"] = free * DEVICE_SHARE
        budgets["host"] = available_host_memory() * HOST_SHARE
        budgets["disk"] = math.inf
        return budgets

    def __len__(self) -> int:
        return len(self._entries)

    def tier_of(self, index: int) -> str:
        """``"device"``, ``"host"`` or ``"disk"``: where entry ``index`` is stored."""
        return self._entries[index].tier

    # ----------------------------------------------------------------- storing
    def store(self, indices: Sequence[int], outputs: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """Store the per-pass maps (N×C×h×w each, in pass order) of N images of ``size`` (H, W)
        under ``indices``; returns their probabilities (N×C×H×W), computed from the stored
        values as :meth:`get_batch` will compute them."""
        outputs, flip = self._encoded(outputs, size)
        for n, index in enumerate(indices):
            self._put(index, [out[n] for out in outputs], size, flip)
        return combine_outputs(outputs, replace(self.plan, flip=flip), size)

    def put(self, index: int, outputs: Sequence[Tensor], size: tuple[int, int]) -> None:
        """Store one image's per-pass maps (C×h×w each, in pass order) for an H×W image."""
        outputs, flip = self._encoded([out[None] for out in outputs], size)
        self._put(index, [out[0] for out in outputs], size, flip)

    def _encoded(self, outputs: Sequence[Tensor], size: tuple[int, int]) -> tuple[list[Tensor], bool]:
        """(maps as stored, whether they still hold separate mirrored passes)."""
        sizes = self.plan.pass_sizes(*size)
        if len(outputs) != len(sizes):
            raise ValueError(f"{len(outputs)} network outputs for a plan of {len(sizes)} passes")
        outputs = [out.to(self.dtype).contiguous() for out in outputs]
        if not (
            self.plan.flip and self.merge_flip and all(w % self.plan.pad_multiple == 0 for _, w in sizes)
        ):
            return outputs, self.plan.flip
        merged = [
            (plain.float() + mirror.float().flip(-1)) / 2
            for plain, mirror in zip(outputs[::2], outputs[1::2])
        ]
        return [out.to(self.dtype) for out in merged], False

    def _put(self, index: int, outputs: Sequence[Tensor], size: tuple[int, int], flip: bool) -> None:
        if index in self._entries:
            raise ValueError(f"probability cache: entry {index} is already stored")
        flat = torch.cat([out.reshape(-1) for out in outputs])
        nbytes = flat.numel() * flat.element_size()
        tier = next(t for t, budget in self._budgets.items() if self._used[t] + nbytes <= budget)
        entry = _Entry(size=tuple(size), shapes=[tuple(out.shape) for out in outputs], tier=tier, flip=flip)
        if tier == "disk":
            entry.offset = self._append(flat)
        elif tier == "host":
            entry.data = self._to_host(flat)
        else:
            entry.data = flat.to(self.device)
        self._used[tier] += nbytes
        self._entries[index] = entry

    def _to_host(self, flat: Tensor) -> Tensor:
        """A host copy, page-locked when it will go back to a CUDA device."""
        if self.device.type != "cuda":
            return flat.cpu()
        return torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True).copy_(flat)

    def _append(self, flat: Tensor) -> int:
        """Append to the file; returns the element offset."""
        if self._file is None:  # appends, so a kept cache reopened by `open` stays valid
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")
            self._file_numel = self._file.tell() // flat.element_size()
        self._file.write(flat.cpu().numpy().tobytes())
        self._map = None  # the file grew: map it again on the next read
        offset, self._file_numel = self._file_numel, self._file_numel + flat.numel()
        return offset

    # ----------------------------------------------------------------- reading
    def outputs(self, index: int) -> list[Tensor]:
        """The stored maps of entry ``index``, on the device, in pass order (cache dtype)."""
        entry = self._entries[index]
        flat = entry.data if entry.data is not None else self._read(entry)
        flat = flat.to(self.device, non_blocking=True)
        parts = torch.split(flat, [math.prod(shape) for shape in entry.shapes])
        return [part.view(shape) for part, shape in zip(parts, entry.shapes)]

    def _read(self, entry: _Entry) -> Tensor:
        """Entry data from the file (through a read-only memory map)."""
        if self._map is None:
            if self._file is not None:
                self._file.flush()
            self._map = np.memmap(self.path, dtype=_NUMPY_DTYPES[self.dtype], mode="r")
        return torch.from_numpy(np.array(self._map[entry.offset : entry.offset + entry.numel]))

    def get(self, index: int) -> Tensor:
        """Probabilities of image ``index`` (C×H×W float32, on the device)."""
        return self.get_batch([index])[0]

    def get_batch(self, indices: Sequence[int]) -> Tensor:
        """Probabilities of equal-size images (N×C×H×W float32, on the device)."""
        kinds = {(self._entries[i].size, self._entries[i].flip) for i in indices}
        if len(kinds) != 1:
            raise ValueError(
                f"probability cache: images of different sizes {sorted(kinds)} cannot form one batch"
            )
        size, flip = kinds.pop()
        per_image = [self.outputs(i) for i in indices]
        stacked = [torch.stack(maps) for maps in zip(*per_image)]
        return combine_outputs(stacked, replace(self.plan, flip=flip), size)

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Free the entries; delete ``folder`` or, with ``keep``, save the cache there."""
        if self.keep:
            self._save()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._map = None
        self._entries.clear()
        if not self.keep:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _save(self) -> None:
        """Move every memory entry to the file and write ``index.json`` beside it."""
        for entry in self._entries.values():
            if entry.data is not None:
                entry.offset, entry.tier, entry.data = self._append(entry.data), "disk", None
        if self._file is not None:
            self._file.flush()
        index = {
            "dtype": str(self.dtype).removeprefix("torch."),
            "plan": asdict(self.plan),
            "entries": {
                str(i): {"size": e.size, "shapes": e.shapes, "offset": e.offset, "flip": e.flip}
                for i, e in self._entries.items()
            },
        }
        io.write_json(self.folder / "index.json", index)

    @classmethod
    def open(cls, folder: str | Path, *, device: torch.device | str = "cpu") -> ProbabilityCache:
        """A cache saved by ``close()`` with ``keep=True``, read from its file (kept on close)."""
        folder = Path(folder)
        try:
            index = json.loads((folder / "index.json").read_text())
        except (OSError, ValueError) as exc:
            raise io.DataError(f"{folder / 'index.json'}: cannot read the cache index ({exc})") from None
        try:
            plan = index["plan"]
            cache = cls(
                folder,
                InferencePlan(plan["long_side"], tuple(plan["scales"]), plan["flip"], plan["pad_multiple"]),
                device=device,
                dtype=getattr(torch, index["dtype"]),
                backend="disk",
                keep=True,
            )
            for key, e in index["entries"].items():
                cache._entries[int(key)] = _Entry(
                    size=tuple(e["size"]),
                    tier="disk",
                    offset=e["offset"],
                    shapes=[tuple(s) for s in e["shapes"]],
                    flip=e["flip"],
                )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise io.DataError(f"{folder / 'index.json'}: not a probability cache index ({exc!r})") from None
        cache._check_length()
        return cache

    def _check_length(self) -> None:
        """A kept cache's file must hold every entry its index lists (a killed copy is shorter)."""
        itemsize = np.dtype(_NUMPY_DTYPES[self.dtype]).itemsize
        needed = max((e.offset + e.numel for e in self._entries.values()), default=0) * itemsize
        size = self.path.stat().st_size if self.path.is_file() else 0
        if size < needed:
            raise io.DataError(
                f"{self.path}: truncated probability cache ({size} of {needed} bytes); rerun with "
                "--resume, which redoes the round's pseudo-label stage"
            )

    def __enter__(self) -> ProbabilityCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ShardedCache:
    """The caches kept by the processes of one pseudo-label pass, read as the whole round's cache.

    Under torchrun process r of N caches every N-th image from r (:func:`cbst.distributed.shard`),
    each under its position in that share. ``get(index)`` (the interface
    :class:`cbst.crst.CrstLoss` reads) finds image ``index`` of the whole dataset in its process's
    cache. Every process may open every cache: they are read, never written.

    Args:
        caches: the kept caches opened by :meth:`ProbabilityCache.open`, in rank order.
    """

    def __init__(self, caches: Sequence[ProbabilityCache]) -> None:
        self.caches = list(caches)

    def __len__(self) -> int:
        return sum(len(cache) for cache in self.caches)

    def get(self, index: int) -> Tensor:
        """Probabilities of image ``index`` (C×H×W float32, on the device)."""
        rank, position = distributed.owner(index, len(self.caches))
        return self.caches[rank].get(position)
