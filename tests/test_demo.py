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


@pytest.mark.slow
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


def test_online_methods_are_names_of_the_demo():
    from cbst.demo import parse_methods

    assert parse_methods("CBST,DACS,CBST-online") == ("CBST", "DACS", "CBST-online")
    assert "DACS" not in parse_methods("all")  # all: the rounds rows; online rows are named
    with pytest.raises(ValueError, match="CBST-online"):
        parse_methods("DAFormer")
