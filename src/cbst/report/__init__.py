"""``cbst report``: one self-contained HTML page about one self-training run or several.

It answers, from the files a run leaves (``round_*/stats.json``, ``metrics.json``, pseudo-label
PNGs, checkpoints): did the mIoU rise round by round, which classes gained or collapsed, did
class balancing spread the pseudo-labels over the classes, how accurate were they, and what
does the model still get wrong. An online run (``--mode online``) is drawn over its
iterations instead: mIoU, λ per class and the class shares of the selected pixels, from its
``log.jsonl`` and evaluations. ``runs`` reads the folders, ``plots`` draws with matplotlib,
``target`` works on the target images, ``page`` writes the HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cbst import io
from cbst.io import DataError
from cbst.report import page as html
from cbst.report import plots
from cbst.report.runs import AnyRun, OnlineRun, Run, load_runs
from cbst.report.seeds import ResultTable, results_table
from cbst.report.target import (
    gallery,
    label_presence,
    pick_images,
    prediction_model,
    scan_targets,
    target_dataset,
    val_dataset,
)

__all__ = ["build_report", "write_report", "load_runs", "final_scores"]

_TARGET_KEYS = ("dataset_tgt", "data_root_tgt", "split_tgt", "list_tgt")


def _classes(runs: Sequence[AnyRun]) -> tuple[str, ...]:
    """The class names, the same for every run (from the thresholds of its first round, or an
    online run's log)."""
    names = [r.class_names for r in runs]
    for run, other in zip(runs[1:], names[1:]):
        if other != names[0]:
            raise DataError(
                f"{run.path} has {len(other)} classes but {runs[0].path} has "
                f"{len(names[0])}: runs of different label sets cannot be compared"
            )
    if not names[0]:
        first = runs[0]
        where = first.rounds[0].path / "stats.json" if isinstance(first, Run) else first.path / "log.jsonl"
        raise DataError(f"{where}: no per-class thresholds")
    return names[0]


def _colors(run: AnyRun, classes: Sequence[str]) -> list[tuple[int, int, int]]:
    """The label palette of a run's target protocol (when its data cannot be read), or
    matplotlib's colours for a protocol only its data folder defines."""
    from cbst.labels import protocol_for

    try:
        return list(protocol_for(str(run.config.get("dataset_tgt")), len(classes)).colors)
    except ValueError:
        from matplotlib import colormaps

        cmap = colormaps["tab20"]
        return [tuple(int(255 * v) for v in cmap(k % 20)[:3]) for k in range(len(classes))]


def _model_names(runs: Sequence[AnyRun]) -> dict[str, str]:
    """Each run's architecture, read from its latest checkpoint (or its initial weights)."""
    from cbst.checkpoints import CheckpointError, read_meta

    names = {}
    for run in runs:
        path = prediction_model(run)[0]
        try:
            names[run.label] = str(read_meta(path)["arch"]) if path else "? (no checkpoint)"
        except (CheckpointError, KeyError, OSError):
            names[run.label] = "? (no readable checkpoint)"
    return names


def _target_sections(
    runs: Sequence[Run], classes: Sequence[str], images: int, device: str
) -> tuple[str, str, list]:
    """The pseudo-label accuracy heat map and the gallery (with notes when they are left out)."""
    same = [r for r in runs if all(r.config.get(k) == runs[0].config.get(k) for k in _TARGET_KEYS)]
    dataset, problem = target_dataset(runs[0])
    if dataset is None:
        return html.note(problem), html.note(problem), []
    scan = scan_targets(dataset, same)
    if scan.accuracy:
        scored = [r for r in same if (r.path, 0) in scan.accuracy]
        panels = plots.round_panels(
            scored, classes, lambda run, rnd: scan.accuracy[(run.path, rnd.index)], scale=100
        )
        accuracy = html.image(
            plots.heatmap(panels, classes, unit="accuracy (%)", vmax=100), "pseudo-label accuracy per class"
        )
    else:
        accuracy = html.note(
            "Not scored: the runs were made without --score-pseudo-labels, or "
            "the target training images have no ground truth."
        )
    rows = gallery(dataset, same, pick_images(scan.presence, images), device) if images > 0 else []
    left_out = [r.label for r in runs if r not in same]
    note = html.note(f"Left out (another target training split): {', '.join(left_out)}.") if left_out else ""
    return accuracy, html.gallery_table(same, rows) + note, list(dataset.protocol.colors)


def _val_gallery(runs: Sequence[AnyRun], count: int, device: str) -> str:
    """The validation gallery: per image, each run's prediction and the ground truth."""
    dataset, problem = val_dataset(runs[0])
    if dataset is None:
        return html.note(f"No validation gallery: {problem}.")
    rows = gallery(dataset, runs, pick_images(label_presence(dataset), count), device, pseudo=False)
    return html.gallery_table(runs, rows, pseudo=False)


def _final_section(runs: Sequence[AnyRun], classes: Sequence[str]) -> str:
    """The paper's table of every run's last evaluation, seed groups as mean ± std."""
    return html.section(
        "Final scores (%)",
        "The paper's table of each run's last evaluated round (an online run's last "
        "evaluation); runs that differ only in their seed form one row of mean ± sample standard "
        "deviation ('cbst report --table md|csv|latex' prints it).",
        html.final_table(results_table(runs, classes)),
    )


def _score_sections(runs: Sequence[Run], final: str, classes: Sequence[str]) -> list[str]:
    """The val scores: the paper's table, the ``final`` scores section, the mIoU plot and the
    per-class IoU heat map."""
    scored = [r for r in runs if r.evaluated or r.source is not None]
    if not scored:
        return [
            html.section(
                "Val scores",
                "",
                html.note(
                    "No val scores: the runs were made with --eval-split none, or no round has been "
                    "evaluated yet."
                ),
            )
        ]
    return [
        html.section(
            "Val scores per round (%)",
            "The paper's table: mIoU and per-class IoU of "
            "each round's model; green above the source model, red below (hover for "
            "the change).",
            html.score_table(runs, classes),
        ),
        final,
        html.section(
            "mIoU per round",
            "One line per run, starting from the source model when "
            "its score is known: a rising line is self-training helping.",
            html.image(plots.miou_plot(scored), "mIoU per round"),
        ),
        html.section(
            "Per-class IoU per round (%)",
            "Rows are classes, columns rounds: a row "
            "that brightens is a class gained, one that darkens a class lost.",
            html.image(
                plots.heatmap(plots.iou_panels(scored, classes), classes, unit="IoU (%)", vmax=100),
                "per-class IoU",
            ),
        ),
    ]


def final_scores(paths: Sequence[str | Path], source_metrics: str | Path | None = None) -> ResultTable:
    """The paper's table of the runs' last rounds, seed groups as mean ± std (``--table``)."""
    runs = load_runs(list(paths), source_metrics)
    return results_table(runs, _classes(runs))


def _online_sections(
    runs: Sequence[OnlineRun],
    classes: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
    final: str | None,
) -> list[str]:
    """The online runs' table, the ``final`` scores section (when the rounds sections do not
    show it) and their figures over the iterations."""
    evaluated = [r for r in runs if r.evaluations]
    figures = (
        [
            html.section(
                "mIoU over iterations (online runs)",
                "One line per online run, its student evaluated every --eval-interval iterations, "
                "starting from the source model (iteration 0) when its score is known.",
                html.image(plots.iteration_miou_plot(evaluated), "mIoU over iterations"),
            )
        ]
        if evaluated
        else []
    )
    logged = [r for r in runs if r.log]
    if logged:
        figures += [
            html.section(
                "Share of pseudo-labelled pixels per class over iterations (online runs)",
                "Per online run, the classes of the pixels the selection kept, per log interval: "
                "DAFormer's fixed policy keeps every pixel and weighs it, so frequent classes fill "
                "it; class-balanced thresholds (cb) keep a share of each class.",
                html.image(plots.online_share_plot(logged, classes, colors), "online class shares"),
            ),
            html.section(
                "Confidence threshold λ per class over iterations (online runs)",
                "Per online run, the probability a pixel needed to be pseudo-labelled as each class, "
                "from the histograms of the recent target batches (fixed: one constant).",
                html.image(plots.online_lambda_plot(logged, classes, colors), "online thresholds"),
            ),
        ]
    return [
        html.section(
            "Online runs",
            "What each online run did: method, model, data, schedule and selection; iterations "
            "logged of those planned, the evaluations so far and the training time its log records.",
            html.online_table(runs, _model_names(runs)),
        ),
        *([final] if final else []),
        *figures,
    ]


def _rounds_sections(
    runs: Sequence[Run], final: str, classes: Sequence[str], images: int, device: str
) -> tuple[list[str], list[tuple[int, int, int]]]:
    """The rounds runs' sections (with the ``final`` scores section when they have scores) and
    the target gallery's label palette ([] when the target images are not readable)."""
    accuracy, gallery_html, palette = _target_sections(runs, classes, images, device)
    colors = palette or _colors(runs[0], classes)
    lam = plots.round_panels(runs, classes, lambda run, rnd: rnd.stats.get("thresholds", {}))
    scores = _score_sections(runs, final, classes)  # the class shares go after the tables and mIoU plot
    parts = [
        html.section(
            "Runs",
            "What each run did: method, model, data and round schedule; "
            "rounds counts those with pseudo-labels, of the rounds planned.",
            html.config_table(runs, _model_names(runs)),
        ),
        html.section(
            "Time per stage",
            "Pseudo-labelling as the run recorded it; training and "
            "evaluation from the times their files were written (a pause before a "
            "resume counts in the stage it interrupted).",
            html.time_table(runs),
        ),
        *scores[:3],
        html.section(
            "Share of pseudo-labelled pixels per class",
            "One stacked bar per run and "
            "round: a single global threshold (ST) lets frequent classes such as road "
            "fill the bar; class-balanced thresholds (CBST) spread it over the classes.",
            html.image(plots.class_share_plot(runs, classes, colors), "class shares"),
        ),
        *scores[3:],
        html.section(
            "Confidence threshold λ per class",
            "The probability a pixel needed to be "
            "pseudo-labelled as each class: one value for all under ST, lower for "
            "harder classes under CBST.",
            html.image(plots.heatmap(lam, classes, unit="λ", vmax=1.0, fmt="{:.2f}"), "thresholds"),
        ),
        html.section(
            "Pseudo-label quality",
            "Per round, the portion of target pixels asked for, "
            "the share selected and their accuracy against the ground truth (when "
            "scored); the heat map gives the accuracy per class.",
            html.pseudo_table(runs) + accuracy,
        ),
        html.section(
            "Gallery: target training images",
            "Rare classes first. Per run, the last "
            "round's pseudo-label (black: not selected) and the prediction of its latest "
            "model, then the ground truth.",
            html.legend(classes, colors) + gallery_html,
        ),
    ]
    return parts, palette


def build_report(
    paths: Sequence[str | Path],
    *,
    images: int = 6,
    source_metrics: str | Path | None = None,
    device: str = "cpu",
    val_images: int = 0,
) -> str:
    """The report's HTML for run folders and/or ``cbst demo`` folders.

    Args:
        paths: ``cbst self-train`` output folders (rounds or online), or ``cbst demo`` folders.
        images: number of target training images in the gallery (rounds runs).
        val_images: number of validation images in the validation gallery (0: none).
        source_metrics: ``cbst evaluate --out`` JSON of the source model (a demo folder has its own).
        device: where the gallery's predictions run.
    """
    every_run = load_runs(list(paths), source_metrics)
    classes = _classes(every_run)
    runs = [r for r in every_run if isinstance(r, Run)]
    online = [r for r in every_run if isinstance(r, OnlineRun)]
    final = _final_section(every_run, classes)
    parts, palette = _rounds_sections(runs, final, classes, images, device) if runs else ([], [])
    colors = palette or _colors(every_run[0], classes)
    if online:
        shown = any(r.evaluated or r.source is not None for r in runs)  # by _score_sections
        parts += _online_sections(online, classes, colors, None if shown else final)
    if val_images > 0:
        parts.append(
            html.section(
                "Gallery: validation images",
                "Rare classes first. Per run, the prediction of its latest model on images of "
                "the split it is scored on, then the ground truth: what the val scores count.",
                html.legend(classes, colors) + _val_gallery(every_run, val_images, device),
            )
        )
    names = ", ".join(r.label for r in every_run)
    return html.page(f"cbst report: {names}", "\n".join(parts))


def write_report(paths: Sequence[str | Path], out: str | Path, **options) -> Path:
    """Build the report (``build_report``'s options) and write it to ``out``; returns ``out``."""
    text = build_report(paths, **options)
    io.write_text(out, text)
    return Path(out)
