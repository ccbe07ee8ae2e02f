"""Run ``cbst demo --seeds`` (the demo per training seed, mean ± std of each row), or tabulate
the rows of demo folders run before.

Usage:
  python benchmarks/demo_seeds.py [--seeds 0 1 2] [--out runs/demo_seeds] [--methods all]
                                  [--no-amp | --emulate-bf16] [--setting NAME=VALUE ...]
  python benchmarks/demo_seeds.py --seeds 0 1 2 --from DIR [DIR ...] [--against ROW]

The first form runs what ``cbst demo --seeds 0,1,2 --out runs/demo_seeds`` runs: each seed gets
its own folder ``OUT/seed_N`` (finished seeds are reused), all share the benchmark rendered once
in ``OUT/data``, and ``OUT/seeds.md`` holds the table of mean ± std of the mIoU and of the
rare-class IoU. Then it prints each row's gain over the source model per seed (mean ± std, and
the mean over that std). ``--setting`` changes one field of the demo's ``DemoSettings`` (e.g.
``source_class_weight_power=0.3``), to measure a setting over seeds before the demo adopts it.
``--emulate-bf16`` runs the demo's bf16 path on a CPU without native bf16 (``bf16_emulation.py``):
its figures are those of bf16, its times are not.

``--from`` runs nothing: it reads ``DIR/seed_N/results.json`` of each folder (``cbst demo
--out DIR/seed_N --seed N`` runs, e.g. the rounds rows in one folder and the online rows, from
copies of the same source models, in another), checks that the folders' Source rows agree,
and prints the same table over all their rows and each row's difference against ``--against``
(default Source) per seed, in mIoU and in rare-class IoU; for the online rows, also the share
of the target pixels their selection kept and the rare classes' share of those, averaged over
the log records of each run and then over the seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

from cbst.demo import (
    DEFAULT_METHODS,
    DemoSettings,
    override_settings,
    parse_methods,
    run_demo_seeds,
    seeds_table,
    settings_for,
)
from cbst.errors import CbstError, ConfigError
from cbst.report.runs import is_online_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bf16_emulation import check_emulation, emulated_bf16  # noqa: E402


def _summary(values: list[float]) -> str:
    """'mean ± std' in percent (sample standard deviation; 0 for a single seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):+5.1f} ± {100 * std:4.1f}"


def print_gains(results: list[dict], against: str = "Source") -> None:
    """Each other row's difference from ``against``, per seed, as mean ± std (mIoU and rare-class IoU)."""
    for row in [r for r in results[0]["rows"] if r != against]:
        for what, value in (
            ("mIoU", lambda r, n: r["rows"][n]["miou"]),
            ("rare", lambda r, n: r["rare_miou"][n]),
        ):
            gains = [value(r, row) - value(r, against) for r in results]
            spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
            ratio = f"{statistics.mean(gains) / spread:.1f}x its std" if spread > 0 else "one seed"
            seeds = ", ".join(f"{100 * g:+.1f}" for g in gains)
            print(f"{row} - {against}: {_summary(gains)} {what} ({ratio}; per seed {seeds})")


def merged_results(folders: list[Path], seeds: list[int]) -> list[dict]:
    """Per seed, the rows of every folder's ``seed_N/results.json`` in folder order (Source once);
    a folder whose Source row differs from the first's is refused (another source model)."""
    merged = []
    for seed in seeds:
        paths = [folder / f"seed_{seed}" / "results.json" for folder in folders]
        for path in paths:
            if not path.is_file():
                raise ConfigError(f"{path}: not found; --from takes finished cbst demo --seeds folders")
        found = [json.loads(path.read_text()) for path in paths]
        rows, rare = {}, {}
        for folder, result in zip(folders, found):
            if result["rows"]["Source"] != found[0]["rows"]["Source"]:
                raise ConfigError(f"{folder / f'seed_{seed}'}: its Source row differs from {folders[0]}'s")
            rows.update(result["rows"])
            rare.update(result["rare_miou"])
        merged.append({**found[0], "rows": rows, "rare_miou": rare})
    return merged


def print_online_selection(folders: list[Path], seeds: list[int], rare: list[str]) -> None:
    """Per online row of the folders, the mean selected fraction of
    the target pixels and the rare classes' share (%) of the selected pixels, over records and seeds."""
    for row_dir in sorted({p.name for f in folders for p in f.glob("seed_*/*") if is_online_run(p)}):
        fractions, shares = [], []
        for seed in seeds:
            run = next(
                f / f"seed_{seed}" / row_dir for f in folders if (f / f"seed_{seed}" / row_dir).is_dir()
            )
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
            fractions.append(statistics.mean(r["selected_fraction"] for r in log))
            shares.append(statistics.mean(sum(r["selected_share"][c] for c in rare) for r in log))
        print(
            f"{row_dir}: selected {100 * statistics.mean(fractions):.1f} % of the target pixels, "
            f"rare classes {100 * statistics.mean(shares):.2f} % of those (mean over records and seeds)"
        )


def tabulate(args: argparse.Namespace) -> None:
    """``--from``: the table, gains and online selection of finished demo folders."""
    if args.emulate_bf16 or args.no_amp or args.setting:
        raise ConfigError(
            "--from tabulates finished runs; --emulate-bf16, --no-amp and --setting apply only to runs it starts"
        )
    results = merged_results(args.folders, args.seeds)
    print(f"rare classes: {', '.join(results[0]['rare_classes'])}")
    print(seeds_table(results), end="")
    print_gains(results, args.against)
    print_online_selection(args.folders, args.seeds, results[0]["rare_classes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="a comma list, or all")
    parser.add_argument("--no-amp", action="store_true", help="float32 even where bf16 autocast is available")
    parser.add_argument(
        "--emulate-bf16",
        action="store_true",
        help="bf16 on a CPU without native bf16 (benchmarks/bf16_emulation.py; its times mean nothing)",
    )
    parser.add_argument(
        "--from", dest="folders", type=Path, nargs="+", help="tabulate these demo folders' seeds"
    )
    parser.add_argument("--against", default="Source", help="the row the differences are taken from")
    parser.add_argument(
        "--setting", action="append", default=[], metavar="NAME=VALUE", help="override one DemoSettings field"
    )
    args = parser.parse_args()
    try:
        if args.folders:
            tabulate(args)
            return
        settings = override_settings(DemoSettings(amp=not args.no_amp), args.setting)
        settings = settings_for(settings.model, settings)
        if args.emulate_bf16:
            check_emulation(args.device, settings.amp)
        methods = parse_methods(args.methods)
        with emulated_bf16() if args.emulate_bf16 else contextlib.nullcontext():
            results = run_demo_seeds(
                args.out, args.seeds, device=args.device, settings=settings, methods=methods
            )
    except CbstError as exc:  # a user error: one line and status 2, as the command line prints it
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(seeds_table(results), end="")
    print_gains(results, args.against)


if __name__ == "__main__":
    main()
