"""The transformer architectures (SegFormer, DAFormer, DINOv2): geometry, state round trip, lr groups.

Small models run on the CPU at 64-128 px; the large variants are only built on the meta device,
where shapes propagate without memory or compute.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml
from timm.layers import LayerScale
from torch import nn

from cbst.models import build_model
from cbst.models.base import load_strict
from cbst.registry import ARCHITECTURES

SMALL = ("segformer_mit_b0", "daformer_mit_b0", "dinov2_vit_s14")
# smp's MiT blocks run their weight init op by op, which the meta device decomposes slowly (about
# 10 s for B5 on 2 cores): B2-B5 are marked slow, B1 and the ViTs (fast on meta) run always.
SLOW = pytest.mark.slow
LARGE = (
    "segformer_mit_b1",
    pytest.param("segformer_mit_b2", marks=SLOW),
    pytest.param("segformer_mit_b3", marks=SLOW),
    pytest.param("segformer_mit_b4", marks=SLOW),
    pytest.param("segformer_mit_b5", marks=SLOW),
    pytest.param("daformer_mit_b5", marks=SLOW),
    "dinov2_vit_b14",
    "dinov2_vit_l14",
)
LARGE_NAMES = tuple(p if isinstance(p, str) else p.values[0] for p in LARGE)
GEOMETRY = {"segformer": (4, 32), "daformer": (4, 32), "dinov2": (7, 14)}  # (output stride, pad multiple)
# Parameter counts of the papers (SegFormer Table 1/2: B0 3.8 M, B5 84.7 M; DAFormer: 85.2 M) and the
# ViT encoders (S 21 M, B 86 M, L 304 M) plus our decoder, to 0.1 M.
PARAMS_M = {"segformer_mit_b5": 84.7, "daformer_mit_b5": 85.2}
ENCODER_PARAMS_M = {"dinov2_vit_s14": 22.1, "dinov2_vit_b14": 86.6, "dinov2_vit_l14": 304.4}


def dinov2_kwargs(name: str) -> dict:
    """A 4x4 position grid for the CPU tests (the default 37x37 grid works the same, slower)."""
    return {"img_size": 56} if name.startswith("dinov2") else {}


@pytest.fixture(scope="module")
def small_models() -> dict[str, nn.Module]:
    """One instance of each small architecture, built once for the module."""
    torch.manual_seed(0)
    return {name: build_model(name, 5, drop_path_rate=0.0, **dinov2_kwargs(name)) for name in SMALL}


def family(name: str) -> str:
    return name.split("_", 1)[0]


def test_the_families_declare_the_recipe_their_configs_use() -> None:
    """``cbst demo --model`` trains with the declared recipe, ``configs/`` with the base file."""
    base = Path(__file__).resolve().parents[1] / "configs" / "_base_" / "transformer_adamw.yaml"
    settings = yaml.safe_load(base.read_text())
    for name in SMALL + LARGE_NAMES:
        recipe = dataclasses.asdict(ARCHITECTURES.get(name).training_recipe)
        assert recipe == {key: settings[key] for key in recipe}
    assert ARCHITECTURES.get("small_demo").training_recipe is None  # the demo's own SGD


def test_every_name_is_registered() -> None:
    for name in SMALL + LARGE_NAMES:
        cls = ARCHITECTURES.get(name)
        stride, multiple = GEOMETRY[family(name)]
        assert (cls.output_stride, cls.pad_multiple) == (stride, multiple)
        assert cls.default_freeze_bn is False
        assert cls.input_mean == (0.485, 0.456, 0.406) and cls.input_std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name", SMALL)
def test_output_shape_stride_and_padding(small_models: dict, name: str) -> None:
    model = small_models[name].eval()
    stride, multiple = GEOMETRY[family(name)]
    with torch.no_grad():
        for h, w in ((64, 128), (70, 100), (multiple * 3, multiple * 4)):
            x = torch.randn(1, 3, h, w)
            out = model(x)
            assert out.shape == (1, 5, math.ceil(h / stride), math.ceil(w / stride))
            # Padding is the caller's or the model's: the padded input gives the same logits, cropped.
            ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
            padded = model(nn.functional.pad(x, (0, pw - w, 0, ph - h)))
            assert padded.shape == (1, 5, ph // stride, pw // stride)
            torch.testing.assert_close(padded[..., : out.shape[-2], : out.shape[-1]], out)


@pytest.mark.parametrize("name", LARGE)
def test_large_variants_on_meta(name: str) -> None:
    with torch.device("meta"):
        model = build_model(name, 19).eval()
        out = model(torch.empty(1, 3, 512, 1024))
    stride = GEOMETRY[family(name)][0]
    assert out.shape == (1, 19, math.ceil(512 / stride), math.ceil(1024 / stride))
    total = sum(p.numel() for p in model.parameters()) / 1e6
    if name in PARAMS_M:
        assert total == pytest.approx(PARAMS_M[name], abs=0.1)
    if name in ENCODER_PARAMS_M:
        encoder = sum(p.numel() for p in model.encoder.parameters()) / 1e6
        assert encoder == pytest.approx(ENCODER_PARAMS_M[name], abs=0.1)


@pytest.mark.parametrize("name", SMALL)
def test_strict_round_trip_of_own_state(small_models: dict, name: str) -> None:
    model = small_models[name].eval()
    torch.manual_seed(1)
    other = build_model(name, 5, **dinov2_kwargs(name)).eval()
    load_strict(other, model.state_dict(), "own state")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def no_decay_by_type(model: nn.Module) -> set[int]:
    """Ids of parameters that should get no weight decay, found from module types and names."""
    norms = (nn.LayerNorm, nn.BatchNorm2d, LayerScale)
    ids = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    ids |= {id(p) for n, p in model.named_parameters() if n.endswith(("bias", "pos_embed", "cls_token"))}
    return ids


@pytest.mark.parametrize("name", SMALL)
def test_lr_groups(small_models: dict, name: str) -> None:
    model = small_models[name]
    groups = model.lr_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(ids) == len(set(ids))
    decoder = {id(p) for p in model.decoder.parameters()}
    plain = no_decay_by_type(model)
    for g in groups:
        for p in g["params"]:
            assert g["lr_mult"] == (10.0 if id(p) in decoder else 1.0)
            assert g["wd_mult"] == (0.0 if id(p) in plain else 1.0)
    if name.startswith("dinov2"):
        tokens = {id(model.encoder.vit.pos_embed), id(model.encoder.vit.cls_token)}
        assert tokens <= {id(p) for g in groups if g["wd_mult"] == 0 for p in g["params"]}


@pytest.mark.parametrize("name", SMALL)
def test_grad_checkpointing_gives_the_same_gradients(small_models: dict, name: str) -> None:
    model = small_models[name].train()
    x = torch.randn(2, 3, 56, 56)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.set_grad_checkpointing(False)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_drop_path_rate_and_trainable_bn() -> None:
    model = build_model("daformer_mit_b0", 3, drop_path_rate=0.3)
    last = model.encoder.block4[-1].drop_path
    assert last.drop_prob == pytest.approx(0.3) and isinstance(model.encoder.block1[0].drop_path, nn.Identity)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training and m.weight.requires_grad for m in bns)
    frozen = build_model("daformer_mit_b0", 3, freeze_bn=True).train()
    assert all(
        not m.training and not m.weight.requires_grad
        for m in frozen.modules()
        if isinstance(m, nn.BatchNorm2d)
    )
