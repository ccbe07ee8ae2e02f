"""Every error cbst raises for a user's mistake or a bad input file, in one place.

:class:`CbstError` is the base class: the command line prints any ``CbstError`` as one line and
exits with status 2, while any other exception is a bug in cbst and shows its traceback. Each
subclass also derives from ``ValueError`` so that library callers catching ``ValueError`` (the
convention before these classes existed) keep working. :func:`print_line` is how such a line
reaches stderr.
"""

from __future__ import annotations

import sys


def print_line(text: str) -> None:
    """Write ``text`` and its newline on stderr in one write.

    The processes of a torchrun job share one stderr, and ``print`` writes the text and the
    newline separately (stderr writes through), so another process's line could start between
    them and two stop or error lines would run together.
    """
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class CbstError(Exception):
    """A user error or a bad input: the message names the file or option, and says what to do."""


class ConfigError(CbstError, ValueError):
    """An option value is invalid or conflicts with a saved run; the message names the option."""


class DataError(CbstError, ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


class CheckpointError(CbstError, ValueError):
    """A checkpoint is missing, foreign or does not fit the data; the message names the file."""


class WeightsError(CbstError, ValueError):
    """A weights file (``.params``, ``.pth``, ``.safetensors``) is malformed or does not fit the network."""


class CLIError(CbstError):
    """A command-line usage error found after parsing (e.g. a command not run under torchrun)."""


class MissingInputError(ConfigError, FileNotFoundError):
    """A file or folder named by an option does not exist; the message names it and the option."""


class DivergedError(CbstError, FloatingPointError):
    """A run's loss, weights or probabilities became NaN or infinite; the message says where."""
