"""The embedded synthetic benchmark: determinism, layouts, classes, structure, domain shift."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbst.labels import CITYSCAPES_19
from cbst.synthetic import (
    SYNTHETIC_VERSION,
    SyntheticExistsError,
    class_frequencies,
    make_synthetic,
    render_image,
)

RARE = ("pole", "traffic light", "traffic sign", "rider", "motorcycle", "bicycle")
LARGE = ("road", "building", "sky", "vegetation")
SMALL = dict(num_source=3, num_train=2, num_val=2, size=(96, 48), progress=False)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """~40 images per domain at the default size, rendered once for the module."""
    out = tmp_path_factory.mktemp("syn") / "bench"
    make_synthetic(out, seed=0, num_source=40, num_train=30, num_val=10, progress=False)
    return out


def _labels(root: Path, domain: str) -> list[Path]:
    if domain == "source":
        return sorted((root / "gta5" / "labels").glob("*.png"))
    return sorted((root / "cityscapes" / "gtFine").rglob("*_gtFine_labelIds.png"))


def test_deterministic_per_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_synthetic(a, seed=3, **SMALL)
    make_synthetic(b, seed=3, **SMALL)
    make_synthetic(c, seed=4, **SMALL)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert len(da) == 2 * 7 and da == db
    assert set(da) == set(dc) and all(da[k] != dc[k] for k in da if "images" in k or "leftImg8bit" in k)
    sa, sb = json.loads((a / "synthetic.json").read_text()), json.loads((b / "synthetic.json").read_text())
    assert sa["class_frequencies"] == sb["class_frequencies"] and sa["version"] == SYNTHETIC_VERSION


def test_worker_processes_draw_the_same_images(tmp_path, monkeypatch):
    """Rendered by two forked workers or in this process, every file is the same, and each
    image is ``render_image``'s for its (seed, domain, index)."""
    import cbst.synthetic.writer as writer

    if sys.platform != "linux":
        pytest.skip("the workers are forked on Linux only")
    monkeypatch.setattr(writer, "default_num_workers", lambda limit: 2)
    make_synthetic(tmp_path / "pool", seed=5, **SMALL)
    monkeypatch.setattr(writer, "_render_pool", lambda: None)
    make_synthetic(tmp_path / "serial", seed=5, **SMALL)
    assert _digest(tmp_path / "pool") == _digest(tmp_path / "serial")
    image, label = render_image(5, 0, 2, SMALL["size"])
    assert np.array_equal(np.array(Image.open(tmp_path / "pool" / "gta5" / "images" / "00003.png")), image)
    assert np.array_equal(np.array(Image.open(tmp_path / "pool" / "gta5" / "labels" / "00003.png")), label)


def test_rerun_skips_and_mismatch_is_refused(tmp_path):
    out = tmp_path / "s"
    first = make_synthetic(out, seed=1, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = make_synthetic(out, seed=1, **SMALL)
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    with pytest.raises(SyntheticExistsError, match="seed"):
        make_synthetic(out, seed=2, **SMALL)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SyntheticExistsError, match="not empty"):
        make_synthetic(other, seed=1, **SMALL)


def test_layout_and_encodings(bench):
    summary = json.loads((bench / "synthetic.json").read_text())
    assert summary["complete"] and summary["counts"] == {"source": 40, "train": 30, "val": 10}
    assert (bench / "VERSION").read_text().split() == ["cbst-synthetic", SYNTHETIC_VERSION]
    src = sorted((bench / "gta5" / "images").glob("*.png"))
    assert [p.name for p in src[:2]] == ["00001.png", "00002.png"] and len(src) == 40
    img, lab = Image.open(src[0]), Image.open(bench / "gta5" / "labels" / "00001.png")
    assert img.mode == "RGB" and img.size == (256, 128)
    assert lab.mode == "P" and lab.size == (256, 128)
    assert lab.getpalette()[3 * 7 : 3 * 8] == [128, 64, 128]  # labelId 7 = road colour
    for split, n, cities in (("train", 30, {"synthtown", "pixelburg"}), ("val", 10, {"renderdorf"})):
        images = sorted((bench / "cityscapes" / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))
        assert len(images) == n and {p.parent.name for p in images} == cities
        for p in images[:3]:
            city, seq, frame = p.name[: -len("_leftImg8bit.png")].split("_")
            assert p.parent.name == city and len(seq) == 6 and frame == "000019"
            gt = bench / "cityscapes" / "gtFine" / split / city / f"{city}_{seq}_{frame}_gtFine_labelIds.png"
            im, gl = Image.open(p), Image.open(gt)
            assert im.mode == "RGB" and im.size == (256, 128)
            assert gl.mode == "L" and gl.size == (256, 128)
    for domain in ("source", "target"):
        for p in _labels(bench, domain)[:5]:
            assert CITYSCAPES_19.unknown_values(np.asarray(Image.open(p))) == []


@pytest.mark.parametrize("domain", ["source", "target"])
def test_classes_and_imbalance(bench, domain):
    freqs = class_frequencies(_labels(bench, domain))
    assert set(freqs) == set(CITYSCAPES_19.class_names) | {"ignore"}
    assert sum(freqs.values()) == pytest.approx(1.0)
    missing = [c for c in CITYSCAPES_19.class_names if freqs[c] <= 0]
    assert not missing, f"{domain}: classes absent over the set: {missing}"
    for c in RARE:  # drawn larger than life since version 1.2, still a few % of pixels at most
        assert freqs[c] < 0.03, (domain, c, freqs[c])
    for c in LARGE:
        assert freqs[c] > 0.02, (domain, c, freqs[c])
    assert freqs["road"] > 0.2 and freqs["building"] > 0.1
    assert freqs["ignore"] > 0  # void pixels exist, as in the real data


def test_summary_frequencies_match_files(bench):
    summary = json.loads((bench / "synthetic.json").read_text())
    got = class_frequencies(_labels(bench, "source"))
    for k, v in summary["class_frequencies"]["source"].items():
        assert got[k] == pytest.approx(v)


@pytest.mark.parametrize("domain", ["source", "target"])
def test_spatial_structure(bench, domain):
    labels = np.stack([np.asarray(Image.open(p)) for p in _labels(bench, domain)])
    rows = labels.shape[1]
    sky, road = labels == 23, labels == 7
    assert sky[:, : rows // 2].sum() > 0.95 * sky.sum()
    assert road[:, rows // 2 :].sum() > 0.95 * road.sum()
    assert sky[:, :2].mean() > 0.02 and road[:, : rows // 4].sum() == 0


def _stats(root: Path, domain: str):
    if domain == "source":
        pairs = [(root / "gta5" / "images" / p.name, p) for p in _labels(root, "source")]
    else:
        pairs = [
            (Path(str(p).replace("gtFine", "leftImg8bit", 1).replace("_gtFine_labelIds", "_leftImg8bit")), p)
            for p in _labels(root, "target")
        ]
    road_pixels, hf = [], []
    for ip, lp in pairs:
        img = np.asarray(Image.open(ip), dtype=np.float32)
        lab = np.asarray(Image.open(lp))
        road_pixels.append(img[lab == 7])
        gray = img.mean(axis=2)
        inside = (lab[:, 1:] == lab[:, :-1]) & (lab[:, 1:] != 1)  # within regions, not on edges
        hf.append(np.median(np.abs(np.diff(gray, axis=1))[inside]))  # dense texture / noise
    return np.concatenate(road_pixels).mean(axis=0), float(np.mean(hf))


def test_appearance_shift(bench):
    road_s, hf_s = _stats(bench, "source")
    road_t, hf_t = _stats(bench, "target")
    assert np.abs(road_s - road_t).max() > 8  # different road colour distributions (v1.1: ~10)
    assert hf_t > 1.5 * hf_s  # camera textures vs flat game shading


def test_layout_shift(bench):
    """The target has a higher horizon: more rows below it, so less sky."""
    summary = json.loads((bench / "synthetic.json").read_text())
    f = summary["class_frequencies"]
    assert f["source"]["sky"] > 1.5 * f["target_train"]["sky"]
    assert f["source"]["truck"] > f["target_train"]["truck"]
    assert f["target_train"]["person"] > f["source"]["person"]


def test_render_image_shapes():
    img, lab = render_image(0, 1, 0, (128, 64))
    assert img.shape == (64, 128, 3) and img.dtype == np.uint8
    assert lab.shape == (64, 128) and lab.dtype == np.uint8
