"""SIGTERM handled like Ctrl-C: a run stopped by Slurm's ``scancel`` or a preemption says so.

Without a handler SIGTERM ends Python at once: no message, no cleanup, and DataLoader workers
may outlive the main process. :func:`install` turns it into a :class:`Stopped` exception (a
``KeyboardInterrupt``, so every ``finally`` block runs, locks are released and workers are shut
down), and :func:`stop_message` is the one line the command line prints: what stopped the run and
the exact command that resumes it. Exit statuses follow the shell's 128 + signal number
(143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from cbst import errors

RESUMABLE = ("self-train", "train-source")
"""The commands that continue a stopped run with ``--resume``."""

# PyTorch's error when a DataLoader worker is killed by a signal (the job's whole process group
# got SIGTERM, and a worker died before the main process ran its handler).
_WORKER_KILLED = re.compile(r"DataLoader worker \(pid.*\) is killed by signal: (Terminated|Interrupt)")


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def _redeliver(unraisable: Any) -> None:
    """``sys.unraisablehook``: a stop raised where Python drops exceptions (a ``__del__``, an
    at-fork callback, as a DataLoader starts its workers) is delivered again, not lost."""
    if isinstance(unraisable.exc_value, Stopped):
        # Sent again from another thread a moment later, so that the handler runs once the main
        # thread has left the place that dropped it (raised here, it would be dropped again).
        threading.Timer(REDELIVERY_SECONDS, os.kill, (os.getpid(), unraisable.exc_value.signum)).start()
        return
    _DROPPED_HOOK(unraisable)


_DROPPED_HOOK = sys.unraisablehook
REDELIVERY_SECONDS = 0.05


def install() -> None:
    """Handle SIGTERM like SIGINT (from the main thread only, as Python requires)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)
        sys.unraisablehook = _redeliver


def quiet_worker(worker_id: int) -> None:
    """``worker_init_fn`` of cbst's DataLoaders: a worker keeps quiet when the main process
    stops in the middle of receiving a batch from it.

    A worker hands each batch's tensors over a connection that multiprocessing's resource sharer
    serves from a thread; when the main process stops (SIGTERM, Ctrl-C) during a hand-over, that
    thread's error (the other end has gone) would print a traceback after the stop line.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, tb)

    sys.excepthook = hook


def stop_signal(exc: BaseException) -> int | None:
    """The signal that ``exc`` reports stopping the run (SIGINT or SIGTERM), or None.

    A stop itself, a DataLoader worker killed by the signal, or an error raised while a stop
    unwound (``exc.__context__``): under torchrun a collective operation in a ``finally`` block
    fails when another process, stopped by the same signal, has already gone.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Stopped):
            return exc.signum
        if isinstance(exc, KeyboardInterrupt):
            return signal.SIGINT
        match = _WORKER_KILLED.search(str(exc)) if isinstance(exc, RuntimeError) else None
        if match:
            return signal.SIGTERM if match.group(1) == "Terminated" else signal.SIGINT
        exc = exc.__context__
    return None


def exit_status(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: 128 + its number."""
    return 128 + int(signum)


def resume_command(argv: Sequence[str]) -> str:
    """The command line that resumes the run ``argv`` started: the same one with ``--resume``."""
    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["cbst", *args])


def stop_message(signum: int, command: str | None, argv: Sequence[str], under_torchrun: bool) -> str:
    """The line printed when ``signum`` stopped ``command`` (run as ``cbst ARGV``)."""
    what = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted"
    if command not in RESUMABLE:
        return f"{what}; run the command again to redo it"
    where = "rerun the torchrun job with the command " if under_torchrun else "resume with: "
    return f"{what}; finished stages are kept; {where}{resume_command(argv)}"


def report_stop(prefix: str, argv: Sequence[str], exc: BaseException) -> int:
    """Print the stop line for ``exc`` (a stopping signal) on stderr; returns the exit status."""
    from cbst import distributed  # torch, already imported by any run that can be stopped

    signum = stop_signal(exc) or signal.SIGINT
    command = next((a for a in argv if not a.startswith("-")), None)
    errors.print_line(f"{prefix}: {stop_message(signum, command, argv, distributed.launched())}")
    return exit_status(signum)
