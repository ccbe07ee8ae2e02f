"""MXNet ``.params`` files in pure numpy: the file format only (no network knowledge).

The file is MXNet's binary NDArray list (``mx.nd.save``), little-endian:

- ``uint64`` list magic ``0x112``, ``uint64`` reserved, ``uint64`` number of arrays;
- per array: ``uint32`` magic (V2 ``0xF993FAC9`` or V3 ``0xF993FACA``; V1 ``0xF993FAC8`` and the
  magic-less legacy layout are read too), ``int32`` storage type (0 = dense; sparse is refused),
  shape (``uint32`` ndim then ``int64`` dims; legacy: ``uint32`` dims), context (``int32`` device
  type and id), ``int32`` type flag, then the raw C-order data;
- ``uint64`` number of names, each an ``uint64`` length plus bytes (0 names: an unnamed list).

Named files keep the ``arg:``/``aux:`` prefixes of their keys. ``save_params`` writes the V2 layout
(used by the tests and handy for exporting back to MXNet).
"""

from __future__ import annotations

import errno
import math
import struct
from pathlib import Path

import numpy as np

from cbst.errors import WeightsError
from cbst.io import atomic_path

LIST_MAGIC = 0x112
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA

# MXNet type flags (mshadow) -> numpy dtypes.
DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
    7: np.dtype("?"),
    8: np.dtype("<i2"),
    9: np.dtype("<u2"),
    10: np.dtype("<u4"),
    11: np.dtype("<u8"),
}
MAX_NDIM = 32
"""MXNet's (and numpy's) largest number of dimensions; a larger ndim is a damaged header."""
TYPE_FLAGS: dict[np.dtype, int] = {dt: flag for flag, dt in DTYPES.items()}


class ParamsError(WeightsError):
    """A ``.params`` file is malformed or does not fit the network; the message names the file."""


class _Reader:
    """A cursor over the file's bytes whose errors give the file and the byte offset."""

    def __init__(self, path: Path, data: bytearray) -> None:
        self.path, self.data, self.pos = path, memoryview(data), 0

    def fail(self, what: str, offset: int | None = None) -> ParamsError:
        """An error naming the file and the offset (default: the cursor)."""
        return ParamsError(f"{self.path}: {what} at byte offset {self.pos if offset is None else offset}")

    def take(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes, or a 'truncated' error saying what was being read."""
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated file: {what} needs {n} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        """``struct.unpack`` of the next bytes (little-endian)."""
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def _read_shape(r: _Reader, dim_fmt: str) -> tuple[int, ...]:
    """A TShape: ``uint32`` ndim (``int32`` -1 = unknown) then the dims."""
    (ndim,) = r.unpack("i", "shape ndim")
    if ndim < 0:
        raise r.fail("NDArray with unknown shape (ndim -1) is not supported", r.pos - 4)
    if ndim > MAX_NDIM:
        raise r.fail(f"shape of {ndim} dimensions (at most {MAX_NDIM} exist; damaged file?)", r.pos - 4)
    return tuple(r.unpack(dim_fmt * ndim, "shape dims")) if ndim else ()


def _read_array(r: _Reader) -> np.ndarray:
    """One dense NDArray, in any of MXNet's on-disk versions."""
    start = r.pos
    (magic,) = r.unpack("I", "array magic")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack("i", "storage type")
        if stype != 0:
            kind = {1: "row_sparse", 2: "csr"}.get(stype, f"type {stype}")
            raise r.fail(f"sparse storage ({kind}) is not supported", r.pos - 4)
        shape = _read_shape(r, "q")
        if not shape and magic == V2_MAGIC:
            raise r.fail("empty (none) NDArray is not supported", start)
    elif magic == V1_MAGIC:
        shape = _read_shape(r, "q")
    elif 0 < magic < 32:  # legacy: the first word is the ndim itself, dims are uint32
        shape = tuple(r.unpack("I" * magic, "legacy shape dims"))
    else:
        raise r.fail(f"bad NDArray magic 0x{magic:08X}", start)
    if any(d < 0 for d in shape):
        raise r.fail(f"negative dimension in shape {shape}", start)
    r.unpack("ii", "context")
    (flag,) = r.unpack("i", "type flag")
    if flag not in DTYPES:
        raise r.fail(f"unsupported type flag {flag}", r.pos - 4)
    dtype = DTYPES[flag]
    count = math.prod(shape)  # Python integers: a damaged shape cannot overflow to a small size
    raw = r.take(count * dtype.itemsize, f"data of a {dtype.name} array of shape {shape}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _read_writable(path: Path) -> bytearray:
    """The whole file in one writable buffer, so arrays can view it without a copy."""
    buf = bytearray(path.stat().st_size)
    with open(path, "rb") as fh:
        fh.readinto(buf)
    return buf


def load_params(path: str | Path) -> dict[str, np.ndarray] | list[np.ndarray]:
    """Read an MXNet ``.params`` file: a name->array dict, or a list when the file has no names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "file not found", str(path))
    r = _Reader(path, _read_writable(path))
    magic, _reserved = r.unpack("QQ", "list header")
    if magic != LIST_MAGIC:
        raise r.fail(f"bad list magic 0x{magic:X} (expected 0x{LIST_MAGIC:X}; not an MXNet .params file)", 0)
    (count,) = r.unpack("Q", "array count")
    arrays = [_read_array(r) for _ in range(count)]
    (n_names,) = r.unpack("Q", "name count")
    if n_names not in (0, count):
        raise r.fail(f"{n_names} names for {count} arrays", r.pos - 8)
    names = []
    for _ in range(n_names):
        (length,) = r.unpack("Q", "name length")
        names.append(bytes(r.take(length, "name")).decode("utf-8"))
    if r.pos != len(r.data):
        raise r.fail(f"{len(r.data) - r.pos} unexpected trailing bytes")
    return dict(zip(names, arrays)) if names else arrays


def save_params(path: str | Path, arrays: dict[str, np.ndarray] | list[np.ndarray]) -> None:
    """Write arrays in MXNet's V2 ``.params`` layout (atomically), readable by ``mx.nd.load``."""
    names = list(arrays) if isinstance(arrays, dict) else []
    values = list(arrays.values()) if isinstance(arrays, dict) else list(arrays)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<QQQ", LIST_MAGIC, 0, len(values)))
        for value in values:
            arr = np.asarray(value)
            little = arr.dtype.newbyteorder("<")
            if little not in TYPE_FLAGS:
                raise ValueError(f"{path}: dtype {arr.dtype} cannot be stored in an MXNet .params file")
            fh.write(struct.pack(f"<Iii{arr.ndim}q", V2_MAGIC, 0, arr.ndim, *arr.shape))
            fh.write(struct.pack("<iii", 1, 0, TYPE_FLAGS[little]))  # context cpu(0), type flag
            fh.write(np.ascontiguousarray(arr, dtype=little).data)
        fh.write(struct.pack("<Q", len(names)))
        for name in names:
            encoded = name.encode("utf-8")
            fh.write(struct.pack("<Q", len(encoded)) + encoded)
