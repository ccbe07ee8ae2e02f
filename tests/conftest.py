"""Shared fixtures: in-repo test data, the optional real Cityscapes frames, and a small thread budget.

``tests/data/`` ships what the project may redistribute (genuine MXNet ``.params`` files written
for this project, the ResNet-38 layer list read off MXNet). Real Cityscapes frames cannot be
redistributed (Cityscapes terms of use), so the tests that need them read ``../shared/testdata``
beside the checkout and skip when it is absent; ``CBST_REQUIRE_TESTDATA=1`` (set by ``.ci/run``)
turns that skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import cbst  # noqa: F401  (before torch: idle OpenMP threads sleep, see cbst/__init__.py)
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "data"
TESTDATA = Path(os.environ.get("CBST_TESTDATA", REPO_ROOT.parent / "shared" / "testdata"))
REQUIRE_TESTDATA = os.environ.get("CBST_REQUIRE_TESTDATA", "") not in ("", "0")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The folder holding real Cityscapes frames (``cityscapes/``); skips the test without it."""
    if not (TESTDATA / "cityscapes").is_dir():
        reason = (f"{TESTDATA / 'cityscapes'}: real Cityscapes frames not found (not redistributable; "
                  "see README, 'Tests')")
        if REQUIRE_TESTDATA:
            pytest.fail(reason + "; CBST_REQUIRE_TESTDATA is set")
        pytest.skip(reason)
    return TESTDATA
