"""Replay the bad inputs of issue 9 §2 through the ``cbst`` command line and check each outcome.

Every case runs ``python -m cbst ...`` in a subprocess under umask 022, in a fresh temporary
folder holding a tiny benchmark (``cbst make-synthetic``: 4 source, 2 target train and 2 val
images of 64×32), a small model trained there for one epoch (``cbst train-source``), and the
outputs of one good run of ``evaluate``, ``convert``, ``prior`` and ``self-train``. For each case
it prints one line: the exit status (2 for a bad input, 0 for the recoveries), whether stderr is
exactly one line (progress-bar states aside) naming the path or option, whether a traceback
appeared, and whether every file present before the case is unchanged (and the outputs a refused
run must not create are absent). It then checks that every file and folder created is readable by
the group and others, prints a summary line and exits 1 if anything failed.

    python benchmarks/bad_inputs.py            # about 2 minutes on 2 CPU cores
    python benchmarks/bad_inputs.py --keep     # keep the temporary folder to look at
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar: "epoch 1:  50%|███  | 1/2 [00:02<..."


@dataclass(frozen=True)
class Case:
    """One command and what its stderr must name; ``status`` 0 marks a recovery that must work."""

    name: str
    argv: tuple[str, ...]
    names: tuple[str, ...] = ()
    status: int = 2
    absent: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    cwd: str = "."


def child_env() -> dict[str, str]:
    """This process's environment with this checkout's sources first on the path."""
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    )


def cbst(root: Path, argv: tuple[str, ...] | list[str], cwd: str = ".") -> subprocess.CompletedProcess:
    """Run ``python -m cbst ARGV`` in ``root/cwd`` with this checkout's sources first on the path."""
    return subprocess.run(
        [sys.executable, "-m", "cbst", *argv], cwd=root / cwd, env=child_env(), capture_output=True, text=True
    )


def visible_lines(stderr: str) -> list[str]:
    """The non-empty lines of ``stderr`` that are not progress-bar states.

    A progress bar that an error interrupts leaves its last state behind (on a pipe each redraw
    is a line); ``train-source`` has no option to hide it.
    """
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in lines if line.strip() and not PROGRESS.search(line)]


def snapshot(root: Path) -> dict[Path, tuple[int, int, int]]:
    """Inode, size and modification time of every file under ``root``: a replaced or rewritten
    file changes at least one of them."""
    return {p: _identity(p) for p in root.rglob("*") if p.is_file()}


def _identity(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


@dataclass(frozen=True)
class Outcome:
    """What a replayed command did: its result, its visible stderr lines, the files present
    before that it replaced, rewrote or removed, and the outputs it must not create but did."""

    done: subprocess.CompletedProcess
    lines: list[str]
    changed: list[str]
    created: list[str]

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.done.stderr

    def one_line(self, names: tuple[str, ...], forbid: tuple[str, ...] = ()) -> bool:
        """Whether stderr is one line naming each of ``names`` and none of ``forbid``."""
        return (
            len(self.lines) == 1
            and all(n in self.lines[0] for n in names)
            and not any(f in self.done.stderr for f in forbid)
        )

    def refused(self, names: tuple[str, ...], forbid: tuple[str, ...] = (), status: int = 2) -> bool:
        """Whether the command failed cleanly: ``status``, one line, no traceback, nothing touched."""
        return (
            self.done.returncode == status
            and self.one_line(names, forbid)
            and not self.traceback
            and not self.changed
            and not self.created
        )


def replay(
    root: Path, run: Callable[[], subprocess.CompletedProcess], absent: tuple[str, ...] = ()
) -> Outcome:
    """Run ``run()`` (a command in ``root``) and see what it did to the files under ``root``."""
    before = snapshot(root)
    done = run()
    changed = [str(p.relative_to(root)) for p, i in before.items() if not p.is_file() or _identity(p) != i]
    created = [a for a in absent if (root / a).exists()]
    return Outcome(done, visible_lines(done.stderr), changed, created)


def setup(root: Path) -> None:
    """The benchmark, a source model, good runs of each command, and the bad files of the cases."""
    from PIL import Image

    train = (
        "--dataset",
        "gta5",
        "--data-root",
        "data/gta5",
        "--model",
        "small",
        "--batch-images",
        "2",
        "--crop-size",
        "32",
        "--to-epoch",
        "1",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    )
    steps = [
        (
            "make-synthetic",
            "data",
            "--num-source",
            "4",
            "--num-train",
            "2",
            "--num-val",
            "2",
            "--size",
            "64x32",
            "--quiet",
        ),
        ("train-source", *train, "--base-lr", "0.01", "--output", "source"),
        (
            "evaluate",
            "--data-root",
            "data/cityscapes",
            "--checkpoint",
            "source/last.pt",
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--no-progress",
            "--out",
            "metrics.json",
            "--output",
            "preds",
        ),
        ("convert", "source/last.pt", "--arch", "small", "--num-classes", "19", "--out", "converted.pt"),
        (*PRIOR, "--out", "prior.npy"),
        ("self-train", *SELF_TRAIN, "--base-lr", "0.001", "--output", "st"),
    ]
    for argv in steps:
        done = cbst(root, argv)
        if done.returncode != 0:
            raise SystemExit(f"setup step 'cbst {' '.join(argv)}' failed:\n{done.stderr}")
    (root / "st").rename(root / "st_moved")
    shutil.copytree(root / "st_moved", root / "st")
    (root / "a_file").write_text("a file where a folder is expected\n")
    (root / "a_folder").mkdir()
    (root / "random.pth").write_bytes(os.urandom(4096))
    (root / "binary.lst").write_bytes(bytes(range(256)) * 8)
    (root / "bad_range.yaml").write_text("scale_rate_range: [1.3, 0.7]\n")
    label_png = next((root / "preds" / "labelIds").glob("*.png"))
    labels = Image.open(label_png)
    labels.putpixel((0, 0), 250)
    labels.save(label_png)


SELF_TRAIN = (
    "--data-root",
    "data/gta5",
    "--data-root-tgt",
    "data/cityscapes",
    "--weights",
    "source/last.pt",
    "--num-round",
    "1",
    "--epoch-per-round",
    "1",
    "--batch-images",
    "1",
    "--crop-size",
    "32",
    "--device",
    "cpu",
    "--no-progress",
    "--eval-split",
    "none",
)
TRAIN_SOURCE = (
    "--dataset",
    "gta5",
    "--data-root",
    "data/gta5",
    "--model",
    "small",
    "--batch-images",
    "2",
    "--crop-size",
    "32",
    "--num-workers",
    "0",
    "--device",
    "cpu",
)
EVALUATE = (
    "evaluate",
    "--data-root",
    "data/cityscapes",
    "--checkpoint",
    "source/last.pt",
    "--device",
    "cpu",
    "--num-workers",
    "0",
    "--no-progress",
)
CONVERT = ("convert", "source/last.pt", "--arch", "small", "--num-classes", "19")
PRIOR = ("prior", "--dataset", "gta5", "--data-root", "data/gta5", "--size", "32,64", "--no-progress")


def unwritable_target(root: Path) -> str | None:
    """A file path whose folder refuses new files: a 0555 folder, or /sys for root (None: none)."""
    if os.geteuid() != 0:
        folder = root / "read_only"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        return str(folder / "out.json")
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return "/sys/cbst-bad-inputs.json"
    return None


def cases(root: Path) -> list[Case]:
    """Every bad input of §2 (and the recoveries it asks for)."""
    pred = next((root / "preds" / "labelIds").glob("*.png")).relative_to(root)
    found = [
        Case("evaluate --out is a folder", EVALUATE + ("--out", "a_folder"), ("a_folder", "--out")),
        Case("evaluate --out exists", EVALUATE + ("--out", "metrics.json"), ("metrics.json", "--overwrite")),
        Case("evaluate --output is a file", EVALUATE + ("--output", "a_file"), ("a_file", "--output")),
        Case("evaluate --out below a file", EVALUATE + ("--out", "a_file/m.json"), ("a_file/m.json",)),
        Case("evaluate --list is binary", EVALUATE + ("--list", "binary.lst"), ("binary.lst",)),
        Case(
            "evaluate --checkpoint is random bytes",
            EVALUATE[:3] + ("--checkpoint", "random.pth"),
            ("random.pth",),
            forbid=("weights_only",),
        ),
        Case(
            "evaluate --predictions holds 250",
            EVALUATE[:3] + ("--predictions", "preds/labelIds", "--no-progress"),
            (str(pred), "250"),
        ),
        Case("convert --out exists", CONVERT + ("--out", "converted.pt"), ("converted.pt", "--overwrite")),
        Case(
            "convert --out is its input",
            CONVERT + ("--out", "source/last.pt", "--overwrite"),
            ("source/last.pt", "input"),
        ),
        Case("convert --out is a folder", CONVERT + ("--out", "a_folder"), ("a_folder",)),
        Case(
            "convert INPUT is random bytes",
            ("convert", "random.pth", "--arch", "small", "--num-classes", "19", "--out", "r.pt"),
            ("random.pth",),
            absent=("r.pt",),
            forbid=("weights_only",),
        ),
        Case(
            "prior --out is a folder",
            ("prior", "--dataset", "gta5", "--data-root", "data/gta5", "--out", "a_folder"),
            ("a_folder",),
        ),
        Case(
            "prior --out below a file",
            ("prior", "--dataset", "gta5", "--data-root", "data/gta5", "--out", "a_file/p.npy"),
            ("a_file/p.npy",),
        ),
        Case(
            "self-train --output is a file",
            ("self-train", *SELF_TRAIN, "--output", "a_file"),
            ("a_file", "--output"),
        ),
        Case(
            "self-train --base-lr -1",
            ("self-train", *SELF_TRAIN, "--base-lr", "-1", "--output", "b1"),
            ("--base-lr",),
            absent=("b1",),
        ),
        Case(
            "self-train --mine-port 2",
            ("self-train", *SELF_TRAIN, "--mine-port", "2", "--output", "b2"),
            ("--mine-port",),
            absent=("b2",),
        ),
        Case(
            "self-train --init-src-port -0.2",
            ("self-train", *SELF_TRAIN, "--init-src-port", "-0.2", "--output", "b3"),
            ("--init-src-port",),
            absent=("b3",),
        ),
        Case(
            "self-train --init-tgt-port 1.5",
            ("self-train", *SELF_TRAIN, "--init-tgt-port", "1.5", "--output", "b4"),
            ("--init-tgt-port",),
            absent=("b4",),
        ),
        Case(
            "self-train scale range 1.3,0.7 (config)",
            ("self-train", "--config", "bad_range.yaml", *SELF_TRAIN, "--output", "b5"),
            ("--scale-rate-range",),
            absent=("b5",),
        ),
        Case(
            "self-train --batch-images 50",
            ("self-train", *SELF_TRAIN, "--batch-images", "50", "--output", "b6"),
            ("--batch-images",),
            absent=("b6",),
        ),
        Case(
            "self-train --base-lr 1e30 diverges",
            ("self-train", *SELF_TRAIN, "--base-lr", "1e30", "--output", "nan"),
            ("non-finite", "epoch"),
        ),
        Case(
            "  ... resumed with --base-lr 1e-3",
            ("self-train", *SELF_TRAIN, "--base-lr", "1e-3", "--output", "nan", "--resume"),
            status=0,
        ),
        Case(
            "self-train --resume, paths written differently",
            (
                "self-train",
                *SELF_TRAIN,
                "--data-root",
                "./data/gta5/",
                "--data-root-tgt",
                str(root / "data" / "cityscapes"),
                "--weights",
                "source//last.pt",
                "--base-lr",
                "0.001",
                "--output",
                "./st/",
                "--resume",
            ),
            status=0,
        ),
        Case(
            "self-train --resume from another folder",
            (
                "self-train",
                *SELF_TRAIN,
                "--data-root",
                "../data/gta5",
                "--data-root-tgt",
                "../data/cityscapes",
                "--weights",
                "../source/last.pt",
                "--base-lr",
                "0.001",
                "--output",
                "../st",
                "--resume",
            ),
            status=0,
            cwd="a_folder",
        ),
        Case(
            "self-train --resume of a moved run",
            ("self-train", *SELF_TRAIN, "--base-lr", "0.001", "--output", "st_moved", "--resume"),
            status=0,
        ),
        Case(
            "train-source --base-lr -1",
            ("train-source", *TRAIN_SOURCE, "--base-lr", "-1", "--output", "s1"),
            ("--base-lr",),
            absent=("s1",),
        ),
        Case(
            "train-source --output is a file",
            ("train-source", *TRAIN_SOURCE, "--output", "a_file"),
            ("a_file",),
        ),
        Case(
            "train-source --batch-images 50",
            ("train-source", *TRAIN_SOURCE, "--batch-images", "50", "--output", "s2"),
            ("--batch-images",),
            absent=("s2",),
        ),
        Case(
            "train-source --resume, changed --base-lr",
            (
                "train-source",
                *TRAIN_SOURCE,
                "--to-epoch",
                "2",
                "--base-lr",
                "1e6",
                "--output",
                "source",
                "--resume",
            ),
            ("--base-lr", "config.yaml"),
        ),
        Case(
            "train-source --base-lr 1e30 diverges",
            ("train-source", *TRAIN_SOURCE, "--to-epoch", "1", "--base-lr", "1e30", "--output", "s3"),
            ("non-finite", "epoch"),
        ),
        Case(
            "--config file is binary",
            ("evaluate", "--config", "random.pth", "--data-root", "x", "--checkpoint", "y"),
            ("random.pth",),
        ),
    ]
    target = unwritable_target(root)
    if target is not None:
        found.append(
            Case("evaluate --out unwritable", EVALUATE + ("--out", target), (target,), absent=(target,))
        )
    return found


def run_case(root: Path, case: Case) -> bool:
    """Run one case, print its line, and say whether it passed."""
    outcome = replay(root, lambda: cbst(root, case.argv, case.cwd), case.absent)
    yes_no = {True: "yes", False: "no "}
    if case.status == 0:
        ok = outcome.done.returncode == 0 and not outcome.traceback
        checks = f"a recovery, must succeed   traceback: {yes_no[outcome.traceback]}"
    else:
        ok = outcome.refused(case.names, case.forbid)
        checks = (
            f"one line naming it: {yes_no[outcome.one_line(case.names, case.forbid)]}  "
            f"traceback: {yes_no[outcome.traceback]}  "
            f"unchanged: {yes_no[not outcome.changed and not outcome.created]}"
        )
    print(f"{'ok  ' if ok else 'FAIL'} {case.name:<48} exit {outcome.done.returncode}  {checks}", flush=True)
    if not ok:
        shown = outcome.lines if case.status else outcome.lines[-5:]
        print(
            "       stderr: "
            + " | ".join(shown)[:600]
            + (
                f"\n       changed: {outcome.changed} created: {outcome.created}"
                if outcome.changed or outcome.created
                else ""
            )
        )
    return ok


def readable_by_others(root: Path) -> tuple[bool, int, list[str]]:
    """Whether every file (r) and folder (r-x) under ``root`` is open to the group and others."""
    bad, count = [], 0
    for path in root.rglob("*"):
        if path.is_symlink() or path.name == "read_only":
            continue
        need = 0o055 if path.is_dir() else 0o044
        count += 1
        if stat.S_IMODE(path.stat().st_mode) & need != need:
            bad.append(f"{path.relative_to(root)} {stat.filemode(path.stat().st_mode)}")
    return not bad, count, bad


def main() -> int:
    """Set up, replay every case, check file modes, summarise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    os.umask(0o022)
    root = Path(tempfile.mkdtemp(prefix="cbst-bad-inputs-"))
    try:
        print(f"setting up in {root} (benchmark, source model, good runs) ...", flush=True)
        setup(root)
        results = [run_case(root, case) for case in cases(root)]
        modes_ok, count, bad = readable_by_others(root)
        print(
            f"{'ok  ' if modes_ok else 'FAIL'} files and folders created under umask 022 readable by "
            f"group and others: {count - len(bad)}/{count}" + (f" (not: {', '.join(bad[:5])})" if bad else "")
        )
        results.append(modes_ok)
        print(
            f"summary: {sum(results)}/{len(results)} checks passed"
            + ("" if all(results) else f", {len(results) - sum(results)} failed")
        )
        return 0 if all(results) else 1
    finally:
        finish(root, args.keep)


def finish(root: Path, keep: bool) -> None:
    """Keep the temporary folder ``root`` (saying where) or remove it."""
    if (root / "read_only").exists():
        (root / "read_only").chmod(0o755)
    if keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
