"""What a new user hits: one-line errors (exit 2) naming the path or option, outputs checked before
any work, no silent overwrite, options validated before a run writes anything, resumption that
compares what matters, and files readable by the group and others under umask 022."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cbst import selftrain
from cbst.checkpoints import save_checkpoint
from cbst.checks import ConfigError
from cbst.cli import main
from cbst.datasets import build_dataset
from cbst.evaluation import evaluate_predictions
from cbst.io import DataError, read_label, write_json, write_npy, write_png, write_text
from cbst.models import build_model
from cbst.selftrain import SelfTrainConfig, self_train
from cbst.sourcetrain import SourceTrainConfig, train_source

# ----------------------------------------------------------------------- output destinations


def test_outputs_of_the_wrong_kind_are_refused_before_any_work(tmp_path, one_line_error):
    folder, file = tmp_path / "folder", tmp_path / "file.pt"
    folder.mkdir()
    file.write_bytes(b"not read")
    evaluate = ["evaluate", "--data-root", str(tmp_path / "nowhere"), "--checkpoint", str(file)]
    assert main(evaluate + ["--out", str(folder)]) == 2
    one_line_error(str(folder), "is a folder", "--out")
    assert main(evaluate + ["--output", str(file)]) == 2
    one_line_error(str(file), "is a file", "--output")
    assert main(evaluate + ["--out", str(file / "m.json")]) == 2
    one_line_error(str(file / "m.json"), "is a file, not a folder")
    assert main(["convert", str(file), "--arch", "small", "--num-classes", "19", "--out", str(folder)]) == 2
    one_line_error(str(folder), "is a folder")
    assert (
        main(["prior", "--dataset", "gta5", "--data-root", str(tmp_path / "nowhere"), "--out", str(folder)])
        == 2
    )
    one_line_error(str(folder), "is a folder")


def test_self_train_output_that_is_a_file_is_one_line(self_train_argv, tmp_path, one_line_error):
    file = tmp_path / "run"
    file.write_text("")
    assert main([*self_train_argv, "--output", str(file)]) == 2
    one_line_error(str(file), "--output needs a folder")


def test_unwritable_output_is_named_before_any_work(tmp_path, one_line_error, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.TemporaryFile", denied)  # root may write anywhere: simulate
    file = tmp_path / "in.pt"
    file.write_bytes(b"not read")
    out = tmp_path / "out.pt"
    assert main(["convert", str(file), "--arch", "small", "--num-classes", "19", "--out", str(out)]) == 2
    one_line_error(str(out), "cannot be written", "Permission denied")


def test_os_errors_during_a_write_name_the_destination(tmp_path, one_line_error, monkeypatch):
    from cbst.commands import make_synthetic as command

    def fail(*args, **kwargs):
        write_json(tmp_path / "f", {})  # a file ...
        write_json(tmp_path / "f" / "x.json", {})  # ... where a folder is needed

    monkeypatch.setattr(command, "run", fail)
    assert main(["make-synthetic", str(tmp_path / "out")]) == 2
    one_line_error(str(tmp_path / "f"), "is a file where a folder is expected")


def test_existing_outputs_are_kept_unless_overwrite(bench, evaluate_argv, tmp_path, one_line_error):
    out = tmp_path / "metrics.json"
    out.write_text("keep me")
    base = [*evaluate_argv, "--out", str(out)]
    assert main(base) == 2
    one_line_error(str(out), "--overwrite")
    assert out.read_text() == "keep me"
    assert main(base + ["--overwrite"]) == 0
    assert json.loads(out.read_text())["images"] == 2
    source = bench / "source.pt"
    before = source.read_bytes()
    for extra in ([], ["--overwrite"]):  # a command never writes over its own input
        assert (
            main(
                ["convert", str(source), "--arch", "small", "--num-classes", "19", "--out", str(source)]
                + extra
            )
            == 2
        )
        one_line_error(str(source), "input")
    assert source.read_bytes() == before


# -------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_end_with_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_text(tmp_path / "b.yaml", "x: 1\n")
        write_npy(tmp_path / "c.npy", np.zeros(3))
        write_png(tmp_path / "d" / "e.png", np.zeros((4, 4), np.uint8))
        save_checkpoint(
            tmp_path / "f.pt", build_model("small", 19), arch="small", num_classes=19, protocol="cityscapes19"
        )
    finally:
        os.umask(old)
    for name in ("a.json", "b.yaml", "c.npy", "d/e.png", "f.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.yaml", "c.npy", "d", "f.pt"]


# ------------------------------------------------------------------------------ bad content


def test_binary_list_file_and_random_weights_are_named(bench, tmp_path, one_line_error):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=f"{junk}: not a text list file"):
        build_dataset("cityscapes", bench / "data" / "cityscapes", split="val", list_file=junk)
    assert (
        main(["evaluate", "--data-root", str(bench / "data" / "cityscapes"), "--checkpoint", str(junk)]) == 2
    )
    err = one_line_error(str(junk), "not a readable PyTorch checkpoint")
    assert "weights_only" not in err
    assert (
        main(
            [
                "convert",
                str(junk.rename(tmp_path / "junk.pth")),
                "--arch",
                "small",
                "--num-classes",
                "19",
                "--out",
                str(tmp_path / "m.pt"),
            ]
        )
        == 2
    )
    err = one_line_error("junk.pth", "not a readable PyTorch weights file")
    assert "weights_only" not in err


def test_pickled_model_is_refused_without_torch_advice(tmp_path, one_line_error):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    assert (
        main(
            ["convert", str(path), "--arch", "small", "--num-classes", "19", "--out", str(tmp_path / "m.pt")]
        )
        == 2
    )
    err = one_line_error(str(path), "pickled Python objects")
    assert "weights_only" not in err


def test_prediction_values_outside_the_label_table_are_refused(bench, tmp_path):
    val = build_dataset("cityscapes", bench / "data" / "cityscapes", split="val", with_labels=True)
    for sample in val.samples:
        labels = read_label(sample.label)
        if sample is val.samples[-1]:
            labels[0, 0] = 250
        write_png(tmp_path / f"{sample.name}.png", labels)
    bad = tmp_path / f"{val.samples[-1].name}.png"
    with pytest.raises(DataError, match=f"{bad}: label values 250 are not in"):
        evaluate_predictions(tmp_path, val, progress=False)


def test_convert_warns_about_stored_gammas(capsys):
    from cbst.models.resnet38 import warn_stored_gammas as _warn_stored_gammas

    params = {
        "arg:bn2_gamma": np.ones(4, np.float32),
        "arg:bn3_gamma": np.full(4, 0.5, np.float32),
        "arg:bn4_beta": np.zeros(4, np.float32),
        "aux:bn5_gamma": np.array([1, 2], np.float32),
    }
    _warn_stored_gammas(Path("w.params"), params)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "w.params" in err
    assert "bn3, bn5" in err and "bn2" not in err
    _warn_stored_gammas(Path("w.params"), {"arg:bn2_gamma": np.ones(4, np.float32)})
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------- validation and resume


@pytest.mark.parametrize(
    "options, flag",
    [
        ({"base_lr": -1.0}, "--base-lr"),
        ({"base_lr": float("nan")}, "--base-lr"),
        ({"mine_port": 2.0}, "--mine-port"),
        ({"init_src_port": -0.2}, "--init-src-port"),
        ({"init_tgt_port": 1.5}, "--init-tgt-port"),
        ({"momentum": -0.1}, "--momentum"),
        ({"max_tgt_port": 1.0, "step_tgt_port": 0.6, "num_round": 3}, "--step-tgt-port"),
        ({"scale_rate_range": (1.3, 0.7)}, "--scale-rate-range"),
        ({"batch_images": 9}, "--batch-images"),
    ],
)
def test_self_train_options_are_checked_before_anything_is_written(
    self_train_config, tmp_path, options, flag
):
    with pytest.raises(ConfigError, match=flag):
        self_train(self_train_config(tmp_path / "run", **options))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "options, flag",
    [
        ({"base_lr": -1.0}, "--base-lr"),
        ({"crop_size": 0}, "--crop-size"),
        ({"scale_range": (0.0, 1.0)}, "--scale-rate-range"),
        ({"batch_images": 9}, "--batch-images"),
        ({"eval_dataset": "cityscapes"}, "--eval-root"),
        ({"weight_decay": -1.0}, "--weight-decay"),
    ],
)
def test_source_options_are_checked_before_anything_is_written(source_train_config, tmp_path, options, flag):
    config = source_train_config(tmp_path / "run", **options)
    with pytest.raises(ConfigError, match=flag):
        train_source(config)
    assert not (tmp_path / "run").exists()


def _started_run(
    make: Callable[..., SelfTrainConfig], out: Path, finished: list[str], **kw
) -> SelfTrainConfig:
    """A run folder as a run that finished ``finished`` leaves it (config.yaml and state.json);
    ``make`` is the ``self_train_config`` fixture."""
    cfg = make(out, **kw)
    selftrain._write_config(out, cfg)
    (out / "state.json").write_text(json.dumps({"finished": finished}))
    return cfg


def test_resume_accepts_the_same_paths_written_differently_and_a_moved_run(
    bench, self_train_config, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    rel = Path(os.path.relpath(bench, tmp_path))
    cfg = dataclasses.replace(
        _started_run(self_train_config, tmp_path / "runs" / "a", ["0/pseudo", "0/train"]),
        weights=str(rel / "source.pt"),
        data_root=f"./{rel}/data/gta5/",
        data_root_tgt=str(rel / "data" / "cityscapes"),
        resume=True,
    )
    for output in ("./runs/a", "runs/a/", str(tmp_path / "runs" / "a")):
        selftrain._prepare_output(dataclasses.replace(cfg, output=output))
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    selftrain._prepare_output(
        dataclasses.replace(
            cfg,
            output="../runs/a",
            weights=str(bench / "source.pt"),
            data_root=str(bench / "data" / "gta5"),
            data_root_tgt=str(bench / "data" / "cityscapes"),
        )
    )
    (tmp_path / "runs" / "a").rename(tmp_path / "moved")
    selftrain._prepare_output(self_train_config(tmp_path / "moved", resume=True))
    with pytest.raises(ConfigError, match="--weights"):
        selftrain._prepare_output(
            self_train_config(tmp_path / "moved", resume=True, weights=str(tmp_path / "other.pt"))
        )


def test_a_failed_stage_can_be_resumed_with_a_corrected_option(self_train_config, tmp_path):
    out = tmp_path / "run"
    cfg = _started_run(self_train_config, out, ["0/pseudo"], base_lr=1e6)
    fixed = dataclasses.replace(cfg, base_lr=0.01, resume=True)
    selftrain._prepare_output(fixed)  # round 0's training never finished: a new lr is fine
    with pytest.raises(ConfigError, match="init-tgt-port"):
        selftrain._prepare_output(dataclasses.replace(fixed, init_tgt_port=0.5))
    (out / "state.json").write_text(json.dumps({"finished": ["0/pseudo", "0/train", "0/eval"]}))
    with pytest.raises(ConfigError, match=r"round 0's train stage .* resume with --base-lr 1000000.0"):
        selftrain._prepare_output(fixed)
    # lr_decay only changes rounds >= 1, and more rounds change no finished stage
    selftrain._prepare_output(dataclasses.replace(cfg, lr_decay=2.0, num_round=4, resume=True))


@pytest.mark.slow
def test_diverging_self_training_stops_in_one_line_and_resumes_with_a_lower_lr(
    self_train_argv, tmp_path, one_line_error
):
    argv = [
        *self_train_argv,
        "--output",
        str(tmp_path / "run"),
        "--num-round",
        "1",
        "--epoch-per-round",
        "1",
        "--batch-images",
        "1",
        "--crop-size",
        "32",
        "--device",
        "cpu",
        "--no-progress",
        "--eval-split",
        "none",
    ]
    assert main(argv + ["--base-lr", "1e30"]) == 2
    one_line_error("non-finite", "epoch 1")
    assert json.loads((tmp_path / "run" / "state.json").read_text())["finished"] == ["0/pseudo"]
    assert main(argv + ["--base-lr", "1e-3", "--resume"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["base_lr"] == 1e-3 and (tmp_path / "run" / "round_0" / "model.pt").is_file()


@pytest.mark.slow
def test_train_source_resume_refuses_a_changed_lr_and_keeps_the_config(
    bench, source_train_config, tmp_path, monkeypatch
):
    def config(**kw) -> SourceTrainConfig:
        return source_train_config(tmp_path / "run", **{"base_lr": 0.01, "resume": True, **kw})

    train_source(config())
    with pytest.raises(ConfigError, match=r"1 finished epochs .*--base-lr 0.01"):
        train_source(config(base_lr=1e6, to_epoch=2))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["base_lr"] == 0.01
    monkeypatch.chdir(bench)  # the same data written relative to another folder, more epochs
    train_source(config(data_root="data/gta5/", to_epoch=2))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["to_epoch"] == 2
    with pytest.raises(ConfigError, match="--to-epoch"):
        train_source(config(lr_type="poly", to_epoch=3))


def test_non_finite_probabilities_stop_the_thresholds_in_one_error():
    from cbst.thresholds import ThresholdEstimator

    probs = torch.full((1, 19, 4, 4), 1 / 19)
    probs[0, :, 1, 1] = float("nan")  # a diverged model
    for exact in (False, True):
        estimator = ThresholdEstimator(19, "cb", exact=exact)
        estimator.update(probs)
        with pytest.raises(FloatingPointError, match="not finite"):
            estimator.thresholds(0.5)
