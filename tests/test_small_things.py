"""The messages a user meets: convert's key list, the resume hint, report on a source folder, help."""

from __future__ import annotations

import pytest
import torch

from cbst import datasets
from cbst.checkpoints import save_checkpoint
from cbst.cli import build_parser, main
from cbst.models import build_model
from cbst.signals import stop_message


def test_convert_names_a_few_keys_of_the_wrong_arch_and_all_with_verbose(tmp_path, capsys):
    weights = tmp_path / "small.pth"
    torch.save(build_model("small", 19).state_dict(), weights)
    args = ["convert", str(weights), "--arch", "deeplabv2_resnet101", "--num-classes", "19"]
    assert main([*args, "--out", str(tmp_path / "a.pt")]) == 2
    short = capsys.readouterr().err
    assert len(short.splitlines()) == 1 and len(short) < 1500
    assert "missing: " in short and " more" in short
    assert main([*args, "--out", str(tmp_path / "b.pt"), "--verbose"]) == 2
    full = capsys.readouterr().err
    assert len(full) > 4 * len(short) and " more" not in full
    assert "layer4.2.bn3.running_var" in full


def test_an_interrupted_run_names_the_command_that_continues_it():
    argv = ["self-train", "--config", "my run.yaml", "--output", "runs/a"]
    assert stop_message(2, "self-train", argv, False).endswith(
        "resume with: cbst self-train --config 'my run.yaml' --output runs/a --resume"
    )
    assert stop_message(2, "self-train", [*argv, "--resume"], False).endswith("--output runs/a --resume")
    assert stop_message(2, "evaluate", ["evaluate", "--checkpoint", "x.pt"], False).endswith(
        "run the command again to redo it"
    )


def test_report_on_a_source_training_folder_says_what_it_is(tmp_path, capsys):
    run = tmp_path / "source"
    run.mkdir()
    (run / "config.yaml").write_text("model: small\n")
    save_checkpoint(
        run / "last.pt", build_model("small", 19), arch="small", num_classes=19, protocol="cityscapes19"
    )
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "a 'cbst train-source' folder" in err and "takes 'cbst self-train' runs" in err


@pytest.mark.parametrize("command", ["train-source", "self-train", "evaluate", "report"])
def test_help_shows_no_empty_or_repeated_default(command):
    _, subparsers = build_parser()
    text = subparsers[command].format_help()
    assert "(default: None)" not in text
    assert "(required) (default" not in text
    assert "(default: jsonl) (default" not in text


def test_evaluate_out_says_what_was_scored_and_how(bench, tmp_path):
    import hashlib
    import json

    from cbst import __version__

    run = tmp_path / "cbst" / "round_2"
    run.mkdir(parents=True)
    ckpt = run / "model.pt"
    ckpt.write_bytes((bench / "source.pt").read_bytes())
    out = tmp_path / "m.json"
    argv = ["evaluate", "--dataset", "cityscapes", "--data-root", str(bench / "data" / "cityscapes")]
    argv += ["--checkpoint", str(ckpt), "--test-flipping", "--scales", "0.5,1", "--device", "cpu"]
    assert main([*argv, "--num-workers", "0", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["case"] == "cbst/round_2" and result["images"] == 2
    assert result["checkpoint"] == {
        "path": str(ckpt.resolve()),
        "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
    }
    assert result["inference"] == {
        "test_scales": None,
        "scales": [0.5, 1.0],
        "flipping": True,
        "window": None,
    }
    assert result["provenance"]["cbst"] == __version__ and result["provenance"]["precision"] == "float32"


def test_demo_example_panels_are_captioned_and_the_legend_has_every_class_colour():
    import numpy as np

    from cbst.demo import CAPTION_HEIGHT, _captioned, _legend
    from cbst.labels import CITYSCAPES_19

    panel = np.full((20, 256, 3), 7, np.uint8)
    captioned = _captioned(panel, "ground truth")
    assert captioned.shape == (20 + CAPTION_HEIGHT, 256, 3) and np.array_equal(
        captioned[CAPTION_HEIGHT:], panel
    )
    assert (captioned[:CAPTION_HEIGHT] < 128).any()  # the caption's text
    legend = _legend(CITYSCAPES_19, 256).reshape(-1, 3)
    colours = {tuple(int(v) for v in c) for c in np.unique(legend, axis=0)}
    assert {tuple(c) for c in CITYSCAPES_19.colors} <= colours


def test_no_progress_leaves_stderr_without_bars(evaluate_argv, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "PROGRESS_MIN_FILES", 0)  # the bench's two images get a bar too
    assert main(evaluate_argv) == 0
    assert capsys.readouterr().err == ""
    assert main([a for a in evaluate_argv if a != "--no-progress"]) == 0
    assert "verifying" in capsys.readouterr().err
