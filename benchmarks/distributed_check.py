"""Two processes under torchrun against one, on the demo's data (issue 8's check, outside the suite).

Renders the demo's benchmark into ``--work`` (or reuses it), then runs each command once as a
plain process and once as ``torchrun --standalone --nproc-per-node 2 -m cbst ...`` on the CPU
(the one process with every core's threads, each of the two with one thread, as torchrun sets):

1. ``cbst train-source`` for ``--epochs`` epochs of the small model (its checkpoint from one
   process is the source model of the next steps);
2. ``cbst self-train``, round 0 with ``--exact-thresholds``: the pseudo-label PNGs must be byte
   for byte and the thresholds λ exactly those of one process;
3. ``cbst evaluate`` of the round-0 model of one process, with flipping: the metrics must be
   equal.

It prints one JSON line per stage: the seconds with 1 and 2 processes (from the run's files
where they record a stage's time, the command's wall time otherwise, which includes starting
Python and torch: about 5 s), the speed-up, and what was compared. Exit status 1 if a
comparison fails.

    python benchmarks/distributed_check.py                      # the demo's 400/200/100 images
    python benchmarks/distributed_check.py --num-source 100 --num-train 50 --num-val 25
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
RUNTIME = ("--device", "cpu", "--num-workers", "0", "--no-progress")


def _run(processes: int, command: str, args: list[str]) -> float:
    """Run ``cbst COMMAND ARGS`` in one process or two under torchrun; its wall seconds."""
    launcher = TORCHRUN if processes == 2 else ()
    output = args[args.index("--output") + 1] if "--output" in args else None
    if output:
        shutil.rmtree(output, ignore_errors=True)  # a fresh run each time
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    }
    env["OMP_NUM_THREADS"] = "1" if processes == 2 else str(len(os.sched_getaffinity(0)))
    started = time.perf_counter()
    job = subprocess.run(
        [sys.executable, *launcher, "-m", "cbst", command, *args], env=env, capture_output=True, text=True
    )
    if job.returncode != 0:
        sys.exit(f"cbst {command} with {processes} process(es) failed:\n{job.stderr[-3000:]}")
    return time.perf_counter() - started


def _report(stage: str, one: float, two: float, **compared: object) -> None:
    print(
        json.dumps(
            {
                "stage": stage,
                "seconds_1": round(one, 2),
                "seconds_2": round(two, 2),
                "speedup": round(one / two, 2),
                **compared,
            }
        ),
        flush=True,
    )


def _epoch_seconds(run: Path) -> float:
    """Training seconds summed over the epochs of a ``train-source`` run (its log.jsonl)."""
    return sum(json.loads(line)["seconds"] for line in (run / "log.jsonl").read_text().splitlines())


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("distributed-check"), help="working folder")
    parser.add_argument("--num-source", type=int, default=400)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1, help="source-training epochs")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from cbst.report.runs import load_run
    from cbst.synthetic import make_synthetic

    work = args.work.resolve()
    data = work / "data"
    make_synthetic(data, seed=0, num_source=args.num_source, num_train=args.num_train, num_val=args.num_val)
    ok = True

    source = [
        "--dataset",
        "gta5",
        "--data-root",
        str(data / "gta5"),
        "--model",
        "small",
        "--batch-images",
        "8",
    ]
    source += ["--crop-size", "128", "--base-lr", "0.05", "--to-epoch", str(args.epochs), *RUNTIME]
    for n in (1, 2):
        _run(n, "train-source", [*source, "--output", str(work / f"source_{n}")])
    losses = [
        json.loads((work / f"source_{n}" / "log.jsonl").read_text().splitlines()[-1])["loss"] for n in (1, 2)
    ]
    _report(
        "train-source epochs",
        *(_epoch_seconds(work / f"source_{n}") for n in (1, 2)),
        loss_1=losses[0],
        loss_2=losses[1],
    )

    model = work / "source_1" / "last.pt"
    rounds = [
        "--data-root",
        str(data / "gta5"),
        "--data-root-tgt",
        str(data / "cityscapes"),
        "--weights",
        str(model),
    ]
    rounds += [
        "--num-round",
        "1",
        "--epoch-per-round",
        "1",
        "--init-tgt-port",
        "0.2",
        "--init-src-port",
        "0.5",
    ]
    rounds += [
        "--batch-images",
        "8",
        "--crop-size",
        "128",
        "--base-lr",
        "0.005",
        "--exact-thresholds",
        *RUNTIME,
    ]
    for n in (1, 2):
        _run(n, "self-train", [*rounds, "--output", str(work / f"selftrain_{n}")])
    runs = [load_run(work / f"selftrain_{n}").rounds[0] for n in (1, 2)]
    same_png = _same_files(*(r.path / "pseudo_labelIds" for r in runs))
    same_lambda = runs[0].stats["thresholds"] == runs[1].stats["thresholds"]
    ok &= same_png and same_lambda
    for stage in ("pseudo", "train", "eval"):
        extra = {"identical_pngs": same_png, "identical_lambda": same_lambda} if stage == "pseudo" else {}
        if stage == "eval":
            extra = {"miou_1": runs[0].metrics.miou, "miou_2": runs[1].metrics.miou}
        _report(f"self-train {stage}", runs[0].seconds[stage], runs[1].seconds[stage], **extra)

    evaluate = [
        "--dataset",
        "cityscapes",
        "--data-root",
        str(data / "cityscapes"),
        "--test-flipping",
        *RUNTIME,
    ]
    evaluate += ["--checkpoint", str(work / "selftrain_1" / "round_0" / "model.pt"), "--overwrite"]
    seconds = [_run(n, "evaluate", [*evaluate, "--out", str(work / f"evaluate_{n}.json")]) for n in (1, 2)]
    metrics = [json.loads((work / f"evaluate_{n}.json").read_text()) for n in (1, 2)]
    ok &= metrics[0] == metrics[1]
    _report(
        "evaluate (command wall time)",
        *seconds,
        identical_metrics=metrics[0] == metrics[1],
        miou=metrics[0]["miou"],
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
