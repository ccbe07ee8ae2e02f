"""The report's figures, drawn with matplotlib and returned as PNG data URIs.

Figures are built as ``matplotlib.figure.Figure`` objects, without pyplot, so no display,
GUI backend or global matplotlib state is involved (PNG output goes through Agg).

Every figure shows all runs, so runs compared side by side share axes, colour scales and class
colours (the label palette of the target dataset).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

from cbst.report.runs import OnlineRun, Round, Run

Panel = tuple[str, list[str], np.ndarray]
"""One heat-map panel: title, column names, classes x columns values (NaN = no value)."""


def png_data_uri(data: bytes) -> str:
    """PNG bytes as a ``data:`` URI for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_uri(fig: Figure) -> str:
    """Render ``fig`` to PNG and return it as a data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return png_data_uri(buffer.getvalue())


def round_columns(run: Run, evaluated_only: bool) -> list[str]:
    """Column names of a run's rounds (``source`` first when its metrics are known)."""
    rounds = run.evaluated if evaluated_only else run.rounds
    head = ["source"] if evaluated_only and run.source is not None else []
    return head + [f"round_{r.index}" for r in rounds]


def _percent(value: float | None) -> float:
    return math.nan if value is None else 100.0 * value


def miou_plot(runs: Sequence[Run]) -> str:
    """mIoU (%) per round, one line per run; the source model is the first point."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    for run in runs:
        metrics = ([run.source] if run.source is not None else []) + [r.metrics for r in run.evaluated]
        columns = round_columns(run, evaluated_only=True)
        ax.plot(columns, [100 * m.miou for m in metrics], marker="o", label=run.label)
    ax.set_xlabel("model")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_uri(fig)


def iou_panels(runs: Sequence[Run], classes: Sequence[str]) -> list[Panel]:
    """Per run: per-class val IoU (%) of the source model and of every evaluated round."""
    panels = []
    for run in runs:
        metrics = ([run.source] if run.source is not None else []) + [r.metrics for r in run.evaluated]
        values = np.array([[_percent(m.iou.get(c)) for m in metrics] for c in classes])
        panels.append((run.label, round_columns(run, evaluated_only=True), values))
    return panels


def round_panels(
    runs: Sequence[Run],
    classes: Sequence[str],
    lookup: Callable[[Run, Round], dict[str, float | None]],
    scale: float = 1.0,
) -> list[Panel]:
    """Per run: a per-class value of every round (``lookup(run, round)[class]`` times ``scale``)."""
    panels = []
    for run in runs:
        values = np.array([[_value(lookup(run, r).get(c), scale) for r in run.rounds] for c in classes])
        panels.append((run.label, round_columns(run, evaluated_only=False), values))
    return panels


def _value(value: float | None, scale: float) -> float:
    return math.nan if value is None else scale * float(value)


def heatmap(
    panels: Sequence[Panel],
    classes: Sequence[str],
    *,
    unit: str,
    vmax: float,
    fmt: str = "{:.0f}",
    cmap: str = "viridis",
) -> str:
    """Side-by-side classes x columns heat maps with the value written in each cell."""
    widths = [max(2, len(columns)) for _, columns, _ in panels]
    fig = Figure(figsize=(2.2 + 0.75 * sum(widths), 0.3 * len(classes) + 1.4))
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": widths})
    image = None
    for ax, (title, columns, values) in zip(axes[0], panels):
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes if ax is axes[0][0] else [], fontsize=8)
        for (row, col), value in np.ndenumerate(values):
            if not math.isnan(value):
                light = value < 0.6 * vmax
                ax.text(
                    col,
                    row,
                    fmt.format(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if light else "black",
                )
    fig.colorbar(image, ax=axes[0].tolist(), label=unit, fraction=0.03)
    return figure_uri(fig)


def class_share_plot(
    runs: Sequence[Run], classes: Sequence[str], colors: Sequence[tuple[int, int, int]]
) -> str:
    """Share (%) of the pseudo-labelled pixels per class: one stacked bar per run and round."""
    bars: list[tuple[str, np.ndarray]] = []
    for run in runs:
        for rnd in run.rounds:
            counts = np.array([float(rnd.stats.get("selected_pixels", {}).get(c, 0)) for c in classes])
            total = counts.sum()
            bars.append((f"{run.label}\nround_{rnd.index}", 100 * counts / total if total else counts))
    fig = Figure(figsize=(2.5 + 0.7 * len(bars), 4.2))
    ax = fig.subplots()
    bottom = np.zeros(len(bars))
    for i, name in enumerate(classes):
        shares = np.array([share[i] for _, share in bars])
        ax.bar(
            range(len(bars)),
            shares,
            bottom=bottom,
            color=np.array(colors[i]) / 255.0,
            label=name,
            edgecolor="white",
            linewidth=0.3,
        )
        bottom += shares
    ax.set_xticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
    ax.set_ylabel("share of pseudo-labelled pixels (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, ncol=1 + len(classes) // 20)
    return figure_uri(fig)


def iteration_miou_plot(runs: Sequence[OnlineRun]) -> str:
    """Val mIoU (%) over the iterations of online runs, one line per run; the source model, when
    its score is known, is iteration 0."""
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    for run in runs:
        points = ([(0, run.source)] if run.source is not None else []) + [
            (e.iteration, e.metrics) for e in run.evaluations
        ]
        ax.plot([i for i, _ in points], [100 * m.miou for _, m in points], marker="o", label=run.label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_uri(fig)


def _run_panels(count: int, height: float) -> tuple[Figure, list]:
    """A figure of ``count`` panels sharing their y axis, three per row."""
    columns = min(count, 3)
    rows = -(-count // columns)
    fig = Figure(figsize=(2.5 + 4.2 * columns, height * rows))
    axes = fig.subplots(rows, columns, squeeze=False, sharey=True).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _class_series(run: OnlineRun, key: str, classes: Sequence[str]) -> tuple[list[int], np.ndarray]:
    """(logged iterations, classes x iterations values of the records' ``key`` mapping; NaN where
    a record lacks a class)."""
    iterations = [int(r["iteration"]) for r in run.log]
    values = np.array([[_value(r.get(key, {}).get(c), 1.0) for r in run.log] for c in classes])
    return iterations, values


def online_share_plot(
    runs: Sequence[OnlineRun], classes: Sequence[str], colors: Sequence[tuple[int, int, int]]
) -> str:
    """Per online run, the share (%) of each class among the pseudo-labelled pixels of each log
    interval, stacked over the iterations."""
    fig, axes = _run_panels(len(runs), 3.6)
    for ax, run in zip(axes, runs):
        iterations, shares = _class_series(run, "selected_share", classes)
        ax.stackplot(
            iterations,
            100 * np.nan_to_num(shares),
            colors=[np.array(c) / 255.0 for c in colors],
            labels=classes,
        )
        ax.set_title(run.label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("share of pseudo-labelled pixels (%)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, ncol=1 + len(classes) // 20)
    return figure_uri(fig)


def online_lambda_plot(
    runs: Sequence[OnlineRun], classes: Sequence[str], colors: Sequence[tuple[int, int, int]]
) -> str:
    """Per online run, the confidence threshold λ of each class over the logged iterations."""
    fig, axes = _run_panels(len(runs), 3.6)
    for ax, run in zip(axes, runs):
        iterations, lam = _class_series(run, "lambda", classes)
        for name, color, values in zip(classes, colors, lam):
            ax.plot(iterations, values, color=np.array(color) / 255.0, label=name, linewidth=1.2)
        ax.set_title(run.label, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("λ")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, ncol=1 + len(classes) // 20)
    return figure_uri(fig)
