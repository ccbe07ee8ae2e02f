"""Score a segmentation model or a folder of predictions (mIoU, per-class IoU, pixel accuracy).

Give exactly one of --checkpoint or --predictions. With --checkpoint FILE the model runs over the
images as in the original's issegm/evaluate.py: --test-scales L resizes the longer side to L,
--test-flipping averages with the mirrored image, and --output DIR writes labelIds/ and color/
PNGs. With --predictions DIR, PNGs that already hold raw ids (Cityscapes labelIds) are scored;
they are found recursively by frame name, as the official cityscapesscripts evaluator finds them
(e.g. frankfurt_000000_000294*.png). IoU is TP/(TP+FP+FN) accumulated over the whole split, as in
the official evaluator; 16-class (SYNTHIA protocol) results also report mIoU* over the 13 common
classes. The result is printed as a Markdown row in the original README's format and, with --metrics
(or --out), saved as JSON (fractions, not percent). Example: cbst evaluate --dataset cityscapes --data-root
data/cityscapes --checkpoint cbst.pt --test-flipping --metrics results.json
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbst import __version__, options
from cbst.config import RuntimeSection
from cbst.errors import CLIError
from cbst.options import INTEGER, TEXT, Numbers, class_counts, option
from cbst.registry import DATASETS

HELP = "evaluate a checkpoint or a folder of labelId predictions (mIoU table, JSON)"


@options.declared
@dataclass
class EvaluateOptions:
    """The options of ``cbst evaluate``."""

    data_root: str = option(help="dataset root folder", metavar="DIR", path=True, section="data")
    dataset: str = option(
        "cityscapes",
        "dataset whose labels are the ground truth (the original's --dataset cityscapes / "
        "cityscapes16 / gta / synthia)",
        choices=DATASETS.names,
        section="data",
    )
    split: str = option("val", "split to evaluate (the original's --split)", section="data")
    list_file: str | None = option(
        None,
        "list file selecting the images (the original's data_list/*.lst); default: the split's images",
        flags="--list",
        type=TEXT,
        metavar="FILE",
        path=True,
        section="data",
    )
    num_classes: int | None = option(
        None,
        "19 (GTA5->Cityscapes) or 16 (SYNTHIA->Cityscapes, the original's cityscapes16); "
        "default: the checkpoint's, else the dataset's own (16 for synthia, 19 otherwise)",
        type=INTEGER,
        choices=class_counts,
        section="data",
    )
    checkpoint: str | None = option(
        None,
        "model to run (the original's --weights); give it or --predictions (default: none)",
        type=TEXT,
        metavar="FILE",
        path=True,
        section="what to score (exactly one)",
    )
    predictions: str | None = option(
        None,
        "folder of prediction PNGs holding raw ids (Cityscapes labelIds) (default: none)",
        type=TEXT,
        metavar="DIR",
        path=True,
        section="what to score (exactly one)",
    )
    test_scales: int | None = option(
        None,
        "resize so the longer side is L px, like the original's --test-scales (2048 for "
        "Cityscapes = keep size); default: keep the size",
        type=INTEGER,
        range="positive",
        metavar="L",
        section="inference (with --checkpoint)",
    )
    scales: tuple[float, ...] = option(
        (1.0,),
        "multi-scale factors applied after --test-scales, e.g. 0.75,1.0,1.25 (probabilities "
        "averaged; the original allows one scale only)",
        flags=("--scales", "--pseudo-scales"),
        type=Numbers(),
        section="inference (with --checkpoint)",
    )
    test_flipping: bool = option(
        False,
        "average with the horizontally flipped image (the original's flag)",
        flags=("--test-flipping", "--eval-flipping"),
        section="inference (with --checkpoint)",
    )
    window: int | None = option(
        None,
        "sliding-window inference with N-px tiles (1/3 overlap) when the longer side exceeds N; "
        "default: whole image at once",
        type=INTEGER,
        range="positive",
        metavar="N",
        section="inference (with --checkpoint)",
    )
    batch_images: int = option(
        1,
        "images per forward pass",
        flags=("--batch-images", "--batch-size"),
        range="positive",
        section="inference (with --checkpoint)",
    )
    output: str | None = option(
        None,
        "write labelIds/NAME.png (input for the official evaluator) and color/NAME.png (the "
        "original's --output); default: none",
        type=TEXT,
        metavar="DIR",
        path=True,
        section="output",
    )
    metrics: str | None = option(
        None,
        "write the metrics as JSON (default: none)",
        flags=("--metrics", "--out"),
        type=TEXT,
        metavar="FILE",
        path=True,
        section="output",
    )
    overwrite: bool = option(False, "replace an existing --metrics file", section="output")
    case: str | None = option(
        None,
        "row name in the table (default: the run and round of a checkpoint, e.g. cbst/round_2, "
        "else its file stem or the prediction folder's name)",
        type=TEXT,
        metavar="NAME",
        section="output",
    )
    device: str = RuntimeSection.device()
    num_workers: int = RuntimeSection.num_workers(0)
    amp: bool = RuntimeSection.amp()
    progress: bool = RuntimeSection.progress()
    compile: bool = RuntimeSection.compile()


OPTIONS = EvaluateOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``cbst evaluate``."""
    options.add_arguments(parser, OPTIONS)


def _check(o: EvaluateOptions) -> None:
    """Reject option combinations that make no sense and unusable outputs, before any loading."""
    from cbst.io import check_output_dir, check_output_file  # image libraries: only to run

    if (o.checkpoint is None) == (o.predictions is None):
        raise CLIError("give exactly one of --checkpoint FILE or --predictions DIR")
    if o.predictions and o.output:
        raise CLIError("--output writes model predictions; it needs --checkpoint")
    options.check_ranges(o)
    if o.metrics:
        check_output_file(
            o.metrics, overwrite=o.overwrite, option="--metrics (--out)", inputs=(o.checkpoint,)
        )
    if o.output:
        check_output_dir(o.output)


def _build_dataset(o: EvaluateOptions, num_classes: int) -> Any:
    """The labelled dataset to score against."""
    from cbst.datasets import build_dataset  # torch: only when the command runs, not for --help

    dataset = build_dataset(
        o.dataset,
        o.data_root,
        split=o.split,
        num_classes=num_classes,
        list_file=o.list_file,
        with_labels=True,
        progress=o.progress,
    )
    if len(dataset) == 0:
        raise CLIError(f"{o.data_root}: no images in split {o.split!r}")
    return dataset


def _evaluate_checkpoint(o: EvaluateOptions) -> tuple[Any, Any]:
    """Load the model, check its protocol against the dataset's and run it; (metrics, dataset)."""
    from cbst.checkpoints import load_checkpoint  # torch: only when the command runs
    from cbst.device import maybe_compile, select_device
    from cbst.evaluation import evaluate_model

    device = select_device(o.device)
    if o.num_classes is None:
        model, meta = load_checkpoint(o.checkpoint, device=device)
        dataset = _build_dataset(o, int(meta["num_classes"]))
        if meta.get("protocol") != dataset.protocol.name:
            raise CLIError(
                f"{o.checkpoint}: model was trained for label protocol "
                f"{meta.get('protocol')!r}, the dataset uses {dataset.protocol.name!r}"
            )
    else:
        dataset = _build_dataset(o, o.num_classes)
        model, meta = load_checkpoint(o.checkpoint, device=device, expect_protocol=dataset.protocol.name)
    metrics = evaluate_model(
        maybe_compile(model, o.compile),
        dataset,
        device=device,
        long_side=o.test_scales,
        scales=o.scales,
        flip=o.test_flipping,
        window=o.window,
        batch_size=o.batch_images,
        output_dir=o.output,
        num_workers=o.num_workers,
        progress=o.progress,
        amp=o.amp,
        mean=meta.get("mean"),
        std=meta.get("std"),
    )
    return metrics, dataset


def case_name(checkpoint: str | Path) -> str:
    """A checkpoint's row name: ``cbst/round_2`` for ``cbst/round_2/model.pt``, ``source/last``
    for ``source/last.pt``, else the file's stem (``cbst_sp_gta.pt`` -> ``cbst_sp_gta``)."""
    path = Path(checkpoint).resolve()
    if path.stem not in ("model", "last"):
        return path.stem
    if re.fullmatch(r"round_\d+", path.parent.name) and path.stem == "model":
        return f"{path.parent.parent.name}/{path.parent.name}"
    return f"{path.parent.name}/{path.stem}"


def _record(o: EvaluateOptions, case: str, dataset: Any, metrics: Any) -> dict:
    """The ``--out`` JSON: what was scored, how, with what, and the metrics."""
    from cbst.device import select_device
    from cbst.provenance import checkpoint_record, provenance

    record: dict[str, Any] = {
        "case": case,
        "dataset": o.dataset,
        "split": o.split,
        "protocol": dataset.protocol.name,
        "images": len(dataset),
    }
    if o.checkpoint:
        record["checkpoint"] = checkpoint_record(o.checkpoint)
        record["inference"] = {
            "test_scales": o.test_scales,
            "scales": list(o.scales),
            "flipping": bool(o.test_flipping),
            "window": o.window,
        }
        record["provenance"] = provenance(select_device(o.device), o.amp)
    else:
        record["predictions"] = str(Path(o.predictions).resolve())
        record["provenance"] = {"cbst": __version__}
    return {**record, **metrics.to_json()}


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the Markdown row and optionally save JSON."""
    from cbst.evaluation import evaluate_predictions, format_table  # torch: only to run
    from cbst.io import write_json
    from cbst.labels import default_class_count

    o = options.from_args(OPTIONS, args)
    _check(o)
    if o.checkpoint:
        metrics, dataset = _evaluate_checkpoint(o)
        case = o.case or case_name(o.checkpoint)
    else:
        dataset = _build_dataset(o, o.num_classes or default_class_count(o.dataset))
        metrics = evaluate_predictions(o.predictions, dataset, progress=o.progress)
        case = o.case or Path(o.predictions).resolve().name
    print(format_table({case: metrics}, dataset.protocol.class_names))
    if o.metrics:
        write_json(o.metrics, _record(o, case, dataset, metrics))
    return 0
