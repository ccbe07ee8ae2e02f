"""Run ``cbst demo`` for several training seeds; print mean ± std of each row's mIoU.

Usage: python benchmarks/demo_seeds.py [--seeds 0 1 2] [--out runs/demo_seeds] [--methods all]

Each seed gets its own folder (finished seeds, and finished rows of a seed, are reused).
``--methods`` picks the self-training rows as ``cbst demo --methods`` does; ``all`` adds CRST's
MRKLD and LRENT to ST, CBST and CBST-SP. The benchmark itself is fixed, so the spread is the
method's seed-to-seed variance. Also prints the mean IoU over the rare classes
(pole, traffic light, traffic sign, rider, motorcycle, bicycle), the per-seed numbers, and each
row's gain over the source model per seed (mean ± std, and the mean over that std).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cbst.demo import DEFAULT_METHODS, parse_methods, run_demo


def _summary(values: list[float]) -> str:
    """'mean ± std' in percent (sample standard deviation; 0 for a single seed)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):5.1f} ± {100 * std:4.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="a comma list, or all")
    args = parser.parse_args()
    methods = parse_methods(args.methods)
    results = []
    for seed in args.seeds:
        folder = Path(args.out) / f"seed_{seed}"
        done = folder / "results.json"
        result = json.loads(done.read_text()) if done.is_file() else None
        if result is None or not set(methods) <= set(result["rows"]):
            result = run_demo(folder, seed, device=args.device, methods=methods)
        results.append(result)
    rows = ["Source", *methods]
    print(f"{len(args.seeds)} seeds: {args.seeds}")
    print(f"{'row':8s} | {'mIoU':13s} | {'rare-class IoU':13s} | per-seed mIoU")
    for row in rows:
        miou = [r["rows"][row]["miou"] for r in results]
        rare = [r["rare_miou"][row] for r in results]
        per_seed = " ".join(f"{100 * v:.1f}" for v in miou)
        print(f"{row:8s} | {_summary(miou)} | {_summary(rare)} | {per_seed}")
    for row in methods:
        gains = [r["rows"][row]["miou"] - r["rows"]["Source"]["miou"] for r in results]
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        ratio = f"{statistics.mean(gains) / spread:.1f}x its std" if spread > 0 else "one seed"
        print(f"{row} - Source: {_summary(gains)} mIoU ({ratio})")
    seconds = [r["seconds"] for r in results]
    print(f"seconds per demo: {' '.join(f'{s:.0f}' for s in seconds)}")


if __name__ == "__main__":
    main()
