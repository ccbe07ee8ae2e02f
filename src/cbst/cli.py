"""The ``cbst`` command line: one thin subcommand per library entry point.

Each subcommand lives in ``cbst.commands.<name>`` and exposes ``HELP`` (one line),
``OPTIONS`` (the dataclass declaring its options, see :mod:`cbst.options`),
``add_arguments(parser)`` and ``run(args) -> int``. Every subcommand accepts:

- ``--config FILE``: a YAML mapping of option names (the long option's name, with dashes or
  underscores) to values that become the defaults, so flags given on the command line still win
  (timm's train.py convention); ``_base_: FILE`` includes other configs, relative to this one.
  Values mean what they mean on the command line: a relative path is relative to the working
  directory. A run's saved ``config.yaml`` (paths absolute) is such a file: it reruns the run.
- ``--import MODULE``: modules imported before anything else (also ``imports:`` in a config),
  so what they register appears among the choices.

``--resume --output RUN`` reads RUN's saved options, so a resume needs nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

from cbst import __version__, checks, errors, options, signals
from cbst.errors import CbstError, CLIError
from cbst.extensions import import_extensions
from cbst.io import read_text

COMMANDS: tuple[str, ...] = (
    "make_synthetic",
    "evaluate",
    "convert",
    "prior",
    "train_source",
    "self_train",
    "demo",
    "report",
)


DISTRIBUTED_COMMANDS: tuple[str, ...] = ("train-source", "self-train", "evaluate")
"""The commands that run as one job of several processes under torchrun (docs/distributed.md)."""


BASE_KEY = "_base_"
"""Config key naming the file(s) a config builds on, relative to the config itself."""
IMPORTS_KEY = "imports"
"""Config key naming modules to import first (as ``--import``), e.g. a user's architecture."""


def _read_tree(file: Path, chain: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """A config file's own mapping after those of its bases (bases first, recursively).

    ``_base_: FILE`` (or a list of files) names configs, relative to this one, whose values come
    first (later bases override earlier ones); a cycle or a missing file is an error naming it.
    """
    if not file.is_file():
        included = f" (the {BASE_KEY} of {chain[-1]})" if chain else ""
        raise CLIError(f"{file}: config file not found{included}")
    if file.resolve() in chain:
        loop = " -> ".join(str(f) for f in (*chain[chain.index(file.resolve()) :], file.resolve()))
        raise CLIError(f"{file}: {BASE_KEY} includes form a cycle: {loop}")
    data = options.load_yaml(read_text(file, "config file"), str(file))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CLIError(f"{file}: expected a mapping of option names to values")
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise CLIError(f"{file}: {BASE_KEY} must be a file name or a list of file names")
    tree: list[tuple[Path, dict]] = []
    for base in bases:
        tree += _read_tree(file.parent / base, (*chain, file.resolve()))
    return [*tree, (file, data)]


def _own_imports(file: Path, data: dict) -> list[str]:
    """The ``imports:`` of one config file (a module name or a list of them)."""
    value = data.pop(IMPORTS_KEY, [])
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CLIError(f"{file}: {IMPORTS_KEY} must be a module name or a list of module names")
    return names


def config_imports(path: str) -> list[str]:
    """The modules a config file (with its bases) asks to import."""
    return [name for file, data in _read_tree(Path(path)) for name in _own_imports(file, data)]


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML config, with its ``_base_`` files merged in, and check every key and value.

    Returns the values by option name (``dest``) as YAML wrote them (lists stay lists); each
    has been checked against its option's type, choices and range. Later files override
    earlier ones; a key set in the including file overrides its bases.
    """
    return {k: list(v) if isinstance(v, tuple) else v for k, v in _config_defaults(path, parser).items()}


def _config_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """The parsed values of a config file by option name (``dest``), bases merged in."""
    cls = parser.get_default("_options")
    merged: dict = {}
    for file, data in _read_tree(Path(path)):
        _own_imports(file, data)
        if cls is not None:
            values = options.config_values(data, cls, str(file))
        else:
            values = _undeclared_values(file, data, parser)
        merged.update(values)
    return merged


def _undeclared_values(file: Path, data: dict, parser: argparse.ArgumentParser) -> dict:
    """The values of a command whose options are not declared: keys must be argparse dests."""
    known = {a.dest for a in parser._actions}
    own = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(own) - known)
    if unknown:
        raise CLIError(f"{file}: unknown option(s) {', '.join(unknown)} for '{parser.prog}'")
    return own


SAVED_CONFIG = "config.yaml"
"""A run folder's record of its options (written by self-train and train-source)."""


def _saved_run_defaults(argv: list[str], parser: argparse.ArgumentParser) -> dict:
    """With ``--resume`` and ``--output RUN``: the options RUN's ``config.yaml`` holds, but for
    the runtime ones (device, workers, ...), which come from the command line or its defaults.

    So a resume needs only the folder; an option given again on the command line still wins,
    and the resume check refuses it if a finished stage used another value.
    """
    cls = parser.get_default("_options")
    if cls is None or "resume" not in options.options_of(cls):
        return {}
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--resume", action="store_true")
    peek.add_argument(*options.options_of(cls)["output"].flags, dest="output")
    seen = peek.parse_known_args(argv)[0]
    saved = Path(seen.output or "") / SAVED_CONFIG
    if not (seen.resume and seen.output and saved.is_file()):
        return {}
    data = checks.read_saved_config(saved)  # a truncated or damaged file says so
    runtime = set(options.runtime_fields(cls))
    kept = {k: v for k, v in data.items() if str(k).replace("-", "_") not in runtime}
    return options.config_values(kept, cls, str(saved), nullable=False)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per command (after any ``--import``)."""
    parser = argparse.ArgumentParser(
        prog="cbst",
        description="Class-Balanced Self-Training (CBST) for unsupervised domain adaptation of "
        "semantic segmentation: GTA5/SYNTHIA -> Cityscapes, or the embedded synthetic "
        "benchmark. Run 'cbst demo' to see the whole method on a laptop CPU.",
    )
    parser.add_argument("--version", action="version", version=f"cbst {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name in COMMANDS:
        module = importlib.import_module(f"cbst.commands.{name}")
        cmd = name.replace("_", "-")
        p = sub.add_parser(
            cmd,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--config",
            metavar="FILE",
            help="YAML file of option values (keys are option names, with dashes or underscores); "
            "flags override it (default: none)",
        )
        p.add_argument(
            "--import",
            dest="imports",
            action="append",
            metavar="MODULE",
            help="import MODULE (a module name or a .py file; repeatable or a comma list) before "
            "anything else, e.g. one registering an architecture (default: none)",
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _options=getattr(module, "OPTIONS", None))
        subparsers[cmd] = p
    return parser, subparsers


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _peek_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--config FILE`` and the ``--import`` values of a command line, before parsing it."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--config")
    peek.add_argument("--import", dest="imports", action="append", default=[])
    seen = peek.parse_known_args(argv)[0]
    return seen.config, seen.imports


def _import_requested(argv: list[str]) -> None:
    """Import the modules of ``--import`` and of the config's ``imports:`` (before the parser's
    choices are built from the registries)."""
    command = _command_of(argv)
    rest = argv[argv.index(command) + 1 :] if command else argv
    path, names = _peek_config(rest)
    if path and Path(path).is_file():
        names = [*config_imports(path), *names]
    import_extensions(names)


def _apply_config(argv: list[str], subparsers: dict[str, argparse.ArgumentParser]) -> None:
    """Make the values of a resumed run's ``config.yaml`` and of ``--config FILE`` the defaults
    of the command ``argv`` names (flags given on the command line still win)."""
    command = _command_of(argv)
    if command not in subparsers:
        return
    rest = argv[argv.index(command) + 1 :]
    sp = subparsers[command]
    path, _ = _peek_config(rest)
    values = _saved_run_defaults(rest, sp)
    if path:
        values.update(_config_defaults(path, sp))
    sp.set_defaults(**values)


def _error_message(exc: BaseException) -> str | None:
    """The one-line message of a user's mistake or of a failed run, or None for a bug.

    A user error is a :class:`~cbst.errors.CbstError` (its message names the file or option)
    or an ``OSError`` carrying a path (a file where a folder is expected or the reverse, an
    existing or unwritable output, a missing file, a full disk). Anything else is a bug.
    """
    if isinstance(exc, CbstError):
        return str(exc)
    if not isinstance(exc, OSError):
        return None
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if exc.filename is None:  # cbst's own, e.g. a background write: the path is in its message
        if len(exc.args) != 1:
            return None
        full = cause.errno == errno.ENOSPC
        return f"{str(exc).split(': ')[0]}: no space left on the device" if full else str(exc)
    where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    if exc.errno == errno.ENOSPC:
        return f"{where}: no space left on the device"
    return f"{where}: {exc.strerror or exc}"


def _join_job(command: str, distributed: ModuleType) -> str:
    """Under torchrun, join the job's process group; returns ``" (rank R/N)"`` for messages."""
    if not distributed.launched():
        return ""
    if command not in DISTRIBUTED_COMMANDS:
        raise CLIError(
            f"runs in one process; start it without torchrun (torchrun runs {', '.join(DISTRIBUTED_COMMANDS)})"
        )
    distributed.init()
    return f" ({distributed.describe()})"


@contextlib.contextmanager
def _console_of_main(distributed: ModuleType) -> Iterator[None]:
    """Only the main process of a torchrun job prints results: the others' stdout is discarded
    (their errors still reach stderr)."""
    if distributed.is_main():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _report(prefix: str, exc: Exception) -> int:
    """Print a user error as one line and return exit status 2; re-raise a bug."""
    message = _error_message(exc)
    if message is None:
        raise exc
    errors.print_line(f"{prefix}: error: {_one_line(message)}")
    return 2


def _parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Import the requested extensions, build the parser, apply the configs and parse."""
    _import_requested(argv)
    parser, subparsers = build_parser()
    _apply_config(argv, subparsers)
    return parser, parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, apply ``--config`` defaults, run the subcommand; returns the exit status.

    Every user error ends here, as one line on stderr and exit status 2 (see ``_error_message``).
    Under torchrun every process runs this; a process that fails prints its message, prefixed
    with its rank, and exits, and torchrun then stops the others. A process whose collective
    operation fails (another one is gone) says so in one line and exits with status 1. Parsing
    (and ``--help``) imports no torch; running a command does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    signals.install()
    command = _command_of(argv)
    prefix = f"cbst {command}" if command else "cbst"
    try:  # a SIGTERM while importing is a stop too
        parser, args = _parse(argv)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (cbst.signals)
        return signals.report_stop(prefix, argv, exc)
    except Exception as exc:  # noqa: BLE001 - a bug is re-raised by _report
        return _report(prefix, exc)
    if args.command is None:
        parser.print_help()
        return 2
    return _run(args, argv)


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the parsed command (joining the torchrun job when launched by one); ``argv`` is the
    command line, for the hint on how to continue after an interrupt."""
    from cbst import distributed  # torch: imported only to run a command, never for --help

    prefix, finished = f"cbst {args.command}", False
    try:
        prefix += _join_job(args.command, distributed)
        with _console_of_main(distributed):
            status = int(args._run(args) or 0)
        finished = True
        return status
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (cbst.signals)
        return signals.report_stop(prefix, argv, exc)
    except distributed.FailedOnMain:  # the main process has printed why
        return 2
    except distributed.COMMUNICATION_ERRORS as exc:
        if signals.stop_signal(exc) is not None:  # raised while a stop unwound: a peer went first
            return signals.report_stop(prefix, argv, exc)
        detail = _one_line(str(exc))
        errors.print_line(
            f"{prefix}: stopped: the job's communication failed, mostly because another process stopped ({detail})"
        )
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug is re-raised by _report
        if signals.stop_signal(exc) is not None:  # a DataLoader worker killed by the same SIGTERM
            return signals.report_stop(prefix, argv, exc)
        return _report(prefix, exc)
    finally:
        distributed.shutdown(finished=finished)
