"""Options declared once: flags, config keys, saved runs, resumes and help all come from them."""

import dataclasses
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cbst import options
from cbst.cli import COMMANDS, _apply_config, build_parser, main
from cbst.commands import self_train
from cbst.config import SelfTrainConfig, SourceTrainConfig
from cbst.errors import ConfigError
from cbst.selftrain import _PLAN_OPTIONS, _STAGE_OPTIONS, _write_config
from cbst.sourcetrain import _SOURCE_RESUME_FREE
from cbst.sourcetrain import _write_config as write_source_config

SRC = Path(__file__).resolve().parents[1] / "src"


def _parse(argv: list[str]):
    parser, subparsers = build_parser()
    _apply_config(argv, subparsers)
    return parser.parse_args(argv)


def _run_config(tmp_path: Path, **kw) -> SelfTrainConfig:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    base = dict(
        weights=str(weights),
        output=str(tmp_path / "run"),
        data_root=str(tmp_path / "gta"),
        data_root_tgt=str(tmp_path / "cs"),
        num_round=3,
        base_lr=0.01,
        kc_policy="global",
        pseudo_scales=(0.75, 1.0),
        scale_rate_range=(0.5, 1.5),
        test_flipping=False,
        amp=False,
        threshold_bins=1024,
        device="cpu",
        num_workers=0,
        progress=False,
    )
    return SelfTrainConfig(**{**base, **kw})


def test_the_resume_rules_are_those_written_by_hand_before():
    data = {"weights", "dataset", "data_root", "split", "list_file"}
    data |= {"dataset_tgt", "data_root_tgt", "split_tgt", "list_tgt", "num_classes"}
    pseudo = {"kc_policy", "with_prior", "test_scales", "test_flipping", "pseudo_scales"}
    pseudo |= {"exact_thresholds", "threshold_bins", "pseudo_batch", "mine_id_number", "mine_thresh"}
    pseudo |= {"amp", "score_pseudo_labels", "lr_weight_ent"}
    pseudo |= {"save_color"}  # added with the colour pseudo-label PNGs
    train = {"seed", "batch_images", "crop_size", "scale_rate_range", "origin_size", "origin_size_tgt"}
    train |= {"mine_port", "momentum", "weight_decay", "amp", "mr_weight_kld", "mr_weight_src"}
    train |= {"lr_weight_ent", "with_prior", "sync_bn"}
    train |= {"optimizer", "warmup_iters", "clip_grad_norm", "loss"}  # added with cbst.optim and LOSSES
    evaluation = {
        "dataset_tgt",
        "data_root_tgt",
        "num_classes",
        "eval_split",
        "eval_long_side",
        "eval_flipping",
    }
    assert {k: set(v) for k, v in _STAGE_OPTIONS.items()} == {
        "pseudo": data | pseudo,
        "train": data | train,
        "eval": evaluation,
        "source": {"weights", "amp"} | evaluation,  # the source model's evaluation before round 0
    }
    assert {k: set(v) for k, v in _PLAN_OPTIONS.items()} == {
        "tgt_portion": {"init_tgt_port", "step_tgt_port", "max_tgt_port"},
        "src_portion": {"init_src_port", "step_src_port", "max_src_port"},
        "lr": {"base_lr", "lr_decay"},
        "start_epoch": {"epoch_per_round"},
        "end_epoch": {"epoch_per_round"},
        "source_seed": {"source_sample_policy", "seed"},
    }
    assert set(_SOURCE_RESUME_FREE) == {
        "output",
        "resume",
        "device",
        "num_workers",
        "progress",
        "tensorboard",
        "compile",
        "grad_checkpointing",  # added with the transformer architectures: the same weights, less memory
        "keep_checkpoints",
        "save_interval",
        "loggers",
    }


def test_a_runs_saved_config_reruns_it_in_a_new_folder(tmp_path):
    cfg = _run_config(tmp_path)
    _write_config(Path(cfg.output), cfg)
    args = _parse(["self-train", "--config", str(Path(cfg.output) / "config.yaml"), "--output", "new"])
    again = self_train.config_from_args(args)
    assert again.output == "new"
    assert again.saved_form() == {**cfg.saved_form(), "output": str(Path("new").resolve())}


def test_a_source_runs_saved_config_reruns_it(tmp_path):
    cfg = SourceTrainConfig(
        data_root=str(tmp_path / "gta"),
        output=str(tmp_path / "src"),
        scale_range=(0.5, 1.5),
        lr_steps=(10, 20),
        model="small",
        amp=False,
    )
    write_source_config(Path(cfg.output), cfg)
    saved = Path(cfg.output) / "config.yaml"
    assert yaml.safe_load(saved.read_text())["scale_range"] == [0.5, 1.5]
    resumed = options.from_args(
        SourceTrainConfig, _parse(["train-source", "--output", cfg.output, "--resume"])
    )
    assert resumed.resume and (resumed.model, resumed.scale_range, resumed.lr_steps) == (
        "small",
        (0.5, 1.5),
        (10, 20),
    )
    args = _parse(["train-source", "--config", str(saved), "--out", str(tmp_path / "b")])
    again = options.from_args(SourceTrainConfig, args)
    assert dataclasses.replace(again, output=cfg.output) == dataclasses.replace(
        cfg, data_root=str(Path(cfg.data_root).resolve()), output=str(Path(cfg.output).resolve())
    )


def test_resume_needs_only_the_output_folder(tmp_path):
    cfg = _run_config(tmp_path, device="cuda", num_workers=3)
    _write_config(Path(cfg.output), cfg)
    args = _parse(["self-train", "--output", cfg.output, "--resume", "--num-round", "5"])
    resumed = self_train.config_from_args(args)
    assert resumed.resume and resumed.num_round == 5
    assert resumed.device == "auto"  # runtime options are not taken from the saved run
    same = dataclasses.replace(
        resumed, resume=False, num_round=3, device="cuda", num_workers=3, progress=False
    )
    assert same.saved_form() == cfg.saved_form()
    with pytest.raises(SystemExit):  # without --resume the folder's options are not read
        main(["self-train", "--output", cfg.output, "--bogus"])
    assert main(["self-train", "--output", cfg.output]) == 2


def test_yaml_keys_are_option_names_with_dashes_or_underscores(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "data-root: /d\ndata_root_tgt: /t\nweights: w.pt\nout: o\nno-progress: true\nlist: l.txt\n"
        "no-amp: true\nseed-int: 3\nscale-range: [0.5, 1.5]\nno_test_flipping: true\neval-flipping: yes\n"
    )
    config = self_train.config_from_args(_parse(["self-train", "--config", str(cfg)]))
    assert (config.data_root, config.data_root_tgt, config.output, config.list_file) == (
        "/d",
        "/t",
        "o",
        "l.txt",
    )
    assert (config.progress, config.amp, config.test_flipping, config.eval_flipping) == (
        False,
        False,
        False,
        True,
    )
    assert (config.seed, config.scale_rate_range) == (3, (0.5, 1.5))


@pytest.mark.parametrize(
    "text, words",
    [
        ("num_round: [1, 2]\n", ["num_round", "integer"]),
        ("base-lr: -1\n", ["base-lr", "positive"]),
        ("weights: null\n", ["weights", "required"]),
        ("kc_policy: foo\n", ["kc_policy", "cb, global"]),
        ("init_tgt_port: 1.5\n", ["init_tgt_port", "[0, 1]"]),
        ("pseudo_scales: [0, 1]\n", ["pseudo_scales", "positive"]),
        ("no-amp: 3\n", ["no-amp", "true or false"]),
        ("device: tpu\n", ["device", "cuda:N"]),
        ("num_rounds: 4\n", ["num_rounds", "did you mean num-round"]),
    ],
)
def test_config_values_are_checked_when_read(tmp_path, capsys, text, words):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert main(["self-train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(cfg) in err
    for word in words:
        assert word in err


def test_a_bad_value_in_a_saved_run_names_the_file_and_option(tmp_path, capsys):
    cfg = _run_config(tmp_path)
    _write_config(Path(cfg.output), cfg)
    saved = Path(cfg.output) / "config.yaml"
    saved.write_text(saved.read_text().replace("num_round: 3", "num_round: three"))
    assert main(["self-train", "--output", cfg.output, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(saved) in err and "num_round" in err


def _yaml_bomb(kind: str) -> str:
    """A configuration text of at most a few hundred kB that a naive load blows up."""
    if kind == "laughs":  # 9 levels of 9 aliases: 9^9 strings
        lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        for prev, name in zip("abcdefgh", "bcdefghi"):
            lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
        return "\n".join(lines) + "\n"
    if kind == "deep":
        return "x: " + "[" * 5000 + "]" * 5000 + "\n"
    if kind == "block":
        return "x:\n  " + "- " * 5000 + "a\n"
    if kind == "value":  # within the node limit, but 1 GB once written out in a message
        lines = [f'long: &s "{"x" * 100_000}"']
        for level, prev in enumerate(("s", "l1", "l2", "l3"), start=1):
            lines.append(f"l{level}: &l{level} [{', '.join(['*' + prev] * 10)}]")
        return "\n".join(lines) + "\nbase_lr: *l4\n"
    return "num_round: 0x" + "f" * 6000 + "\n"  # an integer Python would build, then fail to print


@pytest.mark.parametrize(
    "kind, message",
    [
        ("laughs", "expands to more than"),
        ("deep", "nested more than"),
        ("block", "nested more than"),
        ("value", "base_lr: --base-lr expected a number, got \\[\\[\\[...\\]"),
        ("integer", "an integer of 6002 characters, more than 40"),
    ],
)
def test_yaml_bombs_are_refused_quickly(tmp_path, capsys, kind, message):
    text = _yaml_bomb(kind)
    assert len(text) < 200_000
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(text)
    started = time.process_time()  # CPU time: the machine may be busy
    assert main(["self-train", "--config", str(cfg)]) == 2
    assert time.process_time() - started < 1.0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(cfg) in err and len(err) < 500, err[:500]
    assert re.search(message, err), err


def test_a_value_yaml_cannot_build_is_named_with_its_file():
    with pytest.raises(ConfigError, match="dates: not a valid configuration file: month must be in 1..12"):
        options.load_yaml("seed: 2001-13-45\n", "dates")


def test_values_quoted_in_messages_are_cut_short():
    assert options.shown("abc") == "'abc'" and options.shown((1.3, 0.7)) == "(1.3, 0.7)"
    assert options.shown(2**100) == "<an integer of 101 bits>"
    assert len(options.shown([["x" * 10**6] * 10**3] * 10**3)) < 500


@pytest.mark.parametrize("command", [c.replace("_", "-") for c in COMMANDS])
def test_every_option_shows_its_default_in_help(command):
    _, subparsers = build_parser()
    for action in subparsers[command]._actions:
        if action.dest in ("help",) or not action.option_strings:
            continue
        text = action.help or ""
        assert "default" in text.lower() or "(required)" in text, (command, action.option_strings, text)
        assert "(default: None)" not in text and "(required) (default" not in text, text


def test_self_train_help_shows_the_hidden_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["self-train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("rounds (default: 12)", "round (default: 2)", "(default: 0.0001)", "(default: 500)"):
        assert shown in out


HELP_WITHOUT_TORCH = """
import sys
from cbst.cli import COMMANDS, main
for argv in [["--help"]] + [[c.replace("_", "-"), "--help"] for c in COMMANDS]:
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "timm", "segmentation_models_pytorch") if m in sys.modules))
"""


def test_help_imports_no_torch():
    out = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(SRC)},
    ).stdout
    assert out.splitlines()[-1] == "[]", out[-300:]


EXTENSION = '''
from cbst.models.small import SmallSegNet
from cbst.registry import ARCHITECTURES

@ARCHITECTURES.register("my_net")
class MyNet(SmallSegNet):
    """A user's network."""
'''


def test_import_adds_a_users_architecture_to_the_choices(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_ext_cli.py").write_text(textwrap.dedent(EXTENSION))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(SystemExit):
        main(["train-source", "--import", "my_ext_cli", "--help"])
    assert "my_net" in capsys.readouterr().out
    args = _parse(
        ["train-source", "--import", "my_ext_cli", "--model", "my_net", "--data-root", "d", "--out", "o"]
    )
    assert args.model == "my_net"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("imports: [my_ext_cli]\nmodel: my_net\n")
    assert _parse(["train-source", "--config", str(cfg)]).model == "my_net"
    assert main(["train-source", "--import", "no_such_module_here,my_ext_cli", "--help"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--import no_such_module_here" in err


def test_only_cbst_errors_are_one_line_and_bugs_show_their_traceback(monkeypatch, tmp_path, capsys):
    import errno

    from cbst.commands import demo

    def fail(exc):
        def run(args):
            raise exc

        return run

    monkeypatch.setattr(demo, "run", fail(KeyError("a bug")))
    with pytest.raises(KeyError):
        main(["demo"])
    monkeypatch.setattr(demo, "run", fail(ValueError("a bug too")))
    with pytest.raises(ValueError):
        main(["demo"])
    monkeypatch.setattr(demo, "run", fail(ConfigError("--seed: wrong")))
    assert main(["demo"]) == 2 and "--seed: wrong" in capsys.readouterr().err
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.png"))
    monkeypatch.setattr(demo, "run", fail(full))
    assert main(["demo"]) == 2
    assert f"{tmp_path / 'x.png'}: no space left" in capsys.readouterr().err
    background = OSError(f"{tmp_path / 'y.png'}: cannot write (OSError: disk full)")
    background.__cause__ = full
    monkeypatch.setattr(demo, "run", fail(background))
    assert main(["demo"]) == 2
    assert f"{tmp_path / 'y.png'}: no space left" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tpu", "meta", ""])
def test_a_bad_device_is_one_line_naming_the_option(name):
    from cbst.device import select_device

    with pytest.raises(ConfigError, match="--device"):
        select_device(name)
