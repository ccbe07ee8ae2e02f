"""``cbst demo`` end to end on a tiny benchmark: the table, the JSON and the example images."""

import functools
import json

import numpy as np
import pytest
import yaml

from cbst.cli import main
from cbst.demo import DemoSettings, run_demo, run_demo_seeds


@pytest.mark.slow
def test_demo_writes_the_papers_table_and_results(tmp_path, capsys):
    tiny = DemoSettings(
        num_source=16, num_train=8, num_val=4, source_epochs=1, num_round=1, epoch_per_round=1, batch_images=4
    )
    result = run_demo(tmp_path, seed=0, device="cpu", settings=tiny)
    assert list(result["rows"]) == ["Source", "ST", "CBST", "CBST-SP"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == result["rows"] and saved["seconds"] > 0
    assert set(saved["rows"]["CBST"]["iou"]) >= {"road", "bicycle"}
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0].startswith("Case|mIoU|Road|Sidewalk|Build|") and lines[0].endswith("|Motor|Bike")
    assert [line.split("|")[0] for line in lines[2:]] == ["Source", "ST", "CBST", "CBST-SP"]
    assert len(list((tmp_path / "examples").glob("*.png"))) == 3
    assert (tmp_path / "cbst_sp" / "prior.npy").exists()  # counted on the source labels by self-train
    source = yaml.safe_load((tmp_path / "source" / "config.yaml").read_text())
    assert (source["rcs_temperature"], source["rcs_min_pixels"]) == (0.01, 50)
    assert (tmp_path / "source" / "rcs_class_probs.json").is_file()  # its crops drawn by rare class sampling
    assert not (tmp_path / "cbst" / "prior.npy").exists()
    report = (tmp_path / "report.html").read_text()
    assert "CBST-SP" in report and report.count("<img") > 5


def test_demo_help_names_the_methods(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "CBST-SP" in out and "--seed" in out


@pytest.mark.slow
def test_demo_over_seeds_shares_the_benchmark_and_prints_mean_and_std(tmp_path):
    tiny = DemoSettings(
        num_source=16, num_train=8, num_val=4, source_epochs=1, num_round=1, epoch_per_round=1, batch_images=4
    )
    results = run_demo_seeds(tmp_path, [0, 1], device="cpu", settings=tiny, methods=("CBST",))
    assert (tmp_path / "data" / "synthetic.json").is_file()
    assert not (tmp_path / "seed_0" / "data").exists() and not (tmp_path / "seed_1" / "data").exists()
    saved = [json.loads((tmp_path / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in saved] == [0, 1] and [r["rows"] for r in results] == [r["rows"] for r in saved]
    lines = (tmp_path / "seeds.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| Source", "| CBST"]
    for line, row in zip(lines[2:], ("Source", "CBST")):
        miou = [r["rows"][row]["miou"] for r in saved]
        rare = [r["rare_miou"][row] for r in saved]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{100 * np.mean(miou):.1f} ± {100 * np.std(miou, ddof=1):.1f}"
        assert cells[2] == f"{100 * np.mean(rare):.1f} ± {100 * np.std(rare, ddof=1):.1f}"
        assert cells[3] == ", ".join(f"{100 * v:.1f}" for v in miou)
    report = (tmp_path / "report.html").read_text()
    assert '<td class="name">CBST</td><td class="name">round_0</td><td class="name">0,1</td>' in report
    mtime = (tmp_path / "seed_1" / "results.json").stat().st_mtime
    again = run_demo_seeds(tmp_path, [0, 1], device="cpu", settings=tiny, methods=("CBST",))
    assert [r["rows"] for r in again] == [r["rows"] for r in saved]
    assert (tmp_path / "seed_1" / "results.json").stat().st_mtime == mtime  # reused, not rerun


@pytest.mark.parametrize(
    ("seeds", "message"), [("0,x", "comma list of integers"), ("1,1", "names a seed twice"), ("", "integers")]
)
def test_demo_seeds_option_is_checked(seeds, message, capsys):
    assert main(["demo", "--seeds", seeds, "--out", "/nonexistent/never"]) == 2
    assert message in capsys.readouterr().err


def test_demo_seeds_prints_the_mean_and_std_table(monkeypatch, tmp_path, capsys):
    """The command's --seeds path with the demo itself replaced by recorded results."""
    import cbst.demo as command  # the command imports it when it runs

    def fake(out, seeds, *, device, settings, methods):
        assert seeds == [0, 2] and methods == ("ST", "CBST") and settings.amp is True
        return [
            {
                "rows": {
                    "Source": {"miou": 0.2 + s / 100},
                    "ST": {"miou": 0.22},
                    "CBST": {"miou": 0.24 + s / 100},
                },
                "rare_miou": {"Source": 0.03, "ST": 0.04, "CBST": 0.06},
                "rare_classes": ["pole", "rider"],
                "seconds": 100.0 + s,
            }
            for s in seeds
        ]

    monkeypatch.setattr(command, "run_demo_seeds", fake)
    assert main(["demo", "--seeds", "0,2", "--methods", "ST,CBST", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 seeds (0,2), mean ± std; rare classes: pole, rider" in out
    assert "| Source | 21.0 ± 1.4 | 3.0 ± 0.0 | 20.0, 22.0 | 3.0, 3.0 |" in out
    assert "| CBST | 25.0 ± 1.4 | 6.0 ± 0.0 | 24.0, 26.0 | 6.0, 6.0 |" in out
    assert "seconds per seed: 100, 102" in out


def _record_settings(monkeypatch, tmp_path) -> dict:
    """Replace the demo by a stub that records the settings the command gives it (in the
    returned dict, key ``settings``) and writes an empty table."""
    from cbst import demo

    seen = {}

    def fake_run_demo(out, seed, *, device, settings, methods):
        seen["settings"] = settings
        (tmp_path / "results.md").write_text("table\n")
        return {"rare_miou": {}, "rare_classes": [], "seconds": 1.0, "device": "cpu"}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)  # the command imports it when it runs
    return seen


def test_demo_no_amp_reaches_every_stage(monkeypatch, tmp_path):
    from cbst import demo

    seen = _record_settings(monkeypatch, tmp_path)
    assert main(["demo", "--out", str(tmp_path), "--no-amp"]) == 0
    settings = seen["settings"]
    source = demo.source_config(tmp_path / "s", tmp_path, 0, settings, "cpu")
    row = demo.variant_config("CBST", tmp_path, tmp_path, tmp_path / "w.pt", 0, settings, "cpu")
    assert settings.amp is False and source.amp is False and row.amp is False
    assert source.model == "small_demo" and not row.test_flipping  # the demo's network, one pass
    assert main(["demo", "--out", str(tmp_path)]) == 0 and seen["settings"].amp is True


def test_demo_online_rows_come_from_online_runs(tmp_path):
    tiny = DemoSettings(
        num_source=16,
        num_train=8,
        num_val=4,
        source_epochs=1,
        batch_images=4,
        online_iters=3,
        online_window=2,
        online_eval_interval=3,
        rcs_min_pixels=50,
    )
    result = run_demo(tmp_path, seed=0, device="cpu", settings=tiny, methods=("DACS", "CBST-online"))
    assert list(result["rows"]) == ["Source", "DACS", "CBST-online"]
    for folder, policy in (("dacs", "fixed"), ("cbst_online", "cb")):
        online = json.loads((tmp_path / folder / "results.json").read_text())
        assert (
            online["mode"] == "online"
            and result["rows"][{"dacs": "DACS"}.get(folder, "CBST-online")] == online["final"]
        )
        assert f"kc_policy: {policy}" in (tmp_path / folder / "config.yaml").read_text()
    report = (tmp_path / "report.html").read_text()  # the online rows are in the demo's report
    assert "<h2>mIoU over iterations (online runs)</h2>" in report
    assert '>DACS</td><td class="name">DACS</td>' in report
    assert '>CBST-online</td><td class="name">CBST-online</td>' in report


def test_online_methods_are_names_of_the_demo():
    from cbst.demo import parse_methods

    assert parse_methods("CBST,DACS,CBST-online") == ("CBST", "DACS", "CBST-online")
    assert "DACS" not in parse_methods("all")  # all: the rounds rows; online rows are named
    with pytest.raises(ValueError, match="CBST-online"):
        parse_methods("DAFormer")


def test_demo_model_trains_with_its_familys_recipe(monkeypatch, tmp_path):
    from cbst import demo

    seen = _record_settings(monkeypatch, tmp_path)
    assert main(["demo", "--out", str(tmp_path), "--model", "daformer_mit_b0"]) == 0
    s = seen["settings"]
    configs = [
        demo.source_config(tmp_path / "s", tmp_path, 0, s, "cpu"),
        demo.variant_config("CBST", tmp_path, tmp_path, tmp_path / "w.pt", 0, s, "cpu"),
        demo._online_config("DACS", tmp_path, tmp_path, tmp_path / "w.pt", 0, s, "cpu"),
    ]
    assert configs[0].model == "daformer_mit_b0"
    assert all((c.optimizer, c.base_lr, c.weight_decay) == ("adamw", 6e-5, 0.01) for c in configs)
    assert main(["demo", "--out", str(tmp_path)]) == 0  # the default network keeps the demo's SGD
    s = seen["settings"]
    assert (s.model, s.optimizer, s.source_lr, s.round_lr) == ("small_demo", "sgd", 0.05, 0.005)


def test_demo_option_default_is_the_settings_model():
    from cbst.commands.demo import DemoOptions

    assert DemoOptions().model == DemoSettings().model


@pytest.mark.parametrize("seeds", [(), ("--seeds", "0,1")])
def test_a_demo_folder_refuses_another_model_before_any_work(tmp_path, capsys, seeds):
    folder = tmp_path / "seed_1" if seeds else tmp_path
    (folder / "source").mkdir(parents=True)
    (folder / "source" / "config.yaml").write_text("model: small_demo\n")
    assert main(["demo", "--out", str(tmp_path), "--model", "dinov2_vit_s14", *seeds]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model dinov2_vit_s14: " in err
    assert f"holds a demo of small_demo ({folder / 'source' / 'config.yaml'}); give another --out" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "seed_0").exists()


@pytest.mark.slow
def test_demo_of_a_transformer_reports_and_reuses_its_runs(monkeypatch, tmp_path, capsys):
    from cbst import demo

    tiny = functools.partial(
        DemoSettings,
        num_source=8,
        num_train=4,
        num_val=2,
        source_epochs=1,
        num_round=1,
        batch_images=2,
        crop_size=32,
    )
    monkeypatch.setattr(demo, "DemoSettings", tiny)  # the command builds its settings from it
    args = ["demo", "--out", str(tmp_path), "--model", "daformer_mit_b0", "--methods", "CBST"]
    assert main([*args, "--device", "cpu", "--no-amp"]) == 0
    out = capsys.readouterr().out
    assert "\nSource|" in out and "\nCBST|" in out and "report: " in out
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["settings"]["model"] == "daformer_mit_b0" and result["settings"]["optimizer"] == "adamw"
    assert "optimizer: adamw" in (tmp_path / "cbst" / "config.yaml").read_text()
    assert "CBST" in (tmp_path / "report.html").read_text()
    trained = [tmp_path / "source" / "last.pt", tmp_path / "cbst" / "round_0" / "model.pt"]
    mtimes = [p.stat().st_mtime for p in trained]
    assert main([*args, "--device", "cpu", "--no-amp"]) == 0  # finished work is reused
    assert [p.stat().st_mtime for p in trained] == mtimes
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == result["rows"]


def test_settings_overrides_take_each_fields_type_and_name_bad_ones():
    from cbst.demo import override_settings
    from cbst.errors import ConfigError

    s = override_settings(DemoSettings(), ["mine_port=0.25", "num_round=2", "pseudo_flip=yes", "model=small"])
    assert (s.mine_port, s.num_round, s.pseudo_flip, s.model) == (0.25, 2, True, "small")
    assert s.source_epochs == DemoSettings().source_epochs
    with pytest.raises(ConfigError, match="'epochs=3'.*NAME one of num_source"):
        override_settings(DemoSettings(), ["epochs=3"])
    with pytest.raises(ConfigError, match="'x' is not of type int"):
        override_settings(DemoSettings(), ["num_round=x"])


def test_a_finished_demo_is_not_reused_for_other_settings(tmp_path):
    import dataclasses

    from cbst.demo import require_same_settings
    from cbst.errors import ConfigError

    saved = dataclasses.asdict(DemoSettings())
    del saved["source_class_weight_power"]  # results written before the field existed: its default
    (tmp_path / "results.json").write_text(json.dumps({"settings": saved}))
    require_same_settings(tmp_path, DemoSettings())
    with pytest.raises(ConfigError, match=r"results\.json.*source_class_weight_power 0\.0 there, 0\.3 now"):
        require_same_settings(tmp_path, DemoSettings(source_class_weight_power=0.3))
    del saved["source_rcs_temperature"]  # before the demo sampled rare classes: it did not
    (tmp_path / "results.json").write_text(json.dumps({"settings": saved}))
    with pytest.raises(ConfigError, match=r"source_rcs_temperature 0\.0 there, 0\.01 now"):
        require_same_settings(tmp_path, DemoSettings())
    require_same_settings(tmp_path, DemoSettings(source_rcs_temperature=0.0))
    require_same_settings(tmp_path / "empty", DemoSettings(mine_port=0.8))  # nothing finished there
