"""``cbst demo`` end to end on a tiny benchmark: the table, the JSON and the example images."""

import json

import pytest

from cbst.cli import main
from cbst.demo import DemoSettings, run_demo


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
    assert not (tmp_path / "cbst" / "prior.npy").exists()
    report = (tmp_path / "report.html").read_text()
    assert "CBST-SP" in report and report.count("<img") > 5


def test_demo_help_names_the_methods(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "CBST-SP" in out and "--seed" in out


def test_demo_no_amp_reaches_every_stage(monkeypatch, tmp_path):
    from cbst import demo
    from cbst.commands import demo as command

    seen = {}

    def fake_run_demo(out, seed, *, device, settings, methods):
        seen["settings"] = settings
        (tmp_path / "results.md").write_text("table\n")
        return {"rare_miou": {}, "rare_classes": [], "seconds": 1.0, "device": "cpu"}

    monkeypatch.setattr(command, "run_demo", fake_run_demo)
    assert main(["demo", "--out", str(tmp_path), "--no-amp"]) == 0
    settings = seen["settings"]
    source = demo.source_config(tmp_path / "s", tmp_path, 0, settings, "cpu")
    row = demo._variant_config("CBST", tmp_path, tmp_path, tmp_path / "w.pt", 0, settings, "cpu")
    assert settings.amp is False and source.amp is False and row.amp is False
    assert source.model == "small_demo" and not row.test_flipping  # the demo's network, one pass
    assert main(["demo", "--out", str(tmp_path)]) == 0 and seen["settings"].amp is True
