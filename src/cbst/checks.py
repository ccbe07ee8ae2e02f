"""Checks shared by the run configurations (self-training, source training) and their resumption.

Option checks run before a run writes anything, and their errors name the option as its
command-line flag (``base_lr`` -> ``--base-lr``), so the same message serves the CLI and the
library. A resumed run is compared with its saved ``config.yaml`` on what matters: input paths
resolved (``./runs/a``, ``runs/a/`` and an absolute path are the same folder), the output folder
left out (a run may be moved), and only the options a finished stage has used.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cbst import options
from cbst.errors import ConfigError, DataError, MissingInputError
from cbst.io import read_text

flag = options.flag
"""The command-line flag of configuration field ``name`` (declared with the option)."""
resolved_paths = options.resolved_paths


def _number(config: Any, name: str) -> float:
    """The numeric value of field ``name``; a non-number or NaN is a ``ConfigError``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ConfigError(f"{flag(name)} must be a number, got {value!r}")
    return value


def require_positive(config: Any, *names: str, optional: bool = False) -> None:
    """Each named field must be a finite number > 0 (or None when ``optional``)."""
    for name in names:
        if optional and getattr(config, name) is None:
            continue
        value = _number(config, name)
        if not 0 < value < math.inf:
            raise ConfigError(f"{flag(name)} must be positive, got {value}")


def require_non_negative(config: Any, *names: str) -> None:
    """Each named field must be a finite number >= 0."""
    for name in names:
        value = _number(config, name)
        if not 0 <= value < math.inf:
            raise ConfigError(f"{flag(name)} must be >= 0, got {value}")


def require_fraction(config: Any, *names: str) -> None:
    """Each named field must be a number in [0, 1] (a portion or a probability)."""
    for name in names:
        value = _number(config, name)
        if not 0 <= value <= 1:
            raise ConfigError(f"{flag(name)} must be in [0, 1], got {value}")


def require_scale_range(config: Any, name: str) -> None:
    """Field ``name`` must be a pair (lo, hi) with 0 < lo <= hi < inf."""
    value = getattr(config, name)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag(name)} must be two numbers LO,HI, got {value!r}") from None
    if not 0 < lo <= hi < math.inf:
        raise ConfigError(f"{flag(name)} must be LO,HI with 0 < LO <= HI, got {lo},{hi}")


MAX_CROP_SIZE = 8192
"""Largest training crop side: four times a Cityscapes frame's long side."""
MAX_BATCH = 4096
"""Largest batch of images (training or pseudo-labelling) any option may ask for."""
MAX_ROUNDS = 1000
"""Most self-training rounds a run may plan (CBST runs 2 to 12)."""


def _memory_limit() -> int:
    """Bytes this process may still allocate: the smaller of the free memory and its address-space
    limit (``ulimit -v``), or 0 when neither is known."""
    import resource

    from cbst.probability_cache import available_host_memory  # imports torch, as every run does

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    limits = [m for m in (available_host_memory(), soft if soft != resource.RLIM_INFINITY else 0) if m > 0]
    return min(limits, default=0)


def require_prior_file(config: Any) -> None:
    """``config.with_prior``, when a file, must exist and hold a valid prior of
    ``config.num_classes`` classes (its header, dtype, shape and range are read)."""
    if config.with_prior in (None, "source"):
        return
    if not Path(config.with_prior).is_file():
        raise MissingInputError(f"{config.with_prior}: spatial prior file not found (--with-prior)")
    from cbst.priors import load_prior  # reads the file (and numpy/torch): only when a run is validated

    load_prior(config.with_prior, config.num_classes)


def require_batch_memory(config: Any, batch: str, crop: str, *others: str) -> None:
    """Options that fix the memory of a step must leave it possible, checked before any stage.

    The crop side and batch sizes have sane maxima (``MAX_CROP_SIZE``, ``MAX_BATCH``); the
    training batch's input tensor alone (``batch`` x 3 x ``crop``² float32, the network's
    activations take many times more) must fit in the memory the process may allocate.
    """
    for name in (batch, *others):
        if getattr(config, name) > MAX_BATCH:
            raise ConfigError(f"{flag(name)} must be at most {MAX_BATCH}, got {getattr(config, name)}")
    side = getattr(config, crop)
    if side > MAX_CROP_SIZE:
        raise ConfigError(f"{flag(crop)} must be at most {MAX_CROP_SIZE} pixels, got {side}")
    needed, limit = getattr(config, batch) * 3 * side * side * 4, _memory_limit()
    if limit and needed > limit:
        raise ConfigError(
            f"{flag(batch)} {getattr(config, batch)} with {flag(crop)} {side} needs {needed / 2**30:.1f} GiB "
            f"for the input batch alone, more than the {limit / 2**30:.1f} GiB this process may use; "
            f"lower {flag(crop)} or {flag(batch)}"
        )


def require_batch_fits(batch: int, samples: int, what: str) -> None:
    """A batch of ``batch`` images must fit in ``samples`` (incomplete batches are dropped)."""
    if samples < batch:
        raise ConfigError(
            f"--batch-images {batch} is more than the {samples} training images of "
            f"{what}, which would give no batch; lower --batch-images"
        )


def require_split_batch(config: Any, name: str) -> None:
    """Under torchrun ``name`` (a batch size) is the global batch: it must split evenly over
    the job's processes."""
    from cbst import distributed  # torch: imported when a run starts, so --help never loads it

    world, value = distributed.world_size(), getattr(config, name)
    if value % world:
        raise ConfigError(
            f"{flag(name)} {value} is the global batch, split over the {world} processes of this "
            f"torchrun job; make it a multiple of {world}"
        )


def with_defaults(saved: dict[str, Any], config_class: type) -> dict[str, Any]:
    """A saved configuration with the options it lacks at their ``config_class`` defaults: an
    option newer than the run, which the run therefore ran without (at its default)."""
    defaults = {
        f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING
    }
    return {**defaults, **saved}


def read_saved_config(path: Path) -> dict[str, Any]:
    """The mapping saved as a run's ``config.yaml``; anything else is a ``DataError`` naming it.

    cbst writes the file whole (atomically) and ending in a newline, so one that does not is
    truncated (an interrupted copy or a full disk); its hint says so rather than blaming the run.
    """
    text = read_text(path, "run configuration")
    keep = "it records the options the finished stages used: restore it from a copy, or start a new run"
    if text and not text.endswith("\n"):
        raise DataError(f"{path}: truncated (it does not end with a complete line); {keep} in a new --output")
    try:
        data = options.load_yaml(text, str(path))  # bounded: no alias bombs, no deep nesting
    except ConfigError as exc:
        raise DataError(f"{exc}; {keep} in a new --output") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a run configuration (a YAML mapping); {keep} in a new --output")
    return data


def changed(saved: dict[str, Any], current: dict[str, Any], names: Iterable[str]) -> list[str]:
    """The fields among ``names`` whose saved and current values differ, in ``names`` order."""
    return [n for n in names if n in current and saved.get(n) != current[n]]


def resume_refusal(
    path: Path, saved: dict[str, Any], current: dict[str, Any], names: list[str], used_by: str
) -> ConfigError:
    """The error for resuming with options that ``used_by`` (finished work) depends on.

    It says how to recover: resume with the saved values (given as flags), or start anew.
    """
    diffs = "; ".join(f"{_as_flag(n, saved.get(n))} before, {_as_flag(n, current[n])} now" for n in names)
    again = " ".join(_as_flag(n, saved.get(n)) for n in names)
    return ConfigError(
        f"{path}: cannot resume with options that {used_by} already used ({diffs}); "
        f"resume with {again}, or start a new run with another --output"
    )


def _as_flag(name: str, value: Any) -> str:
    """Field ``name`` set to ``value``, written as command-line flags."""
    if isinstance(value, bool):
        negated = options.negated_flag(name)
        switch = negated or flag(name)
        return switch if value != (negated is not None) else f"no {switch}"
    if value is None:
        return f"no {flag(name)}"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"{flag(name)} {value}"
