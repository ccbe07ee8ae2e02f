"""Label protocols: raw dataset ids <-> training ids, class names and colours.

One source of truth for every table the package uses. The Cityscapes tables are derived from the
official ``cityscapesscripts`` label list; the SYNTHIA-RAND-CITYSCAPES table has no official
Python source and is written out here (docs/method.md §9.2). Inverse maps are built explicitly in trainId
order, never by iterating a dict (the original's Python-3 bug, docs/method.md §12.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

from cbst.errors import ConfigError, DataError
from cbst.io import read_text
from cbst.registry import DATASETS

IGNORE_INDEX = 255
"""TrainId of pixels that carry no label (loss and metrics skip them)."""

PSEUDO_IGNORE_RAW_ID = 0
"""Raw id written for unselected pixels in pseudo-label PNGs (Cityscapes 'unlabeled')."""

# Column headers of the original README's result tables, keyed by Cityscapes class name.
TABLE_HEADERS: dict[str, str] = {
    "road": "Road",
    "sidewalk": "Sidewalk",
    "building": "Build",
    "wall": "Wall",
    "fence": "Fence",
    "pole": "Pole",
    "traffic light": "Traffic Light",
    "traffic sign": "Traffic Sign",
    "vegetation": "Veg.",
    "terrain": "Terrain",
    "sky": "Sky",
    "person": "Person",
    "rider": "Rider",
    "car": "Car",
    "truck": "Truck",
    "bus": "Bus",
    "train": "Train",
    "motorcycle": "Motor",
    "bicycle": "Bike",
}

# The 16 classes shared by SYNTHIA and Cityscapes, in trainId order (docs/method.md §9.2).
CLASSES_16: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "sky",
    "person",
    "rider",
    "car",
    "bus",
    "motorcycle",
    "bicycle",
)
# The common 13-class subset (mIoU*): the 16 classes without wall, fence and pole (docs/method.md §8.3).
CLASSES_13: tuple[str, ...] = tuple(c for c in CLASSES_16 if c not in ("wall", "fence", "pole"))

# SYNTHIA-RAND-CITYSCAPES raw class ids (R channel of GT/LABELS) -> class name (docs/method.md §9.2).
# Ids without a 16-class counterpart (void, parking-slot, road-work, terrain, truck, train,
# lanemarking) are known but ignored; lanemarking follows CBST-MX (ignored), not CRST (road).
SYNTHIA_RAW_NAMES: dict[int, str] = {
    0: "void",
    1: "sky",
    2: "building",
    3: "road",
    4: "sidewalk",
    5: "fence",
    6: "vegetation",
    7: "pole",
    8: "car",
    9: "traffic sign",
    10: "person",
    11: "bicycle",
    12: "motorcycle",
    13: "parking-slot",
    14: "road-work",
    15: "traffic light",
    16: "terrain",
    17: "rider",
    18: "truck",
    19: "bus",
    20: "train",
    21: "wall",
    22: "lanemarking",
}


@dataclass(frozen=True)
class SubsetMean:
    """A mean IoU over some of a protocol's classes that results report beside the mIoU."""

    header: str
    """Its column header in result tables (``mIoU*``)."""
    key: str
    """Its key in metrics JSON (``miou13``)."""
    classes: tuple[str, ...]


MIOU13 = SubsetMean("mIoU*", "miou13", CLASSES_13)
"""SYNTHIA -> Cityscapes results' mIoU over the 13 classes common to the papers (docs/method.md §8.3)."""


@dataclass(frozen=True)
class Protocol:
    """A label protocol: which raw ids map to which of ``num_classes`` training ids."""

    name: str
    class_names: tuple[str, ...]
    raw_ids: tuple[int, ...]
    """Raw id written for each trainId (the inverse map, in trainId order)."""
    known_raw_ids: frozenset[int]
    """Every raw id the dataset may legitimately contain, mapped or ignored."""
    colors: tuple[tuple[int, int, int], ...]
    lut: np.ndarray = field(repr=False, compare=False)
    subset_means: tuple[SubsetMean, ...] = ()
    """Means over class subsets that results of this protocol report too (16 classes: mIoU*)."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def encode(self, raw: np.ndarray) -> np.ndarray:
        """Map raw ids to trainIds (uint8, 255 = ignore)."""
        return self.lut[np.asarray(raw, dtype=np.int64).clip(0, 255)]

    def decode(self, train_ids: np.ndarray) -> np.ndarray:
        """Map trainIds back to raw ids (uint8); ignored pixels become raw id 0."""
        inverse = np.full(256, PSEUDO_IGNORE_RAW_ID, dtype=np.uint8)
        inverse[: self.num_classes] = self.raw_ids
        return inverse[np.asarray(train_ids, dtype=np.int64)]

    def unknown_values(self, raw: np.ndarray) -> list[int]:
        """Raw values present in ``raw`` that the dataset's table does not define."""
        return sorted(int(v) for v in np.unique(raw) if int(v) not in self.known_raw_ids)

    def check_values(self, raw: np.ndarray, path: str | Path) -> None:
        """Raise ``ValueError`` naming ``path`` if ``raw`` holds ids outside the table."""
        bad = self.unknown_values(raw)
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            raise DataError(
                f"{path}: label values {shown} are not in the {self.name} label table "
                f"(allowed raw ids: {min(self.known_raw_ids)}..{max(self.known_raw_ids)})"
            )

    def colorize(self, train_ids: np.ndarray) -> np.ndarray:
        """RGB visualisation (H x W x 3 uint8) of a trainId map; ignored pixels are black."""
        table = np.zeros((256, 3), dtype=np.uint8)
        table[: self.num_classes] = self.colors
        return table[np.asarray(train_ids, dtype=np.int64)]


def build_protocol(
    name: str,
    raw_to_class: dict[int, str],
    classes: tuple[str, ...],
    colors: dict[str, tuple[int, int, int]],
    subset_means: tuple[SubsetMean, ...] = (),
) -> Protocol:
    """Build a protocol from a raw-id -> class-name table, ignoring names outside ``classes``
    (the trainIds, in order); ``colors`` maps each class name to its RGB colour. A user's
    dataset module builds its own label table with it (docs/extending.md)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    raw_ids = [-1] * len(classes)
    for raw_id in sorted(raw_to_class):
        cls = raw_to_class[raw_id]
        if cls in classes:
            train_id = classes.index(cls)
            lut[raw_id] = train_id
            if raw_ids[train_id] < 0:
                raw_ids[train_id] = raw_id
    missing = [c for c, r in zip(classes, raw_ids) if r < 0]
    if missing:
        raise ConfigError(f"label protocol {name}: no raw id for classes {missing}")
    return Protocol(
        name=name,
        class_names=classes,
        raw_ids=tuple(raw_ids),
        known_raw_ids=frozenset(raw_to_class),
        lut=lut,
        colors=tuple(colors[c] for c in classes),
        subset_means=subset_means,
    )


_CS_RAW_TO_NAME = {lab.id: lab.name for lab in _CS_LABELS if lab.id >= 0}
_CS_COLORS = {lab.name: tuple(lab.color) for lab in _CS_LABELS}
CLASSES_19: tuple[str, ...] = tuple(
    lab.name for lab in sorted((x for x in _CS_LABELS if 0 <= x.trainId < 255), key=lambda x: x.trainId)
)

CITYSCAPES_19 = build_protocol("cityscapes19", _CS_RAW_TO_NAME, CLASSES_19, _CS_COLORS)
"""Cityscapes (and GTA5) labelIds -> the 19 evaluation classes (docs/method.md §9.2)."""
CITYSCAPES_16 = build_protocol("cityscapes16", _CS_RAW_TO_NAME, CLASSES_16, _CS_COLORS, (MIOU13,))
"""Cityscapes (and GTA5) labelIds -> the 16 SYNTHIA classes; terrain, truck, train ignored.

See docs/method.md §9.2.
"""
SYNTHIA_16 = build_protocol("synthia16", SYNTHIA_RAW_NAMES, CLASSES_16, _CS_COLORS, (MIOU13,))
"""SYNTHIA-RAND-CITYSCAPES raw ids -> the 16 classes, in the same trainId order as CITYSCAPES_16."""

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (CITYSCAPES_19, CITYSCAPES_16, SYNTHIA_16)}


def get_protocol(name: str) -> Protocol:
    """Look a protocol up by name, with an error listing the valid names."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ConfigError(f"unknown label protocol {name!r}; choose one of {sorted(PROTOCOLS)}") from None


def register_protocol(protocol: Protocol) -> Protocol:
    """Make ``protocol`` known by name (checkpoints, ``cbst convert --protocol``, the datasets'
    ``protocols`` tables); a user's dataset module calls it for its own label table."""
    known = PROTOCOLS.get(protocol.name)
    if known is not None and known is not protocol and known.class_names != protocol.class_names:
        raise ConfigError(f"label protocol {protocol.name!r} is already registered with other classes")
    PROTOCOLS[protocol.name] = protocol
    return protocol


def dataset_protocols(dataset: str) -> dict[int, Protocol] | None:
    """The protocols a registered dataset's labels can be read in, by class count (the first is
    its default), from its registration's ``protocols`` meta; None for a dataset that defines its
    classes in its own files (the ``folder`` layout's YAML)."""
    table = DATASETS.meta(dataset).get("protocols")
    if table is None:
        return None
    return {int(n): p if isinstance(p, Protocol) else get_protocol(p) for n, p in table.items()}


def protocol_for(dataset: str, num_classes: int | None = None) -> Protocol:
    """The protocol that reads ``dataset``'s raw labels into ``num_classes`` classes (None: the
    dataset's default count)."""
    table = dataset_protocols(dataset)
    if table is None:
        raise ConfigError(f"dataset {dataset!r} defines its classes in its own files (no fixed protocol)")
    if num_classes is None:
        return next(iter(table.values()))
    if num_classes not in table:
        counts = " or ".join(map(str, table))
        raise ConfigError(f"{dataset} labels support the {counts}-class protocol only, not {num_classes}")
    return table[num_classes]


def default_class_count(dataset: str) -> int | None:
    """The class count a registered dataset is read in by default (None: its files define it)."""
    table = DATASETS.meta(dataset).get("protocols")
    return int(next(iter(table))) if table else None


def class_count_choices() -> tuple[int, ...]:
    """Every class count some registered dataset reads its labels in (for ``--num-classes``),
    in registration order; datasets with classes of their own (``folder``) add none."""
    counts: dict[int, None] = {}
    for name in DATASETS:
        for n in DATASETS.meta(name).get("protocols") or {}:
            counts[int(n)] = None
    return tuple(counts)


def subset_means(class_names: tuple[str, ...] | list[str]) -> tuple[SubsetMean, ...]:
    """The subset means results over these classes report: those of the registered protocols
    with exactly these class names (mIoU* for the 16 SYNTHIA classes), none otherwise."""
    names = tuple(class_names)
    for protocol in PROTOCOLS.values():
        if protocol.class_names == names and protocol.subset_means:
            return protocol.subset_means
    return ()


def cityscapes_palette() -> list[int]:
    """A 768-entry PIL palette indexed by Cityscapes labelId (GTA5 / CBST-MX colour PNGs)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for lab in _CS_LABELS:
        if lab.id >= 0:
            palette[lab.id] = lab.color
    return palette.reshape(-1).tolist()


# ------------------------------------------------- user label tables (the folder dataset's YAML)


def _palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct colours, spreading the bits of the class index over R, G and B."""
    colors = []
    for i in range(n):
        r = g = b = 0
        c = i + 1
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colors.append((r, g, b))
    return colors


def _config_error(config: Path, problem: str) -> DataError:
    return DataError(f"{config}: {problem}")


def _raw_value(config: Path, value: Any, where: str) -> int:
    """A raw label value from the YAML: an integer in 0..255."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise _config_error(config, f"{where} must be an integer in 0..255, got {value!r}")
    return value


def folder_protocol(config: Path, cfg: dict) -> Protocol:
    """A protocol from the YAML ``classes`` (in trainId order) and ``ignore_values``.

    Raw value 0 is known (ignored) unless it is a class, because pseudo-label PNGs write 0 for
    unselected pixels (``labels.PSEUDO_IGNORE_RAW_ID``).
    """
    classes = cfg.get("classes")
    if not isinstance(classes, list) or not classes:
        raise _config_error(config, "'classes' must be a non-empty list of {name, value}")
    if len(classes) >= IGNORE_INDEX:
        raise _config_error(config, f"at most {IGNORE_INDEX - 1} classes are supported")
    names, values, colors = [], [], _palette(len(classes))
    for k, entry in enumerate(classes):
        if not isinstance(entry, dict) or "name" not in entry or "value" not in entry:
            raise _config_error(config, f"classes[{k}] must be a mapping with 'name' and 'value'")
        value = _raw_value(config, entry["value"], f"classes[{k}].value")
        if value in values:
            raise _config_error(config, f"classes[{k}].value {value} is used by two classes")
        names.append(str(entry["name"]))
        values.append(value)
        if "color" in entry:
            color = entry["color"]
            if not (isinstance(color, list) and len(color) == 3):
                raise _config_error(config, f"classes[{k}].color must be [r, g, b]")
            colors[k] = tuple(_raw_value(config, c, f"classes[{k}].color") for c in color)
    ignore = cfg.get("ignore_values", [])
    if not isinstance(ignore, list):
        raise _config_error(config, "'ignore_values' must be a list of integers")
    ignored = {_raw_value(config, v, "ignore_values entry") for v in ignore}
    if ignored & set(values):
        raise _config_error(config, f"ignore_values {sorted(ignored & set(values))} are also class values")
    if PSEUDO_IGNORE_RAW_ID not in values:
        ignored.add(PSEUDO_IGNORE_RAW_ID)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[values] = np.arange(len(values), dtype=np.uint8)
    return Protocol(
        name=str(cfg.get("name", config.parent.name)),
        class_names=tuple(names),
        raw_ids=tuple(values),
        known_raw_ids=frozenset(values) | frozenset(ignored),
        colors=tuple(colors),
        lut=lut,
    )


def read_folder_config(config: Path) -> dict:
    """The folder dataset's YAML as a mapping, its keys checked (``folder_protocol`` reads classes)."""
    try:
        cfg = yaml.safe_load(read_text(config, "dataset config"))
    except yaml.YAMLError as exc:
        raise DataError(f"{config}: invalid YAML ({exc})") from None
    if not isinstance(cfg, dict):
        raise _config_error(config, "expected a mapping with 'images', 'labels' and 'classes'")
    unknown = set(cfg) - {
        "name",
        "images",
        "labels",
        "image_suffix",
        "label_suffix",
        "classes",
        "ignore_values",
    }
    if unknown:
        raise _config_error(config, f"unknown keys {sorted(unknown)}")
    if "images" not in cfg:
        raise _config_error(config, "'images' (the image folder) is required")
    return cfg
