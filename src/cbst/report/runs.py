"""Read finished (or half-finished) self-training runs and ``cbst demo`` folders from disk.

A run folder is the ``--output`` of ``cbst self-train``: ``config.yaml``, ``state.json`` and one
``round_N/`` per round with ``stats.json`` (pseudo-label stage), ``model.pt`` (training stage)
and ``metrics.json`` (evaluation stage). A run killed part-way and not yet resumed ends with a
round that has only some of these; its finished rounds are reported. A round missing in the
*middle* (``round_0`` and ``round_2`` without ``round_1``, or a round whose evaluation is gone
while a later one has its own) means files were lost, and is refused.

An online run (``--mode online``, :mod:`cbst.online`) has no rounds: its ``config.yaml`` says
``mode: online``, ``log.jsonl`` holds a record every ``--log-interval`` iterations (losses, λ per
class, the selected pixels' class shares) and ``metrics/iter_NNNNNN.json`` the evaluations; it
is read as an :class:`OnlineRun`, with what has been written so far.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
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
class _RunInfo:
    """What both kinds of run hold and derive: where the run is, its name in the report, its
    configuration, and (keyword-only) its source model's metrics and names.

    ``source`` holds the source model's val metrics when known (a demo folder's ``Source``
    row, or ``--source-metrics``), drawn before the first round (iteration 0).
    ``seeded_weights`` says the initial weights were trained with the run's own seed (a demo
    folder's source model), so runs of other seeds may differ in them; ``name`` keeps the run's
    own name where ``label`` had to become its path to be unique.
    """

    path: Path
    label: str
    config: dict[str, Any]
    source: Metrics | None = field(default=None, kw_only=True)
    seeded_weights: bool = field(default=False, kw_only=True)
    name: str | None = field(default=None, kw_only=True)

    @property
    def method(self) -> str:
        """The registered method (ST, CBST, CBST-SP, MRKLD, LRENT, DACS, ...) whose options the
        run's configuration has (:func:`cbst.methods.method_of`); else its selection policy."""
        return method_of(self.config) or f"--kc-policy {self.config.get('kc_policy')}"

    def val_split(self) -> tuple[str, str, str] | None:
        """(dataset, resolved root, split) of the val split the run evaluates on, or None."""
        split = self.config.get("eval_split")
        if not split:
            return None
        root = Path(str(self.config.get("data_root_tgt", ""))).expanduser()
        resolved = str(root.resolve()) if root.exists() else str(root)
        return str(self.config.get("dataset_tgt")), resolved, str(split)


@dataclass(frozen=True)
class Run(_RunInfo):
    """A self-training run of rounds: :class:`_RunInfo`'s and its rounds."""

    rounds: tuple[Round, ...]

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

    @property
    def final(self) -> tuple[str, Metrics] | None:
        """("round_N", its metrics) of the last evaluated round; None before any evaluation."""
        return (f"round_{self.evaluated[-1].index}", self.evaluated[-1].metrics) if self.evaluated else None

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes, as the first round's thresholds name them."""
        return tuple(self.rounds[0].stats.get("thresholds", {}))


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of an online run's student, after ``iteration`` iterations."""

    iteration: int
    metrics: Metrics


@dataclass(frozen=True)
class OnlineRun(_RunInfo):
    """An online self-training run: its configuration, log records and evaluations so far.

    ``log`` holds the ``log.jsonl`` records in order (each with ``iteration``, ``lambda`` and
    ``selected_share`` per class).
    """

    log: tuple[dict[str, Any], ...]
    evaluations: tuple[Evaluation, ...]

    @property
    def final(self) -> tuple[str, Metrics] | None:
        """("iteration_N", its metrics) of the last evaluation; None before any."""
        if not self.evaluations:
            return None
        return f"iteration_{self.evaluations[-1].iteration}", self.evaluations[-1].metrics

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes, as the log's λ (or the first evaluation's IoU) names them."""
        if self.log:
            return tuple(self.log[0].get("lambda", {}))
        return tuple(self.evaluations[0].metrics.iou) if self.evaluations else ()

    @property
    def seconds(self) -> float | None:
        """Training seconds up to the last log record (the run's own clock), None without one."""
        return float(self.log[-1]["seconds"]) if self.log and "seconds" in self.log[-1] else None


AnyRun = Run | OnlineRun
"""A run of either form, as :func:`load_runs` gives them."""


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


def _read_config(run: Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as a mapping; DataError naming the file otherwise."""
    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{run / 'config.yaml'}: not readable YAML ({exc})") from None
    if not isinstance(config, dict):
        raise DataError(f"{run / 'config.yaml'}: expected the run's options as a mapping")
    return config


def is_online_run(path: Path) -> bool:
    """Whether ``path`` holds an online run (its ``config.yaml`` says ``mode: online``)."""
    if not (path / "config.yaml").is_file() or (path / "state.json").is_file():
        return False
    try:
        return _read_config(path).get("mode") == "online"
    except DataError:
        return False


def _read_log(path: Path) -> tuple[dict[str, Any], ...]:
    """The records of an online run's ``log.jsonl`` (none before the first is written)."""
    if not path.is_file():
        return ()
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}: line {number} is not JSON ({exc})") from None
        if not isinstance(record, dict) or "iteration" not in record:
            raise DataError(f"{path}: line {number} is not a log record (no 'iteration')")
        records.append(record)
    return tuple(records)


def load_online_run(path: str | Path, label: str | None = None, source: Metrics | None = None) -> OnlineRun:
    """Read an online run folder: its config, log and evaluations; DataError when it has
    neither a log record nor an evaluation yet."""
    run = Path(path)
    evaluations = tuple(
        Evaluation(int(p.stem.split("_")[1]), read_metrics(p))
        for p in sorted((run / "metrics").glob("iter_*.json"))
        if p.stem.split("_")[1].isdigit()
    )
    log = _read_log(run / "log.jsonl")
    if not log and not evaluations:
        raise DataError(f"{run}: an online run with no logged iteration yet (log.jsonl not written)")
    return OnlineRun(run, label or run.name, _read_config(run), log, evaluations, source=source)


def load_run(path: str | Path, label: str | None = None, source: Metrics | None = None) -> AnyRun:
    """Read a ``cbst self-train`` output folder (rounds or online); DataError naming the folder
    if it is not one.

    Args:
        path: the run folder.
        label: its name in the report (default: the folder's name).
        source: the source model's val metrics; by default the run's own
            ``source_metrics.json`` (written before round 0), when it has one.
    """
    run = Path(path)
    if not run.is_dir():
        raise DataError(f"{run}: folder not found")
    if is_online_run(run):
        return load_online_run(run, label, source)
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
    config = _read_config(run)
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
    return Run(run, label or run.name, config, rounds, source=source)


def _demo_run_started(folder: Path) -> bool:
    """Whether a demo row's folder holds a started run (rounds: ``state.json``; online: a log
    record or an evaluation)."""
    if (folder / "state.json").is_file():
        return True
    return is_online_run(folder) and (
        (folder / "log.jsonl").is_file() or any(folder.glob("metrics/iter_*.json"))
    )


def is_demo(path: Path) -> bool:
    """Whether ``path`` is a ``cbst demo`` output folder (finished or not)."""
    return path.is_dir() and any(_demo_run_started(path / demo_run_dir(n)) for n in METHODS.names())


def demo_run_dir(variant: str) -> str:
    """The sub-folder of a demo folder that holds one method's run (``CBST-SP`` -> ``cbst_sp``)."""
    return variant.lower().replace("-", "_")


def load_demo(path: Path) -> list[AnyRun]:
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
        if _demo_run_started(path / demo_run_dir(name))
    ]


def seed_folders(path: Path) -> list[Path]:
    """The per-seed demo folders of a ``cbst demo --seeds`` folder (``seed_N/``, finished or
    not), numerically ordered; [] for another folder."""
    found = [p for p in path.glob("seed_*") if p.name[5:].lstrip("-").isdigit() and is_demo(p)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _unique_labels(runs: list[AnyRun]) -> list[AnyRun]:
    """Give runs that would share a name in the report their folder path as name instead."""
    labels = [r.label for r in runs]
    return [replace(r, label=str(r.path), name=r.label) if labels.count(r.label) > 1 else r for r in runs]


def check_same_val_split(runs: list[AnyRun]) -> None:
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


def load_runs(paths: list[str | Path], source_metrics: str | Path | None = None) -> list[AnyRun]:
    """The runs to report: each path is a run folder (rounds or online), a demo folder (which
    gives several) or a ``cbst demo --seeds`` folder (the demo folders of its seeds).

    Args:
        paths: run folders and/or ``cbst demo`` folders.
        source_metrics: a ``cbst evaluate --out`` JSON of the source model, used for the runs
            whose source metrics are not otherwise known.
    """
    if not paths:
        raise ConfigError("no run folder given")
    source = read_metrics(Path(source_metrics)) if source_metrics else None
    runs: list[AnyRun] = []
    for path in map(Path, paths):
        found = []
        for folder in seed_folders(path) or [path]:
            found += load_demo(folder) if is_demo(folder) else [load_run(folder)]
        runs += [replace(r, source=r.source or source) for r in found]
    check_same_val_split(runs)
    return _unique_labels(_once_each(runs))


def _once_each(runs: list[AnyRun]) -> list[AnyRun]:
    """Each run folder once (a run given twice, or a demo folder and one of its runs), first
    occurrence kept."""
    seen: set[Path] = set()
    kept = []
    for run in runs:
        if run.path.resolve() not in seen:
            seen.add(run.path.resolve())
            kept.append(run)
    return kept
