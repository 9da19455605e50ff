"""Data-aware truncation against plain SVD truncation, on models trained on real MNIST.

Each model is trained once per seed; then each trained model is cut to ``reductions`` of its
parameters (:func:`jaxlr.target_ranks`, GSVT or LSVT) in two ways, from the same trained weights:

* ``plain``: each matrix's largest singular values (both papers' truncation);
* ``data-aware``: the matrices whitened by the second moment of their inputs, measured on
  ``calibration_examples`` images of the *training* split (:func:`jaxlr.calibrate`,
  :mod:`jaxlr.whitening`): the rank-r cut nearest each layer's outputs. GSVT then ranks the
  whitened values, whose squares are what each cut costs each layer's output.

Test accuracy is measured at every point; nothing is fine-tuned, and BatchNorm keeps its
statistics. The models (the classifier is never cut):

* ``fcn``: FCN-10 of width 256 without BatchNorm, trained with every kernel a product of N
  factors (LoRITa, N in ``fcn_depths``), Adam at ``fcn_learning_rate`` (cosine to 0) with coupled
  decay ``fcn_weight_decays`` (one per N: the decays :mod:`experiments.evidence` chose for its
  ``jaxlr`` arm on its tuning seed, by one rule for both N); GSVT over one pool of raw values;
* ``cnn``: a VGG-style network with BatchNorm after every convolution; GSVT with convolution and
  dense matrices in separate pools, each matrix's values divided by its largest (the LoRITa
  release's CNN setting, for both methods);
* ``vit``: a small vision transformer (7 x 7 patches: 16 tokens); GSVT pools by kind.

The question users ask is answered by the FCN rows: does data-aware truncation of an N = 1 model
match LoRITa N = 3 with plain truncation, and what do both together give? docs/data_aware.md
holds the protocol, written before the run, and the results.

Presets:

* ``smoke``: seconds, on the embedded digits; the tests run it.
* ``default``: real MNIST (``../shared/data/mnist``), five seeds; under 30 minutes on a 2-core CPU.

Run::

    python -m experiments.data_aware [--preset smoke|default] [--set field=value]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlr
from experiments import data as data_lib
from experiments import models, plots, presets, stats
from experiments.results import Column, Results, markdown_table
from experiments.train import TrainConfig, evaluate, lorita_task, train
from jaxlr import lorita

__all__ = ["FAMILIES", "METHODS", "POLICIES", "PRESETS", "Config", "main", "measure", "run",
           "summarize"]

METHODS = ("plain", "data-aware")
POLICIES = ("LSVT", "GSVT")
FAMILIES = ("fcn", "cnn", "vit")
# GSVT's pools and normalisation per family, the same for both methods.
GSVT_OPTIONS = {"fcn": {"pools": None, "normalize": "none"},
                "cnn": {"pools": "kind", "normalize": "max"},
                "vit": {"pools": "kind", "normalize": "none"}}


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (see the module's documentation).

    Attributes:
      data: the data set (:func:`experiments.data.load`); each seed re-splits it.
      data_dir: tensorflow-datasets' data_dir.
      seeds: one trained model per seed and model.
      fcn_model: the FCN (:func:`experiments.models.create`).
      fcn_depths: LoRITa's N values of the FCN.
      fcn_weight_decays: the FCN's coupled decay, one per ``fcn_depths``.
      fcn_learning_rate: the FCN's Adam learning rate (cosine-decayed to 0).
      fcn_train: how each FCN trains (the seed is each run's).
      cnn_model: the CNN with BatchNorm.
      vit_model: the vision transformer.
      learning_rate: Adam's learning rate of the CNN and the ViT (cosine-decayed to 0).
      weight_decay: their coupled decay.
      train: how the CNN and the ViT train.
      reductions: the fractions of the parameters cut.
      calibration_examples: training images the calibration reads.
      calibration_batch_size: images per calibration batch.
      damping: the whitening's damping (:mod:`jaxlr.whitening`).
      accuracy_margin: the equivalence margin of "matches" (0.01 is a point).
      confidence: of every interval.
    """

    PER_RUN: ClassVar[dict[str, str]] = {
        f"{part}.{name}": source for part in ("fcn_train", "train")
        for name, source in (("seed", "from seeds"), ("progress", "from --no-progress"))}

    data: str = "idx:../shared/data/mnist"
    data_dir: str | None = None
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    fcn_model: str = "fcn10:width=256"
    fcn_depths: tuple[int, ...] = (1, 3)
    fcn_weight_decays: tuple[float, ...] = (3e-3, 1e-3)
    fcn_learning_rate: float = 3e-4
    fcn_train: TrainConfig = TrainConfig(epochs=100, batch_size=128, checkpoint_every=50)
    cnn_model: str = "vgg:config=32/M/64/M/64/M"
    vit_model: str = "vit-l2-h4:dim=64,mlp_dim=128,patch=7"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    train: TrainConfig = TrainConfig(epochs=20, batch_size=128, checkpoint_every=20)
    reductions: tuple[float, ...] = (0.3, 0.5, 0.7)
    calibration_examples: int = 512
    calibration_batch_size: int = 128
    damping: float = 0.01
    accuracy_margin: float = 0.01
    confidence: float = 0.95

    def __post_init__(self) -> None:
        presets.check(self)
        if len(self.fcn_weight_decays) != len(self.fcn_depths):
            raise presets.SettingsError(
                f"fcn_weight_decays {self.fcn_weight_decays!r} needs one decay per N of "
                f"fcn_depths {self.fcn_depths!r}.")


PRESETS = {
    "default": Config(),
    "smoke": Config(data="digits", seeds=(0, 1), fcn_model="fcn3:width=16", fcn_depths=(1, 2),
                    fcn_weight_decays=(1e-4, 1e-4), fcn_learning_rate=1e-3,
                    fcn_train=TrainConfig(epochs=1, batch_size=64, checkpoint_every=1),
                    cnn_model="vgg:config=4/M/8/M", vit_model="vit-l1-h2:dim=8,mlp_dim=8,patch=4",
                    train=TrainConfig(epochs=1, batch_size=64, checkpoint_every=1),
                    reductions=(0.3,), calibration_examples=64, calibration_batch_size=32),
}


def _fits(config: Config) -> list[tuple[str, str, int, float, float, TrainConfig]]:
    """``(family, model, N, learning rate, decay, training)`` of every trained model."""
    out = [("fcn", config.fcn_model, n, config.fcn_learning_rate, decay, config.fcn_train)
           for n, decay in zip(config.fcn_depths, config.fcn_weight_decays, strict=True)]
    out += [(family, spec, 1, config.learning_rate, config.weight_decay, config.train)
            for family, spec in (("cnn", config.cnn_model), ("vit", config.vit_model))]
    return out


def fit(family: str, spec: str, n: int, learning_rate: float, decay: float,
        train_config: TrainConfig, data: data_lib.Dataset, seed: int, results: Results,
        progress: bool) -> tuple[Any, dict[str, Any]]:
    """Trains one model (a finished run under ``results`` is found again); returns the model and
    its final dense variables."""
    model = models.create(spec, data.num_classes)
    train_config = dataclasses.replace(train_config, seed=seed, progress=progress)
    steps = train_config.epochs * (len(data.train) // train_config.batch_size)
    settings = {"part": "data_aware", "family": family, "model": spec, "data": data.name,
                "N": n, "learning_rate": learning_rate, "schedule": "cosine",
                "weight_decay": decay, **train_config.run_settings()}
    label = f"{family}_N{n}_seed{seed}"
    optimizer = lorita.coupled_adam(optax.cosine_decay_schedule(learning_rate, steps), decay)
    result = train(lorita_task(model, optimizer, n), data, train_config,
                   workdir=results.run_dir(label, settings), label=label, settings=settings)
    return model, jaxlr.collapse(result.variables)


def calibration_batches(config: Config, data: data_lib.Dataset) -> list[jax.Array]:
    """The first ``calibration_examples`` training images, normalised, in batches."""
    images = data.normalize(data.train.images[:config.calibration_examples])
    size = config.calibration_batch_size
    return [jnp.asarray(images[i:i + size]) for i in range(0, len(images), size)]


def measure(config: Config, family: str, model: Any, variables: dict[str, Any],
            data: data_lib.Dataset) -> list[dict[str, Any]]:
    """Test accuracy of one trained model, whole and at every reduction, policy and method.

    Rows ``{method, policy, reduction, kept, params, test, seconds}`` (``kept``: the fraction of
    the selected matrices' singular values kept; ``seconds``: the calibration's time for the
    data-aware rows). A reduction no budget reaches gives ``test`` None.
    """
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    rows = [{"method": "none", "policy": "none", "reduction": 0.0, "kept": 1.0,
             "params": models.param_count(params),
             "test": evaluate(model, variables, data, "test")["accuracy"], "seconds": 0.0}]
    start = time.perf_counter()
    calibration = jaxlr.calibrate(model, calibration_batches(config, data), variables=variables,
                                  damping=config.damping)
    seconds = time.perf_counter() - start
    options = GSVT_OPTIONS[family]
    for method in METHODS:
        sweep = jaxlr.sweep(params, calibration=calibration if method == "data-aware" else None)
        for policy in POLICIES:
            for reduction in config.reductions:
                try:
                    ranks = jaxlr.target_ranks(
                        params, reduction=reduction, policy=policy.lower(),
                        spectra=sweep.spectra, **(options if policy == "GSVT" else {}))
                except ValueError:  # no budget of this policy cuts that much
                    rows.append({"method": method, "policy": policy, "reduction": reduction,
                                 "kept": None, "params": None, "test": None,
                                 "seconds": seconds if method == "data-aware" else 0.0})
                    continue
                truncated = {"params": sweep.truncate(ranks), **rest}
                report = sweep.compress(ranks).report
                rows.append({
                    "method": method, "policy": policy, "reduction": reduction,
                    "kept": jaxlr.policies.retained_fraction(ranks),
                    "params": report.params_after,
                    "test": evaluate(model, truncated, data, "test")["accuracy"],
                    "seconds": seconds if method == "data-aware" else 0.0})
    return rows


def run(config: Config, results: Results, progress: bool = True) -> dict[str, Any]:
    """Trains every model on every seed, measures each; returns the rows, the comparisons and
    the report (markdown)."""
    results.json("config", config)
    rows = []
    for seed in config.seeds:
        data = presets.load_data(config, seed)
        for family, spec, n, learning_rate, decay, train_config in _fits(config):
            model, variables = fit(family, spec, n, learning_rate, decay, train_config, data,
                                   seed, results, progress)
            for row in measure(config, family, model, variables, data):
                rows.append({"family": family, "model": spec, "N": n, "seed": seed, **row})
    results.json("rows", rows)
    out = {"rows": rows, "comparisons": comparisons(config, rows), "digest": digest(rows)}
    out["report"] = summarize(config, out)
    _plot(config, rows, results)
    (results.path / "report.md").write_text(out["report"] + "\n")
    return out


def digest(rows: Sequence[Mapping[str, Any]]) -> str:
    """A short hash of every measured number but the times (the same command on the same
    machine gives the same)."""
    numbers = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:16]


def _values(rows: Sequence[Mapping[str, Any]], seeds: Sequence[int], **match: Any
            ) -> list[float] | None:
    """The test accuracies of the rows matching ``match``, one per seed in order; None if a seed
    has none."""
    found = {r["seed"]: r["test"] for r in rows
             if all(r[k] == v for k, v in match.items()) and r["test"] is not None}
    return [found[s] for s in seeds] if all(s in found for s in seeds) else None


def comparisons(config: Config, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paired comparisons (by seed) of the protocol: data-aware against plain for every
    model, policy and reduction; and, for the FCN, N = 1 data-aware against N = 3 plain, and N = 3
    data-aware against N = 1 data-aware."""
    seeds = list(config.seeds)
    deepest = max(config.fcn_depths)
    out = []
    for family, _, n, *_ in _fits(config):
        for policy in POLICIES:
            for reduction in config.reductions:
                where = {"family": family, "N": n, "policy": policy, "reduction": reduction}
                pairs = [(f"{family} N={n}: data-aware vs plain",
                          {**where, "method": "data-aware"}, {**where, "method": "plain"},
                          "greater")]
                if family == "fcn" and n == 1 and deepest > 1:
                    other = {**where, "N": deepest}
                    pairs += [(f"fcn: N=1 data-aware vs N={deepest} plain",
                               {**where, "method": "data-aware"}, {**other, "method": "plain"},
                               "equal"),
                              (f"fcn: N={deepest} data-aware vs N=1 data-aware",
                               {**other, "method": "data-aware"},
                               {**where, "method": "data-aware"}, "greater")]
                for name, a_where, b_where, claim in pairs:
                    a, b = _values(rows, seeds, **a_where), _values(rows, seeds, **b_where)
                    if a is None or b is None:
                        continue
                    c = stats.compare(a, b, claim, margin=config.accuracy_margin,
                                      confidence=config.confidence)
                    out.append({"comparison": name, "policy": policy, "reduction": reduction,
                                "a": float(np.mean(a)), "b": float(np.mean(b)),
                                "difference": c.difference.mean,
                                "interval": c.difference.interval(".3f"), "claim": claim,
                                "verdict": c.verdict, "agree": f"{c.agree}/{len(seeds)}",
                                "detectable": c.detectable})
    return out


def _cell(values: list[float] | None) -> str:
    if values is None:
        return "unreachable"
    return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def summarize(config: Config, out: Mapping[str, Any]) -> str:
    """The report: the accuracy table (mean and range over seeds) and the comparisons."""
    rows, seeds = out["rows"], list(config.seeds)
    table = []
    for family, _, n, *_ in _fits(config):
        whole = _values(rows, seeds, family=family, N=n, method="none")
        for policy in POLICIES:
            line = {"model": f"{family} N={n}" if family == "fcn" else family,
                    "policy": policy, "whole": _cell(whole)}
            for reduction in config.reductions:
                for method in METHODS:
                    line[f"{method}@{reduction:g}"] = _cell(_values(
                        rows, seeds, family=family, N=n, method=method, policy=policy,
                        reduction=reduction))
            table.append(line)
    columns = [Column("model"), Column("policy"), Column("whole", "untruncated")]
    columns += [Column(f"{m}@{r:g}", f"{m} {r:.0%}") for r in config.reductions for m in METHODS]
    compared = [{**c, "a": f"{c['a']:.3f}", "b": f"{c['b']:.3f}",
                 "difference": f"{c['difference']:+.3f} {c['interval']}",
                 "detectable": f"{c['detectable']:.3f}"}
                for c in out["comparisons"]]
    calibration = [r["seconds"] for r in rows if r["method"] == "data-aware" and r["seconds"]]
    return "\n".join([
        "In short (over both policies and every cut; differences in points of test accuracy; a "
        "\"greater\" that does not hold is one whose interval excludes a gain of "
        f"{100 * config.accuracy_margin:g} point):",
        "",
        *_in_short(config, out["comparisons"]),
        "",
        f"Test accuracy (mean and range over seeds {', '.join(map(str, seeds))}) of each model "
        f"cut to {', '.join(f'{r:.0%}' for r in config.reductions)} fewer parameters, from the "
        f"same trained weights, on {config.data}; calibration on {config.calibration_examples} "
        f"training images (damping {config.damping:g}; {np.median(calibration):.2f} s median "
        f"per model). Numbers digest `{digest(rows)}` (the same command on the same machine "
        "gives the same).",
        "",
        markdown_table(table, columns),
        "",
        f"Paired by seed: the mean difference a - b with its {config.confidence:.0%} interval, "
        f"decided by the protocol's rule (margin {config.accuracy_margin:g}); \"detectable\": "
        "the smallest true difference these seeds detect with 80% power.",
        "",
        markdown_table(compared, [Column("comparison"), Column("policy"),
                                  Column("reduction", "cut", ".0%"), Column("a"), Column("b"),
                                  Column("difference", "a - b"), Column("claim"),
                                  Column("verdict"), Column("agree", "seeds agreeing"),
                                  Column("detectable")]),
    ])


def _in_short(config: Config, compared: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per comparison kind: its range of differences and how many verdicts hold."""
    lines = []
    for name in dict.fromkeys(c["comparison"] for c in compared):
        group = [c for c in compared if c["comparison"] == name]
        low, high = (100 * f(c["difference"] for c in group) for f in (min, max))
        verdicts = [c["verdict"] for c in group]
        claim = group[0]["claim"]
        what = ("equal within " + f"{100 * config.accuracy_margin:g} point" if claim == "equal"
                else "greater")
        counts = ", ".join(f"{verdict} in {verdicts.count(verdict)}"
                           for verdict in stats.VERDICTS if verdict in verdicts)
        lines.append(f"* **{name}** ({what}): {low:+.1f} to {high:+.1f}; {counts} of "
                     f"{len(group)}.")
    return lines


def _plot(config: Config, rows: Sequence[Mapping[str, Any]], results: Results) -> None:
    """Test accuracy against the parameters cut, per model: plain and data-aware GSVT, the
    FCN's N in one panel."""
    seeds = list(config.seeds)
    panels: dict[str, dict[str, dict[str, Any]]] = {}
    for family, _, n, *_ in _fits(config):
        panel = panels.setdefault(family.upper(), {})
        for method, dash in (("plain", "--"), ("data-aware", "-")):
            x, y, low, high = [], [], [], []
            for reduction in config.reductions:
                values = _values(rows, seeds, family=family, N=n, method=method,
                                 policy="GSVT", reduction=reduction)
                if values is None:
                    continue
                x.append(reduction)
                y.append(float(np.mean(values)))
                low.append(min(values))
                high.append(max(values))
            if x:
                label = f"N={n} {method}" if family == "fcn" else method
                panel[label] = {"x": x, "y": y, "low": low, "high": high,
                                "style": {"linestyle": dash}}
    plots.bands(panels, results.file("data_aware.png"),
                title=f"GSVT on {config.data}: plain and data-aware truncation "
                      "(mean, range over seeds)",
                xlabel="fraction of the parameters cut", ylabel="test accuracy")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.data_aware [--preset NAME] [--set FIELD=VALUE] ...``."""
    return presets.cli(argv, PRESETS, run, description=__doc__.split("\n")[0],
                       default_output="results/data_aware", prog="python -m experiments.data_aware")


if __name__ == "__main__":
    main()
