"""Where a run's scalars go besides the console: ``OUT/log.jsonl``, TensorBoard, or a user's logger.

A logger is a class registered in :data:`cbst.registry.LOGGERS` and built as ``cls(output)`` with
the run folder; it has three methods:

- ``step(values, step, context)``: one logged training step (``{"loss": ..., "lr": ...}`` at
  iteration ``step``);
- ``record(kind, values, step, context)``: one finished unit of work: an ``epoch`` (its mean loss,
  lr, seconds, val mIoU), a round's ``pseudo`` labels (thresholds λ, class shares, accuracy), a
  round's ``val`` metrics, the ``source`` model's metrics; ``step`` is the epoch or round index;
- ``close()``.

``context`` holds what the step or record belongs to (``{"round": 2}`` in self-training, empty
in source training). A user module passed with ``--import`` adds a logger with
``@LOGGERS.register("name")`` and selects it with ``--loggers jsonl,name``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from cbst import distributed
from cbst.errors import ConfigError
from cbst.io import append_jsonl
from cbst.registry import LOGGERS


class Logger(Protocol):
    """What :class:`LoggerGroup` calls on each logger."""

    def step(self, values: Mapping[str, float], step: int, context: Mapping[str, Any]) -> None: ...

    def record(self, kind: str, values: Mapping[str, Any], step: int, context: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """``OUT/log.jsonl``: one JSON line per record, appended and flushed at once.

    Logged steps are held until the next record (an epoch's end) and written inside it as
    ``"steps": [[iteration, loss, lr], ...]``: an epoch interrupted before its end is trained
    again on resume, so its steps would otherwise appear twice in the log.
    """

    def __init__(self, output: Path) -> None:
        self.path = Path(output) / "log.jsonl"
        self._steps: list[list[float]] = []

    def step(self, values: Mapping[str, float], step: int, context: Mapping[str, Any]) -> None:
        self._steps.append([step, float(values["loss"]), float(values["lr"])])

    def record(self, kind: str, values: Mapping[str, Any], step: int, context: Mapping[str, Any]) -> None:
        line = {"kind": kind, **context, **values}
        if self._steps:
            line["steps"], self._steps = self._steps, []
        append_jsonl(self.path, line)

    def close(self) -> None:
        self._steps = []


def _scalars(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers in ``values`` as ``prefix/key`` (``prefix/key/sub`` for a nested mapping)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_scalars(f"{prefix}/{key}", value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
    return out


class TensorBoardLogger:
    """TensorBoard scalars under ``OUT/tensorboard``; a round's tags start with ``round_N/``.

    Steps are ``train/loss`` and ``train/lr`` at the iteration; records are ``KIND/KEY`` at
    their epoch or round (``pseudo/thresholds/road``, ``val/miou``, ``source/miou``).
    """

    def __init__(self, output: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency
        except ImportError:
            raise ConfigError(
                "--tensorboard needs the 'tensorboard' package (pip install 'cbst[tensorboard]')"
            ) from None
        self.writer = SummaryWriter(str(Path(output) / "tensorboard"))

    @staticmethod
    def _prefix(context: Mapping[str, Any]) -> str:
        return f"round_{context['round']}/" if "round" in context else ""

    def step(self, values: Mapping[str, float], step: int, context: Mapping[str, Any]) -> None:
        for tag, value in _scalars(self._prefix(context) + "train", values).items():
            self.writer.add_scalar(tag, value, step)

    def record(self, kind: str, values: Mapping[str, Any], step: int, context: Mapping[str, Any]) -> None:
        prefix = self._prefix(context) if kind in ("epoch",) else ""
        for tag, value in _scalars(prefix + kind, values).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class LoggerGroup:
    """The run's loggers as one, with a ``context`` added to everything logged through it.

    Only the main process of a torchrun job logs; elsewhere the group is empty.
    """

    def __init__(self, loggers: Sequence[Logger], context: Mapping[str, Any] | None = None) -> None:
        self.loggers = list(loggers)
        self.context = dict(context or {})

    def scoped(self, **context: Any) -> LoggerGroup:
        """The same loggers with ``context`` added (e.g. ``round=2``)."""
        return LoggerGroup(self.loggers, {**self.context, **context})

    def step(self, values: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.step(values, step, self.context)

    def record(self, kind: str, values: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.record(kind, values, step, self.context)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def logger_names(names: Sequence[str], tensorboard: bool) -> tuple[str, ...]:
    """``--loggers`` plus ``tensorboard`` when ``--tensorboard`` is given, without repeats."""
    return tuple(dict.fromkeys([*names, *(["tensorboard"] if tensorboard else [])]))


def open_loggers(names: Sequence[str], output: Path) -> LoggerGroup:
    """The registered loggers ``names`` for run folder ``output`` (none outside the main process)."""
    for name in names:
        LOGGERS.get(name)  # an unknown name fails on every process, before any work
    if not distributed.is_main():
        return LoggerGroup([])
    return LoggerGroup([LOGGERS.get(name)(Path(output)) for name in names])
