"""The named methods (ST, CBST, CBST-SP, MRKLD, LRENT; online: DACS, CBST-online, CBST-SP-online)
as option values.

Each method is a :class:`Method` registered in :data:`cbst.registry.METHODS`: the values of
:class:`cbst.selftrain.SelfTrainConfig` fields that make it, on top of the defaults. ``cbst
demo`` runs them by name, the report names a run by :func:`method_of`, and the docs list
:func:`method_table`. The module imports nothing heavy (no torch): the command line lists the
methods in ``--help`` through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cbst.registry import METHODS

SWITCHES: tuple[str, ...] = ("with_prior", "mr_weight_kld", "mr_weight_src", "lr_weight_ent")
"""Options that switch a part of a method on by taking a value (a prior file, a weight): a run
uses that part whenever the value is set (not None, 0, "none" or "false"), whatever it is."""


@dataclass(frozen=True)
class Method:
    """A named method: the self-training option values that make it, and one line about it."""

    name: str
    options: Mapping[str, Any]
    summary: str

    def matches(self, config: Mapping[str, Any]) -> bool:
        """Whether a run's configuration (``config.yaml``'s mapping) is this method.

        Every option must have the method's value, except :data:`SWITCHES`, which must be on
        when the method sets them; a switch the method does not name must be off. The mode
        must be the method's (a method that names none is a rounds one; so is a run whose
        configuration names none, saved before the online mode existed).
        """
        if config.get("mode", "rounds") != self.options.get("mode", "rounds"):
            return False
        for key in SWITCHES:
            if _is_on(self.options.get(key)) != _is_on(config.get(key)):
                return False
        return all(config.get(k) == v for k, v in self.options.items() if k not in SWITCHES)


def _is_on(value: Any) -> bool:
    """Whether a switch option is set (its part of the method is used)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "none", "false")
    return bool(value)


ST = Method("ST", {"kc_policy": "global"}, "self-training with one global confidence threshold")
CBST = Method("CBST", {"kc_policy": "cb"}, "class-balanced self-training: one threshold per class")
CBST_SP = Method(
    "CBST-SP",
    {"kc_policy": "cb", "with_prior": "source"},
    "CBST with a spatial prior counted on the source labels",
)
MRKLD = Method(
    "MRKLD",
    {"kc_policy": "cb", "mr_weight_kld": 0.1},
    "CRST's model regularisation: KL(uniform ‖ p) on the pseudo-labelled pixels (the authors' weight)",
)
LRENT = Method(
    "LRENT",
    {"kc_policy": "cb", "lr_weight_ent": 0.25},
    "CRST's label regularisation: entropy-regularised soft pseudo-labels (the authors' alpha)",
)


DACS = Method(
    "DACS",
    {"mode": "online", "kc_policy": "fixed"},
    "online: a mean teacher's pseudo-labels weighted by their confidence, ClassMix (DACS/DAFormer)",
)
CBST_ONLINE = Method(
    "CBST-online",
    {"mode": "online", "kc_policy": "cb"},
    "online, with class-balanced thresholds from the recent target batches",
)
CBST_SP_ONLINE = Method(
    "CBST-SP-online",
    {"mode": "online", "kc_policy": "cb", "with_prior": "source"},
    "CBST-online with the spatial prior of the source labels on the teacher's probabilities",
)


def method_of(options: Mapping[str, Any]) -> str | None:
    """The name of the registered method a run's options match, most specific first (the method
    setting more options wins; ties go to the one registered first); None if none matches."""
    ranked = sorted(METHODS.names(), key=lambda name: -len(METHODS.get(name).options))
    return next((name for name in ranked if METHODS.get(name).matches(options)), None)


def method_table() -> str:
    """A Markdown table of the registered methods and their option values (for the docs)."""
    lines = ["| method | options | what it is |", "|---|---|---|"]
    for name in METHODS.names():
        method = METHODS.get(name)
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in method.options.items())
        lines.append(f"| {name} | `{flags}` | {method.summary} |")
    return "\n".join(lines)
