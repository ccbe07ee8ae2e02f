"""The transformer families through every command on a tiny synthetic benchmark.

``daformer_mit_b0`` (output stride 4, inputs padded to 32) and ``dinov2_vit_s14`` (stride 7,
padded to 14) run ``train-source``, a CBST-SP round of ``self-train`` (prior, mining, the
probability cache, pseudo-labels), ``evaluate`` and ``report`` from the command line, in one
process, and DINOv2's round (the family padded to its patch size) again as two torchrun
processes (CPU, gloo; train-source under torchrun runs the same training loop, tested with the
small model in test_distributed.py), with randomly initialised encoders (no weights offline).
The 64x32 images are not multiples of DINOv2's 14, so padding and cropping back are exercised
at both strides.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cbst import io
from cbst.checkpoints import read_meta
from cbst.cli import main
from cbst.models import build_model, load_strict, read_state_dict
from test_distributed import _one_process, _torchrun

FAMILIES = ("daformer_mit_b0", "dinov2_vit_s14")
QUIET = ("--device", "cpu", "--num-workers", "0", "--no-progress", "--no-amp")
IMAGE_HW = (32, 64)
"""Height and width of the ``bench`` fixture's images."""


def _train_source_args(bench: Path, arch: str, out: Path, batch: int) -> list[str]:
    """One epoch of the family's optimiser on the 8 source images, 32-px crops."""
    return [
        *("--model", arch, "--data-root", str(bench / "data" / "gta5"), "--output", str(out)),
        *("--batch-images", str(batch), "--crop-size", "32", "--to-epoch", "1"),
        *("--optimizer", "adamw", "--base-lr", "6e-5", "--weight-decay", "0.01", *QUIET),
    ]


def _self_train_args(bench: Path, weights: Path, out: Path, batch: int) -> list[str]:
    """One CBST-SP round: 4 target images, half the 8 source images, every crop mined."""
    data = bench / "data"
    return [
        *("--data-root", str(data / "gta5"), "--data-root-tgt", str(data / "cityscapes")),
        *("--weights", str(weights), "--output", str(out), "--num-round", "1", "--epoch-per-round", "1"),
        *("--init-tgt-port", "0.3", "--init-src-port", "0.5", "--with-prior", "source"),
        *("--mine-port", "1.0", "--batch-images", str(batch), "--crop-size", "32"),
        *("--optimizer", "adamw", "--base-lr", "6e-5", "--score-pseudo-labels", *QUIET),
    ]


def _evaluate_args(bench: Path, checkpoint: Path, out: Path) -> list[str]:
    data = bench / "data" / "cityscapes"
    return [
        *("--dataset", "cityscapes", "--data-root", str(data)),
        *("--checkpoint", str(checkpoint), "--out", str(out), *QUIET),
    ]


def _assert_round_is_real(run: Path, arch: str) -> dict:
    """The round's pseudo-labels cover each image at its own size, its model strict-loads into a
    fresh ``arch`` network, its metrics are recorded; returns its stats."""
    round_0 = run / "round_0"
    labels = sorted((round_0 / "pseudo_labelIds").iterdir())
    assert len(labels) == 4 and all(io.read_label(p).shape == IMAGE_HW for p in labels)
    stats = json.loads((round_0 / "stats.json").read_text())
    assert 0 < stats["selected_fraction"] <= 1 and stats["with_prior"] and stats["mine_id"]
    assert sum(stats["predicted_pixels"].values()) == 4 * IMAGE_HW[0] * IMAGE_HW[1]
    assert (run / "prior.npy").is_file()
    meta = read_meta(round_0 / "model.pt")
    assert meta["arch"] == arch and meta["round"] == 0
    load_strict(build_model(arch, 19), read_state_dict(round_0 / "model.pt"), str(round_0 / "model.pt"))
    metrics = json.loads((round_0 / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and len(metrics["iou"]) == 19
    return stats


@pytest.fixture(scope="module")
def trained_source(bench, tmp_path_factory) -> Callable[[str], Path]:
    """``trained_source(arch)``: the checkpoint of one ``train-source`` epoch of ``arch`` from
    the command line (batches of 2), trained once per module."""
    done: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in done:
            out = tmp_path_factory.mktemp(f"source_{arch}")
            assert main(["train-source", *_train_source_args(bench, arch, out, batch=2)]) == 0
            done[arch] = out / "last.pt"
        return done[arch]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_a_family_runs_every_command(bench, trained_source, tmp_path, arch, capsys):
    source, run = trained_source(arch), tmp_path / "cbst_sp"
    saved = read_meta(source)
    assert saved["arch"] == arch and saved["epoch"] == 1
    assert main(["self-train", *_self_train_args(bench, source, run, batch=2)]) == 0
    _assert_round_is_real(run, arch)
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", *_evaluate_args(bench, run / "round_0" / "model.pt", metrics)]) == 0
    scored = json.loads(metrics.read_text())
    assert scored["images"] == 2 and np.isfinite(scored["miou"]) and scored["pixel_acc"] > 0
    assert main(["report", str(run), "--out", str(tmp_path / "report.html"), "--device", "cpu"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert arch in page and "round_0" in page and page.count("<img") >= 3


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["dinov2_vit_s14"])
def test_a_family_runs_as_two_processes(bench, trained_source, tmp_path, arch):
    """self-train under torchrun (4 images a step: 2 per process); the round's sharded
    evaluation (``evaluate_model``, as ``cbst evaluate`` under torchrun) scores as one process
    does."""
    run = tmp_path / "cbst_sp"
    job = _torchrun("self-train", *_self_train_args(bench, trained_source(arch), run, batch=4))
    assert job.returncode == 0, job.stderr
    assert job.stdout.count("round 0: mIoU") == 1  # the main process alone prints
    _assert_round_is_real(run, arch)
    one = tmp_path / "one.json"
    assert _one_process("evaluate", *_evaluate_args(bench, run / "round_0" / "model.pt", one)) == 0
    sharded = json.loads((run / "round_0" / "metrics.json").read_text())
    assert {k: sharded[k] for k in ("miou", "iou", "pixel_acc")} == {
        k: json.loads(one.read_text())[k] for k in ("miou", "iou", "pixel_acc")
    }


def test_a_crop_too_small_for_a_batch_norm_is_one_line(bench, tmp_path, capsys):
    """DINOv2's stride-56 level of a 32-px crop (padded to 42) is 1x1: one crop cannot train it."""
    args = _train_source_args(bench, "dinov2_vit_s14", tmp_path / "source", batch=1)
    assert main(["train-source", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--crop-size/--batch-images: 1 crop(s) of 42x42 px per process" in err and "Dinov2S14" in err
