"""Every figure of the guides docs/experiments.md, docs/evidence.md and docs/reproducing.md,
regenerated from the current code.

``python -m experiments.figures`` runs, from scratch in a temporary directory:

* the main job's ``default`` preset (what ``python -m experiments`` runs) for seeds 0, 1 and 2,
  and writes docs/experiments.md's block between ``<!-- main-job:begin -->`` and
  ``<!-- main-job:end -->``
  (seed 0's LRPET table, its LoRITa truncation sweep, which is the data of the figure, its
  accepted budgets, and the machine that computed them), the block ``main-job-seeds`` (the
  headline numbers of every seed, and what they say, worded from the numbers: which method leads,
  and whether it does in every seed), the block ``main-job-spread`` (seeds 1 and 2, and seed 0
  again with XLA compiling for each older instruction set of :data:`SPREAD_ISAS` the processor
  has: how far the numbers move on another machine, and the tolerance ``tests/test_readme.py``
  allows there) and
  ``docs/accuracy_drop.png`` (seed 0's figure). Each run is a new Python process
  (:func:`fresh_run`), so the same machine repeats it bit for bit;
* the ``default`` preset of every paper module (``lorita_fcn``, ``lorita_vit``, ``lorita_cnn``,
  ``lrpet_cifar``, ``rank_search``), and writes docs/reproducing.md's block ``default-presets``
  (time and findings of each, in words computed from its results) and
  ``docs/lorita_fcn_default.png``.

* with ``--part evidence``: :mod:`experiments.evidence`'s ``default`` preset (real MNIST, a
  tuning seed and the verdict seeds of docs/evidence.md's protocol), and writes docs/evidence.md's
  block ``evidence`` (summaries, verdicts with their margins and detectable effects, worded from
  them, the numbers' digest, and the figures ``docs/evidence_*.png``) and docs/reproducing.md's
  block ``evidence-runs`` (the tuning and per-seed tables);
* with ``--part reproducibility``: :mod:`experiments.reproducibility` (one evidence run on this
  machine twice, with XLA capped to AVX2, and on one core, each in a new process), and writes
  docs/evidence.md's block ``evidence-machines``;
* with ``--part data-aware``: :mod:`experiments.data_aware`'s ``default`` preset (plain against
  data-aware truncation on real MNIST), and writes docs/data_aware.md's block ``data-aware``
  (the tables, the comparisons and the time) and ``docs/data_aware.png``.

No number in these blocks is typed by hand. ``tests/test_readme.py`` runs seed 0 of the main job
again and checks docs/experiments.md against it. Options: ``--part
readme|docs|evidence|reproducibility|data-aware|all`` (default all; ``readme`` is the main job's
blocks of docs/experiments.md, ``docs`` the default presets of docs/reproducing.md; on a 2-core CPU
the first takes about 5 minutes, the second about 6, the evidence part under 60 (its block says),
the reproducibility part about 6, the data-aware part under 30), ``--seeds N`` (default 3),
``--output-dir DIR`` (keep the runs there instead of a temporary directory; runs found there are
reused, so a directory holding runs of older code gives their numbers), ``--check`` (compare
only, exit status 1 on a difference), ``--no-progress``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import data_aware, evidence, reproducibility
from experiments import machine as machine_lib
from experiments import main as main_job
from experiments.results import Column, Results, markdown_table

__all__ = [
    "COMPARE_BUDGET",
    "MODULES",
    "POLICY_BUDGET",
    "ACCEPTED",
    "NUMBER",
    "SPREAD_ISAS",
    "accuracy_keys",
    "block",
    "block_change",
    "evidence_blocks",
    "fcn_figure_name",
    "findings",
    "fresh_run",
    "headline",
    "machine",
    "measured_part",
    "numbers_of",
    "presets_block",
    "read_block",
    "replace_block",
    "run",
    "run_modules",
    "seeds_block",
    "spread_block",
    "spread_isas",
    "tolerance",
]

ROOT = Path(__file__).resolve().parents[1]
# The guides that hold the generated blocks: the main job's three, and the evidence.
EXPERIMENTS = ROOT / "docs" / "experiments.md"
EVIDENCE = ROOT / "docs" / "evidence.md"
REPRODUCING = ROOT / "docs" / "reproducing.md"
FIGURE = ROOT / "docs" / "accuracy_drop.png"
FCN_FIGURE = ROOT / "docs" / "lorita_fcn_default.png"
DATA_AWARE = ROOT / "docs" / "data_aware.md"
DATA_AWARE_FIGURE = ROOT / "docs" / "data_aware.png"
# The evidence module's figures, as docs/ holds them.
EVIDENCE_FIGURES = {name: ROOT / "docs" / f"evidence_{name}"
                    for name in ("accuracy_drop.png", "spectra.png", "lrpet.png")}
# The paper modules whose default presets docs/reproducing.md describes, in its order.
MODULES = ("lorita_fcn", "lorita_vit", "lorita_cnn", "lrpet_cifar", "rank_search")
# The GSVT budget at which the main job's N values are compared over seeds (LoRITa's claim is
# about small budgets; the papers' sweeps go this low).
COMPARE_BUDGET = 0.05
# The budget at which GSVT and LSVT are compared, and lorita_fcn's N values.
POLICY_BUDGET = 0.1
# Instruction sets seed 0 of the main job is run again with (those older than this machine's):
# what a change of processor generation moves. AVX-512's extensions (VNNI, BF16, AMX) add no
# float32 arithmetic.
SPREAD_ISAS = ("AVX2", "AVX", "SSE4_2")


def machine() -> str:
    """The machine the numbers are computed on: :func:`experiments.machine.describe`."""
    return machine_lib.describe()


def _sweep_rows(sweeps: Mapping[int, Sequence[Mapping[str, Any]]]) -> tuple[list[dict], list]:
    """The truncation sweep as one row per budget, a ``retained / test`` cell per (N, policy)."""
    depths = sorted(sweeps)
    columns = [Column("budget", "budget")]
    rows: dict[float, dict[str, Any]] = {}
    for depth in depths:
        for policy in ("LSVT", "GSVT"):
            key = f"N = {depth}, {policy}"
            columns.append(Column(key, f"N = {depth} {policy}: kept SVs, test acc"))
            for r in sweeps[depth]:
                if r["policy"] in (policy, "none"):
                    row = rows.setdefault(r["budget"], {"budget": "none" if r["policy"] == "none"
                                                        else f"{r['budget']:.0%}"})
                    row[key] = f"{r['retained']:.1%}, {r['test']:.4f}"
    return [rows[b] for b in sorted(rows, reverse=True)], columns


def block(out: Mapping[str, Any], config: main_job.Config, where: str) -> str:
    """docs/experiments.md's first block (``main-job``) from one run of the main job
    (``main.run``'s return)."""
    lrpet = markdown_table(out["lrpet"]["rows"], [
        Column("method", f"method (CNN, p = {config.prune:g})"), Column("ranks", "conv ranks"),
        Column("params_fraction", "params kept", ".1%"),
        Column("macs_fraction", "MACs kept", ".1%"), Column("validation", "val acc", ".4f"),
        Column("test", "test acc", ".4f")])
    sweep_rows, sweep_columns = _sweep_rows(out["lorita"]["sweeps"])
    accepted = markdown_table(out["lorita"]["accepted"], [
        Column("N"), Column("weight_decay", "decay", "g"), Column("policy"),
        Column("budget", "budget", ".0%"), Column("retained", "kept SVs", ".1%"),
        Column("params_fraction", "params kept", ".1%"), Column("validation", "val acc", ".4f"),
        Column("test", "test acc", ".4f")])
    return "\n".join([
        f"The default preset with seed {config.seed} ({where}), as `python -m experiments` "
        "writes it to `results/default/`:",
        "",
        lrpet,
        "",
        "LoRITa, the FCN's hidden matrices truncated (the decay per N chosen on validation: "
        + ", ".join(f"N = {r['N']}: {r['weight_decay']:g}" for r in out["lorita"]["training"]
                    if r["chosen"]) + "); this is the data of the figure below:",
        "",
        markdown_table(sweep_rows, sweep_columns),
        "",
        f"Accepted per policy: the fewest singular values within {config.tolerance:.0%} of the "
        "untruncated validation accuracy (\"-\": no budget was):",
        "",
        accepted,
        "",
        # docs/experiments.md shows it: the path is relative to docs/.
        "![Test accuracy drop against retained singular values](accuracy_drop.png)",
    ])


def headline(out: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers the seeds are compared on: the CNN's test accuracies (dense, truncated after
    training, LRP, LRPET) and LoRITa's GSVT test accuracy at :data:`COMPARE_BUDGET` and of both
    policies at :data:`POLICY_BUDGET` per N."""
    rows = {r["method"]: r for r in out["lrpet"]["rows"]}
    numbers = {"dense": rows["no projection, dense"]["test"],
               "truncated": rows["no projection, truncated after training"]["test"],
               "LRP": rows["LRP"]["test"], "LRPET": rows["LRPET"]["test"],
               "params": rows["LRPET"]["params_fraction"]}
    for depth, sweep in out["lorita"]["sweeps"].items():
        for policy, budget in (("GSVT", COMPARE_BUDGET), ("GSVT", POLICY_BUDGET),
                               ("LSVT", POLICY_BUDGET)):
            (row,) = [r for r in sweep if r["policy"] == policy and r["budget"] == budget]
            numbers[f"N{depth} {policy} {budget:g}"] = row["test"]
    return numbers


def _images(deltas: Sequence[float], test_images: int) -> str:
    """Accuracy differences as signed counts of test images."""
    return ", ".join(f"{round(d * test_images):+d}" for d in deltas)


def _order(deltas: Sequence[float], ahead: str, behind: str, image: float) -> str:
    """Words for a difference ``ahead - behind`` over seeds, ``image`` one test image."""
    if all(d > image / 2 for d in deltas):
        return f"{ahead} ahead in every seed"
    if all(d < -image / 2 for d in deltas):
        return f"{behind} ahead in every seed"
    return "no consistent order over the seeds"


def seeds_block(numbers: Sequence[Mapping[str, Any]], seconds: Sequence[float],
                test_images: int, depths: Sequence[int]) -> str:
    """docs/experiments.md's second block (``main-job-seeds``): every seed's headline numbers and
    what they say."""
    low, high = min(depths), max(depths)
    compare, policy = f"GSVT {COMPARE_BUDGET:g}", POLICY_BUDGET
    rows = [{"seed": seed, **n, "LRPET - LRP": n["LRPET"] - n["LRP"],
             "N gap": n[f"N{high} {compare}"] - n[f"N{low} {compare}"]}
            for seed, n in enumerate(numbers)]
    table = markdown_table(rows, [
        Column("seed"), Column("dense", "CNN dense", ".4f"),
        Column("truncated", "truncated after", ".4f"), Column("LRP", "LRP", ".4f"),
        Column("LRPET", "LRPET", ".4f"), Column("LRPET - LRP", "LRPET - LRP", "+.4f"),
        Column(f"N{low} {compare}", f"N = {low}, GSVT {COMPARE_BUDGET:.0%}", ".4f"),
        Column(f"N{high} {compare}", f"N = {high}, GSVT {COMPARE_BUDGET:.0%}", ".4f"),
        Column("N gap", f"N = {high} - N = {low}", "+.4f")])
    image = 1 / test_images

    def spread(key: str) -> str:
        values = [n[key] for n in numbers]
        return f"{min(values):.3f}-{max(values):.3f}"

    lrpet_lrp = [r["LRPET - LRP"] for r in rows]
    n_gap = [r["N gap"] for r in rows]
    gsvt_lsvt = [n[f"N{d} GSVT {policy:g}"] - n[f"N{d} LSVT {policy:g}"]
                 for n in numbers for d in depths]
    seeds = f"seeds 0-{len(numbers) - 1}"
    return "\n".join([
        f"The same job for {seeds} on the same machine (each run {min(seconds):.0f}-"
        f"{max(seconds):.0f} s; {test_images} test images, so one image is {100 * image:.2f} "
        "points):",
        "",
        table,
        "",
        f"* Projected during training, the low-rank CNN keeps {spread('LRP')} (LRP) and "
        f"{spread('LRPET')} (LRPET) test accuracy at {numbers[0]['params']:.0%} of the "
        f"parameters, against {spread('dense')} dense; cut to the same ranks after ordinary "
        f"training it keeps {spread('truncated')}.",
        f"* LRPET against LRP, in test images per seed: {_images(lrpet_lrp, test_images)}; "
        f"{_order(lrpet_lrp, 'LRPET', 'LRP', image)}.",
        f"* GSVT against LSVT at {policy:.0%} of the singular values, in test images per seed "
        f"and N: {_images(gsvt_lsvt, test_images)}; {_order(gsvt_lsvt, 'GSVT', 'LSVT', image)}.",
        f"* N = {high} against N = {low} at GSVT {COMPARE_BUDGET:.0%} (the LoRITa paper finds "
        f"that more factors truncate better), in test images per seed: "
        f"{_images(n_gap, test_images)}; {_order(n_gap, f'N = {high}', f'N = {low}', image)}.",
    ])


def accuracy_keys(depths: Sequence[int]) -> tuple[str, ...]:
    """The headline accuracies the seed and spread tables show (:func:`headline`'s keys)."""
    low, high = min(depths), max(depths)
    compare = f"GSVT {COMPARE_BUDGET:g}"
    return ("dense", "truncated", "LRP", "LRPET", f"N{low} {compare}", f"N{high} {compare}")


# The first block's accepted budgets follow this caption: choices on a noisy curve (one test
# image moves one by a grid step, or to "-"), so another machine's are compared by their rows'
# labels only, while every number before it is compared within the tolerance.
ACCEPTED = "Accepted per policy"
# A number, and whether a percent sign follows it (then it is read as a fraction).
NUMBER = re.compile(r"([-+]?\d+(?:\.\d+)?)(%?)")


def measured_part(main_block: str) -> str:
    """The part of a main-job block whose numbers another machine is checked against: after its
    first line (which names the seed and the machine), before the accepted budgets."""
    return main_block.split("\n", 1)[1].split(ACCEPTED, 1)[0]


def numbers_of(text: str) -> list[float]:
    """The numbers of ``text`` in order, percentages as fractions ("19.3%" is 0.193)."""
    return [float(n) / (100 if percent else 1) for n, percent in NUMBER.findall(text)]


def block_change(reference: str, other: str) -> float:
    """The largest change of a number between two main-job blocks' :func:`measured_part`.

    Raises:
      ValueError: if their text differs with the numbers masked (then they do not compare).
    """
    a, b = measured_part(reference), measured_part(other)
    if NUMBER.sub("#", a) != NUMBER.sub("#", b):
        raise ValueError("the two main-job blocks differ in more than their numbers.")
    return max((abs(x - y) for x, y in zip(numbers_of(a), numbers_of(b), strict=True)),
               default=0.0)


def spread_block(seed_runs: Sequence[Mapping[str, Any]],
                 isa_runs: Mapping[str, Mapping[str, Any]], test_images: int,
                 depths: Sequence[int]) -> str:
    """docs/experiments.md's block ``main-job-spread``: how far the first block's numbers move with
    the seed and with the instruction set XLA compiles for, and the tolerance another machine is
    checked with (the largest such change, :func:`tolerance`).

    Args:
      seed_runs: :func:`fresh_run`'s results for seeds 0, 1, ...; seed 0 is the first block's.
      isa_runs: seed 0's with XLA capped to each instruction set (the keys).
      test_images: the test split's size.
      depths: the main job's N values.
    """
    reference = seed_runs[0]
    here = machine_lib.isa()
    rows = [{"run": f"seed 0, {here} (the first block)", **reference["headline"],
             "change": 0.0}]
    rows += [{"run": f"seed {seed}", **run["headline"],
              "change": block_change(reference["block"], run["block"])}
             for seed, run in enumerate(seed_runs) if seed > 0]
    rows += [{"run": f"seed 0, {isa}", **run["headline"],
              "change": block_change(reference["block"], run["block"])}
             for isa, run in isa_runs.items()]
    low, high = min(depths), max(depths)
    names = ["CNN dense", "truncated after", "LRP", "LRPET",
             f"N = {low}, GSVT {COMPARE_BUDGET:.0%}", f"N = {high}, GSVT {COMPARE_BUDGET:.0%}"]
    columns = [Column("run"), *[Column(key, name, ".4f") for key, name
                                in zip(accuracy_keys(depths), names, strict=True)],
               Column("change", "largest change", ".4f")]
    allowed = max(r["change"] for r in rows)
    by_isa = [r["change"] for r in rows if r["run"].startswith("seed 0, ")][1:]
    by_seed = [r["change"] for r in rows if not r["run"].startswith("seed 0")]
    image = 1 / test_images
    isas = (f"with XLA capped to {', '.join(isa_runs)} (`XLA_FLAGS=--xla_cpu_max_isa=NAME`)"
            if isa_runs else f"(XLA compiles for {here} here: no older instruction set of "
            f"{', '.join(SPREAD_ISAS)} to cap it to)")
    lines = [
        f"How far the first block's numbers move: "
        f"{f'seeds 1-{len(seed_runs) - 1}, and ' if len(seed_runs) > 1 else ''}seed 0 on the "
        f"same machine {isas}. \"Largest change\": of any number of the first block's "
        "tables and sentences before its accepted budgets (percentages as fractions), from "
        "seed 0's:",
        "",
        markdown_table(rows, columns),
        "",
    ]
    if by_isa:
        seeds = f"; a seed, by up to {max(by_seed):.4f}" if by_seed else ""
        lines.append(f"* The instruction set moves a number by up to {max(by_isa):.4f}{seeds} "
                     f"(one test image is {image:.4f}). A processor of another "
                     "model, core count or jax version changes the rounding in other ways too "
                     "(XLA and its kernels tune for the processor), which one machine cannot "
                     "show: its numbers may move as far as a seed's.")
    lines += [
        "* The tables and sentences above hold bit for bit on the machine the first block names; "
        "elsewhere their numbers move as in this table, and a sentence about an order of a few "
        "test images can read otherwise.",
        f"* `tests/test_readme.py` checks another machine's seed 0 against the first block: the "
        f"same text with the numbers masked, each number within {allowed:.4f} (the largest "
        f"change above{', from a seed' if allowed in by_seed else ''}), the accepted budgets by "
        "their rows only; on the machine named there, every character.",
    ]
    return "\n".join(lines)


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the markdown table rows of ``text`` whose first cell matches
    ``first_cell`` (a regular expression)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|:-") and not line.startswith("|--"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if re.fullmatch(first_cell, cells[0]):
                rows.append(cells)
    return rows


def tolerance(text: str) -> float:
    """The tolerance :func:`spread_block` states, read again from the spread table of ``text``
    (docs/experiments.md's text): the largest of its "largest change" column."""
    return max(float(row[-1]) for row in _table_rows(read_block(text, "main-job-spread"),
                                                     r"seed \d+.*"))


def _block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(^<!-- {re.escape(name)}:begin[^>]*-->\n)(.*?)(^<!-- "
                      rf"{re.escape(name)}:end -->)", re.S | re.M)


def replace_block(text: str, name: str, content: str) -> str:
    r"""``text`` with what lies between the lines ``<!-- {name}:begin ... -->`` and
    ``<!-- {name}:end -->`` replaced by ``content``.

    Example:
      >>> text = "a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb"
      >>> replace_block(text, "x", "new")
      'a\n<!-- x:begin -->\nnew\n<!-- x:end -->\nb'
      >>> read_block(_, "x")
      'new'

    Raises:
      ValueError: if the markers are missing.
    """
    if not _block_pattern(name).search(text):
        raise ValueError(f"no <!-- {name}:begin --> ... <!-- {name}:end --> block.")
    return _block_pattern(name).sub(lambda m: m[1] + content.rstrip("\n") + "\n" + m[3], text,
                                    count=1)


def read_block(text: str, name: str) -> str:
    """What lies between the markers of ``name`` (see :func:`replace_block`)."""
    match = _block_pattern(name).search(text)
    if match is None:
        raise ValueError(f"no <!-- {name}:begin --> ... <!-- {name}:end --> block.")
    return match[2].rstrip("\n")


# What a fresh run (fresh_run) leaves in its results directory for the process that started it.
FRESH_RUN = "figures_run.json"


def fresh_run(seed: int, output: Path, progress: bool, isa: str | None = None
              ) -> dict[str, Any]:
    """Runs seed ``seed`` of the main job's default preset in a new Python process, under
    ``output``, and returns what docs/experiments.md's blocks need of it.

    A new process computes the same numbers bit for bit on the same machine; a long-lived one
    (a test suite that has run other programs first) may round one reduction differently.

    Args:
      seed: the preset's seed.
      output: the run's results directory (runs found there are reused).
      progress: show the run's progress bars and output (otherwise they are kept, and shown only
        if the run fails).
      isa: cap the instruction set XLA compiles for (``XLA_FLAGS=--xla_cpu_max_isa=ISA``, one of
        :data:`experiments.machine.ISAS`' names); default this machine's.

    Returns:
      ``{"block": the main-job block of this run, "headline": :func:`headline`'s
      numbers, "seconds": the run's time, "examples": the split sizes, "machine":
      :func:`machine` in that process}``.

    Raises:
      RuntimeError: if the run fails (with the end of its output).
    """
    env = dict(os.environ)
    if isa is not None:
        if isa not in [name for name, _ in machine_lib.ISAS]:
            raise ValueError(f"isa must be one of {[n for n, _ in machine_lib.ISAS]}, "
                             f"got {isa!r}.")
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_max_isa={isa}".strip()
    output.mkdir(parents=True, exist_ok=True)
    script = ("import sys; from pathlib import Path; from experiments import figures; "
              "figures._write_fresh_run(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == '1')")
    done = subprocess.run([sys.executable, "-c", script, str(seed), str(output),
                           "1" if progress else "0"], cwd=ROOT, env=env, text=True,
                          capture_output=not progress)
    if done.returncode != 0:
        tail = ((done.stdout or "") + (done.stderr or ""))[-4000:]
        raise RuntimeError(f"seed {seed} of the main job (isa={isa}) failed with exit status "
                           f"{done.returncode}:\n{tail}")
    return json.loads((output / FRESH_RUN).read_text())


def _write_fresh_run(seed: int, output: Path, progress: bool) -> None:
    config = dataclasses.replace(main_job.PRESETS["default"], seed=seed)
    out = main_job.run(config, Results(output), progress)
    (output / FRESH_RUN).write_text(json.dumps({
        "block": block(out, config, machine()), "headline": headline(out),
        "seconds": out["seconds"], "examples": out["examples"], "machine": machine()}))


def spread_isas() -> list[str]:
    """The instruction sets older than this machine's that the spread table measures:
    those of :data:`SPREAD_ISAS` below the one XLA compiles for here."""
    names = [name for name, _ in machine_lib.ISAS]
    here = machine_lib.isa()
    if here not in names:
        return []
    return [isa for isa in SPREAD_ISAS if names.index(isa) < names.index(here)]


def run(seeds: int, output: Path, progress: bool, spread: bool = True
        ) -> tuple[dict[str, str], list[dict[str, Any]], list[float], dict[str, int]]:
    """Runs the main job's default preset for seeds ``0 .. seeds - 1`` under ``output/seed{k}``
    and, with ``spread``, seed 0 once more for each instruction set of :func:`spread_isas` under
    ``output/{isa}``, each in a new process (:func:`fresh_run`).

    Returns:
      docs/experiments.md's blocks (``{"main-job": ..., "main-job-seeds": ...,
      "main-job-spread": ...}``,
      the last only with ``spread``), each seed's headline numbers and seconds, and the split
      sizes.
    """
    runs = [fresh_run(seed, output / f"seed{seed}", progress) for seed in range(seeds)]
    numbers = [r["headline"] for r in runs]
    seconds = [r["seconds"] for r in runs]
    examples = runs[0]["examples"]
    depths = sorted(main_job.PRESETS["default"].depths)
    blocks = {"main-job": runs[0]["block"],
              "main-job-seeds": seeds_block(numbers, seconds, examples["test"], depths)}
    if spread:
        by_isa = {isa: fresh_run(0, output / isa, progress, isa) for isa in spread_isas()}
        blocks["main-job-spread"] = spread_block(runs, by_isa, examples["test"], depths)
    return blocks, numbers, seconds, examples


# ------------------------------------------------------------------------------------------------
# docs/reproducing.md: the default preset of every paper module.


def findings(name: str, config: Any, out: Mapping[str, Any]) -> str:
    """What the default preset of module ``name`` shows, in words computed from its results
    (``run``'s return value and its config): the module's ``summarize(config, out)``."""
    if name not in MODULES:
        raise ValueError(f"name must be one of {MODULES}, got {name!r}.")
    return importlib.import_module(f"experiments.{name}").summarize(config, out)


def run_modules(output: Path, progress: bool,
                names: Sequence[str] = MODULES) -> dict[str, tuple[float, str]]:
    """Runs the default preset of each paper module under ``output/{name}``; returns
    ``{name: (seconds, findings)}`` (the findings: the module's ``summarize``)."""
    import time

    done = {}
    for name in names:
        module = importlib.import_module(f"experiments.{name}")
        config = module.PRESETS["default"]
        began = time.perf_counter()
        out = module.run(config, Results(output / name), progress)
        done[name] = (time.perf_counter() - began, module.summarize(config, out))
    return done


def fcn_figure_name() -> str:
    """The figure of lorita_fcn's default preset that docs/ shows: its deepest FCN's."""
    from experiments import lorita_fcn, lorita_study

    depth = lorita_fcn.PRESETS["default"].fcn_depths[-1]
    return f"accuracy_drop_{lorita_study.slug(f'FCN-{depth}')}.png"


def presets_block(done: Mapping[str, tuple[float, str]], main_seconds: float, where: str,
                  examples: Mapping[str, int]) -> str:
    """docs/reproducing.md's block: per module, its command, time and findings."""
    rows = [{"command": "`python -m experiments` (the main job)", "time": f"{main_seconds:.0f} s",
             "shows": "the main job's figures (LoRITa N = 1 / 3 and LRPET against LRP)"}]
    rows += [{"command": f"`python -m experiments.{name}`", "time": f"{seconds:.0f} s",
              "shows": text} for name, (seconds, text) in done.items()]
    return "\n".join([
        f"Measured on {where}, each module's default preset run from scratch:",
        "",
        markdown_table(rows, [Column("command"), Column("time"),
                              Column("shows", "what it shows here")]),
        "",
        f"One seed each, {examples['validation']} validation and {examples['test']} test images "
        f"(one image is {100 / examples['test']:.2f} points): differences of a point or two are "
        "within what a change of seed moves (the main job's seed table).",
        "",
        "![LoRITa on digits: the deepest FCN of lorita_fcn's default preset]"
        "(lorita_fcn_default.png)",
    ])


# ------------------------------------------------------------------------------------------------
# The evidence (experiments.evidence's default preset).


def evidence_blocks(out: Mapping[str, Any], config: evidence.Config) -> tuple[str, str]:
    """docs/evidence.md's ``evidence`` block and docs/reproducing.md's ``evidence-runs`` block
    from a run of :func:`experiments.evidence.run` (figure paths relative to docs/)."""
    return evidence.summarize(config, out), evidence.runs_block(config, out)


def run_evidence(output: Path, progress: bool) -> tuple[str, str]:
    """Runs the evidence module's default preset under ``output``; returns its two blocks."""
    config = evidence.PRESETS["default"]
    out = evidence.run(config, Results(output), progress)
    return evidence_blocks(out, config)


def run_data_aware(output: Path, progress: bool) -> str:
    """Runs the data-aware module's default preset under ``output``; returns its block."""
    config = data_aware.PRESETS["default"]
    start = time.perf_counter()
    out = data_aware.run(config, Results(output), progress)
    minutes = (time.perf_counter() - start) / 60
    return "\n".join([
        out["report"], "",
        f"`python -m experiments.data_aware` ran in {minutes:.0f} minutes on {machine()}.", "",
        "![Test accuracy against the parameters cut, plain and data-aware GSVT](data_aware.png)",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.figures",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["readme", "docs", "evidence", "reproducibility",
                                           "data-aware", "all"],
                        default="all",
                        help="which figures (default: all; readme: the main job's blocks of "
                             "docs/experiments.md)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--check", action="store_true",
                        help="compare with the files only; exit status 1 on a difference")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    progress = not args.no_progress
    updates: dict[Path, str] = {}
    figures: dict[Path, Path] = {}
    with tempfile.TemporaryDirectory() as scratch:
        output = args.output_dir or Path(scratch)
        if args.part in ("readme", "docs", "all"):
            readme_part = args.part != "docs"
            blocks, _, seconds, examples = run(
                args.seeds if readme_part else 1, output / "main", progress, spread=readme_part)
        if args.part in ("readme", "all"):
            text = EXPERIMENTS.read_text()
            for name, content in blocks.items():
                text = replace_block(text, name, content)
            updates[EXPERIMENTS] = text
            figures[FIGURE] = output / "main" / "seed0" / "accuracy_drop.png"
        if args.part in ("docs", "all"):
            done = run_modules(output, progress)
            updates[REPRODUCING] = replace_block(REPRODUCING.read_text(), "default-presets",
                                                 presets_block(done, seconds[0], machine(),
                                                               examples))
            figures[FCN_FIGURE] = output / "lorita_fcn" / fcn_figure_name()
        if args.part in ("evidence", "all"):
            evidence_block, docs_block = run_evidence(output / "evidence", progress)
            updates[EVIDENCE] = replace_block(EVIDENCE.read_text(), "evidence", evidence_block)
            updates[REPRODUCING] = replace_block(updates.get(REPRODUCING,
                                                             REPRODUCING.read_text()),
                                                 "evidence-runs", docs_block)
            for name, path in EVIDENCE_FIGURES.items():
                figures[path] = output / "evidence" / name
        if args.part in ("reproducibility", "all"):
            machines = reproducibility.run()
            updates[EVIDENCE] = replace_block(updates.get(EVIDENCE, EVIDENCE.read_text()),
                                              "evidence-machines", machines)
        if args.part in ("data-aware", "all"):
            updates[DATA_AWARE] = replace_block(DATA_AWARE.read_text(), "data-aware",
                                                run_data_aware(output / "data_aware", progress))
            figures[DATA_AWARE_FIGURE] = output / "data_aware" / "data_aware.png"
        stale = [path for path, text in updates.items() if path.read_text() != text]
        stale += [path for path, source in figures.items()
                  if not path.exists() or path.read_bytes() != source.read_bytes()]
        if args.check:
            for path in stale:
                sys.stderr.write(f"{path.relative_to(ROOT)} differs from this run; regenerate "
                                 "it with: python -m experiments.figures\n")
            return 1 if stale else 0
        for path, text in updates.items():
            path.write_text(text)
        for path, source in figures.items():
            shutil.copyfile(source, path)
    print("\n\n".join(updates.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
