"""The paper's table of final scores: one row per run, or per group of runs that differ only in seed.

Results move from seed to seed, so a method is reported as mean ± standard deviation over
training seeds. Runs whose configurations are equal once the seed and the options that do not
change a result (output folder, resume, loader workers, progress bars, pseudo-label scoring)
are set aside form one group. A run's final score is its last evaluated round (an online run's
last evaluation), never its best one: choosing the best round on the val split would be model
selection on the test set (docs/method.md §8.4). Runs that stopped at different rounds (or
iterations) are not grouped.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cbst.evaluation import Metrics
from cbst.labels import CLASSES_13, TABLE_HEADERS
from cbst.report.runs import AnyRun

NOT_RESULT_KEYS = frozenset({"seed", "output", "resume", "num_workers", "progress", "score_pseudo_labels"})
"""Configuration keys in which runs of one group may differ."""


@dataclass(frozen=True)
class Score:
    """One cell: the mean over a row's runs and their sample standard deviation (None for a
    single run); both None when some run leaves the value undefined (a class never present)."""

    mean: float | None
    std: float | None


@dataclass(frozen=True)
class ResultRow:
    """One row: its name, the round it reports ("round_N", "iteration_N" or "source"), the seeds it
    covers and one score per column of its table."""

    name: str
    round: str
    seeds: tuple[int | None, ...]
    scores: tuple[Score, ...]

    @property
    def is_group(self) -> bool:
        """Whether the row stands for several runs (and shows mean ± std)."""
        return len(self.seeds) > 1


@dataclass(frozen=True)
class ResultTable:
    """Score column headers (mIoU, mIoU* for 16 classes, one per class) and the rows."""

    columns: tuple[str, ...]
    rows: tuple[ResultRow, ...]


def _values(metrics: Metrics, classes: Sequence[str]) -> list[float | None]:
    """A result's cells in column order, as fractions (None where undefined)."""
    values = [metrics.miou] + ([metrics.miou_over(CLASSES_13)] if len(classes) == 16 else [])
    values += [metrics.iou.get(c) for c in classes]
    return [None if v is None or math.isnan(v) else v for v in values]


def aggregate(results: Sequence[Metrics], classes: Sequence[str]) -> tuple[Score, ...]:
    """Per column, the mean and (for more than one result) the sample standard deviation."""
    columns = zip(*(_values(m, classes) for m in results))
    scores = []
    for values in columns:
        if any(v is None for v in values):
            scores.append(Score(None, None))
        else:
            std = statistics.stdev(values) if len(values) > 1 else None
            scores.append(Score(statistics.fmean(values), std))
    return tuple(scores)


def seed_key(run: AnyRun) -> str:
    """What runs of one group share: their configuration without :data:`NOT_RESULT_KEYS` (and
    without the initial weights when the run's own seed trained them) and their last round."""
    config = {k: v for k, v in run.config.items() if k not in NOT_RESULT_KEYS}
    if run.seeded_weights:
        config.pop("weights", None)
    return json.dumps([config, run.final[0]], sort_keys=True, default=str)


def group_runs(runs: Sequence[AnyRun]) -> list[list[AnyRun]]:
    """The evaluated runs gathered by :func:`seed_key`, groups in order of first appearance (a
    folder given twice counts once)."""
    groups: dict[str, list[AnyRun]] = {}
    seen: set[Path] = set()
    for run in runs:
        if run.final is not None and run.path.resolve() not in seen:
            seen.add(run.path.resolve())
            groups.setdefault(seed_key(run), []).append(run)
    return list(groups.values())


def _group_name(group: Sequence[AnyRun]) -> str:
    """A single run's label; a group's common name (a demo row's method), else its method."""
    if len(group) == 1:
        return group[0].label
    names = {r.name or r.label for r in group}
    return names.pop() if len(names) == 1 else group[0].method


def _seeds(group: Sequence[AnyRun]) -> tuple[int | None, ...]:
    return tuple(r.config.get("seed") for r in group)


def _disambiguate(rows: list[ResultRow], groups: list[list[AnyRun]]) -> list[ResultRow]:
    """Group rows that would share a name get their first run's folder in parentheses."""
    names = [r.name for r in rows]
    return [
        replace(row, name=f"{row.name} ({group[0].path})") if names.count(row.name) > 1 else row
        for row, group in zip(rows, groups)
    ]


def results_table(runs: Sequence[AnyRun], classes: Sequence[str]) -> ResultTable:
    """The final-score table: the source model's row(s) first, then one row per run or group.

    A source row averages the distinct source models of a group's runs: one model for runs
    that all start from the same weights (``--source-metrics``), one per seed for ``cbst demo``
    folders of several seeds, each of which trained its own. Its seeds are known only there.
    """
    columns = (
        ["mIoU"] + (["mIoU*"] if len(classes) == 16 else []) + [TABLE_HEADERS.get(c, c) for c in classes]
    )
    groups = group_runs(runs)
    sources: dict[str, tuple[list[AnyRun], list[AnyRun]]] = {}  # distinct source models -> (group, runs)
    for group in groups:
        if all(r.source is not None for r in group):
            distinct: dict[str, AnyRun] = {}
            for run in group:
                distinct.setdefault(json.dumps(run.source.to_json(), sort_keys=True), run)
            sources.setdefault(json.dumps(list(distinct)), (group, list(distinct.values())))
    rows = [
        ResultRow(
            "Source" if len(sources) == 1 else f"Source ({_group_name(group)})",
            "source",
            tuple(r.config.get("seed") if r.seeded_weights else None for r in models),
            aggregate([r.source for r in models], classes),
        )
        for group, models in sources.values()
    ]
    finals = [
        ResultRow(
            _group_name(group),
            group[0].final[0],
            _seeds(group),
            aggregate([r.final[1] for r in group], classes),
        )
        for group in groups
    ]
    return ResultTable(tuple(columns), tuple(rows + _disambiguate(finals, groups)))
