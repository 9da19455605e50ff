"""LoRITa, fully-connected networks: Table 1 (FCN rows), Figure 2 left and Figure 3 of the paper.

FCN-L (L Dense layers) trained with each kernel a product of N in {1, 2, 3} matrices by Adam with
coupled L2 decay (the paper's optimizer), the decay chosen per N on the validation split; then
every hidden matrix truncated by LSVT and GSVT (one pool; the classifier is kept whole).

Presets:

* ``smoke``: seconds; the tests run it.
* ``default``: the embedded digits, FCN-4 and FCN-6 of width 128, N in {1, 3}, 40 epochs; a few
  minutes on a CPU. *Not* the paper's setting: its numbers say how the code behaves, not what the
  paper found.
* ``paper``: MNIST (``python -m experiments.data prepare mnist`` first), FCN-6/8/10, N in
  {1, 2, 3}, decays {1e-5, 1e-4, 1e-3}. The paper's hidden width and learning rate were lost from
  our copy: width 500 and Adam 1e-3 are our choices. Minutes per run on a GPU.

Outputs (``results/lorita_fcn/PRESET``): ``table1.md/csv`` (test accuracy per model and N, the
paper's layout), ``training``, ``truncation`` and ``accepted`` tables,
``accuracy_drop_{model}.png`` (Figure 2 left: test accuracy drop against retained singular values,
LSVT and GSVT), ``singular_values_{model}.png`` (Figure 3: singular value decay of the first two
layers per N), ``config.json``, per run metrics and checkpoints. Run::

    python -m experiments.lorita_fcn [--preset smoke|default|paper] [--set field=value]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jaxlr
from experiments import lorita_study, models, presets
from experiments.results import Results, run_settings
from experiments.train import TrainConfig
from jaxlr import lorita

__all__ = ["PRESETS", "SUMMARY_BUDGET", "Config", "main", "run", "summarize"]

SUMMARY_BUDGET = 0.1
"""The GSVT budget :func:`summarize` reports (that of :data:`experiments.figures.POLICY_BUDGET`)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (see the module's documentation).

    Attributes:
      data: the data set (:func:`experiments.data.load`).
      data_dir: tensorflow-datasets' data_dir.
      seed: seeds split, initialisation and shuffling (each run's ``seed``).
      fcn_depths: the L of each FCN-L.
      width: hidden units per layer.
      depths: LoRITa's N values.
      weight_decays: coupled L2 decays tried per N.
      learning_rate: Adam's learning rate.
      train: how each run trains (:class:`experiments.train.TrainConfig`: epochs, batch size,
        checkpoints, devices).
      budgets: fractions of singular values kept.
      tolerance: accepted validation accuracy drop of a truncation.
    """

    PER_RUN: ClassVar[dict[str, str]] = {"train.seed": "from seed",
                                         "train.progress": "from --no-progress"}

    data: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    fcn_depths: tuple[int, ...] = (4, 6)
    width: int = 128
    depths: tuple[int, ...] = (1, 3)
    weight_decays: tuple[float, ...] = (1e-3, 3e-3)
    learning_rate: float = 1e-3
    train: TrainConfig = TrainConfig(epochs=40, batch_size=64, checkpoint_every=10)
    budgets: tuple[float, ...] = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        presets.check(self)


PRESETS = {
    "default": Config(),
    "smoke": Config(fcn_depths=(3,), width=16, depths=(1, 2), weight_decays=(1e-3,),
                    train=TrainConfig(epochs=1, batch_size=64, checkpoint_every=1),
                    budgets=(0.5, 0.1)),
    "paper": Config(data="mnist", fcn_depths=(6, 8, 10), width=500, depths=(1, 2, 3),
                    weight_decays=(1e-5, 1e-4, 1e-3),
                    train=TrainConfig(epochs=100, batch_size=128, checkpoint_every=10),
                    budgets=(0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01)),
}


def run(config: Config, results: Results, progress: bool = True) -> dict[str, Any]:
    """Runs the experiment; returns its tables (markdown) and rows."""
    data = presets.load_data(config)
    entries = [(f"FCN-{depth}", models.FCN(depth, config.width, num_classes=data.num_classes),
                None) for depth in config.fcn_depths]
    presets.check_models({f"fcn_depths={depth}": model for depth, (_, model, _) in
                          zip(config.fcn_depths, entries, strict=True)},
                         data.normalize(data.test.images[:1]))
    results.json("config", config)
    train_config = dataclasses.replace(config.train, seed=config.seed, progress=progress)
    out = lorita_study.run_models(
        entries, data, results, depths=config.depths, weight_decays=config.weight_decays,
        optimizer=lambda decay: lorita.coupled_adam(config.learning_rate, decay),
        config=train_config,
        settings=run_settings(config, exclude=("fcn_depths", "depths", "weight_decays",
                                               "budgets", "tolerance", "train"),
                              train=train_config.run_settings()),
        budgets=config.budgets, filter=jaxlr.kernel_filter(exclude="head"),
        tolerance=config.tolerance)
    note = lorita_study.preset_note(data, ["mnist"])
    tables = {
        "table1": results.table(
            "table1", lorita_study.by_depth_rows(out["training"]),
            lorita_study.by_depth_columns(config.depths),
            f"Table 1 (FCNs): test accuracy of the model chosen on validation, per N.{note}"),
        **lorita_study.write_tables(results, out, note, config.tolerance),
    }
    for name, table in tables.items():
        print(f"\n{name}\n{table}")
    return {"tables": tables, **out}


def summarize(config: Config, out: dict[str, Any]) -> str:
    """What a run shows, in words computed from its results (docs/reproducing.md's findings).

    Args:
      config: the run's settings.
      out: what :func:`run` returned.

    Returns:
      One sentence: the deepest FCN's GSVT test accuracy at :data:`SUMMARY_BUDGET` (else the
      smallest budget) and its accepted budgets, for the smallest and largest N.
    """
    model = f"FCN-{config.fcn_depths[-1]}"
    low, high = min(config.depths), max(config.depths)
    budget = SUMMARY_BUDGET if SUMMARY_BUDGET in config.budgets else min(config.budgets)

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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.lorita_fcn [--preset NAME] [--set FIELD=VALUE] ...``."""
    return presets.cli(argv, PRESETS, run, description=__doc__.split("\n")[0],
                       default_output="results/lorita_fcn", prog="python -m experiments.lorita_fcn")


if __name__ == "__main__":
    main()
