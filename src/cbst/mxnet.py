"""MXNet ``.params`` files in pure numpy, and their mapping onto the ResNet-38 module names.

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

import re
import struct
from pathlib import Path

import numpy as np
import torch

from cbst.io import atomic_path

LIST_MAGIC = 0x112
V1_MAGIC, V2_MAGIC, V3_MAGIC = 0xF993FAC8, 0xF993FAC9, 0xF993FACA

# MXNet type flags (mshadow) -> numpy dtypes.
DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"),
    4: np.dtype("<i4"), 5: np.dtype("i1"), 6: np.dtype("<i8"), 7: np.dtype("?"),
    8: np.dtype("<i2"), 9: np.dtype("<u2"), 10: np.dtype("<u4"), 11: np.dtype("<u8"),
}
TYPE_FLAGS: dict[np.dtype, int] = {dt: flag for flag, dt in DTYPES.items()}


class ParamsError(ValueError):
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
        chunk = self.data[self.pos:self.pos + n]
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
    count = int(np.prod(shape, dtype=np.int64))
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
        raise FileNotFoundError(f"{path}: file not found")
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


# --------------------------------------------------------------------------- ResNet-38 names

_SUFFIXES = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
             "moving_mean": "running_mean", "moving_var": "running_var"}
_NAME = re.compile(r"^(?P<module>.+?)_(?P<suffix>moving_mean|moving_var|weight|bias|gamma|beta)$")
_IMAGENET_CLASSIFIER = "linear1000"


def mxnet_to_torch_name(name: str, num_classes: int) -> str | None:
    """``arg:res2a_branch2a_weight`` -> ``res2a_branch2a.weight``; ``linear{C}`` -> ``classifier``."""
    bare = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    match = _NAME.match(bare)
    if match is None:
        return None
    module = "classifier" if match["module"] == f"linear{num_classes}" else match["module"]
    return f"{module}.{_SUFFIXES[match['suffix']]}"


def torch_to_mxnet_name(key: str, num_classes: int) -> str:
    """``bn2a_branch2a.running_mean`` -> ``aux:bn2a_branch2a_moving_mean`` (inverse of the above)."""
    module, attr = key.rsplit(".", 1)
    module = f"linear{num_classes}" if module == "classifier" else module
    if attr.startswith("running_"):
        return f"aux:{module}_moving_{attr[len('running_'):]}"
    if module.startswith("bn"):
        attr = {"weight": "gamma", "bias": "beta"}[attr]
    return f"arg:{module}_{attr}"


def _he_normal(shape: torch.Size) -> torch.Tensor:
    """MXNet's Xavier(gaussian, in, 2) initialiser: N(0, sqrt(2 / fan_in))."""
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape) * (2.0 / fan_in) ** 0.5


def resnet38_state_dict_from_params(params: dict[str, np.ndarray], num_classes: int, *,
                                    imagenet: bool = False, source: str = "params") -> dict[str, torch.Tensor]:
    """Map a ResNet-38 A1 ``.params`` dict onto ``ResNet38`` state_dict keys, strictly.

    With ``imagenet=True`` the input is the stride-32 ImageNet classifier: ``linear1000_*`` is
    dropped and the missing ``conv6a`` and ``classifier`` get He-normal weights and zero biases
    (spec §4.1). Any missing, unexpected or mis-shaped name raises ``ParamsError`` listing them.
    BN gammas are copied as stored; the model ignores them (MXNet ``fix_gamma=True``).
    """
    from cbst.models.resnet38 import ResNet38

    with torch.device("meta"):
        full = ResNet38(num_classes).state_dict()
    template = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    fresh = {k for k in template if k.startswith(("conv6a.", "classifier."))} if imagenet else set()
    state: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for name, array in params.items():
        key = mxnet_to_torch_name(name, num_classes)
        if imagenet and key is not None and key.startswith(_IMAGENET_CLASSIFIER + "."):
            continue
        if key is None or key not in template or key in fresh:
            unexpected.append(name)
        elif tuple(array.shape) != tuple(template[key].shape):
            mismatched.append(f"{name} (got {tuple(array.shape)}, expected {tuple(template[key].shape)})")
        else:
            state[key] = torch.from_numpy(np.require(array, np.float32, ["C", "W"]))
    missing = [torch_to_mxnet_name(k, num_classes) for k in template if k not in state and k not in fresh]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(items)}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if items]
        kind = "ImageNet ResNet-38 A1" if imagenet else f"ResNet-38 A1 with {num_classes} classes"
        raise ParamsError(f"{source}: does not fit {kind}; " + "; ".join(parts))
    for key in sorted(fresh):
        shape = template[key].shape
        state[key] = _he_normal(shape) if key.endswith(".weight") else torch.zeros(shape)
    for key in full.keys() - template.keys():
        state[key] = torch.tensor(0, dtype=torch.long)
    return state
