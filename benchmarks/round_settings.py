"""Try the demo's self-training settings on a selection split the demo never scores.

Usage: python benchmarks/round_settings.py --from DEMO_SEEDS [--seeds 0 1 2] [--methods ST,CBST]
       [--setting NAME=VALUE ...] [--out runs/round_settings]

``DEMO_SEEDS`` is a ``cbst demo --seeds`` folder: its ``seed_N/source/last.pt`` source models
and its benchmark (``data``, or each ``seed_N/data``) are reused, so only the rounds run (with
the ``DemoSettings`` overrides of ``--setting``, e.g. ``mine_port=0.5``, and without evaluating
each round). Each method's last
round and the source model are scored on the **selection split**: camera val images 100 to 399
of the same generator (image i depends only on the benchmark seed, the domain and i), which the
demo, scoring images 0 to 99, never sees. Choosing the rounds' settings there keeps the demo's
own val split a test split. Prints each row's mIoU and rare-class IoU per seed and its mIoU gain
over the source model (mean ± std over the seeds, and the mean over that std); appends the
summary to ``OUT/trials.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from cbst.checkpoints import load_checkpoint
from cbst.datasets import build_dataset
from cbst.demo import RARE_CLASSES, DemoSettings, benchmark_of, override_settings, variant_config
from cbst.device import select_device
from cbst.errors import ConfigError
from cbst.evaluation import Metrics, evaluate_model
from cbst.selftrain import self_train
from cbst.synthetic import make_synthetic

FIRST, LAST = 100, 400
"""The selection split: camera val images FIRST .. LAST - 1."""


def selection_split(out: Path, data: Path) -> Path:
    """A Cityscapes-layout root holding camera val images ``FIRST .. LAST - 1`` of the benchmark
    in ``data`` (links into a rendering of its first ``LAST`` val images, at its size)."""
    summary = json.loads((data / "synthetic.json").read_text())
    if summary["counts"]["val"] > FIRST:
        raise SystemExit(
            f"{data} holds {summary['counts']['val']} val images: they overlap the selection split"
        )
    rendered, root = out / "val_rendered", out / "selection"
    make_synthetic(
        rendered,
        seed=summary["seed"],
        num_source=0,
        num_train=0,
        num_val=LAST,
        size=tuple(summary["size"]),
        progress=False,
    )
    for kind, suffix in (("leftImg8bit", "leftImg8bit"), ("gtFine", "gtFine_labelIds")):
        for source in sorted((rendered / "cityscapes" / kind / "val").rglob(f"*_{suffix}.png"))[FIRST:]:
            link = root / "cityscapes" / source.relative_to(rendered / "cityscapes")
            if not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(source.resolve())
    return root / "cityscapes"


def score(checkpoint: Path, val, device) -> Metrics:
    model, _ = load_checkpoint(checkpoint, device=device)
    return evaluate_model(model, val, device=device, progress=False)


def run_trial(
    demo: Path, out: Path, seeds: list[int], methods: list[str], settings: DemoSettings, device: str
):
    """{(seed, row): Metrics on the selection split} for the source models and each method."""
    data_of = {s: benchmark_of(demo / f"seed_{s}") for s in seeds}
    for seed in seeds:
        for needed in (demo / f"seed_{seed}" / "source" / "last.pt", data_of[seed] / "synthetic.json"):
            if not needed.is_file():
                raise SystemExit(f"{needed}: not found; --from takes a finished cbst demo --seeds folder")
    val = build_dataset("cityscapes", selection_split(out, data_of[seeds[0]]), split="val", num_classes=19)
    torch_device = select_device(device)
    tag = "_".join(f"{k}-{v}" for k, v in sorted(changed(settings).items())) or "demo"
    found = {}
    for seed in seeds:
        source = demo / f"seed_{seed}" / "source" / "last.pt"
        found[(seed, "Source")] = score(source, val, torch_device)
        for name in methods:
            cfg = variant_config(
                name, out / tag / f"seed_{seed}", data_of[seed], source, seed, settings, device
            )
            cfg = dataclasses.replace(cfg, eval_split=None, progress=False)
            self_train(cfg)
            found[(seed, name)] = score(
                Path(cfg.output) / f"round_{settings.num_round - 1}" / "model.pt", val, torch_device
            )
            print(f"seed {seed} {name}: mIoU {100 * found[(seed, name)].miou:.1f}", flush=True)
    return found


def changed(settings: DemoSettings) -> dict:
    """The fields of ``settings`` that differ from the demo's."""
    base = DemoSettings(amp=settings.amp)
    return {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if getattr(settings, f.name) != getattr(base, f.name)
    }


def summary(found: dict, seeds: list[int], rows: list[str]) -> dict:
    """Per row: mIoU and rare-class IoU per seed (%), and the mIoU gain over Source (mean, std)."""
    out = {}
    for row in rows:
        miou = [100 * found[(s, row)].miou for s in seeds]
        rare = [100 * found[(s, row)].miou_over(RARE_CLASSES) for s in seeds]
        entry = {"miou": miou, "rare": rare}
        if row != "Source":
            gain = [m - 100 * found[(s, "Source")].miou for m, s in zip(miou, seeds)]
            entry.update(
                gain_mean=statistics.mean(gain), gain_std=statistics.stdev(gain) if len(gain) > 1 else 0.0
            )
        out[row] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="demo", type=Path, required=True, help="a cbst demo --seeds folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", default="ST,CBST", help="a comma list of the demo's rounds rows")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/round_settings"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    try:
        settings = override_settings(DemoSettings(amp=False), args.setting)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    methods = args.methods.split(",")
    found = run_trial(args.demo, args.out, args.seeds, methods, settings, args.device)
    table = summary(found, args.seeds, ["Source", *methods])
    print(f"settings {changed(settings) or 'the demo'}, selection split (camera val {FIRST}..{LAST - 1}):")
    for row, entry in table.items():
        line = f"  {row}: mIoU {statistics.mean(entry['miou']):.2f} ({', '.join(f'{v:.1f}' for v in entry['miou'])})"
        line += (
            f", rare {statistics.mean(entry['rare']):.2f} ({', '.join(f'{v:.1f}' for v in entry['rare'])})"
        )
        if "gain_mean" in entry:
            ratio = entry["gain_mean"] / entry["gain_std"] if entry["gain_std"] else float("nan")
            line += f"; gain {entry['gain_mean']:+.2f} ± {entry['gain_std']:.2f} ({ratio:.1f}x)"
        print(line)
    record = {"settings": changed(settings), "seeds": args.seeds, "rows": table}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "trials.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
