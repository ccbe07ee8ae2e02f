"""Run the whole method on the embedded synthetic benchmark and print the paper's table.

Renders a small "game" source domain (GTA5 layout) and "camera" target domain (Cityscapes
layout) if --out has none yet, trains the small model on the source, runs ST, CBST and CBST-SP
for three rounds each from that same source model, evaluates every round on the target val
split and prints one row per method (each method's last round). --methods adds CRST's MRKLD and
LRENT rows. A rerun with the same --out reuses finished work, so an interrupted demo continues
where it stopped.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cbst import options
from cbst.config import RuntimeSection
from cbst.options import TEXT, option
from cbst.registry import METHODS

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
    device: str = RuntimeSection.device()
    methods: str | None = option(
        None,
        "self-training rows, a comma list of the methods or 'all' (CRST's MRKLD and LRENT add about "
        "half a minute each on 2 CPU cores); default: ST,CBST,CBST-SP",
        type=TEXT,
        metavar="|".join(METHODS.names()) or "NAMES",
    )


OPTIONS = DemoOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, OPTIONS)


def run(args: argparse.Namespace) -> int:
    from cbst.demo import DEFAULT_METHODS, parse_methods, run_demo  # torch: only to run

    o = options.from_args(OPTIONS, args)
    methods = parse_methods(o.methods) if o.methods else DEFAULT_METHODS
    result = run_demo(o.output, o.seed, device=o.device, methods=methods)
    print()
    print((Path(o.output) / "results.md").read_text(), end="")
    rare = ", ".join(f"{k} {100 * v:.1f}" for k, v in result["rare_miou"].items())
    print(f"\nmean IoU over the rare classes ({', '.join(result['rare_classes'])}): {rare}")
    print(
        f"{result['seconds']:.0f} s on {result['device']}; results in {o.output}/results.md, "
        f"{o.output}/results.json, example predictions in {o.output}/examples/"
    )
    print(f"report: {Path(o.output) / 'report.html'}")
    return 0
