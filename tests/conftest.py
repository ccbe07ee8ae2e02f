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

# Idle OpenMP threads sleep instead of spinning: the suite runs loader workers beside the tests
# on few cores, where spinning threads stall each other. It must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "data"
TESTDATA = Path(os.environ.get("CBST_TESTDATA", REPO_ROOT.parent / "shared" / "testdata"))
REQUIRE_TESTDATA = os.environ.get("CBST_REQUIRE_TESTDATA", "") not in ("", "0")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The folder holding real Cityscapes frames (``cityscapes/``); skips the test without it."""
    if not (TESTDATA / "cityscapes").is_dir():
        reason = (
            f"{TESTDATA / 'cityscapes'}: real Cityscapes frames not found (not redistributable; "
            "see README, 'Tests')"
        )
        if REQUIRE_TESTDATA:
            pytest.fail(reason + "; CBST_REQUIRE_TESTDATA is set")
        pytest.skip(reason)
    return TESTDATA


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A tiny synthetic benchmark (8 source, 4 target train, 2 val images of 64×32) in ``data/``
    and a randomly initialised small source model ``source.pt``."""
    from cbst.checkpoints import save_checkpoint
    from cbst.models import build_model
    from cbst.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("bench")
    make_synthetic(root / "data", seed=0, num_source=8, num_train=4, num_val=2, size=(64, 32), progress=False)
    torch.manual_seed(0)
    save_checkpoint(
        root / "source.pt", build_model("small", 19), arch="small", num_classes=19, protocol="cityscapes19"
    )
    return root
