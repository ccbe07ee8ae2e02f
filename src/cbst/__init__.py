"""Class-Balanced Self-Training (CBST) for domain adaptation of semantic segmentation.

The public API is imported lazily (module ``__getattr__``), so ``import cbst`` does not import
torch; each name is imported on first use::

    import cbst

    root = cbst.render_synthetic("bench", num_source=40, num_train=20, num_val=10)
    model = cbst.build_model("small", num_classes=19)
    labels = cbst.predict(model, [root / "cityscapes/leftImg8bit/val/renderdorf/..."])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "render_synthetic": "cbst.api",
    "build_model": "cbst.models",
    "load_model": "cbst.api",
    "predict": "cbst.api",
    "evaluate_checkpoint": "cbst.api",
    "SelfTrainConfig": "cbst.selftrain",
    "self_train": "cbst.selftrain",
    "SourceTrainConfig": "cbst.sourcetrain",
    "train_source": "cbst.sourcetrain",
}
"""Each public name and the module that defines it."""

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cbst' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
