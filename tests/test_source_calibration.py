"""benchmarks/source_calibration.py: a source model scored on held-out game images, in float32
and in emulated bf16."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from cbst.checkpoints import load_checkpoint
from cbst.device import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]
TINY = ["num_source=8", "num_val=2", "source_epochs=1", "batch_images=4"]


def _calibrate(out: Path, monkeypatch, *flags: str) -> dict:
    spec = importlib.util.spec_from_file_location(
        "source_calibration", REPO / "benchmarks" / "source_calibration.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = [f"--setting={s}" for s in TINY]
    argv = [
        "source_calibration.py",
        "--out",
        str(out),
        "--held-out",
        "3",
        "--device",
        "cpu",
        *settings,
        *flags,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    return json.loads((out / "calibration.json").read_text())


@pytest.mark.slow
def test_it_scores_unseen_game_images_and_records_the_precision(tmp_path, monkeypatch):
    plain = _calibrate(tmp_path / "plain", monkeypatch)
    held_out = (tmp_path / "plain" / "held_out.txt").read_text().split()
    trained = (tmp_path / "plain" / "train.txt").read_text().split()
    assert len(held_out) == 2 * 3 and len(trained) == 2 * 8 and not set(held_out) & set(trained)
    assert set(plain) == {"game held-out", "camera val", "provenance"}
    assert plain["provenance"]["precision"] == ("bf16" if cpu_has_native_bf16() else "float32")
    assert 0 <= plain["game held-out"]["miou"] <= 1

    emulated = _calibrate(tmp_path / "bf16", monkeypatch, "--emulate-bf16")
    assert emulated["provenance"]["precision"] == "bf16"
    assert emulated["provenance"]["cpu_native_bf16"] == cpu_has_native_bf16()
    if not cpu_has_native_bf16():  # trained in another precision: other weights, same seed and crops
        weights = [
            load_checkpoint(tmp_path / run / "source" / "last.pt")[0].state_dict()
            for run in ("plain", "bf16")
        ]
        floats = [name for name, value in weights[0].items() if value.is_floating_point()]
        assert any(not torch.equal(weights[0][name], weights[1][name]) for name in floats)
