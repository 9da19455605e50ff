"""The README and the guides under docs/: every section's examples run on their own, the README
stays a front door, and every relative link leads somewhere.

pytest's own doctest collection (``--doctest-glob`` in setup.cfg) runs each markdown file as one
session, so an example may lean on a name an earlier section defined. Here each ``##`` / ``###``
section runs alone, in fresh globals: a reader who copies one recipe gets one that works."""

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Linked from the README; their links are checked too.
LINKED = [ROOT / "BENCHMARKS.md", ROOT / "CHANGELOG.md"]
README_LINES = 300
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6}) +(.*?)\s*#*\s*$")


def outside_fences(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, line, inside a fenced block)`` for every line of ``text``."""
    lines, inside = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            lines.append((number, line, True))
            inside = not inside
            continue
        lines.append((number, line, inside))
    return lines


def sections(path: Path) -> list[tuple[str, int, str]]:
    """``(title, first line number, text)`` of each part of a markdown file between ``##`` /
    ``###`` headings (the part before the first is titled by the file's first heading)."""
    parts: list[tuple[str, int, list[str]]] = [("(top)", 1, [])]
    for number, line, fenced in outside_fences(path.read_text()):
        match = None if fenced else re.match(r"^#{2,3} +(.*)$", line)
        if match:
            parts.append((match[1].strip(), number, []))
        parts[-1][2].append(line)
    return [(title, start, "\n".join(lines) + "\n") for title, start, lines in parts]


def doctest_sections() -> list:
    params = []
    for path in PAGES:
        for title, start, text in sections(path):
            if re.search(r"^\s*>>> ", text, re.M):
                name = f"{path.relative_to(ROOT)}::{title}"
                params.append(pytest.param(path, title, start, text, id=name))
    return params


@pytest.mark.parametrize("path, title, start, text", doctest_sections())
def test_each_section_runs_on_its_own(path, title, start, text):
    name = f"{path.relative_to(ROOT)} ({title})"
    test = doctest.DocTestParser().get_doctest(text, {"__name__": "__doc_section__"}, name,
                                               str(path), start - 1)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=report.append)
    assert result.attempted > 0, name
    assert result.failed == 0, "".join(report)


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_LINES, (
        f"README.md has {len(lines)} lines, more than {README_LINES}: move the detail into a "
        "guide under docs/ and link it")


def test_the_readmes_first_two_fenced_blocks_are_the_two_commands():
    """``.ci/run`` runs the second fenced block as the test command."""
    blocks, current = [], None
    for _, line, _ in outside_fences((ROOT / "README.md").read_text()):
        if FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    assert "python -m experiments" in blocks[0], blocks[0]
    assert "python -m pytest" in blocks[1], blocks[1]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lowercased, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line, fenced in outside_fences(path.read_text()):
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match[2])
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """``(line number, target)`` of every markdown link and image outside code."""
    found = []
    for number, line, fenced in outside_fences(path.read_text()):
        if fenced:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        for match in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
            found.append((number, match[1]))
        for match in re.finditer(r"^\s*\[[^\]]+\]:\s*(\S+)", prose):
            found.append((number, match[1]))
    return found


@pytest.mark.parametrize("path", PAGES + LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(path):
    broken = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        destination = (path.parent / file).resolve() if file else path
        if not destination.exists():
            broken.append(f"line {number}: {target} (no file {destination})")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"line {number}: {target} (no heading #{anchor} in "
                          f"{destination.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_the_slug_is_githubs():
    assert slug("Flax Linen with `jaxlr.TrainState` (LRPET)") == \
        "flax-linen-with-jaxlrtrainstate-lrpet"
    assert slug("Evidence: do the methods do what the papers claim?") == \
        "evidence-do-the-methods-do-what-the-papers-claim"
    assert slug("LoRITa training step: N = 3 against N = 1 (`x/y_z.py`)") == \
        "lorita-training-step-n--3-against-n--1-xy_zpy"
