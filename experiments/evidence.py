"""Evidence: the papers' central claims measured on real MNIST images, over seeds, with spread.

Each seed is one full repetition: its own random train / validation / test split of the data
(60/20/20; 6,000 / 2,000 / 2,000 images of the MNIST test set), its own initialisation and
shuffling. Every choice reads the validation split; the test split is only measured. Per
quantity the output gives the mean, the standard deviation and the 95% Student-t interval over
seeds, and each claim gets a verdict by the paired rule of :mod:`experiments.stats` (the
interval of the per-seed difference above 0, below 0, or containing it).

**LoRITa** (FCNs, GSVT). FCN-L (``fcn_depths``) of ``width`` units is trained with every kernel
a product of N matrices (``depths``) by Adam with coupled L2 decay. The learning rate and the
decay are chosen per N on the *first* seed's validation split from
``learning_rates x weight_decays`` (highest validation accuracy; ties: larger decay, then
smaller rate), on the FCN ``tune_on`` (default FCN-10, the paper's headline model; 0: per FCN),
and every seed and FCN trains with that choice. Every hidden matrix (the classifier
kept) is then truncated by GSVT and LSVT at each of ``budgets``. Claims, per FCN, of each N > 1
against N = 1:

* *budget*: the smallest GSVT budget (retained singular values, the paper's metric) from which on
  every larger budget of the grid keeps the test accuracy within ``tolerance`` (0.5 points) of
  the untruncated model, is smaller (the paper: 15% for N = 3 against about 22% for N = 1,
  FCN-10);
* *degradation* (Figure 2): the test accuracy drop averaged over the GSVT budgets is smaller;
* *spectra* (Figure 3): the fraction of singular values holding 90% of each hidden matrix's
  energy (sum of squares), averaged over the matrices, is smaller;
* *accuracy* (Table 1): test accuracy before truncation is the same within ``margin`` (1 point).

**LRPET** (ablation, Table XIV, on a CNN with BatchNorm). Per seed the CNN (``model``) is
trained by SGD without projection (the baseline), and for each pruning ratio (``ratios``) by
LRP, LRP+ET, LRP+BNR and LRPET (projection once per epoch, ranks ``max(1, floor(n - n p))`` per
convolution, the classifier not projected); the baseline is also truncated to the same ranks
after training. Every compressed model is evaluated running its factor pairs. Claims, per ratio:
LRP+ET > LRP, LRPET > LRP+ET, LRPET > LRP, and LRPET > the baseline truncated after training.

Presets:

* ``smoke``: seconds, on the embedded digits; the tests run it.
* ``default``: real MNIST (``data=idx:../shared/data/mnist``, the 10,000-image MNIST test set in
  IDX files; any MNIST-format IDX directory, or ``data=mnist`` once prepared, works), 5 seeds,
  FCN-6/8/10 of width 256 with N in {1, 3} for 60 epochs, and a three-convolution CNN (16, 16,
  32 channels after a 2 x 2 pooling of the 28 x 28 image) at p = 0.7 and 0.8: at most 30
  minutes on a 2-core CPU.
* ``full``: for a GPU: width 512, N in {1, 2, 3}, 100 epochs, a finer grid, 10 seeds, and the
  LRPET paper's ResNet-56 at p = 0.55 and 0.8.

Outputs (``results/evidence/PRESET``): ``report.md`` (every table below with its caption, and the
verdicts), tables as markdown and CSV (``lorita_tuning``, ``lorita_runs``, ``lorita_summary``,
``lorita_verdicts``, ``lrpet_runs``, ``lrpet_summary``, ``lrpet_verdicts``), the figures
``accuracy_drop.png`` (Figure 2 with 95% bands), ``spectra.png`` (Figure 3, the first two
hidden matrices, with bands) and ``lrpet.png`` (per-seed accuracies and intervals), and per
training run its directory under ``runs/``. Run::

    python -m experiments.evidence [--preset smoke|default|full] [--set field=value]
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlr
from experiments import data as data_lib
from experiments import models, plots, presets, stats, truncation
from experiments.results import Column, Results
from experiments.train import Task, TrainConfig, evaluate, lorita_task, step_decay_sgd, train
from jaxlr import lorita

__all__ = [
    "ABLATION",
    "PRESETS",
    "Config",
    "energy_fraction",
    "summaries",
    "main",
    "run",
]

# LRPET's ablation: method -> (energy transfer, BN rectification).
ABLATION = {"LRP": (False, False), "LRP+ET": (True, False), "LRP+BNR": (False, True),
            "LRPET": (True, True)}
TRUNCATED = "truncated after training"
POLICIES = ("GSVT", "LSVT")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (see the module's documentation).

    Attributes:
      data: the data set (:func:`experiments.data.load`); its split is drawn per seed.
      data_dir: tensorflow-datasets' data_dir.
      seeds: the repetitions; each seeds its split, initialisation and shuffling. The first also
        chooses LoRITa's learning rate and decay.
      fcn_depths: the L of each FCN-L (LoRITa).
      width: hidden units of the FCNs.
      depths: LoRITa's N values (N = 1 must be among them: the claims compare against it).
      tune_on: the FCN-L whose first-seed runs choose each N's learning rate and decay for every
        FCN (one of ``fcn_depths``), or 0: each FCN chooses its own.
      learning_rates: Adam learning rates tried per N (and FCN, with ``tune_on=0``).
      weight_decays: coupled L2 decays tried per N (and FCN, with ``tune_on=0``).
      lorita_epochs: training epochs of each FCN.
      batch_size: of training (both parts).
      budgets: GSVT / LSVT fractions of singular values kept.
      tolerance: the accuracy drop (a fraction; 0.005 is half a point) a truncation may cost.
      margin: the equivalence margin of "the same accuracy for every N".
      model: the CNN of the LRPET part (:func:`experiments.models.create`; with BatchNorm).
      ratios: LRPET's pruning ratios p.
      lrpet_epochs: training epochs of each CNN run.
      sgd_learning_rate: SGD's initial learning rate (divided by 10 at 50% and 75%).
      sgd_weight_decay: SGD's coupled weight decay.
      confidence: of every interval.
      checkpoint_every: epochs between periodic checkpoints.
      parallel: how training spreads over the local devices: "data", "fsdp" or "none"
        (:class:`experiments.train.TrainConfig`).
    """

    data: str = "idx:../shared/data/mnist"
    data_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    fcn_depths: tuple[int, ...] = (6, 8, 10)
    width: int = 256
    depths: tuple[int, ...] = (1, 3)
    tune_on: int = 10
    learning_rates: tuple[float, ...] = (1e-3, 3e-4)
    weight_decays: tuple[float, ...] = (1e-3, 3e-3)
    lorita_epochs: int = 60
    batch_size: int = 128
    budgets: tuple[float, ...] = (0.6, 0.5, 0.4, 0.33, 0.27, 0.22, 0.18, 0.15, 0.12, 0.1,
                                  0.08, 0.065, 0.05, 0.04, 0.03, 0.02, 0.01)
    tolerance: float = 0.005
    margin: float = 0.01
    model: str = "vgg:config=M/16/16/M/32/M"
    ratios: tuple[float, ...] = (0.7, 0.8)
    lrpet_epochs: int = 12
    sgd_learning_rate: float = 0.05
    sgd_weight_decay: float = 5e-4
    confidence: float = 0.95
    checkpoint_every: int = 10
    parallel: str = "data"

    def __post_init__(self) -> None:
        presets.check(self)
        if self.tune_on and self.tune_on not in self.fcn_depths:
            raise presets.SettingsError(f"tune_on must be 0 or one of fcn_depths "
                                        f"{self.fcn_depths!r}, got {self.tune_on!r}.")
        if 1 not in self.depths or len(self.depths) < 2:
            raise presets.SettingsError(f"depths must hold 1 and at least one N > 1 (the claims "
                                        f"compare against N = 1), got {self.depths!r}.")


PRESETS = {
    "default": Config(),
    "smoke": Config(data="digits", seeds=(0, 1), fcn_depths=(3,), width=16, depths=(1, 2),
                    tune_on=0,
                    learning_rates=(1e-3,), weight_decays=(1e-3,), lorita_epochs=1,
                    batch_size=64, budgets=(0.5, 0.2), model="vgg:config=4/M/8/M",
                    lrpet_epochs=1, checkpoint_every=1),
    "full": Config(seeds=tuple(range(10)), width=512, depths=(1, 2, 3), tune_on=0,
                   learning_rates=(1e-3, 3e-4, 1e-4), weight_decays=(1e-4, 1e-3, 3e-3, 1e-2),
                   lorita_epochs=100, model="resnet56", ratios=(0.55, 0.8), lrpet_epochs=60),
}


# ------------------------------------------------------------------------------------------------
# Measurements of one trained model (truncation curves: experiments.truncation).


def energy_fraction(values: np.ndarray, energy: float = 0.9) -> float:
    """The fraction of ``values`` (singular values) whose largest hold ``energy`` of the sum of
    squares.

    Example:
      >>> energy_fraction(np.array([3.0, 1.0, 0.0, 0.0]))
      0.25
    """
    squares = np.sort(np.asarray(values, np.float64))[::-1] ** 2
    if squares.sum() == 0:
        return 0.0
    needed = int(np.searchsorted(np.cumsum(squares) / squares.sum(), energy - 1e-12)) + 1
    return needed / squares.size


# ------------------------------------------------------------------------------------------------
# LoRITa.


def _lorita_fit(config: Config, data: data_lib.Dataset, fcn_depth: int, n: int, rate: float,
                decay: float, seed: int, results: Results, progress: bool) -> dict[str, Any]:
    model = models.FCN(fcn_depth, config.width, num_classes=data.num_classes)
    settings = {"part": "lorita", "data": config.data, "model": f"FCN-{fcn_depth}",
                "width": config.width, "N": n, "learning_rate": rate, "weight_decay": decay,
                "seed": seed, "epochs": config.lorita_epochs, "batch_size": config.batch_size}
    label = f"fcn{fcn_depth}_N{n}_lr{rate:g}_wd{decay:g}_seed{seed}"
    result = train(lorita_task(model, lorita.coupled_adam(rate, decay), n), data,
                   TrainConfig(config.lorita_epochs, config.batch_size, seed,
                               checkpoint_every=config.checkpoint_every, progress=progress,
                               parallel=config.parallel),
                   workdir=results.run_dir(label, settings), label=label, settings=settings)
    return {"model": f"FCN-{fcn_depth}", "N": n, "learning_rate": rate, "weight_decay": decay,
            "seed": seed, "validation": result.best_accuracy, "best_epoch": result.best_epoch,
            "variables": result.best, "fcn": model}


def _measure(config: Config, data: data_lib.Dataset, fit: dict[str, Any]) -> dict[str, Any]:
    filter_ = jaxlr.kernel_filter(exclude="head")
    curves = truncation.curves(fit["fcn"], fit["variables"], data, config.budgets,
                                filter=filter_, policies=POLICIES)
    reference = curves[0]
    gsvt = [r for r in curves if r["policy"] == "GSVT"]

    def smallest(policy: str, split: str) -> float:
        return truncation.smallest_budget(curves, policy, split, config.tolerance)

    spectra = jaxlr.svd.singular_values(fit["variables"]["params"], filter=filter_)
    return {
        **{k: fit[k] for k in ("model", "N", "learning_rate", "weight_decay", "seed",
                               "best_epoch")},
        "validation": reference["validation"], "test": reference["test"],
        "budget": smallest("GSVT", "test"),
        "budget_validation": smallest("GSVT", "validation"),
        "lsvt_budget": smallest("LSVT", "test"),
        "drop": float(np.mean([reference["test"] - r["test"] for r in gsvt])),
        "energy": float(np.mean([energy_fraction(np.asarray(v)) for v in spectra.values()])),
        "curves": curves,
        "spectra": {path: np.asarray(v) / float(np.max(v)) for path, v in spectra.items()},
    }


def _choose(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Highest validation accuracy; ties: larger decay, then smaller learning rate."""
    return max(runs, key=lambda r: (r["validation"], r["weight_decay"], -r["learning_rate"]))


def lorita_part(config: Config, datasets: Mapping[int, data_lib.Dataset], results: Results,
                progress: bool) -> dict[str, Any]:
    """Tunes on the first seed, trains every seed, measures; returns rows and per-run data."""
    first = config.seeds[0]
    tuned = config.fcn_depths if config.tune_on == 0 else (config.tune_on,)
    tuning, chosen = [], {}
    for fcn_depth, n in itertools.product(tuned, config.depths):
        runs = [_lorita_fit(config, datasets[first], fcn_depth, n, rate, decay, first, results,
                            progress)
                for rate, decay in itertools.product(config.learning_rates, config.weight_decays)]
        best = _choose(runs)
        chosen[fcn_depth, n] = best
        tuning += [{**{k: r[k] for k in ("model", "N", "learning_rate", "weight_decay",
                                         "validation", "best_epoch")},
                    "chosen": "yes" if r is best else ""} for r in runs]
    measured = []
    for seed in config.seeds:
        for fcn_depth, n in itertools.product(config.fcn_depths, config.depths):
            pick = chosen[fcn_depth if config.tune_on == 0 else config.tune_on, n]
            fit = pick if seed == first and pick["model"] == f"FCN-{fcn_depth}" else _lorita_fit(
                config, datasets[seed], fcn_depth, n, pick["learning_rate"],
                pick["weight_decay"], seed, results, progress)
            measured.append(_measure(config, datasets[seed], fit))
    return {"tuning": tuning, "runs": measured}


LORITA_CLAIMS = (  # (key of the measured quantity, what it is, the claim about N > 1)
    ("budget", "GSVT budget within the tolerance", "less"),
    ("drop", "mean GSVT accuracy drop (Figure 2)", "less"),
    ("energy", "singular values holding 90% of the energy (Figure 3)", "less"),
    ("test", "test accuracy before truncation (Table 1)", "equal"),
)


def lorita_verdicts(config: Config, runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per FCN, N > 1 and claim: the paired comparison against N = 1 over seeds."""
    rows = []
    for fcn_depth, n in itertools.product(config.fcn_depths, config.depths):
        if n == 1:
            continue
        model = f"FCN-{fcn_depth}"

        def values(depth: int, key: str, model: str = model) -> list[float]:
            by_seed = {r["seed"]: r[key] for r in runs if r["model"] == model and r["N"] == depth}
            return [by_seed[s] for s in config.seeds]

        for key, what, claim in LORITA_CLAIMS:
            rows.append(_verdict(f"{model}: N = {n} against N = 1", what, values(n, key),
                                 values(1, key), claim, config))
    return rows


# ------------------------------------------------------------------------------------------------
# LRPET.


def lrpet_part(config: Config, datasets: Mapping[int, data_lib.Dataset], results: Results,
               progress: bool) -> list[dict[str, Any]]:
    """Per seed: the baseline, its truncation, and the four ablation runs per ratio."""
    rows = []
    for seed in config.seeds:
        data = datasets[seed]
        model = models.create(config.model, data.num_classes)
        sample = jnp.asarray(data.normalize(data.test.images[:1]))
        shapes = jax.eval_shape(lambda m=model, x=sample: m.init(jax.random.key(0), x,
                                                                   train=False))
        bn_pairs = jaxlr.find_bn_pairs(model, shapes, sample)
        steps = len(data.train) // config.batch_size

        def fit(ranks: Mapping[str, int] | None, energy: bool = False, bnr: bool = False,
                model: nn.Module = model, steps: int = steps, seed: int = seed,
                data: data_lib.Dataset = data, bn_pairs: Any = bn_pairs) -> dict[str, Any]:
            settings = {"part": "lrpet", "data": config.data, "model": config.model,
                        "seed": seed, "epochs": config.lrpet_epochs,
                        "batch_size": config.batch_size,
                        "learning_rate": config.sgd_learning_rate,
                        "weight_decay": config.sgd_weight_decay,
                        "ranks": None if ranks is None else dict(sorted(ranks.items())),
                        "energy_transfer": energy, "bn_rectification": bnr}
            label = ("sgd" if ranks is None else f"r{sum(ranks.values())}_et{int(energy)}"
                     f"_bnr{int(bnr)}") + f"_seed{seed}"
            optimizer = step_decay_sgd(config.sgd_learning_rate, config.sgd_weight_decay,
                                       config.lrpet_epochs * steps)
            if ranks is not None:
                optimizer = jaxlr.with_low_rank_projection(
                    optimizer, ranks=dict(ranks), every=steps, options=jaxlr.ProjectionOptions(
                        energy_transfer=energy, bn_pairs=bn_pairs if bnr else None))
            task = Task(model, optimizer)
            return train(task, data, TrainConfig(
                config.lrpet_epochs, config.batch_size, seed,
                checkpoint_every=config.checkpoint_every, progress=progress,
                parallel=config.parallel), workdir=results.run_dir(label, settings),
                label=label, settings=settings).best

        def score(variables: Mapping[str, Any], ranks: Mapping[str, int] | None,
                  model: nn.Module = model, data: data_lib.Dataset = data) -> dict[str, float]:
            if ranks is not None:
                variables, _ = truncation.compressed_variables(variables, ranks)
            return {split: evaluate(model, dict(variables), data, split)["accuracy"]
                    for split in ("validation", "test")}

        baseline = fit(None)
        rows.append({"seed": seed, "ratio": None, "method": "dense (no projection)",
                     "ranks": "full", **score(baseline, None)})
        for ratio in config.ratios:
            ranks = dict(jaxlr.lsvt_ranks(baseline["params"], prune=ratio, filter="conv"))
            text = "/".join(str(r) for r in ranks.values())
            rows.append({"seed": seed, "ratio": ratio, "method": TRUNCATED, "ranks": text,
                         **score(baseline, ranks)})
            for method, (energy, bnr) in ABLATION.items():
                rows.append({"seed": seed, "ratio": ratio, "method": method, "ranks": text,
                             **score(fit(ranks, energy, bnr), ranks)})
    return rows


LRPET_CLAIMS = (("LRP+ET", "LRP"), ("LRPET", "LRP+ET"), ("LRPET", "LRP"), ("LRPET", TRUNCATED))


def lrpet_verdicts(config: Config, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per ratio and claim: test accuracy of the first method above the second's."""
    out = []
    for ratio in config.ratios:
        def values(method: str, ratio: float = ratio) -> list[float]:
            by_seed = {r["seed"]: r["test"] for r in rows
                       if r["ratio"] == ratio and r["method"] == method}
            return [by_seed[s] for s in config.seeds]

        for better, worse in LRPET_CLAIMS:
            out.append(_verdict(f"p = {ratio:g}", f"test accuracy: {better} > {worse}",
                                values(better), values(worse), "greater", config))
    return out


# ------------------------------------------------------------------------------------------------
# Tables, figures, report.


def _verdict(where: str, what: str, a: Sequence[float], b: Sequence[float], claim: stats.Claim,
             config: Config) -> dict[str, Any]:
    """The verdict row of ``claim`` about ``a`` against ``b`` (one number per seed each)."""
    margin = config.margin if claim == "equal" else 0.0
    comparison = stats.compare(a, b, claim, margin=margin, confidence=config.confidence)
    d = comparison.difference
    rule = f"within ±{margin:g}" if claim == "equal" else f"{'>' if claim == 'greater' else '<'} 0"
    return {"where": where, "what": what, "a": float(np.mean(a)), "b": float(np.mean(b)),
            "difference": d.mean,
            "interval": d.interval(".4f"), "rule": f"interval {rule}",
            "agree": f"{comparison.agree}/{d.n}", "verdict": comparison.verdict}


VERDICT_COLUMNS = [
    Column("where"), Column("what", "claim"), Column("a", "first (mean)", ".4f"),
    Column("b", "second (mean)", ".4f"), Column("difference", "mean difference", "+.4f"),
    Column("interval", "95% interval"), Column("rule", "holds if"),
    Column("agree", "seeds agreeing"), Column("verdict")]


def summaries(rows: Sequence[Mapping[str, Any]], group: Sequence[str], keys: Sequence[str],
              confidence: float) -> list[dict[str, Any]]:
    """One row per value of the ``group`` keys (in order of appearance): each of ``keys`` over
    its members as ``"mean ± std [low, high]"``, and ``seeds``, the number of members."""
    out = []
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r[g] for g in group), []).append(r)
    for name, members in groups.items():
        row = dict(zip(group, name, strict=True))
        for key in keys:
            s = stats.summarize([m[key] for m in members], confidence)
            row[key] = f"{s.mean:.4f} ± {s.std:.4f} {s.interval('.4f')}"
        row["seeds"] = len(members)
        out.append(row)
    return out


def _band(values: Sequence[Sequence[float]], confidence: float) -> tuple[np.ndarray, ...]:
    summaries = [stats.summarize(column, confidence) for column in np.asarray(values).T]
    return tuple(np.array([getattr(s, key) for s in summaries]) for key in ("mean", "low", "high"))


def _lorita_figures(config: Config, runs: Sequence[Mapping[str, Any]], results: Results,
                    data_name: str) -> None:
    drop_panels, spectra_panels = {}, {}
    for fcn_depth in config.fcn_depths:
        model = f"FCN-{fcn_depth}"
        lines, spectra = {}, {}
        for index, n in enumerate(config.depths):
            members = [r for r in runs if r["model"] == model and r["N"] == n]
            for policy in POLICIES:
                retained = [[r["retained"] for r in m["curves"] if r["policy"] == policy]
                            for m in members]
                drops = [[m["curves"][0]["test"] - r["test"] for r in m["curves"]
                          if r["policy"] == policy] for m in members]
                mean, low, high = _band(drops, config.confidence)
                lines[f"N = {n}, {policy}"] = {
                    "x": 100 * np.mean(retained, axis=0), "y": 100 * mean,
                    "low": 100 * low, "high": 100 * high,
                    "style": {"color": f"C{index}",
                              "linestyle": "-" if policy == "GSVT" else "--"}}
            for layer, path in enumerate(list(members[0]["spectra"])[:2]):
                curves = [m["spectra"][path] for m in members]
                mean, low, high = _band(curves, config.confidence)
                spectra[f"N = {n}, {path.split('/')[0]}"] = {
                    "x": np.arange(1, len(mean) + 1), "y": mean,
                    "low": np.maximum(low, 1e-8), "high": high,
                    "style": {"color": f"C{index}", "linestyle": ["-", "--"][layer]}}
        drop_panels[model] = lines
        spectra_panels[model] = spectra
    seeds = len(config.seeds)
    plots.bands(drop_panels, results.file("accuracy_drop.png"),
                title=f"LoRITa on {data_name}: test accuracy drop, mean and "
                      f"{config.confidence:.0%} interval over {seeds} seeds",
                xlabel="retained singular values (%)", ylabel="test accuracy drop (points)",
                xlog=True)
    plots.bands(spectra_panels, results.file("spectra.png"),
                title=f"Singular values / the largest, first two hidden matrices "
                      f"({seeds} seeds, {config.confidence:.0%} interval)",
                xlabel="index", ylabel="singular value / largest", ylog=True)


def run(config: Config, results: Results, progress: bool = True) -> dict[str, Any]:
    """Runs both parts; returns their tables (markdown), rows and verdicts."""
    began = time.perf_counter()
    datasets = {seed: presets.load_data(config, seed) for seed in config.seeds}
    data = datasets[config.seeds[0]]
    sample = data.normalize(data.test.images[:1])
    presets.check_models({**{f"fcn_depths={d}": models.FCN(d, config.width, num_classes=
                                                           data.num_classes)
                             for d in config.fcn_depths},
                          f"model={config.model!r}": models.create(config.model,
                                                                   data.num_classes)}, sample)
    results.json("config", config)
    where = (f"{data.name}: {len(data.train)} training, {len(data.validation)} validation, "
             f"{len(data.test)} test images per seed; seeds {list(config.seeds)}")
    lorita_out = lorita_part(config, datasets, results, progress)
    lrpet_rows = lrpet_part(config, datasets, results, progress)
    runs = lorita_out["runs"]
    tables: dict[str, str] = {}
    captions: dict[str, str] = {}

    def table(name: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[Column],
              caption: str) -> None:
        tables[name] = results.table(name, rows, columns, caption)
        captions[name] = caption

    table("lorita_tuning", lorita_out["tuning"], [
        Column("model"), Column("N"), Column("learning_rate", "learning rate", "g"),
        Column("weight_decay", "decay", "g"), Column("best_epoch", "best epoch"),
        Column("validation", "val acc", ".4f"), Column("chosen")],
        f"LoRITa: learning rate and decay per N{'' if config.tune_on else ' and FCN'}, chosen "
        f"on seed {config.seeds[0]}'s validation split"
        f"{f' with FCN-{config.tune_on}' if config.tune_on else ''}.")
    table("lorita_runs", runs, [
        Column("model"), Column("N"), Column("seed"), Column("test", "test acc", ".4f"),
        Column("budget", "GSVT budget (test)", ".3f"),
        Column("budget_validation", "GSVT budget (val)", ".3f"),
        Column("lsvt_budget", "LSVT budget (test)", ".3f"),
        Column("drop", "mean GSVT drop", ".4f"), Column("energy", "SVs for 90% energy", ".3f")],
        f"LoRITa per seed: the smallest budget (retained singular values) within "
        f"{100 * config.tolerance:g} points of the untruncated accuracy on the test (and the "
        f"validation) split, the test accuracy drop averaged over the GSVT budgets, and the "
        f"fraction of singular values holding 90% of each hidden matrix's energy.")
    keys = ("test", "budget", "budget_validation", "lsvt_budget", "drop", "energy")
    table("lorita_summary", summaries(runs, ("model", "N"), keys, config.confidence),
          [Column("model"), Column("N"), Column("test", "test acc"),
           Column("budget", "GSVT budget (test)"),
           Column("budget_validation", "GSVT budget (val)"),
           Column("lsvt_budget", "LSVT budget (test)"), Column("drop", "mean GSVT drop"),
           Column("energy", "SVs for 90% energy"), Column("seeds")],
          f"LoRITa over seeds: mean ± standard deviation [{config.confidence:.0%} interval].")
    lorita_rows = lorita_verdicts(config, runs)
    table("lorita_verdicts", lorita_rows, VERDICT_COLUMNS,
          "LoRITa's claims, N > 1 against N = 1 paired over seeds (first: N > 1, second: "
          "N = 1); the rule is experiments.stats.compare.")
    table("lrpet_runs", lrpet_rows, [
        Column("seed"), Column("ratio", "p", "g"), Column("method"), Column("ranks"),
        Column("validation", "val acc", ".4f"), Column("test", "test acc", ".4f")],
        f"LRPET ablation per seed ({config.model}); compressed models run their factor pairs.")
    table("lrpet_summary", summaries(lrpet_rows, ("ratio", "method"), ("test",),
                                      config.confidence),
          [Column("ratio", "p", "g"), Column("method"), Column("test", "test acc"),
           Column("seeds")],
          f"LRPET over seeds: mean ± standard deviation [{config.confidence:.0%} interval].")
    lrpet_rows_verdicts = lrpet_verdicts(config, lrpet_rows)
    table("lrpet_verdicts", lrpet_rows_verdicts, VERDICT_COLUMNS,
          "LRPET's claims, paired over seeds; the rule is experiments.stats.compare.")
    _lorita_figures(config, runs, results, data.name)
    panels = {}
    for ratio in config.ratios:
        methods: dict[str, list[float]] = {}
        for r in lrpet_rows:
            if r["ratio"] in (ratio, None):
                methods.setdefault(r["method"], []).append(r["test"])
        panels[f"p = {ratio:g}"] = methods
    plots.intervals(panels, results.file("lrpet.png"), confidence=config.confidence,
                    title=f"LRPET ablation, {config.model} on {data.name}: test accuracy per "
                          f"seed, mean and {config.confidence:.0%} interval",
                    ylabel="test accuracy")
    seconds = time.perf_counter() - began
    report = [f"# Evidence ({where})", "",
              f"Took {seconds / 60:.1f} minutes. Rule: a claim **holds** when the "
              f"{config.confidence:.0%} Student-t interval of its per-seed difference lies on "
              "its side of 0 (inside the margin for 'the same'), **does not hold** when it lies "
              "on the other, and is **not separable** when it contains 0.", ""]
    for name, text in tables.items():
        report += [f"## {name}", "", captions[name], "", text, ""]
    report += ["![accuracy drop](accuracy_drop.png)", "", "![spectra](spectra.png)", "",
               "![lrpet](lrpet.png)", ""]
    results.file("report.md").write_text("\n".join(report))
    print("\n".join(report))
    return {"tables": tables, "lorita": runs, "lorita_tuning": lorita_out["tuning"],
            "lorita_verdicts": lorita_rows, "lrpet": lrpet_rows,
            "lrpet_verdicts": lrpet_rows_verdicts, "seconds": seconds, "where": where}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.evidence [--preset NAME] [--set FIELD=VALUE] ...``."""
    return presets.cli(argv, PRESETS, run, description=__doc__.split("\n")[0],
                       default_output="results/evidence", prog="python -m experiments.evidence")


if __name__ == "__main__":
    main()
