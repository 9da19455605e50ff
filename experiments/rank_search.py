"""Rank search (LRPET-S): per-layer pruning ratios by Bayesian optimisation.

A baseline is trained once. Each trial takes one pruning ratio per convolution from the optimiser,
fine-tunes the baseline for ``trial_epochs`` with LRPET at those per-layer ranks, runs the
compressed model factored on the *validation* split and scores it with
``error + lam * MACs_compressed / MACs_full``; the optimiser (the ``bayesian-optimization``
package: a Gaussian process with expected improvement) proposes the next ratios from the scores so
far. The first ``random_trials`` are drawn at random. The best trial's ranks are written to
``ranks.json``, which :mod:`experiments.lrpet_cifar` takes as ``--set ranks_file=...``.

Presets:

* ``smoke``: seconds; the tests run it.
* ``default``: the embedded digits, ResNet-8, 20 trials of 2 epochs; minutes on a CPU. *Not* the
  paper's setting.
* ``paper``: CIFAR-10, ResNet-56, 20 trials (the paper's number), lambda = 1, 10 epochs per trial
  from the baseline (our choice). Hours on one GPU.

Outputs (``results/rank_search/PRESET``): ``ranks.json``, ``trials.md/csv`` (per trial: score,
validation error, MACs ratio, mean ratio), ``search.png`` (score per trial and the best so far),
``config.json``. Run::

    python -m experiments.rank_search [--preset smoke|default|paper] [--set field=value]
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
import optax

import jaxlr
from experiments import lorita_study, models, plots, presets, truncation
from experiments.results import Column, Results, run_settings
from experiments.train import Task, TrainConfig, evaluate, train

__all__ = ["PRESETS", "Config", "main", "run", "summarize"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (see the module's documentation).

    Attributes:
      data: the data set (:func:`experiments.data.load`).
      data_dir: tensorflow-datasets' data_dir.
      seed: seeds split, training (each run's ``seed``) and the optimiser.
      model: the model name (:func:`experiments.models.create`).
      trials: scored trials in all.
      random_trials: the first trials, drawn at random.
      lam: the weight of the MACs ratio in the score.
      min_prune: the lower bound of every pruning ratio.
      max_prune: the upper bound of every pruning ratio (< 1).
      baseline_train: how the baseline trains (:class:`experiments.train.TrainConfig`: epochs,
        batch size, checkpoints, devices).
      trial_train: how each trial fine-tunes (no checkpoints: a trial is not saved).
      learning_rate: SGD's learning rate (the trials use a tenth of it).
      weight_decay: coupled weight decay.
    """

    PER_RUN: ClassVar[dict[str, str]] = {
        "baseline_train.seed": "from seed", "baseline_train.progress": "from --no-progress",
        "trial_train.seed": "from seed", "trial_train.progress": "off: one line per trial"}

    data: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    model: str = "resnet8"
    trials: int = 20
    random_trials: int = 5
    lam: float = 1.0
    min_prune: float = 0.0
    max_prune: float = 0.9
    baseline_train: TrainConfig = TrainConfig(epochs=15, batch_size=64)
    trial_train: TrainConfig = TrainConfig(epochs=2, batch_size=64)
    learning_rate: float = 0.05
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        presets.check(self)
        if not self.min_prune < self.max_prune:
            raise presets.SettingsError(
                f"min_prune must be below max_prune, got min_prune={self.min_prune}, "
                f"max_prune={self.max_prune}.")
        if self.random_trials > self.trials:
            raise presets.SettingsError(f"random_trials must be in [1, trials={self.trials}], "
                                        f"got {self.random_trials}.")


PRESETS = {
    "default": Config(),
    "smoke": Config(model="vgg:config=4/M/8/M", trials=3, random_trials=2,
                    baseline_train=TrainConfig(epochs=1, batch_size=64),
                    trial_train=TrainConfig(epochs=1, batch_size=64)),
    "paper": Config(data="cifar10", model="resnet56",
                    baseline_train=TrainConfig(epochs=200, batch_size=128),
                    trial_train=TrainConfig(epochs=10, batch_size=128), learning_rate=0.1),
}


def _sgd(config: Config, learning_rate: float) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(learning_rate, momentum=0.9))


def run(config: Config, results: Results, progress: bool = True) -> dict[str, Any]:
    """Runs the search; returns the best ranks, the trials and the table (markdown)."""
    from bayes_opt import BayesianOptimization, acquisition

    data = presets.load_data(config)
    model = models.create(config.model, data.num_classes)
    presets.check_models({f"model={config.model!r}": model},
                         data.normalize(data.test.images[:1]))
    results.json("config", config)
    baseline_config = dataclasses.replace(config.baseline_train, seed=config.seed,
                                          progress=progress)
    trial_config = dataclasses.replace(config.trial_train, seed=config.seed, progress=False)
    steps_per_epoch = len(data.train) // trial_config.batch_size
    slug = lorita_study.slug(config.model)
    # The baseline does not depend on the search's settings.
    settings = run_settings(config, exclude=("trials", "random_trials", "lam", "min_prune",
                                             "max_prune", "baseline_train", "trial_train"),
                            train=baseline_config.run_settings())
    baseline = train(Task(model, _sgd(config, config.learning_rate)), data, baseline_config,
                     workdir=results.run_dir(f"{slug}_baseline", settings), label="baseline",
                     settings=settings)
    sample = jnp.asarray(data.normalize(data.test.images[:1]))
    dense_macs = truncation.forward_macs(model, baseline.best, sample)
    leaves = jaxlr.selection.matrix_leaves(baseline.best["params"], filter="conv")
    full = {name: leaf.full_rank for name, leaf in sorted(leaves.items(),
                                                           key=lambda kv: kv[1].index)}
    # bayes_opt takes parameter names as keyword-like keys: index the layers.
    keys = {f"layer{i:03d}": name for i, name in enumerate(full)}
    optimizer = BayesianOptimization(
        f=None, pbounds={k: (config.min_prune, config.max_prune) for k in keys},
        acquisition_function=acquisition.ExpectedImprovement(xi=0.01),
        random_state=config.seed, verbose=0, allow_duplicate_points=True)

    # The random trials are drawn from the seed (bayes_opt's random_sample draws from a fresh,
    # unseeded generator unless given one): the same settings give the same search.
    sampler = np.random.RandomState(config.seed)
    trials = []
    for trial in range(config.trials):
        if trial < config.random_trials:
            point = optimizer.space.array_to_params(
                optimizer.space.random_sample(random_state=sampler))
        else:
            point = optimizer.suggest()
        ratios = {keys[k]: float(v) for k, v in point.items()}
        ranks = {name: jaxlr.policies.local_rank(n, prune=ratios[name])
                 for name, n in full.items()}
        sgd = jaxlr.with_low_rank_projection(_sgd(config, config.learning_rate / 10),
                                             ranks=ranks, every=steps_per_epoch)
        tuned = train(Task(model, sgd), data, trial_config, variables=baseline.best,
                      label=f"trial {trial}")
        compressed, _ = truncation.compressed_variables(tuned.variables, ranks)
        error = 1 - evaluate(model, compressed, data, "validation")["accuracy"]
        macs = truncation.forward_macs(model, compressed, sample) / dense_macs
        score = error + config.lam * macs
        optimizer.register(params=point, target=-score)
        trials.append({"trial": trial, "kind": "random" if trial < config.random_trials
                       else "GP-EI", "score": score, "validation_error": error,
                       "macs_ratio": macs, "mean_ratio": sum(ratios.values()) / len(ratios),
                       "ranks": ranks})
        if progress:
            print(f"trial {trial}: score {score:.4f} (error {error:.4f}, MACs {macs:.1%})")
    best = min(trials, key=lambda t: t["score"])
    results.file("ranks.json").write_text(json.dumps(best["ranks"], indent=2) + "\n")
    table = results.table("trials", trials, [
        Column("trial"), Column("kind"), Column("score", "score", ".4f"),
        Column("validation_error", "val error", ".4f"), Column("macs_ratio", "MACs ratio", ".1%"),
        Column("mean_ratio", "mean p", ".3f")],
        f"Rank search on {data.name}, {config.model}: score = validation error + {config.lam:g} x "
        f"MACs ratio; the best trial ({best['trial']}) is in ranks.json."
        f"{lorita_study.preset_note(data, ['cifar10'])}")
    best_so_far = [min(t["score"] for t in trials[:i + 1]) for i in range(len(trials))]
    plots.training_curves(
        {"score": [{"epoch": t["trial"], "score": t["score"]} for t in trials],
         "best so far": [{"epoch": i, "score": s} for i, s in enumerate(best_so_far)]},
        results.file("search.png"), key="score")
    print(table)
    return {"ranks": best["ranks"], "trials": trials, "full_ranks": full, "table": table}


def summarize(config: Config, out: dict[str, Any]) -> str:
    """What a search shows, in words computed from its results (docs/reproducing.md's
    findings).

    Args:
      config: the search's settings.
      out: what :func:`run` returned.

    Returns:
      One sentence: the best trial's score, error and MACs; the Gaussian process's best against
      the best random trial where it ran.
    """
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.rank_search [--preset NAME] [--set FIELD=VALUE] ...``."""
    return presets.cli(argv, PRESETS, run, description=__doc__.split("\n")[0],
                       default_output="results/rank_search",
                       prog="python -m experiments.rank_search")


if __name__ == "__main__":
    main()
