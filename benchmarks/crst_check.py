"""Check CRST's two regularisers: the formulas against an independent numpy version, then one
LRENT and one MRKLD round on the embedded benchmark through the command line.

Usage: python benchmarks/crst_check.py [--out runs/crst_check] [--device auto]

Part 1 draws Cityscapes-sized class counts (19 classes) of random probabilities, with exact
zeros and classes whose λ is 1, and compares ``cbst.crst.soft_pseudo_labels`` and
``kld_regularizer`` with the issue's formulas written out in float64 numpy (the keep rule in
its original form, not the log-sum-exp form the package uses). Part 2 renders a small benchmark,
trains the small model on its source domain for a few epochs, and runs ``cbst self-train`` for
one round with ``--lr-weight-ent 0.25`` and one with ``--mr-weight-kld 0.1``; it prints each
run's mIoU, LRENT's kept fraction per class, and checks that the probability cache is gone and
that config.yaml records the options. Prints one line per result; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from cbst.crst import kld_regularizer, soft_pseudo_labels

C = 19


def _numpy_lrent(p: np.ndarray, lam: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, keep, margin) straight from the formulas, float64, with 0·log 0 = 0."""
    lam = lam.reshape(1, -1, 1, 1)
    w = (p / lam) ** (1.0 / alpha)
    q = w / w.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lhs = -np.where(q > 0, q * np.log(p), 0).sum(1) + alpha * np.where(q > 0, q * np.log(q), 0).sum(1)
    rhs = -(q * np.log(lam)).sum(1)
    return q, lhs < rhs, rhs - lhs


def _numpy_kld(logits: np.ndarray, valid: np.ndarray) -> float:
    """Mean over valid pixels of −(1/C) Σ_c log softmax, float64."""
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float((-log_p.mean(1))[valid].mean())


def check_formulas(failures: list[str]) -> None:
    """Part 1: both functions against numpy on random inputs."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(C, 0.3), size=(2, 64, 128)).transpose(0, 3, 1, 2)
    p[rng.random(p.shape) < 0.1] = 0.0
    p[:, 0, :, 0] = 1e-3  # no pixel without probability
    p /= p.sum(1, keepdims=True)
    lam = rng.uniform(0.3, 0.95, C)
    lam[[5, 6, 7, 18]] = 1.0
    for alpha in (0.05, 0.25, 0.5):
        q_ref, keep_ref, margin = _numpy_lrent(p, lam, alpha)
        soft, keep = soft_pseudo_labels(torch.from_numpy(p).float(), torch.from_numpy(lam).float(), alpha)
        diff = float(np.abs(soft.numpy() - q_ref).max())
        decided = np.abs(margin) > 1e-4
        agree = float((keep.numpy() == keep_ref)[decided].mean())
        print(
            f"soft_pseudo_labels alpha={alpha}: max |q - numpy| {diff:.2e}, keep agrees on "
            f"{100 * agree:.3f}% of {decided.sum()} decided pixels ({100 * keep_ref.mean():.1f}% kept; "
            f"{(~decided).sum()} within 1e-4 of the boundary)"
        )
        if diff > 1e-5 or agree < 1:
            failures.append(f"soft_pseudo_labels alpha={alpha}")
    logits = rng.normal(0, 4, (2, C, 64, 128))
    valid = rng.random((2, 64, 128)) < 0.7
    got = kld_regularizer(torch.from_numpy(logits).float(), torch.from_numpy(valid)).item()
    want = _numpy_kld(logits, valid)
    print(f"kld_regularizer: {got:.6f} vs numpy {want:.6f} (relative {abs(got - want) / want:.1e})")
    if abs(got - want) > 1e-5 * want:
        failures.append("kld_regularizer")


def _cbst(*args: str) -> None:
    """Run one cbst command in a subprocess; stop the check if it fails."""
    command = [sys.executable, "-m", "cbst", *args]
    started = time.time()
    subprocess.run(command, check=True)
    print(f"  ({args[0]}: {time.time() - started:.0f} s)")


def check_rounds(out: Path, device: str, failures: list[str]) -> None:
    """Part 2: one LRENT and one MRKLD round through the CLI on a small benchmark."""
    data = out / "data"
    _cbst(
        "make-synthetic", str(data), "--num-source", "40", "--num-train", "20", "--num-val", "10", "--quiet"
    )
    source = out / "source"
    if not (source / "last.pt").is_file():
        _cbst(
            "train-source", "--data-root", str(data / "gta5"), "--model", "small",
            "--batch-images", "8", "--crop-size", "128", "--base-lr", "0.05", "--lr-type", "poly",
            "--to-epoch", "4", "--output", str(source), "--device", device, "--no-progress",
        )  # fmt: skip
    common = [
        "--data-root", str(data / "gta5"), "--data-root-tgt", str(data / "cityscapes"),
        "--weights", str(source / "last.pt"), "--num-round", "1", "--epoch-per-round", "1",
        "--init-tgt-port", "0.2", "--init-src-port", "0.5", "--batch-images", "8", "--crop-size", "128",
        "--base-lr", "0.005", "--device", device, "--no-progress",
    ]  # fmt: skip
    for name, flags in (("lrent", ["--lr-weight-ent", "0.25"]), ("mrkld", ["--mr-weight-kld", "0.1"])):
        run = out / name
        if not (run / "results.json").is_file():
            _cbst(
                "self-train", *common, *flags, "--output", str(run), *(["--resume"] if run.exists() else [])
            )
        miou = json.loads((run / "results.json").read_text())["rounds"]["0"]["miou"]
        saved = yaml.safe_load((run / "config.yaml").read_text())
        stats = json.loads((run / "round_0" / "stats.json").read_text())
        print(
            f"{name}: round 0 mIoU {100 * miou:.1f}; config.yaml mr_weight_kld {saved['mr_weight_kld']}, "
            f"lr_weight_ent {saved['lr_weight_ent']}; selected {100 * stats['selected_fraction']:.1f}% of pixels"
        )
        if (run / "round_0" / "probability_cache").exists():
            failures.append(f"{name}: the probability cache outlived the round")
        if name == "lrent":
            kept = {k: round(v, 3) for k, v in stats["kept_fraction"].items() if v is not None}
            print(f"lrent kept fraction per class: {kept}")
            if saved["lr_weight_ent"] != 0.25 or not kept:
                failures.append("lrent: options or kept fractions not recorded")
        elif saved["mr_weight_kld"] != 0.1:
            failures.append("mrkld: option not recorded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/crst_check")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    failures: list[str] = []
    check_formulas(failures)
    check_rounds(Path(args.out), args.device, failures)
    print("all checks passed" if not failures else f"FAILED: {'; '.join(failures)}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
