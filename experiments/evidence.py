"""Evidence: each paper's central claim tested on real MNIST images by a protocol fixed in advance.

The protocol (endpoints, decision rules, margins, tuning rule, seeds) is written out in
``docs/evidence.md``, committed before the results it governs; this module carries it out. Each
seed is one full repetition: its own random train / validation / test split of the data (60/20/20:
6,000 / 2,000 / 2,000 images of the MNIST test set), its own initialisation and shuffling. Every
choice reads the validation split; the test split is only measured. One seed, ``tuning_seed``,
only tunes; the verdicts come from the other ``seeds``, paired (both arms of a comparison see the
same split and initialisation), by the rule of :func:`experiments.stats.compare`, each with its
margin (the smallest difference that matters) and the smallest effect the seeds could detect.

**LoRITa** (FCN-``fcn_depth`` of ``width`` units on MNIST; N = 3 against N = 1), in two *arms*:

* ``jaxlr``: no BatchNorm, the squares of each product on the smaller side, every kernel
  factorized during training, the hidden matrices (not the classifier) truncated.
* ``released``: the LoRITa release's FCN: a BatchNorm after every Linear, the classifier's
  included; the squares on the input side (784 x 784 for the first layer); every kernel, the
  classifier's included, factorized and truncated in one pool of raw singular values.

Both N train with Adam at the same learning rate (cosine-decayed to 0 over
``lorita_train.epochs`` epochs) and coupled L2 decay. The decay is tuned per arm and N on the
tuning seed by one rule: the largest decay of the grid whose final validation accuracy is within
``decay_margin`` of the grid's best; a choice at an edge of the grid extends it along
``decay_ladder`` until the choice is inside (up to ``extend`` steps each way). Each trained model
is measured at its final epoch (the primary endpoints) and at its best validation epoch:

* ``energy``: the fraction of singular values holding ``energy_level`` of each pooled matrix's
  energy (sum of squares), averaged over the pool (Figure 3). Claim: N = 3 smaller.
* ``budget@t``: the smallest GSVT budget (retained singular values) of ``budgets`` from which on
  every larger budget keeps the test accuracy within ``t`` (each of ``tolerances``) of the
  untruncated model's. Claim: N = 3 smaller (the paper: 15% against about 22% for FCN-10).
* ``drop@b``: the test accuracy lost by GSVT at each budget of ``drop_budgets`` (Figure 2).
  Claim: N = 3 smaller.
* ``test``: test accuracy before truncation (Table 1). Claim: the same within
  ``accuracy_margin``.

**LRPET** (Table XIV and XV, a CNN with BatchNorm, SGD). Per seed and pruning ratio p (ranks
``max(1, floor(n - n p))`` per convolution, the classifier kept): LRP, LRP+ET, LRP+BNR and LRPET
trained from scratch, and the paper's own baseline: the dense model trained for as many epochs,
decomposed to the same ranks (:func:`jaxlr.compress`), its BatchNorm statistics recomputed, and
its factor pairs fine-tuned for as many epochs again (the recipe of docs/inference.md). Every
model is measured at its final epoch, running its factor pairs. Claims: LRP+ET > LRP,
LRPET > LRP+ET, LRPET > LRP, LRPET > the decomposed and fine-tuned baseline.

Presets:

* ``smoke``: seconds, on the embedded digits; the tests run it (twice: the numbers must agree).
* ``default``: real MNIST (``data=idx:../shared/data/mnist``), FCN-10 of width 256, N in {1, 3},
  100 epochs, both arms, tuning seed 0 and verdict seeds 1-5; the CNN at p = 0.8 for 12 epochs,
  verdict seeds 1-10: within 60 minutes on a 2-core CPU.
* ``full``: for a GPU: 10 LoRITa and 20 LRPET verdict seeds, width 512, 200 epochs, p = 0.7 and
  0.8, 30 CNN epochs.

Outputs (``results/evidence/PRESET``): ``report.md`` (every table with its caption, and the
verdicts), tables as markdown and CSV (``lorita_tuning``, ``lorita_runs``, ``lorita_verdicts``,
``lrpet_runs``, ``lrpet_verdicts``), ``numbers.json`` (every measured number, and their digest:
the same command on the same machine, as :func:`experiments.machine.describe` names it, processor,
instruction set and usable cores, gives the same digest), the figures ``accuracy_drop.png``,
``spectra.png`` and ``lrpet.png``, and per training run its directory under ``runs/``. Run::

    python -m experiments.evidence [--preset smoke|default|full] [--set field=value]
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlr
from experiments import data as data_lib
from experiments import models, plots, presets, stats, truncation
from experiments.results import Column, Results, markdown_table
from experiments.train import Task, TrainConfig, evaluate, lorita_task, step_decay_sgd, train
from jaxlr import lorita

__all__ = [
    "ABLATION",
    "ARMS",
    "PRESETS",
    "Arm",
    "Config",
    "Endpoint",
    "digest",
    "endpoints",
    "energy_fraction",
    "fit_lorita",
    "main",
    "measure",
    "run",
    "runs_block",
    "summarize",
    "summaries",
    "tune",
]

# LRPET's ablation: method -> (energy transfer, BN rectification).
ABLATION = {"LRP": (False, False), "LRP+ET": (True, False), "LRP+BNR": (False, True),
            "LRPET": (True, True)}
DENSE = "dense (no projection)"
TRUNCATED = "decomposed, BN recomputed"
FINETUNED = "decomposed + fine-tuned"
LRPET_CLAIMS = (("LRP+ET", "LRP"), ("LRPET", "LRP+ET"), ("LRPET", "LRP"), ("LRPET", FINETUNED))
PAPER_GAPS = (0.0005, 0.0031)  # the LRPET paper's ablation gaps (Table XIV), as fractions


class Arm(NamedTuple):
    """One LoRITa setup (see the module's documentation).

    Attributes:
      name: its key in :data:`ARMS`.
      batch_norm: a BatchNorm after every hidden Linear.
      head_norm: a BatchNorm after the classifier.
      placement: where the squares of each product go (:func:`jaxlr.lorita.factorize`).
      pool: ``"hidden"`` (the classifier kept out of the truncation) or ``"all"``.
      words: how the report describes it.
    """

    name: str
    batch_norm: bool
    head_norm: bool
    placement: str
    pool: str
    words: str

    def filter(self) -> Any:
        """The matrices truncated and pooled (GSVT, raw singular values)."""
        return jaxlr.kernel_filter(exclude="head") if self.pool == "hidden" else "all"

    def model(self, config: Config, num_classes: int) -> models.FCN:
        return models.FCN(config.fcn_depth, config.width, batch_norm=self.batch_norm,
                          num_classes=num_classes, head_norm=self.head_norm)


ARMS = {
    "jaxlr": Arm("jaxlr", False, False, "smaller", "hidden",
                 "no BatchNorm, squares on the smaller side, hidden matrices truncated"),
    "released": Arm("released", True, True, "input", "all",
                    "the release's FCN: BatchNorm after every Linear, squares on the input side, "
                    "every matrix (the classifier's too) in one pool"),
}



@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (see the module's documentation and docs/evidence.md's protocol).

    Attributes:
      data: the data set (:func:`experiments.data.load`); its split is drawn per seed.
      data_dir: tensorflow-datasets' data_dir.
      tuning_seed: the seed whose runs only tune (LoRITa's decay); never a verdict seed.
      seeds: LoRITa's verdict seeds.
      arms: LoRITa's setups (:data:`ARMS`).
      fcn_depth: the L of FCN-L.
      width: hidden units of the FCN.
      depths: LoRITa's N values; each N > 1 is compared with N = 1.
      learning_rate: Adam's initial learning rate, the same for every N (cosine-decayed to 0).
      weight_decays: the first decay grid tried per arm and N (consecutive ``decay_ladder``
        values).
      decay_ladder: the decays a grid extends along.
      extend: the most steps a grid extends each way (the default reaches both ends of
        ``decay_ladder``: the grid extends until the choice is inside or the ladder ends).
      decay_margin: the tuning rule's margin: the largest decay within it of the best final
        validation accuracy is chosen.
      lorita_train: how each FCN trains (epochs, batch size, checkpoints; the seed is each run's).
      budgets: the GSVT budgets (fractions of each pool's singular values kept).
      drop_budgets: the budgets (among ``budgets``) whose accuracy drop is an endpoint.
      tolerances: the accuracy drops (fractions; 0.005 is half a point) of the budget endpoints.
      energy_level: the energy share of the spectrum endpoint.
      energy_margin: the smallest difference of the energy fraction that matters.
      budget_margin: the same for the budgets (a fraction of the singular values).
      drop_margin: the same for the accuracy drops (0.01 is a point).
      accuracy_margin: the equivalence margin of the accuracy before truncation.
      model: the CNN of the LRPET part (:func:`experiments.models.create`; with BatchNorm).
      ratios: LRPET's pruning ratios p.
      lrpet_seeds: LRPET's verdict seeds (its runs are short: more of them).
      lrpet_train: how each CNN trains (and the baseline fine-tunes).
      sgd_learning_rate: SGD's initial learning rate (divided by 10 at 50% and 75%).
      sgd_weight_decay: SGD's coupled weight decay.
      lrpet_margin: the smallest accuracy gain between LRPET's methods that matters.
      confidence: of every interval.
      power: of the detectable effects.
    """

    data: str = "idx:../shared/data/mnist"
    data_dir: str | None = None
    tuning_seed: int = 0
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    arms: tuple[str, ...] = ("jaxlr", "released")
    fcn_depth: int = 10
    width: int = 256
    depths: tuple[int, ...] = (1, 3)
    learning_rate: float = 3e-4
    weight_decays: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    decay_ladder: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1,
                                       3e-1, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4)
    extend: int = 18
    decay_margin: float = 0.005
    lorita_train: TrainConfig = TrainConfig(epochs=100, batch_size=128, checkpoint_every=25)
    budgets: tuple[float, ...] = (*(round(0.02 + 0.005 * i, 3) for i in range(17)),
                                  0.125, 0.15, 0.2, 0.3, 0.5)
    drop_budgets: tuple[float, ...] = (0.03, 0.05)
    tolerances: tuple[float, ...] = (0.0, 0.005)
    energy_level: float = 0.9
    energy_margin: float = 0.03
    budget_margin: float = 0.01
    drop_margin: float = 0.01
    accuracy_margin: float = 0.01
    model: str = "vgg:config=M/16/16/M/32/M"
    ratios: tuple[float, ...] = (0.8,)
    lrpet_seeds: tuple[int, ...] = tuple(range(1, 11))
    lrpet_train: TrainConfig = TrainConfig(epochs=12, batch_size=128, checkpoint_every=12)
    sgd_learning_rate: float = 0.05
    sgd_weight_decay: float = 5e-4
    lrpet_margin: float = 0.005
    confidence: float = 0.95
    power: float = 0.8

    PER_RUN: ClassVar[dict[str, str]] = {
        f"{part}_train.{name}": source for part in ("lorita", "lrpet")
        for name, source in (("seed", "from tuning_seed and seeds"),
                             ("progress", "from --no-progress"))}

    def __post_init__(self) -> None:
        presets.check(self)
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise presets.SettingsError(f"arms must be among {tuple(ARMS)}, got {unknown}.")
        for name in ("seeds", "lrpet_seeds"):
            if self.tuning_seed in getattr(self, name):
                raise presets.SettingsError(f"tuning_seed {self.tuning_seed} must not be one of "
                                            f"the verdict {name} {getattr(self, name)!r}.")
        if 1 not in self.depths or len(self.depths) < 2:
            raise presets.SettingsError(f"depths must hold 1 and at least one N > 1 (the claims "
                                        f"compare against N = 1), got {self.depths!r}.")
        ladder = list(self.decay_ladder)
        if sorted(ladder) != ladder or any(d not in ladder for d in self.weight_decays):
            raise presets.SettingsError(f"weight_decays {self.weight_decays!r} must be values "
                                        f"of the increasing decay_ladder {ladder!r}.")
        where = sorted(ladder.index(d) for d in self.weight_decays)
        if where != list(range(where[0], where[0] + len(where))):
            raise presets.SettingsError(f"weight_decays {self.weight_decays!r} must be "
                                        "consecutive values of decay_ladder.")
        missing = sorted(set(self.drop_budgets) - set(self.budgets))
        if missing:
            raise presets.SettingsError(f"drop_budgets {missing} must be among budgets.")


PRESETS = {
    "default": Config(),
    "smoke": Config(data="digits", tuning_seed=0, seeds=(1, 2), lrpet_seeds=(1, 2), fcn_depth=3,
                    width=16, depths=(1, 2), learning_rate=1e-3, weight_decays=(1e-4, 3e-4),
                    extend=0,
                    lorita_train=TrainConfig(epochs=1, batch_size=64, checkpoint_every=1),
                    budgets=(0.25, 0.5), drop_budgets=(0.25,), model="vgg:config=4/M/8/M",
                    lrpet_train=TrainConfig(epochs=1, batch_size=64, checkpoint_every=1)),
    "full": Config(seeds=tuple(range(1, 11)), lrpet_seeds=tuple(range(1, 21)), width=512,
                   lorita_train=TrainConfig(epochs=200, batch_size=128, checkpoint_every=25),
                   ratios=(0.7, 0.8),
                   lrpet_train=TrainConfig(epochs=30, batch_size=128, checkpoint_every=10)),
}


# ------------------------------------------------------------------------------------------------
# Endpoints.


class Endpoint(NamedTuple):
    """A measured quantity and the claim about it (N > 1 against N = 1).

    Attributes:
      key: its key in a run's row.
      words: what it is.
      claim: ``"less"`` or ``"equal"`` (:func:`experiments.stats.compare`).
      margin: the smallest difference that matters.
    """

    key: str
    words: str
    claim: stats.Claim
    margin: float


def endpoints(config: Config) -> tuple[Endpoint, ...]:
    """LoRITa's endpoints, in the protocol's order."""
    return (
        Endpoint("energy", f"singular values holding {config.energy_level:.0%} of the energy "
                 "(Figure 3)", "less", config.energy_margin),
        *(Endpoint(f"budget@{t:g}", f"GSVT budget within {100 * t:g} points", "less",
                   config.budget_margin) for t in config.tolerances),
        *(Endpoint(f"drop@{b:g}", f"GSVT accuracy drop at {b:.1%} kept (Figure 2)", "less",
                   config.drop_margin) for b in config.drop_budgets),
        Endpoint("test", "test accuracy before truncation (Table 1)", "equal",
                 config.accuracy_margin),
    )


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


def measure(config: Config, arm: Arm, model: models.FCN, variables: Mapping[str, Any],
             data: data_lib.Dataset) -> dict[str, Any]:
    """Every endpoint of one trained model, its truncation curve and its normalised spectra."""
    filter_ = arm.filter()
    spectra = jaxlr.svd.singular_values(variables["params"], filter=filter_)
    curves = truncation.curves(model, variables, data, config.budgets, filter=filter_,
                               policies=("GSVT",), spectra=spectra)
    reference = curves[0]
    by_budget = {r["budget"]: r for r in curves[1:]}
    return {
        "validation": reference["validation"], "test": reference["test"],
        "energy": float(np.mean([energy_fraction(np.asarray(v), config.energy_level)
                                 for v in spectra.values()])),
        **{f"budget@{t:g}": truncation.smallest_budget(curves, "GSVT", "test", t)
           for t in config.tolerances},
        **{f"drop@{b:g}": reference["test"] - by_budget[b]["test"] for b in config.drop_budgets},
        "curve": [(r["retained"], reference["test"] - r["test"]) for r in curves[1:]],
        "spectra": {path: np.asarray(v) / float(np.max(v)) for path, v in spectra.items()},
    }


# ------------------------------------------------------------------------------------------------
# LoRITa.


def fit_lorita(config: Config, arm: Arm, data: data_lib.Dataset, n: int, decay: float,
                seed: int, results: Results, progress: bool) -> dict[str, Any]:
    """Trains one LoRITa model of ``arm`` with N = ``n`` factors and decay ``decay`` on ``seed``'s
    split (a finished run under ``results`` is found again); returns its final and best
    variables (``"final"``, ``"best"``), their validation accuracies, the best epoch and the
    model."""
    model = arm.model(config, data.num_classes)
    train_config = dataclasses.replace(config.lorita_train, seed=seed, progress=progress)
    steps = train_config.epochs * (len(data.train) // train_config.batch_size)
    settings = {"part": "lorita", "arm": arm.name, "data": config.data,
                "model": f"FCN-{config.fcn_depth}", "width": config.width, "N": n,
                "learning_rate": config.learning_rate, "schedule": "cosine",
                "weight_decay": decay, **train_config.run_settings()}
    label = f"{arm.name}_N{n}_wd{decay:g}_seed{seed}"
    optimizer = lorita.coupled_adam(optax.cosine_decay_schedule(config.learning_rate, steps),
                                    decay)
    result = train(lorita_task(model, optimizer, n, placement=arm.placement), data, train_config,
                   workdir=results.run_dir(label, settings), label=label, settings=settings)
    return {"arm": arm.name, "N": n, "weight_decay": decay, "seed": seed, "model": model,
            "final": result.variables, "best": result.best, "best_epoch": result.best_epoch,
            "final_validation": result.history[-1]["validation_accuracy"],
            "best_validation": result.best_accuracy}


def tune(config: Config, fits: Mapping[float, Mapping[str, Any]]) -> float:
    """The tuning rule: the largest decay whose final validation accuracy is within
    ``config.decay_margin`` of the best of ``fits`` (``{decay: fit}``).

    Example:
      >>> fits = {1e-4: {"final_validation": 0.960}, 1e-3: {"final_validation": 0.962},
      ...         1e-2: {"final_validation": 0.940}}
      >>> tune(PRESETS["default"], fits)
      0.001
    """
    best = max(f["final_validation"] for f in fits.values())
    return max(d for d, f in fits.items()
               if f["final_validation"] >= best - config.decay_margin - 1e-12)


def _tune_arm(config: Config, arm: Arm, data: data_lib.Dataset, n: int, results: Results,
              progress: bool) -> tuple[float, list[dict[str, Any]]]:
    """Tunes the decay of one arm and N on the tuning seed, extending the grid past an edge."""
    ladder = list(config.decay_ladder)
    low, high = ladder.index(min(config.weight_decays)), ladder.index(max(config.weight_decays))
    fits = {}

    def fit(decay: float) -> None:
        fits[decay] = fit_lorita(config, arm, data, n, decay, config.tuning_seed, results,
                                  progress)

    for decay in ladder[low:high + 1]:
        fit(decay)
    up = down = 0
    while True:
        chosen = tune(config, fits)
        if chosen == ladder[high] and up < config.extend and high + 1 < len(ladder):
            high, up = high + 1, up + 1
            fit(ladder[high])
        elif chosen == ladder[low] and down < config.extend and low > 0:
            low, down = low - 1, down + 1
            fit(ladder[low])
        else:
            break
    edge = chosen in (ladder[low], ladder[high])
    rows = [{"arm": arm.name, "N": n, "weight_decay": d,
             "final_validation": f["final_validation"],
             "best_validation": f["best_validation"], "best_epoch": f["best_epoch"],
             "chosen": ("yes (at the grid's edge)" if edge else "yes") if d == chosen else ""}
            for d, f in sorted(fits.items())]
    return chosen, rows


def lorita_part(config: Config, datasets: Mapping[int, data_lib.Dataset], results: Results,
                progress: bool) -> dict[str, Any]:
    """Tunes every arm and N on the tuning seed, trains the verdict seeds, measures each model at
    its final and best validation epochs."""
    tuning, runs = [], []
    for name, n in itertools.product(config.arms, config.depths):
        arm = ARMS[name]
        decay, rows = _tune_arm(config, arm, datasets[config.tuning_seed], n, results, progress)
        tuning += rows
        for seed in config.seeds:
            fit = fit_lorita(config, arm, datasets[seed], n, decay, seed, results, progress)
            for at in ("final", "best"):
                runs.append({"arm": name, "N": n, "seed": seed, "weight_decay": decay,
                             "at": at, "best_epoch": fit["best_epoch"],
                             **measure(config, arm, fit["model"], fit[at], datasets[seed])})
    return {"tuning": tuning, "runs": runs}


def lorita_verdicts(config: Config, runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm, checkpoint, N > 1 and endpoint: the paired comparison with N = 1."""
    rows = []
    for name, at in itertools.product(config.arms, ("final", "best")):
        for n in config.depths:
            if n == 1:
                continue

            def values(depth: int, key: str, name: str = name, at: str = at) -> list[float]:
                by_seed = {r["seed"]: r[key] for r in runs
                           if r["arm"] == name and r["at"] == at and r["N"] == depth}
                return [by_seed[s] for s in config.seeds]

            for endpoint in endpoints(config):
                rows.append(_verdict(
                    f"{name}, {at} epoch: N = {n} against N = 1", endpoint.words,
                    values(n, endpoint.key), values(1, endpoint.key), endpoint.claim,
                    endpoint.margin, config))
    return rows


# ------------------------------------------------------------------------------------------------
# LRPET.


def _check_factored(params: Any, ranks: Mapping[str, int]) -> None:
    """Every ranked kernel is a factor pair (so fine-tuning cannot raise its rank)."""
    pairs = {jaxlr.matrices.path_key(p) for p, leaf in jax.tree_util.tree_flatten_with_path(
        params, is_leaf=jaxlr.nodes.is_node)[0] if isinstance(leaf, jaxlr.LowRank)}
    dense = sorted(set(ranks) - pairs)
    if dense:
        raise ValueError(f"kernels {dense} were not held as factor pairs; fine-tuning them "
                         "would train dense kernels.")


def lrpet_part(config: Config, datasets: Mapping[int, data_lib.Dataset], results: Results,
               progress: bool) -> list[dict[str, Any]]:
    """Per seed: the dense model, its decomposition (BN recomputed, and fine-tuned), and the
    four ablation runs per ratio; every model measured at its final epoch."""
    rows = []
    for seed in config.lrpet_seeds:
        data = datasets[seed]
        model = models.create(config.model, data.num_classes)
        sample = jnp.asarray(data.normalize(data.test.images[:1]))
        shapes = jax.eval_shape(lambda m=model, x=sample: m.init(jax.random.key(0), x,
                                                                   train=False))
        bn_pairs = jaxlr.find_bn_pairs(model, shapes, sample)
        train_config = dataclasses.replace(config.lrpet_train, seed=seed, progress=progress)
        steps = len(data.train) // train_config.batch_size

        def fit(ranks: Mapping[str, int] | None, energy: bool = False, bnr: bool = False,
                start: Mapping[str, Any] | None = None, model: Any = model, steps: int = steps,
                seed: int = seed, data: data_lib.Dataset = data, bn_pairs: Any = bn_pairs,
                train_config: TrainConfig = train_config) -> dict[str, Any]:
            kind = "finetune" if start is not None else "train"
            settings = {"part": "lrpet", "data": config.data, "model": config.model,
                        **train_config.run_settings(), "kind": kind,
                        "learning_rate": config.sgd_learning_rate,
                        "weight_decay": config.sgd_weight_decay,
                        "ranks": None if ranks is None else dict(sorted(ranks.items())),
                        "energy_transfer": energy, "bn_rectification": bnr}
            label = ("sgd" if ranks is None else f"{kind}_r{sum(ranks.values())}_et{int(energy)}"
                     f"_bnr{int(bnr)}") + f"_seed{seed}"
            optimizer = step_decay_sgd(config.sgd_learning_rate, config.sgd_weight_decay,
                                       train_config.epochs * steps)
            if ranks is not None and start is None:
                optimizer = jaxlr.with_low_rank_projection(
                    optimizer, ranks=dict(ranks), every=steps, options=jaxlr.ProjectionOptions(
                        filter="conv", energy_transfer=energy,
                        bn_pairs=bn_pairs if bnr else None))
            return train(Task(model, optimizer), data, train_config,
                         variables=None if start is None else dict(start),
                         workdir=results.run_dir(label, settings), label=label,
                         settings=settings).variables

        def score(variables: Mapping[str, Any], model: Any = model,
                  data: data_lib.Dataset = data) -> dict[str, float]:
            return {split: evaluate(model, dict(variables), data, split)["accuracy"]
                    for split in ("validation", "test")}

        dense = fit(None)
        rows.append({"seed": seed, "ratio": None, "method": DENSE, "ranks": "full",
                     **score(dense)})
        for ratio in config.ratios:
            ranks = dict(jaxlr.lsvt_ranks(dense["params"], prune=ratio, filter="conv"))
            text = "/".join(str(r) for r in ranks.values())
            decomposed, _ = truncation.compressed_variables(dense, ranks)
            _check_factored(decomposed["params"], ranks)
            decomposed = truncation.recompute_batch_stats(model, decomposed, data,
                                                          train_config.batch_size)
            rows.append({"seed": seed, "ratio": ratio, "method": TRUNCATED, "ranks": text,
                         **score(decomposed)})
            tuned = fit(ranks, start=decomposed)
            _check_factored(tuned["params"], ranks)
            rows.append({"seed": seed, "ratio": ratio, "method": FINETUNED, "ranks": text,
                         **score(tuned)})
            for method, (energy, bnr) in ABLATION.items():
                projected, _ = truncation.compressed_variables(fit(ranks, energy, bnr), ranks)
                rows.append({"seed": seed, "ratio": ratio, "method": method, "ranks": text,
                             **score(projected)})
    return rows


def lrpet_verdicts(config: Config, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per ratio and claim: test accuracy of the first method above the second's."""
    out = []
    for ratio in config.ratios:
        def values(method: str, ratio: float = ratio) -> list[float]:
            by_seed = {r["seed"]: r["test"] for r in rows
                       if r["ratio"] == ratio and r["method"] == method}
            return [by_seed[s] for s in config.lrpet_seeds]

        for better, worse in LRPET_CLAIMS:
            out.append(_verdict(f"p = {ratio:g}", f"test accuracy: {better} > {worse}",
                                values(better), values(worse), "greater",
                                config.lrpet_margin, config))
    return out


# ------------------------------------------------------------------------------------------------
# Verdicts, tables, figures, report.


def _verdict(where: str, what: str, a: Sequence[float], b: Sequence[float], claim: stats.Claim,
             margin: float, config: Config) -> dict[str, Any]:
    """The verdict row of ``claim`` about ``a`` against ``b`` (one number per seed each)."""
    comparison = stats.compare(a, b, claim, margin=margin, confidence=config.confidence,
                               power=config.power)
    d = comparison.difference
    return {"where": where, "what": what, "claim": claim, "a": float(np.mean(a)),
            "b": float(np.mean(b)), "difference": d.mean, "interval": d.interval(".4f"),
            "margin": margin, "detectable": comparison.detectable,
            "agree": f"{comparison.agree}/{d.n}", "verdict": comparison.verdict}


VERDICT_COLUMNS = [
    Column("where"), Column("what", "endpoint"), Column("a", "first (mean)", ".4f"),
    Column("b", "second (mean)", ".4f"), Column("difference", "mean difference", "+.4f"),
    Column("interval", "95% interval"), Column("margin", "margin", "g"),
    Column("detectable", "detectable effect", ".4f"), Column("agree", "seeds agreeing"),
    Column("verdict")]


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


def digest(numbers: Any) -> str:
    """A short hash of measured numbers (JSON, keys sorted, floats as Python writes them): two
    runs that agree to the last bit have the same digest."""
    text = json.dumps(numbers, sort_keys=True, default=float)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _numbers(out: Mapping[str, Any]) -> dict[str, Any]:
    """Every measured number of a run (what must reproduce), without timings."""
    keep = ("arm", "N", "seed", "at", "weight_decay", "best_epoch", "validation", "test",
            "energy")
    lorita_rows = [{k: v for k, v in r.items() if k in keep or "@" in k}
                   for r in out["lorita"]]
    return {"lorita_tuning": out["lorita_tuning"], "lorita": lorita_rows,
            "lrpet": out["lrpet"]}


def _band(values: Sequence[Sequence[float]], confidence: float) -> tuple[np.ndarray, ...]:
    summaries_ = [stats.summarize(column, confidence) for column in np.asarray(values).T]
    return tuple(np.array([getattr(s, key) for s in summaries_]) for key in ("mean", "low",
                                                                             "high"))


def _lorita_figures(config: Config, runs: Sequence[Mapping[str, Any]], results: Results,
                    data_name: str) -> None:
    drop_panels, spectra_panels = {}, {}
    for name in config.arms:
        lines, spectra = {}, {}
        for index, n in enumerate(config.depths):
            members = [r for r in runs if r["arm"] == name and r["N"] == n and r["at"] == "final"]
            retained = [[x for x, _ in m["curve"]] for m in members]
            mean, low, high = _band([[y for _, y in m["curve"]] for m in members],
                                    config.confidence)
            lines[f"N = {n}"] = {"x": 100 * np.mean(retained, axis=0), "y": 100 * mean,
                                 "low": 100 * low, "high": 100 * high,
                                 "style": {"color": f"C{index}"}}
            for layer, path in enumerate(list(members[0]["spectra"])[:2]):
                mean, low, high = _band([m["spectra"][path] for m in members], config.confidence)
                spectra[f"N = {n}, {path.split('/')[0]}"] = {
                    "x": np.arange(1, len(mean) + 1), "y": mean,
                    "low": np.maximum(low, 1e-8), "high": high,
                    "style": {"color": f"C{index}", "linestyle": ["-", "--"][layer]}}
        drop_panels[f"arm {name}"] = lines
        spectra_panels[f"arm {name}"] = spectra
    seeds = len(config.seeds)
    plots.bands(drop_panels, results.file("accuracy_drop.png"),
                title=f"LoRITa on {data_name}, FCN-{config.fcn_depth}, final epoch: GSVT test "
                      f"accuracy drop, mean and {config.confidence:.0%} interval over {seeds} "
                      "seeds", xlabel="retained singular values (%)",
                ylabel="test accuracy drop (points)", xlog=True)
    plots.bands(spectra_panels, results.file("spectra.png"),
                title=f"Singular values / the largest, first two matrices, final epoch "
                      f"({seeds} seeds, {config.confidence:.0%} interval)",
                xlabel="index", ylabel="singular value / largest", ylog=True)


def _lrpet_figure(config: Config, rows: Sequence[Mapping[str, Any]], results: Results,
                  data_name: str) -> None:
    panels = {}
    for ratio in config.ratios:
        methods: dict[str, list[float]] = {}
        for r in rows:
            if r["ratio"] in (ratio, None) and r["method"] != TRUNCATED:
                methods.setdefault(r["method"], []).append(r["test"])
        panels[f"p = {ratio:g}"] = methods
    plots.intervals(panels, results.file("lrpet.png"), confidence=config.confidence,
                    title=f"LRPET on {data_name}, {config.lrpet_train.epochs} epochs: test "
                          f"accuracy per seed, mean and {config.confidence:.0%} interval",
                    ylabel="test accuracy")


def _worded(verdicts: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per endpoint: its verdict per comparison."""
    by_what: dict[str, dict[str, list[str]]] = {}
    for v in verdicts:
        by_what.setdefault(v["what"], {}).setdefault(v["verdict"], []).append(v["where"])
    return [f"* {what}: " + " ".join(f"**{verdict}** for {'; '.join(wheres)}."
                                      for verdict, wheres in verdicts_.items())
            for what, verdicts_ in by_what.items()]


def _lrpet_resolution(config: Config, verdicts: Sequence[Mapping[str, Any]]) -> str:
    """Which of the paper's ablation gaps this run's seeds can resolve, in words."""
    ablation = [v for v in verdicts if FINETUNED not in v["what"]]
    smallest = min(v["detectable"] for v in ablation)
    low, high = PAPER_GAPS
    if smallest > high:
        return (f"The paper's ablation gaps ({100 * low:g} to {100 * high:g} points, Table XIV) "
                f"are all below the smallest effect these seeds detect ({100 * smallest:.2f} "
                "points): this data cannot resolve any of them; a \"not separable\" there says "
                "the experiment is too small, not that the gap is absent.")
    return (f"The smallest effect these seeds detect is {100 * smallest:.2f} points; the paper's "
            f"ablation gaps are {100 * low:g} to {100 * high:g} points (Table XIV): those below "
            "it cannot be resolved here.")


def _headline(config: Config, out: Mapping[str, Any]) -> list[str]:
    """Per arm, what the primary (final-epoch) verdicts say, and per LRPET ratio the baseline's;
    an endpoint at which both N have lost more than half their accuracy is named as measured on
    the arm's cliff."""
    lines = []
    claims = {e.words: e for e in endpoints(config)}
    for name in config.arms:
        rows = [v for v in out["lorita_verdicts"]
                if v["where"].startswith(f"{name}, final epoch:")]
        smaller = [v for v in rows if claims[v["what"]].claim == "less"]
        held = sum(v["verdict"] == "holds" for v in smaller)
        same = [v["verdict"] for v in rows if claims[v["what"]].claim == "equal"]
        refuted = sum(v["verdict"] == "does not hold" for v in smaller)

        def cliff(verdict: str, smaller: list = smaller) -> str:
            budgets = [float(claims[v["what"]].key.split("@")[1]) for v in smaller
                       if v["verdict"] == verdict and claims[v["what"]].key.startswith("drop@")
                       and min(v["a"], v["b"]) > 0.5]
            return " and ".join(f"{b:.1%}" for b in budgets)

        text = (f"* **{name}** arm, final epoch: N = 3 smaller than N = 1 on {held} of "
                f"{len(smaller)} endpoints (does not hold on {refuted}); the same accuracy "
                f"before truncation: **{', '.join(same)}**.")
        if cliff("not separable"):
            text += (f" At {cliff('not separable')} kept both N have lost more than half their "
                     "test accuracy: those budgets lie past this arm's cliff and cannot separate "
                     "them (the figure shows where it lies).")
        if cliff("does not hold"):
            text += (f" At {cliff('does not hold')} kept both N have lost more than half their "
                     "test accuracy, N = 3 the more: there the drop measures how far past its "
                     "cliff each N is (the figure shows where it lies).")
        lines.append(text)
    for ratio in config.ratios:
        (baseline,) = [v for v in out["lrpet_verdicts"]
                       if v["where"] == f"p = {ratio:g}" and FINETUNED in v["what"]]
        ahead = "LRPET" if baseline["difference"] > 0 else "the baseline"
        lines.append(f"* **LRPET**, p = {ratio:g}, against the dense model decomposed and "
                     f"fine-tuned: {baseline['difference']:+.4f} {baseline['interval']}, "
                     f"{ahead} ahead; \"LRPET > the baseline\" **{baseline['verdict']}**.")
    return lines


def summarize(config: Config, out: Mapping[str, Any]) -> str:
    """The evidence block of docs/evidence.md: the results and every verdict of a run, in
    words computed from its numbers."""
    command = "python -m experiments.evidence"
    lorita_keys = ("test", *(e.key for e in endpoints(config) if e.key != "test"))
    final = [r for r in out["lorita"] if r["at"] == "final"]
    summary = summaries(final, ("arm", "N"), lorita_keys, config.confidence)
    lrpet = summaries(out["lrpet"], ("ratio", "method"), ("test",), config.confidence)
    chosen = [r for r in out["lorita_tuning"] if r["chosen"]]
    decays = "; ".join(f"{r['arm']} N = {r['N']}: {r['weight_decay']:g}"
                       f"{' (at the edge of its grid)' if 'edge' in r['chosen'] else ''}"
                       for r in chosen)
    return "\n".join([
        f"`{command}` on {out['machine']}, {out['seconds'] / 60:.0f} minutes; {out['where']}. "
        f"Numbers digest `{out['digest']}` (the same command on the same machine prints the "
        "same). Each number is the mean ± standard deviation over the verdict seeds, with the "
        f"{config.confidence:.0%} Student-t interval in brackets.",
        "",
        f"**LoRITa**, FCN-{config.fcn_depth} of width {config.width}, "
        f"{config.lorita_train.epochs} epochs of Adam (learning rate {config.learning_rate:g} "
        f"for every N, cosine-decayed), final epoch. Decays chosen on seed "
        f"{config.tuning_seed} by the tuning rule: {decays}.",
        "",
        markdown_table(summary, [Column("arm"), Column("N"), Column("test", "test acc"),
                                 *(Column(k) for k in lorita_keys[1:]), Column("seeds")]),
        "",
        f"**LRPET**, {config.model}, {config.lrpet_train.epochs} epochs of SGD per run (the "
        "baseline: as many again to fine-tune), final epoch, test accuracy:",
        "",
        markdown_table(lrpet, [Column("ratio", "p", "g"), Column("method"),
                               Column("test", "test acc"), Column("seeds")]),
        "",
        "Verdicts (first minus second, paired over the verdict seeds; the rule, the margins and "
        "the detectable effect are the protocol's):",
        "",
        markdown_table(list(out["lorita_verdicts"]) + list(out["lrpet_verdicts"]),
                       VERDICT_COLUMNS),
        "",
        "In short:",
        "",
        *_headline(config, out),
        "",
        "Every verdict in words:",
        "",
        *_worded(out["lorita_verdicts"]),
        *_worded(out["lrpet_verdicts"]),
        "",
        _lrpet_resolution(config, out["lrpet_verdicts"]),
        "",
        "![LoRITa: GSVT test accuracy drop against retained singular values, with 95% bands]"
        "(evidence_accuracy_drop.png)",
        "",
        "![LoRITa: singular values of the first two matrices, with 95% bands]"
        "(evidence_spectra.png)",
        "",
        "![LRPET: test accuracy per seed with 95% intervals](evidence_lrpet.png)",
    ])


def runs_block(config: Config, out: Mapping[str, Any]) -> str:
    """docs/reproducing.md's per-run tables of a run."""
    endpoint_columns = [Column(e.key, e.key, ".4f") for e in endpoints(config)]
    return "\n".join([
        f"`python -m experiments.evidence` on {out['machine']}; {out['where']}.",
        "",
        f"Tuning on seed {config.tuning_seed} (final and best validation accuracy per decay):",
        "",
        markdown_table(out["lorita_tuning"], [
            Column("arm"), Column("N"), Column("weight_decay", "decay", "g"),
            Column("final_validation", "final val acc", ".4f"),
            Column("best_validation", "best val acc", ".4f"),
            Column("best_epoch", "best epoch"), Column("chosen")]),
        "",
        "LoRITa per seed, at the final and the best validation epoch:",
        "",
        markdown_table(out["lorita"], [Column("arm"), Column("N"), Column("seed"), Column("at"),
                                       Column("best_epoch", "best epoch"),
                                       *endpoint_columns]),
        "",
        "LRPET per seed:",
        "",
        markdown_table(out["lrpet"], [
            Column("seed"), Column("ratio", "p", "g"), Column("method"), Column("ranks"),
            Column("validation", "val acc", ".4f"), Column("test", "test acc", ".4f")]),
    ])


def run(config: Config, results: Results, progress: bool = True) -> dict[str, Any]:
    """Runs both parts; returns their rows, verdicts, tables, the numbers' digest and the
    time taken."""
    from experiments import machine

    began = time.perf_counter()
    seeds = sorted({config.tuning_seed, *config.seeds, *config.lrpet_seeds})
    datasets = {seed: presets.load_data(config, seed) for seed in seeds}
    data = datasets[config.seeds[0]]
    sample = data.normalize(data.test.images[:1])
    presets.check_models({**{f"arms={name!r}": ARMS[name].model(config, data.num_classes)
                             for name in config.arms},
                          f"model={config.model!r}": models.create(config.model,
                                                                   data.num_classes)}, sample)
    results.json("config", config)
    where = (f"{data.name}: {len(data.train)} training, {len(data.validation)} validation, "
             f"{len(data.test)} test images per seed; tuning seed {config.tuning_seed}, verdict "
             f"seeds {list(config.seeds)} (LoRITa) and {list(config.lrpet_seeds)} (LRPET)")
    lorita_out = lorita_part(config, datasets, results, progress)
    lrpet_rows = lrpet_part(config, datasets, results, progress)
    out = {"lorita": lorita_out["runs"], "lorita_tuning": lorita_out["tuning"],
           "lrpet": lrpet_rows, "where": where, "machine": machine.describe()}
    out["lorita_verdicts"] = lorita_verdicts(config, out["lorita"])
    out["lrpet_verdicts"] = lrpet_verdicts(config, lrpet_rows)
    numbers = _numbers(out)
    out["digest"] = digest(numbers)
    results.json("numbers", {"digest": out["digest"], **numbers})
    captions = {
        "lorita_tuning": f"LoRITa's decay per arm and N, tuned on seed {config.tuning_seed}.",
        "lorita_runs": "LoRITa per verdict seed, at the final and the best validation epoch.",
        "lorita_verdicts": "LoRITa's claims, N > 1 against N = 1 paired over the verdict seeds.",
        "lrpet_runs": f"LRPET per seed ({config.model}); every model runs its factor pairs.",
        "lrpet_verdicts": "LRPET's claims, paired over the verdict seeds.",
    }
    endpoint_columns = [Column(e.key, e.key, ".4f") for e in endpoints(config)]
    tables = {
        "lorita_tuning": results.table("lorita_tuning", out["lorita_tuning"], [
            Column("arm"), Column("N"), Column("weight_decay", "decay", "g"),
            Column("final_validation", "final val acc", ".4f"),
            Column("best_validation", "best val acc", ".4f"), Column("best_epoch", "best epoch"),
            Column("chosen")], captions["lorita_tuning"]),
        "lorita_runs": results.table("lorita_runs", out["lorita"], [
            Column("arm"), Column("N"), Column("seed"), Column("at"),
            Column("best_epoch", "best epoch"), *endpoint_columns], captions["lorita_runs"]),
        "lorita_verdicts": results.table("lorita_verdicts", out["lorita_verdicts"],
                                         VERDICT_COLUMNS, captions["lorita_verdicts"]),
        "lrpet_runs": results.table("lrpet_runs", lrpet_rows, [
            Column("seed"), Column("ratio", "p", "g"), Column("method"), Column("ranks"),
            Column("validation", "val acc", ".4f"), Column("test", "test acc", ".4f")],
            captions["lrpet_runs"]),
        "lrpet_verdicts": results.table("lrpet_verdicts", out["lrpet_verdicts"],
                                        VERDICT_COLUMNS, captions["lrpet_verdicts"]),
    }
    _lorita_figures(config, out["lorita"], results, data.name)
    _lrpet_figure(config, lrpet_rows, results, data.name)
    out["seconds"] = time.perf_counter() - began
    out["tables"] = tables
    report = [f"# Evidence ({where})", "",
              f"Took {out['seconds'] / 60:.1f} minutes on {out['machine']}; numbers digest "
              f"`{out['digest']}`. The protocol is docs/evidence.md's.", ""]
    for name, text in tables.items():
        report += [f"## {name}", "", captions[name], "", text, ""]
    report += ["![accuracy drop](accuracy_drop.png)", "", "![spectra](spectra.png)", "",
               "![lrpet](lrpet.png)", ""]
    results.file("report.md").write_text("\n".join(report))
    print("\n".join(report))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.evidence [--preset NAME] [--set FIELD=VALUE] ...``."""
    return presets.cli(argv, PRESETS, run, description=__doc__.split("\n")[0],
                       default_output="results/evidence", prog="python -m experiments.evidence")


if __name__ == "__main__":
    main()
