"""The ``cbst`` command line: one thin subcommand per library entry point.

Each subcommand lives in ``cbst.commands.<name>`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Any subcommand accepts ``--config FILE``: a
YAML mapping of option names (dashes or underscores) to values that become the defaults, so
flags given on the command line still win (timm's train.py convention).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from cbst import signals
from cbst.errors import CLIError

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
"""The commands that run as one job of several processes under torchrun (README, "Multiple GPUs")."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the line breaks of a command's description (its examples).

    On/off flags get no "(default: ...)": for ``--no-amp`` it would print the value of ``amp``.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


BASE_KEY = "_base_"
"""Config key naming the file(s) a config builds on, relative to the config itself."""


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML config, with its ``_base_`` files merged in, and check every key is an option.

    ``_base_: FILE`` (or a list of files) names configs, relative to this one, whose values come
    first (later bases override earlier ones); a key set in the including file overrides them all.
    Bases may have bases of their own; a cycle or a missing file is an error naming the file.
    """
    return _read_config(Path(path), {a.dest for a in parser._actions}, parser.prog.split()[-1], ())


def _read_config(file: Path, known: set[str], command: str, chain: tuple[Path, ...]) -> dict:
    """One config file merged over its bases; ``chain`` holds the files that include it."""
    from cbst.io import read_text

    if not file.is_file():
        included = f" (the {BASE_KEY} of {chain[-1]})" if chain else ""
        raise CLIError(f"{file}: config file not found{included}")
    if file.resolve() in chain:
        loop = " -> ".join(str(f) for f in (*chain[chain.index(file.resolve()) :], file.resolve()))
        raise CLIError(f"{file}: {BASE_KEY} includes form a cycle: {loop}")
    try:
        data = yaml.safe_load(read_text(file, "config file")) or {}
    except yaml.YAMLError as exc:
        raise CLIError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{file}: expected a mapping of option names to values")
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise CLIError(f"{file}: {BASE_KEY} must be a file name or a list of file names")
    own = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(own) - known)
    if unknown:
        raise CLIError(f"{file}: unknown option(s) {', '.join(unknown)} for 'cbst {command}'")
    config: dict = {}
    for base in bases:
        config.update(_read_config(file.parent / base, known, command, (*chain, file.resolve())))
    return {**config, **own}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per command."""
    from cbst import __version__

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
        p = sub.add_parser(cmd, help=module.HELP, description=module.__doc__, formatter_class=_HelpFormatter)
        p.add_argument(
            "--config",
            metavar="FILE",
            help="YAML file of option defaults (keys are option names); flags override it",
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        subparsers[cmd] = p
    return parser, subparsers


def _apply_config(argv: list[str], subparsers: dict[str, argparse.ArgumentParser]) -> None:
    """If ``argv`` names a subcommand and ``--config FILE``, make the file's values its defaults."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in subparsers:
        return
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--config")
    path = peek.parse_known_args(argv[argv.index(command) + 1 :])[0].config
    if not path:
        return
    sp = subparsers[command]
    config = _load_config(path, sp)
    for action in sp._actions:
        if action.dest in config:
            action.required = False  # supplied by the file; a flag still overrides it
    sp.set_defaults(**config)


def _error_message(exc: BaseException) -> str | None:
    """The one-line message of a user's mistake or of a failed run, or None for a bug.

    User errors are raised as ``CLIError``, ``ValueError`` (``DataError``, ``CheckpointError``,
    configuration errors), ``KeyError``, ``FloatingPointError`` (a diverging run, naming the
    iteration) and ``OSError``: a path that is a file where a folder is expected or the reverse,
    an existing or unwritable output, a missing file. Each message names the path or option.
    """
    if isinstance(exc, OSError):
        if exc.filename is None:  # raised by cbst itself with the path in its message
            return str(exc) if len(exc.args) == 1 else None
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{where}: {exc.strerror or exc}"
    if isinstance(exc, KeyError):
        return str(exc.args[0]) if exc.args else None
    if isinstance(exc, (CLIError, ValueError, FloatingPointError)):
        return str(exc)
    return None


def _join_job(command: str) -> str:
    """Under torchrun, join the job's process group; returns ``" (rank R/N)"`` for messages."""
    from cbst import distributed

    if not distributed.launched():
        return ""
    if command not in DISTRIBUTED_COMMANDS:
        raise CLIError(
            f"runs in one process; start it without torchrun (torchrun runs {', '.join(DISTRIBUTED_COMMANDS)})"
        )
    distributed.init()
    return f" ({distributed.describe()})"


@contextlib.contextmanager
def _console_of_main() -> Iterator[None]:
    """Only the main process of a torchrun job prints results: the others' stdout is discarded
    (their errors still reach stderr)."""
    from cbst import distributed

    if distributed.is_main():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, apply ``--config`` defaults, run the subcommand; returns the exit status.

    Every user error ends here, as one line on stderr and exit status 2 (see ``_error_message``).
    Under torchrun every process runs this; a process that fails prints its message, prefixed
    with its rank, and exits, and torchrun then stops the others. A process whose collective
    operation fails (another one is gone) says so in one line and exits with status 1.
    """
    from cbst import distributed

    argv = list(sys.argv[1:] if argv is None else argv)
    signals.install()
    prefix, finished = "cbst", False
    try:
        parser, subparsers = build_parser()  # in the try: a SIGTERM while importing is a stop too
        _apply_config(argv, subparsers)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        prefix = f"cbst {args.command}"
        prefix += _join_job(args.command)
        with _console_of_main():
            status = int(args._run(args) or 0)
        finished = True
        return status
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (cbst.signals)
        return signals.report_stop(prefix, argv, exc)
    except distributed.COMMUNICATION_ERRORS as exc:
        detail = _one_line(str(exc))
        print(
            f"{prefix}: stopped: the job's communication failed, mostly because another process stopped ({detail})",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:
        if signals.stop_signal(exc) is not None:  # a DataLoader worker killed by the same SIGTERM
            return signals.report_stop(prefix, argv, exc)
        message = _error_message(exc)
        if message is None:
            raise
        print(f"{prefix}: error: {_one_line(message)}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(finished=finished)
