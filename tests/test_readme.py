"""The main job's figures (docs/experiments.md, which the README links as the main job's figures)
are those of the current code: seed 0 of the default preset is run again in a new process and
compared with docs/experiments.md's generated blocks and docs/accuracy_drop.png (regenerate them
with ``python -m experiments.figures``).

On the machine the first block names (processor model, the instruction set XLA compiles for,
cores, jax and jaxlib: :func:`experiments.machine.describe`), a new process repeats the figures
bit for bit, so they must be equal. Elsewhere float32 sums round differently and training ends
a few test images apart: the same tables and words, each number within the tolerance the
spread block measured (the largest change of a number of the first block over seeds and
instruction sets). Every comparison reports a short difference, never a diff of whole files."""

import hashlib
import re
from pathlib import Path

import pytest

from experiments import figures
from experiments import machine as machine_lib

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = ("is stale or another machine moved it too far: regenerate the figures with "
              "`python -m experiments.figures`.")
pytestmark = pytest.mark.slow


# The guide that holds the generated main-job blocks.
FIGURES = ROOT / "docs" / "experiments.md"


def readme() -> str:
    """The text of docs/experiments.md (the main job's figures moved there from the README)."""
    return FIGURES.read_text()


def written_machine() -> str:
    """The machine named in the first main-job block's first line."""
    first = figures.read_block(readme(), "main-job").splitlines()[0]
    return re.search(r"\((.*)\), as `python -m experiments`", first)[1]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("readme")
    return figures.fresh_run(0, directory, progress=False), directory


def first_difference(a: str, b: str) -> str:
    """``""`` if the texts are equal, else their first differing line, numbered (short)."""
    if a == b:
        return ""
    lines_a, lines_b = a.splitlines(), b.splitlines()
    for number, (x, y) in enumerate(zip(lines_a, lines_b, strict=False), 1):
        if x != y:
            return f"line {number}: docs/experiments.md {x[:300]!r}, this run {y[:300]!r}"
    return f"docs/experiments.md has {len(lines_a)} lines, this run {len(lines_b)}"


def differences(written: str, generated: str, tolerance: float) -> str:
    """``""`` if two main-job blocks of different machines agree, else what differs: the text
    before the accepted budgets the same with numbers masked and each number within
    ``tolerance`` (percentages as fractions); the accepted budgets' table the same rows (N and
    policy), its cells being choices a test image can move by a grid step."""
    a, b = figures.measured_part(written), figures.measured_part(generated)
    structure = first_difference(figures.NUMBER.sub("#", a), figures.NUMBER.sub("#", b))
    if structure:
        return f"the text differs at {structure}"
    far = [(x, y) for x, y in zip(figures.numbers_of(a), figures.numbers_of(b), strict=True)
           if abs(x - y) > tolerance + 1e-9]
    if far:
        return f"numbers further apart than {tolerance:.4f}: {far[:5]}"

    def accepted_rows(block: str) -> list[tuple[str, ...]]:
        table = block.split(figures.ACCEPTED, 1)[1]
        rows = [line.strip("|").split("|") for line in table.splitlines()
                if re.match(r"\| \d+ \|", line)]
        return [(row[0].strip(), row[2].strip()) for row in rows]

    if accepted_rows(written) != accepted_rows(generated):
        return f"accepted budgets' rows {accepted_rows(written)} against {accepted_rows(generated)}"
    return ""


def check_block(run: dict, tolerance: float) -> None:
    written = figures.read_block(readme(), "main-job")
    if run["machine"] == written_machine():
        problem = first_difference(written, run["block"])
    else:  # the first line names the machine
        problem = differences(written, run["block"], tolerance)
    assert not problem, f"docs/experiments.md's main-job block {REGENERATE} {problem}"


def test_the_first_block_names_what_decides_the_numbers():
    name = written_machine()
    assert re.search(r", XLA for [A-Z0-9_]+, \d+ cores, jax \S+, jaxlib \S+ \(\w+\)", name), name
    assert re.search(r"family \d+ model \d+", name) or not name.startswith("x86_64"), name


def test_the_readme_block_is_what_seed_0_of_the_default_preset_gives(fresh):
    run, _ = fresh
    check_block(run, figures.tolerance(readme()))


def test_the_other_machine_branch_under_an_older_instruction_set(tmp_path):
    """Seed 0 with XLA compiling for another instruction set than the block's machine: a
    different machine, checked within the tolerance (on every host, so the branch is run)."""
    written = written_machine()
    here = machine_lib.isa()
    names = [name for name, _ in machine_lib.ISAS]
    if here not in names:
        pytest.skip(f"XLA compiles for no x86 instruction set here ({here}): nothing to cap")
    candidates = [isa for isa in figures.SPREAD_ISAS
                  if f"XLA for {isa}," not in written
                  and names.index(isa) <= names.index(here)]
    assert candidates, (written, here)
    run = figures.fresh_run(0, tmp_path, progress=False, isa=candidates[0])
    assert f"XLA for {candidates[0]}," in run["machine"] and run["machine"] != written
    check_block(run, figures.tolerance(readme()))


def test_the_seed_table_starts_with_this_run_and_its_words_fit_its_numbers(fresh):
    run, _ = fresh
    text = figures.read_block(readme(), "main-job-seeds")
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 2
    cells = [float(c) for c in rows[0].strip("|").split("|")[1:5]]
    expected = [run["headline"][k] for k in ("dense", "truncated", "LRP", "LRPET")]
    if run["machine"] == written_machine():
        assert [f"{c:.4f}" for c in cells] == [f"{e:.4f}" for e in expected], REGENERATE
    else:
        tolerance = figures.tolerance(readme())
        assert all(abs(c - e) <= tolerance + 1e-9 for c, e in zip(cells, expected, strict=True)), (
            cells, expected, tolerance)
    # The sentences are those the renderer writes for the table's own numbers.
    table = [[float(c) for c in row.strip("|").split("|")] for row in rows]
    lrpet_minus_lrp = [row[5] for row in table]
    test_images = int(re.search(r"(\d+) test images", text)[1])
    words = figures._order(lrpet_minus_lrp, "LRPET", "LRP", 1 / test_images)
    assert words in text
    counts = re.search(r"LRPET against LRP, in test images per seed: ([-+\d, ]+);", text)[1]
    assert [int(c) for c in counts.split(",")] == [round(d * test_images)
                                                   for d in lrpet_minus_lrp]


def test_the_tolerance_is_the_largest_change_the_spread_table_shows():
    """The spread table's seed rows are the seed table's, each row's largest change is at least
    its headline accuracies' change from seed 0 (the rest of the first block may move more), and
    the stated tolerance is the largest of them."""
    text = readme()
    seed_rows = [[float(c) for c in line.strip("|").split("|")] for line in
                 figures.read_block(text, "main-job-seeds").splitlines()
                 if re.match(r"\| \d+ \|", line)]
    spread = figures.read_block(text, "main-job-spread")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in spread.splitlines()
            if line.startswith("| seed ")]
    assert rows[0][0].startswith("seed 0, ") and float(rows[0][-1]) == 0
    accuracies = {row[0]: [float(c) for c in row[1:7]] for row in rows}
    reference = accuracies[rows[0][0]]
    for seed, row in enumerate(seed_rows):
        name = rows[0][0] if seed == 0 else f"seed {seed}"
        assert accuracies[name] == row[1:5] + row[6:8]
    for row in rows:
        moved = max(abs(a - b) for a, b in zip(accuracies[row[0]], reference, strict=True))
        assert float(row[-1]) >= moved - 1e-4, row
    largest = max(float(row[-1]) for row in rows)
    assert figures.tolerance(text) == largest
    stated = float(re.search(r"each number within (\d\.\d+)", spread)[1])
    assert stated == largest


def test_the_figure_is_what_seed_0_writes(fresh):
    run, directory = fresh
    figure = (ROOT / "docs" / "accuracy_drop.png").read_bytes()
    written = (directory / "accuracy_drop.png").read_bytes()
    if run["machine"] == written_machine():
        digests = [hashlib.sha256(b).hexdigest()[:16] for b in (figure, written)]
        assert digests[0] == digests[1], f"docs/accuracy_drop.png {REGENERATE} sha256 {digests}"
    else:  # a PNG of the same size (IHDR: width and height after the 16-byte header)
        assert figure[:8] == b"\x89PNG\r\n\x1a\n", "docs/accuracy_drop.png is not a PNG"
        assert figure[16:24] == written[16:24], f"docs/accuracy_drop.png {REGENERATE}"
