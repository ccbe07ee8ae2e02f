"""Contract tests over the registries: every architecture, dataset, selection policy and loss.

Parametrised over the registries' names, as segmentation_models_pytorch tests every encoder
through one base tester, so an entry registered later is tested with no edit here (a dataset
layout needs a writer of its files in ``_WRITERS``). Two stand-in networks with other geometries
(stride 4 padded to 32 as a SegFormer; stride 14 as a ViT/14) check that inference, the
probability cache and the pseudo-label pass follow the model's geometry, not a constant.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from cbst.checkpoints import load_checkpoint, save_checkpoint
from cbst.datasets import build_dataset
from cbst.inference import InferencePlan, network_outputs, predict_probs
from cbst.labels import IGNORE_INDEX, cityscapes_palette, dataset_protocols
from cbst.models.base import IMAGENET_MEAN, IMAGENET_STD, SegmentationNet, geometry, lr_group
from cbst.probability_cache import ProbabilityCache
from cbst.pseudo_labels import pseudo_label_pass
from cbst.registry import ARCHITECTURES, DATASETS, LOSSES, SELECTION_POLICIES
from cbst.thresholds import ThresholdEstimator

NUM_CLASSES = 3
_HEAVY = {
    "deeplabv2_resnet101",
    "resnet38",
    *(f"segformer_mit_b{i}" for i in range(1, 6)),
    "daformer_mit_b5",
    "dinov2_vit_b14",
    "dinov2_vit_l14",
}
"""Architectures whose CPU build and forward take seconds (marked slow): the not-slow suite keeps
the small transformers (MiT-B0 SegFormer and DAFormer, DINOv2 ViT-S)."""


class PatchNet(SegmentationNet):
    """A stand-in network: one conv of kernel = stride = ``output_stride`` (a patch embedding)."""

    output_stride = 4
    pad_multiple = 32

    def __init__(self, num_classes: int, *, freeze_bn: bool = False) -> None:
        super().__init__(freeze_bn)
        s = self.output_stride
        self.embed = nn.Conv2d(3, 8, s, stride=s)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.embed(x))))

    def _lr_groups(self) -> list[dict]:
        head = list(self.head.parameters())
        ids = {id(p) for p in head}
        return [
            lr_group([p for p in self.parameters() if id(p) not in ids], 1.0, 1.0),
            lr_group(head, 10.0, 1.0),
        ]


class ViT14Net(PatchNet):
    """Stride 14 and padding to 14, as a ViT with 14-pixel patches (DINOv2)."""

    output_stride = 14
    pad_multiple = 14


def _arch(name):
    return name if isinstance(name, type) else ARCHITECTURES.get(name)


ARCH_PARAMS = [
    pytest.param(n, id=n, marks=[pytest.mark.slow] if n in _HEAVY else []) for n in ARCHITECTURES.names()
] + [pytest.param(PatchNet, id="stand-in-stride4-pad32"), pytest.param(ViT14Net, id="stand-in-stride14")]
_SIZE_VARIANTS = {*(f"segformer_mit_b{i}" for i in range(1, 5)), "dinov2_vit_l14"}
"""Variants built by the same classes as a tested smaller and larger sibling (MiT-B0 and B5;
DINOv2 ViT-S and ViT-B), differing in depths and widths only: they get the geometry and
parameter-group contracts, not the costlier padding, feature and round-trip ones."""
FULL_ARCH_PARAMS = [p for p in ARCH_PARAMS if p.values[0] not in _SIZE_VARIANTS]


def _build(name) -> SegmentationNet:
    torch.manual_seed(0)
    cls = _arch(name)
    return cls(NUM_CLASSES, freeze_bn=cls.default_freeze_bn).eval()


class Built(NamedTuple):
    name: str | type
    model: SegmentationNet


@pytest.fixture(scope="module")
def built(request) -> Built:
    """The architecture ``request.param``, built once for all its contract tests: pytest runs the
    tests of one module-scoped parameter together, so one network is alive at a time (building
    the large ones takes seconds, their forward passes here a fraction of that)."""
    return Built(request.param, _build(request.param))


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("built", ARCH_PARAMS, indirect=True)
def test_architecture_geometry_and_output_shape(built) -> None:
    model = built.model
    geo = geometry(model)
    assert geo.output_stride >= 1 and geo.pad_multiple % geo.output_stride == 0
    h, w = 2 * geo.pad_multiple, 3 * geo.pad_multiple
    with torch.no_grad():
        out = model(torch.zeros(1, 3, h, w))
    assert out.shape[:2] == (1, NUM_CLASSES)
    assert tuple(out.shape[2:]) == model.output_size(h, w)
    for got, size in zip(out.shape[2:], (h, w)):  # logits at 1/stride, up to the family's rounding
        assert abs(got - size / geo.output_stride) <= 1


@pytest.mark.parametrize("built", FULL_ARCH_PARAMS, indirect=True)
def test_architecture_inference_pads_to_its_multiple(built) -> None:
    """Probabilities of an image of any size come back at its size, equal to a hand-padded pass."""
    model = built.model
    multiple = geometry(model).pad_multiple
    h, w = multiple + 3, 2 * multiple - 5
    images = torch.randint(
        0, 256, (1, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    probs = predict_probs(model, images, amp=False)
    assert probs.shape == (1, NUM_CLASSES, h, w)
    x = (images.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    ph, pw = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
    with torch.no_grad():
        logits = model(F.pad(x, (0, pw - w, 0, ph - h)))
    expected = F.interpolate(logits.softmax(1), size=(ph, pw), mode="bilinear", align_corners=False)[
        :, :, :h, :w
    ]
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("built", ARCH_PARAMS, indirect=True)
def test_architecture_lr_groups_cover_every_trainable_parameter_once(built) -> None:
    model = built.model
    grouped = [id(p) for group in model.lr_groups() for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert set(grouped) == set(trainable)
    assert all({"lr_mult", "wd_mult"} <= set(group) for group in model.lr_groups())


@pytest.mark.parametrize(
    "built", [p for p in FULL_ARCH_PARAMS if isinstance(p.values[0], str)], indirect=True
)
def test_architecture_returns_its_encoder_features_with_the_same_logits(built) -> None:
    """``forward(x, return_features=True)``: the plain pass's logits and ``encoder_features(x)``,
    a feature map of the batch at the logits' scale or coarser."""
    model = built.model
    multiple = geometry(model).pad_multiple
    x = torch.randn(2, 3, multiple, 2 * multiple, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, features = model(x, return_features=True)
        assert torch.equal(logits, model(x))
        assert torch.equal(features, model.encoder_features(x))
    assert features.dim() == 4 and features.shape[0] == 2
    assert features.shape[-1] <= logits.shape[-1] and features.shape[-2] <= logits.shape[-2]


@pytest.mark.parametrize(
    "built", [p for p in FULL_ARCH_PARAMS if isinstance(p.values[0], str)], indirect=True
)
def test_architecture_state_dict_round_trip(built, tmp_path: Path) -> None:
    """Its checkpoint rebuilds it: a freshly built network of the saved architecture loads the
    state_dict strictly (every key, every shape), value for value."""
    name, model = built.name, copy.deepcopy(built.model)  # the others' tests see the built values
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01)  # not the values a fresh build starts from
    expected = model.state_dict()
    save_checkpoint(tmp_path / "m.pt", model, arch=name, num_classes=NUM_CLASSES, protocol="contract")
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta["arch"] == name and type(loaded) is type(model)
    got = loaded.state_dict()  # once: state_dict() walks the whole network
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# ----------------------------------------------------------------------------- other geometries


def _folder_dataset(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """A folder-layout dataset of RGB images of the given (h, w) with 3-class labels."""
    rng = np.random.default_rng(0)
    classes = [{"name": "a", "value": 1}, {"name": "b", "value": 2}, {"name": "c", "value": 3}]
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"f{i}.png")
        Image.fromarray(rng.integers(1, 4, (h, w), dtype=np.uint8)).save(root / "lab" / f"f{i}.png")
    (root / "dataset.yaml").write_text(yaml.safe_dump({"images": "img", "labels": "lab", "classes": classes}))
    return root


@pytest.mark.parametrize("cls", [PatchNet, ViT14Net], ids=["stride4-pad32", "stride14"])
def test_cache_and_pseudo_labels_follow_the_model_geometry(cls, tmp_path: Path) -> None:
    """Exact-mode pseudo-labels of a stride-4/pad-32 or stride-14 network equal thresholds and labels
    computed here from ``predict_probs``, and its cache gives back those probabilities."""
    model = _build(cls)
    dataset = build_dataset("folder", _folder_dataset(tmp_path / "data", [(37, 50), (37, 50), (29, 61)]))
    plan = InferencePlan.for_model(model, None, (1.0, 0.75), True)
    assert plan.pad_multiple == cls.pad_multiple
    images = [torch.from_numpy(dataset[i]["image"]).permute(2, 0, 1)[None] for i in range(len(dataset))]
    expected = [predict_probs(model, im, scales=(1.0, 0.75), flip=True, amp=False) for im in images]

    with ProbabilityCache(tmp_path / "cache", plan, device="cpu", dtype=torch.float32) as cache:
        for i, im in enumerate(images):
            cache.put(i, [o[0] for o in network_outputs(model, im, plan, amp=False)], tuple(im.shape[2:]))
        for i, probs in enumerate(expected):
            assert torch.equal(cache.get(i), probs[0])

    stats = pseudo_label_pass(
        model,
        dataset,
        tmp_path / "round",
        portion=0.5,
        exact=True,
        scales=(1.0, 0.75),
        progress=False,
        amp=False,
    )
    estimator = ThresholdEstimator(NUM_CLASSES, "cb", exact=True)
    for probs in expected:
        estimator.update(probs)
    lam = estimator.thresholds(0.5)
    np.testing.assert_allclose(list(stats["thresholds"].values()), lam.numpy())
    for i, probs in enumerate(expected):
        ratio, labels = (probs[0] / lam.view(-1, 1, 1)).max(0)
        labels[ratio < 1] = IGNORE_INDEX
        raw = np.asarray(
            Image.open(tmp_path / "round" / "pseudo_labelIds" / f"{dataset.samples[i].name}.png")
        )
        assert raw.shape == tuple(images[i].shape[2:])
        np.testing.assert_array_equal(raw, dataset.protocol.decode(labels.numpy()))


# ----------------------------------------------------------------------------- datasets


def _png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette is not None:
        image.putpalette(palette)
    image.save(path)


def _write_gta5(root: Path, raws: list[np.ndarray], rgb: list[np.ndarray]) -> str:
    for i, (raw, im) in enumerate(zip(raws, rgb)):
        _png(root / "images" / f"{i:05d}.png", im)
        _png(root / "labels" / f"{i:05d}.png", raw, cityscapes_palette())
    return "train"


def _write_synthia(root: Path, raws: list[np.ndarray], rgb: list[np.ndarray]) -> str:
    for i, (raw, im) in enumerate(zip(raws, rgb)):
        _png(root / "RGB" / f"{i:07d}.png", im)
        (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
        bgr = np.stack([np.zeros_like(raw), np.zeros_like(raw), raw], axis=-1).astype(np.uint16)
        assert cv2.imwrite(str(root / "GT" / "LABELS" / f"{i:07d}.png"), bgr)
    return "train"


def _write_cityscapes(root: Path, raws: list[np.ndarray], rgb: list[np.ndarray]) -> str:
    for i, (raw, im) in enumerate(zip(raws, rgb)):
        name = f"aachen_{i:06d}_000019"
        _png(root / "leftImg8bit" / "val" / "aachen" / f"{name}_leftImg8bit.png", im)
        _png(root / "gtFine" / "val" / "aachen" / f"{name}_gtFine_labelIds.png", raw)
    return "val"


def _write_folder(root: Path, raws: list[np.ndarray], rgb: list[np.ndarray]) -> str:
    for i, (raw, im) in enumerate(zip(raws, rgb)):
        _png(root / "img" / f"x{i}.png", im)
        _png(root / "lab" / f"x{i}.png", raw)
    classes = [{"name": f"k{v}", "value": v} for v in (7, 8, 11)]
    (root / "dataset.yaml").write_text(yaml.safe_dump({"images": "img", "labels": "lab", "classes": classes}))
    return "train"


_WRITERS = {
    "gta5": _write_gta5,
    "synthia": _write_synthia,
    "cityscapes": _write_cityscapes,
    "folder": _write_folder,
}
"""A writer of small files in each registered layout: (root, raw label maps, images) -> split."""
_RAW_IDS = {"synthia": np.arange(0, 23), "folder": np.array([7, 8, 11])}
"""Raw label values each layout's files may hold (Cityscapes labelIds 0..33 otherwise)."""


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_reads_its_layout_in_each_class_count(name, tmp_path: Path) -> None:
    if name not in _WRITERS:
        pytest.fail(f"dataset {name!r} is registered but tests/test_contracts.py has no writer of its layout")
    rng = np.random.default_rng(3)
    ids = _RAW_IDS.get(name, np.arange(0, 34))
    raws = [rng.choice(ids, size=(12, 20)).astype(np.uint8) for _ in range(3)]
    rgb = [rng.integers(0, 256, (12, 20, 3), dtype=np.uint8) for _ in range(3)]
    split = _WRITERS[name](tmp_path / name, raws, rgb)
    table = dataset_protocols(name)
    counts = list(table) if table is not None else [None]
    for count in counts:
        ds = build_dataset(name, tmp_path / name, split=split, num_classes=count)
        assert len(ds) == 3
        if table is not None:
            assert ds.protocol is table[count] and ds.protocol.num_classes == count
        else:
            assert ds.protocol.num_classes == 3
        for subset in ds.protocol.subset_means:
            assert set(subset.classes) <= set(ds.protocol.class_names)
        for i in range(3):
            item = ds[i]
            np.testing.assert_array_equal(
                item["image"], rgb[int(item["name"][-1]) if name == "folder" else i]
            )
            raw = raws[int(item["name"][-1]) if name == "folder" else i]
            expected = np.array([[ds.protocol.lut[v] for v in row] for row in raw], dtype=np.uint8)
            np.testing.assert_array_equal(item["label"], expected)
    if table is not None:
        with pytest.raises(ValueError, match=name):
            build_dataset(name, tmp_path / name, split=split, num_classes=max(table) + 1)


# ----------------------------------------------------------------------------- selection policies


def _known_confidences(seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 4, 2000)
    pred[pred == 3] = 2  # class 3 never predicted
    conf = rng.random(2000).astype(np.float32)
    return conf, pred


def _numpy_top(values: np.ndarray, portion: float) -> float:
    """The ⌊n·p⌋-th largest value by a full sort; 1.0 when that is undefined."""
    k = math.floor(len(values) * portion)
    return float(np.sort(values)[::-1][k - 1]) if k > 0 else 1.0


_NUMPY_REFERENCE = {
    "cb": lambda conf, pred, p: [_numpy_top(conf[pred == c], p) for c in range(4)],
    "global": lambda conf, pred, p: [_numpy_top(conf, p)] * 4,
}
"""Each built-in policy's thresholds written with numpy (a new policy brings its own here)."""


_ROUNDS_POLICIES = [
    n for n in SELECTION_POLICIES.names() if "rounds" in SELECTION_POLICIES.meta(n).get("modes", ("rounds",))
]
"""The policies the rounds mode's estimator takes (``fixed`` is online-only: tests/test_online_selection.py)."""


@pytest.mark.parametrize("name", _ROUNDS_POLICIES)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "histogram"])
def test_selection_policy_thresholds_on_a_known_histogram(name: str, exact: bool) -> None:
    conf, pred = _known_confidences()
    estimator = ThresholdEstimator(4, name, exact=exact, bins=1024)
    estimator.update_confidences(torch.from_numpy(conf), torch.from_numpy(pred))
    for portion in (0.0, 0.2, 0.5, 1.0):
        lam = estimator.thresholds(portion)
        assert lam.shape == (4,) and lam.dtype == torch.float32
        if name in _NUMPY_REFERENCE:
            expected = np.array(_NUMPY_REFERENCE[name](conf, pred, portion), dtype=np.float32)
            if exact:
                np.testing.assert_array_equal(lam.numpy(), expected)
            else:  # the histogram's guarantee: at most one bin below, never above
                assert np.all(lam.numpy() <= expected) and np.all(expected - lam.numpy() < 1 / 1024 + 1e-7)
    probs = torch.softmax(torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0)), 1)
    labels = estimator.selection.assign(probs, estimator.thresholds(0.5))
    assert labels.shape == (2, 5, 6) and labels.dtype == torch.int64
    assert bool(((labels >= 0) & (labels < 4) | (labels == IGNORE_INDEX)).all())


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_is_a_finite_differentiable_scalar(name: str) -> None:
    loss = LOSSES.get(name)()
    logits = torch.randn(2, 4, 5, 7, requires_grad=True, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (2, 40, 56), generator=torch.Generator().manual_seed(1))
    labels[:, :8] = IGNORE_INDEX
    batch = {"domain": torch.tensor([0, 1]), "index": torch.tensor([0, 1])}
    value = loss(logits, labels, batch)
    assert value.shape == () and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (
        float(loss(logits, torch.full_like(labels, IGNORE_INDEX), batch).detach()) == 0.0
    )  # no labelled pixel


def test_cross_entropy_against_a_pixel_loop() -> None:
    ce = LOSSES.get("cross_entropy")()
    logits = torch.randn(1, 3, 2, 3, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([[[0, 1, 2], [2, IGNORE_INDEX, 1]]])
    log_p = logits.log_softmax(1)
    terms = [
        -log_p[0, labels[0, y, x], y, x]
        for y in range(2)
        for x in range(3)
        if labels[0, y, x] != IGNORE_INDEX
    ]
    assert float(ce(logits, labels)) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)
