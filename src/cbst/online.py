"""Online self-training: a mean teacher labels each target batch as it comes (DACS, DAFormer).

One run of ``max_iters`` iterations. Each iteration takes a global batch of ``batch_images``
source crops (drawn by Rare Class Sampling, :mod:`cbst.rcs`) and as many target crops:

1. the student's cross-entropy on the source crops, plus with ``fd_lambda`` DAFormer's ImageNet
   feature distance of its encoder (:mod:`cbst.feature_distance`) (backward);
2. the teacher (:mod:`cbst.teacher`) labels the target crops, un-augmented; with ``with_prior``
   its softmax is multiplied by the spatial prior sampled at the crop's pixels (CBST-SP); the
   selector of ``kc_policy`` (:mod:`cbst.online_selection`) turns it into labels and weights;
3. ClassMix pastes half of each source crop's classes onto its target crop, DACS's colour jitter
   and blur go on the mixed image (:mod:`cbst.classmix`), and the student's weighted
   cross-entropy on the mixed crops (Σ weight·CE over all crop pixels / their number) is
   back-propagated; one optimiser step; the teacher takes its EMA step.

The student is evaluated every ``eval_interval`` iterations and at the end. The run folder
holds ``config.yaml``, ``rcs_pixel_counts.npy`` and ``rcs_class_probs.json``, ``log.jsonl``
(every ``log_interval`` iterations: loss, lr, λ per class, the selected pixels' class shares,
the pseudo-labels' accuracy with ``score_pseudo_labels``), ``metrics/iter_NNNNNN.json``,
``checkpoints/iter_NNNNNN.pt`` (the last training state), and at the end ``model.pt`` (the
student, a cbst checkpoint for ``cbst evaluate``), ``teacher.pt`` and ``results.json``.

Exact resume: every random draw of iteration t is a function of (seed, t, batch slot) for the
data and of (seed, t, rank) for the torch RNG (dropout) and the mixing, so the training state
(student, teacher, optimiser, loss scaler, selector histograms and the iteration, which is
the sampler's position) is all a checkpoint needs: a run killed anywhere and resumed with
``resume`` ends with the uninterrupted run's weights (same process count).

Under torchrun each process takes its consecutive slots of every global batch; the student is
trained through DistributedDataParallel, its batch-norm buffers are broadcast from the main
process after every step, so the teacher's EMA step is identical everywhere; the selector sums
its histograms over the processes. Per iteration nothing waits for the device but the logging.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cbst import checks, distributed, io, options, signals
from cbst.class_counts import run_pixel_counts
from cbst.classmix import classmix, strong_augment
from cbst.device import autocast, configure_backends, select_device
from cbst.errors import ConfigError, DataError, MissingInputError
from cbst.feature_distance import FeatureDistance, thing_class_ids
from cbst.inference import normalize
from cbst.labels import IGNORE_INDEX
from cbst.online_selection import ONLINE_SELECTORS, FixedSelector, Selection, WindowedSelector, build_selector
from cbst.optim import OPTIMIZERS, WARMUP_RATIO, build_optimizer, set_lr
from cbst.priors import prior_at_crops
from cbst.rcs import COUNTS_FILE, PROBS_FILE, RareClassSampler, crop_with_class
from cbst.registry import LOSSES
from cbst.teacher import MeanTeacher
from cbst.training import _epoch_seed, _grad_scaler, stack_batch, train_forward

STATE_FORMAT = "cbst-online-state"
_INPUT_PATHS = ("weights", "data_root", "data_root_tgt", "list_file", "list_tgt", "with_prior", "pretrained")
# Options a resumed run may change: where and how it runs and what it logs, never what it computes.
_RESUME_FREE = (
    "output",
    "resume",
    "device",
    "num_workers",
    "progress",
    "eval_interval",
    "log_interval",
    "checkpoint_interval",
)


@dataclass
class OnlineConfig:
    """Everything an online self-training run depends on; saved as ``OUTPUT/config.yaml``.

    Defaults are DAFormer's (lhoyer/DAFormer, the config
    ``configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py`` and the
    bases it names) unless marked otherwise; docs/method.md §14.5
    lists them with their sources.
    """

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
    seed: int = 0
    # schedule (schedules/adamw.py, poly10warm.py, the DAFormer config)
    max_iters: int = 40000
    batch_images: int = 2  # per domain: 2 source + 2 target crops
    crop_size: int = 512
    scale_rate_range: tuple[float, float] = (1.0, 1.0)  # DAFormer resizes, then crops: no random scale
    origin_size: int | None = None  # DAFormer: GTA5 resized to 1280x720 (1280)
    origin_size_tgt: int | None = None  # DAFormer: Cityscapes resized to 1024x512 (1024)
    optimizer: str = "adamw"
    base_lr: float = 6e-5
    weight_decay: float = 0.01
    momentum: float = 0.9  # SGD only
    warmup_iters: int = 1500
    lr_power: float = 1.0
    # mean teacher and pseudo-labels (uda/dacs.py)
    ema_alpha: float = 0.999
    kc_policy: str = "cb"  # cbst's; DAFormer's is "fixed"
    pseudo_threshold: float = 0.968
    pseudo_ignore_top: int = 0  # DAFormer: 15 at 1024x512 (its -croppl configs)
    pseudo_ignore_bottom: int = 0  # DAFormer: 120
    tgt_port: float = 0.5  # cbst's: the original's maximum target portion
    cb_window: int = 100  # cbst's: iterations of histograms
    with_prior: str | None = None  # cbst's: CBST-SP's spatial prior (a file or "source"), cb/global only
    # ImageNet feature distance (uda/dacs.py; the DAFormer config: 0.005)
    fd_lambda: float = 0.0  # cbst's default: off
    pretrained: str | None = None  # the ImageNet weights of the frozen encoder (a file or "imagenet")
    # rare class sampling (uda_dataset.py, the DAFormer config)
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 3000
    # evaluation, logs, checkpoints (DAFormer evaluates every 4000 iterations)
    eval_interval: int = 4000
    log_interval: int = 50
    checkpoint_interval: int = 2000
    eval_long_side: int | None = None
    eval_flipping: bool = False
    score_pseudo_labels: bool = False
    # runtime
    device: str = "auto"
    num_workers: int = 0
    amp: bool = True
    progress: bool = True
    resume: bool = False
    mode: str = "online"  # saved, so that --resume --output RUN alone resumes the online run

    @classmethod
    def from_self_train(cls, config: Any) -> OnlineConfig:
        """The online run of a :class:`cbst.config.SelfTrainConfig` with ``--mode online`` (its
        mode-dependent options already resolved); refuses the options of the rounds only."""
        options.check_choices(config)
        options.check_ranges(config)
        config.online_conflicts()
        names = [f.name for f in dataclasses.fields(cls) if f.name != "mode"]
        return cls(**{name: getattr(config, name) for name in names})

    def validate(self) -> None:
        """Reject invalid options before anything is read or written; errors name the flag."""
        if self.kc_policy not in ONLINE_SELECTORS:
            raise ConfigError(
                f"--kc-policy {self.kc_policy} has no online form; choose one of {', '.join(ONLINE_SELECTORS)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        checks.require_positive(
            self,
            "max_iters",
            "batch_images",
            "crop_size",
            "base_lr",
            "cb_window",
            "eval_interval",
            "log_interval",
            "checkpoint_interval",
        )
        checks.require_positive(self, "origin_size", "origin_size_tgt", "eval_long_side", optional=True)
        checks.require_non_negative(
            self,
            "weight_decay",
            "momentum",
            "warmup_iters",
            "lr_power",
            "pseudo_ignore_top",
            "pseudo_ignore_bottom",
            "rcs_temperature",
            "rcs_min_pixels",
            "num_workers",
            "fd_lambda",
        )
        checks.require_fraction(self, "tgt_port", "pseudo_threshold")
        checks.require_scale_range(self, "scale_rate_range")
        checks.require_split_batch(self, "batch_images")
        if not 0 <= self.ema_alpha < 1:
            raise ConfigError(f"--ema-alpha must be in [0, 1), got {self.ema_alpha}")
        if not Path(self.weights).is_file():
            raise MissingInputError(f"{self.weights}: initial weights not found (--weights)")
        if self.with_prior is not None and self.kc_policy == "fixed":
            raise ConfigError(
                "--with-prior: DAFormer's --kc-policy fixed weighs confidences against a fixed "
                "threshold; the spatial prior goes with --kc-policy cb or global"
            )
        checks.require_prior_file(self)
        self._check_feature_distance()

    def _check_feature_distance(self) -> None:
        """``fd_lambda`` needs ImageNet weights (``pretrained``), which nothing else reads."""
        if self.fd_lambda > 0 and self.pretrained is None:
            raise ConfigError(
                f"--fd-lambda {self.fd_lambda:g} compares the encoder with its ImageNet weights: "
                "give them with --pretrained FILE (or 'imagenet')"
            )
        if self.fd_lambda == 0 and self.pretrained is not None:
            raise ConfigError("--pretrained is read by --fd-lambda only; set --fd-lambda (DAFormer: 0.005)")
        if self.pretrained not in (None, "imagenet") and not Path(self.pretrained).is_file():
            raise MissingInputError(
                f"{self.pretrained}: ImageNet weights not found (--pretrained, --fd-lambda)"
            )

    def saved_form(self) -> dict:
        """Plain-type dict with the paths absolute: what ``config.yaml`` holds."""
        d = dataclasses.asdict(self)
        d["scale_rate_range"] = list(self.scale_rate_range)
        return options.resolved_paths(d, _INPUT_PATHS + ("output",))


def lr_at(cfg: OnlineConfig, it: int) -> float:
    """Polynomial decay to 0 over ``max_iters``, times mmcv's linear warm-up over ``warmup_iters``."""
    lr = cfg.base_lr * (1.0 - it / cfg.max_iters) ** cfg.lr_power
    if it < cfg.warmup_iters:
        lr *= 1.0 - (1.0 - it / cfg.warmup_iters) * (1.0 - WARMUP_RATIO)
    return lr


def _optimizer(model: nn.Module, cfg: OnlineConfig) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.999) or SGD with one group per ``model.lr_groups()`` entry and its
    multipliers (:func:`cbst.optim.build_optimizer`)."""
    return build_optimizer(
        model, cfg.base_lr, name=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


# ----------------------------------------------------------------------------------- data
class OnlinePairs(Dataset):
    """``pairs[(t, slot)]``: slot ``slot`` of iteration t's global batch, one source and one target crop.

    Its draws come from ``np.random.default_rng([seed, t, slot, ...])``: the source image (by RCS
    when ``sampler`` is given, else uniform), its crop, the target image and its crop; the
    target crop's label is the ground truth when the target has labels, else 0 inside the image
    and 255 on the padding.
    """

    def __init__(
        self, source, target, src_crop, tgt_crop, sampler: RareClassSampler | None, seed: int
    ) -> None:
        self.source, self.target = source.with_transform(None), target.with_transform(None)
        self.src_crop, self.tgt_crop, self.sampler, self.seed = src_crop, tgt_crop, sampler, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        t, slot = key
        rng = np.random.default_rng([self.seed, t, slot])

        def stream(*tail: int) -> np.random.Generator:
            return np.random.default_rng([self.seed, t, slot, *tail])

        if self.sampler is None:
            src = self.src_crop.apply(self.source[int(rng.integers(len(self.source)))], stream(1))
        else:
            cls, index = self.sampler.draw(rng)
            sample = self.source[index]
            src = crop_with_class(
                self.src_crop.apply, sample, cls, self.sampler.min_pixels, lambda a: stream(1, a)
            )
        tgt = self.target[int(rng.integers(len(self.target)))]
        if tgt["label"] is None:
            tgt = {**tgt, "label": np.zeros(tgt["image"].shape[:2], dtype=np.uint8)}
        tgt = self.tgt_crop.apply(tgt, stream(2))
        return {
            "src_image": src["image"],
            "src_label": src["label"],
            "tgt_image": tgt["image"],
            "tgt_label": tgt["label"],
            "tgt_geometry": tgt["geometry"],
        }


class IterationBatches(torch.utils.data.Sampler):
    """This process's keys ``(t, slot)`` of every global batch of iterations ``start .. stop - 1``."""

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.iterations = range(start, stop)
        self.slots = range(rank * batch_size // world, (rank + 1) * batch_size // world)

    def __len__(self) -> int:
        return len(self.iterations)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for t in self.iterations:
            yield [(t, s) for s in self.slots]


# ------------------------------------------------------------------------------- run folder
def _latest_state(out: Path) -> Path | None:
    """The checkpoint of the most iterations in ``OUT/checkpoints`` (None when there is none)."""
    found = sorted((out / "checkpoints").glob("iter_*.pt"))
    return found[-1] if found else None


def _prepare_output(cfg: OnlineConfig) -> tuple[Path, Path | None]:
    """(OUTPUT, the training state to resume from or None); refuses a started run without resume
    and a resume whose options differ from the saved ones in anything a finished step used."""
    out = Path(cfg.output)
    io.check_output_dir(out)
    saved = out / "config.yaml"
    if not saved.is_file():
        return out, None
    if not cfg.resume:
        raise ConfigError(
            f"{out}: holds a started run; pass --resume to continue it or choose another --output"
        )
    before, now = checks.with_defaults(checks.read_saved_config(saved), OnlineConfig), cfg.saved_form()
    names = [n for n in now if n not in _RESUME_FREE]
    diff = checks.changed(before, now, names)
    if diff:
        raise checks.resume_refusal(saved, before, now, diff, "the finished iterations")
    return out, _latest_state(out)


def _write_config(out: Path, cfg: OnlineConfig) -> None:
    io.make_dirs(out)
    io.write_text(out / "config.yaml", yaml.safe_dump(cfg.saved_form(), sort_keys=False))


def _rare_class_sampler(
    cfg: OnlineConfig, out: Path, source, *, first_start: bool
) -> RareClassSampler | None:
    """The RCS sampler from the source's class counts, counted on the first start, read on a resume."""
    if cfg.rcs_temperature == 0:
        return None
    path = out / COUNTS_FILE
    counts = run_pixel_counts(path, source, cfg.num_classes, recount=first_start, progress=cfg.progress)
    sampler = RareClassSampler(counts, cfg.rcs_temperature, cfg.rcs_min_pixels)
    distributed.write_once(sampler.write_probabilities, out / PROBS_FILE, source.protocol.class_names)
    return sampler


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop the log records of iterations after ``iteration`` (they are about to be redone)."""
    if not path.is_file():
        return
    lines = [line for line in io.read_text(path, "training log").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("iteration", 0) <= iteration]
    io.write_text(path, "".join(line + "\n" for line in kept))


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------ step
class StepOutcome(NamedTuple):
    """What one iteration computed, for the logs (tensors on the device, not read back)."""

    loss_source: torch.Tensor
    loss_target: torch.Tensor
    loss_feature_distance: torch.Tensor | None  # None without --fd-lambda
    selection: Selection
    valid: torch.Tensor  # the target crops' real pixels
    target_truth: torch.Tensor  # their ground truth (0 where the target has none)


class _Counters:
    """Per-log-interval sums on the device, read once per log record."""

    def __init__(self, num_classes: int, device: torch.device, feature_distance: bool) -> None:
        self.c, self.feature_distance = num_classes, feature_distance
        self.sums = torch.zeros(4, device=device)  # loss source, target, feature distance; steps
        self.selected = torch.zeros(num_classes + 1, dtype=torch.int64, device=device)
        self.scored = torch.zeros(2, dtype=torch.int64, device=device)  # correct, scored
        self.valid = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, step: StepOutcome) -> None:
        sel, gt = step.selection, step.target_truth
        one = torch.ones_like(step.loss_source.float())
        fd = one * 0 if step.loss_feature_distance is None else step.loss_feature_distance.detach().float()
        self.sums += torch.stack(
            [step.loss_source.detach().float(), step.loss_target.detach().float(), fd, one]
        )
        index = torch.where(sel.selected, sel.labels, self.c).flatten()
        self.selected.scatter_add_(0, index, torch.ones_like(index))
        scored = sel.selected & (gt != IGNORE_INDEX)
        self.scored += torch.stack([(scored & (sel.labels == gt)).sum(), scored.sum()])
        self.valid += step.valid.sum()

    def record(self, class_names: list[str], scoring: bool) -> dict[str, Any]:
        """Means and shares of the interval (all processes'), then reset."""
        for t in (self.sums, self.selected, self.scored, self.valid):
            distributed.all_reduce_sum(t)
        sums, selected, scored, valid = (
            self.sums.tolist(),
            self.selected[: self.c].tolist(),
            self.scored.tolist(),
            int(self.valid),
        )
        steps = sums[3] or 1
        loss_src, loss_tgt, loss_fd = (s / steps for s in sums[:3])
        if not all(math.isfinite(v) for v in (loss_src, loss_tgt, loss_fd)):
            raise FloatingPointError("non-finite training loss; lower the learning rate or disable AMP")
        total = sum(selected)
        rec: dict[str, Any] = {
            "loss": loss_src + loss_tgt + loss_fd,
            "loss_source": loss_src,
            "loss_target": loss_tgt,
            **({"loss_feature_distance": loss_fd} if self.feature_distance else {}),
            "selected_fraction": total / max(valid, 1),
            "selected_share": {n: s / max(total, 1) for n, s in zip(class_names, selected)},
        }
        if scoring:
            rec["pseudo_accuracy"] = scored[0] / scored[1] if scored[1] else None
        for t in (self.sums, self.selected, self.scored, self.valid):
            t.zero_()
        return rec


def _weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ weight·cross-entropy over every crop pixel / the number of pixels (DACS's pseudo-label
    loss), the per-pixel cross-entropy of :class:`cbst.losses.CrossEntropyLoss`."""
    loss = LOSSES.get("cross_entropy")()
    ce = loss.per_pixel(*loss.aligned(logits, labels))
    return (ce * weights).sum() / labels.numel()


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


def _same_everywhere(thresholds: torch.Tensor) -> torch.Tensor:
    """``thresholds``, checked equal to the main process's (the histograms are summed over all)."""
    if distributed.world_size() > 1:
        main = thresholds.clone()
        torch.distributed.broadcast(main, src=0)
        if not torch.equal(main, thresholds):
            raise RuntimeError(
                f"{distributed.describe()}: pseudo-label thresholds differ from the main process's"
            )
    return thresholds


def _iteration_seed(seed: int, it: int) -> int:
    """The torch seed of iteration ``it`` in this process (dropout, ClassMix, augmentation)."""
    return _epoch_seed(seed, it, distributed.rank())


@dataclass
class OnlineStep:
    """One online iteration (the module docstring's steps 1 to 3) over the networks it updates.

    ``net`` is the student as trained (wrapped in DistributedDataParallel under torchrun);
    ``feature_distance`` adds DAFormer's ImageNet feature distance to the source loss;
    ``prior`` (C×H×W of the whole target image) multiplies the teacher's softmax, sampled at each
    target crop's pixels, before the selection (CBST-SP).
    """

    student: nn.Module
    net: nn.Module
    teacher: MeanTeacher
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    selector: FixedSelector | WindowedSelector
    num_classes: int
    device: torch.device
    amp: bool = True
    feature_distance: FeatureDistance | None = None
    prior: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.segmentation_loss = LOSSES.get("cross_entropy")()

    def _source_losses(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cross-entropy, λ_FD·feature distance or None) of the source crops, from one pass."""
        with autocast(self.device, enabled=self.amp):
            if self.feature_distance is None:
                return self.segmentation_loss(train_forward(self.net, images), labels), None
            logits, features = train_forward(self.net, images, return_features=True)
            fd = self.feature_distance.loss(images, labels, features)
            return self.segmentation_loss(logits, labels), fd

    def _teacher_probabilities(self, images: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """The teacher's softmax of the target crops, times the spatial prior when there is one."""
        with autocast(self.device, enabled=self.amp):
            probs = self.teacher.probabilities(images)
        if self.prior is not None:
            probs = probs * prior_at_crops(self.prior, geometry, tuple(probs.shape[-2:]))
        return probs

    def __call__(self, batch: dict[str, Any], it: int, lr: float, seed: int) -> StepOutcome:
        """Train on one batch at iteration ``it`` with learning rate ``lr``; ``seed`` seeds every
        random draw of the step (dropout, ClassMix, the augmentation)."""
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        set_lr(self.optimizer, lr)
        src_u8 = batch["src_image"].to(self.device, non_blocking=True)
        src_labels = batch["src_label"].to(self.device, non_blocking=True).long()
        tgt_u8 = batch["tgt_image"].to(self.device, non_blocking=True)
        tgt_gt = batch["tgt_label"].to(self.device, non_blocking=True).long()
        valid = tgt_gt != IGNORE_INDEX
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_src, loss_fd = self._source_losses(normalize(src_u8), src_labels)
        _backward(loss_src if loss_fd is None else loss_src + loss_fd, self.scaler)
        probs = self._teacher_probabilities(normalize(tgt_u8), batch["tgt_geometry"])
        sel = self.selector.select(probs, valid)
        images, labels, weights = classmix(
            src_u8.float() / 255,
            src_labels,
            tgt_u8.float() / 255,
            sel.labels,
            sel.weights,
            self.num_classes,
            generator,
        )
        mixed = normalize(strong_augment(images, generator).mul_(255))  # normalize reads 0..255 values
        with autocast(self.device, enabled=self.amp):
            loss_tgt = _weighted_loss(train_forward(self.net, mixed), labels, weights)
        _backward(loss_tgt, self.scaler)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        distributed.broadcast_buffers(self.student)
        self.teacher.update(self.student, it + 1)
        return StepOutcome(loss_src, loss_tgt, loss_fd, sel, valid, tgt_gt)

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs of the networks, the optimiser, the scaler and the selector."""
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "selector": self.selector.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (the selector's histograms onto this device)."""
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        selector = state["selector"]
        self.selector.load_state_dict(
            {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in selector.items()}
        )


def build_step(
    cfg: OnlineConfig,
    student: nn.Module,
    device: torch.device,
    *,
    feature_distance: FeatureDistance | None = None,
    prior: torch.Tensor | None = None,
) -> OnlineStep:
    """The iteration of ``cfg`` over ``student`` (on ``device``), with a fresh teacher (a copy of
    it), optimiser, loss scaler and selector of ``kc_policy``."""
    selector = build_selector(
        cfg.kc_policy,
        cfg.num_classes,
        threshold=cfg.pseudo_threshold,
        ignore_top=cfg.pseudo_ignore_top,
        ignore_bottom=cfg.pseudo_ignore_bottom,
        portion=cfg.tgt_port,
        window=cfg.cb_window,
    )
    return OnlineStep(
        student,
        distributed.data_parallel(student, device),
        MeanTeacher(student, cfg.ema_alpha),
        _optimizer(student, cfg),
        _grad_scaler(device, cfg.amp),
        selector,
        cfg.num_classes,
        device,
        amp=cfg.amp,
        feature_distance=feature_distance,
        prior=prior,
    )


def _feature_distance(
    cfg: OnlineConfig, arch: str, class_names: list[str], device: torch.device
) -> FeatureDistance | None:
    """The ImageNet feature distance of ``fd_lambda`` (None when 0), its frozen network of
    ``arch`` built from ``pretrained``; refuses in one line weights the architecture lacks."""
    from cbst.models import build_model

    if cfg.fd_lambda == 0:
        return None
    ids = thing_class_ids(class_names)
    try:
        imagenet = build_model(arch, cfg.num_classes, pretrained=cfg.pretrained)
    except ConfigError as exc:
        raise ConfigError(f"--fd-lambda needs the encoder's ImageNet weights: {exc}") from None
    return FeatureDistance(imagenet.to(device), cfg.fd_lambda, ids, cfg.num_classes)


# ------------------------------------------------------------------------------------ run
def online_self_train(cfg: OnlineConfig) -> dict:
    """Run (or resume) one online self-training run; returns ``results.json``'s content."""
    from cbst.checkpoints import load_checkpoint, read_meta, save_checkpoint
    from cbst.evaluation import evaluate_run
    from cbst.models.base import geometry, round_to_stride
    from cbst.selftrain import _datasets, _load_prior
    from cbst.transforms import TrainTransform

    cfg.validate()
    out, state_path = _prepare_output(cfg)
    source, target, val = _datasets(cfg)
    protocol = target.protocol
    names = list(protocol.class_names)
    arch = read_meta(cfg.weights, expect_protocol=protocol.name)["arch"]
    device = select_device(cfg.device)
    feature_distance = _feature_distance(cfg, arch, names, device)  # its weights checked before writing
    distributed.write_once(_write_config, out, cfg)
    configure_backends(device)
    sampler = _rare_class_sampler(cfg, out, source, first_start=state_path is None)

    student, meta = load_checkpoint(cfg.weights, device=device, expect_protocol=protocol.name)
    prior = _load_prior(cfg, out, source, target, device)
    step = build_step(cfg, student, device, feature_distance=feature_distance, prior=prior)
    start = 0
    if state_path is not None:
        state = io.read_torch_file(state_path, "online training state")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"{state_path}: not an online training state; delete it to start over")
        step.load_state_dict(state)
        start = int(state["iteration"])
    distributed.write_once(_truncate_log, out / "log.jsonl", start)

    crop = round_to_stride(cfg.crop_size, geometry(student).pad_multiple)

    def cropper(reference: int | None, domain: int) -> TrainTransform:
        return TrainTransform(
            crop, scale_range=tuple(cfg.scale_rate_range), reference_long_side=reference, domain=domain
        )

    pairs = OnlinePairs(
        source, target, cropper(cfg.origin_size, 0), cropper(cfg.origin_size_tgt, 1), sampler, cfg.seed
    )
    batches = IterationBatches(
        start, cfg.max_iters, cfg.batch_images, distributed.rank(), distributed.world_size()
    )
    loader = DataLoader(
        pairs,
        batch_sampler=batches,
        collate_fn=stack_batch,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        worker_init_fn=signals.quiet_worker,
    )
    counters = _Counters(cfg.num_classes, device, feature_distance is not None)
    is_main = distributed.is_main()
    clock = time.perf_counter()

    def evaluate(iteration: int) -> None:
        metrics = evaluate_run(cfg, student, val, device)
        distributed.write_once(
            io.write_json, out / "metrics" / f"iter_{iteration:06d}.json", metrics.to_json()
        )
        if is_main:
            print(f"iteration {iteration}: mIoU {100 * metrics.miou:.1f}", flush=True)

    def save_state(iteration: int) -> None:
        previous = _latest_state(out)
        path = out / "checkpoints" / f"iter_{iteration:06d}.pt"
        io.make_dirs(path.parent)
        state = {"format": STATE_FORMAT, "iteration": iteration, **step.state_dict()}
        with io.atomic_path(path) as tmp:
            torch.save(state, tmp)
        if previous is not None and previous != path:
            previous.unlink()

    for it, batch in zip(range(start, cfg.max_iters), loader):
        counters.add(step(batch, it, lr_at(cfg, it), _iteration_seed(cfg.seed, it)))
        done = it + 1
        if done % cfg.log_interval == 0 or done == cfg.max_iters:
            record = {"iteration": done, "lr": lr_at(cfg, it)}
            record.update(counters.record(names, cfg.score_pseudo_labels))
            record["lambda"] = dict(zip(names, _same_everywhere(step.selector.thresholds()).tolist()))
            record["seconds"] = round(time.perf_counter() - clock, 3)
            if is_main:
                _append_log(out / "log.jsonl", record)
        if val is not None and (done % cfg.eval_interval == 0 or done == cfg.max_iters):
            evaluate(done)
        if done % cfg.checkpoint_interval == 0 or done == cfg.max_iters:
            distributed.write_once(save_state, done)

    extra = {"mode": "online", "iteration": cfg.max_iters}
    for name, model in (("model.pt", student), ("teacher.pt", step.teacher.model)):
        distributed.write_once(
            save_checkpoint,
            out / name,
            model,
            arch=meta["arch"],
            num_classes=cfg.num_classes,
            protocol=protocol.name,
            extra=extra,
        )
    results = {"mode": "online", "iterations": {}}
    for path in sorted((out / "metrics").glob("iter_*.json")):
        results["iterations"][int(path.stem.split("_")[1])] = json.loads(path.read_text())
    results["lambda"] = dict(zip(names, step.selector.thresholds().tolist()))
    if results["iterations"]:
        results["final"] = results["iterations"][max(results["iterations"])]
    distributed.write_once(io.write_json, out / "results.json", results)
    return results
