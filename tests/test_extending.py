"""docs/extending.md does what it says: its four modules, run through the command line as shown.

The test writes each ``# NAME.py`` code block of the page into a folder outside the package and
runs the page's shell block, command by command, in that folder, then checks that the user's
backbone, 7-class dataset, selection policy and loss were the ones used. The commands run one
after the other in one fresh interpreter, each through ``cbst.cli.main`` as the ``cbst`` script
runs it, so that the block pays for importing torch once rather than per command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbst.methods import method_table

REPO_ROOT = Path(__file__).resolve().parents[1]

DOC = REPO_ROOT / "docs" / "extending.md"
CATEGORIES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]


def _blocks(language: str) -> list[str]:
    """The page's fenced code blocks in ``language``, in order."""
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def _modules() -> dict[str, str]:
    """{file name: source} of the page's Python blocks that start with ``# NAME.py``."""
    found = {}
    for block in _blocks("python"):
        first, _, _ = block.partition("\n")
        if re.fullmatch(r"# \w+\.py", first):
            found[first[2:]] = block
    return found


def _commands() -> list[list[str]]:
    """The ``cbst`` commands of the page's shell block, continuation lines joined."""
    (script,) = _blocks("sh")
    return [shlex.split(line) for line in script.replace("\\\n", " ").splitlines() if line.strip()]


_SEQUENCE = """
import json, sys
from cbst.cli import main
for args in json.loads(sys.argv[1]):
    print("$ cbst", *args, flush=True)
    status = main(args)
    if status:
        sys.exit(status)
"""
"""Runs each command line of ``argv[1]`` (a JSON list of argument lists) as ``cbst`` would, in
order, stopping at the first that fails."""


def _env(cwd: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), str(REPO_ROOT / "src")]))


def _cbst(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cbst", *args],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _cbst_sequence(commands: list[list[str]], cwd: Path) -> subprocess.CompletedProcess:
    """The ``cbst`` command lines ``commands`` run one after the other in one fresh interpreter."""
    line = [sys.executable, "-c", _SEQUENCE, json.dumps([c[1:] for c in commands])]
    return subprocess.run(line, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=900)


def test_the_page_lists_the_registered_methods() -> None:
    assert method_table() in DOC.read_text()


def test_the_page_shows_four_modules_and_uses_each() -> None:
    modules = _modules()
    assert sorted(modules) == ["my_categories.py", "my_loss.py", "my_net.py", "my_policy.py"]
    used = " ".join(" ".join(c) for c in _commands())
    for name in modules:
        assert name.removesuffix(".py") in used


@pytest.mark.slow
def test_extending_doc_runs_as_written(tmp_path: Path) -> None:
    for name, source in _modules().items():
        (tmp_path / name).write_text(source)
    commands = _commands()
    assert all(command[0] == "cbst" for command in commands)
    done = _cbst_sequence(commands, tmp_path)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert done.stdout.count("$ cbst ") == len(commands) == 5

    # the 7 categories reached --help, the metrics and the report
    help_text = _cbst(["evaluate", "--import", "my_categories", "--help"], tmp_path).stdout
    assert re.search(r"--num-classes \{[^}]*\b7\b", help_text)
    assert (
        "cityscapes_categories"
        in _cbst(["self-train", "--import", "my_categories", "--help"], tmp_path).stdout
    )
    metrics = json.loads((tmp_path / "run" / "categories.json").read_text())
    assert list(metrics["iou"]) == CATEGORIES
    report = (tmp_path / "run" / "report.html").read_text()
    assert all(name in report for name in CATEGORIES)
    # the user's network, loss and policy were the ones trained and applied
    source = json.loads((tmp_path / "source" / "log.jsonl").read_text().splitlines()[-1])
    assert source["epoch"] == 2
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "kc_policy: my_policy" in config and "loss: my_loss" in config
    for r in (0, 1):
        stats = json.loads((tmp_path / "run" / f"round_{r}" / "stats.json").read_text())
        assert stats["policy"] == "my_policy" and list(stats["thresholds"]) == CATEGORIES
        assert min(stats["thresholds"].values()) >= 0.2
    meta = torch.load(tmp_path / "run" / "round_1" / "model.pt", weights_only=False)["meta"]
    assert (meta["arch"], meta["num_classes"], meta["protocol"]) == ("my_net", 7, "cityscapes_categories")
