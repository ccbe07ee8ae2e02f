"""A user's own modules, imported before a command is parsed (``--import MODULE``, ``imports:``).

Such a module registers its own entries in cbst's registries (``@ARCHITECTURES.register("my_net")``,
see :mod:`cbst.registry`); importing it before the parser is built puts them among the choices
of ``--help`` and makes every command accept them, as mmsegmentation's ``custom_imports`` does.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from cbst.errors import ConfigError


def split_names(values: Iterable[str | None]) -> list[str]:
    """Module names from repeated and comma-separated values, in order, each once."""
    names: list[str] = []
    for value in values:
        for name in str(value or "").split(","):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names


def import_extensions(names: Iterable[str]) -> list[ModuleType]:
    """Import each module: a dotted name (found on ``sys.path`` or in the current folder) or a
    ``.py`` file. A module that cannot be imported is a one-line :class:`ConfigError` naming it;
    any other error raised by the module's own code is left to show its traceback."""
    return [_import_one(name) for name in split_names(names)]


def _import_one(name: str) -> ModuleType:
    if name.endswith(".py") or os.sep in name:
        return _import_file(Path(name))
    if name in sys.modules:
        return sys.modules[name]
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:  # the `cbst` script, unlike `python -m cbst`, does not search the current folder
        sys.path.append(here)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"--import {name}: cannot import it ({exc})") from None
    finally:
        if added:
            sys.path.remove(here)


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"--import {path}: no such file")
    module_name = path.stem
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--import {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        del sys.modules[module_name]
        raise ConfigError(f"--import {path}: cannot import it ({exc})") from None
    return module
