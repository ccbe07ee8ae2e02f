"""benchmarks/bf16_emulation.py: cbst's bf16 path on a CPU without native bf16, its convolutions
computed by the float32 kernels on bf16 operands."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cbst.device
from cbst.device import autocast, mixed_precision

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    """``benchmarks/NAME.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def emulated_bf16():
    return _script("bf16_emulation").emulated_bf16


def _rounded(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16, held in float32."""
    return t.bfloat16().float()


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 12, 10, generator=g)
    w = torch.randn(6, 8, 3, 3, generator=g) * 0.2
    grad_out = torch.randn(2, 6, 12, 10, generator=g)
    return x, w, grad_out


def test_cbst_takes_its_bf16_path_inside_and_its_own_choice_after(emulated_bf16):
    cpu = torch.device("cpu")
    before = mixed_precision(cpu)
    with emulated_bf16():
        assert mixed_precision(cpu) == torch.bfloat16
        assert mixed_precision(cpu, enabled=False) is None  # --no-amp stays float32
        with autocast(cpu):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert mixed_precision(cpu) == before
    assert cbst.device.cpu_has_native_bf16() == (before is not None)


def test_a_convolution_and_its_gradients_are_float32_sums_of_bf16_operands(emulated_bf16):
    x, w, grad_out = _inputs()
    b = torch.linspace(-1, 1, w.shape[0])
    xe, we, be = (t.clone().requires_grad_() for t in (x, w, b))
    with emulated_bf16() as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = F.conv2d(xe, we, be, padding=1)
        assert y.dtype == torch.bfloat16
        y.backward(grad_out.bfloat16())
    assert mode.calls == 2  # the convolution and its backward, both widened

    # the reference: float32 convolution of the rounded operands, each result rounded to bf16
    xr, wr, br = (_rounded(t).requires_grad_() for t in (x, w, b))
    yr = F.conv2d(xr, wr, br, padding=1)
    gx, gw, gb = torch.autograd.grad(yr, (xr, wr, br), _rounded(grad_out))
    torch.testing.assert_close(y.float(), _rounded(yr.detach()), rtol=0, atol=0)
    for grad, reference in ((xe.grad, gx), (we.grad, gw), (be.grad, gb)):
        torch.testing.assert_close(grad, _rounded(reference), rtol=0, atol=0)


def test_it_agrees_with_pytorchs_own_bf16_convolution_to_bf16_precision(emulated_bf16):
    x, w, _ = _inputs(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        native = F.conv2d(x, w, padding=2, dilation=2)
        with emulated_bf16():
            emulated = F.conv2d(x, w, padding=2, dilation=2)
    exact = F.conv2d(x, w, padding=2, dilation=2)
    # both are bf16 results: within a few bf16 ulps of each other, far closer than to float32's own
    torch.testing.assert_close(emulated.float(), native.float(), rtol=2e-2, atol=2e-2)
    assert (emulated.float() - native.float()).abs().mean() < (emulated.float() - exact).abs().mean()


def test_float32_convolutions_are_left_alone(emulated_bf16):
    x, w, _ = _inputs(2)
    with emulated_bf16() as mode:
        y = F.conv2d(x, w, padding=1)
    assert y.dtype == torch.float32 and mode.calls == 0
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("script", "flags", "says"),
    [
        ("source_calibration", ["--device", "cuda"], "cpu only"),
        ("demo_seeds", ["--device", "cuda:0"], "cpu only"),
        ("demo_seeds", ["--no-amp"], "float32"),
        ("source_calibration", ["--setting", "amp=false"], "float32"),
    ],
)
def test_the_scripts_refuse_it_off_the_cpu_and_in_float32(script, flags, says, tmp_path, monkeypatch, capsys):
    module = _script(script)
    argv = [f"{script}.py", "--out", str(tmp_path / "out"), "--emulate-bf16", *flags]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        module.main()
    message = capsys.readouterr().err
    assert (
        stop.value.code == 2 and message.startswith(f"{script}.py: error: --emulate-bf16") and says in message
    )
    assert message.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("script", "flags", "says"),
    [
        (
            "source_calibration",
            ["--weights", "missing.pt", "--held-out", "1"],
            "missing.pt: checkpoint not found",
        ),
        ("source_calibration", ["--held-out", "0"], "--held-out 0"),
        ("demo_seeds", ["--from", "missing"], "results.json: not found"),
        ("demo_seeds", ["--setting", "amp=maybe"], "'maybe' is not of type bool"),
    ],
)
def test_the_scripts_name_a_bad_input_in_one_line(script, flags, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    module = _script(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *flags])
    with pytest.raises(SystemExit) as stop:
        module.main()
    message = capsys.readouterr().err
    assert stop.value.code == 2 and message.startswith(f"{script}.py: error: ") and says in message
    assert message.count("\n") == 1


@pytest.mark.slow
def test_the_timing_prints_one_line_per_precision(capsys, monkeypatch):
    module = _script("bf16_emulation")
    monkeypatch.setattr(sys, "argv", ["bf16_emulation.py", "--runs", "1"])
    module.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["precision"] for r in lines] == list(module.PRECISIONS)
    assert all(
        r["seconds_per_step"] > 0 and r["cpu_native_bf16"] == cbst.device.cpu_has_native_bf16() for r in lines
    )
