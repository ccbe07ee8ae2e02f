"""Time of the pseudo-label pass against evaluation on the same frames, and its exactness.

Issue 7's CPU check: over the real 2048×1024 Cityscapes frames in ``../shared/testdata`` (train
split), ``pseudo_label_pass(model, dataset, out, portion=0.2, flip=True)`` must take at most
1.3× the time of ``evaluate_model(model, dataset, device="cpu", flip=True)`` with the same model
(the ``small`` one, randomly initialised with seed 0): both forward every frame and its mirror
once; the pass adds the thresholds, a second up-sampling from its cache and the PNGs. The two
are timed alternately (``--repeats`` times each, after an untimed one-frame warm-up), because the
machine is shared, and the ratio of the medians is reported.

Then, unless ``--skip-exact``, the exact mode is checked: the PNGs of
``pseudo_label_pass(..., exact=True)`` must equal the labels computed image by image from
``predict_probs(model, image, flip=True)`` with thresholds from a full descending sort.

    python benchmarks/pseudo_label_speed.py                  # one timed run each, then the check
    python benchmarks/pseudo_label_speed.py --repeats 3 --skip-exact
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cbst.datasets import cityscapes
from cbst.evaluation import evaluate_model
from cbst.inference import predict_probs
from cbst.io import read_label
from cbst.models import build_model
from cbst.pseudo_labels import pseudo_label_pass
from cbst.thresholds import assign_pseudo_labels

REPO = Path(__file__).resolve().parents[1]
PORTION = 0.2


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_both(model: torch.nn.Module, dataset, repeats: int, work: Path) -> dict:
    """Median seconds of evaluation and of the pseudo-label pass, run alternately."""

    def evaluate(data) -> None:
        evaluate_model(model, data, device="cpu", flip=True, progress=False)

    def pseudo(data) -> None:
        pseudo_label_pass(model, data, work / "pseudo", portion=PORTION, flip=True, progress=False)

    first = dataset.subset([0])
    evaluate(first), pseudo(first)  # warm-up: allocator, thread pools
    times: dict[str, list[float]] = {"evaluate": [], "pseudo_label_pass": []}
    for _ in range(repeats):
        times["evaluate"].append(_timed(lambda: evaluate(dataset)))
        times["pseudo_label_pass"].append(_timed(lambda: pseudo(dataset)))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "images": len(dataset),
        "repeats": repeats,
        "seconds": times,
        "median_seconds": medians,
        "ratio": medians["pseudo_label_pass"] / medians["evaluate"],
    }


def _kth_largest(values: torch.Tensor, portion: float) -> float:
    """λ of a class by a full descending sort (1.0 where ⌊n·p⌋ = 0)."""
    k = int(np.floor(values.numel() * portion))
    return float(values.sort(descending=True).values[k - 1]) if k > 0 else 1.0


def check_exact(model: torch.nn.Module, dataset, work: Path) -> dict:
    """Whether the exact single pass writes the labels of image-by-image predict_probs."""
    pseudo_label_pass(model, dataset, work / "exact", portion=PORTION, flip=True, exact=True, progress=False)
    probs = []
    for i in range(len(dataset)):
        image = torch.as_tensor(dataset[i]["image"]).permute(2, 0, 1)[None]
        probs.append(predict_probs(model, image, flip=True))
    conf, pred = torch.cat(probs).max(dim=1)
    lam = torch.tensor([_kth_largest(conf[pred == c], PORTION) for c in range(probs[0].shape[1])])
    mismatched = []
    for i, sample in enumerate(dataset.samples):
        expected = assign_pseudo_labels(probs[i], lam)[0].numpy()
        written = read_label(work / "exact" / "pseudo_labelIds" / f"{sample.name}.png")
        if not np.array_equal(dataset.protocol.encode(written), expected):
            mismatched.append(sample.name)
    stats = json.loads((work / "exact" / "stats.json").read_text())
    return {
        "exact_labels_equal": not mismatched,
        "mismatched": mismatched,
        "exact_thresholds_equal": list(stats["thresholds"].values()) == lam.tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=REPO.parent / "shared" / "testdata" / "cityscapes",
        help="a Cityscapes folder (leftImg8bit/ + gtFine/); its train split is used",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each")
    parser.add_argument("--skip-exact", action="store_true", help="only time")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model("small", 19).eval()
    dataset = cityscapes(args.root, "train")
    with tempfile.TemporaryDirectory() as tmp:
        result = time_both(model, dataset, args.repeats, Path(tmp))
        print(json.dumps(result), flush=True)
        if not args.skip_exact:
            exact = check_exact(model, dataset, Path(tmp))
            print(json.dumps(exact), flush=True)
            if not (exact["exact_labels_equal"] and exact["exact_thresholds_equal"]):
                return 1
    print(f"pseudo_label_pass / evaluate = {result['ratio']:.2f} (target <= 1.3)")
    return 0 if result["ratio"] <= 1.3 else 1


if __name__ == "__main__":
    sys.exit(main())
