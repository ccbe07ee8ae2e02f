"""The ``cbst`` command line: help on every command, YAML configs as defaults, clear errors."""

from pathlib import Path

import pytest
import yaml

from cbst.cli import COMMANDS, _apply_config, build_parser, main

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
    required = {"train-source": ["--data-root", "d", "--output", "o"],
                "self-train": ["--data-root", "d", "--data-root-tgt", "t", "--weights", "w.pt",
                               "--output", "o"]}[command]
    argv = [command, "--config", str(path)] + required
    _apply_config(argv, subparsers)
    args = parser.parse_args(argv)
    for key, value in yaml.safe_load(path.read_text()).items():
        got = getattr(args, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_config_can_supply_required_options_and_flags_override_it(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data_root: /data/gta\ndata-root-tgt: /data/cs\nweights: w.pt\noutput: out\n"
                   "num_round: 4\n")
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


def test_list_and_range_options_parse_and_reject_bad_values(capsys):
    parser, _ = build_parser()
    base = ["self-train", "--data-root", "d", "--data-root-tgt", "t", "--weights", "w", "--output", "o"]
    args = parser.parse_args(base + ["--pseudo-scales", "0.75,1.0,1.25", "--scale-rate-range", "0.5,1.5"])
    assert args.pseudo_scales == (0.75, 1.0, 1.25) and args.scale_rate_range == (0.5, 1.5)
    for bad in (["--pseudo-scales", "0,1"], ["--scale-rate-range", "1.3,0.7"],
                ["--scale-rate-range", "0.7"]):
        with pytest.raises(SystemExit):
            parser.parse_args(base + bad)
    assert "LO,HI" in capsys.readouterr().err
