"""Commands under torchrun (CPU, gloo, 2 processes) give the one-process results.

Each ``_torchrun`` call starts a real job the way docs/distributed.md does
(``torchrun --standalone --nproc-per-node 2 -m cbst COMMAND ...``; ``torchrun`` is
``python -m torch.distributed.run``). The one-process references run in this process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cbst import checks, distributed
from cbst.checkpoints import read_meta
from cbst.cli import main
from cbst.datasets import build_dataset
from cbst.probability_cache import CACHE_FOLDER
from cbst.training import EpochBatches

REPO = Path(__file__).resolve().parents[1]
LAUNCH = ("--standalone", "--nproc-per-node", "2", "-m", "cbst")
"""The torchrun flags the tests run with, and docs/distributed.md shows."""
QUIET = ("--device", "cpu", "--num-workers", "0", "--no-progress")


def _job(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *LAUNCH, command, *args]


def _env() -> dict[str, str]:
    """This checkout's sources first on the path; one thread per process, as torchrun's default."""
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _torchrun(command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(_job(command, *args), env=_env(), capture_output=True, text=True, timeout=timeout)


def _one_process(*args: str) -> int:
    """``cbst ARGS`` in this process with one thread, as each process of a torchrun job has:
    on the CPU a convolution's last bits can depend on its thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(list(args))
    finally:
        torch.set_num_threads(threads)


def _self_train_args(bench: Path) -> list[str]:
    data = bench / "data"
    return [
        *("--data-root", str(data / "gta5"), "--data-root-tgt", str(data / "cityscapes")),
        *("--weights", str(bench / "source.pt"), "--num-round", "1", "--epoch-per-round", "1"),
        *("--init-tgt-port", "0.3", "--init-src-port", "0.5", "--batch-images", "2"),
        *("--crop-size", "32", "--base-lr", "0.01", "--exact-thresholds", "--with-prior", "source", *QUIET),
        "--save-color",
        "--no-source-eval",
    ]


def test_readme_shows_the_commands_the_tests_run():
    readme = (REPO / "docs" / "distributed.md").read_text()  # the README's torchrun guide
    for command in ("train-source", "self-train", "evaluate"):
        assert f"torchrun {' '.join(LAUNCH)} {command}" in readme


def test_one_process_helpers_are_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard(5) == [0, 1, 2, 3, 4]
    model = torch.nn.Linear(2, 2)
    assert distributed.data_parallel(model, torch.device("cpu")) is model
    x = torch.ones(3)
    assert distributed.all_reduce_mean(distributed.all_reduce_sum(x)) is x and x.tolist() == [1, 1, 1]


def test_each_process_takes_its_slice_of_every_global_batch():
    whole = list(EpochBatches(10, 4, range(2), seed=3))
    parts = [list(EpochBatches(10, 4, range(2), seed=3, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*parts)] == whole


def test_the_global_batch_must_split_over_the_processes(monkeypatch):
    class Config:
        batch_images = 3

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(checks.ConfigError, match="--batch-images 3 is the global batch.*multiple of 2"):
        checks.require_split_batch(Config(), "batch_images")


def _self_train_as_one(bench: Path, tmp_path: Path, *options: str) -> tuple[Path, Path]:
    """Run round 0 in one process and under torchrun; assert the same pseudo-labels, stats and
    round files. Returns the two round folders."""
    args = [*_self_train_args(bench), *options]
    assert _one_process("self-train", *args, "--output", str(tmp_path / "one")) == 0
    job = _torchrun("self-train", *args, "--output", str(tmp_path / "two"))
    assert job.returncode == 0, job.stderr
    assert job.stdout.count("round 0: mIoU") == 1  # the main process alone prints
    one, two = tmp_path / "one" / "round_0", tmp_path / "two" / "round_0"
    for folder in ("pseudo_labelIds", "pseudo_color"):
        names = sorted(p.name for p in (one / folder).iterdir())
        assert names == sorted(p.name for p in (two / folder).iterdir()) and len(names) == 4
        assert all((one / folder / n).read_bytes() == (two / folder / n).read_bytes() for n in names)
    stats = [json.loads((r / "stats.json").read_text()) for r in (one, two)]
    for s in stats:
        del s["seconds"]
    assert stats[0] == stats[1] and stats[0]["selected_fraction"] > 0
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    state = json.loads((tmp_path / "two" / "state.json").read_text())
    assert state["finished"] == ["0/pseudo", "0/train", "0/eval"]
    return one, two


@pytest.mark.slow
def test_two_processes_pseudo_label_as_one(bench, tmp_path):
    """A CBST-SP round 0 (its prior counted by the main process) with exact thresholds."""
    _self_train_as_one(bench, tmp_path)
    assert (tmp_path / "two" / "prior.npy").read_bytes() == (tmp_path / "one" / "prior.npy").read_bytes()


@pytest.mark.slow
def test_two_processes_train_lrent_on_both_kept_caches(bench, tmp_path):
    """LRENT's training reads every process's probability cache, deleted once trained.

    The weights are not compared: the loss of a split batch is a mean of per-process means.
    """
    one, two = _self_train_as_one(bench, tmp_path, "--lr-weight-ent", "0.25")
    stats = json.loads((two / "stats.json").read_text())
    assert stats["lrent_alpha"] == 0.25 and any(f is not None for f in stats["kept_fraction"].values())
    assert not [p.name for p in two.iterdir() if p.name.startswith(CACHE_FOLDER)]
    assert (two / "model.pt").is_file()


@pytest.fixture(scope="module")
def source_run(bench, tmp_path_factory) -> Path:
    """A 2-process ``train-source`` run killed (SIGTERM to torchrun) after its first logged
    epoch, then resumed for one more epoch; returns its output folder."""
    out = tmp_path_factory.mktemp("source") / "run"
    args = [
        *("--dataset", "gta5", "--data-root", str(bench / "data" / "gta5"), "--model", "small"),
        *("--batch-images", "4", "--crop-size", "32", "--base-lr", "0.05", *QUIET, "--output", str(out)),
        *("--keep-checkpoints", "all"),
    ]
    job = subprocess.Popen(
        _job("train-source", *args, "--to-epoch", "100"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    # an epoch has finished once its checkpoint is there (written whole, then renamed)
    while not any((out / "checkpoints").glob("epoch_*.pt")) and job.poll() is None:
        assert time.monotonic() < deadline, "no epoch finished within 60 s"
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # as Ctrl-C, scancel or a preemption would
    stderr = job.communicate(timeout=60)[1]
    assert job.returncode != 0, stderr
    finished = int(sorted((out / "checkpoints").glob("epoch_*.pt"))[-1].stem.split("_")[1])
    assert 1 <= finished < 100
    resumed = _torchrun("train-source", *args, "--to-epoch", str(finished + 1), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return out


@pytest.mark.slow
def test_two_process_training_checkpoints_once_and_resumes_after_a_kill(source_run):
    checkpoints = sorted(p.name for p in (source_run / "checkpoints").iterdir())
    last = len(checkpoints)
    assert checkpoints == [f"epoch_{e:04d}.pt" for e in range(1, last + 1)]
    epochs = [json.loads(line)["epoch"] for line in (source_run / "log.jsonl").read_text().splitlines()]
    assert epochs[-1] == last and len(epochs) == len(set(epochs))  # one writer: one line per epoch
    meta = read_meta(source_run / "last.pt")
    assert meta["epoch"] == last and "optimizer" in meta["extra"]


@pytest.mark.slow
def test_two_processes_evaluate_as_one(bench, source_run, tmp_path):
    args = [
        *("--dataset", "cityscapes", "--data-root", str(bench / "data" / "cityscapes")),
        *("--checkpoint", str(source_run / "last.pt"), "--test-flipping", *QUIET),
    ]
    assert _one_process("evaluate", *args, "--out", str(tmp_path / "one.json")) == 0
    job = _torchrun("evaluate", *args, "--out", str(tmp_path / "two.json"))
    assert job.returncode == 0, job.stderr
    one = json.loads((tmp_path / "one.json").read_text())
    assert json.loads((tmp_path / "two.json").read_text()) == one
    assert one["images"] == 2 and one["pixel_acc"] > 0


@pytest.mark.slow
def test_an_error_in_one_process_ends_the_job_with_its_message(bench, tmp_path):
    """Only process 1 writes the second val image's prediction, and its path is blocked."""
    root = bench / "data" / "cityscapes"
    name = build_dataset("cityscapes", root, split="val").samples[1].name
    (tmp_path / "pred" / "labelIds" / f"{name}.png").mkdir(parents=True)
    started = time.monotonic()
    job = _torchrun(
        "evaluate",
        *("--dataset", "cityscapes", "--data-root", str(root), "--checkpoint", str(bench / "source.pt")),
        *(*QUIET, "--output", str(tmp_path / "pred")),
        timeout=60,
    )
    assert job.returncode != 0
    assert f"cbst evaluate (rank 1/2): error: {tmp_path / 'pred' / 'labelIds' / name}.png: cannot write" in (
        job.stderr
    )
    assert "(rank 0/2): error" not in job.stderr
    assert time.monotonic() - started < 45


def test_a_source_run_saved_before_sync_bn_existed_resumes(tmp_path):
    from cbst import sourcetrain

    config = sourcetrain.SourceTrainConfig(dataset="gta5", data_root=str(tmp_path), output=str(tmp_path))
    sourcetrain._write_config(tmp_path, config)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["sync_bn"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    sourcetrain._check_resume(tmp_path, config, 1)
    with pytest.raises(checks.ConfigError, match="--sync-bn"):
        sourcetrain._check_resume(tmp_path, dataclasses.replace(config, sync_bn=True), 1)


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, tmp_path, capsys):
    for name, value in zip(distributed.ENVIRONMENT, ("1", "2", "1", "127.0.0.1", "29500")):
        monkeypatch.setenv(name, value)
    assert main(["make-synthetic", str(tmp_path / "data")]) == 2
    assert (
        "cbst make-synthetic: error: runs in one process; start it without torchrun"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "data").exists() and not distributed.initialized()


def test_under_torchrun_a_gpu_number_and_mps_are_refused(monkeypatch):
    from cbst.device import select_device

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for name in ("cuda:1", "mps"):
        with pytest.raises(ValueError, match=f"--device {name}: under torchrun every process uses the GPU"):
            select_device(name)
    assert select_device("cpu") == torch.device("cpu")


def _cbst_lines(stderr: str) -> list[str]:
    """cbst's own lines of a job's stderr (torchrun adds its log and a launcher traceback)."""
    return [line for line in stderr.splitlines() if re.match(r"cbst [a-z-]+( \(rank \d+/\d+\))?: ", line)]


def _rank_of(pid: int) -> tuple[int, str]:
    """(parent pid, RANK) of a running process, from /proc."""
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    variables = dict(
        v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v
    )
    return parent, variables.get("RANK", "")


@pytest.fixture(scope="module")
def stopped_job(bench, tmp_path_factory) -> dict:
    """A long 2-process self-train job, a second job on its ``--output`` while it trains, then
    SIGTERM to the first job's torchrun; returns what each did and what the lock held."""
    out = tmp_path_factory.mktemp("locked") / "run"
    args = [*_self_train_args(bench), "--epoch-per-round", "1000", "--output", str(out)]
    first = subprocess.Popen(
        _job("self-train", *args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300  # two processes importing torch on a busy machine
    while "0/pseudo" not in _read(out / "state.json") and first.poll() is None:
        assert time.monotonic() < deadline, "the first job did not reach its training within 300 s"
        time.sleep(0.1)
    holder = json.loads((out / "cbst.lock").read_text())
    seen = {"holder": holder, "holder_is": _rank_of(holder["pid"]), "torchrun": first.pid}
    seen["second"] = _torchrun("self-train", *args, timeout=300)
    seen["running_after_second"] = first.poll() is None
    first.send_signal(signal.SIGTERM)  # as scancel or a preemption would
    seen["stderr"] = first.communicate(timeout=120)[1]
    seen["status"], seen["lock_left"] = first.returncode, (out / "cbst.lock").exists()
    seen["out"] = out
    return seen


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.mark.slow
def test_a_job_takes_its_lock_once_and_a_second_job_is_refused_in_one_line(stopped_job):
    holder = stopped_job["holder"]
    assert stopped_job["holder_is"] == (stopped_job["torchrun"], "0")  # the main process of the job
    second = stopped_job["second"]
    assert second.returncode != 0 and stopped_job["running_after_second"]
    lines = _cbst_lines(second.stderr)
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith("cbst self-train (rank 0/2): error: ")
    assert f"{stopped_job['out']}: in use by process {holder['pid']} on" in lines[0]
    assert not stopped_job["lock_left"]  # released when the first job stopped


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_each_rank_with_one_line(stopped_job):
    lines = _cbst_lines(stopped_job["stderr"])
    assert sorted(line.split(":")[0] for line in lines) == [
        "cbst self-train (rank 0/2)",
        "cbst self-train (rank 1/2)",
    ], stopped_job["stderr"]
    for line in lines:
        assert (
            "stopped by SIGTERM; finished stages are kept; rerun the torchrun job with the command cbst self-train"
            in line
        )
        assert line.endswith(" --resume")
    assert stopped_job["status"] == 1, stopped_job["stderr"]  # torchrun's own status after a signal
