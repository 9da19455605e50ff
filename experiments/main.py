"""The main job: LoRITa and LRPET end to end on the embedded digits data, in a few minutes on a CPU.

``python -m experiments`` runs it with the ``default`` preset (``--preset smoke`` for a run of
seconds; ``--set field=value`` changes one setting; ``--output-dir`` moves the results). Three
parts, every choice made on the validation split and the test split only reported:

1. **LoRITa, N = 1 and N = 3.** An FCN (``fcn_depth`` Dense layers of ``fcn_width``) is trained
   with every kernel a product of N matrices (Adam with coupled L2 decay, the paper's optimizer),
   for each weight decay in ``weight_decays``; per N the run with the best validation accuracy is
   kept (ties: the larger decay).
2. **Truncation.** The kept models' hidden matrices (the classifier is left whole) are truncated
   at each budget by LSVT (every matrix keeps the same fraction) and GSVT (one ranking of all
   singular values); the accepted budget per policy is the smallest whose validation accuracy
   is within ``tolerance`` of the untruncated model's.
3. **LRPET against plain LRP.** A small VGG-style CNN with BatchNorm is trained with SGD, its
   convolutions projected once per epoch to the rank of the unique pruning ratio ``prune``: by
   plain LRP (no energy transfer, no BN rectification) and by LRPET (both, each convolution
   projected through the BatchNorm :func:`jaxlr.find_bn_pairs` finds after it); as a reference, the
   same CNN trained without projection, dense and truncated once after training. Every compressed
   model is evaluated running its factor pairs (:func:`jaxlr.apply`).

Written to the results directory (``results/PRESET`` by default): ``config.json``; tables as
markdown and CSV (``lorita_training``, ``lorita_truncation``, ``lorita_accepted``, ``lrpet``) and
all of them in ``summary.md``; plots ``accuracy_drop.png`` (accuracy drop against retained
singular values), ``singular_values.png`` (their decay per layer, N = 1 and N = 3) and
``lrpet_training.png``; per training run, ``runs/NAME-FINGERPRINT/`` with its ``settings.json``,
``metrics.jsonl`` and orbax checkpoints (the fingerprint covers every setting the run's result
depends on: run again with other settings, the job trains anew instead of reusing runs).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import jax

import jaxlr
from experiments import data as data_lib
from experiments import lorita_study, models, plots, presets, truncation
from experiments.results import Column, Results, run_settings
from experiments.train import Task, TrainConfig, evaluate, step_decay_sgd, train
from jaxlr import lorita

__all__ = ["PRESETS", "Config", "main", "run"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the main job (see the module's documentation).

    Attributes:
      data: the data set (:func:`experiments.data.load`): ``digits`` (embedded), ``idx:DIR``,
        ``mnist``, ...
      data_dir: tensorflow-datasets' data_dir, for tfds data sets.
      seed: seeds the split, initialisation, shuffling (each run's ``seed``).
      depths: LoRITa's N values.
      fcn_depth: Dense layers of the FCN, classifier included.
      fcn_width: units of each hidden layer.
      lorita_train: how each LoRITa run trains (:class:`experiments.train.TrainConfig`: epochs,
        batch size, checkpoints, devices).
      learning_rate: Adam's learning rate.
      weight_decays: coupled L2 decays tried per N (chosen on validation).
      budgets: fractions of singular values kept by LSVT and GSVT.
      tolerance: accepted validation accuracy drop of a truncation (fraction, 0.01 = 1 point).
      cnn: the VGG-style CNN's layers (:class:`experiments.models.VGG` ``config``).
      lrpet_train: how each LRPET run trains (projection once per epoch).
      prune: LRPET's unique pruning ratio p (rank ``max(1, floor(n - n p))``).
      sgd_learning_rate: SGD's learning rate, divided by 10 at 50% and 75% of training.
      sgd_weight_decay: SGD's (coupled) weight decay.
    """

    PER_RUN: ClassVar[dict[str, str]] = {
        f"{part}.{name}": source for part in ("lorita_train", "lrpet_train")
        for name, source in (("seed", "from seed"), ("progress", "from --no-progress"))}

    data: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    depths: tuple[int, ...] = (1, 3)
    fcn_depth: int = 3
    fcn_width: int = 256
    lorita_train: TrainConfig = TrainConfig(epochs=60, batch_size=64, checkpoint_every=10)
    learning_rate: float = 1e-3
    weight_decays: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    budgets: tuple[float, ...] = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
    tolerance: float = 0.01
    cnn: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M")
    lrpet_train: TrainConfig = TrainConfig(epochs=30, batch_size=64, checkpoint_every=10)
    prune: float = 0.8
    sgd_learning_rate: float = 0.05
    sgd_weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        presets.check(self)


# Fields no training run's result depends on (each run has its own N and decay), and those of
# the other part: the fingerprint of a run covers every other field (results.run_settings) and
# its training settings (TrainConfig.run_settings).
_AFTER_TRAINING = ("depths", "weight_decays", "budgets", "tolerance", "lorita_train",
                   "lrpet_train")
_NOT_LORITA = (*_AFTER_TRAINING, "cnn", "prune", "sgd_learning_rate", "sgd_weight_decay")
_NOT_LRPET = (*_AFTER_TRAINING, "fcn_depth", "fcn_width", "learning_rate")

PRESETS = {
    "default": Config(),
    "smoke": Config(lorita_train=TrainConfig(epochs=2, batch_size=64, checkpoint_every=1),
                    weight_decays=(1e-3,), budgets=(0.5, 0.1), fcn_width=32,
                    cnn=(8, "M", 16, "M"),
                    lrpet_train=TrainConfig(epochs=2, batch_size=64, checkpoint_every=1)),
}


def lorita_part(config: Config, data: data_lib.Dataset, results: Results,
                progress: bool) -> dict[str, Any]:
    """Trains the FCNs, sweeps LSVT / GSVT, accepts budgets; returns what the tables hold."""
    model = models.FCN(config.fcn_depth, config.fcn_width, num_classes=data.num_classes)
    hidden = jaxlr.kernel_filter(exclude="head")
    name = f"FCN-{config.fcn_depth}"
    train_config = dataclasses.replace(config.lorita_train, seed=config.seed, progress=progress)
    training, chosen = lorita_study.train_depths(
        name, model, data, depths=config.depths, weight_decays=config.weight_decays,
        optimizer=lambda decay: lorita.coupled_adam(config.learning_rate, decay),
        config=train_config, results=results,
        settings=run_settings(config, exclude=_NOT_LORITA, train=train_config.run_settings()))
    study = lorita_study.study_truncation(name, model, chosen, data, budgets=config.budgets,
                                          filter=hidden, tolerance=config.tolerance)
    tables = {
        "lorita_training": results.table(
            "lorita_training", training, lorita_study.TRAINING_COLUMNS,
            "LoRITa training runs; per N the best validation accuracy is chosen."),
        "lorita_truncation": results.table(
            "lorita_truncation", study["rows"], lorita_study.TRUNCATION_COLUMNS,
            "Accuracy after truncating the hidden layers' singular values."),
        "lorita_accepted": results.table("lorita_accepted", study["accepted"], [
            Column("N"), Column("weight_decay", "weight decay", "g"), Column("policy"),
            Column("retained", "retained SVs", ".1%"),
            Column("params_fraction", "params kept", ".1%"),
            Column("validation", "val acc", ".4f"), Column("test", "test acc", ".4f")],
            f"Fewest retained singular values within {config.tolerance:.0%} of the untruncated "
            "validation accuracy (chosen on validation)."),
    }
    plots.accuracy_drop(study["curves"], results.file("accuracy_drop.png"),
                        title=f"LoRITa on {data.name}: truncation of an FCN",
                        styles=study["styles"])
    plots.singular_value_decay(study["spectra"], results.file("singular_values.png"))
    sweeps = {depth: [r for r in study["rows"] if r["N"] == depth] for depth in chosen}
    return {"tables": tables, "sweeps": sweeps, "accepted": study["accepted"],
            "training": training}


def lrpet_part(config: Config, data: data_lib.Dataset, results: Results,
               progress: bool) -> dict[str, Any]:
    """Trains the CNN without projection, with LRP and with LRPET; compares at the same ranks."""
    model = models.VGG(config=config.cnn, num_classes=data.num_classes)
    train_config = dataclasses.replace(config.lrpet_train, seed=config.seed, progress=progress)
    steps_per_epoch = len(data.train) // train_config.batch_size
    sample = data.normalize(data.test.images[:1])
    shapes = jax.eval_shape(model.init, jax.random.key(0), sample)
    lrp = jaxlr.ProjectionOptions(energy_transfer=False, filter="conv")  # the paper's layers
    lrpet = jaxlr.ProjectionOptions(bn_pairs=jaxlr.find_bn_pairs(model, shapes, sample),
                                    filter="conv")
    variants = {"no projection": None, "LRP": lrp, "LRPET": lrpet}
    rows, histories = [], {}
    for name, options in variants.items():
        optimizer = step_decay_sgd(config.sgd_learning_rate, config.sgd_weight_decay,
                                   train_config.epochs * steps_per_epoch)
        if options is not None:
            optimizer = jaxlr.with_low_rank_projection(
                optimizer, prune=config.prune, every=steps_per_epoch, options=options)
        slug = name.lower().replace(" ", "_")
        settings = run_settings(config, exclude=_NOT_LRPET, train=train_config.run_settings(),
                                variant=name)
        result = train(
            Task(model, optimizer), data, train_config,
            workdir=results.run_dir(slug, settings), label=slug, settings=settings)
        histories[name] = result.history
        variables = result.best
        dense_macs = truncation.forward_macs(model, variables, sample)
        if options is None:
            rows.append({"method": "no projection, dense", "ranks": "full", "params_fraction": 1.0,
                         "macs_fraction": 1.0, "best_epoch": result.best_epoch,
                         **{s: evaluate(model, variables, data, s)["accuracy"]
                            for s in ("validation", "test")}})
            name = "no projection, truncated after training"
        ranks = jaxlr.lsvt_ranks(variables["params"], prune=config.prune, filter="conv")
        compressed, report = truncation.compressed_variables(variables, ranks)
        rows.append({
            "method": name, "ranks": "/".join(str(r) for r in ranks.values()),
            "params_fraction": report.params_after / report.params_before,
            "macs_fraction": truncation.forward_macs(model, compressed, sample) / dense_macs,
            "best_epoch": result.best_epoch,
            **{s: evaluate(model, compressed, data, s)["accuracy"]
               for s in ("validation", "test")}})
    table = results.table("lrpet", rows, [
        Column("method"), Column("ranks", "conv ranks"),
        Column("params_fraction", "params kept", ".1%"),
        Column("macs_fraction", "MACs kept", ".1%"), Column("best_epoch", "best epoch"),
        Column("validation", "val acc", ".4f"), Column("test", "test acc", ".4f")],
        f"VGG-style CNN {list(config.cnn)}, convolutions at p = {config.prune}; compressed models "
        "run as factor pairs.")
    plots.training_curves(histories, results.file("lrpet_training.png"))
    return {"tables": {"lrpet": table}, "rows": rows}


def run(config: Config, results: Results, progress: bool = True) -> dict[str, Any]:
    """Runs the main job; returns its tables (markdown), rows, seconds and split sizes."""
    began = time.perf_counter()
    data = presets.load_data(config)
    sample = data.normalize(data.test.images[:1])
    presets.check_models({
        f"fcn_depth={config.fcn_depth}, fcn_width={config.fcn_width}": models.FCN(
            config.fcn_depth, config.fcn_width, num_classes=data.num_classes),
        f"cnn={config.cnn}": models.VGG(config=config.cnn, num_classes=data.num_classes)},
        sample)
    results.json("config", config)
    print(f"{data.name}: {len(data.train)} train / {len(data.validation)} validation / "
          f"{len(data.test)} test images of shape {data.image_shape}; results in {results.path}")
    lorita_out = lorita_part(config, data, results, progress)
    lrpet_out = lrpet_part(config, data, results, progress)
    tables = {**lorita_out["tables"], **lrpet_out["tables"]}
    seconds = time.perf_counter() - began
    summary = [f"# Main job on {data.name} ({seconds:.0f} s, {jax.devices()[0].platform})", ""]
    for name, table in tables.items():
        caption = results.file(f"{name}.md").read_text().split("\n\n")[0]
        summary += [f"## {name}", "", caption, "", table, ""]
    results.file("summary.md").write_text("\n".join(summary))
    print("\n".join(summary))
    return {"tables": tables, "lorita": lorita_out, "lrpet": lrpet_out, "seconds": seconds,
            "examples": {"train": len(data.train), "validation": len(data.validation),
                         "test": len(data.test)}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m experiments [--preset NAME] [--set FIELD=VALUE] [--output-dir DIR]``."""
    return presets.cli(argv, PRESETS, run, description=__doc__.split("\n")[0],
                       prog="python -m experiments")


if __name__ == "__main__":
    main()
