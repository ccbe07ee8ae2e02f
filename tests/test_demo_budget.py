"""benchmarks/demo_budget.py: the demo's FLOPs per kind of step, the step counts, and its budget."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from cbst.demo import DEFAULT_METHODS, DemoSettings
from cbst.models import build_model

REPO = Path(__file__).resolve().parents[1]


def _budget_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("demo_budget", REPO / "benchmarks" / "demo_budget.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "demo_budget", module)
    spec.loader.exec_module(module)
    return module


def conv_flops(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """(forward FLOPs of every convolution, those of the first one), from the layers' output
    shapes: 2 * k_h * k_w * C_in / groups * C_out per output pixel."""
    counts: list[int] = []

    def hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        per_pixel = 2 * kh * kw * module.in_channels // module.groups * module.out_channels
        counts.append(per_pixel * output.shape[0] * output.shape[2] * output.shape[3])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(shape))
    for h in handles:
        h.remove()
    return sum(counts), counts[0]


def test_step_flops_match_the_convolutions_arithmetic(monkeypatch):
    budget = _budget_module(monkeypatch)
    settings = DemoSettings(model="small", batch_images=2, crop_size=64, pseudo_flip=True)
    per = budget.step_flops(settings)
    model = build_model("small", 19)
    train_fwd, first = conv_flops(model, (2, 3, 64, 64))
    # backward: the gradient of every conv's weight and of every input but the image's
    assert per["train_step"] == 3 * train_fwd - first
    infer, _ = conv_flops(model, (1, 3, 128, 256))
    assert per["evaluate"] == infer and per["pseudo_label"] == 2 * infer  # flipped: two passes
    assert budget.step_flops(dataclasses.replace(settings, pseudo_flip=False))["pseudo_label"] == infer


def test_a_grouped_convolution_backward_counts_its_own_multiplications(monkeypatch):
    """torch's formula counts a depthwise conv's weight gradient as a dense conv's (8x here)."""
    budget = _budget_module(monkeypatch)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    forward = budget.flops(lambda: conv(x))
    assert forward == 2 * 3 * 3 * 8 * 16 * 16
    assert budget.flops(lambda: conv(x).sum().backward()) == 3 * forward  # forward, input and weight grads


def test_step_counts_follow_the_round_schedule(monkeypatch):
    budget = _budget_module(monkeypatch)
    s = DemoSettings(num_source=400, num_train=200, num_val=100, source_epochs=40, batch_images=8)
    counts = budget.step_counts(s, ("ST", "CBST"))
    # source portions 0.5, 0.55, 0.6 of 400 images plus the 200 target images, batches of 8
    assert counts["round_train_steps"] == 2 * ((200 + 200) // 8 + (220 + 200) // 8 + (240 + 200) // 8)
    assert counts["source_train_steps"] == 40 * 50
    assert counts["pseudo_label_images"] == 2 * 3 * 200
    assert counts["evaluate_images"] == 100 * (1 + 2 * 3) + 3 * 3


def test_the_demo_fits_its_budget_of_15_tflop(monkeypatch):
    records = _budget_module(monkeypatch).budget(DemoSettings(), DEFAULT_METHODS)
    total = records[-1]
    assert total["kind"] == "total" and total["model"] == DemoSettings().model
    assert abs(sum(r["tflop"] for r in records[:-1]) - total["tflop"]) < 0.05
    assert total["tflop"] <= 15
