"""Each option declared once: a configuration field carries its flag, help, type, range and use.

A command's options are the fields of one dataclass (``SelfTrainConfig``, ``SourceTrainConfig``,
a command's own small one), each made with :func:`option`. Its metadata (an :class:`Option`)
holds everything the command line and the configuration files need, and everything else is
derived from it the same way for every command:

- the argparse flags (:func:`add_arguments`), with the default of every option in ``--help``;
- the keys of a YAML configuration (:func:`config_values`): the long option's name with dashes or
  underscores (``no-progress: true``, ``list: FILE``, ``seed-int: 3``), or the field's name
  (what a run's saved ``config.yaml`` holds); each value is checked against the option's type,
  choices and range when it is read, and an unknown key's error suggests the nearest option;
- the configuration from parsed flags (:func:`from_args`);
- which self-training stages read an option (:func:`stage_options`, :func:`plan_options`), the
  resume rules.

This module imports neither torch nor any part of cbst that does, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import numbers
import re
import reprlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import yaml

from cbst.errors import CLIError, ConfigError

RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "positive": (lambda v: 0 < v < math.inf, "must be positive"),
    "non_negative": (lambda v: 0 <= v < math.inf, "must be >= 0"),
    "fraction": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
}
"""The ranges an option may declare: a name -> (test, the message's verb phrase)."""


class _Shortened(reprlib.Repr):
    """``repr`` cut short at every level; integers too long for ``repr`` are described."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 2, 40, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 3

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 64:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORTENED = _Shortened()


def shown(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters, for messages that quote a value read from
    a file: YAML aliases can make a small file's value gigabytes long when written out."""
    return _SHORTENED.repr(value)


class ValueType:
    """How an option's value is read from a command-line string or a YAML value, and shown.

    :meth:`parse` raises ``ValueError`` with a message saying what was expected.
    """

    metavar: str | None = None
    checked_by_argparse = True

    def parse(self, value: Any) -> Any:
        raise NotImplementedError

    def show(self, value: Any) -> str:
        """The value as it is written on the command line (for ``--help`` and messages)."""
        return str(value)


class Text(ValueType):
    def parse(self, value: Any) -> str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected a string, got {shown(value)}")


class Integer(ValueType):
    metavar = "N"

    def parse(self, value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {shown(value)}")
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {shown(value)}")


class Number(ValueType):
    metavar = "X"

    def parse(self, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {shown(value)}")
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {shown(value)}")


class Switch(ValueType):
    """An on/off option: a flag on the command line, ``true``/``false`` in a file."""

    def parse(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {shown(value)}")

    def show(self, value: Any) -> str:
        return "on" if value else "off"


class Numbers(ValueType):
    """Comma-separated numbers ('0.75,1.0,1.25'), or a YAML list of them; each one positive.

    ``pair`` asks for exactly LO,HI with LO <= HI (a range); ``integers`` for whole numbers
    (may be empty, as ``--lr-steps``).
    """

    def __init__(self, *, pair: bool = False, integers: bool = False) -> None:
        self.pair, self.integers = pair, integers
        self.metavar = "LO,HI" if pair else ("N,N,..." if integers else "F,F,...")

    def parse(self, value: Any) -> tuple:
        if not isinstance(value, (list, tuple, str, int, float)):
            raise ValueError(self._expected(value))
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        if isinstance(value, bool) or (self.integers and isinstance(value, str) and not value.strip()):
            items = [] if not isinstance(value, bool) else [value]
        element = Integer() if self.integers else Number()
        try:
            values = tuple(element.parse(v) for v in items)
        except ValueError:
            raise ValueError(self._expected(value)) from None
        if self.integers:
            if any(v < 0 for v in values):
                raise ValueError(self._expected(value))
            return values
        if not values or min(values) <= 0 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"expected positive numbers, got {shown(value)}")
        if self.pair and (len(values) != 2 or values[0] > values[1]):
            raise ValueError(f"expected LO,HI with 0 < LO <= HI, got {shown(value)}")
        return values

    def _expected(self, value: Any) -> str:
        what = "whole numbers >= 0" if self.integers else "numbers"
        return f"expected comma-separated {what}, got {shown(value)}"

    def show(self, value: Any) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"


class Size(ValueType):
    """An image size written WIDTHxHEIGHT ('256x128'), or a YAML list [W, H]; both positive.

    ``comma_height_first`` also reads the older 'H,W' ('1024,2048' of ``cbst prior``).
    """

    metavar = "WxH"

    def __init__(self, *, comma_height_first: bool = False) -> None:
        self.comma_height_first = comma_height_first

    def parse(self, value: Any) -> tuple[int, int]:
        if (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, (int, str)) for v in value)
        ):
            value = f"{value[0]}x{value[1]}"
        if not isinstance(value, (str, int)):
            raise ValueError(f"expected WIDTHxHEIGHT such as 256x128, got {shown(value)}")
        text = str(value)
        if self.comma_height_first and re.fullmatch(r"\s*\d{1,9}\s*,\s*\d{1,9}\s*", text):
            height, width = text.split(",")
            text = f"{width}x{height}"
        m = re.fullmatch(r"\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*", text)
        if not m or min(int(m.group(1)), int(m.group(2))) <= 0:
            raise ValueError(f"expected WIDTHxHEIGHT such as 256x128, got {shown(value)}")
        return int(m.group(1)), int(m.group(2))

    def show(self, value: Any) -> str:
        return f"{value[0]}x{value[1]}"


class DeviceName(ValueType):
    """Where a command runs: auto, cpu, cuda, cuda:N or mps.

    On the command line the name is checked when the command starts (one line naming
    ``--device``, see :func:`cbst.device.select_device`), not by argparse.
    """

    metavar = "DEVICE"
    checked_by_argparse = False

    def parse(self, value: Any) -> str:
        if isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            return value
        raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {shown(value)}")


TEXT, INTEGER, NUMBER, SWITCH, DEVICE = Text(), Integer(), Number(), Switch(), DeviceName()


@dataclass(frozen=True)
class Option:
    """The declaration of one option (see :func:`option`)."""

    help: str
    flags: tuple[str, ...]
    type: ValueType
    choices: Callable[[], Sequence[str]] | Sequence[str] | None = None
    range: str | None = None
    stages: tuple[str, ...] = ()
    plan: tuple[str, ...] = ()
    section: str = ""
    metavar: str | None = None
    none: tuple[str, ...] = ()
    runtime: bool = False
    path: bool = False
    positional: bool = False
    nargs: str | None = None
    cli_default: Callable[[], Any] | None = None
    shown_default: str | None = None

    @property
    def negated(self) -> bool:
        """A switch whose flag turns it off (``--no-amp`` sets ``amp`` to false)."""
        return isinstance(self.type, Switch) and self.flags[0].startswith("--no-")

    @property
    def dest(self) -> str:
        """The name of the parsed value: the long option's name with underscores."""
        name = self.flags[0].lstrip("-")
        return (name[3:] if self.negated else name).replace("-", "_")

    def choice_list(self) -> tuple[str, ...] | None:
        """The allowed values (from a registry when ``choices`` is a function), or None."""
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    flags: str | Sequence[str] = (),
    type: ValueType | None = None,
    choices: Callable[[], Sequence[str]] | Sequence[str] | None = None,
    range: str | None = None,
    stages: Sequence[str] = (),
    plan: Sequence[str] = (),
    section: str = "",
    metavar: str | None = None,
    none: Sequence[str] = (),
    runtime: bool = False,
    path: bool = False,
    positional: bool = False,
    nargs: str | None = None,
    cli_default: Callable[[], Any] | None = None,
    shown_default: str | None = None,
    name: str | None = None,
) -> Any:
    """A dataclass field declaring one option.

    ``default`` (none: required); ``help`` (the default is appended unless the text states
    it); ``flags``: the flag first, then aliases (by default ``--field-name``, ``--no-field-name``
    for a switch that is on by default; ``name`` gives the field's name for that when the
    flags are not given); ``type`` (from the default when omitted); ``choices`` (a function,
    e.g. ``ARCHITECTURES.names``, is called when the parser is built, after ``--import``);
    ``range``: one of :data:`RANGES`; ``stages``: the self-training stages that read it;
    ``plan``: the round-plan fields computed from it; ``section``: its ``--help`` group;
    ``none``: command-line words that mean None ("none"); ``runtime``: where and how a
    command runs, never what it computes (not taken from a saved run on resume); ``path``:
    a file or folder; ``positional`` (with argparse's ``nargs``): an argument without a flag;
    ``cli_default``: a different default for the command line, computed
    when the parser is built (the CPU count); ``shown_default``: the default as ``--help``
    words it.
    """
    if range is not None and range not in RANGES:
        raise ValueError(f"unknown range {range!r}; expected one of {', '.join(RANGES)}")
    value_type = type or _type_of(default)
    flag_list = (flags,) if isinstance(flags, str) else tuple(flags)
    if not flag_list and name is not None:
        flag_list = (_default_flag(name, default, value_type),)
    spec = dict(
        help=help,
        flags=flag_list,
        type=value_type,
        choices=choices,
        range=range,
        stages=tuple(stages),
        plan=tuple(plan),
        section=section,
        metavar=metavar,
        none=tuple(none),
        runtime=runtime,
        path=path,
        positional=positional,
        nargs=nargs,
        cli_default=cli_default,
        shown_default=shown_default,
    )
    return dataclasses.field(default=default, metadata={"option": spec})


def _type_of(default: Any) -> ValueType:
    if isinstance(default, bool):
        return SWITCH
    if isinstance(default, int):
        return INTEGER
    if isinstance(default, float):
        return NUMBER
    return TEXT


def _default_flag(name: str, default: Any, value_type: ValueType) -> str:
    negated = isinstance(value_type, Switch) and default is True
    return ("--no-" if negated else "--") + name.replace("_", "-")


_DECLARED: dict[type, dict[str, Option]] = {}
_FLAG_OF: dict[str, str] = {}


def declared(cls: type) -> type:
    """Class decorator (after ``@dataclass``): complete the options of ``cls``'s fields.

    A field made with :func:`option` without ``flags`` gets ``--field-name``; the class's
    options become readable through :func:`options_of`.
    """
    table: dict[str, Option] = {}
    for f in dataclasses.fields(cls):
        spec = dict(f.metadata.get("option") or {})
        if not spec:
            continue
        if not spec["flags"]:
            spec["flags"] = (_default_flag(f.name, f.default, spec["type"]),)
        table[f.name] = Option(**spec)
        _FLAG_OF.setdefault(f.name, _named_flag(table[f.name]))
    _DECLARED[cls] = table
    return cls


def _named_flag(opt: Option) -> str:
    """How messages name the option: its long flag, or a positional argument's name in capitals."""
    if opt.negated:
        return opt.flags[0]
    return opt.dest.upper() if opt.positional else "--" + opt.dest.replace("_", "-")


def options_of(cls: type) -> dict[str, Option]:
    """Field name -> :class:`Option` of a :func:`declared` configuration class."""
    if cls not in _DECLARED:
        raise TypeError(f"{cls.__name__} has no declared options (decorate it with @options.declared)")
    return _DECLARED[cls]


def flag(name: str) -> str:
    """The command-line flag of configuration field ``name`` (``list_file`` -> ``--list``)."""
    return _FLAG_OF.get(name, "--" + name.replace("_", "-"))


def negated_flag(name: str) -> str | None:
    """The flag that turns field ``name`` off (``--no-amp``), or None if it is not such a switch."""
    for table in _DECLARED.values():
        opt = table.get(name)
        if opt is not None and opt.negated:
            return opt.flags[0]
    return None


def stage_options(cls: type) -> dict[str, tuple[str, ...]]:
    """Stage -> the fields it reads, in declaration order (the resume rule of each stage)."""
    out: dict[str, list[str]] = {}
    for name, opt in options_of(cls).items():
        for stage in opt.stages:
            out.setdefault(stage, []).append(name)
    return {stage: tuple(names) for stage, names in out.items()}


def plan_options(cls: type) -> dict[str, tuple[str, ...]]:
    """Round-plan field -> the fields it is computed from."""
    out: dict[str, list[str]] = {}
    for name, opt in options_of(cls).items():
        for plan_field in opt.plan:
            out.setdefault(plan_field, []).append(name)
    return {k: tuple(v) for k, v in out.items()}


def path_fields(cls: type) -> tuple[str, ...]:
    """The fields that hold a file or folder (made absolute in a run's saved config)."""
    return tuple(name for name, opt in options_of(cls).items() if opt.path)


def runtime_fields(cls: type) -> tuple[str, ...]:
    """The fields that say where and how a command runs (never taken from a saved run)."""
    return tuple(name for name, opt in options_of(cls).items() if opt.runtime)


# ---------------------------------------------------------------------------- parser


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add the options of ``cls`` to ``parser``, one argument group per section."""
    groups: dict[str, argparse._ActionsContainer] = {}
    for name, opt in options_of(cls).items():
        group = groups.get(opt.section)
        if group is None:
            group = parser.add_argument_group(opt.section) if opt.section else parser
            groups[opt.section] = group
        _add_one(group, name, opt, cls)


def _add_one(group: argparse._ActionsContainer, name: str, opt: Option, cls: type) -> None:
    default = default_of(cls, name)
    help_text = _help(opt, default, required=default is MISSING).replace("%", "%%")
    if opt.positional:
        kwargs = {"nargs": opt.nargs} if opt.nargs else {"type": _argparse_type(opt)}
        group.add_argument(opt.dest, metavar=opt.metavar or opt.dest.upper(), help=help_text, **kwargs)
        return
    kwargs: dict[str, Any] = dict(dest=opt.dest, help=help_text)
    if isinstance(opt.type, Switch):
        kwargs.update(action="store_false" if opt.negated else "store_true")
        kwargs["default"] = default
    else:
        choices = opt.choice_list()
        kwargs.update(
            type=_argparse_type(opt),
            default=None if default is MISSING else default,
            metavar=opt.metavar or (None if choices else opt.type.metavar or opt.dest.upper()),
        )
        if choices is not None:
            kwargs["choices"] = _Choices(choices, opt.none)
    group.add_argument(*opt.flags, **kwargs)


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` for the command line (MISSING for a required one)."""
    opt = options_of(cls)[name]
    if opt.cli_default is not None:
        return opt.cli_default()
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


class _Choices(tuple):
    """argparse choices that also admit the words meaning "none" (e.g. ``--with-prior none``)."""

    def __new__(cls, choices: Sequence[str], none: Sequence[str]) -> _Choices:
        self = super().__new__(cls, choices)
        self.none = tuple(none)
        return self

    def __contains__(self, item: object) -> bool:
        return item is None or super().__contains__(item) or str(item).lower() in self.none


def _argparse_type(opt: Option) -> Callable[[str], Any]:
    """The option's value type as an argparse ``type`` (a bad value is argparse's usage error)."""

    def parse(text: str) -> Any:
        if text.lower() in opt.none:
            return None
        if not opt.type.checked_by_argparse:
            return text
        try:
            return opt.type.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = type(opt.type).__name__.lower()
    return parse


def _help(opt: Option, default: Any, *, required: bool) -> str:
    """The option's help with its default, unless the text already says it."""
    text = opt.help
    if required:
        return f"{text} (required)" if text else "(required)"
    if "default" in text.lower():
        return text
    if opt.shown_default is not None:
        shown = opt.shown_default
    elif isinstance(opt.type, Switch):
        return f"{text} (off by default)"
    elif default is None:
        shown = "none"
    else:
        shown = opt.type.show(default)
    return f"{text} (default: {shown})" if text else f"(default: {shown})"


# ---------------------------------------------------------------------------- values


def check_value(opt: Option, value: Any) -> Any:
    """``value`` (from a file, or given by a library caller) as the option's type; checks its
    choices and range. Raises ``ValueError`` whose message says what was expected."""
    if value is None or (isinstance(value, str) and value.lower() in opt.none):
        return None
    parsed = opt.type.parse(value)
    choices = opt.choice_list()
    if choices is not None and parsed not in choices:
        raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {shown(parsed)}")
    if opt.range is not None:
        test, verb = RANGES[opt.range]
        if not test(parsed) or (isinstance(parsed, float) and math.isnan(parsed)):
            raise ValueError(f"{verb}, got {shown(value)}")
    return parsed


def config_values(
    data: Mapping[str, Any], cls: type, source: str, *, nullable: bool = True
) -> dict[str, Any]:
    """The values of a configuration mapping, keyed by the options' parsed names (``dest``).

    Keys are the long option names with dashes or underscores, their aliases, or the field
    names; a ``no-X`` key of a switch sets ``X`` to the opposite. Each value is checked against
    its option's type, choices and range; errors name ``source`` (the file) and the option, and
    an unknown key's error suggests the nearest option. ``nullable=False`` refuses a null
    for a required option (a saved run must hold all of them).
    """
    table = options_of(cls)
    keys = _key_table(table)
    out: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        found = keys.get(str(key).replace("-", "_"))
        if found is None:
            unknown.append(str(key))
            continue
        name, inverted = found
        opt = table[name]
        where = f"{source}: {key}"
        if inverted:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {shown(value)}")
            value = not value
        required = default_of(cls, name) is MISSING
        if value is None and required and not nullable:
            raise ConfigError(f"{where}: {_named_flag(opt)} is required; got null")
        try:
            out[opt.dest] = check_value(opt, value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {_named_flag(opt)} {exc}") from None
        if out[opt.dest] is None and required:
            raise ConfigError(f"{where}: {_named_flag(opt)} is required; got null")
    if unknown:
        hints = [_suggestion(k, keys) for k in unknown]
        listed = ", ".join(k + (f" (did you mean {h}?)" if h else "") for k, h in zip(unknown, hints))
        raise ConfigError(f"{source}: unknown option(s) {listed}")
    return out


def _key_table(table: Mapping[str, Option]) -> dict[str, tuple[str, bool]]:
    """Normalised key -> (field name, whether the key is the switch's opposite)."""
    keys: dict[str, tuple[str, bool]] = {}
    for name, opt in table.items():
        keys[name] = (name, False)
        keys[opt.dest] = (name, False)
        for f in opt.flags:
            key = f.lstrip("-").replace("-", "_")
            if opt.negated and key.startswith("no_"):
                keys[key] = (name, True)
            else:
                keys[key] = (name, False)
        if isinstance(opt.type, Switch) and not opt.negated:
            keys.setdefault("no_" + opt.dest, (name, True))
    return keys


def _suggestion(key: str, keys: Mapping[str, tuple[str, bool]]) -> str | None:
    match = difflib.get_close_matches(str(key).replace("-", "_"), list(keys), n=1, cutoff=0.6)
    return match[0].replace("_", "-") if match else None


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """The configuration ``cls`` from parsed flags; a required option not given is an error."""
    values = {}
    for name, opt in options_of(cls).items():
        value = getattr(args, opt.dest, None)
        if isinstance(value, str) and value.lower() in opt.none:
            value = None
        if value is None and default_of(cls, name) is MISSING and name not in overrides:
            raise CLIError(f"{_named_flag(opt)} is required")
        values[name] = value
    return cls(**{**values, **overrides})


def check_ranges(config: Any) -> None:
    """Every option of ``config`` with a declared range holds a number in it (None allowed
    for an option whose default is None); errors name the option as its flag."""
    for name, opt in options_of(type(config)).items():
        if opt.range is None:
            continue
        value = getattr(config, name)
        if value is None and (opt.none or default_of(type(config), name) is None):
            continue  # None is allowed: the default, or spelt by one of the option's words for it
        test, verb = RANGES[opt.range]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ConfigError(f"{flag(name)} must be a number, got {shown(value)}")
        if not test(value):
            raise ConfigError(f"{flag(name)} {verb}, got {value}")


def check_choices(config: Any) -> None:
    """Every option of ``config`` with choices holds one of them (None where allowed)."""
    for name, opt in options_of(type(config)).items():
        choices = opt.choice_list()
        value = getattr(config, name)
        if choices is None or value in choices:
            continue
        if value is None and (opt.none or default_of(type(config), name) is None):
            continue  # None is allowed: the default, or spelt by one of the option's words for it
        raise ConfigError(f"{flag(name)} must be one of {', '.join(choices)}, got {shown(value)}")


def saved_form(config: Any) -> dict[str, Any]:
    """Plain-type dict (YAML-safe) of ``config`` with its path fields absolute: a run's
    ``config.yaml``, which reruns the experiment from any folder."""
    data = {
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in dataclasses.fields(config)
    }
    return resolved_paths(data, path_fields(type(config)))


KEYWORDS = ("source", "imagenet")
"""Values of path options that are not paths ("--with-prior source", "--weights imagenet")."""


def resolved_paths(values: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``values`` with the named path fields made absolute and normalised (None and keywords kept)."""
    out = dict(values)
    for name in names:
        value = out.get(name)
        if value is not None and value not in KEYWORDS:
            out[name] = str(Path(value).expanduser().resolve())
    return out


# ---------------------------------------------------------------------------- YAML


MAX_DEPTH = 16
"""Deepest nesting a configuration file may have (a config is a flat mapping of options)."""
MAX_NODES = 100_000
"""Most YAML nodes a configuration file may expand to, aliases counted each time they are used."""
MAX_INTEGER_CHARACTERS = 40
"""Longest integer a configuration file may write (a 64-bit seed takes 20 digits)."""


class _BoundedLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing deep nesting and aliases that expand beyond a small size
    (a "billion laughs" file) while composing, before anything large is built."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}
        self._total = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            self._count(self._sizes.get(id(node), 1))
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep")
        before = self._total
        node = super().compose_node(parent, index)
        self._depth -= 1
        self._count(1)
        self._sizes[id(node)] = self._total - before
        return node

    def _count(self, nodes: int) -> None:
        self._total += nodes
        if self._total > MAX_NODES:
            raise yaml.YAMLError(f"expands to more than {MAX_NODES} values (aliases counted where used)")

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer of at most ``MAX_INTEGER_CHARACTERS`` characters (``0x`` and ``1:20:30``
        forms too): a longer one takes long to build and cannot be written out again."""
        if len(node.value) > MAX_INTEGER_CHARACTERS:
            raise yaml.YAMLError(
                f"an integer of {len(node.value)} characters, more than {MAX_INTEGER_CHARACTERS} "
                f"(line {node.start_mark.line + 1})"
            )
        return super().construct_yaml_int(node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


MAX_CHARACTERS = 1_000_000
"""Longest configuration file read (a config is a few hundred bytes)."""


def _flow_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` outside quotes and comments: YAML's scanner takes
    time quadratic in it, so it is measured before the text is parsed."""
    depth = deepest = 0
    quote: str | None = None
    previous = "\n"
    in_comment = False
    for char in text:
        if in_comment:
            in_comment = char != "\n"
        elif quote is not None:
            if char == quote:
                quote = None
        elif char in "\"'" and previous in " \t\n[{,:":
            quote = char
        elif char == "#" and previous in " \t\n":
            in_comment = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
        previous = char
    return deepest


def load_yaml(text: str, source: str) -> Any:
    """Parse configuration text safely; an invalid, too deep or too large file is a
    ``ConfigError`` naming ``source``."""
    if len(text) > MAX_CHARACTERS:
        raise ConfigError(f"{source}: not a configuration file: more than {MAX_CHARACTERS} characters")
    if _flow_depth(text) > MAX_DEPTH:
        raise ConfigError(
            f"{source}: not a valid configuration file: nested more than {MAX_DEPTH} levels deep"
        )
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a value YAML cannot build (a date)
        raise ConfigError(f"{source}: not a valid configuration file: {_one_line(str(exc))}") from None
    finally:
        loader.dispose()


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def iter_options(cls: type) -> Iterator[tuple[str, Option]]:
    """(field name, option) of ``cls`` in declaration order."""
    return iter(options_of(cls).items())


def class_counts() -> tuple[int, ...]:
    """The class counts the registered datasets read their labels in, for ``--num-classes``
    choices (a user's ``--import``ed dataset adds its own)."""
    from cbst.labels import class_count_choices  # label tables and image I/O: only to list them

    return class_count_choices()
