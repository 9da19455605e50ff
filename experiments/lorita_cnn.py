"""LoRITa, convolutional networks: Table 2 (CNN rows), Figures 2 right and 4, Tables 3 and 4.

Part 1 (Table 2, Figures 2 right and 4): CNNs trained with each kernel a product of N matrices by
SGD (momentum 0.9, coupled decay, label smoothing 0.1, crops and flips: the released runs'
settings), the decay chosen per N on the validation split; then LSVT and GSVT truncation of the
convolutions, with convolution and dense matrices in separate GSVT pools and each matrix's values
divided by its largest (the released code's normalisation of the convolution pool; the
classifier, the only dense layer, is kept whole).

Part 2 (Tables 3 and 4): the chosen N = ``compress_depth`` models of ``compress_models`` are
truncated by GSVT to the largest budget whose factored forward pass saves at least each target
fraction of the multiply-accumulates, then fine-tuned on one training batch (one SGD step on the
factor pairs, BatchNorm statistics updated); accuracy before and after, MACs and parameters and
their drops are reported. The paper's exact FLOP targets were not available to us: ``flop_drops``
are our choices, set them to the paper's to compare.

Presets:

* ``smoke``: seconds; the tests run it.
* ``default``: the embedded digits, a small VGG-style network and ResNet-8, N in {1, 3}; minutes on
  a CPU. *Not* the paper's setting.
* ``paper``: VGG-13 and ResNet-18 on CIFAR-10 and CIFAR-100 (run with ``--set data=cifar100``
  for the second), ResNet-20 and VGG-16 compressed; 300 epochs with the learning rate divided by
  10 at 50% and 75% (the paper lowered it on plateaus). Hours per model on one GPU.

Run::

    python -m experiments.lorita_cnn [--preset smoke|default|paper] [--set field=value]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

import jaxlr
from experiments import data as data_lib
from experiments import lorita_study, models, presets, truncation
from experiments.results import Column, Results, run_settings, value_range
from experiments.train import TrainConfig, cross_entropy, evaluate, step_decay_sgd

__all__ = ["PRESETS", "Config", "compress_to_macs", "main", "run", "summarize"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (see the module's documentation).

    Attributes:
      data: the data set (:func:`experiments.data.load`).
      data_dir: tensorflow-datasets' data_dir.
      seed: seeds split, initialisation and shuffling (each run's ``seed``).
      models: model names (:func:`experiments.models.create`) of Table 2.
      compress_models: model names compressed for Tables 3 and 4.
      compress_depth: the N whose chosen model is compressed.
      flop_drops: target fractions of MACs saved.
      depths: LoRITa's N values.
      weight_decays: coupled L2 decays tried per N.
      learning_rate: SGD's learning rate, divided by 10 at 50% and 75% of training.
      label_smoothing: of the loss.
      train: how each run trains (:class:`experiments.train.TrainConfig`: epochs, batch size,
        checkpoints, devices).
      pad: the random crop's zero padding (each run's ``augmentation``).
      flip: random horizontal flips (each run's ``augmentation``).
      budgets: fractions of singular values kept in the sweeps.
      tolerance: accepted validation accuracy drop of a truncation.
    """

    PER_RUN: ClassVar[dict[str, str]] = {"train.seed": "from seed",
                                         "train.augmentation": "from pad and flip",
                                         "train.progress": "from --no-progress"}

    data: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    models: tuple[str, ...] = ("vgg:config=32/32/M/64/64/M", "resnet8")
    compress_models: tuple[str, ...] = ("resnet8", "vgg:config=32/32/M/64/64/M")
    compress_depth: int = 3
    flop_drops: tuple[float, ...] = (0.5, 0.7)
    depths: tuple[int, ...] = (1, 3)
    weight_decays: tuple[float, ...] = (1e-3,)
    learning_rate: float = 0.05
    label_smoothing: float = 0.1
    train: TrainConfig = TrainConfig(epochs=20, batch_size=64, checkpoint_every=10)
    pad: int = 1
    flip: bool = False
    budgets: tuple[float, ...] = (0.5, 0.3, 0.2, 0.1, 0.05)
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        presets.check(self)


PRESETS = {
    "default": Config(),
    "smoke": Config(models=("vgg:config=4/M/8/M",), compress_models=("vgg:config=4/M/8/M",),
                    compress_depth=2, flop_drops=(0.5,), depths=(2,),
                    train=TrainConfig(epochs=1, batch_size=64, checkpoint_every=1),
                    budgets=(0.5,)),
    "paper": Config(data="cifar10", models=("vgg13", "resnet18"),
                    compress_models=("resnet20", "vgg16"), flop_drops=(0.5, 0.6, 0.7),
                    depths=(1, 2, 3), weight_decays=(1e-3,), learning_rate=0.01,
                    train=TrainConfig(epochs=300, batch_size=128, checkpoint_every=10),
                    pad=4, flip=True,
                    budgets=(0.5, 0.3, 0.2, 0.1, 0.05, 0.02)),
}


def compress_to_macs(
    model: Any,
    variables: dict[str, Any],
    sample: jax.Array,
    drop: float,
    filter: jaxlr.matrices.Filter,  # noqa: A002
) -> tuple[dict[str, Any], jaxlr.Ranks, int, int]:
    """The largest max-normalised GSVT budget whose factor pairs save ``drop`` of the MACs
    (:func:`jaxlr.target_ranks`). Returns ``(compressed variables, ranks, MACs, parameters)``."""
    rest = {k: v for k, v in variables.items() if k != "params"}
    cost = jaxlr.forward_cost(lambda p, x: model.apply({"params": p, **rest}, x, train=False),
                              variables["params"], sample, xla=False)
    ranks = jaxlr.target_ranks(variables["params"], reduction=drop, cost=cost, normalize="max",
                               filter=filter)
    out, report = truncation.compressed_variables(variables, ranks)
    return out, ranks, truncation.forward_macs(model, out, sample), report.params_after


def fine_tune_one_batch(model: Any, variables: dict[str, Any], images: jax.Array,
                        labels: jax.Array, learning_rate: float,
                        label_smoothing: float) -> dict[str, Any]:
    """One SGD step on the factor pairs (and other parameters) with one training batch; the
    BatchNorm statistics are updated in training mode."""

    def loss(params: Any) -> tuple[jax.Array, Any]:
        logits, mutated = jaxlr.apply(model, {**variables, "params": params}, images,
                                        train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels, label_smoothing).mean(), mutated

    grads, mutated = jax.grad(loss, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - learning_rate * g, variables["params"], grads)
    return {**variables, "params": params, **mutated}


def run(config: Config, results: Results, progress: bool = True) -> dict[str, Any]:
    """Runs both parts; returns their tables (markdown) and rows."""
    data = presets.load_data(config)
    names = list(dict.fromkeys(config.models + config.compress_models))
    built = {name: models.create(name, data.num_classes) for name in names}
    presets.check_models({f"model {name!r}": model for name, model in built.items()},
                         data.normalize(data.test.images[:1]))
    results.json("config", config)
    note = lorita_study.preset_note(data, ["cifar10", "cifar100"])
    train_config = dataclasses.replace(config.train, seed=config.seed, progress=progress)
    steps = train_config.epochs * (len(data.train) // train_config.batch_size)

    def optimizer(decay: float) -> optax.GradientTransformation:
        return step_decay_sgd(config.learning_rate, decay, steps,
                              mask=jaxlr.lorita.weight_decay_mask)

    augmentation = data_lib.Augmentation(config.pad, config.flip)
    convs = jaxlr.kernel_filter(exclude=r"^head")
    out = lorita_study.run_models(
        [(name, built[name], augmentation) for name in names], data, results,
        depths=tuple(sorted(set(config.depths) | {config.compress_depth})),
        weight_decays=config.weight_decays, optimizer=optimizer, config=train_config,
        settings=run_settings(config, exclude=(
            "models", "compress_models", "compress_depth", "flop_drops", "depths",
            "weight_decays", "budgets", "tolerance", "train"),
            train=train_config.run_settings()),
        budgets=config.budgets, filter=convs, pools="kind", normalize="max",
        tolerance=config.tolerance, label_smoothing=config.label_smoothing)
    table2 = [r for r in lorita_study.by_depth_rows(out["training"]) if r["model"] in
              config.models]
    tables = {"table2": results.table(
        "table2", table2, lorita_study.by_depth_columns(config.depths),
        f"Table 2 (CNNs on {data.name}): test accuracy of the model chosen on validation, "
        f"per N.{note}")}
    tables.update(lorita_study.write_tables(results, out, note, config.tolerance))

    sample = jnp.asarray(data.normalize(data.test.images[:1]))
    images, labels = next(data_lib.batches(data.train, train_config.batch_size,
                                           seed=config.seed, epoch=0, augmentation=augmentation))
    compressed = []
    for name in config.compress_models:
        chosen = next(r for r in out["training"] if r["model"] == name and r["chosen"]
                      and r["N"] == config.compress_depth)
        model, variables = built[name], chosen["variables"]
        dense_macs = truncation.forward_macs(model, variables, sample)
        dense_params = models.param_count(variables["params"])
        for drop in config.flop_drops:
            small, ranks, macs, params = compress_to_macs(model, variables, sample, drop, convs)
            budget = sum(ranks.values()) / sum(ranks.full.values())
            tuned = fine_tune_one_batch(model, small, data.normalize(images), labels,
                                        config.learning_rate, config.label_smoothing)
            accuracy = {key: evaluate(model, v, data, "test")["accuracy"]
                        for key, v in (("dense", variables), ("truncated", small),
                                       ("tuned", tuned))}
            compressed.append({
                "model": name, "N": config.compress_depth, "target": drop, "budget": budget,
                "dense": accuracy["dense"], "truncated": accuracy["truncated"],
                "tuned": accuracy["tuned"], "accuracy_drop": accuracy["dense"] - accuracy["tuned"],
                "macs": macs, "macs_drop": 1 - macs / dense_macs, "params": params,
                "params_drop": 1 - params / dense_params})
    tables["table3_4"] = results.table("table3_4", compressed, [
        Column("model"), Column("N"), Column("target", "FLOPs target", ".0%"),
        Column("budget", "GSVT budget", ".3f"), Column("dense", "acc before", ".4f"),
        Column("truncated", "acc truncated", ".4f"), Column("tuned", "acc after 1 batch", ".4f"),
        Column("accuracy_drop", "acc drop", ".4f"), Column("macs", "MACs"),
        Column("macs_drop", "FLOPs drop", ".1%"), Column("params"),
        Column("params_drop", "params drop", ".1%")],
        f"Tables 3 and 4: compressed to a FLOP drop, fine-tuned on one batch (test accuracy; "
        f"MACs per image).{note}")
    for name, table in tables.items():
        print(f"\n{name}\n{table}")
    return {"tables": tables, "compressed": compressed, **out}


def summarize(config: Config, out: dict[str, Any]) -> str:
    """What a run shows, in words computed from its results (docs/reproducing.md's findings).

    Args:
      config: the run's settings.
      out: what :func:`run` returned.

    Returns:
      One sentence: the chosen models' test accuracies and, at the smallest MAC target, each
      compressed model's accuracy after one fine-tuning batch.
    """
    target = min(config.flop_drops)
    parts = [f"{r['model']} keeps {r['tuned']:.3f} ({r['dense']:.3f} dense, "
             f"{r['macs_drop']:.1%} fewer MACs)" for r in out["compressed"]
             if r["target"] == target]
    table2 = [r for r in out["training"] if r["chosen"] and r["model"] in config.models]
    return (f"{', '.join(config.models)}, N = {' and '.join(map(str, config.depths))}: "
            f"chosen models' test accuracy {value_range([r['test'] for r in table2])}; "
            f"Tables 3 and 4 at a {target:.0%} MAC target (ranks from "
            f"`jaxlr.target_ranks`), after one fine-tuning batch: {'; '.join(parts)}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.lorita_cnn [--preset NAME] [--set FIELD=VALUE] ...``."""
    return presets.cli(argv, PRESETS, run, description=__doc__.split("\n")[0],
                       default_output="results/lorita_cnn", prog="python -m experiments.lorita_cnn")


if __name__ == "__main__":
    main()
