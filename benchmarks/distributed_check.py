"""Two processes under torchrun against one, on the demo's data (issue 8's check, outside the suite).

Renders the demo's benchmark into ``--work`` (or reuses it), then runs each command once as a
plain process and once as ``torchrun --standalone --nproc-per-node 2 -m cbst ...`` on the CPU
(``--device cuda``: on two GPUs).
Each process has one thread, as torchrun sets (``--threads`` for the single process): the speed-up
is then that of one more worker of the same size, as one more GPU would be, and the results can be
compared bit for bit (on the CPU a convolution's last bits may depend on its thread count):

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
QUIET = ["--num-workers", "0", "--no-progress"]


def _run(processes: int, command: str, args: list[str], threads: int = 1) -> float:
    """Run ``cbst COMMAND ARGS`` in one process or two under torchrun; its wall seconds."""
    launcher = TORCHRUN if processes == 2 else ()
    output = args[args.index("--output") + 1] if "--output" in args else None
    if output:
        shutil.rmtree(output, ignore_errors=True)  # a fresh run each time
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    }
    env["OMP_NUM_THREADS"] = "1" if processes == 2 else str(threads)
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


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def _train_source(work: Path, data: Path, runtime: list[str], threads: int, epochs: int) -> None:
    """Source training of the small model; its checkpoint from one process is used below."""
    args = ["--dataset", "gta5", "--data-root", str(data / "gta5"), "--to-epoch", str(epochs)]
    args += "--model small --batch-images 8 --crop-size 128 --base-lr 0.05".split() + runtime
    for n in (1, 2):
        _run(n, "train-source", [*args, "--output", str(work / f"source_{n}")], threads)
    logs = [(work / f"source_{n}" / "log.jsonl").read_text().splitlines() for n in (1, 2)]
    seconds = [sum(json.loads(line)["seconds"] for line in log) for log in logs]
    losses = {f"loss_{n}": json.loads(log[-1])["loss"] for n, log in zip((1, 2), logs)}
    _report("train-source epochs", *seconds, **losses)


def _self_train(work: Path, data: Path, runtime: list[str], threads: int) -> bool:
    """Round 0 with exact thresholds; whether the pseudo-labels and λ are identical."""
    from cbst.report.runs import load_run

    args = ["--data-root", str(data / "gta5"), "--data-root-tgt", str(data / "cityscapes")]
    args += ["--weights", str(work / "source_1" / "last.pt"), *runtime]
    args += "--num-round 1 --epoch-per-round 1 --init-tgt-port 0.2 --init-src-port 0.5".split()
    args += "--batch-images 8 --crop-size 128 --base-lr 0.005 --exact-thresholds".split()
    for n in (1, 2):
        _run(n, "self-train", [*args, "--output", str(work / f"selftrain_{n}")], threads)
    one, two = (load_run(work / f"selftrain_{n}").rounds[0] for n in (1, 2))
    same = {
        "identical_pngs": _same_files(one.path / "pseudo_labelIds", two.path / "pseudo_labelIds"),
        "identical_lambda": one.stats["thresholds"] == two.stats["thresholds"],
    }
    _report("self-train pseudo", one.seconds["pseudo"], two.seconds["pseudo"], **same)
    _report("self-train train", one.seconds["train"], two.seconds["train"])
    miou = {"miou_1": one.metrics.miou, "miou_2": two.metrics.miou}
    _report("self-train eval", one.seconds["eval"], two.seconds["eval"], **miou)
    return all(same.values())


def _evaluate(work: Path, data: Path, runtime: list[str], threads: int) -> bool:
    """Evaluation of the round-0 model with flipping; whether the metrics are identical."""
    args = ["--dataset", "cityscapes", "--data-root", str(data / "cityscapes"), "--test-flipping"]
    args += ["--checkpoint", str(work / "selftrain_1" / "round_0" / "model.pt"), "--overwrite", *runtime]
    outs = [work / f"evaluate_{n}.json" for n in (1, 2)]
    seconds = [_run(n, "evaluate", [*args, "--out", str(out)], threads) for n, out in zip((1, 2), outs)]
    one, two = (json.loads(out.read_text()) for out in outs)
    _report("evaluate (command wall time)", *seconds, identical_metrics=one == two, miou=one["miou"])
    return one == two


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("distributed-check"), help="working folder")
    parser.add_argument("--num-source", type=int, default=400)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1, help="source-training epochs")
    parser.add_argument("--threads", type=int, default=1, help="threads of the single process")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for one GPU per process (needs 2)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from cbst.synthetic import make_synthetic

    work = args.work.resolve()
    data = work / "data"
    make_synthetic(data, seed=0, num_source=args.num_source, num_train=args.num_train, num_val=args.num_val)
    runtime = ["--device", args.device, *QUIET]
    _train_source(work, data, runtime, args.threads, args.epochs)
    exact = _self_train(work, data, runtime, args.threads)
    exact &= _evaluate(work, data, runtime, args.threads)
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
