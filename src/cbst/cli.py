"""The ``cbst`` command line: one thin subcommand per library entry point.

Each subcommand lives in ``cbst.commands.<name>`` and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Any subcommand accepts ``--config FILE``: a
YAML mapping of option names (dashes or underscores) to values that become the defaults, so
flags given on the command line still win (timm's train.py convention).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

import yaml

COMMANDS: tuple[str, ...] = (
    "make_synthetic", "evaluate", "convert", "prior", "train_source", "self_train", "demo",
    "report",
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the line breaks of a command's description (its examples)."""


class CLIError(Exception):
    """A user error: printed as one line without a traceback, exit status 2."""


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML config and check that every key names an option of ``parser``."""
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"{file}: config file not found")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CLIError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{file}: expected a mapping of option names to values")
    known = {a.dest for a in parser._actions}
    config = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(config) - known)
    if unknown:
        raise CLIError(f"{file}: unknown option(s) {', '.join(unknown)} for 'cbst {parser.prog.split()[-1]}'")
    return config


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
        p = sub.add_parser(cmd, help=module.HELP, description=module.__doc__,
                           formatter_class=_HelpFormatter)
        p.add_argument("--config", metavar="FILE",
                       help="YAML file of option defaults (keys are option names); flags override it")
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
    path = peek.parse_known_args(argv[argv.index(command) + 1:])[0].config
    if not path:
        return
    sp = subparsers[command]
    config = _load_config(path, sp)
    for action in sp._actions:
        if action.dest in config:
            action.required = False  # supplied by the file; a flag still overrides it
    sp.set_defaults(**config)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, apply ``--config`` defaults, run the subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    try:
        _apply_config(argv, subparsers)
    except CLIError as exc:
        print(f"cbst: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except CLIError as exc:
        print(f"cbst {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"cbst {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cbst {args.command}: interrupted; rerun with --resume where supported", file=sys.stderr)
        return 130
