"""Replay faults through the ``cbst`` command line: lost data, silently wrong results, small files
that exhaust memory, bad values, full disks, truncated files, SIGTERM and leftovers; check each.

It builds on ``bad_inputs.py`` (beside it): the same tiny benchmark, source model and good runs,
plus two reference self-training runs (two rounds with evaluation; one LRENT round). Every error
case must exit 2 (143 for SIGTERM) with one line on stderr naming the file or option, no
traceback, every file present before unchanged and no temporary file left; every recovery (a
resume after the fault) must exit 0 and end with the same results, weights and pseudo-labels as
the uninterrupted reference. Memory cases run under ``ulimit -v`` (``--memory-kib``, default 4 GB)
and must end in under ``--max-seconds`` (default 10) of CPU time; their CPU and wall times are
printed and recorded. Full-disk cases use a small tmpfs when run as root (skipped otherwise).
``--out FILE`` writes a JSON-lines summary: one object per case with its name, whether it passed,
the exit status of its command (null for a check of files) and the seconds it took (wall), and
for the memory cases their CPU seconds and the memory limit.

    python benchmarks/faults.py            # about 5 minutes on 2 idle CPU cores
    python benchmarks/faults.py --out benchmarks/results/faults.jsonl
    python benchmarks/faults.py --keep     # keep the temporary folder to look at
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_inputs import (  # noqa: E402
    CONVERT,
    EVALUATE,
    PRIOR,
    SELF_TRAIN,
    TRAIN_SOURCE,
    cbst,
    child_env,
    finish,
    replay,
    visible_lines,
)
from bad_inputs import setup as setup_bad_inputs  # noqa: E402

TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp(\.[^./]+)?")
ST = ("self-train", *SELF_TRAIN)
REF = (*ST, "--base-lr", "0.001", "--num-round", "2", "--eval-split", "val")
LRENT = (*ST, "--base-lr", "0.001", "--lr-weight-ent", "0.25", "--epoch-per-round", "3")
RESULTS: list[dict[str, Any]] = []
"""One record a case, in the order run: what ``--out`` writes."""


def report(
    ok: bool, name: str, detail: str, status: int | None = None, seconds: float | None = None, **extra: Any
) -> bool:
    """Print one case's line and record it (``status``: the exit status of its command, if any)."""
    print(f"{'ok  ' if ok else 'FAIL'} {name:<62} {detail}", flush=True)
    rounded = None if seconds is None else round(seconds, 2)
    RESULTS.append({"name": name.strip(" ."), "ok": ok, "exit": status, "seconds": rounded, **extra})
    return ok


def temporaries(root: Path) -> list[Path]:
    """The temporary files cbst writes before renaming them into place, left under ``root``."""
    return [p for p in root.rglob(".*") if TEMPORARY.fullmatch(p.name)]


def _child_cpu() -> float:
    """CPU seconds used so far by this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(
    run: Callable[[], subprocess.CompletedProcess], times: dict[str, float]
) -> Callable[[], subprocess.CompletedProcess]:
    """``run`` that records its wall and CPU seconds in ``times``."""

    def timed() -> subprocess.CompletedProcess:
        start, cpu = time.monotonic(), _child_cpu()
        done = run()
        times["wall"], times["cpu"] = time.monotonic() - start, _child_cpu() - cpu
        return done

    return timed


def _limited(root: Path, argv: tuple[str, ...], memory_kib: int) -> subprocess.CompletedProcess:
    """``cbst ARGV`` in ``root`` under ``ulimit -v memory_kib``."""
    command = f"ulimit -v {memory_kib}; exec {shlex.quote(sys.executable)} -m cbst {shlex.join(argv)}"
    return subprocess.run(["bash", "-c", command], cwd=root, env=child_env(), capture_output=True, text=True)


def expect_error(
    root: Path,
    name: str,
    argv: tuple[str, ...],
    names: tuple[str, ...],
    *,
    status: int = 2,
    forbid: tuple[str, ...] = (),
    absent: tuple[str, ...] = (),
    memory_kib: int = 0,
    max_seconds: float = 0.0,
) -> bool:
    """Run a case that must fail cleanly; with ``memory_kib`` under ``ulimit -v`` and in under
    ``max_seconds`` of CPU time."""
    times: dict[str, float] = {}
    run = (lambda: _limited(root, argv, memory_kib)) if memory_kib else (lambda: cbst(root, argv))
    earlier = set(temporaries(root))  # a live run's, paused in the middle of a write
    outcome = replay(root, _timed(run, times), absent)
    left = [str(p.relative_to(root)) for p in temporaries(root) if p not in earlier]
    kept = not outcome.changed and not outcome.created and not left
    fast = not memory_kib or times["cpu"] < max_seconds
    ok = outcome.refused(names, forbid, status) and not left and fast
    yes_no = {True: "yes", False: "no "}
    detail = (
        f"exit {outcome.done.returncode}  one line: {yes_no[outcome.one_line(names, forbid)]}  "
        f"unchanged: {yes_no[kept]}"
    )
    extra: dict[str, Any] = {}
    if memory_kib:
        detail += f"  cpu {times['cpu']:.1f} s, wall {times['wall']:.1f} s"
        extra = {"cpu_seconds": round(times["cpu"], 2), "memory_kib": memory_kib}
    report(ok, name, detail, outcome.done.returncode, times["wall"], **extra)
    if not ok:
        print(
            f"       stderr: {' | '.join(outcome.lines)[:700]}\n"
            f"       changed: {outcome.changed} created: {outcome.created + left}"
        )
    return ok


def expect_success(
    root: Path, name: str, argv: tuple[str, ...], says: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run a recovery that must succeed (and print each of ``says``)."""
    times: dict[str, float] = {}
    done = _timed(lambda: cbst(root, argv), times)()
    output = done.stdout + done.stderr
    ok = done.returncode == 0 and "Traceback" not in output and all(s in output for s in says)
    said = f"  says {', '.join(says)}: {'yes' if ok else 'no'}" if says else ""
    report(ok, name, f"exit {done.returncode}{said}", done.returncode, times["wall"])
    if not ok:
        print(f"       output: {' | '.join(visible_lines(output))[-700:]}")
    return done


def same_run(a: Path, b: Path) -> list[str]:
    """Where run ``b`` differs from run ``a``: results, metrics, stats (times aside), weights, PNGs."""
    import torch

    diffs = []
    load = lambda p: json.loads(p.read_text())  # noqa: E731
    if (a / "results.json").is_file() and load(a / "results.json") != load(b / "results.json"):
        diffs.append("results.json")
    for rdir in sorted(a.glob("round_*")):
        other = b / rdir.name
        for metrics in rdir.glob("metrics.json"):
            if load(metrics) != load(other / metrics.name):
                diffs.append(f"{rdir.name}/metrics.json")
        drop = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731
        if drop(load(rdir / "stats.json")) != drop(load(other / "stats.json")):
            diffs.append(f"{rdir.name}/stats.json")
        wa = torch.load(rdir / "model.pt", weights_only=True)["state_dict"]
        wb = torch.load(other / "model.pt", weights_only=True)["state_dict"]
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            diffs.append(f"{rdir.name}/model.pt")
        for png in (rdir / "pseudo_labelIds").glob("*.png"):
            if png.read_bytes() != (other / "pseudo_labelIds" / png.name).read_bytes():
                diffs.append(f"{rdir.name}/pseudo_labelIds/{png.name}")
                break
    return diffs


def expect_same(name: str, reference: Path, run: Path) -> None:
    diffs = same_run(reference, run)
    report(not diffs, name, "identical to the uninterrupted run" if not diffs else f"differs: {diffs}")


def copy_run(root: Path, source: str, name: str, edit: Callable[[Path], None] | None = None) -> str:
    shutil.copytree(root / source, root / name)
    if edit is not None:
        edit(root / name)
    return name


def keep_round(run: Path, last: int) -> None:
    """Make ``run`` a run stopped after round ``last`` (later rounds' files and records gone)."""
    state = json.loads((run / "state.json").read_text())
    where = (e.split("/")[0] for e in state["finished"])  # a round's index, or "source"
    state["finished"] = [e for e, w in zip(state["finished"], where) if not w.isdigit() or int(w) <= last]
    state["seconds"] = {k: v for k, v in state.get("seconds", {}).items() if k in state["finished"]}
    (run / "state.json").write_text(json.dumps(state))
    for rdir in run.glob("round_*"):
        if int(rdir.name.split("_")[1]) > last:
            shutil.rmtree(rdir)
    (run / "results.json").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ bad files


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width`` x ``height`` pixels and holds one compressed row: a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * (3 * width + 1)))
        + chunk(b"IEND", b"")
    )


def npy_header(path: Path, shape: tuple[int, ...]) -> None:
    """A .npy file whose header declares ``shape`` float32 but which holds 16 bytes of data."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
        fh.write(b"\0" * 16)


def params_file(path: Path, dims: tuple[int, ...], ndim: int | None = None) -> None:
    """An MXNet .params list of one array whose header declares ``dims`` (or just ``ndim``)."""
    body = struct.pack("<QQQ", 0x112, 0, 1) + struct.pack(
        "<Iii", 0xF993FAC9, 0, len(dims) if ndim is None else ndim
    )
    body += struct.pack(f"<{len(dims)}q", *dims) + struct.pack("<iii", 1, 0, 0)
    path.write_bytes(body.ljust(108, b"\0"))


def data_copy(root: Path, name: str, edit: Callable[[Path], None]) -> str:
    """A copy of the target benchmark (``data/cityscapes``) changed by ``edit(val folder)``."""
    target = root / name
    shutil.copytree(root / "data" / "cityscapes", target)
    edit(next((target / "leftImg8bit" / "val").iterdir()))
    return name


def yaml_bombs(root: Path) -> None:
    """Configuration files of a few hundred bytes that expand to gigabytes when loaded naively."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    (root / "laughs.yaml").write_text("\n".join(lines) + "\n")
    (root / "deep_flow.yaml").write_text("x: " + "[" * 5000 + "]" * 5000 + "\n")
    (root / "deep_block.yaml").write_text("x:\n  " + "- " * 5000 + "a\n")
    # 400 kB aliased 10,000 times: 4 GB once written out, as a message quoting the value would
    lines = [f'long: &s "{"x" * 400_000}"']
    for level, prev in enumerate(("s", "l1", "l2", "l3"), start=1):
        lines.append(f"l{level}: &l{level} [{', '.join(['*' + prev] * 10)}]")
    (root / "long_value.yaml").write_text("\n".join(lines) + "\nbase_lr: *l4\n")
    (root / "long_int.yaml").write_text("num_round: " + "1" * 6000 + "\n")


def bad_files(root: Path) -> None:
    """The priors, weights, images and list files of the cases."""
    from PIL import Image

    prior = np.load(root / "prior.npy")
    np.save(root / "prior_zero.npy", np.zeros_like(prior))
    np.save(root / "prior_255.npy", (prior * 255).round().astype(np.uint8))
    np.save(root / "prior_empty.npy", np.zeros((19, 0, 0), np.float32))
    np.save(root / "prior_str.npy", np.full(prior.shape, "0.5"))
    np.save(root / "prior_2d.npy", prior[0])
    np.save(root / "prior_18.npy", prior[:18])
    npy_header(root / "prior_huge.npy", (19, 100_000, 100_000))
    params_file(root / "ndim.params", (), ndim=2**31 - 1)
    params_file(root / "overflow.params", (2**40, 2**40, 2**40))

    def to_16bit(folder: Path) -> None:
        for png in folder.glob("*.png"):
            rgb = np.asarray(Image.open(png).convert("L"), dtype=np.uint16) * 257
            Image.fromarray(rgb).save(png)

    def gray(folder: Path) -> None:
        for png in folder.glob("*.png"):
            Image.open(png).convert("L").save(png)

    data_copy(root, "data16", to_16bit)
    data_copy(root, "data8", gray)
    data_copy(root, "data_bomb", lambda f: png_header(sorted(f.glob("*.png"))[0], 30000, 30000))
    data_copy(root, "data_big", lambda f: png_header(sorted(f.glob("*.png"))[0], 13000, 13000))
    data_copy(root, "data_link", lambda f: (f / "ghost_leftImg8bit.png").symlink_to(f / "nowhere.png"))
    images = sorted((root / "data" / "gta5" / "images").glob("*.png"))
    lines = [f"images/{p.name}\tlabels/{p.name}" for p in images]
    (root / "bom.lst").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    yaml_bombs(root)
    checkpoint = (root / "source" / "last.pt").read_bytes()
    (root / "truncated.pt").write_bytes(checkpoint[: len(checkpoint) // 2])


# ----------------------------------------------------------------------------------- the cases


def data_lost(root: Path) -> None:
    """Every command that writes a file follows one overwrite rule; run folders hold one run."""
    report_argv = ("report", "st", "--images", "0", "--device", "cpu")
    for name, argv, names in (
        (
            "report --out RUN/config.yaml --overwrite",
            (*report_argv, "--out", "st/config.yaml", "--overwrite"),
            ("st/config.yaml", "never replaced"),
        ),
        (
            "report --out RUN/round_0/model.pt --overwrite",
            (*report_argv, "--out", "st/round_0/model.pt", "--overwrite"),
            ("model.pt", "never replaced"),
        ),
        (
            "report --out an existing file",
            (*report_argv, "--out", "metrics.json"),
            ("metrics.json", "--overwrite"),
        ),
        (
            "evaluate --out an existing file",
            (*EVALUATE, "--out", "metrics.json"),
            ("metrics.json", "--overwrite"),
        ),
        (
            "convert --out an existing file",
            (*CONVERT, "--out", "converted.pt"),
            ("converted.pt", "--overwrite"),
        ),
        ("prior --out an existing file", (*PRIOR, "--out", "prior.npy"), ("prior.npy", "--overwrite")),
        (
            "prior --out a file of a run --overwrite",
            (*PRIOR, "--out", "st/state.json", "--overwrite"),
            ("state.json", "never replaced"),
        ),
        (
            "self-train --output a train-source run",
            (*ST, "--output", "source"),
            ("source", "train-source run"),
        ),
        (
            "train-source --output a self-train run",
            ("train-source", *TRAIN_SOURCE, "--to-epoch", "1", "--output", "st"),
            ("st", "self-train run"),
        ),
        (
            "self-train --output the benchmark folder",
            (*ST, "--output", "data"),
            ("data", "synthetic benchmark"),
        ),
        (
            "self-train --output a folder of other files",
            (*ST, "--output", "preds"),
            ("preds", "not a cbst run"),
        ),
    ):
        expect_error(root, name, argv, names)


def lock(root: Path) -> None:
    """Two processes on one run folder, a resume while the run is alive, a stale lock."""
    argv = (*ST, "--base-lr", "0.001", "--output", "race")
    first = subprocess.Popen(
        [sys.executable, "-m", "cbst", *argv],
        cwd=root,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (root / "race" / "config.yaml").exists() and first.poll() is None:
        time.sleep(0.02)  # the run has started: its lock taken, its configuration written
    first.send_signal(signal.SIGSTOP)  # alive and holding its lock, however slow the others start
    try:
        expect_error(
            root,
            "a second self-train on a running run's folder",
            argv,
            ("race", "in use by process", str(first.pid)),
        )
        expect_error(
            root,
            "--resume of a run that is still running",
            (*argv, "--resume"),
            ("race", "in use by process"),
        )
    finally:
        first.send_signal(signal.SIGCONT)
    first.communicate()
    report(
        first.returncode == 0 and not (root / "race" / "cbst.lock").exists(),
        "the first run finishes and releases its lock",
        f"exit {first.returncode}",
        first.returncode,
    )
    expect_same("the first run's files are its own", root / "st", root / "race")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "command": "cbst self-train", "started": "then"}
    tmp_name = "round_0/.model.pt.0123abcd.tmp.pt"

    def leave_behind(run: Path) -> None:
        (run / "cbst.lock").write_text(json.dumps(stale))
        (run / tmp_name).write_bytes(b"")

    copy_run(root, "st", "st_stale", leave_behind)
    expect_success(
        root,
        "--resume over a stale lock and a temporary file",
        (*ST, "--base-lr", "0.001", "--output", "st_stale", "--resume"),
        ("stale lock", str(dead.pid), "removed 1 temporary"),
    )
    report(
        not (root / "st_stale" / tmp_name).exists() and not (root / "st_stale" / "cbst.lock").exists(),
        "the temporary and the lock are gone",
        "",
    )


def resume_checks(root: Path) -> None:
    """Resumes that used to trust what they found."""
    resume = (*REF, "--resume")
    for what, edit in (
        ("a deleted round_1/metrics.json", lambda r: (r / "round_1" / "metrics.json").unlink()),
        ("a deleted round_0/model.pt", lambda r: (r / "round_0" / "model.pt").unlink()),
        (
            "a truncated round_1/stats.json",
            lambda r: (r / "round_1" / "stats.json").write_text(
                (r / "round_1" / "stats.json").read_text()[:40]
            ),
        ),
        (
            "a truncated round_1/model.pt",
            lambda r: (r / "round_1" / "model.pt").write_bytes(
                (r / "round_1" / "model.pt").read_bytes()[:900]
            ),
        ),
    ):
        name = copy_run(root, "ref", f"ref_{len(RESULTS)}", edit)
        expect_success(root, f"--resume after {what}", (*resume, "--output", name), ("redoing",))
        expect_same(f"  ... then identical ({what})", root / "ref", root / name)
    name = copy_run(root, "ref", "ref_noconfig", lambda r: (r / "config.yaml").unlink())
    expect_error(
        root, "--resume without config.yaml", (*resume, "--output", name), ("config.yaml", "missing")
    )
    expect_error(
        root,
        "--resume --num-round 1 on a finished 2-round run",
        (*resume, "--num-round", "1", "--output", "ref"),
        ("--num-round 1", "2 rounds"),
    )
    name = copy_run(root, "st", "st_string_state", lambda r: (r / "state.json").write_text('"finished"\n'))
    expect_error(
        root,
        "state.json holding a string",
        (*ST, "--base-lr", "0.001", "--resume", "--output", name),
        ("state.json",),
    )
    name = copy_run(
        root,
        "st",
        "st_cut_config",
        lambda r: (r / "config.yaml").write_text((r / "config.yaml").read_text()[:300]),
    )
    expect_error(
        root,
        "a truncated config.yaml",
        (*ST, "--base-lr", "0.001", "--resume", "--output", name),
        ("config.yaml", "truncated"),
    )
    name = copy_run(
        root,
        "st",
        "st_bad_value",
        lambda r: (r / "config.yaml").write_text(
            (r / "config.yaml").read_text().replace("num_round: 1\n", "num_round: three\n")
        ),
    )
    expect_error(
        root,
        "a bad value in a run's config.yaml (num_round: three)",
        (*ST, "--base-lr", "0.001", "--resume", "--output", name),
        ("config.yaml", "num_round", "three"),
    )
    name = copy_run(
        root, "ref", "ref_cut_stats", lambda r: (r / "round_1" / "stats.json").write_text('{"portion": 0.')
    )
    expect_error(
        root,
        "report of a run with a truncated stats.json",
        ("report", name, "--images", "0", "--out", "cut.html"),
        ("stats.json",),
        absent=("cut.html",),
    )
    state = json.loads((root / "ref" / "state.json").read_text())
    timed = set(state.get("seconds", {})) == set(state["finished"]) and all(
        v >= 0 for v in state["seconds"].values()
    )
    report(
        timed,
        "state.json records every stage's duration (monotonic clock)",
        f"{len(state.get('seconds', {}))} of {len(state['finished'])} stages",
    )


def inputs(root: Path) -> None:
    """Inputs that used to be read wrongly without a word."""
    expect_success(
        root,
        "evaluate on 16-bit grayscale target images",
        (*EVALUATE, "--data-root", "data16", "--out", "m16.json"),
    )
    expect_success(
        root,
        "evaluate on the same images as 8-bit grayscale",
        (*EVALUATE, "--data-root", "data8", "--out", "m8.json"),
    )
    same = (root / "m16.json").is_file() and json.loads((root / "m16.json").read_text()) == json.loads(
        (root / "m8.json").read_text()
    )
    report(
        same,
        "  ... 16-bit images scaled exactly like their 8-bit originals",
        "same metrics" if same else "metrics differ",
    )
    for name in (
        "prior_zero.npy",
        "prior_255.npy",
        "prior_empty.npy",
        "prior_str.npy",
        "prior_2d.npy",
        "prior_18.npy",
    ):
        expect_error(
            root,
            f"self-train --with-prior {name}",
            (*ST, "--with-prior", name, "--output", f"p_{name}"),
            (name,),
            absent=(f"p_{name}",),
        )
    expect_error(
        root,
        "a dangling symlink among the target images",
        (*EVALUATE, "--data-root", "data_link"),
        ("ghost_leftImg8bit.png",),
    )
    expect_success(
        root,
        "a list file with a UTF-8 byte-order mark",
        (*PRIOR, "--list", "bom.lst", "--out", "bom_prior.npy"),
    )
    same = (root / "bom_prior.npy").is_file() and np.array_equal(
        np.load(root / "bom_prior.npy"), np.load(root / "prior.npy")
    )
    report(same, "  ... read exactly as the folder itself", "same prior" if same else "differs")
    expect_error(
        root,
        "a truncated checkpoint",
        (*EVALUATE, "--checkpoint", "truncated.pt"),
        ("truncated.pt", "truncated"),
        forbid=("cbst convert",),
    )
    expect_error(
        root,
        "convert a .params whose shape overflows",
        ("convert", "overflow.params", "--arch", "resnet38", "--num-classes", "19", "--out", "o.pt"),
        ("overflow.params",),
        absent=("o.pt",),
    )


def memory(root: Path, kib: int, seconds: float) -> None:
    """Small files and options that used to exhaust memory, under ``ulimit -v``."""
    config = ("self-train", "--config")
    for name, argv, names, absent in (
        (
            "convert a 108-byte .params claiming ndim 2^31-1",
            ("convert", "ndim.params", "--arch", "resnet38", "--num-classes", "19", "--out", "n.pt"),
            ("ndim.params",),
            "n.pt",
        ),
        (
            "train-source --weights that .params",
            (
                "train-source",
                *TRAIN_SOURCE,
                "--to-epoch",
                "1",
                "--weights",
                "ndim.params",
                "--output",
                "s_ndim",
            ),
            ("ndim.params",),
            "s_ndim",
        ),
        (
            "a .npy prior whose header claims 708 GiB",
            (*ST, "--with-prior", "prior_huge.npy", "--output", "p_huge"),
            ("prior_huge.npy",),
            "p_huge",
        ),
        (
            "a 30000 x 30000 PNG (decompression bomb)",
            (*EVALUATE, "--data-root", "data_bomb"),
            ("data_bomb", "CBST_MAX_IMAGE_PIXELS"),
            "",
        ),
        (
            "a 13000 x 13000 PNG",
            (*EVALUATE, "--data-root", "data_big"),
            ("data_big", "CBST_MAX_IMAGE_PIXELS"),
            "",
        ),
        (
            "self-train --crop-size 100000",
            (*ST, "--crop-size", "100000", "--output", "big_crop"),
            ("--crop-size",),
            "big_crop",
        ),
        (
            "train-source --batch-images 100000",
            ("train-source", *TRAIN_SOURCE, "--batch-images", "100000", "--output", "big_batch"),
            ("--batch-images",),
            "big_batch",
        ),
        (
            "self-train --num-round 1000000000",
            (*ST, "--num-round", "1000000000", "--output", "many_rounds"),
            ("--num-round",),
            "many_rounds",
        ),
        (
            "a 560-byte config of aliases of aliases (billion laughs)",
            (*config, "laughs.yaml", *SELF_TRAIN, "--output", "y_laughs"),
            ("laughs.yaml", "aliases"),
            "y_laughs",
        ),
        (
            "a config nested 5000 levels deep, [[[...]]]",
            (*config, "deep_flow.yaml", *SELF_TRAIN, "--output", "y_flow"),
            ("deep_flow.yaml", "nested"),
            "y_flow",
        ),
        (
            "a config nested 5000 levels deep, - - - ...",
            (*config, "deep_block.yaml", *SELF_TRAIN, "--output", "y_block"),
            ("deep_block.yaml", "nested"),
            "y_block",
        ),
        (
            "a config value that aliases make 4 GB long (type check)",
            (*config, "long_value.yaml", *SELF_TRAIN, "--output", "y_long"),
            ("long_value.yaml", "base_lr", "expected a number"),
            "y_long",
        ),
        (
            "a config holding a 6000-digit integer",
            (*config, "long_int.yaml", *SELF_TRAIN, "--output", "y_int"),
            ("long_int.yaml", "integer"),
            "y_int",
        ),
    ):
        expect_error(
            root, name, argv, names, absent=(absent,) if absent else (), memory_kib=kib, max_seconds=seconds
        )


def _without(argv: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """``argv`` without ``flag`` and its value."""
    at = argv.index(flag)
    return argv[:at] + argv[at + 2 :]


def bad_values(root: Path) -> None:
    """Option and configuration values that used to crash with a traceback or be misread."""
    for device in ("gpu", "cuda:x", "", "cuda:99"):
        expect_error(root, f"evaluate --device {device!r}", (*EVALUATE, "--device", device), ("--device",))
    (root / "null_weights.yaml").write_text("weights: null\n")
    expect_error(
        root,
        "a config holding weights: null",
        (
            "self-train",
            "--config",
            "null_weights.yaml",
            *_without(SELF_TRAIN, "--weights"),
            "--output",
            "w_null",
        ),
        ("null_weights.yaml", "--weights", "null"),
        absent=("w_null",),
    )
    (root / "bad_value.yaml").write_text("base_lr: fast\n")
    expect_error(
        root,
        "a config holding base_lr: fast",
        ("self-train", "--config", "bad_value.yaml", *SELF_TRAIN, "--output", "v_bad"),
        ("bad_value.yaml", "--base-lr", "fast"),
        absent=("v_bad",),
    )


def sigterm(root: Path) -> None:
    """SIGTERM during LRENT's training (with DataLoader workers), a truncated kept cache, resume."""
    argv = (*LRENT, "--num-workers", "2", "--output", "lrent_cut")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cbst", *argv],
        cwd=root,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = root / "lrent_cut" / "state.json"
    children: list[int] = []
    while proc.poll() is None:
        if state.is_file() and "0/pseudo" in state.read_text():
            children = _children(proc.pid)
            if children:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    seconds = time.monotonic() - started
    time.sleep(1.0)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    lines = visible_lines(err)
    said = re.search(r"resume with: (cbst .*)$", lines[-1]) if lines else None
    ok = (
        proc.returncode == 143
        and len(lines) == 1
        and "SIGTERM" in lines[0]
        and said is not None
        and "Traceback" not in err
    )
    report(
        ok,
        "SIGTERM during training: one line and the --resume command",
        f"exit {proc.returncode}  {lines[-1][:90] if lines else ''}",
        proc.returncode,
        seconds,
    )
    if not ok:
        print(f"       stderr: {' | '.join(lines)[-1500:]}")
    report(
        bool(children) and not alive,
        "  ... DataLoader workers stopped (none alive 1 s later)",
        f"{len(children)} workers, {len(alive)} alive",
    )
    cache = root / "lrent_cut" / "round_0" / "probability_cache" / "probabilities.bin"
    if cache.is_file():
        with open(cache, "r+b") as fh:
            fh.truncate(cache.stat().st_size // 2)
    report(cache.is_file(), "  ... LRENT's kept probability cache truncated to half", "")
    command = shlex.split(said.group(1))[1:] if said else [*argv, "--resume"]
    expect_success(root, "  ... the printed --resume command", tuple(command), ("redoing",))
    expect_same("  ... then identical to an uninterrupted LRENT run", root / "lrent_ref", root / "lrent_cut")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def full_disk(root: Path) -> None:
    """Writes on a small tmpfs that fills up during round 1 (root only), then a resume elsewhere.

    Round 1 is resumed with 0, 1, 2, ... pages of 4 KiB free, until the checkpoint's write is
    the one that fails, so that each of the run's writes in turn meets the full disk (the lock,
    config.yaml, a pseudo-label, stats.json, state.json, model.pt), then once with half the
    checkpoint's size free. Each must fail cleanly, naming the file; the runs stopped at
    stats.json, state.json and model.pt are resumed on a roomy disk and must end identical.
    """
    if os.geteuid() != 0:
        report(True, "full disk: skipped (needs root for a tmpfs)", "")
        return
    copy_run(root, "ref", "ref_round0", lambda r: keep_round(r, 0))
    failed: dict[str, int] = {}  # the file whose write failed -> the bytes that were free
    for pages in range(32):
        name = _full_disk_case(root, pages * 4096)
        failed.setdefault(name or "nothing", pages * 4096)
        if name in (None, "model.pt"):
            break
    half = (root / "ref" / "round_1" / "model.pt").stat().st_size // 2
    _full_disk_case(root, failed.get("model.pt", 0) + half)
    wanted = ("stats.json", "state.json", "model.pt")
    report(
        all(w in failed for w in wanted),
        "  ... the writes of stats.json, state.json and model.pt each met it",
        ", ".join(f"{n} at {b}" for n, b in failed.items()),
    )
    for name in wanted:
        if name in failed:
            run = f"after_{failed[name]}"
            expect_success(
                root,
                f"  ... the run stopped at {name} resumed on a roomy disk",
                (*REF, "--resume", "--output", run),
            )
            expect_same("  ... then identical", root / "ref", root / run)


def _full_disk_case(root: Path, free: int) -> str | None:
    """Resume round 1 of a copy of ``ref_round0`` on a tmpfs with ``free`` bytes free; report
    whether it failed cleanly and return the name of the file whose write failed (None if none).
    The stopped run is copied to ``after_FREE``."""
    disk = root / f"disk_{free}"
    disk.mkdir()
    base = sum(p.stat().st_size for p in (root / "ref_round0").rglob("*") if p.is_file())
    size = ((base + 4096 * 200) // 4096 + 1 + free // 4096) * 4096
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        shutil.copytree(root / "ref_round0", disk / "run")
        (disk / "filler").write_bytes(b"")
        room = shutil.disk_usage(disk).free
        with open(disk / "filler", "wb") as fh:  # leave exactly `free` bytes free
            fh.write(b"\0" * max(0, room - free))
        times: dict[str, float] = {}
        done = _timed(
            functools.partial(cbst, root, (*REF, "--resume", "--output", str(disk / "run"))), times
        )()
        lines = visible_lines(done.stderr)
        where = re.search(r"error: (\S+): no space left on the device$", lines[-1]) if lines else None
        ok = (
            done.returncode == 2
            and len(lines) == 1
            and where is not None
            and where.group(1).startswith(str(disk))
            and "Traceback" not in done.stderr
            and not temporaries(disk)
        )
        name = Path(where.group(1)).name if where else None
        report(
            ok,
            f"full disk, {free} bytes free: the write of {name} fails cleanly",
            f"exit {done.returncode}  {lines[-1][-100:] if lines else ''}",
            done.returncode,
            times["wall"],
        )
        (disk / "filler").unlink()
        shutil.copytree(disk / "run", root / f"after_{free}")
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    return name


def setup(root: Path) -> None:
    """``bad_inputs.py``'s folder, the two reference runs and the bad files of the cases."""
    setup_bad_inputs(root)
    for argv in ((*REF, "--output", "ref"), (*LRENT, "--output", "lrent_ref")):
        done = cbst(root, argv)
        if done.returncode != 0:
            raise SystemExit(f"setup step 'cbst {shlex.join(argv)}' failed:\n{done.stderr}")
    bad_files(root)


def write_summary(path: Path) -> None:
    """The recorded cases as JSON lines (``--out``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in RESULTS), encoding="utf-8")


def main() -> int:
    """Set up, replay the groups asked for, summarise (and write ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--memory-kib", type=int, default=4_000_000, help="ulimit -v of the memory cases")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="CPU time a memory case may take")
    parser.add_argument("--only", nargs="*", default=None, help="run only these groups")
    parser.add_argument("--out", type=Path, default=None, help="write a JSON-lines summary here")
    args = parser.parse_args()
    os.umask(0o022)
    root = Path(tempfile.mkdtemp(prefix="cbst-faults-"))
    groups = {
        "lost": data_lost,
        "lock": lock,
        "resume": resume_checks,
        "inputs": inputs,
        "memory": lambda r: memory(r, args.memory_kib, args.max_seconds),
        "values": bad_values,
        "sigterm": sigterm,
        "disk": full_disk,
    }
    started = time.monotonic()
    try:
        print(f"setting up in {root} ...", flush=True)
        setup(root)
        for name, group in groups.items():
            if args.only is None or name in args.only:
                group(root)
        passed = sum(r["ok"] for r in RESULTS)
        failed = len(RESULTS) - passed
        print(
            f"summary: {passed}/{len(RESULTS)} checks passed"
            + (f", {failed} failed" if failed else "")
            + f" in {time.monotonic() - started:.0f} s"
        )
        return 0 if not failed else 1
    finally:
        if args.out is not None:
            write_summary(args.out)
        for disk in root.glob("disk_*"):
            subprocess.run(["umount", str(disk)], capture_output=True)
        finish(root, args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
