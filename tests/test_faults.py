"""Faults a hostile or unlucky user meets: the run-folder lock, the overwrite rule of every command
that writes, resumes that must not trust what they find, inputs read wrongly without a word,
small files that claim huge sizes, full disks, truncated files and SIGTERM."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cbst import io, runlock, selftrain, signals
from cbst.checkpoints import load_checkpoint, save_checkpoint
from cbst.checks import read_saved_config
from cbst.cli import main
from cbst.errors import CheckpointError, ConfigError, DataError
from cbst.models import build_model
from cbst.mxnet import ParamsError, load_params
from cbst.priors import load_prior
from cbst.probability_cache import ProbabilityCache

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    )


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _lock_of(pid: int, host: str | None = None) -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "command": "cbst self-train"})


# ------------------------------------------------------------------------------------ the lock


def test_lock_is_exclusive_named_and_released(tmp_path):
    run = tmp_path / "run"
    path = runlock.acquire(run, "cbst self-train")
    holder = json.loads(path.read_text())
    assert (
        path == run / "cbst.lock" and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    )
    runlock.release(path)
    assert not path.exists()


def test_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    sleeper = _sleeper()
    try:
        (run / "cbst.lock").write_text(_lock_of(sleeper.pid))
        with pytest.raises(runlock.RunLockedError, match=f"in use by process {sleeper.pid} on"):
            runlock.acquire(run, "cbst self-train")
        with pytest.raises(runlock.RunLockedError, match="in use"):
            runlock.check_free(run)
    finally:
        sleeper.kill()
        sleeper.wait()
    path = runlock.acquire(run, "cbst self-train")  # the holder is dead now: a stale lock
    assert f"stale lock of process {sleeper.pid}" in capsys.readouterr().err
    assert json.loads(path.read_text())["pid"] == os.getpid()
    runlock.release(path)


def test_lock_of_another_host_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "cbst.lock").write_text(_lock_of(1, host="elsewhere.example"))
    with pytest.raises(runlock.RunLockedError, match="elsewhere.example"):
        runlock.acquire(run, "cbst train-source")


@pytest.mark.slow
def test_of_processes_racing_for_a_lock_exactly_one_wins(tmp_path):
    # Each process tries once at the same moment, then waits until all have tried before it exits
    # (and a winner releases the lock), so that no late starter finds the lock free again.
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cbst import runlock\n"
        "start, run, me = float(sys.argv[1]), sys.argv[2], Path(sys.argv[3])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "try:\n    runlock.acquire(run, 'race'); won = True\nexcept runlock.RunLockedError:\n    won = False\n"
        "me.write_text('tried')\n"
        "while len(list(me.parent.glob('tried_*'))) < 4:\n    time.sleep(0.05)\n"
        "sys.exit(0 if won else 3)\n"
    )
    start = time.time() + 5.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(start), str(tmp_path / "run"), str(tmp_path / f"tried_{i}")],
            env=_env(),
        )
        for i in range(4)
    ]
    codes = sorted(p.wait(timeout=300) for p in procs)
    assert codes == [0, 3, 3, 3]
    assert not (tmp_path / "run" / "cbst.lock").exists()  # released at exit


def test_self_train_refuses_a_folder_a_live_run_holds(self_train_argv, tmp_path, one_line_error):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = _sleeper()
    try:
        (out / "cbst.lock").write_text(_lock_of(sleeper.pid))
        argv = [*self_train_argv, "--device", "cpu", "--output", str(out)]
        for extra in ([], ["--resume"]):
            assert main(argv + extra) == 2
            one_line_error(str(out), f"in use by process {sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in out.iterdir()) == ["cbst.lock"]


def test_a_failed_run_releases_its_lock(bench, tmp_path, monkeypatch):
    cfg = selftrain.SelfTrainConfig(
        weights=str(bench / "source.pt"),
        output=str(tmp_path / "run"),
        data_root=str(bench / "data" / "gta5"),
        data_root_tgt=str(bench / "data" / "cityscapes"),
        num_round=1,
        batch_images=2,
        crop_size=32,
        device="cpu",
        progress=False,
    )

    def boom(*args, **kwargs):
        assert (tmp_path / "run" / "cbst.lock").is_file()  # held while the run works
        raise RuntimeError("stop here")

    monkeypatch.setattr(selftrain, "pseudo_label_pass", boom)
    with pytest.raises(RuntimeError, match="stop here"):
        selftrain.self_train(cfg)
    assert not (tmp_path / "run" / "cbst.lock").exists()


def test_start_removes_stale_temporaries_only(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "round_0").mkdir(parents=True)
    stale = [run / "round_0" / ".model.pt.0123abcd.tmp.pt", run / ".state.json.deadbeef.tmp.json"]
    kept = [run / "round_0" / "model.pt", run / ".hidden", run / "round_0" / ".x.tmp"]
    for path in stale + kept:
        path.write_bytes(b"")
    runlock.start(run, "cbst self-train")
    assert "removed 2 temporary file(s)" in capsys.readouterr().out
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    runlock.release_all()


# ----------------------------------------------------------------------- the overwrite rule


@pytest.fixture()
def runs(tmp_path) -> dict[str, Path]:
    """A self-train and a train-source folder as their commands lay them out, and an outside file."""
    st, src = tmp_path / "st", tmp_path / "src"
    (st / "round_0").mkdir(parents=True)
    (st / "config.yaml").write_text(yaml.safe_dump({"data_root_tgt": "x", "output": str(st)}))
    (st / "state.json").write_text(json.dumps({"finished": ["0/pseudo"]}))
    (st / "round_0" / "stats.json").write_text("{}\n")
    (src / "checkpoints").mkdir(parents=True)
    (src / "config.yaml").write_text(yaml.safe_dump({"lr_type": "fixed"}))
    (src / "last.pt").write_bytes(b"weights")
    (tmp_path / "other.json").write_text("{}\n")
    return {"st": st, "src": src, "other": tmp_path / "other.json"}


def test_files_of_a_run_are_never_replaced(runs):
    for path in (runs["st"] / "config.yaml", runs["st"] / "round_0" / "stats.json", runs["src"] / "last.pt"):
        with pytest.raises(FileExistsError, match="never replaced") as info:
            io.check_output_file(path, overwrite=True)
        assert info.value.filename == str(path)
    io.check_output_file(runs["st"] / "report.html", overwrite=False)  # a new file in a run: fine
    (runs["st"] / "report.html").write_text("old page")
    io.check_output_file(runs["st"] / "report.html", overwrite=True, replaceable=("report.html",))
    with pytest.raises(FileExistsError, match="--overwrite"):
        io.check_output_file(runs["st"] / "report.html", overwrite=False, replaceable=("report.html",))
    with pytest.raises(FileExistsError, match="--overwrite"):
        io.check_output_file(runs["other"], overwrite=False)
    io.check_output_file(runs["other"], overwrite=True)


def test_run_folders_hold_one_kind_of_run(runs, tmp_path):
    assert io.run_kind(runs["st"]) == "self-train" and io.run_kind(runs["src"]) == "train-source"
    assert io.run_kind(tmp_path / "new") is None
    with pytest.raises(FileExistsError, match="holds a train-source run, not a self-train run"):
        io.check_run_folder(runs["src"], "self-train")
    with pytest.raises(FileExistsError, match="holds a self-train run"):
        io.check_run_folder(runs["st"], "train-source")
    with pytest.raises(FileExistsError, match=r"1 files or folders that are not a cbst run \(other.json\)"):
        (tmp_path / "loose").mkdir()
        (tmp_path / "loose" / "other.json").write_text("{}")
        io.check_run_folder(tmp_path / "loose", "self-train")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cbst.lock").write_text("{}")
    io.check_run_folder(tmp_path / "empty", "self-train")  # a lock alone is not a run


def _cli_refuses(one_line_error, argv: list[str], path: Path, *names: str) -> None:
    before = path.read_bytes()
    assert main(argv) == 2
    one_line_error(str(path), *names)
    assert path.read_bytes() == before


def test_every_command_that_writes_a_file_follows_the_rule(bench, evaluate_argv, runs, one_line_error):
    evaluate = evaluate_argv
    convert = ["convert", str(bench / "source.pt"), "--arch", "small", "--num-classes", "19"]
    prior = ["prior", "--dataset", "gta5", "--data-root", str(bench / "data" / "gta5"), "--no-progress"]
    report = ["report", str(runs["st"]), "--images", "0"]
    for command in (evaluate, convert, prior, report):
        _cli_refuses(one_line_error, [*command, "--out", str(runs["other"])], runs["other"], "--overwrite")
        for target in (runs["st"] / "config.yaml", runs["src"] / "last.pt"):
            _cli_refuses(
                one_line_error, [*command, "--out", str(target), "--overwrite"], target, "never replaced"
            )
    argv = [*report, "--source-metrics", str(runs["other"]), "--out", str(runs["other"]), "--overwrite"]
    _cli_refuses(one_line_error, argv, runs["other"], "input")


def test_make_synthetic_refuses_a_run_folder(runs, capsys):
    before = (runs["st"] / "config.yaml").read_bytes()
    assert (
        main(["make-synthetic", str(runs["st"]), "--num-source", "1", "--num-train", "1", "--num-val", "1"])
        == 2
    )
    assert str(runs["st"]) in capsys.readouterr().err
    assert (runs["st"] / "config.yaml").read_bytes() == before


def test_self_train_output_of_another_kind_is_refused(
    self_train_argv, train_source_argv, runs, one_line_error
):
    before = (runs["src"] / "config.yaml").read_bytes()
    assert main([*self_train_argv, "--device", "cpu", "--output", str(runs["src"])]) == 2
    one_line_error(str(runs["src"]), "train-source run")
    assert (runs["src"] / "config.yaml").read_bytes() == before
    assert main([*train_source_argv, "--device", "cpu", "--output", str(runs["st"])]) == 2
    one_line_error(str(runs["st"]), "self-train run")


# --------------------------------------------------------------------------------- resumes


def _finished_run(out: Path, rounds: int) -> selftrain.RunState:
    """A run folder whose state lists every stage of ``rounds`` rounds, with their files."""
    for r in range(rounds):
        rdir = out / f"round_{r}"
        (rdir / "pseudo_labelIds").mkdir(parents=True)
        io.write_png(rdir / "pseudo_labelIds" / "a.png", np.zeros((2, 2), np.uint8))
        io.write_json(rdir / "stats.json", {"thresholds": {}})
        save_checkpoint(
            rdir / "model.pt", build_model("small", 19), arch="small", num_classes=19, protocol="cityscapes19"
        )
        io.write_json(rdir / "metrics.json", {"miou": 0.1})
    entries = [f"{r}/{s}" for r in range(rounds) for s in ("pseudo", "train", "eval")]
    io.write_json(out / "state.json", {"finished": entries, "seconds": dict.fromkeys(entries, 1.0)})
    return selftrain.RunState(out)


def _after_check(out: Path, cfg) -> list[str]:
    state = selftrain.RunState(out)
    selftrain._check_finished_files(out, cfg, state)
    return state.finished


@pytest.mark.parametrize(
    "damage, kept",
    [
        (
            lambda o: (o / "round_1" / "metrics.json").unlink(),
            ["0/pseudo", "0/train", "0/eval", "1/pseudo", "1/train"],
        ),
        (lambda o: (o / "round_0" / "model.pt").unlink(), ["0/pseudo"]),
        (lambda o: (o / "round_1" / "stats.json").write_text('{"thresh'), ["0/pseudo", "0/train", "0/eval"]),
        (
            lambda o: (o / "round_1" / "model.pt").write_bytes(
                (o / "round_1" / "model.pt").read_bytes()[:500]
            ),
            ["0/pseudo", "0/train", "0/eval", "1/pseudo"],
        ),
        (lambda o: None, ["0/pseudo", "0/train", "0/eval", "1/pseudo", "1/train", "1/eval"]),
    ],
)
def test_resume_redoes_stages_whose_files_are_gone_and_those_built_on_them(tmp_path, capsys, damage, kept):
    out = tmp_path / "run"
    _finished_run(out, 2)
    damage(out)
    cfg = selftrain.SelfTrainConfig(weights="w", output=str(out), data_root="s", data_root_tgt="t")
    assert _after_check(out, cfg) == kept
    said = capsys.readouterr().out
    assert ("redoing" in said) == (len(kept) < 6)


def test_resume_never_shrinks_a_run_or_runs_without_its_config(tmp_path):
    out = tmp_path / "run"
    state = _finished_run(out, 2)
    cfg = selftrain.SelfTrainConfig(
        weights="w", output=str(out), data_root="s", data_root_tgt="t", num_round=1
    )
    with pytest.raises(DataError, match="config.yaml: missing"):
        selftrain._check_resumable(out, cfg, state)
    (out / "config.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match="--num-round 1 is below the 2 rounds"):
        selftrain._check_resumable(out, cfg, state)


@pytest.mark.parametrize(
    "content", ['"finished"', '{"finished": "0/pseudo"}', '{"finished": ["0/other"]}', '{"fin']
)
def test_a_state_that_is_not_one_is_named(tmp_path, content):
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(DataError, match=str(tmp_path / "state.json")):
        selftrain.RunState(tmp_path)


def test_stage_durations_come_from_a_monotonic_clock(tmp_path, monkeypatch):
    clock = iter([100.0, 100.0, 107.5, 107.5, 110.0, 110.0])
    monkeypatch.setattr(selftrain.time, "monotonic", lambda: next(clock))
    state = selftrain.RunState(tmp_path)
    state.start_clock()
    state.mark(0, "pseudo")
    state.mark(0, "train")
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved == {"finished": ["0/pseudo", "0/train"], "seconds": {"0/pseudo": 7.5, "0/train": 2.5}}


def test_truncated_config_and_checkpoint_say_so(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"weights": "a", "seed": 0, "output": "o"})[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_saved_config(config)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, build_model("small", 19), arch="small", num_classes=19, protocol="cityscapes19")
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_checkpoint(ckpt)
    assert "convert" not in str(info.value)


def test_truncated_probability_cache_is_named(tmp_path):
    cache = ProbabilityCache(tmp_path / "cache", _plan(), device="cpu", backend="disk", keep=True)
    cache.put(0, [torch.rand(19, 4, 4)], (4, 4))
    cache.close()
    ProbabilityCache.open(tmp_path / "cache").close()
    data = tmp_path / "cache" / "probabilities.bin"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated probability cache"):
        ProbabilityCache.open(tmp_path / "cache")


def _plan():
    from cbst.inference import InferencePlan

    return InferencePlan(None, (1.0,), False)


# ------------------------------------------------------------------------------------ inputs


def test_16_bit_grayscale_images_are_scaled_not_clipped(tmp_path):
    gray = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # every 8-bit level x 257
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = io.read_image(tmp_path / "g16.png")
    expected = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert rgb.shape == (16, 16, 3) and all(np.array_equal(rgb[:, :, c], expected) for c in range(3))


def test_image_size_limit_refuses_bombs_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setenv(io.MAX_PIXELS_VARIABLE, "50000")
    for read in (io.image_size, io.read_image, io.read_label):
        with pytest.raises(DataError, match="300 x 200 pixels is larger than the limit of 50000"):
            read(path)
    monkeypatch.setenv(io.MAX_PIXELS_VARIABLE, "60000")
    assert io.image_size(path) == (300, 200)
    monkeypatch.setenv(io.MAX_PIXELS_VARIABLE, "lots")
    with pytest.raises(DataError, match=io.MAX_PIXELS_VARIABLE):
        io.image_size(path)


def test_list_file_with_byte_order_mark_and_dangling_links(bench, tmp_path):
    from cbst.datasets import build_dataset, read_list_file

    root = bench / "data" / "gta5"
    names = sorted(p.name for p in (root / "images").glob("*.png"))
    (tmp_path / "bom.lst").write_bytes(
        b"\xef\xbb\xbf" + "".join(f"images/{n}\tlabels/{n}\n" for n in names).encode()
    )
    assert [p.name for p, _ in read_list_file(tmp_path / "bom.lst", root)] == names
    copy = tmp_path / "gta5"
    (copy / "images").mkdir(parents=True)
    (copy / "labels").mkdir()
    for n in names:
        (copy / "images" / n).symlink_to(root / "images" / n)
        (copy / "labels" / n).symlink_to(root / "labels" / n)
    (copy / "images" / "ghost.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(DataError, match="ghost.png: a symbolic link to a missing file"):
        build_dataset("gta5", copy)


def _prior(tmp_path: Path, name: str, array: np.ndarray) -> Path:
    np.save(tmp_path / name, array)
    return tmp_path / name


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((19, 4, 8), np.float32), "zero everywhere"),
        (np.full((19, 4, 8), 200, np.uint8), "above 1"),
        (np.zeros((19, 0, 0), np.float32), "empty prior"),
        (np.full((19, 4, 8), "0.5"), "dtype <U3"),
    ],
)
def test_prior_range_dtype_and_shape_are_checked(tmp_path, array, message):
    path = _prior(tmp_path, "p.npy", array)
    with pytest.raises(DataError, match=message) as info:
        load_prior(path, 19)
    assert str(path) in str(info.value)


def test_npy_header_that_claims_more_than_the_file_is_refused_before_loading(tmp_path):
    path = tmp_path / "huge.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (19, 10**5, 10**5)}
        )
        fh.write(b"\0" * 64)
    with pytest.raises(DataError, match="header declares .* but the file holds 64 bytes"):
        load_prior(path, 19)


@pytest.mark.parametrize("ndim, dims", [(2**31 - 1, ()), (3, (2**40, 2**40, 2**40))])
def test_params_headers_are_checked_before_allocating(tmp_path, ndim, dims):
    path = tmp_path / "bad.params"
    body = struct.pack("<QQQ", 0x112, 0, 1) + struct.pack("<Iii", 0xF993FAC9, 0, ndim)
    path.write_bytes(
        (body + struct.pack(f"<{len(dims)}q", *dims) + struct.pack("<iii", 1, 0, 0)).ljust(108, b"\0")
    )
    with pytest.raises(ParamsError, match=str(path)):
        load_params(path)


def test_crop_and_batch_sizes_are_checked_before_the_first_stage(bench, tmp_path):
    base = dict(
        weights=str(bench / "source.pt"),
        output=str(tmp_path / "run"),
        data_root=str(bench / "data" / "gta5"),
        data_root_tgt=str(bench / "data" / "cityscapes"),
        device="cpu",
    )
    for options, flag in (
        ({"crop_size": 100000}, "--crop-size"),
        ({"pseudo_batch": 10**6}, "--pseudo-batch"),
        ({"num_round": 10**9}, "--num-round"),  # a plan a round, made before any work
    ):
        with pytest.raises(ConfigError, match=flag):
            selftrain.SelfTrainConfig(**base, **options).validate()
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------- full disk


def test_full_disk_during_json_and_text_writes_is_named_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    for write in (lambda p: io.write_json(p, {"a": 1}), lambda p: io.write_text(p, "x")):
        with pytest.raises(OSError, match="No space left on device") as info:
            write(tmp_path / "state.json")
        assert info.value.filename == str(tmp_path / "state.json")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_torch_save_is_named(tmp_path, monkeypatch):
    def cut_short(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4224 vs 4118")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(torch, "save", cut_short)
    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    target = tmp_path / "round_0" / "model.pt"
    with pytest.raises(OSError, match="No space left on device") as info:
        save_checkpoint(
            target, build_model("small", 19), arch="small", num_classes=19, protocol="cityscapes19"
        )
    assert info.value.filename == str(target)
    assert list((tmp_path / "round_0").iterdir()) == []


def test_full_disk_through_the_cli_is_one_line(evaluate_argv, tmp_path, monkeypatch, one_line_error):
    real = Path.write_text

    def full_for_json(self, *args, **kwargs):
        if self.suffix == ".json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_json)
    out = tmp_path / "m.json"
    assert main([*evaluate_argv, "--out", str(out)]) == 2
    one_line_error(str(out), "no space left on the device")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- SIGTERM


def test_sigterm_becomes_a_stop_with_the_resume_command(capsys):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signals.install()
        with pytest.raises(signals.Stopped) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    argv = ["self-train", "--config", "my run.yaml"]
    assert signals.report_stop("cbst self-train", argv, info.value) == 143
    err = capsys.readouterr().err
    resume = "cbst self-train --config 'my run.yaml' --resume"
    assert err == f"cbst self-train: stopped by SIGTERM; finished stages are kept; resume with: {resume}\n"
    assert signals.report_stop("cbst evaluate", ["evaluate"], KeyboardInterrupt()) == 130
    worker = RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated. ")
    assert signals.stop_signal(worker) == signal.SIGTERM and signals.stop_signal(RuntimeError("x")) is None
    try:
        try:
            raise signals.Stopped(signal.SIGTERM)
        finally:  # a collective operation while the stop unwinds; the peer has gone
            raise RuntimeError("Connection closed by peer")
    except RuntimeError as exc:
        assert signals.stop_signal(exc) == signal.SIGTERM


def test_a_stop_that_python_drops_is_delivered_again():
    class Dropping:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler raises here, inside __del__, where Python drops it

    previous = signal.getsignal(signal.SIGTERM)
    try:
        signals.install()
        with pytest.raises(signals.Stopped):
            Dropping()  # deleted at once
            time.sleep(2)
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = sys.__unraisablehook__


def test_a_loader_worker_keeps_quiet_when_the_main_process_is_gone(monkeypatch, capsys):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    signals.quiet_worker(0)
    for error in (ConnectionResetError(104, "Connection reset by peer"), EOFError(), KeyError("a bug")):
        sys.excepthook(type(error), error, None)  # what multiprocessing's resource sharer calls
    err = capsys.readouterr().err
    assert "KeyError" in err and "Connection" not in err and "EOFError" not in err


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.slow
def test_sigterm_stops_a_training_run_and_its_workers(train_source_argv, tmp_path):
    out = tmp_path / "run"
    argv = train_source_argv + [
        "--batch-images",
        "2",
        "--crop-size",
        "32",
        "--to-epoch",
        "50",
        "--num-workers",
        "2",
        "--device",
        "cpu",
    ]
    argv += ["--no-progress", "--output", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cbst", *argv],
        env=_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    deadline, workers = time.time() + 600, []  # start-up takes long on a busy machine
    while time.time() < deadline and proc.poll() is None and not workers:
        workers = _children(proc.pid) if (out / "cbst.lock").is_file() else []
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=600)[1]
    time.sleep(1.0)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].endswith("resume with: cbst " + " ".join(argv) + " --resume"), lines
    assert workers and not [p for p in workers if Path(f"/proc/{p}").exists()]
    assert not (out / "cbst.lock").exists() and not io.remove_temporaries(out)


def test_lines_of_processes_sharing_stderr_never_run_together(tmp_path):
    """Two processes of a job print long lines on one stderr at once: each line arrives whole."""
    log = tmp_path / "stderr.txt"
    code = (
        "import sys; from cbst.errors import print_line\n[print_line(sys.argv[1] * 900) for _ in range(3000)]"
    )
    with log.open("w") as shared:
        writers = [subprocess.Popen([sys.executable, "-c", code, tag], stderr=shared) for tag in "ab"]
        assert [w.wait(timeout=120) for w in writers] == [0, 0]
    lines = log.read_text().splitlines()
    assert len(lines) == 6000
    assert set(lines) == {"a" * 900, "b" * 900}
