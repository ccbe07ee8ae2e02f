"""The report's HTML: one small template, tables built from the runs, figures as data URIs.

No JavaScript: the page is static HTML and inline CSS, so it opens offline by double-click.
Table cells hold the numbers exactly as the run's JSON files give them (as percentages with one
decimal); colours and hover titles only add the change against the source model.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from cbst.labels import TABLE_HEADERS, subset_means
from cbst.report.runs import AnyRun, OnlineRun, Run
from cbst.report.seeds import ResultTable
from cbst.report.tables import LEAD_COLUMNS, cell_text, lead_cells
from cbst.report.target import GalleryRow, prediction_model

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; padding: 0 1em; }}
h1 {{ font-size: 1.6em; }} h2 {{ font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }}
p.how {{ color: #555; font-style: italic; margin: 0.3em 0 0.8em; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin-bottom: 0.8em; }}
th, td {{ border: 1px solid #ddd; padding: 2px 6px; text-align: right; }}
th {{ background: #f3f3f3; }} td.name, th.name {{ text-align: left; }}
td.up {{ background: #c9f0c9; }} td.down {{ background: #f6c8c8; }}
img {{ max-width: 100%; }} table.gallery {{ width: 100%; table-layout: fixed; }}
.gallery td {{ text-align: center; vertical-align: top; }} .gallery img {{ width: 100%; }}
.gallery img.labels {{ image-rendering: pixelated; }}
.legend span {{ display: inline-block; margin: 2px 10px 2px 0; font-size: 0.85em; }}
.legend i {{ display: inline-block; width: 1em; height: 1em; vertical-align: middle;
            margin-right: 4px; border: 1px solid #999; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""


@dataclass(frozen=True)
class Cell:
    """A table cell: its text, an optional CSS class and an optional hover title."""

    text: str
    css: str = ""
    title: str = ""

    def render(self, tag: str = "td") -> str:
        attrs = (f' class="{self.css}"' if self.css else "") + (
            f' title="{html.escape(self.title)}"' if self.title else ""
        )
        return f"<{tag}{attrs}>{html.escape(self.text)}</{tag}>"


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], css: str = "") -> str:
    """An HTML table; the first column is left-aligned (names)."""
    head = "".join(Cell(h, "name" if i == 0 else "").render("th") for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(c.render() for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>'


def section(title: str, how_to_read: str, content: str) -> str:
    """A titled part of the page with its one-line reading guide."""
    return f'<h2>{html.escape(title)}</h2>\n<p class="how">{html.escape(how_to_read)}</p>\n{content}\n'


def note(text: str) -> str:
    """A paragraph saying why a part of the page is missing."""
    return f"<p>{html.escape(text)}</p>"


def image(uri: str, alt: str, css: str = "") -> str:
    """An embedded image (``css``: its class)."""
    return f'<img src="{uri}" alt="{html.escape(alt)}"' + (f' class="{css}">' if css else ">")


def percent(value: float | None) -> str:
    """A fraction as the table's percentage text (one decimal), '-' when undefined."""
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _regularisers(config: dict) -> str:
    """CRST's weights of a run, as the schedule column shows them ('' for none)."""
    parts = []
    if config.get("mr_weight_kld"):
        parts.append(f"MRKLD weight {config['mr_weight_kld']} (source {config.get('mr_weight_src', 0)})")
    if config.get("lr_weight_ent"):
        parts.append(f"LRENT α {config['lr_weight_ent']}")
    return "".join(f", {p}" for p in parts)


def _computed_with(run: Run) -> str:
    """The run's precision, device and versions, or '?' for a run made before they were recorded."""
    from cbst.provenance import describe

    return describe(run.provenance) if run.provenance else "? (not recorded)"


def _data(config: dict) -> str:
    """A run's source, target split and val split."""
    return (
        f"{config.get('dataset')} -> {config.get('dataset_tgt')} {config.get('split_tgt')} "
        f"(val: {config.get('eval_split') or 'none'})"
    )


def config_table(runs: Sequence[Run], models: dict[str, str]) -> str:
    """Per run: method, model, data, schedule (with CRST's weights), rounds finished and what
    the scores were computed with."""
    rows = []
    for run in runs:
        c = run.config
        schedule = (
            f"target portion {c.get('init_tgt_port')} +{c.get('step_tgt_port')} "
            f"(max {c.get('max_tgt_port')}), source portion {c.get('init_src_port')} "
            f"+{c.get('step_src_port')} (max {c.get('max_src_port')}), "
            f"{c.get('epoch_per_round')} epochs/round, lr {c.get('base_lr')}{_regularisers(c)}"
        )
        rows.append(
            [
                Cell(run.label, "name", str(run.path)),
                Cell(run.method, "name"),
                Cell(models.get(run.label, "?"), "name"),
                Cell(_data(c), "name"),
                Cell(schedule, "name"),
                Cell(_computed_with(run), "name"),
                Cell(f"{len(run.rounds)} of {c.get('num_round')}"),
            ]
        )
    return table(["run", "method", "model", "data", "schedule", "computed with", "rounds"], rows)


def _online_schedule(config: dict) -> str:
    """An online run's schedule and selection, as its table shows them."""
    policy = config.get("kc_policy")
    if policy == "fixed":
        selection = f"--kc-policy fixed (threshold {config.get('pseudo_threshold')})"
    else:
        selection = (
            f"--kc-policy {policy} (portion {config.get('tgt_port')}, window {config.get('cb_window')})"
        )
    extras = [f"prior {config['with_prior']}"] if config.get("with_prior") else []
    extras += [f"feature distance λ {config['fd_lambda']}"] if config.get("fd_lambda") else []
    batch = config.get("batch_images")
    return ", ".join(
        [
            f"{config.get('max_iters')} iterations of {batch}+{batch} crops of {config.get('crop_size')}",
            f"{config.get('optimizer')} lr {config.get('base_lr')}",
            f"EMA {config.get('ema_alpha')}",
            selection,
            f"RCS T {config.get('rcs_temperature')}",
            *extras,
        ]
    )


def online_table(runs: Sequence[OnlineRun], models: dict[str, str]) -> str:
    """Per online run: method, model, data, schedule, the iterations logged and evaluated and
    the training seconds its log records."""
    rows = []
    for run in runs:
        c = run.config
        logged = run.log[-1]["iteration"] if run.log else 0
        evaluated = ", ".join(str(e.iteration) for e in run.evaluations) or "none"
        rows.append(
            [
                Cell(run.label, "name", str(run.path)),
                Cell(run.method, "name"),
                Cell(models.get(run.label, "?"), "name"),
                Cell(_data(c), "name"),
                Cell(_online_schedule(c), "name"),
                Cell(f"{logged} of {c.get('max_iters')}"),
                Cell(evaluated, "name"),
                Cell(_seconds(run.seconds)),
            ]
        )
    headers = ["run", "method", "model", "data", "schedule", "iterations", "evaluated at", "training (s)"]
    return table(headers, rows)


def time_table(runs: Sequence[Run]) -> str:
    """Seconds per stage and round."""
    rows = [
        [Cell(run.label, "name"), Cell(f"round_{r.index}", "name")]
        + [Cell(_seconds(r.seconds.get(s))) for s in ("pseudo", "train", "eval")]
        for run in runs
        for r in run.rounds
    ]
    return table(["run", "round", "pseudo-labels (s)", "training (s)", "evaluation (s)"], rows)


def _change_cell(value: float | None, source: float | None) -> Cell:
    """A score cell coloured by its change against the source model's score."""
    text = percent(value)
    if value is None or source is None or text == "-" or percent(source) == "-":
        return Cell(text)
    delta = 100 * (value - source)
    css = "up" if delta >= 0.05 else "down" if delta <= -0.05 else ""
    return Cell(text, css, f"{delta:+.1f} against the source model")


def score_table(runs: Sequence[Run], classes: Sequence[str]) -> str:
    """The paper's table: mIoU (and the protocol's subset means, mIoU* for 16 classes) and
    per-class IoU, per round."""
    subsets = subset_means(classes)
    headers = (
        ["run", "model", "mIoU"] + [s.header for s in subsets] + [TABLE_HEADERS.get(c, c) for c in classes]
    )

    def scores(m) -> list[float | None]:
        return [m.miou] + [m.miou_over(s.classes) for s in subsets] + [m.iou.get(c) for c in classes]

    rows = []
    for run in runs:
        base = scores(run.source) if run.source is not None else None
        if base is not None:
            rows.append([Cell(run.label, "name"), Cell("source", "name")] + [Cell(percent(v)) for v in base])
        for rnd in run.evaluated:
            values = scores(rnd.metrics)
            rows.append(
                [Cell(run.label, "name"), Cell(f"round_{rnd.index}", "name")]
                + [_change_cell(v, base[k] if base else None) for k, v in enumerate(values)]
            )
    return table(headers, rows, "scores")


def final_table(scores: ResultTable) -> str:
    """The final-score table: one row per run or seed group (mean ± std), sources first."""
    rows = [
        [Cell(text, "name") for text in lead_cells(r)] + [Cell(cell_text(s)) for s in r.scores]
        for r in scores.rows
    ]
    return table([*LEAD_COLUMNS, *scores.columns], rows, "final")


def largest_shares(selected: dict[str, int], count: int = 3) -> str:
    """The ``count`` classes with the most pseudo-labelled pixels and their shares (%)."""
    total = sum(selected.values())
    top = sorted(selected.items(), key=lambda kv: -kv[1])[:count]
    return ", ".join(f"{name} {percent(n / total)}" for name, n in top if n) if total else "-"


def pseudo_table(runs: Sequence[Run]) -> str:
    """Per round: the target portion asked for, the share of pixels selected, overall accuracy
    and the classes that took most of the pseudo-labels."""
    rows = [
        [
            Cell(run.label, "name"),
            Cell(f"round_{r.index}", "name"),
            Cell(percent(r.stats.get("portion"))),
            Cell(percent(r.stats.get("selected_fraction"))),
            Cell(percent(r.stats.get("pseudo_label_accuracy"))),
            Cell(largest_shares(r.stats.get("selected_pixels", {})), "name"),
        ]
        for run in runs
        for r in run.rounds
    ]
    return table(
        [
            "run",
            "round",
            "portion (%)",
            "pixels selected (%)",
            "accuracy (%)",
            "largest classes (% of pseudo-labels)",
        ],
        rows,
    )


def legend(classes: Sequence[str], colors: Sequence[tuple[int, int, int]]) -> str:
    """The label palette: a colour swatch per class, black for no label."""
    items = [
        f'<span><i style="background: rgb{tuple(col)}"></i>{html.escape(name)}</span>'
        for name, col in zip(classes, colors)
    ]
    items.append('<span><i style="background: rgb(0, 0, 0)"></i>no label / not selected</span>')
    return f'<div class="legend">{"".join(items)}</div>'


def gallery_table(runs: Sequence[AnyRun], rows: Sequence[GalleryRow], *, pseudo: bool = True) -> str:
    """Image | per run: last pseudo-label (with ``pseudo``), prediction | ground truth."""
    head = ["image"]
    for run in runs:
        if pseudo:
            head.append(f"{run.label}: pseudo-label round_{run.rounds[-1].index}")
        head.append(f"{run.label}: prediction ({prediction_model(run)[1]})")
    head.append("ground truth")
    out = ['<table class="gallery"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = [image(row.image, row.name) + f"<br>{html.escape(row.name)}"]
        for run, (label, pred) in zip(runs, row.runs):
            if pseudo:
                cells.append(image(label, f"{run.label} pseudo-label", "labels") if label else "-")
            cells.append(image(pred, f"{run.label} prediction", "labels") if pred else "no readable model")
        cells.append(image(row.truth, "ground truth", "labels") if row.truth else "no ground truth")
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</table>"


def page(title: str, body: str) -> str:
    """The whole HTML document."""
    return TEMPLATE.format(title=html.escape(title), body=body)
