"""Time and peak memory of class-balanced thresholds: ThresholdEstimator vs the original's pools.

Each method runs in its own subprocess on the same stream of (confidence, predicted class) pairs
(uniform confidences, uniform classes, fed in chunks as a pseudo-label pass would) and reports
the wall time of accumulation + thresholds (data generation excluded) and its peak RSS above the
process's RSS before the first chunk. The original's method (docs/method.md §12.1) keeps per-class
Python lists of every value, then sorts each class descending and indexes it; on a small shared
machine it is only run up to --original-max values and extrapolated (clearly labelled) beyond.

    python benchmarks/threshold_speed.py                 # 1e7, 3e7, 1e8 values, 19 classes
    python benchmarks/threshold_speed.py --sizes 1e6     # quick check
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

CHUNK = 1 << 22  # ≈ 2 full-resolution Cityscapes frames of pixels per update


def _rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _chunks(total: int, num_classes: int, seed: int):
    """Deterministic (conf, pred) chunks adding up to ``total`` values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for start in range(0, total, CHUNK):
        n = min(CHUNK, total - start)
        yield torch.rand(n, generator=g), torch.randint(num_classes, (n,), generator=g)


def _run_estimator(total: int, num_classes: int, portion: float, exact: bool) -> tuple[float, list]:
    """Accumulate with ThresholdEstimator and compute λ; returns (seconds, λ)."""
    from cbst.thresholds import ThresholdEstimator

    est = ThresholdEstimator(num_classes, "cb", exact=exact)
    seconds = 0.0
    for conf, pred in _chunks(total, num_classes, seed=0):
        start = time.perf_counter()
        est.update_confidences(conf, pred)
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    lam = est.thresholds(portion).tolist()
    return seconds + time.perf_counter() - start, lam


def _run_original(total: int, num_classes: int, portion: float) -> tuple[float, list]:
    """Per-class Python lists of every value, then a descending sort per class (the original)."""
    import numpy as np

    pools: list[list[float]] = [[] for _ in range(num_classes)]
    seconds = 0.0
    for conf, pred in _chunks(total, num_classes, seed=0):
        conf, pred = conf.numpy(), pred.numpy()
        start = time.perf_counter()
        for c in range(num_classes):
            pools[c].extend(conf[pred == c].tolist())
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    lam = []
    for pool in pools:
        ranked = np.sort(np.array(pool, dtype=np.float32))[::-1]
        k = math.floor(len(ranked) * portion)
        lam.append(float(ranked[k - 1]) if k >= 1 else 1.0)
    return seconds + time.perf_counter() - start, lam


def _child(method: str, total: int, num_classes: int, portion: float) -> None:
    """Run one method and print a JSON line with time, memory and λ."""
    import torch

    torch.set_num_threads(2)
    next(_chunks(CHUNK, num_classes, seed=1))  # warm up the generator before the baseline
    baseline = _rss_mib()
    if method == "original":
        seconds, lam = _run_original(total, num_classes, portion)
    else:
        seconds, lam = _run_estimator(total, num_classes, portion, exact=method == "exact")
    print(json.dumps({"seconds": seconds, "peak_mib": _rss_mib() - baseline, "lam": lam}))


def _measure(method: str, total: int, args: argparse.Namespace) -> dict:
    """Run ``method`` in a fresh interpreter so its peak RSS is its own."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--sizes",
        str(total),
        "--classes",
        str(args.classes),
        "--portion",
        str(args.portion),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _extrapolate(rows: list[dict], total: int) -> dict:
    """n·log n time and linear memory from the largest measured size of the original."""
    ref = max(rows, key=lambda r: r["n"])
    ratio = total / ref["n"]
    return {
        "seconds": ref["seconds"] * ratio * math.log(total) / math.log(ref["n"]),
        "peak_mib": ref["peak_mib"] * ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e7,3e7,1e8", help="comma list of value counts")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--portion", type=float, default=0.2)
    parser.add_argument(
        "--original-max",
        type=float,
        default=3e7,
        help="largest size at which the original's method is actually run",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    if args.child:
        _child(args.child, sizes[0], args.classes, args.portion)
        return

    print(
        f"{args.classes} classes, portion {args.portion}, chunks of {CHUNK} values, "
        f"torch threads 2; peak = RSS above the pre-run baseline"
    )
    print(f"{'values':>8} {'method':<22} {'seconds':>9} {'peak MiB':>9} {'max |λ - λ_sort|':>17}")
    original_rows: list[dict] = []
    for total in sizes:
        results = {m: _measure(m, total, args) for m in ("approx", "exact")}
        if total <= args.original_max:
            results["original"] = _measure("original", total, args)
            original_rows.append({"n": total, **results["original"]})
        reference = results["exact"]["lam"]
        for method, res in results.items():
            err = max(abs(a - b) for a, b in zip(res["lam"], reference))
            label = {
                "approx": "histogram (65536 bins)",
                "exact": "exact (device pools)",
                "original": "original (lists+sort)",
            }[method]
            print(f"{total:>8.0e} {label:<22} {res['seconds']:>9.2f} {res['peak_mib']:>9.0f} {err:>17.2e}")
        if total > args.original_max and original_rows:
            est = _extrapolate(original_rows, total)
            print(
                f"{total:>8.0e} {'original EXTRAPOLATED':<22} {est['seconds']:>9.1f} "
                f"{est['peak_mib']:>9.0f} {'(not run)':>17}"
            )


if __name__ == "__main__":
    main()
