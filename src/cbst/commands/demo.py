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
from pathlib import Path

from cbst.demo import DEFAULT_METHODS, ONLINE_VARIANTS, VARIANTS, parse_methods, run_demo

HELP = (
    "run Source / ST / CBST / CBST-SP (and CRST's MRKLD / LRENT with --methods) on the embedded "
    "synthetic benchmark (minutes on a CPU)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="cbst-demo", help="folder for the benchmark, runs and results")
    p.add_argument("--seed", type=int, default=0, help="training seed (the benchmark is fixed)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"self-training rows, a comma list of {', '.join((*VARIANTS, *ONLINE_VARIANTS))}, or 'all' "
        "(the rounds rows; CRST's MRKLD and LRENT add about half a minute each on 2 CPU cores)",
    )


def run(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.seed, device=args.device, methods=parse_methods(args.methods))
    print()
    print((Path(args.out) / "results.md").read_text(), end="")
    rare = ", ".join(f"{k} {100 * v:.1f}" for k, v in result["rare_miou"].items())
    print(f"\nmean IoU over the rare classes ({', '.join(result['rare_classes'])}): {rare}")
    print(
        f"{result['seconds']:.0f} s on {result['device']}; results in {args.out}/results.md, "
        f"{args.out}/results.json, example predictions in {args.out}/examples/"
    )
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
