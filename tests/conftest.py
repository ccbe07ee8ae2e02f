"""Shared fixtures: in-repo test data, the optional real Cityscapes frames, and a small thread budget.

``tests/data/`` ships what the project may redistribute (genuine MXNet ``.params`` files written
for this project, the ResNet-38 layer list read off MXNet). Real Cityscapes frames cannot be
redistributed (Cityscapes terms of use), so the tests that need them read ``../shared/testdata``
beside the checkout and skip when it is absent; ``CBST_REQUIRE_TESTDATA=1`` (set by ``.ci/run``)
turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Idle OpenMP threads sleep instead of spinning: the suite runs loader workers beside the tests
# on few cores, where spinning threads stall each other. It must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "data"
TESTDATA = Path(os.environ.get("CBST_TESTDATA", REPO_ROOT.parent / "shared" / "testdata"))
REQUIRE_TESTDATA = os.environ.get("CBST_REQUIRE_TESTDATA", "") not in ("", "0")

if TYPE_CHECKING:
    from cbst.selftrain import SelfTrainConfig
    from cbst.sourcetrain import SourceTrainConfig

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


@pytest.fixture()
def self_train_config(bench) -> Callable[..., SelfTrainConfig]:
    """Make a small self-training configuration on ``bench``: ``self_train_config(output,
    **changes)``; 2 rounds of one epoch on the CPU, batches of 2 crops of 32 pixels, quiet."""
    from cbst.selftrain import SelfTrainConfig

    def make(output: str | Path, **changes: Any) -> SelfTrainConfig:
        base = dict(
            weights=str(bench / "source.pt"),
            output=str(output),
            data_root=str(bench / "data" / "gta5"),
            data_root_tgt=str(bench / "data" / "cityscapes"),
            num_round=2,
            epoch_per_round=1,
            init_src_port=0.5,
            batch_images=2,
            crop_size=32,
            device="cpu",
            progress=False,
            base_lr=0.01,
        )
        return SelfTrainConfig(**{**base, **changes})

    return make


@pytest.fixture()
def epoch_losses() -> Callable[[Path], list[float]]:
    """``epoch_losses(run)``: the epoch losses a source-training run folder logged, in order."""

    def read(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]

    return read


@pytest.fixture()
def one_line_error(capsys) -> Callable[..., str]:
    """Check the stderr captured so far: ``one_line_error(*names)`` asserts it is one error
    line, without a traceback, naming each of ``names``, and returns it."""

    def check(*names: str) -> str:
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
        for name in names:
            assert name in err, (name, err)
        return err

    return check


@pytest.fixture()
def self_train_argv(bench) -> list[str]:
    """``self-train`` with the inputs of ``bench`` (its data roots and source model): a command
    line to add options to."""
    data = bench / "data"
    return [
        *("self-train", "--data-root", str(data / "gta5"), "--data-root-tgt", str(data / "cityscapes")),
        *("--weights", str(bench / "source.pt")),
    ]


@pytest.fixture()
def train_source_argv(bench) -> list[str]:
    """``train-source`` of the small model on ``bench``'s source images: a command line to add
    options to."""
    return [
        "train-source",
        "--dataset",
        "gta5",
        "--data-root",
        str(bench / "data" / "gta5"),
        "--model",
        "small",
    ]


CPU_QUIET = ("--device", "cpu", "--no-progress", "--num-workers", "0")
"""The options of a test's command that runs on the CPU, without progress bars or loader workers."""


@pytest.fixture()
def evaluate_argv(bench) -> list[str]:
    """``evaluate`` of ``bench``'s source model on its target val images, quiet, on the CPU, in
    this process: a command line to add options to."""
    data, model = str(bench / "data" / "cityscapes"), str(bench / "source.pt")
    return ["evaluate", "--data-root", data, "--checkpoint", model, *CPU_QUIET]


@pytest.fixture()
def source_train_config(bench) -> Callable[..., SourceTrainConfig]:
    """Make a small source-training configuration on ``bench``: ``source_train_config(output,
    **changes)``; one epoch of the small model on the CPU, batches of 2 crops of 32 pixels."""
    from cbst.sourcetrain import SourceTrainConfig

    def make(output: str | Path, **changes: Any) -> SourceTrainConfig:
        base = dict(
            dataset="gta5",
            data_root=str(bench / "data" / "gta5"),
            output=str(output),
            model="small",
            batch_images=2,
            crop_size=32,
            to_epoch=1,
            device="cpu",
            num_workers=0,
        )
        return SourceTrainConfig(**{**base, **changes})

    return make
