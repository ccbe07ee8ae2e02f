"""Segmentation datasets read in their own on-disk layouts: GTA5, SYNTHIA, Cityscapes, a user folder.

Every reader checks the data before any training or evaluation starts (docs/method.md §9): missing folders,
unpaired files, image/label size mismatches, unreadable or truncated files and label values
outside the protocol's table all raise ``DataError`` whose message starts with the offending path.
Nothing is ever skipped silently. Samples are sorted by name, so every run sees the same order.

The readers ``gta5``, ``synthia`` and ``cityscapes`` take the root (and Cityscapes its split), then
the same keyword-only options in the same order: ``protocol``, ``list_file``, ``with_labels``,
``verify``; ``build_dataset`` picks one by name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from tqdm import tqdm

from . import distributed
from .io import DataError, image_size, read_image, read_label, read_png_channel_16bit, read_text
from .labels import (
    CITYSCAPES_19,
    SYNTHIA_16,
    Protocol,
    dataset_protocols,
    folder_protocol,
    protocol_for,
    read_folder_config,
)
from .registry import DATASETS

VERIFY_MODES = ("auto", "full", "headers")
FULL_VERIFY_MAX_SAMPLES = 600
"""With ``verify="auto"``, datasets up to this size get every file fully decoded at construction."""
PROGRESS_MIN_FILES = 50
_SHOW_PROGRESS: ContextVar[bool] = ContextVar("show_progress", default=True)
"""Whether datasets built now show their checks' progress bars: set by ``build_dataset``, so a
reader (a user's too) needs no option of its own for it."""
LABEL_FORMATS = ("plain", "synthia16bit")

CS_IMAGE_SUFFIX = "_leftImg8bit.png"
CS_LABEL_SUFFIX = "_gtFine_labelIds.png"


@dataclass(frozen=True)
class Sample:
    """One image, its raw label file (or ``None``) and the stem used for its output files."""

    image: Path
    label: Path | None
    name: str


class SegmentationDataset(torch.utils.data.Dataset):
    """Images as H x W x 3 uint8 RGB and labels as H x W uint8 trainIds (255 = ignore)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        protocol: Protocol,
        *,
        label_format: str = "plain",
        transform: Callable[[dict], dict] | None = None,
        check_values: bool = True,
    ) -> None:
        if label_format not in LABEL_FORMATS:
            raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
        self.samples: list[Sample] = list(samples)
        self.protocol = protocol
        self.label_format = label_format
        self.transform = transform
        self.check_values = check_values
        self.show_progress = _SHOW_PROGRESS.get()  # for its checks and those of its copies
        self._known = _known_mask(protocol)
        _check_unique_names(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = range(len(self.samples))[i]
        image, label = self._load(self.samples[index], self.check_values)
        item = {"image": image, "label": label, "name": self.samples[index].name, "index": index}
        return self.transform(item) if self.transform is not None else item

    def with_transform(self, transform: Callable[[dict], dict] | None) -> SegmentationDataset:
        """A shallow copy serving the same files through another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def with_labels(self, label_dir: str | Path, suffix: str = ".png") -> SegmentationDataset:
        """The same images with labels ``label_dir/<name><suffix>`` (pseudo-labels), header-checked."""
        label_dir = Path(label_dir)
        if not label_dir.is_dir():
            raise DataError(f"{label_dir}: label folder not found")
        other = copy.copy(self)
        other.samples = [replace(s, label=label_dir / f"{s.name}{suffix}") for s in self.samples]
        other.label_format = "plain"
        other.verify(full=False)
        return other

    def without_labels(self) -> SegmentationDataset:
        """The same images with no labels, so that loading an item decodes only its image."""
        other = copy.copy(self)
        other.samples = [replace(s, label=None) for s in self.samples]
        return other

    def subset(self, indices: Sequence[int]) -> SegmentationDataset:
        """A copy holding only ``samples[i]`` for each of ``indices``, in that order."""
        other = copy.copy(self)
        other.samples = [self.samples[i] for i in indices]
        _check_unique_names(other.samples)
        return other

    def verify(self, full: bool = True) -> None:
        """Check every file: existence, headers and sizes; with ``full``, decode pixels and label values."""
        files = sum(1 + (s.label is not None) for s in self.samples)
        bar = tqdm(
            self.samples,
            desc="verifying" + (" (full decode)" if full else " (headers)"),
            unit="sample",
            disable=not (self.show_progress and distributed.is_main()) or files <= PROGRESS_MIN_FILES,
            leave=False,
        )
        for sample in bar:
            _check_headers(sample)
            if full:
                self._load(sample, check_values=True)

    def label(self, i: int) -> np.ndarray | None:
        """TrainId label of sample ``i`` without decoding its image (None when unlabelled)."""
        sample = self.samples[i]
        if sample.label is None:
            return None
        raw = _decode(self._read_raw_label, sample.label)
        if self.check_values:
            self._check_raw(raw, sample.label)
        return self.protocol.encode(raw)

    def _load(self, sample: Sample, check_values: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Decode one sample; every failure becomes a ``DataError`` naming the file."""
        image = _decode(read_image, sample.image)
        if sample.label is None:
            return image, None
        raw = _decode(self._read_raw_label, sample.label)
        if raw.shape != image.shape[:2]:
            raise DataError(
                f"{sample.label}: label is {raw.shape[1]}x{raw.shape[0]} (WxH) but image "
                f"{sample.image} is {image.shape[1]}x{image.shape[0]}"
            )
        if check_values:
            self._check_raw(raw, sample.label)
        return image, self.protocol.encode(raw)

    def _read_raw_label(self, path: Path) -> np.ndarray:
        """Raw label ids of ``path`` in this dataset's label format."""
        if self.label_format == "synthia16bit":
            return read_png_channel_16bit(path, 0)
        return read_label(path)

    def _check_raw(self, raw: np.ndarray, path: Path) -> None:
        """Raise ``DataError`` if ``raw`` holds ids outside the protocol's table (fast path for uint8/16)."""
        if raw.dtype in (np.uint8, np.uint16) and self._known[raw].all():
            return
        try:
            self.protocol.check_values(raw, path)
        except ValueError as exc:
            raise DataError(str(exc)) from None


def _known_mask(protocol: Protocol) -> np.ndarray:
    """A 65536-entry table, True at every raw id the protocol defines."""
    mask = np.zeros(1 << 16, dtype=bool)
    mask[[v for v in protocol.known_raw_ids if 0 <= v < 1 << 16]] = True
    return mask


def _decode(reader: Callable[[Path], np.ndarray], path: Path) -> np.ndarray:
    """Run ``reader(path)``, turning any failure into a ``DataError`` that names ``path``."""
    try:
        return reader(path)
    except DataError:
        raise
    except Exception as exc:  # a worker's traceback must name the file, whatever the decoder raised
        raise DataError(f"{path}: cannot decode ({type(exc).__name__}: {exc})") from exc


def _check_headers(sample: Sample) -> None:
    """Both files exist and have readable headers of the same size (no pixels decoded)."""
    size = image_size(sample.image)
    if sample.label is None:
        return
    if not sample.label.is_file():
        raise DataError(f"{sample.label}: label file not found (for image {sample.image})")
    label_size = image_size(sample.label)
    if label_size != size:
        raise DataError(
            f"{sample.label}: label is {label_size[0]}x{label_size[1]} (WxH) but image "
            f"{sample.image} is {size[0]}x{size[1]}"
        )


def _check_unique_names(samples: Sequence[Sample]) -> None:
    """Output files are keyed by name, so two samples may not share one."""
    seen: dict[str, Path] = {}
    for s in samples:
        if s.name in seen:
            raise DataError(f"{s.image}: sample name {s.name!r} is also used by {seen[s.name]}")
        seen[s.name] = s.image


def _finish(
    samples: list[Sample], protocol: Protocol, verify: str, label_format: str = "plain"
) -> SegmentationDataset:
    """Sort, build and check a dataset as ``verify`` asks ("auto", "full" or "headers")."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    dataset = SegmentationDataset(sorted(samples, key=lambda s: s.name), protocol, label_format=label_format)
    full = verify == "full" or (verify == "auto" and len(dataset) <= FULL_VERIFY_MAX_SAMPLES)
    dataset.verify(full=full)
    return dataset


def _require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a folder, else a ``DataError`` saying which folder is missing."""
    if not path.is_dir():
        raise DataError(f"{path}: {what} not found")
    return path


def _strip(name: str, suffix: str) -> str:
    """``name`` without ``suffix`` (which it must end with)."""
    return name[: len(name) - len(suffix)]


def _scan(folder: Path, suffix: str, recursive: bool = False) -> dict[str, Path]:
    """Files ``*suffix`` in ``folder`` keyed by file name minus ``suffix``; empty folder is an error."""
    pattern = f"*{suffix}"
    found = sorted(
        p for p in (folder.rglob(pattern) if recursive else folder.glob(pattern)) if not p.is_dir()
    )
    for path in found:
        if not path.is_file():  # a dangling symbolic link or a special file: not silently skipped
            what = "a symbolic link to a missing file" if path.is_symlink() else "not a regular file"
            raise DataError(f"{path}: {what}; fix or remove it")
    if not found:
        raise DataError(f"{folder}: no files matching {pattern!r} found (empty split or wrong folder)")
    files: dict[str, Path] = {}
    for path in found:
        key = _strip(path.name, suffix)
        if key in files:
            raise DataError(f"{path}: name {key!r} is also used by {files[key]}")
        files[key] = path
    return files


def _pair(
    images: dict[str, Path],
    labels: dict[str, Path],
    expected_label: Callable[[str], Path],
    expected_image: Callable[[str], Path],
) -> list[Sample]:
    """Pair images and labels by name; an image without label, or label without image, is an error."""
    for name, image in images.items():
        if name not in labels:
            raise DataError(f"{expected_label(name)}: label file not found (for image {image})")
    for name, label in labels.items():
        if name not in images:
            raise DataError(f"{expected_image(name)}: image not found (for label {label})")
    return [Sample(images[n], labels[n], n) for n in images]


# ----------------------------------------------------------------------------------- list files


def _list_entries(path: Path) -> list[tuple[int, str, str | None]]:
    """(line number, image field, label field or None) of each entry of a list file."""
    entries = []
    for lineno, line in enumerate(read_text(path, "list file").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split("\t") if "\t" in text else text.split()
        fields = [f.strip() for f in fields if f.strip()]
        if len(fields) > 2:
            raise DataError(
                f"{path}:{lineno}: expected '<image path>' or '<image path>\\t<label path>', "
                f"got {len(fields)} fields: {text!r}"
            )
        entries.append((lineno, fields[0], fields[1] if len(fields) == 2 else None))
    if not entries:
        raise DataError(f"{path}: list file has no entries")
    return entries


def _listed_file(list_path: Path, lineno: int, root: Path, rel: str, what: str) -> Path:
    """``root/rel``, or a ``DataError`` naming the list file and line if it does not exist."""
    full = root / rel
    if not full.is_file():
        raise DataError(f"{list_path}:{lineno}: {what} {full} not found")
    return full


def read_list_file(path: str | Path, root: str | Path) -> list[tuple[Path, Path | None]]:
    """Entries of an original-format list file (``img[\\tlabel]`` relative to ``root``), all checked to exist."""
    path, root = Path(path), Path(root)
    return [
        (
            _listed_file(path, n, root, img, "image"),
            None if lab is None else _listed_file(path, n, root, lab, "label"),
        )
        for n, img, lab in _list_entries(path)
    ]


def _from_list(
    list_file: str | Path,
    root: Path,
    name_of: Callable[[Path], str],
    default_label: Callable[[Path], Path] | None,
    use_list_labels: bool = True,
) -> list[Sample]:
    """Samples selected by a list file; a line's label is used if given, else ``default_label(image)``.

    ``default_label`` is ``None`` for unlabelled use, when the label column is ignored.
    """
    list_path = Path(list_file)
    samples = []
    for lineno, img_rel, lab_rel in _list_entries(list_path):
        image = _listed_file(list_path, lineno, root, img_rel, "image")
        name = name_of(image)
        label = None
        if default_label is not None:
            if use_list_labels and lab_rel is not None:
                label = _listed_file(list_path, lineno, root, lab_rel, "label")
            else:
                label = default_label(image)
        samples.append(Sample(image, label, name))
    return samples


# ------------------------------------------------------------------------------------- readers


def _flat_samples(
    root: Path,
    images_rel: str,
    labels_rel: str,
    what: str,
    with_labels: bool,
    list_file: str | Path | None,
    use_list_labels: bool = True,
) -> list[Sample]:
    """Samples of a flat ``images_rel/<name>.png`` + ``labels_rel/<name>.png`` layout (GTA5, SYNTHIA)."""
    root = _require_dir(root, f"{what} root")
    images_dir = _require_dir(root / images_rel, f"{what} image folder")
    labels_dir = root / labels_rel
    if with_labels:
        _require_dir(labels_dir, f"{what} label folder")
    if list_file is not None:
        return _from_list(
            list_file,
            root,
            lambda p: p.stem,
            (lambda p: labels_dir / p.name) if with_labels else None,
            use_list_labels,
        )
    images = _scan(images_dir, ".png")
    if not with_labels:
        return [Sample(p, None, n) for n, p in images.items()]
    return _pair(
        images,
        _scan(labels_dir, ".png"),
        lambda n: labels_dir / f"{n}.png",
        lambda n: images_dir / f"{n}.png",
    )


def gta5(
    root: str | Path,
    split: str = "train",
    *,
    protocol: Protocol = CITYSCAPES_19,
    list_file: str | Path | None = None,
    with_labels: bool = True,
    verify: str = "auto",
) -> SegmentationDataset:
    """GTA5 as shipped: ``images/NNNNN.png`` + palette ``labels/NNNNN.png`` holding Cityscapes labelIds.

    GTA5 has no splits: every image, or those of ``list_file`` (``split`` is not used).
    """
    samples = _flat_samples(Path(root), "images", "labels", "GTA5", with_labels, list_file)
    return _finish(samples, protocol, verify)


def synthia(
    root: str | Path,
    split: str = "train",
    *,
    protocol: Protocol = SYNTHIA_16,
    list_file: str | Path | None = None,
    with_labels: bool = True,
    verify: str = "auto",
) -> SegmentationDataset:
    """SYNTHIA-RAND-CITYSCAPES as shipped: ``RGB/NNNNNNN.png`` + 16-bit ``GT/LABELS`` (class id in R).

    A list file selects images; its label column (the original's 8-bit ``GT/labels`` conversions)
    is not used, because labels are always read from the 16-bit originals. No splits (``split`` is
    not used).
    """
    samples = _flat_samples(
        Path(root), "RGB", "GT/LABELS", "SYNTHIA", with_labels, list_file, use_list_labels=False
    )
    return _finish(samples, protocol, verify, label_format="synthia16bit")


def _cityscapes_name(image: Path) -> str:
    """``aachen_000000_000019`` from ``aachen_000000_000019_leftImg8bit.png``."""
    if not image.name.endswith(CS_IMAGE_SUFFIX):
        raise DataError(f"{image}: not a Cityscapes image name (expected *{CS_IMAGE_SUFFIX})")
    return _strip(image.name, CS_IMAGE_SUFFIX)


def _cityscapes_label_of(image: Path) -> Path:
    """``ROOT/gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` for a ``leftImg8bit`` image path."""
    split_dir = image.parent.parent
    return (
        split_dir.parent.parent
        / "gtFine"
        / split_dir.name
        / image.parent.name
        / f"{_cityscapes_name(image)}{CS_LABEL_SUFFIX}"
    )


def cityscapes(
    root: str | Path,
    split: str,
    *,
    protocol: Protocol = CITYSCAPES_19,
    list_file: str | Path | None = None,
    with_labels: bool = True,
    verify: str = "auto",
) -> SegmentationDataset:
    """Cityscapes ``leftImg8bit/<split>/<city>/*`` with ``gtFine/<split>/<city>/*_gtFine_labelIds.png``.

    With ``list_file``, the list's paths (which name their own split) select the images; a line
    without a label column gets the labelIds file beside the image's ``gtFine`` counterpart.
    """
    root = _require_dir(Path(root), "Cityscapes root")
    if list_file is not None:
        samples = _from_list(list_file, root, _cityscapes_name, _cityscapes_label_of if with_labels else None)
        return _finish(samples, protocol, verify)
    images_dir = _require_dir(root / "leftImg8bit" / split, f"Cityscapes image folder of split {split!r}")
    images = _scan(images_dir, CS_IMAGE_SUFFIX, recursive=True)
    if not with_labels:
        return _finish([Sample(p, None, n) for n, p in images.items()], protocol, verify)
    labels_dir = _require_dir(root / "gtFine" / split, f"Cityscapes label folder of split {split!r}")
    labels = _scan(labels_dir, CS_LABEL_SUFFIX, recursive=True)
    samples = _pair(
        images,
        labels,
        lambda n: labels_dir / images[n].parent.name / f"{n}{CS_LABEL_SUFFIX}",
        lambda n: images_dir / labels[n].parent.name / f"{n}{CS_IMAGE_SUFFIX}",
    )
    return _finish(samples, protocol, verify)


# ------------------------------------------------------------------------------- folder dataset


def folder(
    root: str | Path,
    config: str | Path = "dataset.yaml",
    verify: str = "auto",
    *,
    split: str = "train",
    list_file: str | Path | None = None,
    with_labels: bool = True,
    num_classes: int | None = None,
) -> SegmentationDataset:
    """A user's own data described by a YAML file (relative to ``root`` unless absolute).

    Its classes are the YAML's; ``num_classes``, when given, must be their number. No splits:
    every image, or those of ``list_file`` (``split`` is not used).

    Keys: ``images`` and ``labels`` (folders relative to ``root``; labels optional),
    ``image_suffix`` / ``label_suffix`` (default ``.png``; the rest of the file name is the sample
    name), ``classes`` (list of ``{name, value}`` in trainId order, optional ``color``),
    ``ignore_values`` (raw values that are ignored), ``name`` (the protocol's name). Images are found
    recursively; a label lies at the same relative place under ``labels``.
    """
    root = _require_dir(Path(root), "dataset root")
    config = root / config
    cfg = read_folder_config(config)
    protocol = folder_protocol(config, cfg)
    if num_classes is not None and protocol.num_classes != num_classes:
        raise DataError(
            f"{config}: defines {protocol.num_classes} classes but num_classes={num_classes} was requested"
        )
    image_suffix = str(cfg.get("image_suffix", ".png"))
    label_suffix = str(cfg.get("label_suffix", ".png"))
    images_dir = _require_dir(root / str(cfg["images"]), "image folder")
    labelled = with_labels and cfg.get("labels") is not None
    labels_dir = _require_dir(root / str(cfg["labels"]), "label folder") if labelled else None

    def name_of(image: Path) -> str:
        if not image.name.endswith(image_suffix):
            raise DataError(f"{image}: image name does not end with image_suffix {image_suffix!r}")
        return _strip(image.name, image_suffix)

    def label_of(image: Path) -> Path:
        if not image.is_relative_to(images_dir):
            raise DataError(f"{image}: not under {images_dir}; give its label path in the list file")
        return labels_dir / image.parent.relative_to(images_dir) / f"{name_of(image)}{label_suffix}"

    if list_file is not None:
        samples = _from_list(list_file, root, name_of, label_of if labelled else None)
        return _finish(samples, protocol, verify)
    images = _scan(images_dir, image_suffix, recursive=True)
    if labelled:
        labels = _scan(labels_dir, label_suffix, recursive=True)
        samples = _pair(
            images,
            labels,
            lambda n: label_of(images[n]),
            lambda n: images_dir / labels[n].parent.relative_to(labels_dir) / f"{n}{image_suffix}",
        )
    else:
        samples = [Sample(p, None, n) for n, p in images.items()]
    return _finish(samples, protocol, verify)


def build_dataset(
    name: str,
    root: str | Path,
    *,
    split: str = "train",
    num_classes: int | None = None,
    list_file: str | Path | None = None,
    with_labels: bool = True,
    verify: str = "auto",
    progress: bool = True,
) -> SegmentationDataset:
    """The dataset registered as ``name`` in :data:`cbst.registry.DATASETS` ("gta5", "synthia",
    "cityscapes", "folder", or a user's), its labels read in ``num_classes`` classes (None: the
    dataset's own default); ``progress`` False hides the bars of its file checks.

    A layout with a ``protocols`` table is read with the table's protocol for ``num_classes``
    (``protocol=``); one whose files define its classes is given ``num_classes=`` to check.
    """
    reader = DATASETS.get(name)
    options: dict[str, Any] = dict(split=split, list_file=list_file, with_labels=with_labels, verify=verify)
    if dataset_protocols(name) is None:
        options["num_classes"] = num_classes
    else:
        options["protocol"] = protocol_for(name, num_classes)
    shown = _SHOW_PROGRESS.set(progress)
    try:
        return reader(root, **options)
    finally:
        _SHOW_PROGRESS.reset(shown)
