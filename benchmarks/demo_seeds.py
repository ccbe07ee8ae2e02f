"""Run ``cbst demo --seeds`` (the demo per training seed, mean ± std of each row); a thin alias.

Usage: python benchmarks/demo_seeds.py [--seeds 0 1 2] [--out runs/demo_seeds] [--methods all] [--no-amp]

Same as ``cbst demo --seeds 0,1,2 --out runs/demo_seeds``: each seed gets its own folder
``OUT/seed_N`` (finished seeds are reused), all share the benchmark rendered once in ``OUT/data``,
and ``OUT/seeds.md`` holds the table of mean ± std of the mIoU and of the rare-class IoU. Then
prints each row's gain over the source model per seed (mean ± std, and the mean over that std),
read from ``OUT/seeds.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from cbst.cli import main as cbst_main
from cbst.demo import DEFAULT_METHODS


def _summary(values: list[float]) -> str:
    """'mean ± std' in percent (sample standard deviation; 0 for a single seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):5.1f} ± {100 * std:4.1f}"


def print_gains(seeds_json: Path) -> None:
    """Each self-training row's mIoU gain over the source model, per seed, as mean ± std."""
    results = json.loads(seeds_json.read_text())["results"]
    for row in [r for r in results[0]["rows"] if r != "Source"]:
        gains = [r["rows"][row]["miou"] - r["rows"]["Source"]["miou"] for r in results]
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        ratio = f"{statistics.mean(gains) / spread:.1f}x its std" if spread > 0 else "one seed"
        print(f"{row} - Source: {_summary(gains)} mIoU ({ratio})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="a comma list, or all")
    parser.add_argument("--no-amp", action="store_true", help="float32 even where bf16 autocast is available")
    args = parser.parse_args()
    seeds = ",".join(map(str, args.seeds))
    argv = ["demo", "--seeds", seeds, "--out", args.out, "--methods", args.methods, "--device", args.device]
    status = cbst_main(argv + (["--no-amp"] if args.no_amp else []))
    if status == 0:
        print_gains(Path(args.out) / "seeds.json")
    sys.exit(status)


if __name__ == "__main__":
    main()
