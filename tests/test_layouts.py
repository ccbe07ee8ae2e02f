"""Weights in the field's layouts load strictly and compute what the module they came from computes.

Each file is written in the test from the libraries' own modules (smp's ``mit_b0`` encoder, timm's
``vit_small_patch14_dinov2``) under that layout's key names; the DAFormer file follows the key
names of DAFormer's mmsegmentation code, written out below, and its logits are checked against a
forward pass written here with plain functional ops.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cbst.checkpoints import load_checkpoint
from cbst.cli import main as cli_main
from cbst.errors import WeightsError
from cbst.models import build_model
from cbst.models.layouts import load_weights

MIT_B0_CHANNELS = (32, 64, 160, 256)
NUM_CLASSES = 19
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def smp_mit() -> torch.nn.Module:
    torch.manual_seed(0)
    return smp.encoders.get_encoder("mit_b0", weights=None).eval()


@pytest.fixture(scope="module")
def timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56, dynamic_img_size=True
    )
    with torch.no_grad():  # LayerScale starts at 1e-5: make the blocks matter for the comparison
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.0)
    return vit.eval()


def smp_features(encoder: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """smp's four stage outputs (its first two entries are the input and a placeholder)."""
    with torch.no_grad():
        return encoder(x)[2:]


def test_nvlabs_mit_pth_and_smp_safetensors(tmp_path: Path, smp_mit: torch.nn.Module) -> None:
    state = smp_mit.state_dict()
    nvlabs = {**state, "head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)}
    torch.save(nvlabs, tmp_path / "mit_b0.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    x = torch.randn(1, 3, 96, 128)
    reference = smp_features(smp_mit, x)
    for name, arch in (("mit_b0.pth", "segformer_mit_b0"), ("model.safetensors", "daformer_mit_b0")):
        model = build_model(arch, NUM_CLASSES).eval()
        decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
        assert load_weights(model, tmp_path / name)[0] == "mit-imagenet"
        with torch.no_grad():
            for ours, theirs in zip(model.encoder(x), reference):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        for k, v in model.decoder.state_dict().items():  # the decoder keeps its initialisation
            torch.testing.assert_close(v, decoder_before[k])


def test_dinov2_timm_safetensors_and_hub_pth(tmp_path: Path, timm_vit: torch.nn.Module) -> None:
    state = timm_vit.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    torch.save({**state, "mask_token": torch.zeros(1, 384)}, tmp_path / "dinov2_vits14_pretrain.pth")
    x = torch.randn(1, 3, 70, 84)
    with torch.no_grad():
        tokens = timm_vit.forward_features(x)[:, 1:]  # final-norm patch tokens
    reference = tokens.transpose(1, 2).reshape(1, 384, 5, 6)
    for name, layout in (("model.safetensors", "dinov2-timm"), ("dinov2_vits14_pretrain.pth", "dinov2-hub")):
        model = build_model("dinov2_vit_s14", NUM_CLASSES, img_size=56).eval()
        assert load_weights(model, tmp_path / name)[0] == layout
        with torch.no_grad():
            torch.testing.assert_close(model.encoder(x)[-1], reference, rtol=1e-5, atol=1e-5)


def daformer_head_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random ``decode_head.*`` tensors under the names and shapes of DAFormer's code
    (``DAFormerHead``: MLP ``embed_layers``, ``ASPPWrapper`` with a separable ASPP, ``conv_seg``)."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    def bn(prefix: str, c: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.weight": 1 + rand(c),
            f"{prefix}.bias": rand(c),
            f"{prefix}.running_mean": rand(c),
            f"{prefix}.running_var": 1 + rand(c).abs(),
            f"{prefix}.num_batches_tracked": torch.tensor(100),
        }

    head: dict[str, torch.Tensor] = {}
    for i, c in enumerate(MIT_B0_CHANNELS):
        head[f"embed_layers.{i}.proj.weight"] = rand(256, c)
        head[f"embed_layers.{i}.proj.bias"] = rand(256)
    aspp = "fuse_layer.aspp_modules"
    head[f"{aspp}.0.conv.weight"] = rand(256, 1024, 1, 1)
    head.update(bn(f"{aspp}.0.bn", 256))
    for i in (1, 2, 3):
        head[f"{aspp}.{i}.depthwise_conv.conv.weight"] = rand(1024, 1, 3, 3)
        head.update(bn(f"{aspp}.{i}.depthwise_conv.bn", 1024))
        head[f"{aspp}.{i}.pointwise_conv.conv.weight"] = rand(256, 1024, 1, 1)
        head.update(bn(f"{aspp}.{i}.pointwise_conv.bn", 256))
    head["fuse_layer.bottleneck.conv.weight"] = rand(256, 1024, 3, 3) * 0.1
    head.update(bn("fuse_layer.bottleneck.bn", 256))
    head["conv_seg.weight"] = rand(NUM_CLASSES, 256, 1, 1)
    head["conv_seg.bias"] = rand(NUM_CLASSES)
    assert len(head) == 8 + (1 + 5) + 3 * (1 + 5 + 1 + 5) + (1 + 5) + 2
    return {f"decode_head.{k}": v for k, v in head.items()}


def daformer_reference(features: list[torch.Tensor], head: dict[str, torch.Tensor]) -> torch.Tensor:
    """DAFormer's head in functional ops, from the paper's description and the state's names."""
    h = {k.removeprefix("decode_head."): v for k, v in head.items()}

    def bn_relu(x: torch.Tensor, prefix: str) -> torch.Tensor:
        mean, var = h[f"{prefix}.running_mean"], h[f"{prefix}.running_var"]
        y = F.batch_norm(x, mean, var, h[f"{prefix}.weight"], h[f"{prefix}.bias"], False, 0.0, 1e-5)
        return F.relu(y)

    size = features[0].shape[-2:]
    embedded = []
    for i, f in enumerate(features):
        e = torch.einsum("nchw,ec->nehw", f, h[f"embed_layers.{i}.proj.weight"])
        e = e + h[f"embed_layers.{i}.proj.bias"].view(1, -1, 1, 1)
        embedded.append(F.interpolate(e, size=size, mode="bilinear", align_corners=False))
    x = torch.cat(embedded, dim=1)
    aspp = "fuse_layer.aspp_modules"
    branches = [bn_relu(F.conv2d(x, h[f"{aspp}.0.conv.weight"]), f"{aspp}.0.bn")]
    for i, d in zip((1, 2, 3), (6, 12, 18)):
        dw = F.conv2d(x, h[f"{aspp}.{i}.depthwise_conv.conv.weight"], padding=d, dilation=d, groups=1024)
        dw = bn_relu(dw, f"{aspp}.{i}.depthwise_conv.bn")
        branches.append(
            bn_relu(
                F.conv2d(dw, h[f"{aspp}.{i}.pointwise_conv.conv.weight"]), f"{aspp}.{i}.pointwise_conv.bn"
            )
        )
    fused = bn_relu(
        F.conv2d(torch.cat(branches, 1), h["fuse_layer.bottleneck.conv.weight"], padding=1),
        "fuse_layer.bottleneck.bn",
    )
    return F.conv2d(fused, h["conv_seg.weight"], h["conv_seg.bias"])


def test_daformer_uda_checkpoint_through_convert(
    tmp_path: Path, smp_mit: torch.nn.Module, capsys: pytest.CaptureFixture
) -> None:
    generator = torch.Generator().manual_seed(0)
    backbone = {f"backbone.{k}": v for k, v in smp_mit.state_dict().items()}
    student = {**backbone, **daformer_head_state(generator)}
    teacher = {**backbone, **daformer_head_state(generator)}
    uda = {f"model.{k}": v for k, v in student.items()}
    uda |= {f"ema_model.{k}": v for k, v in teacher.items()}
    uda |= {f"imnet_model.{k}": v for k, v in backbone.items()}
    meta = {"CLASSES": ("road", "sidewalk"), "iter": 40000, "mmcv_version": "1.3.7"}
    torch.save({"meta": meta, "state_dict": uda}, tmp_path / "daformer_uda.pth")
    torch.save({"meta": meta, "state_dict": student}, tmp_path / "daformer_source.pth")
    x = torch.randn(1, 3, 64, 96)
    features = smp_features(smp_mit, x)
    for file, choice, expected in (
        ("daformer_uda.pth", "teacher", teacher),
        ("daformer_uda.pth", "student", student),
        ("daformer_source.pth", "teacher", student),  # not a UDA file: the one model it holds
    ):
        out = tmp_path / f"{choice}_{file}.pt"
        argv = ["convert", str(tmp_path / file), "--arch", "daformer_mit_b0", "--num-classes", "19"]
        assert cli_main([*argv, "--out", str(out), "--uda-model", choice]) == 0
        assert "layout" in capsys.readouterr().out
        model, meta_ = load_checkpoint(out)
        head = {k: v for k, v in expected.items() if k.startswith("decode_head.")}
        with torch.no_grad():
            torch.testing.assert_close(
                model.eval()(x), daformer_reference(features, head), rtol=1e-4, atol=1e-4
            )


def test_refusals_name_the_file_and_keys(
    tmp_path: Path, smp_mit: torch.nn.Module, timm_vit: torch.nn.Module
) -> None:
    model = build_model("daformer_mit_b0", NUM_CLASSES)
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    with pytest.raises(
        WeightsError, match=r"resnet\.pth: unknown weights layout \(keys conv1\.weight, fc\.weight"
    ):
        load_weights(model, tmp_path / "resnet.pth")
    state = smp_mit.state_dict()
    broken = {k: v for k, v in state.items() if not k.startswith("block4.")}
    broken["block1.0.attn.q.weight"] = torch.zeros(3, 3)
    torch.save(broken, tmp_path / "broken.pth")
    missing = sum(k.startswith("block4.") for k in state)
    pattern = (
        rf"broken\.pth: mit-imagenet weights do not fit DAFormerB0: missing encoder\.block4\.0\.attn\.kv\.bias, "
        rf".*\(and {missing - 5} more\); mis-shaped encoder\.block1\.0\.attn\.q\.weight \(3, 3\) \(model \(32, 32\)\)"
    )
    with pytest.raises(WeightsError, match=pattern):
        load_weights(model, tmp_path / "broken.pth")
    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, tmp_path / "vit.safetensors")
    with pytest.raises(
        WeightsError, match=r"vit\.safetensors: holds DINOv2 weights .* does not fit DAFormerB0"
    ):
        load_weights(model, tmp_path / "vit.safetensors")
    torch.save({"model.backbone.x": torch.zeros(1)}, tmp_path / "no_teacher.pth")
    with pytest.raises(WeightsError, match=r"no_teacher\.pth: a UDA checkpoint without the teacher"):
        load_weights(model, tmp_path / "no_teacher.pth", uda_model="teacher")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_weights(model, tmp_path / "junk.safetensors")


class Payload:
    """A pickled object: a file holding one must be refused, never unpickled."""


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {"x": Payload()}}, tmp_path / "evil.pth")
    model = build_model("segformer_mit_b0", 2)
    with pytest.raises(
        WeightsError, match=re.escape(f"{tmp_path / 'evil.pth'}: holds pickled Python objects")
    ):
        model.load_pretrained(tmp_path / "evil.pth")
