"""Self-training rounds: ST, CBST and CBST-SP (and CRST's MRKLD and LRENT) as one resumable pipeline.

Before round 0 the ``source/eval`` stage scores the initial weights on the evaluation split
(``OUTPUT/source_metrics.json``, the baseline of the printed table, ``results.json`` and the
report; ``source_eval=False`` skips it). Each round then runs three stages, recorded in
``OUTPUT/state.json`` as they finish:

1. ``pseudo``: one inference pass over the target training images
   (:func:`cbst.pseudo_labels.pseudo_label_pass`): softmax probabilities (times the spatial
   prior for CBST-SP) feed a :class:`ThresholdEstimator` and are cached at the network's output
   stride; pseudo-labels are then assigned from the cache with the round's thresholds and
   written as labelId PNGs (0 = not selected), colour PNGs with ``save_color``, and ``stats.json`` (the original
   wrote ~150 MiB of full-resolution probabilities per image).
2. ``train``: the round's source subset plus the pseudo-labelled target images, with rare-class
   patch mining, trained from the previous round's weights with a fresh optimiser. CRST's
   options change the loss (:class:`cbst.crst.CrstLoss`); under LRENT the pseudo-label stage
   keeps its probability cache in the round folder for this stage, which deletes it when done.
3. ``eval``: the round's model on the target validation split.

Each result is printed as soon as it exists, and logged (``OUTPUT/log.jsonl``, TensorBoard with
``tensorboard``; :mod:`cbst.loggers`) with every round's training loss.

``resume=True`` skips finished stages; every random draw is seeded from (seed, round, epoch,
image index), so a resumed run ends with the same weights as an uninterrupted one.

Under torchrun every stage is split over the processes (:mod:`cbst.distributed`): each labels
and scores its share of the images and trains on its slice of every batch; the main process
alone writes the configuration, ``state.json``, checkpoints and metrics, and the others wait
for it where they read them.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import torch
import yaml

from cbst import checks, distributed, io, options, runlock
from cbst.checkpoints import load_checkpoint, load_weights_into, read_meta, save_checkpoint
from cbst.config import SelfTrainConfig
from cbst.crst import CrstLoss
from cbst.datasets import build_dataset
from cbst.device import configure_backends, maybe_compile, select_device
from cbst.errors import ConfigError
from cbst.evaluation import evaluate_run
from cbst.loggers import LoggerGroup, logger_names, open_loggers
from cbst.mining import MiningPlan
from cbst.models.base import geometry, round_to_stride
from cbst.optim import build_optimizer
from cbst.priors import load_prior, save_prior, spatial_prior_from_dataset
from cbst.provenance import provenance
from cbst.pseudo_labels import open_kept_cache, pseudo_label_pass, remove_kept_caches
from cbst.registry import LOSSES
from cbst.rounds import RoundPlan, source_subset
from cbst.training import train_epochs
from cbst.transforms import TrainTransform

__all__ = ["SelfTrainConfig", "self_train", "pseudo_label_pass"]

# The options each stage reads besides its round's plan (declared with the options, in
# cbst.config): a run resumes only if every finished stage would read the same values. Other
# options (the round count, --device, ...) may change.
_STAGE_OPTIONS = options.stage_options(SelfTrainConfig)
SOURCE = "source"
"""The ``state.json`` name of the stage before round 0 (``source/eval``: scoring ``weights``)."""
_STAGE_OPTIONS[SOURCE] = ("weights", "amp") + _STAGE_OPTIONS["eval"]
# The plan fields each stage reads, and the options each field is computed from.
_STAGE_PLAN = {
    "pseudo": ("tgt_portion",),
    "train": ("src_portion", "lr", "start_epoch", "end_epoch", "source_seed"),
    "eval": (),
    "source": (),
}
_PLAN_OPTIONS = options.plan_options(SelfTrainConfig)


_STAGES = ("pseudo", "train", "eval")
_ENTRY = re.compile(rf"(\d+/(pseudo|train|eval)|{SOURCE}/eval)")


class RunState:
    """The finished stages of a run and their durations, persisted atomically after every stage.

    ``state.json`` holds ``{"finished": ["ROUND/STAGE", ...], "seconds": {"ROUND/STAGE": s}}``;
    durations are measured with a monotonic clock (wall-clock changes and file times do not
    affect them).
    """

    def __init__(self, output: Path):
        self.path = output / "state.json"
        self.finished: list[str] = []
        self.seconds: dict[str, float] = {}
        self._clock = time.monotonic()
        if self.path.is_file():
            data = io.read_json(self.path, "run state")
            finished = data.get("finished") if isinstance(data, dict) else None
            seconds = data.get("seconds", {}) if isinstance(data, dict) else None
            if (
                not isinstance(finished, list)
                or not all(isinstance(e, str) and _ENTRY.fullmatch(e) for e in finished)
                or not isinstance(seconds, dict)
            ):
                raise io.DataError(
                    f"{self.path}: not a run state (expected {{'finished': ['ROUND/STAGE', ...]}}); "
                    "restore it, or start the run again in a new --output"
                )
            self.finished = list(finished)
            self.seconds = {k: v for k, v in seconds.items() if k in finished}

    def done(self, round_index: int | str, stage: str) -> bool:
        """Whether stage ``stage`` of round ``round_index`` (or of :data:`SOURCE`) has finished."""
        return f"{round_index}/{stage}" in self.finished

    def start_clock(self) -> None:
        """Time the next stage from now."""
        self._clock = time.monotonic()

    def mark(self, round_index: int | str, stage: str) -> None:
        """Record a finished stage and its duration (the file is written by the main process only)."""
        entry = f"{round_index}/{stage}"
        self.finished.append(entry)
        self.seconds[entry] = round(time.monotonic() - self._clock, 3)
        self._clock = time.monotonic()
        if distributed.is_main():
            io.write_json(self.path, {"finished": self.finished, "seconds": self.seconds})

    def forget(self, entries: list[str]) -> None:
        """Drop finished stages whose files are gone (they are redone); nothing is written yet."""
        self.finished = [e for e in self.finished if e not in entries]
        self.seconds = {k: v for k, v in self.seconds.items() if k not in entries}


def _stage_problem(out: Path, index: int, stage: str, needs_cache: bool) -> str | None:
    """Why a stage recorded as finished cannot be trusted (a file missing or incomplete), or None.

    ``needs_cache``: the round's LRENT training is still to run, so its kept probability cache
    belongs to the pseudo-label stage's files.
    """
    from zipfile import is_zipfile

    rdir = out / f"round_{index}"
    try:
        if stage == "pseudo":
            stats = io.read_json(rdir / "stats.json", "pseudo-label statistics")
            if not isinstance(stats, dict) or "thresholds" not in stats:
                return f"{rdir / 'stats.json'} is not the stage's statistics"
            if not any((rdir / "pseudo_labelIds").glob("*.png")):
                return f"{rdir / 'pseudo_labelIds'} holds no pseudo-labels"
            if needs_cache:
                open_kept_cache(rdir, device="cpu").close()  # LRENT's training reads it
        elif stage == "train":
            if not is_zipfile(rdir / "model.pt"):  # torch.save writes a zip; a cut one has no end
                return f"{rdir / 'model.pt'} is missing or incomplete"
        elif not isinstance(io.read_json(rdir / "metrics.json", "round metrics"), dict):
            return f"{rdir / 'metrics.json'} is not the round's metrics"
    except (io.DataError, OSError) as exc:
        return str(exc)
    return None


def _dependencies(index: int, stage: str) -> list[str]:
    """The stages whose files ``stage`` of round ``index`` was computed from."""
    previous = [f"{index - 1}/train"] if index > 0 else []
    return {"pseudo": previous, "train": [f"{index}/pseudo", *previous], "eval": [f"{index}/train"]}[stage]


def _check_finished_files(out: Path, cfg: SelfTrainConfig, state: RunState) -> None:
    """Redo, saying so, every finished stage whose files are gone, and the stages built on them."""
    rounds = [e for e in state.finished if not e.startswith(f"{SOURCE}/")]
    entries = sorted(rounds, key=lambda e: (int(e.split("/")[0]), _STAGES.index(e.split("/")[1])))
    redo: list[str] = []
    if state.done(SOURCE, "eval") and not (out / "source_metrics.json").is_file():
        print(
            f"self-train: {out / 'source_metrics.json'} is missing: scoring the source model again",
            flush=True,
        )
        redo.append(f"{SOURCE}/eval")
    for entry in entries:
        index, stage = int(entry.split("/")[0]), entry.split("/")[1]
        if any(dep in redo or dep not in state.finished for dep in _dependencies(index, stage)):
            redo.append(entry)
            continue
        needs_cache = cfg.lrent_alpha is not None and f"{index}/train" not in state.finished
        problem = _stage_problem(out, index, stage, needs_cache)
        if problem is not None:
            print(f"self-train: {problem}: redoing round {index}'s {stage} stage", flush=True)
            redo.append(entry)
    if len(redo) > 1:
        print(f"self-train: redoing {len(redo)} stages in all ({', '.join(redo)})", flush=True)
    state.forget(redo)


def _prepare_output(cfg: SelfTrainConfig) -> tuple[Path, RunState]:
    """Check OUTPUT before any work: a usable folder with no started run, or the run resumed.

    Writes nothing; ``_write_config`` does once every input has been checked.
    """
    out = Path(cfg.output)
    io.check_output_dir(out)
    io.check_run_folder(out, "self-train")
    distributed.checked_on_main(lambda: runlock.check_free(out))
    state = RunState(out)
    saved = out / "config.yaml"
    if state.finished and not cfg.resume and _finished_run(saved, state):
        raise ConfigError(
            f"{out}: this run is finished; use --num-round N with --resume to add rounds, or another --output"
        )
    if state.finished and not cfg.resume:
        raise ConfigError(
            f"{out}: holds a started run ({len(state.finished)} stages finished); "
            "pass --resume to continue it or choose another --output"
        )
    if cfg.resume and state.finished:
        _check_resumable(out, cfg, state)
        _check_resume(saved, cfg, state.finished)
        _check_finished_files(out, cfg, state)
    return out, state


def _finished_run(saved: Path, state: RunState) -> bool:
    """Whether every round the saved configuration planned has trained (and been evaluated)."""
    if not saved.is_file():
        return False
    config = checks.read_saved_config(saved)
    try:
        rounds = int(config.get("num_round", 0))
    except (TypeError, ValueError):
        return False
    stages = ("train", "eval") if config.get("eval_split") else ("train",)
    return rounds > 0 and all(state.done(i, stage) for i in range(rounds) for stage in stages)


def _check_resumable(out: Path, cfg: SelfTrainConfig, state: RunState) -> None:
    """A resume needs the saved options and may not drop rounds that the run already started."""
    if not (out / "config.yaml").is_file():
        raise io.DataError(
            f"{out / 'config.yaml'}: missing, but {state.path.name} lists {len(state.finished)} finished "
            "stages; without it the options they used cannot be checked: restore it, or start a new "
            "run with another --output"
        )
    started = 1 + max((int(e.split("/")[0]) for e in state.finished if e[0].isdigit()), default=-1)
    if cfg.num_round < started:
        raise ConfigError(
            f"--num-round {cfg.num_round} is below the {started} rounds that {out} already holds; "
            f"resume with --num-round {started} or more (a resume never drops finished rounds)"
        )


def _check_resume(path: Path, cfg: SelfTrainConfig, finished: list[str]) -> None:
    """Refuse to resume with an option value that differs from what a finished stage used.

    Paths are compared resolved and the output folder not at all, so a run resumes from any
    working directory and after being moved; options no finished stage read may change (a
    corrected learning rate after a diverged round, more rounds).
    """
    saved = checks.read_saved_config(path)
    fields = {f.name for f in dataclasses.fields(SelfTrainConfig)}
    old = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k in fields})
    try:
        old_plans = old.schedule()
    except ValueError as exc:
        raise io.DataError(f"{path}: invalid saved schedule ({exc})") from None
    before, now, new_plans = old.saved_form(), cfg.saved_form(), cfg.schedule()
    for entry in finished:
        where, stage = entry.split("/")[0], entry.split("/")[1]
        if where == SOURCE:
            diff = checks.changed(before, now, dict.fromkeys(_STAGE_OPTIONS[SOURCE]))
            if diff:
                raise checks.resume_refusal(path, before, now, diff, "the source model's evaluation")
            continue
        index = int(where)
        if index >= len(new_plans):
            continue
        names = list(_STAGE_OPTIONS[stage])
        for field in _STAGE_PLAN[stage]:
            if getattr(old_plans[index], field) != getattr(new_plans[index], field):
                names += _PLAN_OPTIONS[field]
        diff = checks.changed(before, now, dict.fromkeys(names))
        if diff:
            raise checks.resume_refusal(path, before, now, diff, f"round {index}'s {stage} stage")


def _write_config(out: Path, cfg: SelfTrainConfig) -> None:
    """Lock OUTPUT (creating it) and save the run's configuration: the run starts."""
    runlock.start(out, "cbst self-train")
    io.write_text(out / "config.yaml", yaml.safe_dump(cfg.saved_form(), sort_keys=False))


def _check_weights(cfg: SelfTrainConfig, protocol: str) -> None:
    """The initial weights must be a readable cbst checkpoint for the target's label protocol."""
    read_meta(cfg.weights, expect_protocol=protocol)


def _load_prior(cfg: SelfTrainConfig, out: Path, source, target, device: torch.device) -> torch.Tensor | None:
    """The CBST-SP prior at the target images' resolution, on the device (resized once, here).

    ``with_prior="source"`` counts it on the source labels the first time and keeps it as
    ``OUTPUT/prior.npy`` (the main process does, the others wait for the file); otherwise it is
    read from a .npy or the original's .mat file.
    """
    if cfg.with_prior is None:
        return None
    w, h = io.image_size(target.samples[0].image)
    path = out / "prior.npy" if cfg.with_prior == "source" else Path(cfg.with_prior)

    def count_if_missing() -> None:
        if not path.is_file():
            save_prior(path, spatial_prior_from_dataset(source, (h, w), progress=cfg.progress))

    if cfg.with_prior == "source":
        distributed.write_once(count_if_missing)
    return torch.from_numpy(load_prior(path, cfg.num_classes, size=(h, w))).to(device)


def _round_seed(cfg: SelfTrainConfig, plan: RoundPlan) -> int:
    """A seed for the round's training randomness that differs between rounds."""
    return cfg.seed * 1000 + plan.index


def _train_round(
    cfg: SelfTrainConfig,
    plan: RoundPlan,
    model: torch.nn.Module,
    source,
    target,
    stats: dict,
    device: torch.device,
    loss_fn: CrstLoss | None = None,
    logger: LoggerGroup | None = None,
    label: str = "",
) -> None:
    """Train the model for one round on the source subset plus the pseudo-labelled target
    (with CRST's loss ``loss_fn`` when given), logging its steps and epochs to ``logger``."""
    mining = (
        MiningPlan(cfg.mine_port, stats["mine_id"], stats["mine_id_priority"]) if cfg.mine_port > 0 else None
    )
    crop = round_to_stride(cfg.crop_size, geometry(model).pad_multiple)
    seed = _round_seed(cfg, plan)

    def transform(reference: int | None, offset: int) -> TrainTransform:
        return TrainTransform(
            crop,
            scale_range=tuple(cfg.scale_rate_range),
            reference_long_side=reference,
            mining=mining,
            seed=seed * 2 + offset,
            domain=offset,
        )

    subset = source.subset(source_subset(len(source), plan.src_portion, plan.source_seed))
    parts = [
        subset.with_transform(transform(cfg.origin_size, 0)),
        target.with_transform(transform(cfg.origin_size_tgt, 1)),
    ]
    data = torch.utils.data.ConcatDataset([p for p in parts if len(p) > 0])
    optimizer = build_optimizer(
        model, plan.lr, name=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    train_epochs(
        model,
        data,
        epochs=plan.end_epoch,
        start_epoch=plan.start_epoch,
        batch_size=cfg.batch_images,
        base_lr=plan.lr,
        lr_policy="fixed",
        device=device,
        optimizer=optimizer,
        num_workers=cfg.num_workers,
        seed=seed,
        amp=cfg.amp,
        progress=cfg.progress,
        loss_fn=loss_fn or LOSSES.get(cfg.loss)(),
        sync_bn=cfg.sync_bn,
        warmup_iters=cfg.warmup_iters,
        clip_grad_norm=cfg.clip_grad_norm,
        logger=logger,
        on_epoch_end=_epoch_logger(logger, plan),
        label=label,
        epoch_base=plan.start_epoch,
    )


def _epoch_logger(logger: LoggerGroup | None, plan: RoundPlan):
    """``on_epoch_end`` recording a round's epoch (numbered within the round) to ``logger``."""
    if logger is None:
        return None

    def record(epoch: int, stats: dict) -> None:
        logger.record("epoch", {**stats, "epoch": epoch - plan.start_epoch + 1}, epoch + 1)

    return record


def _crst_loss(
    cfg: SelfTrainConfig, rdir: Path, stats: dict, prior: torch.Tensor | None, device: torch.device
) -> CrstLoss | None:
    """The round's CRST loss, or None for plain cross-entropy (ST, CBST, CBST-SP).

    Under LRENT it reads the round's probability cache, kept under the round folder by the
    pseudo-label stage (under torchrun every process reads every process's cache), and the
    round's thresholds λ from ``stats``.
    """
    if cfg.mr_weight_kld == 0 and cfg.mr_weight_src == 0 and cfg.lrent_alpha is None:
        return None
    cache = thresholds = None
    if cfg.lrent_alpha is not None:
        cache = open_kept_cache(rdir, device=device)
        thresholds = torch.tensor(list(stats["thresholds"].values()), dtype=torch.float32, device=device)
    return CrstLoss(
        mr_weight_kld=cfg.mr_weight_kld,
        mr_weight_src=cfg.mr_weight_src,
        alpha=cfg.lrent_alpha,
        cache=cache,
        thresholds=thresholds,
        prior=prior,
    )


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
        if self.model is None:
            self.model, self.meta = load_checkpoint(path, device=self.device, expect_protocol=self.protocol)
            self.net = maybe_compile(self.model, self.compile)
        else:
            load_weights_into(self.model, path, expect_protocol=self.protocol)
        return self.net


def _datasets(cfg: SelfTrainConfig):
    """(source, target train, target val or None), verified before any work starts."""
    source = build_dataset(
        cfg.dataset,
        cfg.data_root,
        split=cfg.split,
        num_classes=cfg.num_classes,
        list_file=cfg.list_file,
        progress=cfg.progress,
    )
    target = build_dataset(
        cfg.dataset_tgt,
        cfg.data_root_tgt,
        split=cfg.split_tgt,
        num_classes=cfg.num_classes,
        list_file=cfg.list_tgt,
        with_labels=cfg.score_pseudo_labels,
        progress=cfg.progress,
    )
    val = (
        build_dataset(
            cfg.dataset_tgt,
            cfg.data_root_tgt,
            split=cfg.eval_split,
            num_classes=cfg.num_classes,
            progress=cfg.progress,
        )
        if cfg.eval_split
        else None
    )
    return source, target, val


def _announce(text: str) -> None:
    """One result line on the console as soon as it exists (the main process alone prints)."""
    if distributed.is_main():
        print(text, flush=True)


def _evaluate(cfg: SelfTrainConfig, model: torch.nn.Module, val, device: torch.device, desc: str) -> dict:
    """Val metrics of ``model`` with the run's evaluation options, as JSON with its provenance."""
    metrics = evaluate_run(cfg, model, val, device, desc)
    return {**metrics.to_json(), "provenance": provenance(device, cfg.amp)}


def _source_stage(
    cfg: SelfTrainConfig, out: Path, state: RunState, reused: _RoundModel, val, device, logger: LoggerGroup
) -> dict | None:
    """The ``source/eval`` stage: the initial weights' val metrics, computed once before round 0.

    Returns them (also when an earlier run computed them), or None when skipped or not known.
    """
    path = out / "source_metrics.json"
    if val is not None and cfg.source_eval and not state.done(SOURCE, "eval"):
        metrics = _evaluate(cfg, reused.load(Path(cfg.weights)), val, device, "source model · evaluate")
        distributed.write_once(io.write_json, path, metrics)
        logger.record("source", _loggable(metrics), 0)
        state.mark(SOURCE, "eval")
    if not path.is_file():
        return None
    metrics = io.read_json(path, "source-model metrics")
    _announce(f"source model: mIoU {100 * metrics['miou']:.1f}")
    return metrics


def _loggable(metrics: dict) -> dict:
    """The numbers of a metrics JSON worth logging (the provenance is in results.json)."""
    return {k: v for k, v in metrics.items() if k != "provenance"}


def _pseudo_record(stats: dict) -> dict:
    """A round's pseudo-label numbers for the loggers: λ, class shares, selection and accuracy."""
    total = sum(stats["selected_pixels"].values())
    return {
        "portion": stats["portion"],
        "selected_fraction": stats["selected_fraction"],
        "pseudo_label_accuracy": stats.get("pseudo_label_accuracy"),
        "thresholds": stats["thresholds"],
        "class_shares": {k: (n / total if total else 0.0) for k, n in stats["selected_pixels"].items()},
        "seconds": stats.get("seconds"),
    }


def _write_results(cfg: SelfTrainConfig, out: Path, source: dict | None, results: dict, device) -> None:
    """``OUTPUT/results.json``: the source model's and every round's metrics, with the provenance."""
    if distributed.is_main():
        io.write_json(
            out / "results.json",
            {"source": source, "rounds": results, "provenance": provenance(device, cfg.amp)},
        )


@runlock.releasing
def self_train(cfg: SelfTrainConfig) -> dict:
    """Run (or resume) every round; returns {round index: metrics json} of the evaluations.

    The source model's metrics (when scored) are in ``OUTPUT/results.json`` beside them.
    """
    cfg.validate()
    out, state = _prepare_output(cfg)
    source, target, val = _datasets(cfg)
    cfg.check_sizes(len(source), len(target))
    protocol_name = target.protocol.name
    if not state.done(0, "train"):
        _check_weights(cfg, protocol_name)
    device = select_device(cfg.device)
    distributed.check_sync_bn(cfg.sync_bn, device)
    distributed.write_once(_write_config, out, cfg)
    logger = open_loggers(logger_names(cfg.loggers, cfg.tensorboard), out)
    try:
        return _run_rounds(cfg, out, state, (source, target, val), device, logger)
    finally:
        logger.close()


def _run_rounds(
    cfg: SelfTrainConfig, out: Path, state: RunState, data: tuple, device: torch.device, logger: LoggerGroup
) -> dict:
    """The source stage and every round's stages of :func:`self_train`, logged through ``logger``;
    ``data`` is (source, target train, target val or None)."""
    source, target, val = data
    protocol_name = target.protocol.name
    configure_backends(device)
    prior = _load_prior(cfg, out, source, target, device)
    weights = Path(cfg.weights)
    reused = _RoundModel(device, protocol_name, cfg.compile)
    source_metrics = _source_stage(cfg, out, state, reused, val, device, logger)
    results: dict[int, dict] = {}
    state.start_clock()
    for plan in cfg.schedule():
        rdir = out / f"round_{plan.index}"
        ckpt = rdir / "model.pt"
        label = f"round {plan.index + 1}/{cfg.num_round} · "  # counted from 1, as the epochs
        round_logger = logger.scoped(round=plan.index)
        model = None
        if not state.done(plan.index, "train"):
            model = reused.load(weights)
        if not state.done(plan.index, "pseudo"):
            distributed.write_once(remove_kept_caches, rdir)  # an interrupted pass's, any process's
            stats = pseudo_label_pass(
                model,
                target,
                rdir,
                portion=plan.tgt_portion,
                policy=cfg.kc_policy,
                prior=prior,
                long_side=cfg.test_scales,
                scales=tuple(cfg.pseudo_scales),
                flip=cfg.test_flipping,
                exact=cfg.exact_thresholds,
                bins=cfg.threshold_bins,
                batch_size=cfg.pseudo_batch,
                mine_id_number=cfg.mine_id_number,
                mine_thresh=cfg.mine_thresh,
                num_workers=cfg.num_workers,
                amp=cfg.amp,
                progress=cfg.progress,
                keep_cache=cfg.lrent_alpha is not None,  # LRENT's training reads it
                lrent_alpha=cfg.lrent_alpha,
                label=label,
                save_color=cfg.save_color,
            )
            round_logger.record("pseudo", _pseudo_record(stats), plan.index)
            state.mark(plan.index, "pseudo")
        if not state.done(plan.index, "train"):
            stats = io.read_json(rdir / "stats.json", "pseudo-label statistics")
            pseudo = target.with_labels(rdir / "pseudo_labelIds")
            loss_fn = _crst_loss(cfg, rdir, stats, prior, device)
            _train_round(cfg, plan, model, source, pseudo, stats, device, loss_fn, round_logger, label)
            distributed.write_once(
                save_checkpoint,
                ckpt,
                reused.model,
                arch=reused.meta["arch"],
                num_classes=cfg.num_classes,
                protocol=protocol_name,
                round=plan.index,
                epoch=plan.end_epoch,
            )
            state.mark(plan.index, "train")
        distributed.write_once(remove_kept_caches, rdir)  # LRENT's, once every process has trained
        weights = ckpt
        if val is not None and not state.done(plan.index, "eval"):
            if model is None:
                model = reused.load(ckpt)
            metrics = _evaluate(cfg, model, val, device, f"{label}evaluate")
            distributed.write_once(io.write_json, rdir / "metrics.json", metrics)
            round_logger.record("val", _loggable(metrics), plan.index)
            state.mark(plan.index, "eval")
        if state.done(plan.index, "eval"):
            results[plan.index] = io.read_json(rdir / "metrics.json", "round metrics")
            _announce(f"round {plan.index}: mIoU {100 * results[plan.index]['miou']:.1f}")
    _write_results(cfg, out, source_metrics, results, device)
    return results
