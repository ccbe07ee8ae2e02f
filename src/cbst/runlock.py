"""A run folder's lock: one process (or one torchrun job) writes a run at a time.

Two ``self-train`` processes on one ``--output`` would otherwise both run and mix their files
(a config of one, checkpoints of neither). A run takes ``OUTPUT/cbst.lock`` before it writes
anything there: a small JSON record of the holder's pid, host and command, made complete in a
temporary file and linked into place in one step (a hard link fails if the name exists, so of
two processes exactly one wins). The lock is released when the run ends, however it ends
(:func:`releasing` on the driver function, and at interpreter exit). A lock whose holder is a
dead process on this host is stale (the run was killed): it is named and taken over. Under
torchrun the lock is the main process's: it alone checks it (the driver calls :func:`check_free`
through ``distributed.checked_on_main``, so a refusal is one line for the job) and takes it once,
before the others go on (:func:`acquire` through ``distributed.write_once``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cbst import io
from cbst.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

_HELD: list[Path] = []
"""The lock files this process holds, in the order taken."""


class RunLockedError(ConfigError):
    """The ``--output`` folder is locked by a live run; the message names the folder and the holder."""


def _record(command: str) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's record, or None when it is gone or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("pid"), int) and isinstance(data.get("host"), str)
    return data if ok else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _link_new(path: Path, record: dict[str, Any]) -> bool:
    """Create ``path`` holding ``record``, complete, in one step; False if it already exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:  # a full disk or a read-only folder
        raise OSError(
            exc.errno, f"cannot create the run's lock file ({exc.strerror or exc})", str(path)
        ) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _holder_text(holder: dict[str, Any]) -> str:
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"process {holder['pid']} on {holder['host']}{command}, since {holder.get('started', '?')}"


def _live_holder(path: Path) -> dict[str, Any] | None:
    """The record of lock file ``path`` when it is stale; None when there is none.

    Raises ``RunLockedError`` when a live process (or one on another host, whose liveness
    cannot be told) holds it, or when the file cannot be read.
    """
    holder = _read_holder(path)
    folder = path.parent
    if holder is None:
        if not path.exists():
            return None
        raise RunLockedError(
            f"{path}: unreadable lock file; if no cbst process is using {folder}, delete it and rerun"
        )
    if holder["host"] != socket.gethostname():
        raise RunLockedError(
            f"{folder}: in use by {_holder_text(holder)}; wait for it to end, or if that run is "
            f"gone, delete {path} and rerun"
        )
    if _alive(holder["pid"]) and holder["pid"] != os.getpid():
        raise RunLockedError(
            f"{folder}: in use by {_holder_text(holder)}; wait for it to end or stop it, "
            "then rerun (with --resume to continue its run)"
        )
    return holder


def check_free(folder: str | Path) -> None:
    """Refuse, before any work, a folder that a live run holds (its lock is taken later)."""
    path = Path(folder) / io.LOCK_NAME
    if path.exists():
        _live_holder(path)


def acquire(folder: str | Path, command: str) -> Path:
    """Take ``folder``'s lock for ``command`` (creating the folder); returns the lock file.

    Raises ``RunLockedError`` naming the holder when a live process (or one on another host,
    whose liveness cannot be told) holds it; a stale lock is reported on stderr and taken over.
    """
    folder = Path(folder)
    io.make_dirs(folder)
    path = folder / io.LOCK_NAME
    if path in _HELD and path.exists():  # taken already by this process (a driver calling another)
        return path
    for _ in range(3):
        if _link_new(path, _record(command)):
            _HELD.append(path)
            return path
        holder = _live_holder(path)
        if holder is None:
            continue  # released meanwhile
        if _read_holder(path) == holder:  # still the same stale record: take it over
            print(
                f"cbst: {path}: stale lock of {_holder_text(holder)}, which is no longer running; taking it over",
                file=sys.stderr,
            )
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    raise RunLockedError(f"{path}: the lock changed hands repeatedly while being taken; rerun")


def release(path: Path) -> None:
    """Remove the lock file ``path`` if this process holds it."""
    if path in _HELD:
        _HELD.remove(path)
        holder = _read_holder(path)
        if holder is not None and holder["pid"] == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def release_all() -> None:
    """Remove every lock this process holds (at interpreter exit, whatever happened before)."""
    for path in list(_HELD):
        release(path)


def releasing(function: F) -> F:
    """Decorate a run's driver: every lock it takes is released when it returns or raises."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = list(_HELD)
        try:
            return function(*args, **kwargs)
        finally:
            for path in [p for p in _HELD if p not in before]:
                release(path)

    return wrapper  # type: ignore[return-value]


def start(folder: str | Path, command: str) -> None:
    """Lock a run folder and remove the temporary files a killed run left there, saying how many.

    Called by the main process only (under torchrun, through ``distributed.write_once``).
    """
    acquire(folder, command)
    removed = io.remove_temporaries(folder)
    if removed:
        print(
            f"{command}: removed {removed} temporary file(s) an interrupted run left in {folder}", flush=True
        )


atexit.register(release_all)
