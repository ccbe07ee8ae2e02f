"""The ``cbst`` command line: help on every command, YAML configs as defaults, clear errors."""

from pathlib import Path

import pytest
import yaml

from cbst.cli import COMMANDS, _apply_config, _load_config, build_parser, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("command", [c.replace("_", "-") for c in COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"cbst {command}" in out and "--config" in out


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_as_defaults(path):
    command = "train-source" if "_source_" in path.name else "self-train"
    parser, subparsers = build_parser()
    required = {
        "train-source": ["--data-root", "d", "--output", "o"],
        "self-train": ["--data-root", "d", "--data-root-tgt", "t", "--weights", "w.pt", "--output", "o"],
    }[command]
    argv = [command, "--config", str(path)] + required
    _apply_config(argv, subparsers)
    args = parser.parse_args(argv)
    values = _load_config(str(path), subparsers[command])
    assert set(values) >= set(yaml.safe_load(path.read_text())) - {"_base_"}
    for key, value in values.items():
        got = getattr(args, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_config_can_supply_required_options_and_flags_override_it(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "data_root: /data/gta\ndata-root-tgt: /data/cs\nweights: w.pt\noutput: out\nnum_round: 4\n"
    )
    parser, subparsers = build_parser()
    argv = ["self-train", "--config", str(cfg), "--num-round", "2"]
    _apply_config(argv, subparsers)
    args = parser.parse_args(argv)
    assert (args.data_root, args.data_root_tgt, args.num_round) == ("/data/gta", "/data/cs", 2)


def test_bad_config_is_an_error_naming_the_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("num_rounds: 4\n")
    assert main(["self-train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "num_rounds" in err
    assert main(["demo", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_spatial_prior_config_differs_from_cbst_only_by_the_prior():
    _, subparsers = build_parser()
    cbst, sp, st = (
        _load_config(str(CONFIGS / f"gta2city_{name}.yaml"), subparsers["self-train"])
        for name in ("cbst", "cbst_sp", "st")
    )
    assert sp == {**cbst, "with_prior": "source"}
    assert st == {**cbst, "kc_policy": "global"} and cbst["kc_policy"] == "cb"


def test_base_is_relative_to_the_including_file_and_its_keys_are_overridden(tmp_path, monkeypatch):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "a.yaml").write_text("num_round: 3\nseed: 1\nbase_lr: 0.5\n")
    (tmp_path / "bases" / "b.yaml").write_text("_base_: a.yaml\nseed: 2\n")
    (tmp_path / "c.yaml").write_text("seed: 7\n")
    run = tmp_path / "run.yaml"
    run.write_text("_base_: [bases/b.yaml, c.yaml]\nnum_round: 4\n")
    monkeypatch.chdir(tmp_path / "bases")  # paths resolve against the including file, not the cwd
    _, subparsers = build_parser()
    assert _load_config(str(run), subparsers["self-train"]) == {"num_round": 4, "seed": 7, "base_lr": 0.5}


@pytest.mark.parametrize("case", ["missing", "cycle", "unknown", "not_a_name"])
def test_base_errors_are_one_line_naming_the_file(tmp_path, capsys, case):
    run, other = tmp_path / "run.yaml", tmp_path / "other.yaml"
    run.write_text("_base_: other.yaml\n")
    other.write_text(
        {
            "missing": "_base_: gone.yaml\n",
            "cycle": "_base_: run.yaml\n",
            "unknown": "num_rounds: 2\n",
            "not_a_name": "_base_: {a: 1}\n",
        }[case]
    )
    assert main(["self-train", "--config", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {
        "missing": "gone.yaml",
        "cycle": "cycle",
        "unknown": "num_rounds",
        "not_a_name": "_base_ must be",
    }[case] in err
    assert str(other) in err


def test_list_and_range_options_parse_and_reject_bad_values(capsys):
    parser, _ = build_parser()
    base = ["self-train", "--data-root", "d", "--data-root-tgt", "t", "--weights", "w", "--output", "o"]
    args = parser.parse_args(base + ["--pseudo-scales", "0.75,1.0,1.25", "--scale-rate-range", "0.5,1.5"])
    assert args.pseudo_scales == (0.75, 1.0, 1.25) and args.scale_rate_range == (0.5, 1.5)
    for bad in (["--pseudo-scales", "0,1"], ["--scale-rate-range", "1.3,0.7"], ["--scale-rate-range", "0.7"]):
        with pytest.raises(SystemExit):
            parser.parse_args(base + bad)
    assert "LO,HI" in capsys.readouterr().err
