"""The README stays true: its commands and options exist, its files exist, its numbers match the docs.

Conventions checked here (also stated in a comment in the README):
- every ``cbst COMMAND`` in the README's code is a command of ``cbst.cli.build_parser()``, and every
  ``--option`` after it one of that command's options; an ``--option`` in inline code without a
  command is an option of some command;
- every relative link, ``docs/…``, ``configs/…`` and ``benchmarks/…`` path it names exists;
- a paragraph that links ``docs/results.md`` or ``docs/performance.md`` quotes that doc: each
  number in it (outside inline code and link targets) appears in the doc, and a code block right
  after such a paragraph (the demo's table) appears in the doc verbatim;
- every name in the first column of the Models table is a registered architecture.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cbst.cli import build_parser
from cbst.registry import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUOTED_DOCS = ("docs/results.md", "docs/performance.md")

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")
_OPTION = re.compile(r"^--[a-z][a-z0-9-]*")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")


def _blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced code block."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(README)]


def _prose() -> str:
    """The README without its fenced code blocks and HTML comments."""
    return re.sub(r"<!--.*?-->", "", _FENCE.sub("", README), flags=re.S)


def _shell_lines(text: str) -> list[list[str]]:
    """Shell commands of a code block as token lists, continuation lines joined, comments dropped."""
    text = text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\||[|;>]", line):
            commands.append(shlex.split(part))
    return commands


def _cbst_uses(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """(command, options) of a ``cbst COMMAND ...`` (also ``-m cbst COMMAND``) in the tokens."""
    uses = []
    for i, token in enumerate(tokens):
        if token == "cbst" and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
            options = [m.group(0) for t in tokens[i + 2 :] if (m := _OPTION.match(t))]
            uses.append((tokens[i + 1], options))
    return uses


def _all_uses() -> list[tuple[str, list[str]]]:
    uses = []
    for language, text in _blocks():
        if language in ("bash", "sh", ""):
            for tokens in _shell_lines(text):
                uses += _cbst_uses(tokens)
    for span in _INLINE.findall(_prose()):
        uses += _cbst_uses(span.replace("...", "").split())
    return uses


@pytest.fixture(scope="module")
def parsers():
    top, subs = build_parser()
    return top, {name: set(p._option_string_actions) for name, p in subs.items()}


def test_the_readme_uses_cbst_commands(parsers):
    commands = {c for c, _ in _all_uses()}
    assert {"demo", "self-train", "evaluate", "report", "convert", "train-source"} <= commands


def test_every_cbst_command_and_its_options_exist(parsers):
    _, options = parsers
    wrong = []
    for command, used in _all_uses():
        if command not in options:
            wrong.append(f"cbst {command}: no such command")
            continue
        wrong += [f"cbst {command} {o}: no such option" for o in used if o not in options[command]]
    assert wrong == []


def test_every_option_in_inline_code_is_an_option_of_some_command(parsers):
    _, options = parsers
    known = set().union(*options.values())
    spans = [s for s in _INLINE.findall(_prose()) if not _cbst_uses(s.split())]
    named = {m.group(0) for s in spans for t in s.split() if (m := _OPTION.match(t))}
    assert sorted(named - known) == []


def test_every_file_the_readme_names_exists():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    paths = [p for p in links if "://" not in p]
    paths += re.findall(r"(?<![\w/.])((?:docs|configs|benchmarks|tests)/[\w./-]*\w)", README)
    missing = sorted({p for p in paths if not (ROOT / p).exists()})
    assert missing == []


def _numbers(text: str) -> list[str]:
    text = _INLINE.sub("", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return _NUMBER.findall(text)


def _quoting_paragraphs() -> list[tuple[str, str, str | None]]:
    """(doc, paragraph, code block right after it or None) for every paragraph linking a doc."""
    text = re.sub(r"<!--.*?-->\n?", "", README, flags=re.S)
    parts = re.split(r"\n\s*\n", text)
    found = []
    for i, part in enumerate(parts):
        if part.lstrip().startswith("```"):
            continue
        for doc in QUOTED_DOCS:
            if f"]({doc}" in part:
                following = parts[i + 1] if i + 1 < len(parts) else ""
                block = _FENCE.match(following.strip() + "\n")
                found.append((doc, part, block.group(2) if block and part.rstrip().endswith(":") else None))
    return found


def test_numbers_quoted_from_the_docs_appear_there():
    quoting = _quoting_paragraphs()
    assert any(block for _, _, block in quoting), "the demo's table should be quoted from docs/results.md"
    wrong = []
    for doc, paragraph, block in quoting:
        text = (ROOT / doc).read_text()
        in_doc = set(_NUMBER.findall(text))
        wrong += [
            f"{doc} lacks {n} (README: {paragraph[:60]!r}...)" for n in _numbers(paragraph) if n not in in_doc
        ]
        if block is not None and block not in text:
            wrong.append(f"{doc} lacks the README's code block starting {block[:40]!r}")
    assert wrong == []


def test_the_demo_table_is_the_idle_machine_table_of_the_results():
    results = (ROOT / "docs/results.md").read_text()
    idle = results.split("## The demo alone on an idle machine", 1)[1].split("\n## ", 1)[0]
    table = _FENCE.search(idle).group(2)
    assert f"```\n{table}```" in README


def test_every_model_in_the_models_table_is_registered():
    section = README.split("## Models", 1)[1].split("\n## ", 1)[0]
    names = []
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # after the header
    for line in rows:
        if line.startswith("| `"):
            first = line.split("|")[1]
            spans = _INLINE.findall(first)
            if "…" in first:  # `segformer_mit_b0` … `segformer_mit_b5`
                stem, low, high = re.fullmatch(r"(.*?)(\d+)", spans[0]).group(1), spans[0][-1], spans[1][-1]
                spans = [f"{stem}{k}" for k in range(int(low), int(high) + 1)]
            names += spans
    assert {"resnet38", "deeplabv2_resnet101", "small"} <= set(names)
    assert sorted(set(names) - set(ARCHITECTURES.names())) == []


def test_the_readme_stays_short():
    assert len(README.splitlines()) <= 200
