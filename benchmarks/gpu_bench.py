"""Throughput of training, the pseudo-label pass and evaluation on this machine, as JSON lines.

One line per measurement (printed, and appended to ``--out`` as soon as it is made):

- ``train``: ``train_epochs`` img/s at batch 8 on 512x1024 crops, for DeepLab-v2 ResNet-101 and
  ResNet-38, in three modes: ``fp32_strict`` (no TF32, no AMP), ``default`` (bf16 autocast,
  TF32, channels-last) and ``compile`` (the default plus ``torch.compile``). The first epoch
  warms up (cuDNN autotuning, compilation); the second is timed.
- ``pseudo_labels`` and ``evaluate``: img/s of the pseudo-label pass (thresholds and PNG writing
  included) and of ``evaluate_model``, on 2048x1024 frames with flip, DeepLab-v2.
- the transformer families (DAFormer MiT-B5, SegFormer MiT-B5, DINOv2 ViT-S/14 and ViT-L/14):
  ``train`` in the default mode at batch 2 and 8 on 512x512 and 1024x1024 crops, and the
  pseudo-label pass and evaluation as above. A shape that does not fit is a line with
  ``"error": "out of memory"``.
- ``online_step``: one online self-training iteration (:class:`cbst.online.OnlineStep`: the
  student's source step, the mean teacher labelling the target crops, ``cb`` selection,
  ClassMix and the strong augmentation, the student's mixed step, the optimiser and the EMA
  update) at batch 2 + 2 on 512x512 crops, for the small model, DeepLab-v2 and DAFormer MiT-B5,
  in the default mode (AdamW, bf16 autocast where supported). ``img_per_s`` counts source and
  target crops (4 per iteration), after two warm-up iterations; ``step_s`` is the mean time of one.

Each line carries the peak GPU memory of the measurement and the device's name. The data are
synthetic PNG frames in the Cityscapes layout, written to a temporary folder, so decoding costs
what it costs on real frames. ``--smoke`` runs everything tiny on the CPU (the small model,
256x128 frames, no compilation) in well under a minute; the test suite runs it, and runs
``--smoke --archs daformer_mit_b0,dinov2_vit_s14`` for the transformer measurements (``--archs``
replaces the transformer architectures measured; the smoke's online step is the small model's,
2 + 2 crops of 64x64).

Usage: ``python benchmarks/gpu_bench.py [--out results.jsonl] [--num-workers N] [--smoke] [--archs A,B]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cbst.datasets import build_dataset
from cbst.device import configure_backends, maybe_compile, select_device
from cbst.evaluation import evaluate_model
from cbst.labels import CITYSCAPES_19
from cbst.models import build_model
from cbst.online import OnlineConfig, build_step, lr_at
from cbst.training import stack_batch, train_epochs
from cbst.transforms import TrainTransform

try:  # the pass moves to its own module (issue 7); either place works
    from cbst.pseudo_labels import pseudo_label_pass
except ImportError:
    from cbst.selftrain import pseudo_label_pass

TRAIN_MODES = ("default", "compile", "fp32_strict")


@dataclass(frozen=True)
class Sizes:
    """What one run measures: models, frame and crop sizes, batch and image counts."""

    train_archs: tuple[str, ...]
    infer_arch: str
    frame_hw: tuple[int, int]
    crop_hw: tuple[int, int]
    batch: int
    train_iters: int
    infer_images: int
    modes: tuple[str, ...]
    transformer_archs: tuple[str, ...] = ()
    transformer_shapes: tuple[tuple[int, int], ...] = ()
    """(batch, square crop side) of each transformer training measurement."""
    online_archs: tuple[str, ...] = ()
    online_shape: tuple[int, int] = (2, 512)
    """(crops per domain, square crop side) of the online-step measurements."""
    online_steps: int = 10


FULL = Sizes(
    ("deeplabv2_resnet101", "resnet38"),
    "deeplabv2_resnet101",
    (1024, 2048),
    (512, 1024),
    8,
    6,
    16,
    TRAIN_MODES,
    ("daformer_mit_b5", "segformer_mit_b5", "dinov2_vit_s14", "dinov2_vit_l14"),
    ((2, 512), (8, 512), (2, 1024), (8, 1024)),
    ("small", "deeplabv2_resnet101", "daformer_mit_b5"),
)
SMOKE = Sizes(
    ("small",),
    "small",
    (128, 256),
    (64, 128),
    2,
    2,
    4,
    ("default", "fp32_strict"),
    (),
    ((2, 64),),
    ("small",),
    (2, 64),
    2,
)


def write_frames(root: Path, split: str, count: int, frame_hw: tuple[int, int], seed: int) -> None:
    """``count`` Cityscapes-layout frames: blocky labelId maps and their noisy colour images."""
    rng = np.random.default_rng(seed)
    h, w = frame_hw
    ids = CITYSCAPES_19.decode(np.arange(19))  # trainId -> labelId
    colours = rng.integers(0, 256, (19, 3), dtype=np.uint8)
    image_dir = root / "leftImg8bit" / split / "bench"
    label_dir = root / "gtFine" / split / "bench"
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        classes = rng.integers(0, 19, (max(1, h // 64), max(1, w // 64)))
        train_ids = cv2.resize(classes.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        noise = rng.normal(0, 12, (h, w, 3))
        image = np.clip(colours[train_ids] + noise, 0, 255).astype(np.uint8)
        name = f"bench_{i:06d}_000019"
        cv2.imwrite(str(image_dir / f"{name}_leftImg8bit.png"), image[:, :, ::-1])
        cv2.imwrite(str(label_dir / f"{name}_gtFine_labelIds.png"), ids[train_ids])


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's (with the number of torch threads)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
        if line.startswith("model name")
    ]
    return f"{names[0] if names else platform.machine()}, {torch.get_num_threads()} threads"


@contextlib.contextmanager
def peak_memory(device: torch.device, record: dict) -> Iterator[None]:
    """Store the peak GPU memory (GiB) allocated inside the block in ``record``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        record["peak_mem_gib"] = None


def set_strict_fp32(device: torch.device, strict: bool) -> None:
    """TF32 off (``strict``) or the project's defaults back on."""
    configure_backends(device)
    if strict and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def measure_training(
    arch: str, mode: str, data: Any, batch: int, device: torch.device, num_workers: int
) -> dict:
    """img/s of the second of two epochs of ``train_epochs`` (``data`` yields the crops)."""
    set_strict_fp32(device, mode == "fp32_strict")
    torch.manual_seed(0)
    model = build_model(arch, 19).to(device)
    net = maybe_compile(model, mode == "compile")
    seconds: list[float] = []
    record: dict[str, Any] = {
        "measure": "train",
        "arch": arch,
        "mode": mode,
        "batch": batch,
        "crop": list(data[0]["image"].shape[-2:]),
    }
    with peak_memory(device, record):
        train_epochs(
            net,
            data,
            epochs=2,
            batch_size=batch,
            base_lr=1e-4,
            device=device,
            num_workers=num_workers,
            amp=mode != "fp32_strict",
            progress=False,
            on_epoch_end=lambda epoch, stats: seconds.append(stats["seconds"]),
        )
    record["img_per_s"] = round(len(data) // batch * batch / seconds[-1], 2)
    return record


def measure_inference(
    kind: str, arch: str, target: Any, out_dir: Path, device: torch.device, num_workers: int
) -> dict:
    """img/s of one pseudo-label pass or one evaluation over ``target`` with flip."""
    set_strict_fp32(device, False)
    torch.manual_seed(0)
    model = build_model(arch, 19).to(device).eval()
    run: Callable[[], Any]
    if kind == "pseudo_labels":

        def run() -> Any:
            return pseudo_label_pass(
                model, target, out_dir, portion=0.2, flip=True, num_workers=num_workers, progress=False
            )
    else:

        def run() -> Any:
            return evaluate_model(
                model, target, device=device, flip=True, num_workers=num_workers, progress=False
            )

    record: dict[str, Any] = {
        "measure": kind,
        "arch": arch,
        "flip": True,
        "frame": list(target[0]["image"].shape[:2]),
    }
    run()  # warm-up: cuDNN autotuning, worker start-up, page cache
    with peak_memory(device, record):
        start = time.perf_counter()
        run()
        record["img_per_s"] = round(len(target) / (time.perf_counter() - start), 2)
    return record


def online_batches(train: Any, batch: int, side: int, count: int) -> list[dict]:
    """``count`` online batches of ``batch`` source and ``batch`` target crops (random crops of the
    frames, the targets with their crop geometry), as :class:`cbst.online.OnlinePairs` gives them."""
    crops = train.with_transform(TrainTransform((side, side), scale_range=(1.0, 1.0), seed=0))
    batches = []
    for k in range(count):
        src = [crops[(2 * k * batch + i) % len(crops)] for i in range(batch)]
        tgt = [crops[((2 * k + 1) * batch + i) % len(crops)] for i in range(batch)]
        batches.append(
            stack_batch(
                [
                    {
                        "src_image": s["image"],
                        "src_label": s["label"],
                        "tgt_image": t["image"],
                        "tgt_label": t["label"],
                        "tgt_geometry": t["geometry"],
                    }
                    for s, t in zip(src, tgt)
                ]
            )
        )
    return batches


def measure_online_step(arch: str, batches: list[dict], steps: int, device: torch.device) -> dict:
    """img/s (source + target crops) of ``steps`` online iterations after two warm-up ones."""
    set_strict_fp32(device, False)
    torch.manual_seed(0)
    batch, side = batches[0]["src_image"].shape[0], batches[0]["src_image"].shape[-1]
    cfg = OnlineConfig("-", "-", "-", "-", batch_images=batch, crop_size=side, kc_policy="cb")
    step = build_step(cfg, build_model(arch, 19).to(device), device)
    record: dict[str, Any] = {
        "measure": "online_step",
        "arch": arch,
        "batch": [batch, batch],
        "crop": [side, side],
    }

    def run(first: int, count: int) -> None:
        for it in range(first, first + count):
            step(batches[it % len(batches)], it, lr_at(cfg, it), seed=it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(0, 2)  # warm-up: cuDNN autotuning, allocator, the selector's histograms
    with peak_memory(device, record):
        start = time.perf_counter()
        run(2, steps)
        seconds = time.perf_counter() - start
    record["step_s"] = round(seconds / steps, 4)
    record["img_per_s"] = round(2 * batch * steps / seconds, 2)
    return record


def emit(record: dict, device: torch.device, out: Path | None) -> None:
    """Print one JSON line (and append it to ``out``), with the device and torch version."""
    line = json.dumps({**record, "device": device_name(device), "torch": torch.__version__})
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as fh:
            fh.write(line + "\n")


def guarded(label: dict, measure: Callable[..., dict], *args: Any) -> dict:
    """``measure(*args)``, or ``label`` with the error when the device runs out of memory."""
    try:
        return measure(*args)
    except torch.cuda.OutOfMemoryError:
        return {**label, "error": "out of memory"}


def run_all(sizes: Sizes, device: torch.device, num_workers: int, out: Path | None, root: Path) -> None:
    """Write the frames, then make and emit every measurement (DeepLab-v2's first, then the
    transformers')."""
    most = max([sizes.batch, 2 * sizes.online_shape[0], *(batch for batch, _ in sizes.transformer_shapes)])
    write_frames(root, "train", sizes.train_iters * most, sizes.frame_hw, seed=0)
    write_frames(root, "val", sizes.infer_images, sizes.frame_hw, seed=1)
    frames = build_dataset("cityscapes", root, split="val", num_classes=19)
    train = build_dataset("cityscapes", root, split="train", num_classes=19)

    def crops(crop_hw: tuple[int, int], batch: int) -> Any:
        """``train_iters`` batches of random crops."""
        return train.subset(range(sizes.train_iters * batch)).with_transform(
            TrainTransform(crop_hw, scale_range=(0.7, 1.3), seed=0)
        )

    _inference(sizes.infer_arch, frames, root, device, num_workers, out)
    for arch in sizes.train_archs:
        for mode in sizes.modes:
            label = {"measure": "train", "arch": arch, "mode": mode}
            data = crops(sizes.crop_hw, sizes.batch)
            emit(
                guarded(label, measure_training, arch, mode, data, sizes.batch, device, num_workers),
                device,
                out,
            )
            free_cache(device)
    for arch in sizes.transformer_archs:
        _inference(arch, frames, root, device, num_workers, out)
        for batch, side in sizes.transformer_shapes:
            label = {
                "measure": "train",
                "arch": arch,
                "mode": "default",
                "batch": batch,
                "crop": [side, side],
            }
            data = crops((side, side), batch)
            emit(
                guarded(label, measure_training, arch, "default", data, batch, device, num_workers),
                device,
                out,
            )
            free_cache(device)
    batch, side = sizes.online_shape
    batches = online_batches(train, batch, side, 4)
    for arch in sizes.online_archs:
        label = {"measure": "online_step", "arch": arch, "batch": [batch, batch], "crop": [side, side]}
        emit(guarded(label, measure_online_step, arch, batches, sizes.online_steps, device), device, out)
        free_cache(device)


def _inference(
    arch: str, frames: Any, root: Path, device: torch.device, num_workers: int, out: Path | None
) -> None:
    """Emit the pseudo-label pass's and the evaluation's measurements of ``arch``."""
    for kind in ("pseudo_labels", "evaluate"):
        label = {"measure": kind, "arch": arch}
        emit(
            guarded(label, measure_inference, kind, arch, frames, root / kind, device, num_workers),
            device,
            out,
        )
        free_cache(device)


def free_cache(device: torch.device) -> None:
    """Return cached GPU memory between measurements, so each peak is its own."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    """Parse the options and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, the small model, on the CPU (a test of this script)"
    )
    parser.add_argument("--device", default="auto", help="auto, cuda, cpu, ...")
    parser.add_argument(
        "--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loader worker processes"
    )
    parser.add_argument("--out", type=Path, help="append the JSON lines to this file too")
    parser.add_argument(
        "--archs",
        type=lambda text: tuple(name for name in text.split(",") if name),
        default=None,
        help="comma list of transformer architectures to measure instead of the default ones",
    )
    args = parser.parse_args(argv)
    device = select_device("cpu" if args.smoke else args.device)
    workers = 0 if args.smoke else args.num_workers
    if args.smoke:
        torch.set_num_threads(1)  # quick and steady on a busy machine, whatever its cores
    with tempfile.TemporaryDirectory(prefix="cbst-gpu-bench-") as tmp:
        sizes = SMOKE if args.smoke else FULL
        if args.archs is not None:
            sizes = dataclasses.replace(sizes, transformer_archs=args.archs)
        run_all(sizes, device, workers, args.out, Path(tmp))


if __name__ == "__main__":
    main()
