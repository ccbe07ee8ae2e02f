"""The import graph: no circles between cbst's modules, and every module imports on its own."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbst.cli import COMMANDS

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in (SRC / "cbst").rglob("*.py"))


def _imports(name: str) -> set[str]:
    """The cbst modules that module ``name`` imports anywhere in its code (at its top or in a
    function), resolved to modules (``from cbst import io`` -> ``cbst.io``)."""
    path = SRC / Path(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    if name == "cbst.cli":  # loads its commands with importlib
        found.update(f"cbst.commands.{c}" for c in COMMANDS)
    # ``from cbst import io`` imports cbst.io; the package's own __init__ (a lazy public API)
    # is not counted as imported by it
    return {m for m in found if m in MODULES and m not in (name, "cbst")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    graph = {m: _imports(m) for m in MODULES}
    # A package importing its own submodules is no circle: drop parent -> child edges' reverse
    for m in MODULES:
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


_FORK_EACH = """
import importlib, os, sys, traceback
{preload}
assert not [m for m in sys.modules if m.split(".")[0] == "cbst"], "the parent imported cbst"
failed, running = [], {{}}


def reap():
    pid, status = os.wait()
    if os.waitstatus_to_exitcode(status):
        failed.append(running[pid])
    del running[pid]


for name in sys.argv[1:]:
    if len(running) >= (os.cpu_count() or 1):  # one child per core at a time
        reap()
    pid = os.fork()
    if pid == 0:  # the child imports one cbst module, and nothing of cbst before it
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    running[pid] = name
while running:
    reap()
failed.sort()
print(",".join(failed))
"""
_THIRD_PARTY = ("torch", "torchvision", "numpy", "PIL.Image", "yaml", "tqdm", "cv2", "timm")
"""Imported once by the parent before it forks: each child pays for its cbst imports only."""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child per module")
def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module, imported first in a process holding no cbst module, imports: a child forked
    from an interpreter that imported only third-party libraries (so the test takes seconds,
    not one interpreter start per module)."""
    modules = [m for m in MODULES if m != "cbst.__main__"]  # importing it runs the command line
    preload = "\n".join(f"import {lib}" for lib in _THIRD_PARTY)
    run = subprocess.run(
        [sys.executable, "-c", _FORK_EACH.format(preload=preload), *modules],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    failed = run.stdout.strip()
    assert not failed, f"{failed}: {run.stderr[-2000:]}"
