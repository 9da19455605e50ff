"""Every figure of the README and docs/reproducing.md, regenerated from the current code.

``python -m experiments.figures`` runs, from scratch in a temporary directory:

* the main job's ``default`` preset (what ``python -m experiments`` runs) for seeds 0, 1 and 2,
  and writes the README's block between ``<!-- main-job:begin -->`` and ``<!-- main-job:end -->``
  (seed 0's LRPET table, its LoRITa truncation sweep, which is the data of the figure, its
  accepted budgets, and the machine that computed them), the block ``main-job-seeds`` (the
  headline numbers of every seed, and what they say, worded from the numbers: which method leads,
  and whether it does in every seed) and ``docs/accuracy_drop.png`` (seed 0's figure);
* the ``default`` preset of every paper module (``lorita_fcn``, ``lorita_vit``, ``lorita_cnn``,
  ``lrpet_cifar``, ``rank_search``), and writes docs/reproducing.md's block ``default-presets``
  (time and findings of each, in words computed from its results) and
  ``docs/lorita_fcn_default.png``.

* with ``--part evidence``: :mod:`experiments.evidence`'s ``default`` preset (real MNIST, 5 seeds),
  and writes the README's block ``evidence`` (summaries, verdicts, worded from them, and the
  figures ``docs/evidence_*.png``) and docs/reproducing.md's block ``evidence-runs`` (the tuning
  and per-seed tables).

No number in these blocks is typed by hand. ``tests/test_readme.py`` runs seed 0 of the main job
again and checks the README against it. Options: ``--part readme|docs|evidence|all`` (default
all; on a 2-core CPU the README part takes about 2 minutes, the docs part about 10, the evidence
part about 25), ``--seeds N`` (default 3), ``--output-dir DIR`` (keep the runs there instead of
a temporary directory; runs found there are reused, so a directory holding runs of older code
gives their numbers), ``--check`` (compare only, exit status 1 on a difference),
``--no-progress``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import evidence
from experiments import main as main_job
from experiments.results import Column, Results, markdown_table

__all__ = [
    "COMPARE_BUDGET",
    "MODULES",
    "POLICY_BUDGET",
    "block",
    "evidence_blocks",
    "fcn_figure_name",
    "findings",
    "headline",
    "machine",
    "presets_block",
    "read_block",
    "replace_block",
    "run",
    "run_modules",
    "seeds_block",
]

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REPRODUCING = ROOT / "docs" / "reproducing.md"
FIGURE = ROOT / "docs" / "accuracy_drop.png"
FCN_FIGURE = ROOT / "docs" / "lorita_fcn_default.png"
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


def machine() -> str:
    """The platform the numbers were computed on: architecture, CPU model, cores, jax version
    and backend (numbers computed elsewhere may differ in their last digits), matplotlib version
    (for the figure's bytes)."""
    import jax

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import matplotlib

    return (f"{platform.machine()} {cpu}".strip() + f", {os.cpu_count()} cores, jax "
            f"{jax.__version__} ({jax.default_backend()}), matplotlib {matplotlib.__version__}")


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
    """The README's first block from one run of the main job (``main.run``'s return)."""
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
        "![Test accuracy drop against retained singular values](docs/accuracy_drop.png)",
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
    """The README's second block: every seed's headline numbers and what they say."""
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
        f"The same job for {seeds} (each run {min(seconds):.0f}-{max(seconds):.0f} s here; "
        f"{test_images} test images, so one image is {100 * image:.2f} points):",
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


def run(seeds: int, output: Path, progress: bool
        ) -> tuple[str, str, list[dict[str, Any]], list[float], dict[str, int]]:
    """Runs the main job's default preset for seeds ``0 .. seeds - 1`` under ``output/seed{k}``;
    returns the README's two blocks, each seed's headline numbers and seconds, and the split
    sizes."""
    base = main_job.PRESETS["default"]
    numbers, seconds, first = [], [], None
    for seed in range(seeds):
        config = dataclasses.replace(base, seed=seed)
        out = main_job.run(config, Results(output / f"seed{seed}"), progress)
        numbers.append(headline(out))
        seconds.append(out["seconds"])
        if first is None:
            first = block(out, config, machine())
    return first, seeds_block(numbers, seconds, out["examples"]["test"],
                              sorted(base.depths)), numbers, seconds, out["examples"]


# ------------------------------------------------------------------------------------------------
# docs/reproducing.md: the default preset of every paper module.


def _range(values: Sequence[float], spec: str = ".3f") -> str:
    low, high = min(values), max(values)
    return format(low, spec) if low == high else f"{format(low, spec)} to {format(high, spec)}"


def findings(name: str, config: Any, out: Mapping[str, Any]) -> str:
    """What the default preset of module ``name`` shows, in words computed from its results
    (``run``'s return value and its config)."""
    if name == "lorita_fcn":
        model = f"FCN-{config.fcn_depths[-1]}"
        low, high = min(config.depths), max(config.depths)
        budget = POLICY_BUDGET if POLICY_BUDGET in config.budgets else min(config.budgets)

        def test(depth: int) -> float:
            (row,) = [r for r in out["truncation"] if r["model"] == model and r["N"] == depth
                      and r["policy"] == "GSVT" and r["budget"] == budget]
            return row["test"]

        def accepted(depth: int) -> str:
            (row,) = [r for r in out["accepted"] if r["model"] == model and r["N"] == depth
                      and r["policy"] == "GSVT"]
            return f"{row['retained']:.1%}" if "retained" in row else "none"

        return (f"{', '.join(f'FCN-{d}' for d in config.fcn_depths)}, N = "
                f"{' and '.join(map(str, config.depths))}: {model} trained with N = {high} keeps "
                f"{test(high):.3f} test accuracy at GSVT {budget:.0%} against {test(low):.3f} "
                f"with N = {low} (figure below); the GSVT budget accepted on validation is "
                f"{accepted(high)} of the singular values for N = {high} against "
                f"{accepted(low)} for N = {low}")
    if name == "lorita_vit":
        chosen = [r for r in out["training"] if r["chosen"]]
        low, high = min(config.depths), max(config.depths)
        by_model: dict[str, dict[int, float]] = {}
        for r in chosen:
            by_model.setdefault(r["model"], {})[r["N"]] = r["test"]
        below = sum(tests[high] < tests[low] for tests in by_model.values())
        return (f"{len(by_model)} small ViTs ({', '.join(by_model)}), N = "
                f"{' and '.join(map(str, config.depths))}, {config.epochs} epochs: chosen "
                f"models' test accuracy {_range([r['test'] for r in chosen])}; N = {high} below "
                f"N = {low} for {below} of {len(by_model)}")
    if name == "lorita_cnn":
        target = min(config.flop_drops)
        parts = [f"{r['model']} keeps {r['tuned']:.3f} ({r['dense']:.3f} dense, "
                 f"{r['macs_drop']:.1%} fewer MACs)" for r in out["compressed"]
                 if r["target"] == target]
        table2 = [r for r in out["training"] if r["chosen"] and r["model"] in config.models]
        return (f"{', '.join(config.models)}, N = {' and '.join(map(str, config.depths))}: "
                f"chosen models' test accuracy {_range([r['test'] for r in table2])}; "
                f"Tables 3 and 4 at a {target:.0%} MAC target (ranks from "
                f"`jaxlr.target_ranks`), after one fine-tuning batch: {'; '.join(parts)}")
    if name == "lrpet_cifar":
        rows = [r for r in out["main"] if r["method"] == "LRPET"]
        best = max(rows, key=lambda r: (r["change"], r["macs_pr"]))
        where = (f"at p = {best['ratio']:g}" if isinstance(best["ratio"], float)
                 else "at the searched ranks")
        start = " from the baseline" if best["pt"] == "Y" else ""
        parts = [f"{len(rows)} LRPET runs (from scratch and from the baseline) change the "
                 f"baseline's test accuracy by {_range([r['change'] for r in rows], '+.3f')}; "
                 f"the best, {best['model']} {where}{start}, by {best['change']:+.3f} at "
                 f"{best['macs_pr']:.1%} fewer MACs"]
        if out["ablation"]:
            parts.append("ablation (test accuracy): " + ", ".join(
                f"{r['method']} {r['accuracy']:.3f}" for r in out["ablation"]))
        if out["timing"]:
            parts.append("time per epoch against SGD: " + ", ".join(
                f"{r['method']} {r['ratio']:.2f}x" for r in out["timing"][1:]))
        return "; ".join(parts)
    if name == "rank_search":
        trials = out["trials"]
        random = [t for t in trials if t["kind"] == "random"]
        searched = [t for t in trials if t["kind"] != "random"]
        best = min(trials, key=lambda t: t["score"])
        text = (f"{config.model}, {len(trials)} trials ({len(random)} random): the best score is "
                f"{best['score']:.3f} ({best['validation_error']:.1%} validation error at "
                f"{best['macs_ratio']:.1%} of the MACs, a {best['kind']} trial)")
        if searched:
            text += (f"; the Gaussian process's best {min(t['score'] for t in searched):.3f} "
                     f"against {min(t['score'] for t in random):.3f} for the best random trial")
        return text
    raise ValueError(f"name must be one of {MODULES}, got {name!r}.")


def run_modules(output: Path, progress: bool,
                names: Sequence[str] = MODULES) -> dict[str, tuple[float, str]]:
    """Runs the default preset of each paper module under ``output/{name}``; returns
    ``{name: (seconds, findings)}``."""
    import importlib
    import time

    done = {}
    for name in names:
        module = importlib.import_module(f"experiments.{name}")
        config = module.PRESETS["default"]
        began = time.perf_counter()
        out = module.run(config, Results(output / name), progress)
        done[name] = (time.perf_counter() - began, findings(name, config, out))
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
             "shows": "the README's figures (LoRITa N = 1 / 3 and LRPET against LRP)"}]
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
        "within what a change of seed moves (the README's seed table).",
        "",
        "![LoRITa on digits: the deepest FCN of lorita_fcn's default preset]"
        "(lorita_fcn_default.png)",
    ])


# ------------------------------------------------------------------------------------------------
# The evidence (experiments.evidence's default preset).


def _worded(verdicts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per claim, where it held, did not hold and was not separable."""
    lines = []
    for what in dict.fromkeys(r["what"] for r in verdicts):
        parts = []
        for verdict in ("holds", "does not hold", "not separable"):
            where = [r["where"] for r in verdicts if r["what"] == what and r["verdict"] == verdict]
            if where:
                parts.append(f"**{verdict}** for {', '.join(where)}")
        lines.append(f"* {what}: {'; '.join(parts)}.")
    return lines


def _pivot(rows: Sequence[Mapping[str, Any]], ratios: Sequence[float],
           confidence: float) -> tuple[list[dict[str, Any]], list[Column]]:
    from experiments import stats

    methods = list(dict.fromkeys(r["method"] for r in rows if r["ratio"] is not None))
    dense = stats.summarize([r["test"] for r in rows if r["ratio"] is None], confidence)
    table = []
    for ratio in ratios:
        row: dict[str, Any] = {"p": f"{ratio:g}", "dense": f"{dense.mean:.4f} ± {dense.std:.4f}"}
        for method in methods:
            s = stats.summarize([r["test"] for r in rows
                                 if r["ratio"] == ratio and r["method"] == method], confidence)
            row[method] = f"{s.mean:.4f} ± {s.std:.4f}"
        row["ranks"] = next(r["ranks"] for r in rows if r["ratio"] == ratio)
        table.append(row)
    return table, [Column("p"), Column("ranks", "conv ranks"),
                   Column("dense", "dense (no projection)"), *[Column(m) for m in methods]]


def evidence_blocks(out: Mapping[str, Any], config: evidence.Config, where: str
                    ) -> tuple[str, str]:
    """The README's ``evidence`` block and docs/reproducing.md's ``evidence-runs`` block from a
    run of :func:`experiments.evidence.run`."""

    verdict_columns = [c for c in evidence.VERDICT_COLUMNS if c.key not in ("rule",)]
    summary = evidence.summaries(out["lorita"], ("model", "N"), ("test", "budget", "drop",
                                                                  "energy"), config.confidence)
    lrpet_table, lrpet_columns = _pivot(out["lrpet"], config.ratios, config.confidence)
    command = "python -m experiments.evidence"
    readme = "\n".join([
        f"`{command}` on {where}, {out['seconds'] / 60:.0f} minutes; {out['where']}. Each "
        f"number is the mean ± standard deviation over the seeds, with the "
        f"{config.confidence:.0%} Student-t interval in brackets.",
        "",
        f"**LoRITa** (FCNs of width {config.width}, {config.lorita_epochs} epochs of Adam, the "
        f"learning rate and decay chosen per N{'' if config.tune_on else ' and FCN'} on the "
        f"first seed's validation split{f' with FCN-{config.tune_on}' if config.tune_on else ''}"
        f"; GSVT over the hidden matrices). "
        f"Budget: the fewest retained singular values from which on the test accuracy stays "
        f"within {100 * config.tolerance:g} points of the untruncated model's; drop: the test "
        f"accuracy drop averaged over {len(config.budgets)} GSVT budgets from "
        f"{max(config.budgets):.0%} to {min(config.budgets):.0%}; energy: the fraction of "
        f"singular values holding 90% of a hidden matrix's energy.",
        "",
        markdown_table(summary, [Column("model"), Column("N"), Column("test", "test acc"),
                                 Column("budget", "GSVT budget"),
                                 Column("drop", "mean GSVT drop"),
                                 Column("energy", "SVs for 90% energy")]),
        "",
        f"**LRPET** ablation ({config.model}, {config.lrpet_epochs} epochs of SGD, projection "
        f"once per epoch; test accuracy of the compressed model running its factor pairs):",
        "",
        markdown_table(lrpet_table, lrpet_columns),
        "",
        "Verdicts, each from the paired differences over seeds (first minus second): a claim "
        "**holds** when the interval of the mean difference lies on its side of 0 (inside "
        f"±{config.margin:g} for \"as accurate\"), **does not hold** when it lies on the "
        "other, and is **not separable** when it contains 0:",
        "",
        markdown_table(list(out["lorita_verdicts"]) + list(out["lrpet_verdicts"]),
                       verdict_columns),
        "",
        "In words:",
        "",
        *_worded(out["lorita_verdicts"]),
        *_worded(out["lrpet_verdicts"]),
        "",
        "![LoRITa: test accuracy drop against retained singular values, with 95% bands]"
        "(docs/evidence_accuracy_drop.png)",
        "",
        "![LoRITa: singular values of the first two hidden matrices, with 95% bands]"
        "(docs/evidence_spectra.png)",
        "",
        "![LRPET ablation: test accuracy per seed with 95% intervals](docs/evidence_lrpet.png)",
    ])
    docs = "\n".join([
        f"`{command}` on {where}; {out['where']}.",
        "",
        f"Learning rate and decay, chosen per N{'' if config.tune_on else ' and FCN'} on the "
        f"first seed's validation split{f' with FCN-{config.tune_on}' if config.tune_on else ''}"
        " (every seed and FCN trains with the choice):",
        "",
        markdown_table(out["lorita_tuning"], [
            Column("model"), Column("N"), Column("learning_rate", "learning rate", "g"),
            Column("weight_decay", "decay", "g"), Column("best_epoch", "best epoch"),
            Column("validation", "val acc", ".4f"), Column("chosen")]),
        "",
        "LoRITa per seed:",
        "",
        markdown_table(out["lorita"], [
            Column("model"), Column("N"), Column("seed"), Column("test", "test acc", ".4f"),
            Column("budget", "GSVT budget (test)", ".3f"),
            Column("budget_validation", "GSVT budget (val)", ".3f"),
            Column("lsvt_budget", "LSVT budget (test)", ".3f"),
            Column("drop", "mean GSVT drop", ".4f"),
            Column("energy", "SVs for 90% energy", ".3f")]),
        "",
        "LRPET per seed (test accuracy):",
        "",
        markdown_table(out["lrpet"], [
            Column("seed"), Column("ratio", "p", "g"), Column("method"), Column("ranks"),
            Column("validation", "val acc", ".4f"), Column("test", "test acc", ".4f")]),
    ])
    return readme, docs


def run_evidence(output: Path, progress: bool) -> tuple[str, str]:
    """Runs the evidence module's default preset under ``output``; returns its two blocks."""
    config = evidence.PRESETS["default"]
    out = evidence.run(config, Results(output), progress)
    return evidence_blocks(out, config, machine())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.figures",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["readme", "docs", "evidence", "all"], default="all",
                        help="which figures (default: all)")
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
            first, seeds, _, seconds, examples = run(args.seeds if args.part != "docs" else 1,
                                                     output / "main", progress)
        if args.part in ("readme", "all"):
            updates[README] = replace_block(replace_block(README.read_text(), "main-job", first),
                                            "main-job-seeds", seeds)
            figures[FIGURE] = output / "main" / "seed0" / "accuracy_drop.png"
        if args.part in ("docs", "all"):
            done = run_modules(output, progress)
            updates[REPRODUCING] = replace_block(REPRODUCING.read_text(), "default-presets",
                                                 presets_block(done, seconds[0], machine(),
                                                               examples))
            figures[FCN_FIGURE] = output / "lorita_fcn" / fcn_figure_name()
        if args.part in ("evidence", "all"):
            readme_block, docs_block = run_evidence(output / "evidence", progress)
            updates[README] = replace_block(updates.get(README, README.read_text()), "evidence",
                                            readme_block)
            updates[REPRODUCING] = replace_block(updates.get(REPRODUCING,
                                                             REPRODUCING.read_text()),
                                                 "evidence-runs", docs_block)
            for name, path in EVIDENCE_FIGURES.items():
                figures[path] = output / "evidence" / name
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
