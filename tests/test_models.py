"""Network structure: output strides, DeepLab-v2 keys, ResNet-38 layers vs the MXNet layer list, BN state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from cbst.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from cbst.models.resnet38 import MXBatchNorm2d

LAYERS = Path(__file__).resolve().parent / "data" / "resnet38_rna_a1_layers.txt"


def meta_model(name: str, num_classes: int = 19) -> nn.Module:
    """The model on the meta device: shapes propagate without memory or compute."""
    with torch.device("meta"):
        return build_model(name, num_classes).eval()


def meta_out(model: nn.Module, h: int, w: int) -> tuple[int, ...]:
    """Output shape for a 1x3xHxW input, by shape propagation."""
    return tuple(model(torch.empty(1, 3, h, w, device="meta")).shape)


def deeplab_size(n: int) -> int:
    """docs/method.md §10.2: conv1 /2 (pad 3), ceil-mode max-pool /2, layer2 1x1 stride 2."""
    n = (n + 2 * 3 - 7) // 2 + 1
    n = -(-(n + 2 - 3) // 2) + 1
    return (n - 1) // 2 + 1


def test_normalisation_constants() -> None:
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_deeplab_output_stride() -> None:
    assert deeplab_size(512) == 65 and deeplab_size(1024) == 129 and deeplab_size(64) == 9
    model = meta_model("deeplabv2_resnet101")
    assert model.output_stride == 8
    assert meta_out(model, 512, 1024) == (1, 19, 65, 129)
    assert meta_out(model, 922, 1843) == (1, 19, 116, 231)
    real = build_model("deeplabv2_resnet101", 16).eval()
    with torch.no_grad():
        assert real(torch.randn(1, 3, 64, 128)).shape == (1, 16, deeplab_size(64), deeplab_size(128))


def expected_deeplab_keys() -> list[str]:
    """CRST's state_dict keys (docs/method.md §10.2), written out independently of the model code."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    for layer, blocks in zip(range(1, 5), (3, 4, 23, 3)):
        for i in range(blocks):
            p = f"layer{layer}.{i}"
            for j in (1, 2, 3):
                keys += [f"{p}.conv{j}.weight"] + [f"{p}.bn{j}.{s}" for s in bn]
        keys += [f"layer{layer}.0.downsample.0.weight"] + [f"layer{layer}.0.downsample.1.{s}" for s in bn]
    keys += [f"layer5.conv2d_list.{i}.{s}" for i in range(4) for s in ("weight", "bias")]
    return keys


def test_deeplab_state_dict_keys_match_crst() -> None:
    model = meta_model("deeplabv2_resnet101")
    assert sorted(model.state_dict()) == sorted(expected_deeplab_keys())
    dilations = {name: m.dilation for name, m in model.named_modules() if name.endswith("conv2")}
    assert all(d == (2, 2) for n, d in dilations.items() if n.startswith("layer3"))
    assert all(d == (4, 4) for n, d in dilations.items() if n.startswith("layer4"))
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)
    assert [c.dilation[0] for c in model.layer5.conv2d_list] == [6, 12, 18, 24]
    assert model.maxpool.ceil_mode


def test_deeplab_frozen_bn_and_lr_groups() -> None:
    model = build_model("deeplabv2_resnet101", 19)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    groups = model.lr_groups()
    assert [(g["lr_mult"], g["wd_mult"]) for g in groups] == [(1.0, 1.0), (10.0, 1.0)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.layer5.parameters()}
    assert len(groups[0]["params"]) == 1 + 3 * (3 + 4 + 23 + 3) + 4  # every backbone conv weight
    head_std = model.layer5.conv2d_list[0].weight.std().item()
    assert 0.009 < head_std < 0.011


def test_deeplab_loads_torchvision_and_crst_files(tmp_path: Path) -> None:
    from torchvision.models import resnet101

    tv = resnet101().state_dict()
    torch.save(tv, tmp_path / "resnet101.pth")
    model = build_model("deeplabv2_resnet101", 19, pretrained=tmp_path / "resnet101.pth")
    torch.testing.assert_close(model.layer3[7].conv2.weight, tv["layer3.7.conv2.weight"])
    crst = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    crst["layer5.conv2d_list.2.bias"] = torch.full((19,), 0.5)
    torch.save(crst, tmp_path / "gta_src.pth")  # PyTorch 0.4.0 layout: no num_batches_tracked
    again = build_model("deeplabv2_resnet101", 19, pretrained=tmp_path / "gta_src.pth")
    assert torch.all(again.layer5.conv2d_list[2].bias == 0.5)
    with pytest.raises(
        ValueError,
        match=r"gta_src.pth: does not fit DeepLabV2; shape mismatch: "
        r"layer5.conv2d_list.0.weight \(got \(19, 2048, 3, 3\)",
    ):
        build_model("deeplabv2_resnet101", 16, pretrained=tmp_path / "gta_src.pth")


def layer_lines(kind: str) -> list[list[str]]:
    """Lines of one kind (CONV, BN, DROP) of the MXNet layer list, split on spaces outside parens."""
    rows = []
    for line in LAYERS.read_text().splitlines():
        if line.startswith(kind + " "):
            rows.append(re.findall(r"\([^)]*\)|\S+", line)[1:])
    return rows


def pair(text: str) -> tuple[int, int]:
    """'(3, 3)' -> (3, 3)."""
    a, b = text.strip("()").split(",")
    return int(a), int(b)


def test_resnet38_layers_match_mxnet_list() -> None:
    model = meta_model("resnet38")
    modules = dict(model.named_modules())
    convs = layer_lines("CONV")
    assert len(convs) == 45 == sum(isinstance(m, nn.Conv2d) for m in modules.values())
    for name, kernel, stride, dilate, pad, filters, no_bias in convs:
        conv = modules["classifier" if name == "linear19" else name]
        assert (conv.kernel_size, conv.stride, conv.dilation, conv.padding) == (
            pair(kernel),
            pair(stride),
            pair(dilate),
            pair(pad),
        ), name
        assert conv.out_channels == int(filters) and (conv.bias is None) == (no_bias == "True"), name
    bns = layer_lines("BN")
    assert len(bns) == 37 == sum(isinstance(m, MXBatchNorm2d) for m in modules.values())
    assert all(isinstance(modules[n], MXBatchNorm2d) and modules[n].eps == float(e) for n, e, *_ in bns)
    drops = {name: float(p) for name, p in layer_lines("DROP")}
    assert drops == {n: m.p for n, m in modules.items() if isinstance(m, nn.Dropout)}
    assert sum(p.numel() for p in model.parameters()) == 124_033_363
    assert meta_out(model, 504, 504) == (1, 19, 63, 63)
    assert meta_out(model, 928, 1856) == (1, 19, 116, 232)


def test_resnet38_forward_bn_state_and_lr_groups() -> None:
    model = build_model("resnet38", 16)
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.res7a_branch2b2_do.training  # dropout stays active in training
    groups = model.lr_groups()
    assert [(g["lr_mult"], g["wd_mult"], len(g["params"])) for g in groups] == [
        (1.0, 1.0, 45),
        (2.0, 0.0, 37 + 2),
    ]  # gammas are fixed (fix_gamma): not trained
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 24, 24)).shape == (1, 16, 3, 3)


def test_small_model_shapes_params_and_trainable_bn() -> None:
    model = build_model("small", 19)
    n = sum(p.numel() for p in model.parameters())
    assert 2e6 <= n <= 5e6
    x = torch.randn(2, 3, 128, 256)
    bn = model.stem[0][1]
    before = bn.running_mean.clone()
    model.train()
    out = model(x)
    assert out.shape == (2, 19, 16, 32) and model.output_stride == 8
    assert not torch.equal(before, bn.running_mean)  # batch statistics in training
    out.mean().backward()
    assert bn.weight.grad is not None
    groups = model.lr_groups()
    assert [(g["lr_mult"], g["wd_mult"]) for g in groups] == [(1.0, 1.0), (10.0, 1.0)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    frozen = build_model("small", 19, freeze_bn=True).train()
    assert all(
        not m.training and not m.weight.requires_grad
        for m in frozen.modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    assert meta_out(meta_model("small"), 100, 60) == (1, 19, 13, 8)


def test_small_demo_model_halves_the_dilated_blocks_and_keeps_the_rest(tmp_path) -> None:
    from cbst.checkpoints import load_checkpoint, save_checkpoint
    from cbst.models.small import SmallDemoNet
    from cbst.registry import ARCHITECTURES

    demo, small = build_model("small_demo", 19), build_model("small", 19)
    assert ARCHITECTURES.get("small_demo") is SmallDemoNet
    widths = [(m.in_channels, m.out_channels) for m in (demo.layer3.conv1, demo.layer4.conv2)]
    assert widths == [(128, 128), (128, 128)] and small.layer4.conv2.out_channels == 256
    assert [n for n, _ in demo.named_children()] == [n for n, _ in small.named_children()]
    assert 0.8e6 <= sum(p.numel() for p in demo.parameters()) <= 1.5e6
    assert meta_out(meta_model("small_demo"), 100, 60) == (1, 19, 13, 8) and demo.output_stride == 8
    save_checkpoint(tmp_path / "m.pt", demo, arch="small_demo", num_classes=19, protocol="cityscapes19")
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(1, 3, 64, 64)
    assert type(loaded) is SmallDemoNet and meta["arch"] == "small_demo"
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), demo.eval()(x))


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", 19)
    with pytest.raises(ValueError, match="not downloadable"):
        build_model("resnet38", 19, pretrained="imagenet")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("small", 19, pretrained="nope.pth")
