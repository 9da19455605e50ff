"""The steps every LoRITa experiment takes: train with N factors per kernel (decay chosen on the
validation split), then truncate the chosen models' singular values by LSVT and GSVT.

Used by :mod:`experiments.main`, :mod:`experiments.lorita_fcn`, :mod:`experiments.lorita_vit` and
:mod:`experiments.lorita_cnn`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np
import optax

import jaxlr
from experiments import data as data_lib
from experiments import plots, truncation
from experiments.results import Column, Results
from experiments.train import TrainConfig, evaluate, lorita_task, train

__all__ = [
    "TRAINING_COLUMNS",
    "TRUNCATION_COLUMNS",
    "by_depth_columns",
    "by_depth_rows",
    "choose",
    "preset_note",
    "run_models",
    "slug",
    "study_truncation",
    "train_depths",
    "write_tables",
]

TRAINING_COLUMNS = [
    Column("model"), Column("N"), Column("weight_decay", "weight decay", "g"),
    Column("best_epoch", "best epoch"), Column("validation", "val acc", ".4f"),
    Column("test", "test acc", ".4f"), Column("chosen")]

TRUNCATION_COLUMNS = [
    Column("model"), Column("N"), Column("policy"), Column("budget", "budget", ".0%"),
    Column("retained", "retained SVs", ".1%"), Column("params_fraction", "params kept", ".1%"),
    Column("validation", "val acc", ".4f"), Column("test", "test acc", ".4f")]


def slug(name: str) -> str:
    """``name`` made safe for a file name (model names may hold ``:``, ``=`` and ``/``)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_")


def choose(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the highest validation accuracy; ties go to the larger weight decay (the
    more compressible model)."""
    return max(runs, key=lambda r: (r["validation"], r["weight_decay"]))


def train_depths(
    name: str,
    model: nn.Module,
    data: data_lib.Dataset,
    *,
    depths: Sequence[int],
    weight_decays: Sequence[float],
    optimizer: Callable[[float], optax.GradientTransformation],
    config: TrainConfig,
    results: Results,
    settings: Mapping[str, Any],
    label_smoothing: float = 0.0,
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """Trains ``model`` for every N in ``depths`` and decay in ``weight_decays``.

    Args:
      name: the model's name in tables and run directories.
      model: the Linen model.
      data: the data set.
      depths: LoRITa's N values.
      weight_decays: coupled L2 decays tried per N.
      optimizer: ``weight decay -> optax optimizer`` (e.g. ``lorita.coupled_adam``).
      config: the training settings.
      results: runs go to ``results/runs/{name}_N{N}_wd{decay}-{fingerprint}``
        (:meth:`~experiments.results.Results.run_dir`).
      settings: what every run's result depends on besides its N and decay, e.g. the
        optimizer's learning rate (:func:`~experiments.results.run_settings`); with the
        model's name, N and decay they fingerprint the run.
      label_smoothing: of the loss.

    Returns:
      ``(rows, chosen)``: one row per run (``model, N, weight_decay, best_epoch, validation, test,
      chosen``, and ``variables``, ``history``), and per N the chosen row.
    """
    rows, chosen = [], {}
    for depth in depths:
        runs = []
        for decay in weight_decays:
            label = f"{slug(name)}_N{depth}_wd{decay:g}"
            task = lorita_task(model, optimizer(decay), depth, label_smoothing)
            run = {**settings, "model": name, "N": depth, "weight_decay": decay,
                   "label_smoothing": label_smoothing}
            result = train(task, data, config, workdir=results.run_dir(label, run), label=label,
                           settings=run)
            runs.append({"model": name, "N": depth, "weight_decay": decay,
                         "best_epoch": result.best_epoch, "validation": result.best_accuracy,
                         "test": evaluate(model, result.best, data, "test")["accuracy"],
                         "variables": result.best, "history": result.history})
        chosen[depth] = choose(runs)
        rows += [{**r, "chosen": "yes" if r is chosen[depth] else ""} for r in runs]
    return rows, chosen


def study_truncation(
    name: str,
    model: nn.Module,
    chosen: dict[int, dict[str, Any]],
    data: data_lib.Dataset,
    *,
    budgets: Sequence[float],
    filter: jaxlr.matrices.Filter,  # noqa: A002
    pools: jaxlr.policies.Pools = None,
    normalize: str = "none",
    tolerance: float = 0.01,
) -> dict[str, Any]:
    """LSVT and GSVT sweeps of each chosen model, their accepted budgets and what to plot.

    Returns:
      ``{"rows", "accepted", "curves", "styles", "spectra"}``: sweep rows and accepted rows (with
      ``model`` and ``N``), ``(retained, test accuracy drop)`` curves and their styles for
      :func:`experiments.plots.accuracy_drop`, and per N the spectra of the truncated matrices.
    """
    rows, accepted, curves, styles, spectra = [], [], {}, {}, {}
    for index, (depth, run) in enumerate(chosen.items()):
        sweep = truncation.sweep(model, run["variables"], data, budgets, filter=filter,
                                 pools=pools, normalize=normalize)
        rows += [{"model": name, "N": depth, **r} for r in sweep]
        reference = sweep[0]
        kept = truncation.accept(sweep, tolerance)
        for policy in truncation.POLICIES:  # "-" where no budget is within the tolerance
            accepted.append({"model": name, "N": depth, "weight_decay": run["weight_decay"],
                             **kept.get(policy, {}), "policy": policy})
            label = f"N = {depth}, {policy}"
            curves[label] = [(r["retained"], reference["test"] - r["test"])
                             for r in sweep if r["policy"] in (policy, "none")]
            styles[label] = {"color": f"C{index}", "linestyle": "--" if policy == "LSVT" else "-",
                             "marker": "s" if policy == "LSVT" else "o"}
        spectra[f"N = {depth} (weight decay {run['weight_decay']:g})"] = {
            path: np.asarray(values) for path, values in
            jaxlr.svd.singular_values(run["variables"]["params"], filter=filter).items()}
    return {"rows": rows, "accepted": accepted, "curves": curves, "styles": styles,
            "spectra": spectra}


def run_models(
    entries: Sequence[tuple[str, nn.Module, data_lib.Augmentation | None]],
    data: data_lib.Dataset,
    results: Results,
    *,
    depths: Sequence[int],
    weight_decays: Sequence[float],
    optimizer: Callable[[float], optax.GradientTransformation],
    config: TrainConfig,
    settings: Mapping[str, Any],
    budgets: Sequence[float],
    filter: jaxlr.matrices.Filter,  # noqa: A002
    pools: jaxlr.policies.Pools = None,
    normalize: str = "none",
    tolerance: float = 0.01,
    label_smoothing: float = 0.0,
    first_layers: int = 2,
) -> dict[str, list[dict[str, Any]]]:
    """:func:`train_depths` and :func:`study_truncation` for each ``(name, model, augmentation)``,
    with its figures: ``accuracy_drop_{name}.png`` and ``singular_values_{name}.png`` (the first
    ``first_layers`` truncated matrices per N). ``settings`` are those of :func:`train_depths`
    (the entry's augmentation is added to them).

    Returns:
      ``{"training", "truncation", "accepted"}`` rows of every model.
    """
    out: dict[str, list[dict[str, Any]]] = {"training": [], "truncation": [], "accepted": []}
    for name, model, augmentation in entries:
        rows, chosen = train_depths(
            name, model, data, depths=depths, weight_decays=weight_decays, optimizer=optimizer,
            config=dataclasses.replace(config, augmentation=augmentation), results=results,
            settings={**settings, "augmentation": augmentation}, label_smoothing=label_smoothing)
        study = study_truncation(name, model, chosen, data, budgets=budgets, filter=filter,
                                 pools=pools, normalize=normalize, tolerance=tolerance)
        out["training"] += rows
        out["truncation"] += study["rows"]
        out["accepted"] += study["accepted"]
        plots.accuracy_drop(study["curves"], results.file(f"accuracy_drop_{slug(name)}.png"),
                            title=f"{name} on {data.name}: accuracy drop against retained SVs",
                            styles=study["styles"])
        first = {run: dict(list(layers.items())[:first_layers])
                 for run, layers in study["spectra"].items()}
        plots.singular_value_decay(first, results.file(f"singular_values_{slug(name)}.png"),
                                   title=f"{name}: singular values (divided by the largest)")
    return out


def by_depth_rows(training: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The papers' accuracy tables: one row per model, the chosen run's test accuracy and decay
    per N (keys ``N = n`` and ``decay N = n``)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in training:
        if r["chosen"]:
            row = rows.setdefault(r["model"], {"model": r["model"]})
            row[f"N = {r['N']}"] = r["test"]
            row[f"decay N = {r['N']}"] = r["weight_decay"]
    return list(rows.values())


def by_depth_columns(depths: Sequence[int]) -> list[Column]:
    """Columns of :func:`by_depth_rows`: model, test accuracy per N, the chosen decays."""
    return ([Column("model")] + [Column(f"N = {n}", format=".4f") for n in depths]
            + [Column(f"decay N = {n}", format="g") for n in depths])


def write_tables(
    results: Results,
    out: dict[str, list[dict[str, Any]]],
    note: str,
    tolerance: float,
) -> dict[str, str]:
    """The ``training``, ``truncation`` and ``accepted`` tables, each captioned with ``note``."""
    accepted_columns = TRUNCATION_COLUMNS[:3] + TRUNCATION_COLUMNS[4:]
    return {
        "training": results.table("training", out["training"], TRAINING_COLUMNS,
                                  f"Every training run; per model and N the best validation "
                                  f"accuracy is chosen.{note}"),
        "truncation": results.table("truncation", out["truncation"], TRUNCATION_COLUMNS,
                                    f"LSVT and GSVT truncation.{note}"),
        "accepted": results.table("accepted", out["accepted"], accepted_columns,
                                  f"Fewest retained singular values within {tolerance:.0%} of "
                                  f"the untruncated validation accuracy.{note}"),
    }


def preset_note(data: data_lib.Dataset, paper_data: Sequence[str]) -> str:
    """A caption's warning when a run is not on the paper's data."""
    if data.name in paper_data:
        return ""
    return (f" Run on {data.name}, not the paper's data ({', '.join(paper_data)}): these numbers "
            "describe this code, not the paper's results.")
