"""Shared fixtures: the real test data beside the repository, and a small thread budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = REPO_ROOT.parent / "shared" / "testdata"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def testdata() -> Path:
    """``../shared/testdata`` relative to the repository root (real Cityscapes frames, MXNet files)."""
    if not TESTDATA.is_dir():
        pytest.fail(f"{TESTDATA}: shared test data not found (tests expect ../shared/testdata)")
    return TESTDATA
