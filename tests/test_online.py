"""Online self-training through the CLI on the tiny synthetic benchmark, exact resume, torchrun."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cbst.class_counts import count_class_pixels
from cbst.cli import main
from cbst.datasets import build_dataset
from cbst.online import OnlineConfig, lr_at

REPO = Path(__file__).resolve().parents[1]
QUIET = ("--device", "cpu", "--num-workers", "0", "--no-progress")


def _args(bench: Path, output: Path, policy: str = "cb", *extra: str) -> list[str]:
    return [
        "self-train",
        "--mode", "online",
        "--data-root", str(bench / "data" / "gta5"),
        "--data-root-tgt", str(bench / "data" / "cityscapes"),
        "--weights", str(bench / "source.pt"),
        "--output", str(output),
        "--kc-policy", policy,
        "--max-iters", "5",
        "--batch-images", "2",
        "--crop-size", "32",
        "--base-lr", "1e-3",
        "--warmup-iters", "2",
        "--eval-interval", "5",
        "--log-interval", "1",
        "--checkpoint-interval", "2",
        "--rcs-min-pixels", "20",
        "--cb-window", "3",
        "--tgt-port", "0.3",
        "--score-pseudo-labels",
        *QUIET,
        *extra,
    ]  # fmt: skip


def _fails(capsys, match: str, args: list[str]) -> None:
    """The command exits with cbst's error line matching ``match``."""
    assert main(args) == 2
    assert re.search(match, capsys.readouterr().err)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def _log(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r.pop("seconds")
    return records


@pytest.fixture(scope="module")
def straight(bench, tmp_path_factory) -> Path:
    """An uninterrupted ``cb`` run of 5 iterations."""
    out = tmp_path_factory.mktemp("online") / "straight"
    assert main(_args(bench, out)) == 0
    return out


def test_a_cb_run_writes_its_folder_logs_and_metrics(straight):
    results = json.loads((straight / "results.json").read_text())
    assert results["mode"] == "online" and list(results["iterations"]) == ["5"]
    assert 0 <= results["final"]["miou"] <= 1
    records = _log(straight / "log.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    last = records[-1]
    assert set(last["lambda"]) == set(last["selected_share"]) and len(last["lambda"]) == 19
    assert abs(sum(last["selected_share"].values()) - 1) < 1e-9
    assert 0 < last["selected_fraction"] <= 1 and 0 <= last["pseudo_accuracy"] <= 1
    assert last["lr"] == pytest.approx(
        lr_at(OnlineConfig("w", "o", "d", "t", max_iters=5, warmup_iters=2, base_lr=1e-3), 4)
    )
    probs = json.loads((straight / "rcs_class_probs.json").read_text())
    assert len(probs) == 19 and abs(sum(probs.values()) - 1) < 1e-9
    assert np.load(straight / "rcs_pixel_counts.npy").shape == (8, 19)
    assert [p.name for p in (straight / "checkpoints").iterdir()] == ["iter_000005.pt"]


def test_report_of_an_online_run_draws_its_iterations(straight):
    """``cbst report RUN``: the run's table, final score, and its three figures over the iterations."""
    out = straight / "report.html"
    assert main(["report", str(straight), "--out", str(out), "--val-images", "1"]) == 0
    page = out.read_text()
    for title in (
        "Online runs",
        "Final scores (%)",
        "mIoU over iterations (online runs)",
        "Share of pseudo-labelled pixels per class over iterations (online runs)",
        "Confidence threshold λ per class over iterations (online runs)",
        "Gallery: validation images",
    ):
        assert f"<h2>{title}</h2>" in page, title
    figures = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)"', page)
    assert {alt for _, alt in figures} >= {"mIoU over iterations", "online class shares", "online thresholds"}
    for data, _ in figures:
        assert base64.b64decode(data).startswith(b"\x89PNG")
    final = json.loads((straight / "results.json").read_text())["final"]
    row = re.search(
        r'<td class="name">straight</td><td class="name">iteration_5</td>'
        r'<td class="name">[^<]*</td><td>([^<]+)</td>',
        page,
    )
    assert row and row.group(1) == f"{100 * final['miou']:.1f}"
    assert "<td>5 of 5</td>" in page and "CBST-online" in page


def test_resumed_after_a_kill_ends_with_the_uninterrupted_weights_and_metrics(
    bench, straight, tmp_path, monkeypatch, capsys
):
    from cbst import online

    calls = {"n": 0}
    add = online._Counters.add

    class Killed(Exception):
        pass

    def killed_in_iteration_4(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:  # iteration 4 of 5: the last checkpoint is iteration 2's
            raise Killed
        add(self, *args)

    monkeypatch.setattr(online._Counters, "add", killed_in_iteration_4)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        main(_args(bench, out))
    monkeypatch.setattr(online._Counters, "add", add)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_000002.pt"]
    _fails(capsys, "pass --resume", _args(bench, out))
    _fails(
        capsys,
        "--tgt-port 0.3 before, --tgt-port 0.4 now",
        _args(bench, out, "cb", "--resume", "--tgt-port", "0.4"),
    )
    assert main(_args(bench, out, "cb", "--resume", "--log-interval", "1")) == 0
    for name in ("model.pt", "teacher.pt"):
        a, b = _weights(straight / name), _weights(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((out / "results.json").read_text()) == json.loads(
        (straight / "results.json").read_text()
    )
    assert _log(out / "log.jsonl") == _log(straight / "log.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fixed", "global"])
def test_fixed_and_global_runs_through_the_cli(bench, tmp_path, policy):
    out = tmp_path / policy
    assert main(_args(bench, out, policy, "--pseudo-threshold", "0.2", "--pseudo-ignore-top", "4")) == 0
    last = _log(out / "log.jsonl")[-1]
    lam = list(last["lambda"].values())
    if policy == "fixed":
        assert lam == [pytest.approx(0.2)] * 19
    else:
        assert len(set(lam)) == 1 and lam[0] < 1
    assert (out / "model.pt").is_file() and "final" in json.loads((out / "results.json").read_text())


def test_options_the_online_mode_cannot_use_are_refused(bench, tmp_path, capsys):
    _fails(
        capsys,
        "--lr-weight-ent works with --mode rounds only",
        _args(bench, tmp_path / "a", "cb", "--lr-weight-ent", "0.25"),
    )
    _fails(capsys, "--ema-alpha must be in", _args(bench, tmp_path / "b", "cb", "--ema-alpha", "1"))
    rounds = _args(bench, tmp_path / "c", "fixed")
    rounds[rounds.index("online")] = "rounds"
    _fails(capsys, "'fixed' .*--mode online", rounds[:13] + list(QUIET))
    _fails(
        capsys,
        "--with-prior: .*--kc-policy cb or global",
        _args(bench, tmp_path / "d", "fixed", "--with-prior", "source"),
    )
    _fails(
        capsys,
        "error: --fd-lambda 0.005 .*--pretrained FILE",
        _args(bench, tmp_path / "e", "cb", "--fd-lambda", "0.005"),
    )
    _fails(
        capsys,
        "--fd-lambda needs the encoder's ImageNet weights: SmallSegNet has no ImageNet weights",
        _args(bench, tmp_path / "f", "cb", "--fd-lambda", "0.005", "--pretrained", "imagenet"),
    )
    _fails(
        capsys,
        "--pretrained is read by --fd-lambda only",
        _args(bench, tmp_path / "g", "cb", "--pretrained", "imagenet"),
    )
    assert not any((tmp_path / name).exists() for name in "abcdefg")


def test_feature_distance_and_spatial_prior_run_and_log(bench, tmp_path):
    """CBST-SP-online with DAFormer's feature distance against the source model's own weights."""
    from cbst.methods import method_of

    out = tmp_path / "fd_prior"
    extra = ("--with-prior", "source", "--fd-lambda", "0.005", "--pretrained", str(bench / "source.pt"))
    assert main(_args(bench, out, "cb", *extra)) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["fd_lambda"] == 0.005 and config["pretrained"] == str(bench / "source.pt")
    assert method_of(config) == "CBST-SP-online"
    assert np.load(out / "prior.npy").shape[0] == 19
    records = _log(out / "log.jsonl")
    fd = [r["loss_feature_distance"] for r in records]
    assert all(0 <= v < 1 for v in fd) and any(v > 0 for v in fd)
    for r in records:
        assert r["loss"] == pytest.approx(r["loss_source"] + r["loss_target"] + r["loss_feature_distance"])


def test_lr_warms_up_linearly_then_decays_polynomially():
    cfg = OnlineConfig("w", "o", "d", "t", max_iters=100, warmup_iters=10, base_lr=1.0, lr_power=1.0)
    for it in range(100):
        poly = 1.0 - it / 100
        warm = 1 - (1 - it / 10) * (1 - 1e-6) if it < 10 else 1.0
        assert lr_at(cfg, it) == pytest.approx(poly * warm)


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_resumed_after_kill_9_of_the_command(bench, straight, tmp_path):
    out = tmp_path / "kill9"
    cmd = [sys.executable, "-m", "cbst", *_args(bench, out)]
    env = {**_env(), "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the last bits depend on it
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("iter_000002.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert main(_args(bench, out, "cb", "--resume")) == 0
    a, b = _weights(straight / "model.pt"), _weights(out / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_torchrun_processes_use_the_same_thresholds(bench, tmp_path):
    out = tmp_path / "two"
    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cbst",
         *_args(bench, out)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    # every log record checked each process's λ against the main process's (online._same_everywhere)
    records = _log(out / "log.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5]
    assert min(records[-1]["lambda"].values()) < 1
    assert (out / "model.pt").is_file()
    # the RCS counts: each process counted its share of the source labels, summed into one file
    source = build_dataset("gta5", bench / "data" / "gta5", num_classes=19)
    expected = count_class_pixels(source.label, len(source), 19)
    np.testing.assert_array_equal(np.load(out / "rcs_pixel_counts.npy"), expected)
