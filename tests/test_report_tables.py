"""``cbst report``'s final-score table: seed groups as mean ± std, and its md / csv / LaTeX forms.

The run folders are written file by file as in test_report.py; expected values are computed
here with numpy from the folders' own metrics.json files.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cbst import io as cbst_io
from cbst.cli import main
from cbst.commands.report import TABLE_FORMATS
from cbst.evaluation import Metrics
from cbst.labels import CITYSCAPES_19, CLASSES_16, TABLE_HEADERS
from cbst.report import final_scores
from cbst.report.runs import Round, Run
from cbst.report.seeds import results_table
from cbst.report.tables import FORMATS, latex_escape
from test_report import _metrics, _Page, target, write_run  # noqa: F401  (target is a fixture)

CLASSES = CITYSCAPES_19.class_names


def _last_metrics(run: Path) -> dict:
    last = max(int(p.name.split("_")[1]) for p in run.glob("round_*") if (p / "metrics.json").is_file())
    return json.loads((run / f"round_{last}" / "metrics.json").read_text())


def _expected_cells(runs: list[Path]) -> list[str]:
    """mean (± sample std for several runs) of the last round's mIoU and per-class IoU, in %."""
    rows = [_last_metrics(r) for r in runs]
    cells = []
    for key in ["miou", *CLASSES]:
        values = [m["miou"] if key == "miou" else m["iou"][key] for m in rows]
        if any(v is None for v in values):
            cells.append("-")
            continue
        mean = f"{100 * np.mean(values):.1f}"
        cells.append(mean if len(values) == 1 else f"{mean} ± {100 * np.std(values, ddof=1):.1f}")
    return cells


@pytest.fixture(scope="module")
def seed_runs(target, tmp_path_factory) -> dict[str, list[Path]]:  # noqa: F811
    """Three CBST seeds, one ST run, a CBST run with another portion, one stopped a round early."""
    tmp_path = tmp_path_factory.mktemp("seed_runs")
    cbst = [write_run(target, tmp_path / f"cbst_s{s}", seed=10 + s, config={"seed": s}) for s in range(3)]
    st = [write_run(target, tmp_path / "st", policy="global", seed=20)]
    other = [write_run(target, tmp_path / "cbst_p4", seed=30, config={"init_tgt_port": 0.4})]
    short = [write_run(target, tmp_path / "cbst_short", rounds=1, seed=40, config={"seed": 3})]
    return {"cbst": cbst, "st": st, "other": other, "short": short}


def test_runs_differing_only_in_seed_form_one_row_of_mean_and_std(seed_runs):
    order = [*seed_runs["cbst"][:2], *seed_runs["st"], seed_runs["cbst"][2], *seed_runs["other"]]
    table = final_scores([*order, *seed_runs["short"]])
    assert table.columns == ("mIoU", *(TABLE_HEADERS[c] for c in CLASSES))
    lines = FORMATS["md"](table).splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[:3] for r in rows] == [
        ["CBST", "round_1", "0,1,2"],
        ["st", "round_1", "0"],
        ["cbst_p4", "round_1", "0"],
        ["cbst_short", "round_0", "3"],
    ]
    assert rows[0][3:] == _expected_cells(seed_runs["cbst"])
    assert "±" in rows[0][3] and rows[0][3 + 1 + 16] == "-"  # train: undefined in every run
    assert rows[1][3:] == _expected_cells(seed_runs["st"])
    assert rows[3][3:] == _expected_cells(seed_runs["short"])


def test_a_folder_given_twice_counts_once(seed_runs):
    a, b = seed_runs["cbst"][:2]
    rows = final_scores([a, b, a]).rows
    assert [(r.name, r.seeds) for r in rows] == [("CBST", (0, 1))]


def test_csv_has_a_std_column_after_every_score(seed_runs, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = [*seed_runs["cbst"], *seed_runs["st"]]
    assert main(["report", *map(str, runs), "--table", "csv", "--no-html"]) == 0
    out = capsys.readouterr()
    got = list(csv.reader(io.StringIO(out.out)))
    assert got[0][:5] == ["Case", "Round", "Seeds", "mIoU", "mIoU std"] and len(got) == 3
    assert all(len(row) == 3 + 2 * 20 for row in got)
    values = {row[0]: row[3:] for row in got[1:]}
    metrics = [_last_metrics(r) for r in seed_runs["cbst"]]
    mious = [m["miou"] for m in metrics]
    assert values["CBST"][:2] == [f"{100 * np.mean(mious):.1f}", f"{100 * np.std(mious, ddof=1):.1f}"]
    assert values["st"][1] == "" and values["st"][0] == f"{100 * _last_metrics(runs[-1])['miou']:.1f}"
    assert not (runs[0] / "report.html").exists() and not (tmp_path / "report.html").exists()


def _latex_rows(text: str) -> tuple[str, list[list[str]]]:
    """Check the LaTeX is well formed; return the column spec and the cells of every row."""
    unescaped = re.sub(r"\\[&%$#_{}]", "", text)
    depth = 0
    for ch in unescaped:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "a } closes nothing"
    assert depth == 0, "unclosed {"
    envs = []
    for kind, name in re.findall(r"\\(begin|end)\{(\w+)\}", text):
        if kind == "begin":
            envs.append(name)
        else:
            assert envs and envs.pop() == name, f"\\end{{{name}}} does not close the open environment"
    assert envs == []
    lines = text.strip().splitlines()
    spec = re.fullmatch(r"\\begin\{tabular\}\{([lcr|]+)\}", lines[0]).group(1)
    assert lines[-1] == r"\end{tabular}"
    rows = []
    for line in lines[1:-1]:
        if line == r"\hline":
            continue
        assert line.endswith(r" \\"), line
        body = line[: -len(r" \\")]
        assert unescaped.count("$") % 2 == 0 and len(re.findall(r"(?<!\\)\$", body)) % 2 == 0
        rows.append([c.strip() for c in re.split(r"(?<!\\)&", body)])
    return spec.replace("|", ""), rows


def test_latex_table_parses_with_pm_for_groups(target, seed_runs, tmp_path, capsys):  # noqa: F811
    source = _metrics(np.random.default_rng(5))
    cbst_io.write_json(tmp_path / "source.json", source)
    runs = [*seed_runs["cbst"], *seed_runs["st"]]
    argv = ["report", *map(str, runs), "--source-metrics", str(tmp_path / "source.json")]
    assert main([*argv, "--table", "latex", "--no-html"]) == 0
    spec, rows = _latex_rows(capsys.readouterr().out)
    header, body = rows[0], rows[1:]
    assert len(spec) == len(header) == 3 + 20
    assert all(len(r) == len(header) for r in body)
    assert header[:4] == ["Case", "Round", "Seeds", "mIoU"] and header[10] == "Traffic Light"
    assert [r[:3] for r in body] == [["Source", "source", "?"], ["CBST", r"round\_1", "0,1,2"],
                                     ["st", r"round\_1", "0"]]  # fmt: skip
    expected = [c.replace(" ± ", r" \pm ") for c in _expected_cells(seed_runs["cbst"])]
    assert body[1][3:] == [c if c == "-" else f"${c}$" for c in expected]
    assert body[0][3] == f"{100 * source['miou']:.1f}"  # one source model, not one per seed
    for single in (body[0], body[2]):
        assert "$" not in "".join(single) and r"\pm" not in "".join(single)


@pytest.mark.slow
def test_the_page_shows_the_groups_and_stdout_holds_the_table_alone(seed_runs, tmp_path, capsys):
    runs = [*seed_runs["cbst"], *seed_runs["st"]]
    out = tmp_path / "page.html"
    assert main(["report", *map(str, runs), "--table", "md", "--out", str(out), "--images", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == f"report: {out}"
    assert captured.out == FORMATS["md"](final_scores(runs))
    page = _Page(out.read_text())
    final = next(t for t in page.tables if t[0][0] == "Case")
    assert [r[:3] for r in final[1:]] == [["CBST", "round_1", "0,1,2"], ["st", "round_1", "0"]]
    assert final[1][3:] == _expected_cells(seed_runs["cbst"])


def test_latex_escapes_names():
    assert latex_escape("runs/a_b & 50% #1 {x} ~^\\") == (
        r"runs/a\_b \& 50\% \#1 \{x\} \textasciitilde{}\textasciicircum{}\textbackslash{}"
    )


def test_demo_seed_folders_group_by_method_with_their_own_source_models(target, tmp_path, capsys):  # noqa: F811
    """Each seed's demo folder trained its own source model, so the runs' weights differ."""
    folders = []
    for seed in range(2):
        demo = tmp_path / f"seed_{seed}"
        for name, policy in (("st", "global"), ("cbst", "cb")):
            run = write_run(target, demo / name, policy=policy, seed=2 * seed + len(name))
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            cfg.update(seed=seed, weights=str(demo / "source" / "last.pt"))
            cbst_io.write_text(run / "config.yaml", yaml.safe_dump(cfg))
        source = _metrics(np.random.default_rng(seed))
        cbst_io.write_json(demo / "results.json", {"rows": {"Source": source}})
        folders.append(demo)
    table = final_scores(folders)
    assert [(r.name, r.seeds) for r in table.rows] == [("Source", (0, 1)), ("ST", (0, 1)), ("CBST", (0, 1))]
    assert final_scores([tmp_path]) == table  # the 'cbst demo --seeds' folder holding both
    sources = [json.loads((f / "results.json").read_text())["rows"]["Source"]["miou"] for f in folders]
    assert table.rows[0].scores[0].mean == pytest.approx(np.mean(sources))
    assert table.rows[0].scores[0].std == pytest.approx(np.std(sources, ddof=1))


def test_table_options_are_checked_and_match_the_formats(seed_runs, capsys):
    assert set(TABLE_FORMATS) == set(FORMATS)
    assert main(["report", str(seed_runs["st"][0]), "--no-html"]) == 2
    assert "--no-html needs --table" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(seed_runs["st"][0]), "--table", "html"])
    assert "invalid choice: 'html'" in capsys.readouterr().err


def test_16_class_runs_get_the_13_class_miou_column(tmp_path):
    """SYNTHIA-protocol runs: mIoU* (the 13 classes without wall, fence, pole) after mIoU."""
    rng = np.random.default_rng(3)
    runs = []
    for seed in range(2):
        iou = {c: float(rng.uniform(0, 0.9)) for c in CLASSES_16}
        metrics = Metrics.from_json({"miou": float(np.mean(list(iou.values()))), "pixel_acc": 0.8,
                                     "mean_acc": 0.5, "iou": iou})  # fmt: skip
        rnd = Round(0, tmp_path, {}, metrics, {})
        runs.append(Run(tmp_path / f"s{seed}", f"s{seed}", {"seed": seed, "num_classes": 16}, (rnd,)))
    table = results_table(runs, CLASSES_16)
    assert table.columns[:3] == ("mIoU", "mIoU*", TABLE_HEADERS[CLASSES_16[0]]) and len(table.columns) == 18
    (row,) = table.rows
    per_seed = [
        [r.rounds[0].metrics.iou[c] for c in CLASSES_16 if c not in ("wall", "fence", "pole")] for r in runs
    ]
    miou13 = [np.mean(v) for v in per_seed]
    assert row.seeds == (0, 1) and len(per_seed[0]) == 13
    assert row.scores[1].mean == pytest.approx(np.mean(miou13))
    assert row.scores[1].std == pytest.approx(np.std(miou13, ddof=1))
    assert "mIoU*" in FORMATS["latex"](table).splitlines()[2]
