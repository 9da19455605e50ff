"""LRPET on CIFAR-10: Tables I-VII (main results), XIV (ablation), XIX (gradient norms), XX (time).

Every network is trained by SGD (momentum 0.9, coupled weight decay on every parameter, learning
rate divided by 10 at 50% and 75% of training, crops and flips) with its convolutions projected
once per epoch at the pruning ratio p (rank ``max(1, floor(n - n p))``; the classifier is not
projected), with energy transfer and BN rectification, after the optimizer update. Then the
projected convolutions are held as factor pairs and the compressed model is evaluated running them.

* **Main tables** (I-VII): per model and ratio, from scratch and from the baseline checkpoint
  (``PT?``), accuracy, its change against the baseline, FLOPs (MACs) and parameters with their
  pruning rates (PR).
* **Ablation** (XIV): LRP / LRP+ET / LRP+BNR / LRPET on the first model at its first ratio.
* **Gradient norms** (XIX): of the first two convolutions, at the last step before and the first
  step after each projection, averaged over epochs.
* **Time** (XX): seconds per epoch of plain SGD, LRPET (projection once per epoch) and projection
  at every step (TRP-style), the first (compiling) epoch left out.

Ranks may come from :mod:`experiments.rank_search` (``--set ranks_file=PATH``) instead of one
ratio for every layer.

Presets:

* ``smoke``: seconds; the tests run it.
* ``default``: the embedded digits, ResNet-8 at p = 0.5 and 0.7 and a small VGG-style network at
  p = 0.7; minutes on a CPU. *Not* the paper's setting.
* ``paper``: CIFAR-10, ResNet-20/56/110 and VGG-16; ResNet-56 at the paper's 0.55, 0.57, 0.70,
  0.80, the other ratios ours; 400 epochs from scratch, 200 from the baseline, lr 0.1, decay 5e-4
  (the paper's text; its script uses 1e-4). Days on one GPU for every table.

Run::

    python -m experiments.lrpet_cifar [--preset smoke|default|paper] [--set field=value]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

import jaxlr
from experiments import data as data_lib
from experiments import lorita_study, models, plots, presets, truncation
from experiments.results import Column, Results, run_settings, value_range
from experiments.train import Task, TrainConfig, TrainResult, evaluate, step_decay_sgd, train

__all__ = ["PRESETS", "Config", "main", "run", "summarize"]

ABLATION = {"LRP": (False, False), "LRP+ET": (True, False), "LRP+BNR": (False, True),
            "LRPET": (True, True)}


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (see the module's documentation).

    Attributes:
      data: the data set (:func:`experiments.data.load`).
      data_dir: tensorflow-datasets' data_dir.
      seed: seeds split, initialisation and shuffling (each run's ``seed``).
      runs: ``(model name, pruning ratio)`` pairs of the main tables (models by
        :func:`experiments.models.create`).
      ranks_file: a JSON ``{path: rank}`` (from :mod:`experiments.rank_search`) used instead of
        the ratios, for the first model.
      train: how each run trains (:class:`experiments.train.TrainConfig`): its ``epochs`` are
        those from scratch (and of the baseline); batch size, checkpoints, devices.
      pretrained_epochs: training epochs from the baseline checkpoint (0: no ``PT`` rows).
      learning_rate: SGD's initial learning rate.
      weight_decay: coupled weight decay.
      pad: the random crop's zero padding (each run's ``augmentation``).
      flip: random horizontal flips (each run's ``augmentation``).
      ablation: run Table XIV.
      timing_epochs: epochs of each Table XX run (0: no timing).
    """

    PER_RUN: ClassVar[dict[str, str]] = {"train.seed": "from seed",
                                         "train.augmentation": "from pad and flip",
                                         "train.progress": "from --no-progress"}

    data: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    runs: tuple[tuple[str, float], ...] = (("resnet8", 0.5), ("resnet8", 0.7),
                                           ("vgg:config=32/32/M/64/64/M", 0.7))
    ranks_file: str | None = None
    train: TrainConfig = TrainConfig(epochs=20, batch_size=64, checkpoint_every=10)
    pretrained_epochs: int = 10
    learning_rate: float = 0.05
    weight_decay: float = 5e-4
    pad: int = 1
    flip: bool = False
    ablation: bool = True
    timing_epochs: int = 4

    def __post_init__(self) -> None:
        presets.check(self)


PRESETS = {
    "default": Config(),
    "smoke": Config(runs=(("vgg:config=4/M/8/M", 0.5),),
                    train=TrainConfig(epochs=2, batch_size=64, checkpoint_every=1),
                    pretrained_epochs=1, ablation=True, timing_epochs=2),
    "paper": Config(data="cifar10",
                    runs=(("resnet20", 0.5), ("resnet56", 0.55), ("resnet56", 0.57),
                          ("resnet56", 0.70), ("resnet56", 0.80), ("resnet110", 0.6),
                          ("vgg16", 0.6)),
                    train=TrainConfig(epochs=400, batch_size=128, checkpoint_every=10),
                    pretrained_epochs=200, learning_rate=0.1, pad=4, flip=True,
                    timing_epochs=5),
}


def _first_convs(variables: dict[str, Any]) -> tuple[str, ...]:
    """The paths of the first two projected convolutions (tree order)."""
    leaves = jaxlr.selection.matrix_leaves(variables["params"], filter="conv")
    return tuple(sorted(leaves, key=lambda name: leaves[name].index)[:2])


def _score(model: Any, variables: dict[str, Any], ranks: dict[str, int] | None,
           data: data_lib.Dataset, sample: Any, dense_macs: int, dense_params: int,
           ) -> dict[str, Any]:
    if ranks:
        variables, report = truncation.compressed_variables(variables, ranks)
        params = report.params_after
    else:
        params = dense_params
    macs = truncation.forward_macs(model, variables, sample)
    return {"accuracy": evaluate(model, variables, data, "test")["accuracy"],
            "macs": macs, "macs_pr": 1 - macs / dense_macs, "params": params,
            "params_pr": 1 - params / dense_params}


def _read_ranks(config: Config, model: Any, sample: jax.Array) -> dict[str, int] | None:
    """The ranks of ``ranks_file``, checked against the first model's convolutions."""
    if config.ranks_file is None:
        return None
    path = Path(config.ranks_file)
    try:
        ranks = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise presets.SettingsError(f"ranks_file={config.ranks_file!r} cannot be read as JSON: "
                                    f"{error}") from error
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False))
    try:
        return dict(jaxlr.policies.resolve_ranks(ranks, shapes["params"]))
    except (TypeError, ValueError) as error:
        raise presets.SettingsError(f"ranks_file={config.ranks_file!r} does not fit "
                                    f"{config.runs[0][0]!r}: {error}") from error


def run(config: Config, results: Results, progress: bool = True) -> dict[str, Any]:
    """Runs every table; returns their tables (markdown) and rows (``main``, ``ablation``,
    ``timing``)."""
    data = presets.load_data(config)
    sample = jnp.asarray(data.normalize(data.test.images[:1]))
    presets.check_models({f"runs: {name!r}": models.create(name, data.num_classes)
                          for name, _ in config.runs}, sample)
    file_ranks = _read_ranks(config, models.create(config.runs[0][0], data.num_classes), sample)
    results.json("config", config)
    note = lorita_study.preset_note(data, ["cifar10"])
    augmentation = data_lib.Augmentation(config.pad, config.flip)
    # Each run's own: its epochs (from scratch, from the baseline, timing) replace these.
    run_config = dataclasses.replace(config.train, seed=config.seed, augmentation=augmentation,
                                     progress=progress)
    steps_per_epoch = len(data.train) // run_config.batch_size

    # What every run depends on besides its own model, epochs, ranks and options.
    shared = run_settings(config, exclude=("runs", "ranks_file", "train", "pretrained_epochs",
                                           "ablation", "timing_epochs"))
    fitted: dict[str, tuple[TrainResult, dict[str, Any]]] = {}

    def fit(name: str, model: Any, epochs: int, ranks: dict[str, int] | None = None,
            energy: bool = True, bnr: bool = True, every: int = steps_per_epoch,
            pretrained: tuple[TrainResult, dict[str, Any]] | None = None,
            ) -> tuple[TrainResult, dict[str, Any]]:
        """Trains (or reuses the identical run): no projection when ``ranks`` is None. Returns
        the result and the run's settings (a run from ``pretrained`` has the pretrained run's
        settings among its own)."""
        train_config = dataclasses.replace(run_config, epochs=epochs)
        settings = {**shared, "train": train_config.run_settings(), "model": name,
                    "ranks": None if ranks is None else dict(sorted(ranks.items())),
                    **({} if ranks is None else {"energy_transfer": energy, "bn_rectification": bnr,
                                                 "every": every}),
                    "pretrained": None if pretrained is None else pretrained[1]}
        key = json.dumps(settings, sort_keys=True)
        if key in fitted:
            return fitted[key]
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False))
        options = jaxlr.ProjectionOptions(
            energy_transfer=energy,
            bn_pairs=jaxlr.find_bn_pairs(model, shapes, sample) if bnr else None)
        optimizer = step_decay_sgd(config.learning_rate, config.weight_decay,
                                   epochs * steps_per_epoch)
        if ranks is not None:
            optimizer = jaxlr.with_low_rank_projection(optimizer, ranks=ranks, every=every,
                                                       options=options)
        task = Task(model, optimizer, grad_norms=_first_convs(shapes))
        label = "_".join([lorita_study.slug(name), f"e{epochs}",
                          "sgd" if ranks is None else f"r{sum(ranks.values())}",
                          *([] if ranks is None else [f"et{int(energy)}", f"bnr{int(bnr)}",
                                                      f"every{every}"]),
                          *(["pt"] if pretrained is not None else [])])
        result = train(task, data, train_config, workdir=results.run_dir(label, settings),
                       variables=None if pretrained is None else pretrained[0].best,
                       label=label, settings=settings)
        fitted[key] = (result, settings)
        return fitted[key]

    main_rows, baselines = [], {}
    for index, (name, ratio) in enumerate(config.runs):
        model = models.create(name, data.num_classes)
        if name not in baselines:
            baseline = fit(name, model, config.train.epochs)
            result = baseline[0]
            dense_macs = truncation.forward_macs(model, result.best, sample)
            dense_params = models.param_count(result.best["params"])
            base = _score(model, result.best, None, data, sample, dense_macs, dense_params)
            baselines[name] = (baseline, dense_macs, dense_params, base)
            main_rows.append({"model": name, "pt": "", "method": "baseline", "ratio": None,
                              **base, "change": 0.0})
        baseline, dense_macs, dense_params, base = baselines[name]
        searched = bool(file_ranks) and index == 0
        ranks = file_ranks if searched else jaxlr.lsvt_ranks(
            baseline[0].best["params"], prune=ratio, filter="conv")
        starts = [("N", None, config.train.epochs)]
        if config.pretrained_epochs:
            starts.append(("Y", baseline, config.pretrained_epochs))
        for pt, init, epochs in starts:
            trained, _ = fit(name, model, epochs, dict(ranks), pretrained=init)
            score = _score(model, trained.best, dict(ranks), data, sample, dense_macs,
                           dense_params)
            main_rows.append({"model": name, "pt": pt, "method": "LRPET",
                              "ratio": "searched" if searched else ratio,
                              **score, "change": score["accuracy"] - base["accuracy"]})
    columns = [Column("model"), Column("pt", "PT?"), Column("method"),
               Column("ratio", "p", "g"), Column("accuracy", "acc", ".4f"),
               Column("change", "acc change", "+.4f"), Column("macs", "FLOPs (MACs)"),
               Column("macs_pr", "FLOPs PR", ".1%"), Column("params"),
               Column("params_pr", "params PR", ".1%")]
    tables = {"main": results.table(
        "main", main_rows, columns,
        f"Tables I-VII: test accuracy of the compressed model (run factored), its change against "
        f"the baseline, FLOPs and parameters with their pruning rates (PR).{note}")}

    name, ratio = config.runs[0]
    model = models.create(name, data.num_classes)
    baseline, dense_macs, dense_params, base = baselines[name]
    ranks = dict(jaxlr.lsvt_ranks(baseline[0].best["params"], prune=ratio, filter="conv"))
    first_two = _first_convs(baseline[0].best)
    ablation: list[dict[str, Any]] = []
    timing: list[dict[str, Any]] = []
    if config.ablation:
        histories = {}
        for method, (energy, bnr) in ABLATION.items():
            trained, _ = fit(name, model, config.train.epochs, ranks, energy, bnr)
            histories[method] = trained.history
            score = _score(model, trained.best, ranks, data, sample, dense_macs, dense_params)
            norms = {}
            for path in first_two:
                before = [r[f"grad_norm/{path}/last"] for r in trained.history]
                after = [r[f"grad_norm/{path}/first"] for r in trained.history[1:]]
                norms[f"{path} before"] = statistics.fmean(before)
                norms[f"{path} after"] = statistics.fmean(after) if after else None
            ablation.append({"model": name, "ratio": ratio, "method": method, **score,
                             "change": score["accuracy"] - base["accuracy"], **norms})
        tables["ablation"] = results.table("ablation", ablation, [
            Column("model"), Column("ratio", "p", "g"), Column("method"),
            Column("accuracy", "acc", ".4f"), Column("change", "acc change", "+.4f")],
            f"Table XIV: ablation of energy transfer (ET) and BN rectification (BNR).{note}")
        norm_columns = [Column(key, key, ".4g") for key in ablation[0] if " before" in key
                        or " after" in key]
        tables["grad_norms"] = results.table(
            "grad_norms", ablation, [Column("method"), *norm_columns],
            f"Table XIX: gradient norm of the first two convolutions at the last step before "
            f"and the first step after each projection, averaged over epochs.{note}")
        plots.training_curves(histories, results.file("ablation_training.png"))
    if config.timing_epochs:
        for method, every in (("SGD", None), ("LRPET (every epoch)", steps_per_epoch),
                              ("projection every step", 1)):
            trained, _ = fit(name, model, config.timing_epochs,
                             None if every is None else ranks, every=every or steps_per_epoch)
            seconds = [r["seconds"] for r in trained.history[1:]]
            timing.append({"method": method, "seconds": float(np.mean(seconds))})
        for row in timing:
            row["ratio"] = row["seconds"] / timing[0]["seconds"]
        tables["timing"] = results.table("timing", timing, [
            Column("method"), Column("seconds", "s per epoch", ".3f"),
            Column("ratio", "x SGD", ".2f")],
            f"Table XX: time per epoch on {jnp.zeros(()).device.platform}, the first (compiling) "
            f"epoch left out; {name}, p = {ratio:g}.{note}")
    for key, table in tables.items():
        print(f"\n{key}\n{table}")
    return {"tables": tables, "main": main_rows, "ablation": ablation, "timing": timing}


def summarize(config: Config, out: dict[str, Any]) -> str:
    """What a run shows, in words computed from its results (docs/reproducing.md's findings).

    Args:
      config: the run's settings (unused: the results say it all).
      out: what :func:`run` returned.

    Returns:
      The LRPET runs' accuracy changes and the best of them; the ablation's accuracies and the
      timing's ratios where they ran.
    """
    del config
    rows = [r for r in out["main"] if r["method"] == "LRPET"]
    best = max(rows, key=lambda r: (r["change"], r["macs_pr"]))
    where = (f"at p = {best['ratio']:g}" if isinstance(best["ratio"], float)
             else "at the searched ranks")
    start = " from the baseline" if best["pt"] == "Y" else ""
    parts = [f"{len(rows)} LRPET runs (from scratch and from the baseline) change the "
             f"baseline's test accuracy by {value_range([r['change'] for r in rows], '+.3f')}; "
             f"the best, {best['model']} {where}{start}, by {best['change']:+.3f} at "
             f"{best['macs_pr']:.1%} fewer MACs"]
    if out["ablation"]:
        parts.append("ablation (test accuracy): " + ", ".join(
            f"{r['method']} {r['accuracy']:.3f}" for r in out["ablation"]))
    if out["timing"]:
        parts.append("time per epoch against SGD: " + ", ".join(
            f"{r['method']} {r['ratio']:.2f}x" for r in out["timing"][1:]))
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.lrpet_cifar [--preset NAME] [--set FIELD=VALUE] ...``."""
    return presets.cli(argv, PRESETS, run, description=__doc__.split("\n")[0],
                       default_output="results/lrpet_cifar",
                       prog="python -m experiments.lrpet_cifar")


if __name__ == "__main__":
    main()
