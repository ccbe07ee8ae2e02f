"""The data set on disk: GTA5 and Cityscapes layouts, resumable rendering, class-frequency summary."""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from cbst.config import default_num_workers
from cbst.errors import CbstError, ConfigError
from cbst.io import write_json, write_png, write_text
from cbst.labels import CITYSCAPES_19, IGNORE_INDEX, Protocol, cityscapes_palette
from cbst.synthetic.render import (
    DOMAIN_SOURCE,
    DOMAIN_TARGET_TRAIN,
    DOMAIN_TARGET_VAL,
    SYNTHETIC_VERSION,
    render_image,
)

TRAIN_CITIES: tuple[str, ...] = ("synthtown", "pixelburg")
VAL_CITIES: tuple[str, ...] = ("renderdorf",)
CITY_FRAME = 19  # Cityscapes annotates the 20th frame of each snippet: <city>_<seq>_000019
SUMMARY_NAME = "synthetic.json"
PNG_LEVEL = 1
"""zlib level of the RGB images: about 4x faster to encode than level 6, for the same pixels."""


class SyntheticExistsError(CbstError, ValueError):
    """The output folder holds something other than this exact synthetic benchmark."""


def _target_rel(split: str, index: int) -> tuple[str, str]:
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    city = cities[index % len(cities)]
    stem = f"{city}_{index // len(cities):06d}_{CITY_FRAME:06d}"
    return (
        f"cityscapes/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png",
        f"cityscapes/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png",
    )


def _source_rel(index: int) -> tuple[str, str]:
    return f"gta5/images/{index + 1:05d}.png", f"gta5/labels/{index + 1:05d}.png"


def _freqs_from_counts(counts: np.ndarray, protocol: Protocol) -> dict[str, float]:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    train_ids = protocol.lut[np.arange(len(counts))]
    out = {}
    for c, name in enumerate(protocol.class_names):
        out[name] = float(counts[train_ids == c].sum() / total) if total else 0.0
    out["ignore"] = float(counts[train_ids == IGNORE_INDEX].sum() / total) if total else 0.0
    return out


def class_frequencies(label_paths: Iterable[Path], protocol: Protocol = CITYSCAPES_19) -> dict[str, float]:
    """Fraction of all pixels (labelled and ignored) per class name, plus ``"ignore"``.

    The label files hold raw ids (labelIds for Cityscapes/GTA5/synthetic data).
    """
    counts = np.zeros(256, dtype=np.int64)
    for path in label_paths:
        raw = np.asarray(Image.open(path))
        counts += np.bincount(raw.ravel().astype(np.int64).clip(0, 255), minlength=256)[:256]
    return _freqs_from_counts(counts, protocol)


def _params(seed: int, num_source: int, num_train: int, num_val: int, size: tuple[int, int]) -> dict:
    return {
        "generator": "cbst.synthetic",
        "version": SYNTHETIC_VERSION,
        "seed": int(seed),
        "size": [int(size[0]), int(size[1])],
        "counts": {"source": int(num_source), "train": int(num_train), "val": int(num_val)},
    }


def _all_paths(params: dict) -> list[str]:
    c = params["counts"]
    paths = [p for i in range(c["source"]) for p in _source_rel(i)]
    for split in ("train", "val"):
        paths += [p for i in range(c[split]) for p in _target_rel(split, i)]
    return paths


def _render_pool() -> ProcessPoolExecutor | None:
    """Forked worker processes for the usable cores (at most 4) on Linux; None elsewhere or on
    one core (the images are then drawn in this process).

    Every image has its own random stream, so drawing them in parallel changes no pixel, and
    the drawing is Python-bound, so threads would share one core. Workers are forked: a fresh
    interpreter (spawn, forkserver) would re-run a calling script's unguarded top level. They
    run NumPy, OpenCV and zlib only, never torch.
    """
    workers = default_num_workers(limit=4)
    if workers == 1 or sys.platform != "linux":
        return None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


Job = tuple[int, int, tuple[str, str], str]
"""One image to draw: (domain, index, (image path, label path) in the layout, summary key)."""


def _draw_pair(
    out: Path, seed: int, size: tuple[int, int], palette: list[int], job: Job
) -> tuple[str, np.ndarray]:
    """Render and write one image and its label; returns its domain key and label histogram."""
    domain, i, (img_rel, lab_rel), key = job
    image, label = render_image(seed, domain, i, size)
    write_png(out / img_rel, image, compress_level=PNG_LEVEL)
    write_png(out / lab_rel, label, palette=palette if domain == DOMAIN_SOURCE else None)
    return key, np.bincount(label.ravel(), minlength=256)


def make_synthetic(
    out: str | Path,
    seed: int = 0,
    *,
    num_source: int = 400,
    num_train: int = 200,
    num_val: int = 100,
    size: tuple[int, int] = (256, 128),
    progress: bool = True,
) -> dict:
    """Render the synthetic benchmark into ``out``; returns the summary written to synthetic.json.

    Refuses (``SyntheticExistsError``) to write into a non-empty folder that is not a synthetic
    benchmark of the same version, seed and parameters; returns the stored summary without
    rendering if such a benchmark is already complete there; finishes an interrupted one.
    """
    out = Path(out)
    width, height = int(size[0]), int(size[1])
    if width < 32 or height < 16:
        raise ConfigError(f"size must be at least 32x16, got {width}x{height}")
    for name, n in (("num_source", num_source), ("num_train", num_train), ("num_val", num_val)):
        if n < 0:
            raise ConfigError(f"{name} must be >= 0, got {n}")
    params = _params(seed, num_source, num_train, num_val, (width, height))
    summary_path = out / SUMMARY_NAME
    if out.exists() and not out.is_dir():
        raise SyntheticExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not summary_path.is_file():
            raise SyntheticExistsError(
                f"{out}: folder is not empty and holds no {SUMMARY_NAME}; refusing to write a "
                f"synthetic benchmark into it (choose an empty or new folder)"
            )
        try:
            old = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            raise SyntheticExistsError(f"{summary_path}: unreadable ({exc}); refusing to overwrite") from None
        old_params = {k: old.get(k) for k in params}
        if old_params != params:
            diff = ", ".join(
                f"{k}: {old_params[k]!r} there, {params[k]!r} requested"
                for k in params
                if old_params[k] != params[k]
            )
            raise SyntheticExistsError(
                f"{out}: holds a different synthetic benchmark ({diff}); use another folder or "
                f"delete this one"
            )
        if old.get("complete") and all((out / p).is_file() for p in _all_paths(params)):
            if progress:
                print(
                    f"{out}: synthetic benchmark v{SYNTHETIC_VERSION} (seed {seed}) already complete; "
                    "nothing to do",
                    file=sys.stderr,
                )
            return old
    out.mkdir(parents=True, exist_ok=True)
    write_json(summary_path, {**params, "complete": False})
    write_text(out / "VERSION", f"cbst-synthetic {SYNTHETIC_VERSION}\n")

    palette = cityscapes_palette()
    start = time.perf_counter()
    jobs = [(DOMAIN_SOURCE, i, _source_rel(i), "source") for i in range(num_source)]
    jobs += [(DOMAIN_TARGET_TRAIN, i, _target_rel("train", i), "target_train") for i in range(num_train)]
    jobs += [(DOMAIN_TARGET_VAL, i, _target_rel("val", i), "target_val") for i in range(num_val)]
    counts = {k: np.zeros(256, dtype=np.int64) for k in ("source", "target_train", "target_val")}

    draw = partial(_draw_pair, out, seed, (width, height), palette)
    pool = _render_pool()
    try:
        pairs = pool.map(draw, jobs, chunksize=8) if pool else map(draw, jobs)
        for n, (key, hist) in enumerate(pairs, 1):
            counts[key] += hist
            if progress and (n % 50 == 0 or n == len(jobs)):
                print(
                    f"  rendered {n}/{len(jobs)} images ({time.perf_counter() - start:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - start
    summary = {
        **params,
        "complete": True,
        "domains": {
            "source": {"name": "game", "layout": "gta5", "root": "gta5", "images": num_source},
            "target": {
                "name": "camera",
                "layout": "cityscapes",
                "root": "cityscapes",
                "splits": {"train": num_train, "val": num_val},
                "cities": {"train": list(TRAIN_CITIES), "val": list(VAL_CITIES)},
            },
        },
        "render_seconds": round(seconds, 2),
        "class_frequencies": {k: _freqs_from_counts(v, CITYSCAPES_19) for k, v in counts.items()},
    }
    write_json(summary_path, summary)
    return summary


def frequency_table(summary: dict) -> str:
    """A plain-text table of the per-class pixel frequencies (%) of every domain in ``summary``."""
    freqs = summary["class_frequencies"]
    keys = list(freqs)
    names = list(CITYSCAPES_19.class_names) + ["ignore"]
    head = f"{'class':<14}" + "".join(f"{k:>14}" for k in keys)
    rows = [head, "-" * len(head)]
    for name in names:
        rows.append(f"{name:<14}" + "".join(f"{100 * freqs[k].get(name, 0.0):>13.3f}%" for k in keys))
    return "\n".join(rows)
