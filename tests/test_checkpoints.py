"""cbst checkpoints: round trip, metadata, and the errors a user meets; ``cbst convert`` on .pth files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cbst import __version__
from cbst.checkpoints import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from cbst.cli import main as cli_main
from cbst.models import build_model


@pytest.fixture()
def small_ckpt(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A small 16-class model with non-default BN statistics, saved as a checkpoint."""
    model = build_model("small", 16)
    model.train()(torch.randn(2, 3, 64, 64))  # move the running statistics off their defaults
    path = tmp_path / "run" / "model.pt"
    save_checkpoint(
        path, model, arch="small", num_classes=16, protocol="synthia16", round=2, epoch=5, extra={"note": "x"}
    )
    return path, model.eval()


def test_round_trip_same_outputs_and_meta(small_ckpt: tuple[Path, torch.nn.Module]) -> None:
    path, model = small_ckpt
    loaded, meta = load_checkpoint(path, expect_protocol="synthia16")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    assert meta == read_meta(path)
    assert {k: meta[k] for k in ("arch", "num_classes", "protocol", "round", "epoch", "extra")} == {
        "arch": "small",
        "num_classes": 16,
        "protocol": "synthia16",
        "round": 2,
        "epoch": 5,
        "extra": {"note": "x"},
    }
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["cbst_version"] == __version__ and meta["freeze_bn"] is False
    assert all(p.requires_grad for p in loaded.parameters())
    assert not list(path.parent.glob(".*tmp*"))  # atomic write left no temporary file


def test_wrong_protocol_is_a_clear_error(small_ckpt: tuple[Path, torch.nn.Module]) -> None:
    path, _ = small_ckpt
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"{path} was trained for synthia16 but the dataset uses cityscapes19"),
    ):
        load_checkpoint(path, expect_protocol="cityscapes19")


def test_bare_state_dict_and_missing_file(tmp_path: Path) -> None:
    bare = tmp_path / "bare.pth"
    torch.save(build_model("small", 19).state_dict(), bare)
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(bare))}: not a cbst checkpoint.*cbst convert"
    ):
        load_checkpoint(bare)
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint not found"):
        read_meta(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(junk)


def test_save_checks_arch_and_protocol(tmp_path: Path) -> None:
    model = build_model("small", 19)
    with pytest.raises(ValueError, match="protocol cityscapes16 has 16 classes, not 19"):
        save_checkpoint(tmp_path / "m.pt", model, arch="small", num_classes=19, protocol="cityscapes16")
    with pytest.raises(ValueError, match="unknown arch"):
        save_checkpoint(tmp_path / "m.pt", model, arch="vgg", num_classes=19, protocol="cityscapes19")


def test_convert_bare_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = build_model("small", 16).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "m.pt"
    assert (
        cli_main(
            ["convert", str(tmp_path / "w.pth"), "--arch", "small", "--num-classes", "16", "--out", str(out)]
        )
        == 0
    )
    assert "loaded" in capsys.readouterr().out
    loaded, meta = load_checkpoint(out, expect_protocol="cityscapes16")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))
    assert (
        cli_main(
            [
                "convert",
                str(tmp_path / "w.pth"),
                "--arch",
                "small",
                "--num-classes",
                "19",
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        == 2
    )
    assert "shape mismatch: head.classifier.weight" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "convert",
                str(tmp_path / "none.pth"),
                "--arch",
                "small",
                "--num-classes",
                "19",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "none.pth: file not found" in capsys.readouterr().err


def test_convert_crst_deeplab(tmp_path: Path) -> None:
    model = build_model("deeplabv2_resnet101", 19)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "gta_src.pth")
    out = tmp_path / "crst.pt"
    assert (
        cli_main(
            [
                "convert",
                str(tmp_path / "gta_src.pth"),
                "--arch",
                "deeplabv2_resnet101",
                "--num-classes",
                "19",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    loaded, meta = load_checkpoint(out)
    assert meta["protocol"] == "cityscapes19" and meta["freeze_bn"] is True
    torch.testing.assert_close(loaded.layer5.conv2d_list[3].weight, model.layer5.conv2d_list[3].weight)
    assert not loaded.bn1.weight.requires_grad
