"""Run the whole method on the embedded synthetic benchmark and print the paper's table.

Renders a small "game" source domain (GTA5 layout) and "camera" target domain (Cityscapes
layout) if --out has none yet, trains the small_demo model (or --model's, from scratch) on the
source, runs ST, CBST and CBST-SP for three rounds each from that same source model, evaluates
every round on the target val split and prints one row per method (each method's last round).
--methods adds CRST's MRKLD and LRENT rows. A rerun with the same --out reuses finished work, so
an interrupted demo continues where it stopped; a folder keeps its --model (a rerun with another
one is refused: give another --out).

--seeds 0,1,2 runs it once per training seed (in OUT/seed_N, sharing one rendered benchmark in
OUT/data) and prints each row's mean ± std over the seeds; OUT/report.html then shows the
seed groups.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cbst import options
from cbst.config import RuntimeSection
from cbst.errors import CLIError
from cbst.options import TEXT, ValueType, option
from cbst.registry import ARCHITECTURES, METHODS


class Seeds(ValueType):
    """Distinct training seeds: a comma list ('0,1,2') or a YAML list of integers.

    On the command line the list is checked when the command starts (one line naming
    ``--seeds``), not by argparse.
    """

    metavar = "S,S,..."
    checked_by_argparse = False

    def parse(self, value: object) -> tuple[int, ...]:
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        try:
            seeds = tuple(_integer(item) for item in items)
        except ValueError:
            raise ValueError(f"expected a comma list of integers such as 0,1,2, got {value!r}") from None
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{value!r} names a seed twice")
        return seeds

    def show(self, value: object) -> str:
        return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _integer(item: object) -> int:
    """One seed: an integer, or the text of one."""
    if isinstance(item, bool) or isinstance(item, float):
        raise ValueError(item)
    return int(str(item).strip()) if isinstance(item, str) else int(item)


SEEDS = Seeds()

HELP = (
    "run Source / ST / CBST / CBST-SP (and CRST's MRKLD / LRENT with --methods) on the embedded "
    "synthetic benchmark (minutes on a CPU)"
)


@options.declared
@dataclass
class DemoOptions:
    """The options of ``cbst demo``."""

    output: str = option(
        "cbst-demo",
        "folder for the benchmark, runs and results",
        flags=("--output", "--out"),
        metavar="DIR",
        path=True,
    )
    seed: int = option(0, "training seed (the benchmark is fixed)", flags=("--seed", "--seed-int"))
    model: str = option(
        "small_demo",
        "network trained from scratch (no weights are downloaded); the transformers train with "
        "their family's AdamW recipe (lr 6e-5, weight decay 0.01), at 1.5 (segformer_mit_b0) to "
        "13 (daformer_mit_b0) times small_demo's FLOPs (docs/models.md); an --out folder keeps "
        "the model it was started with: a rerun with another --model is refused, so give each "
        "model its own --out",
        choices=ARCHITECTURES.names,
    )
    device: str = RuntimeSection.device()
    methods: str | None = option(
        None,
        "self-training rows, a comma list of the methods or 'all' (the rounds rows; the online "
        "DACS, CBST-online and CBST-SP-online are named; CRST's MRKLD and LRENT add about half a minute each on 2 "
        "CPU cores); default: ST,CBST,CBST-SP",
        type=TEXT,
        metavar="|".join(METHODS.names()) or "NAMES",
    )
    seeds: tuple[int, ...] | None = option(
        None,
        "run once per training seed (comma list, e.g. 0,1,2; --seed is then not used) and "
        "print mean ± std over them (default: one run, --seed)",
        type=SEEDS,
    )
    amp: bool = RuntimeSection.amp()


OPTIONS = DemoOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, OPTIONS)


def _run_seeds(o: DemoOptions, methods: tuple[str, ...]) -> int:
    """``--seeds``: the demo per seed, then the mean ± std table."""
    from cbst.demo import DemoSettings, run_demo_seeds, seeds_table, settings_for  # torch: only to run

    try:
        seeds = list(SEEDS.parse(o.seeds))
    except ValueError as exc:
        raise CLIError(f"--seeds: {exc}") from None
    settings = settings_for(o.model, DemoSettings(amp=o.amp))
    results = run_demo_seeds(o.output, seeds, device=o.device, settings=settings, methods=methods)
    named = ",".join(map(str, seeds))
    print(
        f"\n{len(seeds)} seeds ({named}), mean ± std; rare classes: {', '.join(results[0]['rare_classes'])}"
    )
    print(seeds_table(results), end="")
    seconds = ", ".join(f"{r['seconds']:.0f}" for r in results)
    print(f"seconds per seed: {seconds} (a seed reused from an earlier run shows that run's time)")
    print(f"results in {o.output}/seeds.md, {o.output}/seed_N/; report: {Path(o.output) / 'report.html'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from cbst.demo import (  # torch: only to run
        DEFAULT_METHODS,
        DemoSettings,
        parse_methods,
        run_demo,
        settings_for,
    )
    from cbst.provenance import describe

    o = options.from_args(OPTIONS, args)
    methods = parse_methods(o.methods) if o.methods else DEFAULT_METHODS
    if o.seeds is not None:
        return _run_seeds(o, methods)
    settings = settings_for(o.model, DemoSettings(amp=o.amp))
    result = run_demo(o.output, o.seed, device=o.device, settings=settings, methods=methods)
    print()
    print((Path(o.output) / "results.md").read_text(), end="")
    rare = ", ".join(f"{k} {100 * v:.1f}" for k, v in result["rare_miou"].items())
    print(f"\nmean IoU over the rare classes ({', '.join(result['rare_classes'])}): {rare}")
    if "provenance" in result:  # absent from results written before it was recorded
        print(f"computed in {describe(result['provenance'])}")
    print(
        f"{result['seconds']:.0f} s on {result['device']}; results in {o.output}/results.md, "
        f"{o.output}/results.json, example predictions in {o.output}/examples/"
    )
    print(f"report: {Path(o.output) / 'report.html'}")
    return 0
