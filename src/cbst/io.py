"""File input and output: image and label readers with errors that name the file, atomic writes.

Every reader raises ``DataError`` whose message starts with the offending path, so a bad file is
reported the same way wherever it is found. Every writer goes through a temporary file and
``os.replace``, so a crash never leaves a half-written PNG, JSON or checkpoint behind; the file
ends with the mode the umask gives (0644 under umask 022), as a plain ``open`` would. Output
destinations can be checked before any work (``check_output_file``, ``check_output_dir``); their
``OSError`` subclasses carry the path as ``filename`` and a readable reason as ``strerror``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from cbst.errors import DataError

cv2.setNumThreads(0)  # OpenCV's own pool fights with PyTorch's and with data-loader workers


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    return img


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image header ({exc})") from None


def read_image(path: str | Path) -> np.ndarray:
    """An RGB image as H x W x 3 uint8."""
    img = _open(Path(path))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)


def read_label(path: str | Path) -> np.ndarray:
    """A single-channel label map (mode L, P or I;16) as an H x W integer array of raw ids."""
    path = Path(path)
    img = _open(path)
    if img.mode not in ("L", "P", "I;16", "I"):
        raise DataError(
            f"{path}: expected a single-channel label PNG (mode L, P or I;16), got mode {img.mode}"
        )
    return np.array(img)


def read_png_channel_16bit(path: str | Path, channel: int = 0) -> np.ndarray:
    """Channel ``channel`` (0 = R) of a 16-bit multi-channel PNG, as uint16 (SYNTHIA GT/LABELS).

    Pillow keeps only the high byte of 16-bit RGB PNGs, so OpenCV decodes them here; OpenCV
    stores channels in BGR(A) order, which this function hides.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = np.fromfile(path, dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if arr is None:
        raise DataError(f"{path}: cannot decode PNG (unreadable or truncated file)")
    if arr.ndim == 2:
        raise DataError(f"{path}: expected a multi-channel 16-bit label PNG, got a single channel")
    n = arr.shape[2]
    bgr_index = {0: 2, 1: 1, 2: 0, 3: 3}[channel] if n >= 3 else channel
    if bgr_index >= n:
        raise DataError(f"{path}: has {n} channels, channel {channel} requested")
    return arr[:, :, bgr_index]


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a missing or binary file is a ``DataError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text {what} (byte {exc.start} is not UTF-8)") from None


def read_torch_file(path: str | Path, what: str = "PyTorch weights file") -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only``): no file runs code.

    Torch's own messages for a refused or corrupt file suggest retrying with
    ``weights_only=False``, which would execute whatever the file holds; ours names the file.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise DataError(
                f"{path}: holds pickled Python objects, not only tensors (a whole "
                "pickled model?); cbst reads tensors only, so that no file can run "
                "code: save the model's state_dict instead"
            ) from None
        raise DataError(f"{path}: not a readable {what} (corrupt or another format)") from None
    except Exception:  # torch raises many types (EOFError, IndexError, RuntimeError) for garbage
        raise DataError(f"{path}: not a readable {what} (corrupt or another format)") from None


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (as a file, folder or anything)."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def _check_folder_writable(folder: Path, target: Path) -> None:
    """Raise, naming ``target``, unless ``folder`` exists or can be created and is writable.

    Creates nothing that stays: the nearest existing ancestor must be a folder, and an anonymous
    temporary file is made and dropped there (a permission test that also holds for root on
    read-only or special file systems, unlike ``os.access``).
    """
    base = _existing_ancestor(folder.absolute())
    if not base.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"cannot be created: {base} is a file, not a folder", str(target)
        )
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as exc:
        raise PermissionError(
            errno.EACCES, f"cannot be written: no file can be created in {base} ({exc.strerror})", str(target)
        ) from None


def check_output_file(
    path: str | Path, *, overwrite: bool, option: str = "--out", inputs: tuple[str | Path | None, ...] = ()
) -> None:
    """Check, before any work, that ``path`` can be written as a new file (or replace one).

    Args:
        path: the destination file.
        overwrite: whether an existing file may be replaced; otherwise it is refused.
        option: the command-line flag that named ``path``, for the messages.
        inputs: files the command reads; writing over one of them is always refused.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"is a folder; {option} needs a file name", str(path))
    for source in inputs:
        if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
            raise FileExistsError(
                errno.EEXIST, f"is also an input of this command; give {option} another file name", str(path)
            )
    if path.exists() and not overwrite:
        raise FileExistsError(
            errno.EEXIST,
            f"already exists; pass --overwrite to replace it or give {option} another file name",
            str(path),
        )
    _check_folder_writable(path.parent, path)


def check_output_dir(path: str | Path, option: str = "--output") -> None:
    """Check, before any work, that ``path`` is (or can be created as) a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"is a file; {option} needs a folder", str(path))
    _check_folder_writable(path, path)


def make_dirs(folder: Path) -> None:
    """``mkdir -p``; a path component that is a file is named in a ``NotADirectoryError``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _existing_ancestor(folder)
        if blocker.is_dir():
            raise
        raise NotADirectoryError(
            errno.ENOTDIR, "is a file where a folder is expected", str(blocker)
        ) from None


def _create_temporary(path: Path) -> Path:
    """A new empty file beside ``path``, created with mode 0666 less the umask (as ``open`` does).

    ``tempfile.mkstemp`` would create it 0600, and ``os.replace`` would keep that mode.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot create the file ({exc.strerror})", str(path)) from None
    raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(path))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it into place in one step."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder where a file is to be written", str(path))
    make_dirs(path.parent)
    tmp = _create_temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_png(path: str | Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    """Write a uint8 (or uint16 single-channel) array as PNG, optionally as a palette image."""
    img = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        img.putpalette(palette)  # turns an L image into a P image with the same indices
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """Write a ``.npy`` file atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


class BackgroundWriter:
    """Runs file writes (e.g. PNG encoding, whose zlib time would stall the GPU) on threads.

    At most ``max_pending`` writes wait or run at once: ``submit`` blocks beyond that, so the
    memory held by queued arrays stays bounded. The first failure is re-raised, as an ``OSError``
    naming the file, by the next ``submit`` or by ``close`` (which waits for every write).
    Use it as a context manager; leaving the block closes it.
    """

    def __init__(self, threads: int = 4, max_pending: int = 8) -> None:
        if threads < 1 or max_pending < 1:
            raise ValueError(f"threads and max_pending must be >= 1, got {threads}, {max_pending}")
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cbst-writer")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._error: OSError | None = None

    def submit(self, path: str | Path, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``write(*args, **kwargs)`` in the background; ``path`` names what it writes."""
        self._raise_error()
        self._slots.acquire()
        self._pool.submit(self._run, str(path), write, args, kwargs)

    def _run(self, path: str, write: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        try:
            write(*args, **kwargs)
        except Exception as exc:  # re-raised in the submitting thread, naming the file
            with self._lock:
                if self._error is None:
                    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
                    self._error = OSError(code, f"cannot write ({type(exc).__name__}: {exc})", path)
                    self._error.__cause__ = exc
        finally:
            self._slots.release()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every submitted write; raise the first failure."""
        self._pool.shutdown(wait=True)
        self._raise_error()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # an error is already on its way: finish what runs, drop the queue, keep that error
            self._pool.shutdown(wait=True, cancel_futures=True)
