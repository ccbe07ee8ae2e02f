"""Run the whole method on the embedded synthetic benchmark and print the paper's table.

Renders a small "game" source domain (GTA5 layout) and "camera" target domain (Cityscapes
layout) if --out has none yet, trains the small model on the source, runs ST, CBST and CBST-SP
for three rounds each from that same source model, evaluates every round on the target val
split and prints one row per method (each method's last round). --methods adds CRST's MRKLD and
LRENT rows. A rerun with the same --out reuses finished work, so an interrupted demo continues
where it stopped.

--seeds 0,1,2 runs it once per training seed (in OUT/seed_N, sharing one rendered benchmark in
OUT/data) and prints each row's mean ± std over the seeds; OUT/report.html then shows the
seed groups.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cbst.demo import DEFAULT_METHODS, VARIANTS, parse_methods, run_demo, run_demo_seeds, seeds_table
from cbst.errors import CLIError

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
        help=f"self-training rows, a comma list of {', '.join(VARIANTS)} or 'all' "
        "(CRST's MRKLD and LRENT add about half a minute each on 2 CPU cores)",
    )
    p.add_argument(
        "--seeds",
        default=None,
        metavar="S,S,...",
        help="run once per training seed (comma list, e.g. 0,1,2; --seed is then not used) and "
        "print mean ± std over them",
    )


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds``: distinct integers, comma-separated."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise CLIError(f"--seeds: expected a comma list of integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise CLIError(f"--seeds: {text!r} names a seed twice")
    return seeds


def _run_seeds(args: argparse.Namespace) -> int:
    """``--seeds``: the demo per seed, then the mean ± std table."""
    seeds = parse_seeds(args.seeds)
    results = run_demo_seeds(args.out, seeds, device=args.device, methods=parse_methods(args.methods))
    print(
        f"\n{len(seeds)} seeds ({args.seeds}), mean ± std; rare classes: {', '.join(results[0]['rare_classes'])}"
    )
    print(seeds_table(results), end="")
    seconds = ", ".join(f"{r['seconds']:.0f}" for r in results)
    print(f"seconds per seed: {seconds} (a seed reused from an earlier run shows that run's time)")
    print(f"results in {args.out}/seeds.md, {args.out}/seed_N/; report: {Path(args.out) / 'report.html'}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.seeds is not None:
        return _run_seeds(args)
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
