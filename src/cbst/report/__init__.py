"""``cbst report``: one self-contained HTML page about one self-training run or several.

It answers, from the files a run leaves (``round_*/stats.json``, ``metrics.json``, pseudo-label
PNGs, checkpoints): did the mIoU rise round by round, which classes gained or collapsed, did
class balancing spread the pseudo-labels over the classes, how accurate were they, and what
does the model still get wrong. ``runs`` reads the folders, ``plots`` draws with matplotlib,
``target`` works on the target images, ``page`` writes the HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cbst import io
from cbst.io import DataError
from cbst.report import page as html
from cbst.report import plots
from cbst.report.runs import Run, load_runs
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


def _classes(runs: Sequence[Run]) -> tuple[str, ...]:
    """The class names, the same for every run (from the thresholds of its first round)."""
    names = [tuple(r.rounds[0].stats.get("thresholds", {})) for r in runs]
    for run, other in zip(runs[1:], names[1:]):
        if other != names[0]:
            raise DataError(
                f"{run.path} has {len(other)} classes but {runs[0].path} has "
                f"{len(names[0])}: runs of different label sets cannot be compared"
            )
    if not names[0]:
        raise DataError(f"{runs[0].rounds[0].path / 'stats.json'}: no per-class thresholds")
    return names[0]


def _colors(run: Run, classes: Sequence[str]) -> list[tuple[int, int, int]]:
    """The label palette of a run's target protocol (when its data cannot be read), or
    matplotlib's colours for a protocol only its data folder defines."""
    from cbst.labels import protocol_for

    try:
        return list(protocol_for(str(run.config.get("dataset_tgt")), len(classes)).colors)
    except ValueError:
        from matplotlib import colormaps

        cmap = colormaps["tab20"]
        return [tuple(int(255 * v) for v in cmap(k % 20)[:3]) for k in range(len(classes))]


def _model_names(runs: Sequence[Run]) -> dict[str, str]:
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


def _val_gallery(runs: Sequence[Run], count: int, device: str) -> str:
    """The validation gallery: per image, each run's prediction and the ground truth."""
    dataset, problem = val_dataset(runs[0])
    if dataset is None:
        return html.note(f"No validation gallery: {problem}.")
    rows = gallery(dataset, runs, pick_images(label_presence(dataset), count), device, pseudo=False)
    return html.gallery_table(runs, rows, pseudo=False)


def _score_sections(runs: Sequence[Run], classes: Sequence[str]) -> list[str]:
    """The val scores: the paper's table, the mIoU plot and the per-class IoU heat map."""
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
        html.section(
            "Final scores (%)",
            "The paper's table of each run's last evaluated round; runs that differ only in "
            "their seed form one row of mean ± sample standard deviation "
            "('cbst report --table md|csv|latex' prints it).",
            html.final_table(results_table(runs, classes)),
        ),
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
        paths: ``cbst self-train`` output folders, or ``cbst demo`` folders (ST, CBST, CBST-SP).
        images: number of target training images in the gallery.
        val_images: number of validation images in the validation gallery (0: none).
        source_metrics: ``cbst evaluate --out`` JSON of the source model (a demo folder has its own).
        device: where the gallery's predictions run.
    """
    runs = load_runs(list(paths), source_metrics)
    classes = _classes(runs)
    accuracy, gallery_html, palette = _target_sections(runs, classes, images, device)
    colors = palette or _colors(runs[0], classes)
    lam = plots.round_panels(runs, classes, lambda run, rnd: rnd.stats.get("thresholds", {}))
    scores = _score_sections(runs, classes)  # the class shares go after the tables and mIoU plot
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
    if val_images > 0:
        parts.append(
            html.section(
                "Gallery: validation images",
                "Rare classes first. Per run, the prediction of its latest model on images of "
                "the split it is scored on, then the ground truth: what the val scores count.",
                html.legend(classes, colors) + _val_gallery(runs, val_images, device),
            )
        )
    names = ", ".join(r.label for r in runs)
    return html.page(f"cbst report: {names}", "\n".join(parts))


def write_report(paths: Sequence[str | Path], out: str | Path, **options) -> Path:
    """Build the report (``build_report``'s options) and write it to ``out``; returns ``out``."""
    text = build_report(paths, **options)
    io.write_text(out, text)
    return Path(out)
