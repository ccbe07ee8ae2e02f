"""File input and output: image and label readers with errors that name the file, atomic writes.

Every reader raises ``DataError`` whose message starts with the offending path, so a bad file is
reported the same way wherever it is found. Every writer goes through a temporary file and
``os.replace``, so a crash never leaves a half-written PNG, JSON or checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
from PIL import Image

cv2.setNumThreads(0)  # OpenCV's own pool fights with PyTorch's and with data-loader workers


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


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
        raise DataError(f"{path}: expected a single-channel label PNG (mode L, P or I;16), "
                        f"got mode {img.mode}")
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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it into place in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
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
                    self._error = OSError(f"{path}: cannot write ({type(exc).__name__}: {exc})")
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

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # an error is already on its way: finish what runs, drop the queue, keep that error
            self._pool.shutdown(wait=True, cancel_futures=True)
