"""Calibrate the embedded benchmark on the source domain alone: train the demo's source-only
model and print its per-class IoU on held-out game images (and on the camera val split).

Usage: python benchmarks/source_calibration.py [--out runs/calibration] [--held-out 200]
       [--weights CKPT] [--seed 0] [--setting NAME=VALUE ...] [--emulate-bf16]

The benchmark is rendered with the demo's benchmark seed and ``--held-out`` extra source images:
image ``i`` depends only on (seed, domain, i), so the first ``num_source`` images are exactly the
demo's training set and the extra ones are unseen game scenes. No adaptation method runs here:
this is how the benchmark's rendering parameters are chosen (docs/synthetic_benchmark.md), and
how the demo's network and source budget (``DemoSettings``) are checked: the source model must
learn the rare classes on unseen game images (docs/results.md). ``--weights`` scores an existing
checkpoint instead of training one, e.g. a ``cbst demo`` folder's ``source/last.pt``: the demo
trains on the same first ``num_source`` images, so the held-out ones are unseen by it too.
200 held-out images hold enough riders and two-wheelers that a class's IoU moves by a few points
between renderings, not by ten as on 50. ``--emulate-bf16`` trains and scores in bf16 on a CPU
without native bf16 (``bf16_emulation.py``); ``calibration.json`` records the precision and machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from cbst import io
from cbst.checkpoints import load_checkpoint
from cbst.datasets import build_dataset
from cbst.demo import (
    BENCHMARK_SEED,
    RARE_CLASSES,
    DemoSettings,
    override_settings,
    source_config,
    train_or_reuse,
)
from cbst.device import select_device
from cbst.errors import CbstError, ConfigError
from cbst.evaluation import Metrics, evaluate_model, format_table
from cbst.labels import CITYSCAPES_19
from cbst.provenance import provenance
from cbst.synthetic import SYNTHETIC_VERSION, make_synthetic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bf16_emulation import check_emulation, emulated_bf16  # noqa: E402


def _write_list(path: Path, names: list[str]) -> Path:
    """An original-format GTA5 list file (``images/N.png<TAB>labels/N.png``) of ``names``."""
    io.write_text(path, "".join(f"images/{n}\tlabels/{n}\n" for n in names))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/calibration")
    parser.add_argument(
        "--held-out", type=int, default=200, help="unseen game images to score on (default: %(default)s)"
    )
    parser.add_argument("--weights", help="score this checkpoint instead of training the source model")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one DemoSettings field (e.g. source_epochs=20), to try a budget before changing the demo",
    )
    parser.add_argument(
        "--emulate-bf16",
        action="store_true",
        help="train and score in bf16 on a CPU without native bf16 (benchmarks/bf16_emulation.py)",
    )
    args = parser.parse_args()
    try:
        if args.held_out < 1:
            raise ConfigError(f"--held-out {args.held_out}: must be at least 1")
        if args.weights and not Path(args.weights).is_file():  # before rendering the benchmark
            raise ConfigError(f"--weights {args.weights}: checkpoint not found")
        settings = override_settings(DemoSettings(), args.setting)
        if args.emulate_bf16:
            check_emulation(args.device, settings.amp)
        with emulated_bf16() if args.emulate_bf16 else contextlib.nullcontext():
            calibrate(args, settings)
    except CbstError as exc:  # a user error (bad option, missing checkpoint): one line and status 2
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def calibrate(args: argparse.Namespace, settings: DemoSettings) -> None:
    """Train (or load ``--weights``) the source model, score it on both splits, write the JSON."""
    out, data = Path(args.out), Path(args.out) / "data"
    make_synthetic(
        data,
        seed=BENCHMARK_SEED,
        num_source=settings.num_source + args.held_out,
        num_train=0,
        num_val=settings.num_val,
    )
    names = sorted(p.name for p in (data / "gta5" / "images").glob("*.png"))
    train_list = _write_list(out / "train.txt", names[: settings.num_source])
    held_list = _write_list(out / "held_out.txt", names[settings.num_source :])
    if args.weights:
        weights = Path(args.weights)
    else:
        config = source_config(out / "source", data / "gta5", args.seed, settings, args.device, train_list)
        weights = train_or_reuse(config)
    device = select_device(args.device)
    model, _ = load_checkpoint(weights, device=device)
    splits = {
        "game held-out": build_dataset("gta5", data / "gta5", list_file=held_list, num_classes=19),
        "camera val": build_dataset("cityscapes", data / "cityscapes", split="val", num_classes=19),
    }
    rows: dict[str, Metrics] = {
        name: evaluate_model(model, dataset, device=device, progress=False)
        for name, dataset in splits.items()
    }
    print(f"benchmark {SYNTHETIC_VERSION}, weights {weights}, settings {dataclasses.asdict(settings)}")
    print(format_table(rows, CITYSCAPES_19.class_names))
    summary: dict[str, object] = {
        name: {"miou": m.miou, "rare": m.miou_over(RARE_CLASSES), "iou": m.to_json()}
        for name, m in rows.items()
    }
    for name, row in summary.items():
        print(f"{name}: mIoU {100 * row['miou']:.1f}, rare-class mean {100 * row['rare']:.1f}")
    summary["provenance"] = provenance(device, settings.amp)
    io.write_text(out / "calibration.json", json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
