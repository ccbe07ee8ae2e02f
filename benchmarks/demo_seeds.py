"""Run ``cbst demo --seeds`` (the demo per training seed, mean ± std of each row); a thin alias.

Usage: python benchmarks/demo_seeds.py [--seeds 0 1 2] [--out runs/demo_seeds] [--methods all]

Same as ``cbst demo --seeds 0,1,2 --out runs/demo_seeds``: each seed gets its own folder
``OUT/seed_N`` (finished seeds are reused), all share the benchmark rendered once in ``OUT/data``,
and ``OUT/seeds.md`` holds the table of mean ± std of the mIoU and of the rare-class IoU.
"""

from __future__ import annotations

import argparse
import sys

from cbst.cli import main as cbst_main
from cbst.demo import DEFAULT_METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="a comma list, or all")
    args = parser.parse_args()
    seeds = ",".join(map(str, args.seeds))
    sys.exit(
        cbst_main(
            ["demo", "--seeds", seeds, "--out", args.out, "--methods", args.methods, "--device", args.device]
        )
    )


if __name__ == "__main__":
    main()
