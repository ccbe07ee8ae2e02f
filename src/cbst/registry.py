"""Name -> builder tables: one per kind of thing (architectures, datasets, selection policies, ...).

A :class:`Registry` maps a name to an object (a class or a function). Entries come in two ways:

- ``@REGISTRY.register("name")`` on a class or function, as timm's ``@register_model`` does: a
  user's module passed with ``--import`` adds its own entries this way;
- ``REGISTRY.register_lazy("name", "package.module:attribute")`` for cbst's own entries, so that
  listing the names (for ``--help`` and its choices) imports neither the module nor torch; the
  module is imported the first time the entry is looked up.

Each entry may carry ``meta`` (e.g. a dataset's class counts), readable without importing it.
An unknown name is a :class:`~cbst.errors.ConfigError` that lists the registered names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cbst.errors import ConfigError

T = TypeVar("T")


@dataclass
class _Entry:
    """One registered name: the object once resolved, or the ``module:attribute`` to import."""

    target: Any = None
    lazy: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A table of named objects of one kind; ``kind`` names it in error messages ("architecture")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str | None = None, *, override: bool = False, **meta: Any) -> Callable[[T], T]:
        """Decorator adding the decorated object under ``name`` (its ``__name__`` by default)."""

        def add(obj: T) -> T:
            self._add(name or obj.__name__, _Entry(target=obj, meta=meta), override)
            return obj

        return add

    def register_lazy(self, name: str, target: str, *, override: bool = False, **meta: Any) -> None:
        """Add ``name`` as ``"package.module:attribute"``, imported on first :meth:`get`."""
        if ":" not in target:
            raise ValueError(f"lazy {self.kind} {name!r}: target must be 'module:attribute', got {target!r}")
        self._add(name, _Entry(lazy=target, meta=meta), override)

    def _add(self, name: str, entry: _Entry, override: bool) -> None:
        if name in self._entries and not override:
            raise ConfigError(
                f"{self.kind} {name!r} is already registered (pass override=True to replace it)"
            )
        self._entries[name] = entry

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name is an error listing the choices."""
        entry = self._entry(name)
        if entry.lazy is not None:
            module, _, attribute = entry.lazy.partition(":")
            entry.target, entry.lazy = getattr(importlib.import_module(module), attribute), None
        return entry.target

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata given at registration (empty if none), without importing the entry."""
        return dict(self._entry(name).meta)

    def _entry(self, name: str) -> _Entry:
        """The entry of ``name``; an unknown name is an error listing the choices."""
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        """Registered names in registration order (cbst's own first, then users')."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


# The registries, one per kind of thing. cbst's own entries are registered lazily below, so that
# listing them (``--help``, choices) imports neither torch nor the modules that define them;
# adding one to cbst is its module plus one line here, and a user's module adds its own with
# ``@REGISTRY.register("name")`` and ``--import``.
ARCHITECTURES: Registry = Registry("model")
"""Segmentation networks: classes of :class:`cbst.models.base.SegmentationNet`."""
DATASETS: Registry = Registry("dataset")
"""Dataset layouts: functions ``(root, *, split, protocol, list_file, with_labels, verify) ->
SegmentationDataset`` (:func:`cbst.datasets.build_dataset` calls them). Meta ``protocols``: the
label protocols the layout's labels can be read in, ``{class count: protocol or its name}``, the
first the default (read by ``--num-classes``, evaluation and the report without importing the
layout). A layout whose files define its classes (``folder``) has none and is called with
``num_classes`` (None or the count asked for, to check) instead of ``protocol``."""
SELECTION_POLICIES: Registry = Registry("selection policy")
"""Pseudo-label selection policies (class-balanced, global, ...)."""
LOSSES: Registry = Registry("loss")
"""Training losses on logits and labels."""
METHODS: Registry = Registry("method")
"""Named methods (ST, CBST, ...): the option values that make each."""
LOGGERS: Registry = Registry("logger")
"""Where training scalars go besides the console (JSON lines, TensorBoard, ...)."""

ARCHITECTURES.register_lazy("deeplabv2_resnet101", "cbst.models.deeplabv2:DeepLabV2")
ARCHITECTURES.register_lazy("resnet38", "cbst.models.resnet38:ResNet38")
ARCHITECTURES.register_lazy("small", "cbst.models.small:SmallSegNet")
ARCHITECTURES.register_lazy("small_demo", "cbst.models.small:SmallDemoNet")
ARCHITECTURES.register_lazy("segformer_mit_b0", "cbst.models.segformer:SegFormerB0")
ARCHITECTURES.register_lazy("segformer_mit_b1", "cbst.models.segformer:SegFormerB1")
ARCHITECTURES.register_lazy("segformer_mit_b2", "cbst.models.segformer:SegFormerB2")
ARCHITECTURES.register_lazy("segformer_mit_b3", "cbst.models.segformer:SegFormerB3")
ARCHITECTURES.register_lazy("segformer_mit_b4", "cbst.models.segformer:SegFormerB4")
ARCHITECTURES.register_lazy("segformer_mit_b5", "cbst.models.segformer:SegFormerB5")
ARCHITECTURES.register_lazy("daformer_mit_b5", "cbst.models.daformer:DAFormerB5")
ARCHITECTURES.register_lazy("daformer_mit_b0", "cbst.models.daformer:DAFormerB0")
ARCHITECTURES.register_lazy("dinov2_vit_s14", "cbst.models.dinov2:Dinov2S14")
ARCHITECTURES.register_lazy("dinov2_vit_b14", "cbst.models.dinov2:Dinov2B14")
ARCHITECTURES.register_lazy("dinov2_vit_l14", "cbst.models.dinov2:Dinov2L14")

DATASETS.register_lazy("gta5", "cbst.datasets:gta5", protocols={19: "cityscapes19", 16: "cityscapes16"})
DATASETS.register_lazy("synthia", "cbst.datasets:synthia", protocols={16: "synthia16"})
DATASETS.register_lazy(
    "cityscapes", "cbst.datasets:cityscapes", protocols={19: "cityscapes19", 16: "cityscapes16"}
)
DATASETS.register_lazy("folder", "cbst.datasets:folder")  # classes from its dataset.yaml

SELECTION_POLICIES.register_lazy("cb", "cbst.thresholds:ClassBalancedPolicy")
SELECTION_POLICIES.register_lazy("global", "cbst.thresholds:GlobalPolicy")
SELECTION_POLICIES.register_lazy("fixed", "cbst.online_selection:FixedSelector", modes=("online",))

LOSSES.register_lazy("cross_entropy", "cbst.losses:CrossEntropyLoss")

METHODS.register_lazy("ST", "cbst.methods:ST")
METHODS.register_lazy("CBST", "cbst.methods:CBST")
METHODS.register_lazy("CBST-SP", "cbst.methods:CBST_SP")
METHODS.register_lazy("MRKLD", "cbst.methods:MRKLD")
METHODS.register_lazy("LRENT", "cbst.methods:LRENT")
METHODS.register_lazy("DACS", "cbst.methods:DACS")
METHODS.register_lazy("CBST-online", "cbst.methods:CBST_ONLINE")
METHODS.register_lazy("CBST-SP-online", "cbst.methods:CBST_SP_ONLINE")

LOGGERS.register_lazy("jsonl", "cbst.loggers:JsonlLogger")
LOGGERS.register_lazy("tensorboard", "cbst.loggers:TensorBoardLogger")
