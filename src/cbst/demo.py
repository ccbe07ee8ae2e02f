"""``cbst demo``: the whole method on the embedded synthetic benchmark, on a laptop CPU.

Renders the benchmark (once), trains the small model on the "game" source domain, then runs
ST, CBST and CBST-SP for three rounds each, all branching from the same source model, and
prints the original README's table for the "camera" target domain's val split, and writes
``report.html`` (``cbst report``) beside it.

The benchmark itself is fixed (rendered with seed 0) so that ``--seed`` varies only the
training: the spread over seeds is then the method's own variance. Each variant is reported
by its **last** round, not its best one: picking the best round on the val split would be
model selection on the test set (docs/method.md §8.4).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cbst import io
from cbst.checkpoints import load_checkpoint
from cbst.datasets import build_dataset
from cbst.device import select_device
from cbst.errors import ConfigError
from cbst.evaluation import Metrics, evaluate_model, format_table
from cbst.inference import predict_labels
from cbst.labels import CITYSCAPES_19
from cbst.registry import METHODS
from cbst.report import write_report
from cbst.selftrain import SelfTrainConfig, self_train
from cbst.sourcetrain import SourceTrainConfig, last_finished_epoch, train_source
from cbst.synthetic import SYNTHETIC_VERSION, make_synthetic

BENCHMARK_SEED = 0
RARE_CLASSES = ("pole", "traffic light", "traffic sign", "rider", "motorcycle", "bicycle")
DEFAULT_METHODS = ("ST", "CBST", "CBST-SP")
"""The rows ``cbst demo`` runs unless ``--methods`` asks for others (CRST's stay off: time)."""


@dataclass(frozen=True)
class DemoSettings:
    """The demo's benchmark size and training budget, sized for minutes on 2 CPU cores."""

    num_source: int = 400
    num_train: int = 200
    num_val: int = 100
    source_epochs: int = 40
    source_lr: float = 0.05
    batch_images: int = 8
    crop_size: int = 128
    num_round: int = 3
    epoch_per_round: int = 1
    round_lr: float = 0.005
    init_tgt_port: float = 0.2
    init_src_port: float = 0.5
    step_src_port: float = 0.05
    max_src_port: float = 0.6
    mine_port: float = 0.8
    pseudo_batch: int = 8  # labels identical to batches of 1 on the CPU measured; ~40 % faster


def parse_methods(text: str) -> tuple[str, ...]:
    """The self-training rows named by ``--methods``: a comma list of registered methods
    (:data:`cbst.registry.METHODS`) or ``all``."""
    names = METHODS.names()
    methods = names if text.strip() == "all" else tuple(m.strip() for m in text.split(","))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(
            f"--methods: unknown method(s) {', '.join(unknown)!r}; give a comma list of "
            f"{', '.join(names)}, or all"
        )
    return methods


def _stage(step: int, total: int, text: str) -> None:
    """Announce one of the demo's stages."""
    print(f"[{step}/{total}] {text}", flush=True)


def _loader_workers(device: str) -> int:
    """Training loader processes: 4 on a GPU, 0 on the CPU (crops do not depend on the count).

    Decoding in the main process would starve a GPU; on the CPU the network keeps every core busy.
    """
    return min(4, os.cpu_count() or 1) if select_device(device).type == "cuda" else 0


def source_config(
    output: Path, source_root: Path, seed: int, s: DemoSettings, device: str, list_file: Path | None = None
):
    """The demo's source-only training run: the small model on the game domain.

    ``list_file`` restricts training to listed images (the calibration benchmark holds some out).
    """
    return SourceTrainConfig(
        dataset="gta5",
        data_root=str(source_root),
        list_file=None if list_file is None else str(list_file),
        output=str(output),
        model="small",
        batch_images=s.batch_images,
        crop_size=s.crop_size,
        scale_range=(0.75, 1.25),
        lr_type="poly",
        base_lr=s.source_lr,
        to_epoch=s.source_epochs,
        seed=seed,
        device=device,
        num_workers=_loader_workers(device),
    )


def train_or_reuse(config) -> Path:
    """Run (or finish) the source training ``config``; returns its last checkpoint."""
    finished = last_finished_epoch(Path(config.output))
    if finished < config.to_epoch:
        train_source(dataclasses.replace(config, resume=finished > 0))
    return Path(config.output) / "last.pt"


def _variant_config(name: str, out: Path, data: Path, weights: Path, seed: int, s: DemoSettings, device: str):
    """The self-training configuration of one row of the table."""
    run_dir = out / name.lower().replace("-", "_")
    return SelfTrainConfig(
        weights=str(weights),
        output=str(run_dir),
        dataset="gta5",
        data_root=str(data / "gta5"),
        dataset_tgt="cityscapes",
        data_root_tgt=str(data / "cityscapes"),
        split_tgt="train",
        eval_split="val",
        num_classes=19,
        num_round=s.num_round,
        init_tgt_port=s.init_tgt_port,
        init_src_port=s.init_src_port,
        step_src_port=s.step_src_port,
        max_src_port=s.max_src_port,
        epoch_per_round=s.epoch_per_round,
        pseudo_batch=s.pseudo_batch,
        base_lr=s.round_lr,
        seed=seed,
        batch_images=s.batch_images,
        crop_size=s.crop_size,
        scale_rate_range=(0.75, 1.25),
        mine_port=s.mine_port,
        device=device,
        num_workers=_loader_workers(device),
        resume=(run_dir / "state.json").is_file(),
        score_pseudo_labels=True,
        **METHODS.get(name).options,
    )


def _write_examples(
    out: Path, checkpoints: dict[str, Path], val, device: torch.device, count: int = 3
) -> None:
    """Per val image: the image, its ground truth, then each row's prediction, stacked vertically."""
    samples = [val[i] for i in range(min(count, len(val)))]
    panels = [[s["image"], val.protocol.colorize(s["label"])] for s in samples]
    for ckpt in checkpoints.values():
        model, _ = load_checkpoint(ckpt, device=device)
        for sample, column in zip(samples, panels):
            image = torch.as_tensor(sample["image"]).permute(2, 0, 1)[None].to(device)
            column.append(val.protocol.colorize(predict_labels(model, image)[0].cpu().numpy()))
    for sample, column in zip(samples, panels):
        io.write_png(out / "examples" / f"{sample['name']}.png", np.concatenate(column, axis=0))


def run_demo(
    out: str | Path,
    seed: int = 0,
    *,
    device: str = "auto",
    settings: DemoSettings = DemoSettings(),
    methods: tuple[str, ...] = DEFAULT_METHODS,
) -> dict:
    """Run the demo into ``out``; returns the results written to ``out/results.json``.

    ``methods`` names the self-training rows (methods of :data:`cbst.registry.METHODS`), in
    table order.
    """
    total = 2 + len(parse_methods(",".join(methods)))

    started = time.time()
    out = Path(out)
    data = out / "data"
    _stage(1, total, f"embedded benchmark (version {SYNTHETIC_VERSION}, seed {BENCHMARK_SEED}) in {data}")
    make_synthetic(
        data,
        seed=BENCHMARK_SEED,
        num_source=settings.num_source,
        num_train=settings.num_train,
        num_val=settings.num_val,
    )
    torch_device = select_device(device)
    _stage(2, total, f"source-only small model, {settings.source_epochs} epochs on the game domain")
    source_ckpt = train_or_reuse(source_config(out / "source", data / "gta5", seed, settings, device))
    val = build_dataset("cityscapes", data / "cityscapes", split="val", num_classes=19)
    model, _ = load_checkpoint(source_ckpt, device=torch_device)
    rows = {"Source": evaluate_model(model, val, device=torch_device, progress=False)}
    checkpoints = {"Source": source_ckpt}

    for step, name in enumerate(methods, start=3):
        _stage(step, total, f"{name}: {settings.num_round} rounds from the source model")
        cfg = _variant_config(name, out, data, source_ckpt, seed, settings, device)
        results = self_train(cfg)
        last = max(results)
        rows[name] = Metrics.from_json(results[last])
        checkpoints[name] = Path(cfg.output) / f"round_{last}" / "model.pt"

    table = format_table(rows, CITYSCAPES_19.class_names)
    seconds = round(time.time() - started, 1)
    result = {
        "rows": {name: m.to_json() for name, m in rows.items()},
        "rare_classes": list(RARE_CLASSES),
        "rare_miou": {name: m.miou_over(RARE_CLASSES) for name, m in rows.items()},
        "seed": seed,
        "benchmark_seed": BENCHMARK_SEED,
        "settings": dataclasses.asdict(settings),
        "device": str(torch_device),
        "seconds": seconds,
    }
    io.write_json(out / "results.json", result)
    io.write_text(out / "results.md", table + "\n")
    _write_examples(out, checkpoints, val, torch_device)

    write_report([out], out / "report.html", device=device)
    return result
