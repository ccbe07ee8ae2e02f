"""Score a segmentation model or a folder of predictions (mIoU, per-class IoU, pixel accuracy).

Give exactly one of --checkpoint or --predictions. With --checkpoint FILE the model runs over the
images as in the original's issegm/evaluate.py: --test-scales L resizes the longer side to L,
--test-flipping averages with the mirrored image, and --output DIR writes labelIds/ and color/
PNGs. With --predictions DIR, PNGs that already hold raw ids (Cityscapes labelIds) are scored;
they are found recursively by frame name, as the official cityscapesscripts evaluator finds them
(e.g. frankfurt_000000_000294*.png). IoU is TP/(TP+FP+FN) accumulated over the whole split, as in
the official evaluator; 16-class (SYNTHIA protocol) results also report mIoU* over the 13 common
classes. The result is printed as a Markdown row in the original README's format and, with --out,
saved as JSON (fractions, not percent). Example: cbst evaluate --dataset cityscapes --data-root
data/cityscapes --checkpoint cbst.pt --test-flipping --out results.json
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from cbst import __version__
from cbst.cli import CLIError
from cbst.commands.options import add_runtime_arguments, float_list
from cbst.datasets import DATASETS

HELP = "evaluate a checkpoint or a folder of labelId predictions (mIoU table, JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``cbst evaluate``."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=DATASETS,
        default="cityscapes",
        help="dataset whose labels are the ground truth "
        "(the original's --dataset cityscapes / cityscapes16 / gta / synthia)",
    )
    data.add_argument("--data-root", required=True, metavar="DIR", help="dataset root folder")
    data.add_argument("--split", default="val", help="split to evaluate (the original's --split)")
    data.add_argument(
        "--list",
        dest="list_file",
        metavar="FILE",
        help="list file selecting the images (the original's data_list/*.lst)",
    )
    data.add_argument(
        "--num-classes",
        type=int,
        choices=(19, 16),
        default=None,
        help="19 (GTA5->Cityscapes) or 16 (SYNTHIA->Cityscapes, the original's "
        "cityscapes16); default: the checkpoint's, else 16 for synthia, 19 otherwise",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="FILE", help="model to run (the original's --weights)")
    source.add_argument(
        "--predictions", metavar="DIR", help="folder of prediction PNGs holding raw ids (Cityscapes labelIds)"
    )
    model = parser.add_argument_group("inference (with --checkpoint)")
    model.add_argument(
        "--test-scales",
        type=int,
        default=None,
        metavar="L",
        help="resize so the longer side is L px, like the original's --test-scales "
        "(2048 for Cityscapes = keep size); default: keep the size",
    )
    model.add_argument(
        "--scales",
        type=float_list,
        default=(1.0,),
        metavar="F[,F...]",
        help="multi-scale factors applied after --test-scales, e.g. 0.75,1.0,1.25 "
        "(probabilities averaged; the original allows one scale only)",
    )
    model.add_argument(
        "--test-flipping",
        action="store_true",
        help="average with the horizontally flipped image (the original's flag)",
    )
    model.add_argument(
        "--window",
        type=int,
        default=None,
        metavar="N",
        help="sliding-window inference with N-px tiles (1/3 overlap) when the "
        "longer side exceeds N; default: whole image at once",
    )
    model.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output",
        metavar="DIR",
        help="write labelIds/NAME.png (input for the official evaluator) and "
        "color/NAME.png (the original's --output)",
    )
    out.add_argument("--out", metavar="FILE", help="write the metrics as JSON")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    out.add_argument(
        "--case",
        metavar="NAME",
        help="row name in the table (default: the run and round of a checkpoint, e.g. cbst/round_2, "
        "else its file stem or the prediction folder's name)",
    )
    add_runtime_arguments(parser, ("device", "num_workers", "amp", "progress", "compile"))


def _check_args(args: argparse.Namespace) -> None:
    """Reject option combinations that make no sense and unusable outputs, before any loading."""
    from cbst.io import check_output_dir, check_output_file

    if args.predictions and args.output:
        raise CLIError("--output writes model predictions; it needs --checkpoint")
    if args.out:
        check_output_file(args.out, overwrite=args.overwrite, inputs=(args.checkpoint,))
    if args.output:
        check_output_dir(args.output)
    for flag, value in (
        ("--test-scales", args.test_scales),
        ("--window", args.window),
        ("--batch-size", args.batch_size),
    ):
        if value is not None and value <= 0:
            raise CLIError(f"{flag} must be positive, got {value}")
    if args.num_workers < 0:
        raise CLIError(f"--num-workers must be >= 0, got {args.num_workers}")


def _build_dataset(args: argparse.Namespace, num_classes: int) -> Any:
    """The labelled dataset to score against."""
    from cbst.datasets import build_dataset

    dataset = build_dataset(
        args.dataset,
        args.data_root,
        split=args.split,
        num_classes=num_classes,
        list_file=args.list_file,
        with_labels=True,
    )
    if len(dataset) == 0:
        raise CLIError(f"{args.data_root}: no images in split {args.split!r}")
    return dataset


def _default_num_classes(dataset: str) -> int:
    """16 for SYNTHIA (its only protocol), 19 for everything else."""
    return 16 if dataset == "synthia" else 19


def _evaluate_checkpoint(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model, check its protocol against the dataset's and run it; (metrics, dataset)."""
    from cbst.checkpoints import load_checkpoint
    from cbst.device import maybe_compile, select_device
    from cbst.evaluation import evaluate_model

    scales = args.scales
    device = select_device(args.device)
    if args.num_classes is None:
        model, meta = load_checkpoint(args.checkpoint, device=device)
        dataset = _build_dataset(args, int(meta["num_classes"]))
        if meta.get("protocol") != dataset.protocol.name:
            raise CLIError(
                f"{args.checkpoint}: model was trained for label protocol "
                f"{meta.get('protocol')!r}, the dataset uses {dataset.protocol.name!r}"
            )
    else:
        dataset = _build_dataset(args, args.num_classes)
        model, meta = load_checkpoint(args.checkpoint, device=device, expect_protocol=dataset.protocol.name)
    metrics = evaluate_model(
        maybe_compile(model, args.compile),
        dataset,
        device=device,
        long_side=args.test_scales,
        scales=scales,
        flip=args.test_flipping,
        window=args.window,
        batch_size=args.batch_size,
        output_dir=args.output,
        num_workers=args.num_workers,
        progress=args.progress,
        amp=args.amp,
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


def _record(args: argparse.Namespace, case: str, dataset: Any, metrics: Any) -> dict:
    """The ``--out`` JSON: what was scored, how, with what, and the metrics."""
    from cbst.device import select_device
    from cbst.provenance import checkpoint_record, provenance

    record: dict[str, Any] = {
        "case": case,
        "dataset": args.dataset,
        "split": args.split,
        "protocol": dataset.protocol.name,
        "images": len(dataset),
    }
    if args.checkpoint:
        record["checkpoint"] = checkpoint_record(args.checkpoint)
        record["inference"] = {
            "test_scales": args.test_scales,
            "scales": list(args.scales),
            "flipping": bool(args.test_flipping),
            "window": args.window,
        }
        record["provenance"] = provenance(select_device(args.device), args.amp)
    else:
        record["predictions"] = str(Path(args.predictions).resolve())
        record["provenance"] = {"cbst": __version__}
    return {**record, **metrics.to_json()}


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the Markdown row and optionally save JSON."""
    from cbst.evaluation import evaluate_predictions, format_table
    from cbst.io import write_json

    _check_args(args)
    if args.checkpoint:
        metrics, dataset = _evaluate_checkpoint(args)
        case = args.case or case_name(args.checkpoint)
    else:
        dataset = _build_dataset(args, args.num_classes or _default_num_classes(args.dataset))
        metrics = evaluate_predictions(args.predictions, dataset, progress=args.progress)
        case = args.case or Path(args.predictions).resolve().name
    print(format_table({case: metrics}, dataset.protocol.class_names))
    if args.out:
        write_json(args.out, _record(args, case, dataset, metrics))
    return 0
