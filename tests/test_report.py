"""``cbst report``: the HTML page of self-training runs, built from run folders written here.

The runs are written file by file (config, state, round stats, metrics, pseudo-label PNGs,
checkpoints) exactly as ``cbst self-train`` lays them out, so the tests take seconds; one slow
test in test_demo.py checks the report of a real (tiny) demo.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cbst import io as cbst_io
from cbst.checkpoints import save_checkpoint
from cbst.cli import main
from cbst.io import DataError
from cbst.labels import CITYSCAPES_19
from cbst.models import build_model
from cbst.report import build_report, load_runs, write_report
from cbst.report.target import pick_images, scan_targets, target_dataset
from cbst.selftrain import SelfTrainConfig

CLASSES = CITYSCAPES_19.class_names
NAMES = [f"testcity_{i:06d}_000019" for i in range(4)]
SIZE = (32, 64)  # H, W


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    """A 4-image Cityscapes-layout target train split and val split, and a small source model."""
    root = tmp_path_factory.mktemp("target")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in NAMES:
            image = rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)
            train_ids = rng.integers(0, 19, SIZE).astype(np.uint8)
            cbst_io.write_png(root / "leftImg8bit" / split / "testcity" / f"{name}_leftImg8bit.png", image)
            cbst_io.write_png(
                root / "gtFine" / split / "testcity" / f"{name}_gtFine_labelIds.png",
                CITYSCAPES_19.decode(train_ids),
            )
    torch.manual_seed(0)
    save_checkpoint(
        root / "source.pt", build_model("small", 19), arch="small", num_classes=19, protocol="cityscapes19"
    )
    return root


def _metrics(rng: np.random.Generator) -> dict:
    iou = {c: (None if k == 16 else round(float(rng.uniform(0, 0.9)), 6)) for k, c in enumerate(CLASSES)}
    values = [v for v in iou.values() if v is not None]
    return {"miou": sum(values) / len(values), "pixel_acc": 0.8, "mean_acc": 0.5, "iou": iou}


def _stats(rng: np.random.Generator, policy: str, index: int, selected: dict[str, int]) -> dict:
    lam = {c: (0.9 if policy == "global" else float(rng.uniform(0.2, 1.0))) for c in CLASSES}
    return {
        "portion": 0.2 + 0.05 * index,
        "policy": policy,
        "with_prior": False,
        "thresholds": lam,
        "predicted_pixels": {c: 2 * n + 1 for c, n in selected.items()},
        "selected_pixels": selected,
        "mine_id": [5, 6, 7],
        "mine_id_priority": [5, 6, 7],
        "selected_fraction": 0.25 + 0.01 * index,
        "pseudo_label_accuracy": 0.6 + 0.01 * index,
        "seconds": 3.5 + index,
    }


def write_run(
    target: Path,
    out: Path,
    *,
    policy: str = "cb",
    rounds: int = 2,
    evaluated: int | None = None,
    pseudo_only: int = 0,
    eval_root: Path | None = None,
    seed: int = 0,
    config: dict | None = None,
) -> Path:
    """A run folder as ``cbst self-train`` leaves it: ``rounds`` finished rounds (the first
    ``evaluated`` of them with metrics.json), then ``pseudo_only`` rounds with pseudo-labels only.
    ``seed`` draws its numbers; ``config`` sets options of its config.yaml (e.g. the run's seed)."""
    rng = np.random.default_rng(seed)
    cfg = SelfTrainConfig(
        weights=str(target / "source.pt"),
        output=str(out),
        data_root="/nowhere/gta5",
        data_root_tgt=str(eval_root or target),
        kc_policy=policy,
        num_round=4,
        score_pseudo_labels=True,
        **(config or {}),
    )
    out.mkdir(parents=True)
    cbst_io.write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    evaluated = rounds if evaluated is None else evaluated
    finished = []
    for index in range(rounds + pseudo_only):
        rdir = out / f"round_{index}"
        counts = np.zeros(19, np.int64)
        for name in NAMES:
            pseudo = rng.integers(0, 19, SIZE)
            pseudo[rng.random(SIZE) < 0.5] = 255
            if policy == "global":
                pseudo[pseudo < 19] = np.where(rng.random(SIZE) < 0.8, 0, pseudo)[pseudo < 19]
            counts += np.bincount(pseudo[pseudo < 19].ravel(), minlength=19)
            cbst_io.write_png(
                rdir / "pseudo_labelIds" / f"{name}.png", CITYSCAPES_19.decode(pseudo.astype(np.uint8))
            )
        cbst_io.write_json(
            rdir / "stats.json", _stats(rng, policy, index, dict(zip(CLASSES, counts.tolist())))
        )
        finished.append(f"{index}/pseudo")
        if index < rounds:
            shutil.copyfile(target / "source.pt", rdir / "model.pt")
            finished.append(f"{index}/train")
        if index < evaluated:
            cbst_io.write_json(rdir / "metrics.json", _metrics(rng))
            finished.append(f"{index}/eval")
    cbst_io.write_json(out / "state.json", {"finished": finished})
    return out


class _Page(HTMLParser):
    """Collects images, table rows and tag balance of a page."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.open: list[str] = []
        self.cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.open.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"unbalanced </{tag}>"
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _table(page: _Page, first_header: str, header_cell: str) -> list[list[str]]:
    """The table whose header row contains ``header_cell``."""
    return next(t for t in page.tables if t[0][0] == first_header and header_cell in t[0])


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def test_report_is_valid_html_with_decodable_images(target, tmp_path):
    runs = [write_run(target, tmp_path / "st", policy="global"), write_run(target, tmp_path / "cbst", seed=1)]
    page = _Page(build_report(runs, images=3, device="cpu"))
    assert page.open == []
    assert len(page.images) == 5 + 3 * (1 + 2 * 2 + 1)  # five figures, gallery: image, 2x2 runs, GT
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        with Image.open(io.BytesIO(png)) as img:
            img.verify()
            assert img.format == "PNG" and img.width > 0 and img.height > 0


def test_every_table_number_equals_the_runs_json(target, tmp_path):
    runs = [
        write_run(target, tmp_path / "a", policy="global", rounds=3),
        write_run(target, tmp_path / "b", seed=2),
    ]
    source = _metrics(np.random.default_rng(9))
    cbst_io.write_json(tmp_path / "source.json", source)
    page = _Page(build_report(runs, images=0, source_metrics=tmp_path / "source.json"))

    scores = _table(page, "run", "mIoU")
    assert scores[0][3:] == [
        "Road",
        "Sidewalk",
        "Build",
        "Wall",
        "Fence",
        "Pole",
        "Traffic Light",
        "Traffic Sign",
        "Veg.",
        "Terrain",
        "Sky",
        "Person",
        "Rider",
        "Car",
        "Truck",
        "Bus",
        "Train",
        "Motor",
        "Bike",
    ]
    expected = []
    for run in runs:
        expected.append(
            [run.name, "source", _pct(source["miou"])] + [_pct(source["iou"][c]) for c in CLASSES]
        )
        for rdir in sorted(run.glob("round_*")):
            m = json.loads((rdir / "metrics.json").read_text())
            expected.append([run.name, rdir.name, _pct(m["miou"])] + [_pct(m["iou"][c]) for c in CLASSES])
    assert scores[1:] == expected

    quality = _table(page, "run", "accuracy (%)")
    times = _table(page, "run", "pseudo-labels (s)")
    rows = [
        (run.name, rdir.name, json.loads((rdir / "stats.json").read_text()))
        for run in runs
        for rdir in sorted(run.glob("round_*"))
    ]
    assert [r[:5] for r in quality[1:]] == [
        [name, rnd, _pct(s["portion"]), _pct(s["selected_fraction"]), _pct(s["pseudo_label_accuracy"])]
        for name, rnd, s in rows
    ]
    for row, (_, _, s) in zip(quality[1:], rows):
        top = max(s["selected_pixels"], key=s["selected_pixels"].get)
        assert row[5].startswith(
            f"{top} {_pct(s['selected_pixels'][top] / sum(s['selected_pixels'].values()))}"
        )
    assert [r[2] for r in times[1:]] == [f"{s['seconds']:.0f}" for _, _, s in rows]


def test_pseudo_label_accuracy_per_class_counts_the_pngs(target, tmp_path):
    run = write_run(target, tmp_path / "run", rounds=1)
    runs = load_runs([run])
    dataset, note = target_dataset(runs[0])
    assert note is None
    scan = scan_targets(dataset, runs)
    correct = selected = 0
    for i, name in enumerate(NAMES):
        gt = dataset.label(i)
        pseudo = CITYSCAPES_19.encode(cbst_io.read_label(run / "round_0" / "pseudo_labelIds" / f"{name}.png"))
        road = pseudo == 0
        selected += int(road.sum())
        correct += int((road & (gt == 0)).sum())
        assert scan.presence[i] == set(np.unique(gt).tolist())
    assert scan.accuracy[(run, 0)]["road"] == pytest.approx(correct / selected)


def test_resumed_run_shows_the_rounds_that_exist(target, tmp_path):
    run = write_run(target, tmp_path / "half", rounds=1, pseudo_only=1)  # killed in round_1's training
    (run / "round_2" / "pseudo_labelIds").mkdir(parents=True)  # round_2's pass under way
    (loaded,) = load_runs([run])
    assert [r.index for r in loaded.rounds] == [0, 1]
    assert [r.index for r in loaded.evaluated] == [0]
    page = _Page(build_report([run], images=1))
    assert [row[1] for row in _table(page, "run", "mIoU")[1:]] == ["round_0"]
    assert [row[1] for row in _table(page, "run", "accuracy (%)")[1:]] == ["round_0", "round_1"]
    assert _table(page, "run", "method")[1][-1] == "2 of 4"
    one = write_run(target, tmp_path / "one", rounds=1)
    assert len(_table(_Page(build_report([one], images=0)), "run", "mIoU")) == 2
    unevaluated = _Page(build_report([write_run(target, tmp_path / "none", rounds=2, evaluated=0)], images=0))
    assert not any("mIoU" in t[0] for t in unevaluated.tables) and len(unevaluated.images) == 3


def test_without_the_target_images_the_report_says_so(target, tmp_path):
    run = write_run(target, tmp_path / "run", eval_root=tmp_path / "moved")
    text = build_report([run], images=2)
    assert text.count(f"target images not readable from here ({tmp_path / 'moved'}") == 2
    assert len(_Page(text).images) == 4  # mIoU, class shares, IoU and λ; no accuracy, no gallery


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: shutil.rmtree(run / "round_1"), "round_1 is missing (found round_0, round_2)"),
        (
            lambda run: (run / "round_1" / "metrics.json").unlink(),
            "metrics.json: missing, but round_2 was evaluated",
        ),
        (
            lambda run: shutil.rmtree(run / "round_2"),
            "state.json lists round 2 as started but round_2 is missing",
        ),
    ],
)
def test_a_run_with_a_lost_round_is_refused_naming_it(target, tmp_path, damage, message):
    run = write_run(target, tmp_path / "run", rounds=3)
    damage(run)
    with pytest.raises(DataError, match=f"^{re.escape(str(run))}[:/].*{re.escape(message)}"):
        load_runs([run])


def test_cli_errors_are_one_line_naming_the_folder(target, tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    assert main(["report", str(tmp_path / "notarun")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cbst report: error: {tmp_path / 'notarun'}: not a self-training run")
    assert len(err.splitlines()) == 1

    run = write_run(target, tmp_path / "run", rounds=3)
    shutil.rmtree(run / "round_1")
    assert main(["report", str(run)]) == 2
    assert f"{run}: round_1 is missing" in capsys.readouterr().err


def test_runs_on_different_val_splits_are_refused_by_name(target, tmp_path):
    other_root = tmp_path / "other_target"
    shutil.copytree(target, other_root)
    a = write_run(target, tmp_path / "a")
    b = write_run(target, tmp_path / "b", eval_root=other_root)
    with pytest.raises(DataError) as info:
        load_runs([a, b])
    assert str(a) in str(info.value) and str(b) in str(info.value)
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "x.html")]) == 2


def test_demo_folder_compares_source_st_cbst_cbst_sp(target, tmp_path, capsys):
    demo = tmp_path / "demo"
    for name, policy in (("st", "global"), ("cbst", "cb"), ("cbst_sp", "cb")):
        write_run(target, demo / name, policy=policy)
    cfg = yaml.safe_load((demo / "cbst_sp" / "config.yaml").read_text())
    cbst_io.write_text(demo / "cbst_sp" / "config.yaml", yaml.safe_dump({**cfg, "with_prior": "prior.npy"}))
    source = _metrics(np.random.default_rng(5))
    cbst_io.write_json(demo / "results.json", {"rows": {"Source": source}})
    assert main(["report", str(demo), "--images", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {demo / 'report.html'}"
    page = _Page((demo / "report.html").read_text())
    assert [row[:2] for row in _table(page, "run", "method")[1:]] == [
        ["ST", "ST"],
        ["CBST", "CBST"],
        ["CBST-SP", "CBST-SP"],
    ]
    scores = _table(page, "run", "mIoU")
    assert [row[1] for row in scores[1:4]] == ["source", "round_0", "round_1"]
    assert scores[1][2] == _pct(source["miou"])


def test_gallery_picks_rare_classes_first_and_deterministically():
    presence = [{0, 1}, {0, 1, 2}, {0, 5}, {0, 1, 6}, {0, 1, 2}]
    # image counts: 0 in 5, 1 in 4, 2 in 2, 5 in 1, 6 in 1 -> rare = {5, 6, 2}
    assert pick_images(presence, 3) == [1, 2, 3]
    assert pick_images(presence, 10) == pick_images(presence, 10) and len(pick_images(presence, 10)) == 5


def test_report_help_and_config(target, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "--images" in capsys.readouterr().out
    run = write_run(target, tmp_path / "run", rounds=1)
    (tmp_path / "r.yaml").write_text(f"images: 0\nout: {tmp_path / 'r.html'}\n")
    assert main(["report", str(run), "--config", str(tmp_path / "r.yaml")]) == 0
    assert len(_Page((tmp_path / "r.html").read_text()).images) == 5


# ------------------------------------------------------------------ in a real browser (Chromium)


def _chromium() -> str | None:
    return next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fd 3 in,
    fd 4 out, NUL-terminated JSON): enough to load a page and read its console and DOM."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--remote-debugging-pipe",
    )

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()

        def pipes_to_3_and_4() -> None:  # via fds >= 10, so that neither end is overwritten
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [binary, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=pipes_to_3_and_4,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, timeout: float = 60, **params) -> dict:
        """Send a command and return its result, keeping the events that arrive meanwhile."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        """Wait until an event named ``method`` has arrived."""
        deadline = time.time() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._message(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._write)
        os.close(self._read)


def open_in_browser(binary: str, page: Path, profile: Path) -> tuple[list[list], list[str]]:
    """Load ``page`` headless; returns [complete, naturalWidth] per image and the console errors."""
    browser = DevTools(binary, profile)
    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            browser.call(domain, session)
        browser.call("Page.navigate", session, url=page.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        images = browser.call(
            "Runtime.evaluate",
            session,
            returnByValue=True,
            expression=("Array.from(document.images).map(i => [i.complete, i.naturalWidth])"),
        )["result"]["value"]
    finally:
        browser.close()
    errors = [
        json.dumps(e["params"])
        for e in browser.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")
    ]
    return images, errors


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_opens_in_chromium_with_every_image_loaded(target, tmp_path):
    demo = tmp_path / "demo"
    for name, policy in (("st", "global"), ("cbst", "cb"), ("cbst_sp", "cb")):
        write_run(target, demo / name, policy=policy, seed=len(name))
    cbst_io.write_json(demo / "results.json", {"rows": {"Source": _metrics(np.random.default_rng(1))}})
    page = write_report([demo], demo / "report.html", images=2, device="cpu")
    images, errors = open_in_browser(_chromium(), page, tmp_path / "profile")
    assert len(images) == len(_Page(page.read_text()).images) > 5
    assert all(complete and width > 0 for complete, width in images), images
    assert errors == []


def _set(run, **options) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cbst_io.write_text(run / "config.yaml", yaml.safe_dump({**cfg, **options}))


def test_crst_runs_are_named_with_their_weights_and_a_run_given_twice_shows_once(target, tmp_path):
    mrkld, lrent = write_run(target, tmp_path / "mrkld"), write_run(target, tmp_path / "lrent", seed=1)
    _set(mrkld, mr_weight_kld=0.1)
    _set(lrent, lr_weight_ent=0.25)
    assert [r.label for r in load_runs([mrkld, lrent, mrkld, tmp_path / "mrkld" / "."])] == ["mrkld", "lrent"]
    page = _Page(build_report([mrkld, lrent], images=0, device="cpu"))
    rows = _table(page, "run", "method")
    assert [row[1] for row in rows[1:]] == ["MRKLD", "LRENT"]
    header = rows[0]
    schedule = [row[header.index("schedule")] for row in rows[1:]]
    assert "MRKLD weight 0.1 (source 0.0)" in schedule[0] and "LRENT α 0.25" in schedule[1]
    assert [row[header.index("computed with")] for row in rows[1:]] == ["? (not recorded)"] * 2


def test_the_validation_gallery_shows_predictions_and_ground_truth(target, tmp_path):
    run = write_run(target, tmp_path / "cbst")
    cbst_io.write_json(
        run / "results.json",
        {"rounds": {}, "provenance": {"precision": "bf16", "device": "cuda", "gpu": "H200", "cbst": "0.1.0"}},
    )
    without = _Page(build_report([run], images=1, device="cpu"))
    page = _Page(build_report([run], images=1, device="cpu", val_images=2))
    assert len(page.images) == len(without.images) + 2 * 3  # per image: image, prediction, truth
    gallery = next(t for t in page.tables if t[0][0] == "image" and len(t[0]) == 3)
    assert gallery[0] == ["image", "cbst: prediction (round_1 model)", "ground truth"]
    assert all(row[0].startswith("testcity_") for row in gallery[1:]) and len(gallery) == 3
    computed = _table(page, "run", "method")
    assert computed[1][computed[0].index("computed with")].startswith("bf16 on cuda (H200)")
