"""MXNet ``.params`` reading (real MXNet-written fixtures) and ResNet-38 conversion (the layer list in tests/data)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cbst.checkpoints import load_checkpoint
from cbst.cli import main as cli_main
from cbst.models import ResNet38
from cbst.models.resnet38 import resnet38_state_dict_from_params
from cbst.mxnet import ParamsError, load_params, save_params

LAYERS = Path(__file__).resolve().parent / "data" / "resnet38_rna_a1_layers.txt"
MXNET_DATA = Path(__file__).resolve().parent / "data" / "mxnet"


def spec_arrays(num_classes: int = 19, *, imagenet: bool = False) -> dict[str, tuple[int, ...]]:
    """Every ``arg:``/``aux:`` name and shape of the layer list (data and softmax_label skipped)."""
    shapes = {}
    for line in LAYERS.read_text().splitlines():
        m = re.match(r"^(ARG|AUX) (\S+) \((.*)\)$", line)
        if m and m[2] not in ("data", "softmax_label"):
            name = m[2].replace("linear19", f"linear{num_classes}")
            shapes[f"{m[1].lower()}:{name}"] = tuple(int(v) for v in m[3].split(",") if v.strip())
    if imagenet:  # the ImageNet classifier: no conv6a, a 1x1 linear1000 on pooled features
        shapes = {k: v for k, v in shapes.items() if "conv6a" not in k and "linear" not in k}
        shapes |= {"arg:linear1000_weight": (1000, 4096, 1, 1), "arg:linear1000_bias": (1000,)}
    return shapes


def random_arrays(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays at a scale that keeps activations O(1): weights N(0, 1/fan_in), var ~1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        arr = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) == 4:
            arr *= np.float32((1.0 / np.prod(shape[1:])) ** 0.5)
        out[name] = np.abs(arr) * 0.1 + 1.0 if name.endswith("moving_var") else arr * 0.1
    return out


@pytest.fixture(scope="module")
def full_params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-size ResNet-38 (19 classes) .params file with every name and shape of the layer list."""
    path = tmp_path_factory.mktemp("mx") / "gta_rna-a1_cls19_s8_ep-0000.params"
    save_params(path, random_arrays(spec_arrays()))
    return path


def test_load_named_fixture_matches_expected() -> None:
    params = load_params(MXNET_DATA / "tiny_rna_a1_subset.params")
    expected = np.load(MXNET_DATA / "tiny_rna_a1_subset.expected.npz")
    assert isinstance(params, dict)
    assert sorted(params) == sorted(k.replace("__", ":", 1) for k in expected.files)
    for key in expected.files:
        got = params[key.replace("__", ":", 1)]
        assert got.dtype == expected[key].dtype and got.shape == expected[key].shape
        np.testing.assert_array_equal(got, expected[key])
    assert params["arg:half_example_weight"].dtype == np.float16
    assert params["arg:double_example"].dtype == np.float64


def test_load_unnamed_list_in_order() -> None:
    arrays = load_params(MXNET_DATA / "unnamed_list.params")
    expected = np.load(MXNET_DATA / "tiny_rna_a1_subset.expected.npz")
    assert isinstance(arrays, list) and len(arrays) == 2
    np.testing.assert_array_equal(arrays[0], expected["arg__linear19_bias"])
    np.testing.assert_array_equal(arrays[1], expected["arg__res2a_branch1_weight"])


def test_save_params_round_trip_all_dtypes(tmp_path: Path) -> None:
    arrays = {
        "arg:a": np.arange(6, dtype=np.float64).reshape(2, 3),
        "aux:b": np.ones(3, np.float16),
        "arg:c": np.arange(4, dtype=np.int32),
        "arg:d": np.arange(5, dtype=np.uint8),
    }
    save_params(tmp_path / "x.params", arrays)
    back = load_params(tmp_path / "x.params")
    for name, arr in arrays.items():
        assert back[name].dtype == arr.dtype
        np.testing.assert_array_equal(back[name], arr)
    save_params(tmp_path / "l.params", list(arrays.values()))
    assert [a.shape for a in load_params(tmp_path / "l.params")] == [(2, 3), (3,), (4,), (5,)]


@pytest.mark.parametrize("cut", [4, 30, 200, -3])
def test_truncated_file_names_file_and_offset(tmp_path: Path, cut: int) -> None:
    data = (MXNET_DATA / "unnamed_list.params").read_bytes()
    bad = tmp_path / "cut.params"
    bad.write_bytes(data[:cut])
    with pytest.raises(ParamsError, match=rf"{re.escape(str(bad))}: truncated.*byte offset \d+"):
        load_params(bad)


def test_corrupt_magic_and_sparse_are_named(tmp_path: Path) -> None:
    data = bytearray((MXNET_DATA / "unnamed_list.params").read_bytes())
    bad = tmp_path / "magic.params"
    bad.write_bytes(b"\x00" + bytes(data[1:]))
    with pytest.raises(ParamsError, match=rf"{re.escape(str(bad))}: bad list magic .* byte offset 0"):
        load_params(bad)
    data[24:28] = struct.pack("<I", 0xDEADBEEF)
    bad.write_bytes(bytes(data))
    with pytest.raises(ParamsError, match="bad NDArray magic 0xDEADBEEF at byte offset 24"):
        load_params(bad)
    data[24:32] = struct.pack("<Ii", 0xF993FAC9, 2)
    bad.write_bytes(bytes(data))
    with pytest.raises(ParamsError, match=r"sparse storage \(csr\) is not supported at byte offset 28"):
        load_params(bad)
    with pytest.raises(FileNotFoundError, match="nothing.params"):
        load_params(tmp_path / "nothing.params")


def test_full_spec_state_converts_with_every_key(full_params: Path) -> None:
    raw = load_params(full_params)
    state = resnet38_state_dict_from_params(raw, 19)
    with torch.device("meta"):
        template = ResNet38(19).state_dict()
    assert set(state) == set(template)
    assert all(state[k].shape == template[k].shape for k in template)
    np.testing.assert_array_equal(
        state["bn4b3_branch2b1.running_var"].numpy(), raw["aux:bn4b3_branch2b1_moving_var"]
    )
    np.testing.assert_array_equal(state["classifier.bias"].numpy(), raw["arg:linear19_bias"])


def _lazy(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Zero arrays that take no memory until converted (for error-path checks)."""
    return {k: np.broadcast_to(np.float32(1.0), s) for k, s in shapes.items()}


def test_renamed_and_misshaped_entries_are_listed() -> None:
    shapes = spec_arrays()
    shapes["arg:res3a_branch2a_weightx"] = shapes.pop("arg:res3a_branch2a_weight")
    shapes["aux:bn7_moving_mean"] = (7,)
    with pytest.raises(ParamsError) as info:
        resnet38_state_dict_from_params(_lazy(shapes), 19, source="f.params")
    message = str(info.value)
    assert message.startswith("f.params: does not fit ResNet-38 A1 with 19 classes")
    assert "missing: arg:res3a_branch2a_weight" in message
    assert "unexpected: arg:res3a_branch2a_weightx" in message
    assert "shape mismatch: aux:bn7_moving_mean (got (7,), expected (4096,))" in message
    with pytest.raises(
        ParamsError,
        match="missing: arg:linear16_weight, arg:linear16_bias; "
        "unexpected: arg:linear19_weight, arg:linear19_bias",
    ):
        resnet38_state_dict_from_params(_lazy(spec_arrays()), 16)


def test_imagenet_variant_initialises_head() -> None:
    torch.manual_seed(0)
    state = resnet38_state_dict_from_params(_lazy(spec_arrays(imagenet=True)), 19, imagenet=True)
    assert torch.all(state["conv6a.bias"] == 0) and torch.all(state["classifier.bias"] == 0)
    std = state["conv6a.weight"].std().item()
    assert abs(std - (2 / (4096 * 9)) ** 0.5) / std < 0.02  # He-normal, fan-in
    assert state["classifier.weight"].shape == (19, 512, 3, 3)
    assert not any(k.startswith("linear1000") for k in state)
    with pytest.raises(ParamsError, match="unexpected: arg:linear1000_weight"):
        resnet38_state_dict_from_params(_lazy(spec_arrays(imagenet=True)), 19)


def test_convert_cli_and_fix_gamma(full_params: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "model.pt"
    assert (
        cli_main(
            ["convert", str(full_params), "--arch", "resnet38", "--num-classes", "19", "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "loaded 195 tensors" in printed and "124,033,363 parameters" in printed
    model, meta = load_checkpoint(out, expect_protocol="cityscapes19")
    assert meta["arch"] == "resnet38" and meta["protocol"] == "cityscapes19"
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        before = model.eval()(x)
        for module in model.modules():  # MXNet fix_gamma=True: stored gammas have no effect
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.data.mul_(3.0).add_(1.0)
        after = model(x)
        model.bn7.bias.data.add_(1.0)  # beta is used: the check above is not vacuous
        shifted = model(x)
    assert before.shape == (1, 19, 3, 3)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert not torch.allclose(before, shifted)
