"""Read finished (or half-finished) self-training runs and ``cbst demo`` folders from disk.

A run folder is the ``--output`` of ``cbst self-train``: ``config.yaml``, ``state.json`` and one
``round_N/`` per round with ``stats.json`` (pseudo-label stage), ``model.pt`` (training stage)
and ``metrics.json`` (evaluation stage). A run killed part-way and not yet resumed ends with a
round that has only some of these; its finished rounds are reported. A round missing in the
*middle* (``round_0`` and ``round_2`` without ``round_1``, or a round whose evaluation is gone
while a later one has its own) means files were lost, and is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from cbst.errors import ConfigError
from cbst.evaluation import Metrics
from cbst.io import DataError
from cbst.methods import method_of
from cbst.registry import METHODS

_ROUND_DIR = re.compile(r"round_(\d+)")


@dataclass(frozen=True)
class Round:
    """One round's files: pseudo-label statistics, val metrics (None before its evaluation)
    and the seconds each stage took (None where the files do not tell)."""

    index: int
    path: Path
    stats: dict[str, Any]
    metrics: Metrics | None
    seconds: dict[str, float | None]


@dataclass(frozen=True)
class Run:
    """A self-training run: where it is, its name in the report, its configuration and rounds.

    ``source`` holds the source model's val metrics when known (a demo folder's ``Source``
    row, or ``--source-metrics``), drawn as round "source" before the first round.
    ``seeded_weights`` says the initial weights were trained with the run's own seed (a demo
    folder's source model), so runs of other seeds may differ in them; ``name`` keeps the run's
    own name where ``label`` had to become its path to be unique.
    """

    path: Path
    label: str
    config: dict[str, Any]
    rounds: tuple[Round, ...]
    source: Metrics | None = None
    seeded_weights: bool = False
    name: str | None = None

    @property
    def method(self) -> str:
        """The registered method (ST, CBST, CBST-SP, MRKLD, LRENT, ...) whose options the run's
        configuration has (:func:`cbst.methods.method_of`); else its selection policy."""
        return method_of(self.config) or f"--kc-policy {self.config.get('kc_policy')}"

    @property
    def provenance(self) -> dict[str, Any] | None:
        """What the run's scores were computed with (``results.json``, else the last metrics)."""
        results = self.path / "results.json"
        if results.is_file():
            found = read_json(results)
            if isinstance(found, dict) and isinstance(found.get("provenance"), dict):
                return found["provenance"]
        for rnd in reversed(self.rounds):
            metrics = rnd.path / "metrics.json"
            if metrics.is_file() and isinstance(read_json(metrics).get("provenance"), dict):
                return read_json(metrics)["provenance"]
        return None

    @property
    def evaluated(self) -> tuple[Round, ...]:
        """The rounds that have val metrics."""
        return tuple(r for r in self.rounds if r.metrics is not None)

    def val_split(self) -> tuple[str, str, str] | None:
        """(dataset, resolved root, split) of the val split the run evaluates on, or None."""
        split = self.config.get("eval_split")
        if not split:
            return None
        root = Path(str(self.config.get("data_root_tgt", ""))).expanduser()
        resolved = str(root.resolve()) if root.exists() else str(root)
        return str(self.config.get("dataset_tgt")), resolved, str(split)


def read_json(path: Path) -> Any:
    """A JSON file's content, or a DataError naming the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None


def read_metrics(path: Path) -> Metrics:
    """Val metrics as written by ``self-train`` (``metrics.json``) or ``cbst evaluate --out``."""
    data = read_json(path)
    keys = ("miou", "pixel_acc", "mean_acc")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("iou"), dict)
        or not all(k in data for k in keys)
    ):
        raise DataError(f"{path}: not a metrics file (expected {', '.join(keys)} and a per-class 'iou')")
    return Metrics.from_json(data)


def _stage_seconds(run: Path) -> dict[str, float]:
    """Each finished stage's duration, ``{"ROUND/STAGE": seconds}``, as ``state.json`` records it
    (measured with a monotonic clock; runs from before these records have none)."""
    state = read_json(run / "state.json")
    seconds = state.get("seconds") if isinstance(state, dict) else None
    if not isinstance(seconds, dict):
        return {}
    return {str(k): float(v) for k, v in seconds.items() if isinstance(v, (int, float))}


def _round_dirs(run: Path) -> list[int]:
    """The round indices present, checked to run 0, 1, ... without a hole."""
    found = sorted(
        int(m.group(1)) for p in run.iterdir() if p.is_dir() and (m := _ROUND_DIR.fullmatch(p.name))
    )
    missing = sorted(set(range(found[-1] + 1)) - set(found)) if found else []
    if missing:
        have = ", ".join(f"round_{i}" for i in found)
        raise DataError(
            f"{run}: round_{missing[0]} is missing (found {have}); a run's rounds must be consecutive"
        )
    return found


def _finished_rounds(run: Path) -> int:
    """1 + the highest round index that ``state.json`` lists a finished stage of (0 if none)."""
    state = read_json(run / "state.json")
    stages = state.get("finished") if isinstance(state, dict) else None
    try:
        rounds = [str(s).split("/")[0] for s in stages]
        return 1 + max((int(r) for r in rounds if r != "source"), default=-1)
    except (TypeError, ValueError):
        raise DataError(f"{run / 'state.json'}: expected {{'finished': ['ROUND/STAGE', ...]}}") from None


def _read_round(run: Path, index: int, durations: dict[str, float]) -> Round | None:
    """One round's files, or None when its pseudo-labels are not finished yet.

    ``durations``: the run's stage times from ``state.json`` (the pseudo-label stage's own
    timing in ``stats.json`` stands in for runs that predate them).
    """
    rdir = run / f"round_{index}"
    stats_file, metrics_file = rdir / "stats.json", rdir / "metrics.json"
    if not stats_file.is_file():
        return None
    stats = read_json(stats_file)
    metrics = read_metrics(metrics_file) if metrics_file.is_file() else None
    seconds = {stage: durations.get(f"{index}/{stage}") for stage in ("pseudo", "train", "eval")}
    if seconds["pseudo"] is None:
        seconds["pseudo"] = stats.get("seconds")
    return Round(index, rdir, stats, metrics, seconds)


def _check_complete(run: Path, rounds: list[Round | None]) -> tuple[Round, ...]:
    """Drop an unfinished last round; refuse holes (a round or an evaluation lost in the middle)."""
    if rounds and rounds[-1] is None:
        rounds = rounds[:-1]
    for index, rnd in enumerate(rounds):
        if rnd is None:
            raise DataError(f"{run / f'round_{index}' / 'stats.json'}: missing, but later rounds exist")
    evaluated = [r.index for r in rounds if r.metrics is not None]
    for rnd in rounds:
        if rnd.metrics is None and evaluated and rnd.index < evaluated[-1]:
            raise DataError(f"{rnd.path / 'metrics.json'}: missing, but round_{evaluated[-1]} was evaluated")
    return tuple(r for r in rounds if r is not None)


def load_run(path: str | Path, label: str | None = None, source: Metrics | None = None) -> Run:
    """Read a ``cbst self-train`` output folder; DataError naming the folder if it is not one.

    Args:
        path: the run folder.
        label: its name in the report (default: the folder's name).
        source: the source model's val metrics; by default the run's own
            ``source_metrics.json`` (written before round 0), when it has one.
    """
    run = Path(path)
    if not run.is_dir():
        raise DataError(f"{run}: folder not found")
    if (run / "last.pt").is_file() and not (run / "state.json").is_file():
        raise DataError(
            f"{run}: a 'cbst train-source' folder (source training: last.pt, checkpoints/); "
            f"'cbst report' takes 'cbst self-train' runs, e.g. of --weights {run / 'last.pt'}, "
            "or 'cbst demo' folders"
        )
    if not (run / "config.yaml").is_file() or not (run / "state.json").is_file():
        raise DataError(
            f"{run}: not a self-training run (no config.yaml and state.json; expected "
            "the --output folder of 'cbst self-train' or a 'cbst demo' folder)"
        )
    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{run / 'config.yaml'}: not readable YAML ({exc})") from None
    if not isinstance(config, dict):
        raise DataError(f"{run / 'config.yaml'}: expected the run's options as a mapping")
    if source is None and (run / "source_metrics.json").is_file():
        source = read_metrics(run / "source_metrics.json")
    indices = _round_dirs(run)
    listed = _finished_rounds(run)
    if listed > len(indices):
        raise DataError(
            f"{run}: state.json lists round {listed - 1} as started but round_{listed - 1} is missing"
        )
    durations = _stage_seconds(run)
    rounds = _check_complete(run, [_read_round(run, i, durations) for i in indices])
    if not rounds:
        raise DataError(f"{run}: no finished round yet (round_0/stats.json not written)")
    return Run(run, label or run.name, config, rounds, source)


def is_demo(path: Path) -> bool:
    """Whether ``path`` is a ``cbst demo`` output folder (finished or not)."""
    return path.is_dir() and any((path / demo_run_dir(n) / "state.json").is_file() for n in METHODS.names())


def demo_run_dir(variant: str) -> str:
    """The sub-folder of a demo folder that holds one method's run (``CBST-SP`` -> ``cbst_sp``)."""
    return variant.lower().replace("-", "_")


def load_demo(path: Path) -> list[Run]:
    """The runs of a demo folder that have started (one per method, cbst.registry.METHODS), with the
    Source row."""
    results = path / "results.json"
    source = None
    if results.is_file():
        rows = read_json(results).get("rows", {})
        source = Metrics.from_json(rows["Source"]) if "Source" in rows else None
    return [
        replace(load_run(path / demo_run_dir(name), name, source), seeded_weights=True)
        for name in METHODS.names()
        if (path / demo_run_dir(name) / "state.json").is_file()
    ]


def seed_folders(path: Path) -> list[Path]:
    """The per-seed demo folders of a ``cbst demo --seeds`` folder (``seed_N/``, finished or
    not), numerically ordered; [] for another folder."""
    found = [p for p in path.glob("seed_*") if p.name[5:].lstrip("-").isdigit() and is_demo(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _unique_labels(runs: list[Run]) -> list[Run]:
    """Give runs that would share a name in the report their folder path as name instead."""
    labels = [r.label for r in runs]
    return [replace(r, label=str(r.path), name=r.label) if labels.count(r.label) > 1 else r for r in runs]


def check_same_val_split(runs: list[Run]) -> None:
    """Refuse to compare runs evaluated on different val splits, naming both folders."""
    first = runs[0]
    for other in runs[1:]:
        a, b = first.val_split(), other.val_split()
        if a is not None and b is not None and a != b:
            raise DataError(
                f"{first.path} evaluates on {a[0]} {a[1]} split {a[2]!r} but "
                f"{other.path} on {b[0]} {b[1]} split {b[2]!r}: their mIoUs are not "
                "comparable; report them separately"
            )


def load_runs(paths: list[str | Path], source_metrics: str | Path | None = None) -> list[Run]:
    """The runs to report: each path is a run folder, a demo folder (which gives several) or a
    ``cbst demo --seeds`` folder (the demo folders of its seeds).

    Args:
        paths: run folders and/or ``cbst demo`` folders.
        source_metrics: a ``cbst evaluate --out`` JSON of the source model, used for the runs
            whose source metrics are not otherwise known.
    """
    if not paths:
        raise ConfigError("no run folder given")
    source = read_metrics(Path(source_metrics)) if source_metrics else None
    runs: list[Run] = []
    for path in map(Path, paths):
        found = []
        for folder in seed_folders(path) or [path]:
            found += load_demo(folder) if is_demo(folder) else [load_run(folder)]
        runs += [replace(r, source=r.source or source) for r in found]
    check_same_val_split(runs)
    return _unique_labels(_once_each(runs))


def _once_each(runs: list[Run]) -> list[Run]:
    """Each run folder once (a run given twice, or a demo folder and one of its runs), first
    occurrence kept."""
    seen: set[Path] = set()
    kept = []
    for run in runs:
        if run.path.resolve() not in seen:
            seen.add(run.path.resolve())
            kept.append(run)
    return kept
