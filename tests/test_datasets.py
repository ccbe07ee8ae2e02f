"""Dataset readers on real Cityscapes frames and on GTA5 / SYNTHIA / folder trees in their real encodings."""

from __future__ import annotations

import inspect
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cbst import datasets
from cbst.datasets import Sample, SegmentationDataset, build_dataset, read_list_file
from cbst.io import DataError, image_size
from cbst.labels import CITYSCAPES_16, CITYSCAPES_19, cityscapes_palette

# Standard Cityscapes labelId -> trainId table (docs/method.md §9.2), written out by hand.
CS19 = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
# 16-class Cityscapes table and SYNTHIA raw id -> trainId (docs/method.md §9.2, as CBST-MX).
CS16 = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    23: 9,
    24: 10,
    25: 11,
    26: 12,
    28: 13,
    32: 14,
    33: 15,
}
SYN16 = {
    1: 9,
    2: 2,
    3: 0,
    4: 1,
    5: 4,
    6: 8,
    7: 5,
    8: 12,
    9: 7,
    10: 10,
    11: 15,
    12: 14,
    15: 6,
    17: 11,
    19: 13,
    21: 3,
}

FRANKFURT = "frankfurt_000000_000294"
AACHEN = [f"aachen_00000{i}_000019" for i in range(7)]


def by_hand(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """Apply an id table pixel by pixel, 255 for ids not in it."""
    out = np.full(raw.shape, 255, dtype=np.uint8)
    for src, dst in table.items():
        out[raw == src] = dst
    return out


def write_png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> Path:
    """Write ``array`` with Pillow (optionally as a palette PNG), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette is not None:
        img.putpalette(palette)
    img.save(path)
    return path


def rgb(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture()
def cs_tree(testdata: Path, tmp_path: Path) -> Path:
    """A Cityscapes root holding the real 256x128 frankfurt frame in ``val`` (cheap to decode)."""
    root = tmp_path / "cityscapes"
    for kind, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelIds.png")):
        rel = Path(kind) / "val" / "frankfurt" / f"{FRANKFURT}{suffix}"
        (root / rel).parent.mkdir(parents=True)
        shutil.copy(testdata / "cityscapes" / rel, root / rel)
    return root


def cs_files(root: Path) -> tuple[Path, Path]:
    base = Path("val") / "frankfurt" / FRANKFURT
    return (root / "leftImg8bit" / f"{base}_leftImg8bit.png", root / "gtFine" / f"{base}_gtFine_labelIds.png")


@pytest.fixture()
def gta_tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A GTA5 root with palette labels (index = labelId) and mixed image sizes; returns raw labels too."""
    rng = np.random.default_rng(0)
    root = tmp_path / "gta5"
    raws = {}
    for name, (w, h) in {"00002": (40, 30), "00001": (36, 20), "00010": (40, 31)}.items():
        write_png(root / "images" / f"{name}.png", rgb(rng, w, h))
        raws[name] = rng.integers(0, 34, (h, w), dtype=np.uint8)
        write_png(root / "labels" / f"{name}.png", raws[name], cityscapes_palette())
    return root, raws


# ------------------------------------------------------------------------------------ Cityscapes


def test_cityscapes_val_exact_mapping(testdata: Path) -> None:
    ds = datasets.cityscapes(testdata / "cityscapes", "val")
    assert [s.name for s in ds.samples] == [FRANKFURT]
    item = ds[0]
    assert item["image"].shape == (128, 256, 3) and item["image"].dtype == np.uint8
    raw = np.asarray(Image.open(ds.samples[0].label))
    assert item["label"].dtype == np.uint8
    np.testing.assert_array_equal(item["label"], by_hand(raw, CS19))
    assert item["name"] == FRANKFURT and item["index"] == 0
    shipped = np.asarray(Image.open(ds.samples[0].label.with_name(f"{FRANKFURT}_gtFine_labelTrainIds.png")))
    assert (shipped != item["label"]).mean() < 0.005  # the shipped file was downsampled separately


def test_cityscapes_train_names_and_one_frame(testdata: Path) -> None:
    ds = datasets.cityscapes(testdata / "cityscapes", "train", verify="headers")
    assert [s.name for s in ds.samples] == AACHEN
    assert ds.samples[3].label.name == f"{AACHEN[3]}_gtFine_labelIds.png"
    item = ds[3]
    assert item["image"].shape == (1024, 2048, 3)
    np.testing.assert_array_equal(item["label"], by_hand(np.asarray(Image.open(ds.samples[3].label)), CS19))


def test_cityscapes_16_class_protocol(testdata: Path) -> None:
    ds = build_dataset("cityscapes", testdata / "cityscapes", split="val", num_classes=16)
    assert ds.protocol is CITYSCAPES_16
    raw = np.asarray(Image.open(ds.samples[0].label))
    label = ds[0]["label"]
    np.testing.assert_array_equal(label, by_hand(raw, CS16))
    assert (label[raw == 23] == 9).all() and (
        raw == 23
    ).any()  # sky: trainId 9 here, 10 in the 19-class table
    raw = raw.copy()
    raw[:2, :2] = (22, 27)  # terrain and truck have no 16-class trainId
    np.testing.assert_array_equal(ds.protocol.encode(raw[:2, :2]), 255)


def test_cityscapes_without_labels(testdata: Path) -> None:
    ds = datasets.cityscapes(testdata / "cityscapes", "val", with_labels=False)
    item = ds[0]
    assert ds.samples[0].label is None and item["label"] is None and item["image"].shape == (128, 256, 3)


def test_cityscapes_list_file_selects_subset(testdata: Path, tmp_path: Path) -> None:
    lst = tmp_path / "train.lst"
    lst.write_text(
        "# the original's format\n\n"
        f"leftImg8bit/train/aachen/{AACHEN[5]}_leftImg8bit.png\tgtFine/train/aachen/{AACHEN[5]}_gtFine_labelIds.png\n"
        f"leftImg8bit/train/aachen/{AACHEN[1]}_leftImg8bit.png\n"
    )
    root = testdata / "cityscapes"
    ds = datasets.cityscapes(root, "train", list_file=lst, verify="headers")
    assert [s.name for s in ds.samples] == [AACHEN[1], AACHEN[5]]
    assert ds.samples[0].label == root / "gtFine/train/aachen" / f"{AACHEN[1]}_gtFine_labelIds.png"
    unlabelled = datasets.cityscapes(root, "train", list_file=lst, with_labels=False, verify="headers")
    assert [s.label for s in unlabelled.samples] == [None, None]
    pairs = read_list_file(lst, root)
    assert pairs[0] == (
        root / f"leftImg8bit/train/aachen/{AACHEN[5]}_leftImg8bit.png",
        root / f"gtFine/train/aachen/{AACHEN[5]}_gtFine_labelIds.png",
    )
    assert pairs[1][1] is None


# ------------------------------------------------------------------------------------ GTA5


def test_gta5_palette_labels_mixed_sizes(gta_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, raws = gta_tree
    assert Image.open(root / "labels" / "00001.png").mode == "P"
    ds = datasets.gta5(root)
    assert [s.name for s in ds.samples] == ["00001", "00002", "00010"]
    for i, sample in enumerate(ds.samples):
        item = ds[i]
        h, w = raws[sample.name].shape
        assert item["image"].shape == (h, w, 3)
        np.testing.assert_array_equal(item["label"], by_hand(raws[sample.name], CS19))


def test_gta5_list_file(gta_tree: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, _ = gta_tree
    lst = tmp_path / "gta.lst"
    lst.write_text("images/00010.png labels/00010.png\nimages/00002.png\n")
    ds = build_dataset("gta5", root, list_file=lst, num_classes=16)
    assert [s.name for s in ds.samples] == ["00002", "00010"]
    assert ds.samples[0].label == root / "labels" / "00002.png" and ds.protocol is CITYSCAPES_16


# ------------------------------------------------------------------------------------ SYNTHIA


def write_synthia_label(path: Path, cls: np.ndarray, inst: np.ndarray) -> None:
    """A 16-bit 3-channel PNG with class in R, instance in G (cv2 takes BGR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = np.stack([np.zeros_like(cls), inst, cls], axis=-1).astype(np.uint16)
    assert cv2.imwrite(str(path), bgr)


def test_synthia_16bit_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "synthia"
    raws = {}
    for name in ("0000002", "0000001"):
        cls = rng.integers(0, 23, (24, 32)).astype(np.uint16)
        cls[0, :3] = (12, 15, 21)  # ids whose high byte is 0: Pillow's 8-bit view reads them as 0
        raws[name] = cls
        write_png(root / "RGB" / f"{name}.png", rgb(rng, 32, 24))
        write_synthia_label(
            root / "GT" / "LABELS" / f"{name}.png", cls, rng.integers(0, 4000, (24, 32)).astype(np.uint16)
        )
    ds = build_dataset("synthia", root, num_classes=16)
    assert [s.name for s in ds.samples] == ["0000001", "0000002"]
    for i, sample in enumerate(ds.samples):
        label = ds[i]["label"]
        np.testing.assert_array_equal(label, by_hand(raws[sample.name], SYN16))
        assert tuple(label[0, :3]) == (14, 6, 3)
    with pytest.raises(ValueError, match="16-class"):
        build_dataset("synthia", root, num_classes=19)


def test_synthia_list_reads_16bit_originals(tmp_path: Path) -> None:
    root = tmp_path / "synthia"
    write_png(root / "RGB" / "0000007.png", np.zeros((4, 6, 3), np.uint8))
    write_synthia_label(
        root / "GT" / "LABELS" / "0000007.png", np.full((4, 6), 21, np.uint16), np.zeros((4, 6), np.uint16)
    )
    lst = tmp_path / "synthia.lst"
    lst.write_text("RGB/0000007.png\tGT/labels/0000007.png\n")  # original list: converted 8-bit copies
    ds = datasets.synthia(root, list_file=lst)
    assert (ds[0]["label"] == 3).all()


def test_synthia_class_id_outside_table(tmp_path: Path) -> None:
    root = tmp_path / "synthia"
    write_png(root / "RGB" / "0000001.png", np.zeros((4, 6, 3), np.uint8))
    label = root / "GT" / "LABELS" / "0000001.png"
    write_synthia_label(label, np.full((4, 6), 300, np.uint16), np.zeros((4, 6), np.uint16))
    with pytest.raises(DataError, match="300") as err:
        datasets.synthia(root)
    assert str(err.value).startswith(str(label))


# ------------------------------------------------------------------------------------ folder


def test_folder_dataset_yaml(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "dataset.yaml").write_text(
        "images: imgs\nlabels: masks\nimage_suffix: _img.png\nlabel_suffix: _mask.png\n"
        "classes:\n  - {name: road, value: 10}\n  - {name: car, value: 20, color: [0, 0, 142]}\n"
        "  - {name: tree, value: 30}\nignore_values: [255]\n"
    )
    raw = np.array([[10, 20, 30, 255], [0, 30, 20, 10]], np.uint8)
    write_png(root / "imgs" / "site_b" / "b_img.png", np.zeros((2, 4, 3), np.uint8))
    write_png(root / "masks" / "site_b" / "b_mask.png", raw)
    write_png(root / "imgs" / "a_img.png", np.zeros((2, 4, 3), np.uint8))
    write_png(root / "masks" / "a_mask.png", raw[::-1].copy())
    ds = build_dataset("folder", root, num_classes=3)
    assert [s.name for s in ds.samples] == ["a", "b"]
    assert ds.protocol.class_names == ("road", "car", "tree") and ds.protocol.colors[1] == (0, 0, 142)
    np.testing.assert_array_equal(ds[1]["label"], [[0, 1, 2, 255], [255, 2, 1, 0]])
    with pytest.raises(DataError, match="defines 3 classes") as err:
        build_dataset("folder", root, num_classes=19)
    assert str(err.value).startswith(str(root / "dataset.yaml"))
    write_png(root / "masks" / "a_mask.png", np.full((2, 4), 40, np.uint8))
    with pytest.raises(DataError, match="40") as err:
        datasets.folder(root)
    assert str(err.value).startswith(str(root / "masks" / "a_mask.png"))


def test_folder_bad_yaml(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    config = tmp_path / "dataset.yaml"
    config.write_text("images: imgs\nclasses:\n  - {name: a, value: 300}\n")
    with pytest.raises(DataError, match="0..255") as err:
        datasets.folder(tmp_path)
    assert str(err.value).startswith(str(config))
    config.write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="not a text dataset config") as err:
        datasets.folder(tmp_path)
    assert str(err.value).startswith(str(config))


# ------------------------------------------------------------------------------------ API


def test_dataset_api(gta_tree: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, raws = gta_tree
    ds = datasets.gta5(root)
    marked = ds.with_transform(lambda s: {**s, "marked": True})
    assert marked[0]["marked"] and "marked" not in ds[0] and marked.samples == ds.samples
    sub = ds.subset([2, 0])
    assert [s.name for s in sub.samples] == ["00010", "00001"] and sub[0]["index"] == 0
    assert ds[-1]["index"] == 2
    pseudo = tmp_path / "pseudo"
    for name, raw in raws.items():  # pseudo-labels: labelIds with 0 = unselected
        write_png(pseudo / f"{name}.png", np.where(raw < 8, 0, raw).astype(np.uint8))
    relabelled = ds.with_labels(pseudo)
    assert relabelled.samples[0].label == pseudo / "00001.png" and ds.samples[0].label != pseudo / "00001.png"
    label = relabelled[0]["label"]
    assert (label[raws["00001"] < 7] == 255).all()
    np.testing.assert_array_equal(label, by_hand(np.where(raws["00001"] < 8, 0, raws["00001"]), CS19))
    clone = pickle.loads(pickle.dumps(ds))  # data-loader workers receive a pickled copy
    np.testing.assert_array_equal(clone[1]["label"], ds[1]["label"])
    (pseudo / "00010.png").unlink()
    with pytest.raises(DataError, match="not found") as err:
        ds.with_labels(pseudo)
    assert str(err.value).startswith(str(pseudo / "00010.png"))


def test_duplicate_names_rejected(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    with pytest.raises(DataError, match="'x'"):
        SegmentationDataset([Sample(a, None, "x"), Sample(b, None, "x")], CITYSCAPES_19)


# ------------------------------------------------------------------------------------ bad input


def test_missing_root_and_subfolder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="root not found") as err:
        datasets.gta5(tmp_path / "nope")
    assert str(err.value).startswith(str(tmp_path / "nope"))
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="not found") as err:
        datasets.gta5(tmp_path)
    assert str(err.value).startswith(str(tmp_path / "labels"))


def test_missing_label_and_missing_image(gta_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = gta_tree
    (root / "labels" / "00002.png").unlink()
    with pytest.raises(DataError, match="label file not found") as err:
        datasets.gta5(root)
    assert str(err.value).startswith(str(root / "labels" / "00002.png"))
    (root / "images" / "00002.png").unlink()
    (root / "images" / "00010.png").unlink()
    with pytest.raises(DataError, match="image not found") as err:
        datasets.gta5(root)
    assert str(err.value).startswith(str(root / "images" / "00010.png"))


def test_cityscapes_missing_label(cs_tree: Path) -> None:
    image, label = cs_files(cs_tree)
    label.unlink()
    with pytest.raises(DataError) as err:
        datasets.cityscapes(cs_tree, "val")
    assert str(err.value).startswith(str(cs_tree / "gtFine" / "val"))  # the folder searched, now empty
    datasets.cityscapes(cs_tree, "val", with_labels=False)  # unlabelled use needs no gtFine


def test_size_mismatch(gta_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = gta_tree
    write_png(root / "labels" / "00002.png", np.full((31, 40), 7, np.uint8), cityscapes_palette())
    with pytest.raises(DataError, match="40x31") as err:
        datasets.gta5(root, verify="headers")
    assert str(err.value).startswith(str(root / "labels" / "00002.png"))
    assert str(root / "images" / "00002.png") in str(err.value)


def test_truncated_png(cs_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image, _ = cs_files(cs_tree)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        datasets.cityscapes(cs_tree, "val")
    assert str(err.value).startswith(str(image))
    ds = datasets.cityscapes(cs_tree, "val", verify="headers")  # the header alone is intact
    with pytest.raises(DataError) as err:
        ds[0]
    assert str(err.value).startswith(str(image))
    monkeypatch.setattr(datasets, "FULL_VERIFY_MAX_SAMPLES", 0)  # "auto" on a large dataset: headers only
    datasets.cityscapes(cs_tree, "val")
    with pytest.raises(DataError):
        datasets.cityscapes(cs_tree, "val", verify="full")


def test_non_image_file(gta_tree: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = gta_tree
    bad = root / "images" / "00001.png"
    bad.write_text("this is not a PNG\n")
    with pytest.raises(DataError, match="cannot read image header") as err:
        datasets.gta5(root, verify="headers")
    assert str(err.value).startswith(str(bad))


def test_label_value_outside_table(cs_tree: Path) -> None:
    _, label = cs_files(cs_tree)
    raw = np.asarray(Image.open(label)).copy()
    raw[5, 7] = 200
    write_png(label, raw)
    with pytest.raises(DataError, match="200") as err:
        datasets.cityscapes(cs_tree, "val")
    assert str(err.value).startswith(str(label))
    ds = datasets.cityscapes(cs_tree, "val", verify="headers")
    with pytest.raises(DataError, match="200"):
        ds[0]


def test_empty_split(tmp_path: Path) -> None:
    empty = tmp_path / "leftImg8bit" / "test"
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match="no files") as err:
        datasets.cityscapes(tmp_path, "test", with_labels=False)
    assert str(err.value).startswith(str(empty))
    with pytest.raises(DataError) as err:
        datasets.cityscapes(tmp_path, "val")
    assert str(err.value).startswith(str(tmp_path / "leftImg8bit" / "val"))


def test_bad_list_file_lines(cs_tree: Path, tmp_path: Path) -> None:
    image, label = cs_files(cs_tree)
    good = f"{image.relative_to(cs_tree)}\t{label.relative_to(cs_tree)}"
    lst = tmp_path / "bad.lst"
    lst.write_text(f"# header\n{good}\n\nleftImg8bit/val/frankfurt/missing_leftImg8bit.png\n")
    with pytest.raises(DataError, match="not found") as err:
        datasets.cityscapes(cs_tree, "val", list_file=lst)
    assert str(err.value).startswith(f"{lst}:4:")
    assert "missing_leftImg8bit.png" in str(err.value)
    lst.write_text(f"{good}\textra\n")
    with pytest.raises(DataError, match="3 fields") as err:
        read_list_file(lst, cs_tree)
    assert str(err.value).startswith(f"{lst}:1:")
    lst.write_text(f"{image.relative_to(cs_tree)}\tgtFine/val/frankfurt/nope.png\n")
    with pytest.raises(DataError, match="label") as err:
        read_list_file(lst, cs_tree)
    assert str(err.value).startswith(f"{lst}:1:")
    lst.write_text("# nothing\n\n")
    with pytest.raises(DataError, match="no entries"):
        read_list_file(lst, cs_tree)
    with pytest.raises(DataError, match="list file not found"):
        read_list_file(tmp_path / "absent.lst", cs_tree)


def test_label_reads_only_the_label(tmp_path):
    """``label(i)`` decodes and checks the label alone: the image need not even exist."""
    from cbst.io import write_png

    raw = np.full((4, 6), 26, dtype=np.uint8)
    raw[0] = 200
    write_png(tmp_path / "l.png", raw)
    ds = SegmentationDataset([Sample(tmp_path / "missing.png", tmp_path / "l.png", "a")], CITYSCAPES_19)
    with pytest.raises(DataError, match="l.png"):
        ds.label(0)  # 200 is not a Cityscapes labelId
    raw[0] = 7
    write_png(tmp_path / "l.png", raw)
    assert np.array_equal(ds.label(0), CITYSCAPES_19.encode(raw))
    assert SegmentationDataset([Sample(tmp_path / "x.png", None, "b")], CITYSCAPES_19).label(0) is None


def test_readers_take_the_same_keyword_options_in_the_same_order():
    readers = (datasets.gta5, datasets.synthia, datasets.cityscapes)
    keyword = [
        [n for n, p in inspect.signature(r).parameters.items() if p.kind is p.KEYWORD_ONLY] for r in readers
    ]
    assert keyword == [["protocol", "list_file", "with_labels", "verify"]] * 3


@pytest.mark.parametrize("progress", [True, False])
def test_progress_false_hides_the_check_bars_of_a_dataset_and_its_copies(
    gta_tree: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch, capsys, progress: bool
) -> None:
    monkeypatch.setattr(datasets, "PROGRESS_MIN_FILES", 0)
    data = build_dataset("gta5", gta_tree[0], progress=progress)
    pseudo = tmp_path / "pseudo"
    for sample in data.samples:
        width, height = image_size(sample.image)
        write_png(pseudo / f"{sample.name}.png", np.zeros((height, width), np.uint8))
    data.with_labels(pseudo)
    bars = capsys.readouterr().err
    assert ("verifying (full decode)" in bars and "verifying (headers)" in bars) == progress
    assert ("verifying" in bars) == progress
