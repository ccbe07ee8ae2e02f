"""benchmarks/round_settings.py: rounds from a demo folder's source models, scored on val images
the demo never scores."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbst.demo import DemoSettings, run_demo_seeds
from cbst.synthetic import render_image
from cbst.synthetic.render import DOMAIN_TARGET_VAL

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    num_source=16, num_train=8, num_val=4, source_epochs=1, num_round=1, epoch_per_round=1, batch_images=4
)


def _script(monkeypatch):
    spec = importlib.util.spec_from_file_location("round_settings", REPO / "benchmarks" / "round_settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "FIRST", 4)  # the tiny demo scores val images 0..3
    monkeypatch.setattr(module, "LAST", 7)
    return module


@pytest.mark.slow
def test_a_trial_reruns_the_demos_rounds_and_scores_unseen_val_images(tmp_path, monkeypatch, capsys):
    demo = tmp_path / "demo"
    run_demo_seeds(demo, [0], device="cpu", settings=DemoSettings(**TINY), methods=("CBST",))
    script, out = _script(monkeypatch), tmp_path / "trials"
    settings = [f"--setting={k}={v}" for k, v in TINY.items()]
    argv = ["round_settings.py", "--from", str(demo), "--seeds", "0", "--methods", "CBST", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, *settings, "--device", "cpu"])
    script.main()
    printed = capsys.readouterr().out
    assert "Source: mIoU" in printed and "CBST: mIoU" in printed and "gain" in printed

    # the selection split: val images 4, 5 and 6 of the benchmark, at its size
    images = sorted((out / "selection" / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))
    assert [p.name.split("_")[1] for p in images] == ["000004", "000005", "000006"]
    expected, _ = render_image(0, DOMAIN_TARGET_VAL, 4, (256, 128))
    assert np.array_equal(np.array(Image.open(images[0])), expected)

    # the demo's own settings: the same round as the demo trained (its evaluation changes no weight)
    ours = torch.load(next(out.glob("*/seed_0/cbst/round_0/model.pt")), weights_only=False)["state_dict"]
    demos = torch.load(demo / "seed_0" / "cbst" / "round_0" / "model.pt", weights_only=False)["state_dict"]
    assert ours.keys() == demos.keys() and all(torch.equal(ours[k], demos[k]) for k in ours)
    record = json.loads((out / "trials.jsonl").read_text().splitlines()[-1])
    assert record["seeds"] == [0] and set(record["rows"]) == {"Source", "CBST"}
    assert len(record["rows"]["CBST"]["miou"]) == 1
