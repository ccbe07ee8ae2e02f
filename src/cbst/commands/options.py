"""Option helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import os


def float_list(text: str) -> tuple[float, ...]:
    """Parse 'a,b,c' into floats (e.g. --pseudo-scales 0.75,1.0,1.25)."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def float_range(text: str) -> tuple[float, float]:
    """Parse 'LO,HI' with 0 < LO <= HI (e.g. --scale-rate-range 0.7,1.3)."""
    values = float_list(str(text))
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 < LO <= HI, got {text!r}")
    return values[0], values[1]


def name_list(text: str) -> tuple[str, ...]:
    """Parse 'a,b' into names (e.g. --loggers jsonl,tensorboard); empty -> ()."""
    return tuple(name.strip() for name in str(text).split(",") if name.strip())


def add_loggers_argument(group: argparse._ActionsContainer) -> None:
    """--loggers (``args.loggers``), for the commands that train."""
    group.add_argument(
        "--loggers",
        type=name_list,
        default=("jsonl",),
        metavar="NAME[,NAME...]",
        help="where training scalars go: jsonl (OUT/log.jsonl), tensorboard, or a logger a "
        "module given with --import registers; '' for none (default: jsonl)",
    )


def default_num_workers(limit: int = 8) -> int:
    """Default data-loader worker processes: the usable CPU cores, at most ``limit``.

    Decoding in workers overlaps it with the forward pass even on 2 cores; beyond about 8
    workers a loader no longer speeds up one GPU and only costs memory. Under torchrun the
    cores are shared by the job's processes on this machine (``LOCAL_WORLD_SIZE``).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(limit, (cores or 1) // processes))


def add_compile_argument(group: argparse._ActionsContainer) -> None:
    """--compile (``args.compile``)."""
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (off by default: compilation repeats for "
        "every input size and train/eval mode and is not yet shown to pay "
        "for itself on an ordinary run)",
    )


def add_sync_bn_argument(group: argparse._ActionsContainer) -> None:
    """--sync-bn (``args.sync_bn``), for the commands that train."""
    group.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun on GPUs: batch-norm statistics over the global batch instead of "
        "each process's slice (SyncBatchNorm; for models whose batch norm trains, e.g. small)",
    )


RUNTIME_OPTIONS: tuple[str, ...] = ("device", "num_workers", "amp", "progress", "compile")
"""The runtime options, by destination name: where and how a command runs, never what it computes."""


def add_runtime_arguments(p: argparse.ArgumentParser, names: tuple[str, ...] = RUNTIME_OPTIONS) -> None:
    """The runtime options ``names`` (all by default): --device, --num-workers, --no-amp,
    --no-progress and --compile, read back as ``args.device``, ``args.num_workers``,
    ``args.amp``, ``args.progress`` and ``args.compile``."""
    g = p.add_argument_group("runtime")
    if "device" in names:
        g.add_argument(
            "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps"
        )
    if "num_workers" in names:
        g.add_argument(
            "--num-workers",
            type=int,
            default=default_num_workers(),
            help="data-loader worker processes; by default the usable CPU cores (divided among "
            "the processes of a torchrun job on this machine), at most 8",
        )
    if "amp" in names:
        g.add_argument(
            "--no-amp",
            dest="amp",
            action="store_false",
            help="float32 instead of bf16 autocast (used on CUDA and on CPUs with native bf16)",
        )
    if "progress" in names:
        g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    if "compile" in names:
        add_compile_argument(g)
