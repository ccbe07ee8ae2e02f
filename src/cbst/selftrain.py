"""Self-training rounds: ST, CBST and CBST-SP as one resumable pipeline.

Each round runs three stages, recorded in ``OUTPUT/state.json`` as they finish:

1. ``pseudo``: two inference passes over the target training images. The first feeds softmax
   probabilities (times the spatial prior for CBST-SP) into a :class:`ThresholdEstimator`; the
   second assigns pseudo-labels with the round's thresholds and writes them as labelId PNGs
   (0 = not selected) plus colour PNGs and ``stats.json``. Recomputing the forward pass instead
   of storing probability maps keeps disk and memory use independent of image size (the
   original wrote ~150 MiB per image).
2. ``train``: the round's source subset plus the pseudo-labelled target images, with rare-class
   patch mining, trained from the previous round's weights with a fresh optimiser.
3. ``eval``: the round's model on the target validation split.

``resume=True`` skips finished stages; every random draw is seeded from (seed, round, epoch,
image index), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml
from tqdm import tqdm

from cbst import io
from cbst.device import configure_backends, select_device
from cbst.rounds import RoundPlan, round_schedule, source_subset
from cbst.thresholds import ThresholdEstimator, assign_pseudo_labels, rare_classes

__all__ = ["SelfTrainConfig", "ThresholdEstimator", "assign_pseudo_labels", "self_train",
           "pseudo_label_pass"]

STAGES = ("pseudo", "train", "eval")
# Options that may change between a run and its resumption without changing its result.
_RESUME_FREE = ("resume", "device", "num_workers", "progress", "compile")


@dataclass
class SelfTrainConfig:
    """Everything a self-training run depends on; saved as ``OUTPUT/config.yaml``."""

    weights: str
    output: str
    data_root: str
    data_root_tgt: str
    dataset: str = "gta5"
    split: str = "train"
    list_file: str | None = None
    dataset_tgt: str = "cityscapes"
    split_tgt: str = "train"
    list_tgt: str | None = None
    eval_split: str | None = "val"
    num_classes: int = 19
    # schedule (the original solve_AO.py defaults)
    num_round: int = 12
    init_tgt_port: float = 0.3
    step_tgt_port: float = 0.05
    max_tgt_port: float = 0.5
    init_src_port: float = 0.3
    step_src_port: float = 0.0025
    max_src_port: float = 0.06
    epoch_per_round: int = 2
    base_lr: float = 1e-4
    lr_decay: float = math.sqrt(2.0)
    source_sample_policy: str = "cumulative"
    seed: int = 0
    # pseudo-labels
    kc_policy: str = "cb"
    with_prior: str | None = None
    test_scales: int | None = None
    test_flipping: bool = True
    pseudo_scales: tuple[float, ...] = (1.0,)
    exact_thresholds: bool = False
    threshold_bins: int = 65536
    pseudo_batch: int = 1
    # training
    batch_images: int = 2
    crop_size: int = 500
    scale_rate_range: tuple[float, float] = (0.7, 1.3)
    origin_size: int | None = None
    origin_size_tgt: int | None = None
    mine_port: float = 0.5
    mine_id_number: int = 3
    mine_thresh: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # evaluation
    eval_long_side: int | None = None
    eval_flipping: bool = False
    # runtime
    device: str = "auto"
    num_workers: int = 0
    amp: bool = True
    compile: bool = False
    progress: bool = True
    resume: bool = False
    score_pseudo_labels: bool = False
    """Score pseudo-labels against the target split's ground truth (a log only: oracle data)."""

    def schedule(self) -> list[RoundPlan]:
        """The per-round portions, learning rates and epochs of this run."""
        return round_schedule(
            self.num_round, init_tgt_port=self.init_tgt_port, step_tgt_port=self.step_tgt_port,
            max_tgt_port=self.max_tgt_port, init_src_port=self.init_src_port,
            step_src_port=self.step_src_port, max_src_port=self.max_src_port,
            base_lr=self.base_lr, lr_decay=self.lr_decay, epoch_per_round=self.epoch_per_round,
            source_sample_policy=self.source_sample_policy, seed=self.seed)

    def validate(self) -> None:
        """Reject inconsistent options before any work starts."""
        if self.kc_policy not in ("cb", "global"):
            raise ValueError(f"kc_policy must be 'cb' or 'global', got {self.kc_policy!r}")
        if not Path(self.weights).is_file():
            raise FileNotFoundError(f"{self.weights}: initial weights not found")
        if self.with_prior not in (None, "source") and not Path(self.with_prior).is_file():
            raise FileNotFoundError(f"{self.with_prior}: spatial prior file not found")
        lo, hi = self.scale_rate_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_rate_range must be 0 < lo <= hi, got {self.scale_rate_range}")
        self.schedule()

    def to_dict(self) -> dict:
        """Plain-type dict (YAML-safe)."""
        d = dataclasses.asdict(self)
        d["scale_rate_range"] = list(self.scale_rate_range)
        d["pseudo_scales"] = list(self.pseudo_scales)
        return d


class RunState:
    """The finished stages of a run, persisted atomically after every stage."""

    def __init__(self, output: Path):
        self.path = output / "state.json"
        self.finished: list[str] = []
        if self.path.is_file():
            self.finished = json.loads(self.path.read_text())["finished"]

    def done(self, round_index: int, stage: str) -> bool:
        return f"{round_index}/{stage}" in self.finished

    def mark(self, round_index: int, stage: str) -> None:
        self.finished.append(f"{round_index}/{stage}")
        io.write_json(self.path, {"finished": self.finished})


def _prepare_output(cfg: SelfTrainConfig) -> tuple[Path, RunState]:
    """Create OUTPUT, or check that a resumed run uses the same configuration."""
    out = Path(cfg.output)
    state = RunState(out)
    saved = out / "config.yaml"
    if state.finished and not cfg.resume:
        raise ValueError(f"{out}: holds a started run ({len(state.finished)} stages finished); "
                         "pass --resume to continue it or choose another --output")
    if cfg.resume and saved.is_file():
        old = yaml.safe_load(saved.read_text())
        new = cfg.to_dict()
        diff = sorted(k for k in new if k not in _RESUME_FREE and old.get(k) != new[k])
        if diff:
            raise ValueError(f"{saved}: --resume with a different configuration ({', '.join(diff)})")
    out.mkdir(parents=True, exist_ok=True)
    io.write_text(saved, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out, state


def pseudo_label_pass(model: torch.nn.Module, dataset, out_dir: Path, *, portion: float,
                      policy: str = "cb", prior: torch.Tensor | None = None,
                      long_side: int | None = None, scales: tuple[float, ...] = (1.0,),
                      flip: bool = True, exact: bool = False,
                      bins: int = 65536, batch_size: int = 1, mine_id_number: int = 3,
                      mine_thresh: float = 1e-3, num_workers: int = 0, amp: bool = True,
                      progress: bool = True) -> dict:
    """Threshold statistics, then pseudo-labels written to ``out_dir``; returns the round stats."""
    from cbst.evaluation import write_prediction
    from cbst.inference import image_batches, predict_probs
    from cbst.priors import apply_prior

    device = next(model.parameters()).device
    protocol = dataset.protocol
    started = time.time()

    def batches(desc: str) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        with tqdm(total=len(dataset), desc=desc, disable=not progress, leave=False) as bar:
            for images, items in image_batches(dataset, batch_size, num_workers=num_workers):
                yield images, items
                bar.update(len(items))

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        probs = predict_probs(model, images.to(device), long_side=long_side, scales=scales,
                              flip=flip, amp=amp)
        return apply_prior(probs, prior) if prior is not None else probs

    estimator = ThresholdEstimator(protocol.num_classes, policy, exact=exact, bins=bins, device=device)
    for images, _ in batches("pseudo-label stats"):
        estimator.update(probabilities(images))
    thresholds = estimator.thresholds(portion)
    predicted = estimator.class_pixel_counts
    mine_id, priority = rare_classes(predicted, number=mine_id_number, thresh=mine_thresh)

    selected = torch.zeros(protocol.num_classes, dtype=torch.int64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    judged = torch.zeros((), dtype=torch.int64, device=device)
    for images, samples in batches("pseudo-labels"):
        labels = assign_pseudo_labels(probabilities(images), thresholds)
        valid = labels < protocol.num_classes
        selected += torch.bincount(labels[valid], minlength=protocol.num_classes)
        for label, sample in zip(labels.cpu().numpy().astype(np.uint8), samples):
            write_prediction(out_dir, sample["name"], label, protocol, prefix="pseudo_")
        if samples[0].get("label") is not None:
            gt = _stack_labels(samples).to(device)
            mask = valid & (gt < protocol.num_classes)
            correct += (labels[mask] == gt[mask]).sum()
            judged += mask.sum()
    stats = {
        "portion": portion, "policy": policy, "with_prior": prior is not None,
        "thresholds": dict(zip(protocol.class_names, thresholds.tolist())),
        "predicted_pixels": dict(zip(protocol.class_names, predicted.tolist())),
        "selected_pixels": dict(zip(protocol.class_names, selected.tolist())),
        "mine_id": [int(i) for i in mine_id], "mine_id_priority": [int(i) for i in priority],
        "selected_fraction": float(selected.sum()) / max(1, int(predicted.sum())),
        "pseudo_label_accuracy": float(correct) / int(judged) if int(judged) else None,
        "seconds": round(time.time() - started, 2),
    }
    io.write_json(out_dir / "stats.json", stats)
    return stats


def _stack_labels(samples: list[dict]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(np.asarray(s["label"]), dtype=torch.int64) for s in samples])


def _load_prior(cfg: SelfTrainConfig, out: Path, source, target,
                device: torch.device) -> torch.Tensor | None:
    """The CBST-SP prior at the target images' resolution, on the device (resized once, here).

    ``with_prior="source"`` counts it on the source labels the first time and keeps it as
    ``OUTPUT/prior.npy``; otherwise it is read from a .npy or the original's .mat file.
    """
    from cbst.priors import load_prior, save_prior, spatial_prior_from_dataset

    if cfg.with_prior is None:
        return None
    w, h = io.image_size(target.samples[0].image)
    path = out / "prior.npy" if cfg.with_prior == "source" else Path(cfg.with_prior)
    if cfg.with_prior == "source" and not path.is_file():
        save_prior(path, spatial_prior_from_dataset(source, (h, w), progress=cfg.progress))
    return torch.from_numpy(load_prior(path, cfg.num_classes, size=(h, w))).to(device)


def _round_seed(cfg: SelfTrainConfig, plan: RoundPlan) -> int:
    """A seed for the round's training randomness that differs between rounds."""
    return cfg.seed * 1000 + plan.index


def _train_round(cfg: SelfTrainConfig, plan: RoundPlan, model: torch.nn.Module, source, target,
                 stats: dict, device: torch.device) -> None:
    """Train the model for one round on the source subset plus the pseudo-labelled target."""
    from cbst.mining import MiningPlan
    from cbst.training import build_optimizer, train_epochs
    from cbst.transforms import TrainTransform

    mining = (MiningPlan(cfg.mine_port, stats["mine_id"], stats["mine_id_priority"])
              if cfg.mine_port > 0 else None)
    crop = int(math.ceil(cfg.crop_size / 8) * 8)
    seed = _round_seed(cfg, plan)

    def transform(reference: int | None, offset: int) -> TrainTransform:
        return TrainTransform(crop, scale_range=tuple(cfg.scale_rate_range),
                              reference_long_side=reference, mining=mining, seed=seed * 2 + offset)

    subset = source.subset(source_subset(len(source), plan.src_portion, plan.source_seed))
    parts = [subset.with_transform(transform(cfg.origin_size, 0)),
             target.with_transform(transform(cfg.origin_size_tgt, 1))]
    data = torch.utils.data.ConcatDataset([p for p in parts if len(p) > 0])
    optimizer = build_optimizer(model, plan.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    train_epochs(model, data, epochs=plan.end_epoch, start_epoch=plan.start_epoch,
                 batch_size=cfg.batch_images, base_lr=plan.lr, lr_policy="fixed", device=device,
                 optimizer=optimizer, num_workers=cfg.num_workers, seed=seed, amp=cfg.amp,
                 progress=cfg.progress)


class _RoundModel:
    """One model for every round, built (and compiled, with ``compile``) on first use.

    Each round's weights are loaded into the same module, so compiled graphs are reused instead
    of compiled again for a new module every round.
    """

    def __init__(self, device: torch.device, protocol: str, compile: bool) -> None:
        self.device, self.protocol, self.compile = device, protocol, compile
        self.model: torch.nn.Module | None = None
        self.net: torch.nn.Module | None = None
        self.meta: dict = {}

    def load(self, path: Path) -> torch.nn.Module:
        """The model holding the checkpoint's weights (compiled when asked); run it, not save it."""
        from cbst.checkpoints import load_checkpoint, load_weights_into
        from cbst.device import maybe_compile

        if self.model is None:
            self.model, self.meta = load_checkpoint(path, device=self.device,
                                                    expect_protocol=self.protocol)
            self.net = maybe_compile(self.model, self.compile)
        else:
            load_weights_into(self.model, path, expect_protocol=self.protocol)
        return self.net


def _datasets(cfg: SelfTrainConfig):
    """(source, target train, target val or None), verified before any work starts."""
    from cbst.datasets import build_dataset

    source = build_dataset(cfg.dataset, cfg.data_root, split=cfg.split,
                           num_classes=cfg.num_classes, list_file=cfg.list_file)
    target = build_dataset(cfg.dataset_tgt, cfg.data_root_tgt, split=cfg.split_tgt,
                           num_classes=cfg.num_classes, list_file=cfg.list_tgt,
                           with_labels=cfg.score_pseudo_labels)
    val = (build_dataset(cfg.dataset_tgt, cfg.data_root_tgt, split=cfg.eval_split,
                         num_classes=cfg.num_classes) if cfg.eval_split else None)
    return source, target, val


def self_train(cfg: SelfTrainConfig) -> dict:
    """Run (or resume) every round; returns {round index: metrics json} of the evaluations."""
    from cbst.checkpoints import save_checkpoint
    from cbst.evaluation import evaluate_model

    cfg.validate()
    out, state = _prepare_output(cfg)
    source, target, val = _datasets(cfg)
    device = select_device(cfg.device)
    configure_backends(device)
    protocol_name = target.protocol.name
    prior = _load_prior(cfg, out, source, target, device)
    weights = Path(cfg.weights)
    reused = _RoundModel(device, protocol_name, cfg.compile)
    results: dict[int, dict] = {}
    for plan in cfg.schedule():
        rdir = out / f"round_{plan.index}"
        ckpt = rdir / "model.pt"
        model = None
        if not state.done(plan.index, "train"):
            model = reused.load(weights)
        if not state.done(plan.index, "pseudo"):
            pseudo_label_pass(
                model, target, rdir, portion=plan.tgt_portion, policy=cfg.kc_policy, prior=prior,
                long_side=cfg.test_scales, scales=tuple(cfg.pseudo_scales), flip=cfg.test_flipping,
                exact=cfg.exact_thresholds,
                bins=cfg.threshold_bins, batch_size=cfg.pseudo_batch,
                mine_id_number=cfg.mine_id_number, mine_thresh=cfg.mine_thresh,
                num_workers=cfg.num_workers, amp=cfg.amp, progress=cfg.progress)
            state.mark(plan.index, "pseudo")
        if not state.done(plan.index, "train"):
            stats = json.loads((rdir / "stats.json").read_text())
            pseudo = target.with_labels(rdir / "pseudo_labelIds")
            _train_round(cfg, plan, model, source, pseudo, stats, device)
            save_checkpoint(ckpt, reused.model, arch=reused.meta["arch"],
                            num_classes=cfg.num_classes,
                            protocol=protocol_name, round=plan.index, epoch=plan.end_epoch)
            state.mark(plan.index, "train")
        weights = ckpt
        if val is not None and not state.done(plan.index, "eval"):
            if model is None:
                model = reused.load(ckpt)
            metrics = evaluate_model(model, val, device=device, long_side=cfg.eval_long_side,
                                     flip=cfg.eval_flipping, progress=cfg.progress)
            io.write_json(rdir / "metrics.json", metrics.to_json())
            state.mark(plan.index, "eval")
        if (rdir / "metrics.json").is_file():
            results[plan.index] = json.loads((rdir / "metrics.json").read_text())
    io.write_json(out / "results.json", {"rounds": results})
    return results
