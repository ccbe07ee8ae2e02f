"""The run configurations of self-training and source training, every option declared once.

:class:`SelfTrainConfig` (``cbst self-train``, :func:`cbst.selftrain.self_train`) and
:class:`SourceTrainConfig` (``cbst train-source``, :func:`cbst.sourcetrain.train_source`) are
dataclasses whose fields are :func:`cbst.options.option` declarations: flag, aliases, help,
type, choices, range and which self-training stages read the option. The options the two
share (data, training, evaluation, runtime) are declared once below, as the sections
``DataSection``, ``TrainingSection``, ``EvaluationSection`` and ``RuntimeSection``, and used by both.

This module imports neither torch nor the modules that need it, so the command line builds its
parser (and ``--help``) from these classes in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbst import checks, options
from cbst.errors import ConfigError, MissingInputError
from cbst.options import DEVICE, INTEGER, NUMBER, TEXT, Numbers, ValueType, option
from cbst.registry import ARCHITECTURES, DATASETS, LOSSES, SELECTION_POLICIES
from cbst.rounds import SOURCE_SAMPLE_POLICIES, RoundPlan, round_schedule, source_subset

__all__ = ["LR_POLICIES", "MODES", "SelfTrainConfig", "SourceTrainConfig", "default_num_workers"]

LR_POLICIES: tuple[str, ...] = ("fixed", "poly", "linear", "step")
"""Learning-rate policies of source training (:func:`cbst.optim.lr_at`)."""
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
"""Optimisers :func:`cbst.optim.build_optimizer` builds."""

PSEUDO, TRAIN, EVAL = ("pseudo",), ("train",), ("eval",)
"""The self-training stages that read an option (the resume rule: see cbst.selftrain)."""
DATA = ("pseudo", "train")
"""Stages reading the inputs (the evaluation stage reads only the target's)."""
PAIR = Numbers(pair=True)
MODES: tuple[str, ...] = ("rounds", "online")
"""The forms of self-training: CBST's offline rounds, or one online run with a mean teacher."""
ONLINE = "online mode (--mode online; docs/method.md §14)"
"""The ``--help`` section of the options only the online mode reads."""
ROUNDS_ONLY: tuple[str, ...] = ("mr_weight_kld", "mr_weight_src", "lr_weight_ent")
"""Options the online mode has no form of yet: set with ``--mode online`` they are an error."""


class Names(ValueType):
    """Comma-separated names ('jsonl,tensorboard'), or a YAML list of them; '' for none."""

    metavar = "NAME[,NAME...]"

    def parse(self, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ValueError(f"expected comma-separated names, got {options.shown(value)}")
        return tuple(name.strip() for name in items if name.strip())

    def show(self, value: Any) -> str:
        return ",".join(value) or "none"


def default_num_workers(limit: int = 8) -> int:
    """Default data-loader worker processes on the command line: the usable CPU cores, at
    most ``limit``.

    Decoding in workers overlaps it with the forward pass even on 2 cores; beyond about 8
    workers a loader no longer speeds up one GPU and only costs memory. Under torchrun the
    cores are shared by the job's processes on this machine (``LOCAL_WORLD_SIZE``).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(limit, (cores or 1) // processes))


# ---------------------------------------------------------------------------- shared sections


class DataSection:
    """The data options both trainings share."""

    @staticmethod
    def dataset(default: Any = "gta5", help: str = "source dataset layout", stages=DATA) -> Any:
        return option(default, help, choices=DATASETS.names, stages=stages, section="data")

    @staticmethod
    def data_root(help: str = "source dataset root, in its own layout", stages=DATA) -> Any:
        return option(help=help, metavar="DIR", path=True, stages=stages, section="data")

    @staticmethod
    def split(help: str = "source split", stages=DATA) -> Any:
        return option("train", help, stages=stages, section="data")

    @staticmethod
    def list_file(help: str = "source list file (image [TAB label] per line)", stages=DATA) -> Any:
        return option(
            None,
            help + "; default: the split's images",
            flags="--list",
            type=TEXT,
            metavar="FILE",
            path=True,
            stages=stages,
            section="data",
        )

    @staticmethod
    def num_classes(stages=DATA + EVAL) -> Any:
        return option(
            19,
            "number of classes of the label protocol (19: GTA5/Cityscapes; 16: SYNTHIA)",
            range="positive",
            stages=stages,
            section="data",
        )


class TrainingSection:
    """The training options both trainings share (their defaults differ)."""

    @staticmethod
    def batch_images(default: int, help: str = "", stages=TRAIN) -> Any:
        return option(
            default,
            "images per batch, over all processes under torchrun" + help,
            flags=("--batch-images", "--batch-size"),
            range="positive",
            stages=stages,
            section="training",
        )

    @staticmethod
    def crop_size(stages=TRAIN) -> Any:
        return option(
            500,
            "square crop side; rounded up to the model's pad multiple (8 for cbst's networks: 500 -> 504)",
            range="positive",
            stages=stages,
            section="training",
        )

    @staticmethod
    def scale_rate_range(stages=TRAIN) -> Any:
        return option(
            (0.7, 1.3),
            "range of the random scale factor rho of each crop",
            flags=("--scale-rate-range", "--scale-range"),
            type=PAIR,
            stages=stages,
            section="training",
        )

    @staticmethod
    def origin_size(help: str, flags: str = "--origin-size", stages=TRAIN) -> Any:
        return option(
            None,
            help,
            flags=flags,
            type=INTEGER,
            range="positive",
            metavar="L",
            stages=stages,
            section="training",
        )

    @staticmethod
    def momentum(stages=TRAIN) -> Any:
        return option(0.9, "SGD momentum", range="non_negative", stages=stages, section="training")

    @staticmethod
    def weight_decay(stages=TRAIN) -> Any:
        return option(5e-4, "SGD weight decay", range="non_negative", stages=stages, section="training")

    @staticmethod
    def optimizer(stages=TRAIN) -> Any:
        return option(
            "sgd",
            "sgd (the original's, with --momentum) or adamw (transformers; DAFormer: --base-lr 6e-5, "
            "--weight-decay 0.01)",
            choices=OPTIMIZERS,
            stages=stages,
            section="training",
        )

    @staticmethod
    def warmup_iters(stages=TRAIN) -> Any:
        return option(
            0,
            "linear lr warm-up over the first N iterations (DAFormer: 1500); 0 = none",
            range="non_negative",
            metavar="N",
            stages=stages,
            section="training",
        )

    @staticmethod
    def clip_grad_norm(stages=TRAIN) -> Any:
        return option(
            None,
            "clip the gradients' global L2 norm to F before each step; default: no clipping",
            type=NUMBER,
            range="positive",
            metavar="F",
            stages=stages,
            section="training",
        )

    @staticmethod
    def loss(stages=TRAIN) -> Any:
        return option(
            "cross_entropy",
            "training loss (cbst.registry.LOSSES)",
            choices=LOSSES.names,
            stages=stages,
            section="training",
        )

    @staticmethod
    def seed(help: str, stages=TRAIN, plan=()) -> Any:
        return option(0, help, flags=("--seed", "--seed-int"), stages=stages, plan=plan, section="training")

    @staticmethod
    def rcs_temperature(default: float, help: str, stages=TRAIN, section: str = "training") -> Any:
        return option(default, help, range="non_negative", metavar="T", stages=stages, section=section)

    @staticmethod
    def rcs_min_pixels(stages=TRAIN, section: str = "training") -> Any:
        return option(
            3000,
            "rare class sampling: an image counts as holding a class above this many pixels",
            range="non_negative",
            stages=stages,
            section=section,
        )

    @staticmethod
    def sync_bn(stages=TRAIN) -> Any:
        return option(
            False,
            "under torchrun on GPUs: batch-norm statistics over the global batch instead of "
            "each process's slice (SyncBatchNorm; for models whose batch norm trains, e.g. small)",
            stages=stages,
            section="training",
        )


class EvaluationSection:
    """The evaluation options both trainings share."""

    @staticmethod
    def eval_split(help: str, stages=EVAL, none: tuple[str, ...] = ()) -> Any:
        return option("val", help, none=none, stages=stages, section="evaluation")

    @staticmethod
    def eval_long_side(stages=EVAL) -> Any:
        return option(
            None,
            "resize evaluation images to this longer side (default: their own size)",
            type=INTEGER,
            range="positive",
            metavar="PX",
            stages=stages,
            section="evaluation",
        )


class RuntimeSection:
    """Where and how a command runs, never what it computes (amp excepted: it changes the
    numbers a little, so the stages that use it record it)."""

    @staticmethod
    def device() -> Any:
        return option(
            "auto",
            "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps",
            type=DEVICE,
            runtime=True,
            section="runtime",
        )

    @staticmethod
    def num_workers(default: int) -> Any:
        return option(
            default,
            "data-loader worker processes; on the command line by default the usable CPU cores "
            "(divided among the processes of a torchrun job on this machine), at most 8",
            range="non_negative",
            runtime=True,
            cli_default=default_num_workers,
            section="runtime",
        )

    @staticmethod
    def amp(stages=()) -> Any:
        return option(
            True,
            "float32 instead of bf16 autocast (used on CUDA and on CPUs with native bf16)",
            stages=stages,
            section="runtime",
        )

    @staticmethod
    def progress() -> Any:
        return option(
            True, "no progress bars", flags=("--no-progress", "--quiet"), runtime=True, section="runtime"
        )

    @staticmethod
    def compile() -> Any:
        return option(
            False,
            "torch.compile the model (off by default: compilation repeats for every input size "
            "and train/eval mode and is not yet shown to pay for itself on an ordinary run)",
            runtime=True,
            section="runtime",
        )

    @staticmethod
    def output(help: str = "run folder (config, state, checkpoints)") -> Any:
        return option(
            help=help, flags=("--output", "--out"), metavar="DIR", path=True, runtime=True, section="run"
        )

    @staticmethod
    def resume(help: str = "continue a killed run from its last finished stage; needs only --output") -> Any:
        return option(False, help, runtime=True, section="run")

    @staticmethod
    def loggers() -> Any:
        """``--loggers``: where training scalars go; no stage reads it (a resumed run may change it)."""
        return option(
            ("jsonl",),
            "where training scalars go: jsonl (OUT/log.jsonl), tensorboard, or a logger a module "
            "given with --import registers; '' for none",
            type=Names(),
            section="run",
        )

    @staticmethod
    def tensorboard() -> Any:
        """``--tensorboard``: also log to TensorBoard (as ``--loggers ...,tensorboard``)."""
        return option(False, "write TensorBoard scalars to OUT/tensorboard", section="run")


# ---------------------------------------------------------------------------- self-training


def _unset() -> None:
    """The command-line default of a mode-dependent option: unset, the mode's value applies."""
    return None


def mode_dependent(declaration: Any, online: Any) -> Any:
    """``declaration`` (an :func:`option` field) whose default is ``online`` under ``--mode
    online`` (DAFormer's value) and its own in rounds, wherever the command line and the
    config files leave it unset (:meth:`SelfTrainConfig.with_mode_defaults`)."""
    spec = dict(declaration.metadata["option"])
    rounds = declaration.default
    show = spec["type"].show
    spec.update(
        help=f"{spec['help']} (--mode online: DAFormer's {show(online)})",
        cli_default=_unset,
        shown_default=show(rounds),
    )
    return dataclasses.field(default=rounds, metadata={"option": spec, "online_default": online})


@options.declared
@dataclass
class SelfTrainConfig:
    """Everything a self-training run depends on; saved as ``OUTPUT/config.yaml``.

    ``stages`` of each option say which stages of a round read it: a run resumes only if every
    finished stage would read the same values; ``plan`` options feed the round schedule.
    """

    weights: str = option(
        help="source model: a cbst checkpoint (see cbst convert)",
        metavar="FILE",
        path=True,
        stages=DATA,
        section="data",
    )
    output: str = RuntimeSection.output()
    data_root: str = DataSection.data_root()
    data_root_tgt: str = option(
        help="target dataset root", metavar="DIR", path=True, stages=DATA + EVAL, section="data"
    )
    mode: str = option(
        "rounds",
        "rounds: CBST's offline rounds; online: one run with a mean teacher labelling each target "
        "batch, ClassMix and rare class sampling (DACS/DAFormer), selected by --kc-policy",
        choices=MODES,
        section="mode",
    )
    dataset: str = DataSection.dataset(help="source dataset")
    split: str = DataSection.split()
    list_file: str | None = DataSection.list_file()
    dataset_tgt: str = DataSection.dataset("cityscapes", "target dataset", stages=DATA + EVAL)
    split_tgt: str = option("train", "target split to pseudo-label", stages=DATA, section="data")
    list_tgt: str | None = option(
        None,
        "target list file, e.g. the original's 505-image train.lst; default: the split's images",
        type=TEXT,
        metavar="FILE",
        path=True,
        stages=DATA,
        section="data",
    )
    eval_split: str | None = EvaluationSection.eval_split(
        "target split evaluated after every round ('none' to skip)", none=("none",)
    )
    num_classes: int = DataSection.num_classes()
    # schedule (the original solve_AO.py defaults)
    num_round: int = option(12, "number of self-training rounds", range="positive", section="round schedule")
    init_tgt_port: float = option(
        0.3,
        "portion of target pixels pseudo-labelled in round 0",
        range="fraction",
        plan=("tgt_portion",),
        section="round schedule",
    )
    step_tgt_port: float = option(
        0.05,
        "growth of the target portion per round",
        range="non_negative",
        plan=("tgt_portion",),
        section="round schedule",
    )
    max_tgt_port: float = option(
        0.5, "largest target portion", range="fraction", plan=("tgt_portion",), section="round schedule"
    )
    init_src_port: float = option(
        0.3,
        "portion of source images trained on in round 0",
        range="fraction",
        plan=("src_portion",),
        section="round schedule",
    )
    step_src_port: float = option(
        0.0025,
        "growth of the source portion per round",
        range="non_negative",
        plan=("src_portion",),
        section="round schedule",
    )
    max_src_port: float = option(
        0.06, "largest source portion", range="fraction", plan=("src_portion",), section="round schedule"
    )
    epoch_per_round: int = option(
        2,
        "training epochs per round",
        range="positive",
        plan=("start_epoch", "end_epoch"),
        section="round schedule",
    )
    base_lr: float = mode_dependent(
        option(
            1e-4,
            "learning rate of round 0 (online: of the run)",
            range="positive",
            plan=("lr",),
            section="round schedule",
        ),
        6e-5,
    )
    lr_decay: float = option(
        math.sqrt(2.0),
        "each round's learning rate is the previous one's divided by this",
        range="positive",
        plan=("lr",),
        shown_default="sqrt(2) = 1.414",
        section="round schedule",
    )
    source_sample_policy: str = option(
        "cumulative",
        "cumulative: nested source subsets (constant seed); random: a new draw each round",
        choices=SOURCE_SAMPLE_POLICIES,
        plan=("source_seed",),
        section="round schedule",
    )
    seed: int = TrainingSection.seed(
        "seed of the source subsets, crops, flips and shuffles", plan=("source_seed",)
    )
    # pseudo-labels
    kc_policy: str = option(
        "cb",
        "pseudo-label selection policy: cb = class-balanced thresholds (CBST); global = one threshold "
        "(ST); fixed = DAFormer's confidence-weighted labels (--mode online only)",
        choices=SELECTION_POLICIES.names,
        stages=PSEUDO,
        section="pseudo-labels",
    )
    with_prior: str | None = option(
        None,
        "spatial prior for CBST-SP: a .npy from 'cbst prior', the original's prior_array.mat, or "
        "'source' to count it on the source labels now; 'none' (default) for none (--mode online: "
        "with --kc-policy cb or global)",
        type=TEXT,
        none=("none", "false", ""),
        metavar="FILE|source",
        path=True,
        stages=PSEUDO + TRAIN,
        section="pseudo-labels",
    )
    test_scales: int | None = option(
        None,
        "longer side the target images are resized to for pseudo-labelling (1850 in the README; "
        "default: their own size)",
        type=INTEGER,
        range="positive",
        metavar="L",
        stages=PSEUDO,
        section="pseudo-labels",
    )
    test_flipping: bool = option(
        True,
        "do not average with the horizontally flipped image",
        flags="--no-test-flipping",
        stages=PSEUDO,
        section="pseudo-labels",
    )
    pseudo_scales: tuple[float, ...] = option(
        (1.0,),
        "scale factors (after --test-scales) whose probabilities are averaged, e.g. 0.75,1.0,1.25 "
        "(the original allowed one scale)",
        flags=("--pseudo-scales", "--scales"),
        type=Numbers(),
        stages=PSEUDO,
        section="pseudo-labels",
    )
    exact_thresholds: bool = option(
        False,
        "exact thresholds (memory grows with pixels) instead of --threshold-bins histograms",
        stages=PSEUDO,
        section="pseudo-labels",
    )
    threshold_bins: int = option(
        65536,
        "histogram bins per class of the thresholds",
        range="positive",
        stages=PSEUDO,
        section="pseudo-labels",
    )
    pseudo_batch: int = option(
        1,
        "images per inference batch",
        flags=("--pseudo-batch", "--inference-batch"),
        range="positive",
        stages=PSEUDO,
        section="pseudo-labels",
    )
    score_pseudo_labels: bool = option(
        False,
        "log the pseudo-labels' accuracy against the target split's ground truth (oracle "
        "information, as the original's val-phase log; needs labels)",
        stages=PSEUDO,
        section="pseudo-labels",
    )
    save_color: bool = option(
        False,
        "also write colour pseudo-label PNGs (round_N/pseudo_color/) for viewing",
        stages=PSEUDO,
        section="pseudo-labels",
    )
    # training
    batch_images: int = TrainingSection.batch_images(2, " (online: source crops, and as many target crops)")
    crop_size: int = mode_dependent(TrainingSection.crop_size(), 512)
    scale_rate_range: tuple[float, float] = mode_dependent(TrainingSection.scale_rate_range(), (1.0, 1.0))
    origin_size: int | None = TrainingSection.origin_size(
        "source reference long side (default: none, scale by rho itself)"
    )
    origin_size_tgt: int | None = TrainingSection.origin_size(
        "target reference long side (default: none, scale by rho itself)", flags="--origin-size-tgt"
    )
    mine_port: float = option(
        0.5, "probability of a rare-class crop (0 = off)", range="fraction", stages=TRAIN, section="training"
    )
    mine_id_number: int = option(
        3, "number of rarest classes to mine", range="non_negative", stages=PSEUDO, section="training"
    )
    mine_thresh: float = option(
        0.001,
        "classes with a predicted share below this are mined first",
        range="fraction",
        stages=PSEUDO,
        section="training",
    )
    momentum: float = TrainingSection.momentum()
    weight_decay: float = mode_dependent(TrainingSection.weight_decay(), 0.01)
    optimizer: str = mode_dependent(TrainingSection.optimizer(), "adamw")
    warmup_iters: int = mode_dependent(TrainingSection.warmup_iters(), 1500)
    clip_grad_norm: float | None = TrainingSection.clip_grad_norm()
    loss: str = TrainingSection.loss()
    sync_bn: bool = TrainingSection.sync_bn()
    # the online mode (cbst.online; DAFormer's defaults unless marked cbst's, docs/method.md §14.5)
    max_iters: int = option(40000, "training iterations", range="positive", section=ONLINE)
    lr_power: float = option(1.0, "power of the polynomial lr decay", range="non_negative", section=ONLINE)
    ema_alpha: float = option(
        0.999, "the mean teacher's maximum EMA weight, in [0, 1)", range="fraction", section=ONLINE
    )
    pseudo_threshold: float = option(
        0.968,
        "fixed: the confidence counted as confident in each image's pseudo-label weight",
        range="fraction",
        section=ONLINE,
    )
    pseudo_ignore_top: int = option(
        0, "fixed: crop rows from the top with pseudo-label weight 0", range="non_negative", section=ONLINE
    )
    pseudo_ignore_bottom: int = option(
        0, "fixed: crop rows from the bottom with weight 0", range="non_negative", section=ONLINE
    )
    tgt_port: float = option(
        0.5,
        "cb/global: the portion of the (class's) target pixels kept, over the recent batches (cbst's)",
        range="fraction",
        section=ONLINE,
    )
    cb_window: int = option(
        100,
        "cb/global: the iterations whose confidence histograms set the thresholds (cbst's)",
        range="positive",
        section=ONLINE,
    )
    rcs_temperature: float = TrainingSection.rcs_temperature(
        0.01, "rare class sampling temperature T (0 = uniform source images)", stages=(), section=ONLINE
    )
    rcs_min_pixels: int = TrainingSection.rcs_min_pixels(stages=(), section=ONLINE)
    fd_lambda: float = option(
        0.0,
        "weight of the ImageNet feature distance on the source crops' thing-class pixels "
        "(DAFormer: 0.005); needs --pretrained; 0 = off (cbst's)",
        range="non_negative",
        metavar="W",
        section=ONLINE,
    )
    pretrained: str | None = option(
        None,
        "--fd-lambda: the ImageNet weights the source model was initialised from, for the frozen "
        "encoder (a file, or 'imagenet' for the architecture's download)",
        type=TEXT,
        metavar="FILE|imagenet",
        path=True,
        section=ONLINE,
    )
    eval_interval: int = option(4000, "iterations between evaluations", range="positive", section=ONLINE)
    log_interval: int = option(50, "iterations between log.jsonl records", range="positive", section=ONLINE)
    checkpoint_interval: int = option(
        2000, "iterations between resumable checkpoints", range="positive", section=ONLINE
    )
    # CRST's regularisers (cbst.crst; 0 = off)
    mr_weight_kld: float = option(
        0.0,
        "MRKLD: add W times KL(uniform || prediction) on the pseudo-labelled target pixels "
        "(the authors' scripts: 0.1; their code applied W squared); 0 = off",
        range="non_negative",
        metavar="W",
        stages=TRAIN,
        section="CRST regularisers (Zou et al., ICCV 2019; both may be combined)",
    )
    mr_weight_src: float = option(
        0.0,
        "MRKLD's weight on the labelled source pixels",
        range="non_negative",
        metavar="W",
        stages=TRAIN,
        section="CRST regularisers (Zou et al., ICCV 2019; both may be combined)",
    )
    lr_weight_ent: float = option(
        0.0,
        "LRENT: soft pseudo-labels q ∝ (p/λ)^(1/ALPHA) with an entropy-based selection, derived "
        "from the round's cached probabilities (the authors' scripts: 0.25); 0 = off",
        range="non_negative",
        metavar="ALPHA",
        stages=PSEUDO + TRAIN,
        section="CRST regularisers (Zou et al., ICCV 2019; both may be combined)",
    )
    # evaluation
    eval_long_side: int | None = EvaluationSection.eval_long_side()
    eval_flipping: bool = option(
        False,
        "flip-averaged evaluation",
        stages=EVAL,
        section="evaluation",
    )
    source_eval: bool = option(
        True,
        "do not score --weights on the evaluation split before round 0 (the Source row)",
        flags="--no-source-eval",
        section="evaluation",
    )
    # runtime
    device: str = RuntimeSection.device()
    num_workers: int = RuntimeSection.num_workers(0)
    amp: bool = RuntimeSection.amp(stages=PSEUDO + TRAIN)
    compile: bool = RuntimeSection.compile()
    progress: bool = RuntimeSection.progress()
    resume: bool = RuntimeSection.resume()
    loggers: tuple[str, ...] = RuntimeSection.loggers()
    tensorboard: bool = RuntimeSection.tensorboard()

    def with_mode_defaults(self) -> SelfTrainConfig:
        """This configuration with every unset (None) mode-dependent option given its value in
        ``mode``: DAFormer's under ``--mode online``, the rounds' own default otherwise."""
        values = {}
        for f in dataclasses.fields(self):
            if "online_default" in f.metadata and getattr(self, f.name) is None:
                values[f.name] = f.metadata["online_default"] if self.mode == "online" else f.default
        return dataclasses.replace(self, **values)

    def online_conflicts(self) -> None:
        """Refuse a rounds-only option set with ``--mode online`` rather than ignore it."""
        for name in ROUNDS_ONLY:
            value = getattr(self, name)
            if value not in (None, 0, 0.0) and str(value).lower() not in ("false", "none", ""):
                raise ConfigError(f"{options.flag(name)} works with --mode rounds only")

    def schedule(self) -> list[RoundPlan]:
        """The per-round portions, learning rates and epochs of this run."""
        return round_schedule(
            self.num_round,
            init_tgt_port=self.init_tgt_port,
            step_tgt_port=self.step_tgt_port,
            max_tgt_port=self.max_tgt_port,
            init_src_port=self.init_src_port,
            step_src_port=self.step_src_port,
            max_src_port=self.max_src_port,
            base_lr=self.base_lr,
            lr_decay=self.lr_decay,
            epoch_per_round=self.epoch_per_round,
            source_sample_policy=self.source_sample_policy,
            seed=self.seed,
        )

    def validate(self) -> None:
        """Reject invalid or inconsistent options before anything is read or written.

        Errors name the option as its flag. Portions must stay in [0, 1] in every round, not
        only in the first: a portion grows by its step while below its maximum.
        """
        options.check_choices(self)
        options.check_ranges(self)
        if self.num_round > checks.MAX_ROUNDS:  # every round's plan is made before any work
            raise ConfigError(f"--num-round must be at most {checks.MAX_ROUNDS}, got {self.num_round}")
        if self.mode == "rounds" and "rounds" not in SELECTION_POLICIES.meta(self.kc_policy).get(
            "modes", MODES
        ):
            raise ConfigError(f"--kc-policy {self.kc_policy!r} works with --mode online only")
        checks.require_scale_range(self, "scale_rate_range")
        checks.require_split_batch(self, "batch_images")
        checks.require_batch_memory(self, "batch_images", "crop_size", "pseudo_batch")
        if self.loss != "cross_entropy" and (self.mr_weight_kld or self.mr_weight_src or self.lr_weight_ent):
            raise ConfigError(
                f"CRST's regularisers extend the cross-entropy; they cannot be used with --loss {self.loss}"
            )
        if not self.pseudo_scales or min(self.pseudo_scales) <= 0:
            raise ConfigError(f"--pseudo-scales must be positive numbers, got {self.pseudo_scales}")
        if not Path(self.weights).is_file():
            raise MissingInputError(f"{self.weights}: initial weights not found (--weights)")
        checks.require_prior_file(self)
        for plan in self.schedule():
            for kind, portion in (("tgt", plan.tgt_portion), ("src", plan.src_portion)):
                if portion > 1:
                    names = [f"{p}_{kind}_port" for p in ("init", "step", "max")]
                    given = ", ".join(f"{options.flag(n)} {getattr(self, n)}" for n in names)
                    raise ConfigError(
                        f"{given} give round {plan.index} a portion of {portion:g}, "
                        "above 1 (the portion grows by the step while below the "
                        "maximum)"
                    )

    @property
    def lrent_alpha(self) -> float | None:
        """LRENT's α when ``--lr-weight-ent`` is on, else None (hard pseudo-labels)."""
        return self.lr_weight_ent if self.lr_weight_ent > 0 else None

    def check_sizes(self, num_source: int, num_target: int) -> None:
        """Every round must train on at least one full batch (incomplete batches are dropped)."""
        for plan in self.schedule():
            images = len(source_subset(num_source, plan.src_portion, plan.source_seed)) + num_target
            checks.require_batch_fits(self.batch_images, images, f"round {plan.index}")

    def to_dict(self) -> dict:
        """Plain-type dict (YAML-safe)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    def saved_form(self) -> dict:
        """``to_dict`` with the input and output paths absolute: what ``config.yaml`` holds."""
        return options.saved_form(self)


# ---------------------------------------------------------------------------- source training


@options.declared
@dataclass
class SourceTrainConfig:
    """Everything ``train_source`` needs; defaults are the original's GTA5 settings (docs/method.md §2.1).

    Every option but the runtime ones and those of the ``run`` section (loggers, which
    checkpoints are kept) shapes the trained weights: a
    resumed run must keep them (``to_epoch`` may grow under the fixed and step lr policies).
    """

    data_root: str = DataSection.data_root("dataset root directory", stages=TRAIN)
    output: str = RuntimeSection.output("output directory (config, checkpoints, log)")
    dataset: str = DataSection.dataset(stages=TRAIN)
    split: str = DataSection.split("split whose images are trained on", stages=TRAIN)
    list_file: str | None = DataSection.list_file(
        "image list overriding the split's default list", stages=TRAIN
    )
    num_classes: int = DataSection.num_classes(stages=TRAIN)
    model: str = option(
        "resnet38",
        "network architecture",
        flags=("--model", "--arch"),
        choices=ARCHITECTURES.names,
        stages=TRAIN,
        section="model",
    )
    weights: str | None = option(
        None,
        "initialisation: ImageNet weights (.params/.pth, or 'imagenet' for the architecture's "
        "default) or a cbst checkpoint (*.pt); default: none, random initialisation",
        type=TEXT,
        metavar="PATH",
        path=True,
        stages=TRAIN,
        section="model",
    )
    drop_path_rate: float | None = option(
        None,
        "stochastic depth at the encoder's last block, for the transformers; default: the "
        "architecture's own (0.1 for MiT as in SegFormer/DAFormer, 0 for DINOv2)",
        type=NUMBER,
        range="fraction",
        metavar="X",
        stages=TRAIN,
        section="model",
    )
    grad_checkpointing: bool = option(
        False,
        "recompute the encoder's blocks in the backward pass (transformers): less activation "
        "memory for larger crops or batches, about a third more time per step",
        section="model",
    )
    batch_images: int = TrainingSection.batch_images(16, " (the original: 16 over 4 GPUs)")
    crop_size: int = TrainingSection.crop_size()
    scale_range: tuple[float, float] = TrainingSection.scale_rate_range()
    origin_size: int | None = TrainingSection.origin_size(
        "reference long side: images are scaled to rho*L on their long side (GTA5 1914, SYNTHIA "
        "1280); default: none, scale by rho itself"
    )
    lr_type: str = option(
        "fixed",
        "learning-rate policy over all --to-epoch epochs",
        flags=("--lr-type", "--lr-policy"),
        choices=LR_POLICIES,
        stages=TRAIN,
        section="training",
    )
    base_lr: float = option(0.0016, "base learning rate", range="positive", stages=TRAIN, section="training")
    lr_steps: tuple[int, ...] = option(
        (),
        "iterations where --lr-type step multiplies the lr by 0.1",
        type=Numbers(integers=True),
        metavar="IT,IT,...",
        stages=TRAIN,
        section="training",
    )
    to_epoch: int = option(
        30, "number of epochs to train", range="positive", stages=TRAIN, section="training"
    )
    weight_decay: float = TrainingSection.weight_decay()
    momentum: float = TrainingSection.momentum()
    optimizer: str = TrainingSection.optimizer()
    lr_power: float = option(
        0.9, "power of --lr-type poly (DAFormer: 1.0)", range="positive", stages=TRAIN, section="training"
    )
    warmup_iters: int = TrainingSection.warmup_iters()
    clip_grad_norm: float | None = TrainingSection.clip_grad_norm()
    loss: str = TrainingSection.loss()
    class_weight_power: float = option(
        0.0,
        "weight each class's pixels in the loss by f^-P, f the class's share of the source's "
        "labelled pixels (counted once into OUT/class_pixel_counts.npy; the weights go to "
        "OUT/class_weights.json): 0 is the plain loss, 0.5 the inverse square root of the frequency",
        range="non_negative",
        metavar="P",
        stages=TRAIN,
        section="training",
    )
    rcs_temperature: float = TrainingSection.rcs_temperature(
        0.0,
        "rare class sampling (DAFormer's) of the source crops at temperature T: each crop's image "
        "is drawn for a class drawn with probability softmax((1 - f)/T), f the classes' pixel "
        "shares; 0 (default) = every image once per epoch",
    )
    rcs_min_pixels: int = TrainingSection.rcs_min_pixels()
    seed: int = TrainingSection.seed("seed of the shuffle, crops, flips and dropout")
    device: str = RuntimeSection.device()
    num_workers: int = RuntimeSection.num_workers(4)
    amp: bool = RuntimeSection.amp(stages=TRAIN)
    progress: bool = RuntimeSection.progress()
    compile: bool = RuntimeSection.compile()
    resume: bool = RuntimeSection.resume(
        "continue from the last epoch checkpoint in --output; needs only --output"
    )
    eval_dataset: str | None = option(
        None,
        "target dataset to report mIoU on after each epoch (default: none, no evaluation)",
        choices=DATASETS.names,
        type=TEXT,
        stages=TRAIN,
        section="evaluation",
    )
    eval_root: str | None = option(
        None,
        "root of the evaluation dataset",
        flags=("--eval-root", "--data-root-tgt"),
        type=TEXT,
        metavar="DIR",
        path=True,
        stages=TRAIN,
        section="evaluation",
    )
    eval_split: str = EvaluationSection.eval_split("evaluation split", stages=TRAIN)
    eval_long_side: int | None = EvaluationSection.eval_long_side(stages=TRAIN)
    tensorboard: bool = RuntimeSection.tensorboard()
    loggers: tuple[str, ...] = RuntimeSection.loggers()
    keep_checkpoints: int | None = option(
        2,
        "weights-only epoch checkpoints kept in OUT/checkpoints, newest first ('all' for every "
        "one); OUT/last.pt, resumable, is always kept",
        type=INTEGER,
        range="non_negative",
        none=("all",),
        metavar="N",
        section="run",
    )
    save_interval: int = option(
        1,
        "write a weights-only checkpoint every E epochs (and after the last one)",
        range="positive",
        metavar="E",
        section="run",
    )
    sync_bn: bool = TrainingSection.sync_bn()

    def validate(self) -> None:
        """Reject invalid options before anything is read or written; errors name the flag."""
        options.check_ranges(self)
        checks.require_scale_range(self, "scale_range")
        checks.require_split_batch(self, "batch_images")
        checks.require_batch_memory(self, "batch_images", "crop_size")
        if self.lr_type not in LR_POLICIES:
            raise ConfigError(f"--lr-type must be one of {', '.join(LR_POLICIES)}, got {self.lr_type!r}")
        if any(step < 0 for step in self.lr_steps):
            raise ConfigError(f"--lr-steps must be iteration numbers >= 0, got {list(self.lr_steps)}")
        if self.eval_dataset and not self.eval_root:
            raise ConfigError("--eval-dataset needs --eval-root")
        options.check_choices(self)
        if self.class_weight_power and not _takes(LOSSES.get(self.loss), "class_weights"):
            raise ConfigError(
                f"--class-weight-power needs a loss that takes class_weights; --loss {self.loss} does not"
            )

    def saved_form(self) -> dict:
        """Plain-type dict with the paths absolute: what ``OUT/config.yaml`` holds."""
        return options.saved_form(self)


def _takes(factory: Any, name: str) -> bool:
    """Whether ``factory`` accepts the keyword argument ``name`` (by name or through ``**kwargs``)."""
    params = inspect.signature(factory).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def resume_free(cls: type) -> tuple[str, ...]:
    """The options no stage reads: a resumed run may change them."""
    return tuple(name for name, opt in options.iter_options(cls) if not opt.stages and not opt.plan)
