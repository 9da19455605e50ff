"""LoRITa, vision transformers: Tables 1 and 2 (ViT rows), Figures 5 and 6 of the paper.

ViTs trained with each kernel a product of N matrices (Adam with coupled L2 decay, the decay chosen
per N on the validation split): ViT-L8-H{1,4,8} without augmentation (Table 1, Figure 5) and
ViT-L{4,8,16}-H8 with random crops and flips (Table 2, Figure 6). The matrices of the transformer
blocks are truncated by LSVT and by GSVT with attention (query, key, value, out) and MLP matrices
in separate pools, as the paper does; the patch embedding and the classifier are kept whole.

Presets:

* ``smoke``: seconds; the tests run it.
* ``default``: the embedded digits (2 x 2 patches of the 8 x 8 images), width 64: ViT-L4-H{1,4}
  without and ViT-L{2,4}-H4 with augmentation (one-pixel crops, no flips for digits), N in {1, 3};
  minutes on a CPU. *Not* the paper's setting.
* ``paper``: CIFAR-10 (``python -m experiments.data prepare cifar10`` first), 4 x 4 patches, the
  paper's models, N in {1, 2, 3}. The paper's width, MLP size and learning rate were lost from our
  copy: width 256, MLP 512, Adam 1e-3, 200 epochs are our choices. Hours on one GPU.

Outputs (``results/lorita_vit/PRESET``): ``table1`` (without augmentation) and ``table2`` (with),
test accuracy per model and N as in the paper; ``training``, ``truncation``, ``accepted``;
``accuracy_drop_{model}.png`` and ``singular_values_{model}.png``. Run::

    python -m experiments.lorita_vit [--preset smoke|default|paper] [--set field=value]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jaxlr
from experiments import data as data_lib
from experiments import lorita_study, models, presets
from experiments.results import Results, run_settings, value_range
from experiments.train import TrainConfig
from jaxlr import lorita

__all__ = ["PRESETS", "Config", "main", "run", "summarize"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (see the module's documentation).

    Attributes:
      data: the data set (:func:`experiments.data.load`).
      data_dir: tensorflow-datasets' data_dir.
      seed: seeds split, initialisation, shuffling and dropout (each run's ``seed``).
      without_augmentation: model names (:func:`experiments.models.create`) for Table 1.
      with_augmentation: model names for Table 2.
      model_options: options added to every model name (width, patch size).
      pad: the random crop's zero padding (Table 2 runs' ``augmentation``).
      flip: random horizontal flips (Table 2 runs' ``augmentation``).
      depths: LoRITa's N values.
      weight_decays: coupled L2 decays tried per N.
      learning_rate: Adam's learning rate.
      train: how each run trains (:class:`experiments.train.TrainConfig`: epochs, batch size,
        checkpoints, devices).
      budgets: fractions of singular values kept.
      tolerance: accepted validation accuracy drop of a truncation.
    """

    PER_RUN: ClassVar[dict[str, str]] = {"train.seed": "from seed",
                                         "train.augmentation": "from pad and flip",
                                         "train.progress": "from --no-progress"}

    data: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    without_augmentation: tuple[str, ...] = ("vit-l4-h1", "vit-l4-h4")
    with_augmentation: tuple[str, ...] = ("vit-l2-h4", "vit-l4-h4")
    model_options: str = "dim=64,mlp_dim=128,patch=2"
    pad: int = 1
    flip: bool = False
    depths: tuple[int, ...] = (1, 3)
    weight_decays: tuple[float, ...] = (1e-4,)
    learning_rate: float = 1e-3
    train: TrainConfig = TrainConfig(epochs=30, batch_size=64, checkpoint_every=10)
    budgets: tuple[float, ...] = (0.5, 0.3, 0.2, 0.1, 0.05)
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        presets.check(self)
        for field in ("without_augmentation", "with_augmentation"):
            for name in getattr(self, field):
                try:
                    models.create(f"{name}:{self.model_options}")
                except ValueError as error:
                    raise presets.SettingsError(
                        f"{field}: {name!r} with model_options={self.model_options!r} is not a "
                        f"model: {error}") from None


PRESETS = {
    "default": Config(),
    "smoke": Config(without_augmentation=("vit-l1-h2",), with_augmentation=("vit-l1-h2",),
                    model_options="dim=16,mlp_dim=16,patch=4", depths=(2,),
                    train=TrainConfig(epochs=1, batch_size=64, checkpoint_every=1),
                    budgets=(0.5,)),
    "paper": Config(data="cifar10", without_augmentation=("vit-l8-h1", "vit-l8-h4", "vit-l8-h8"),
                    with_augmentation=("vit-l4-h8", "vit-l8-h8", "vit-l16-h8"),
                    model_options="dim=256,mlp_dim=512,patch=4", pad=4, flip=True,
                    depths=(1, 2, 3), weight_decays=(1e-5, 1e-4, 1e-3),
                    train=TrainConfig(epochs=200, batch_size=128, checkpoint_every=10),
                    budgets=(0.5, 0.3, 0.2, 0.1, 0.05, 0.02)),
}


def run(config: Config, results: Results, progress: bool = True) -> dict[str, Any]:
    """Runs the experiment; returns its tables (markdown) and rows."""
    data = presets.load_data(config)
    presets.check_models(
        {f"{field}: {name}": models.create(f"{name}:{config.model_options}", data.num_classes)
         for field in ("without_augmentation", "with_augmentation")
         for name in getattr(config, field)}, data.normalize(data.test.images[:1]))
    results.json("config", config)
    train_config = dataclasses.replace(config.train, seed=config.seed, progress=progress)
    augmentation = data_lib.Augmentation(config.pad, config.flip)
    groups = {"table1": [(name, None) for name in config.without_augmentation],
              "table2": [(f"{name}+aug", augmentation) for name in config.with_augmentation]}
    note = lorita_study.preset_note(data, ["cifar10"])
    captions = {"table1": "Table 1 (ViTs, no augmentation)",
                "table2": "Table 2 (ViTs, crop and flip augmentation)"}
    tables: dict[str, str] = {}
    everything: dict[str, list[dict[str, Any]]] = {"training": [], "truncation": [],
                                                   "accepted": []}
    for table, group in groups.items():
        entries = [(name, models.create(f"{name.removesuffix('+aug')}:{config.model_options}",
                                        data.num_classes), aug) for name, aug in group]
        # Runs without augmentation do not depend on its settings.
        unused = ("pad", "flip") if table == "table1" else ()
        settings = run_settings(config, exclude=(
            "without_augmentation", "with_augmentation", "depths", "weight_decays", "budgets",
            "tolerance", "train", *unused), train=train_config.run_settings())
        out = lorita_study.run_models(
            entries, data, results, depths=config.depths, weight_decays=config.weight_decays,
            optimizer=lambda decay: lorita.coupled_adam(config.learning_rate, decay),
            config=train_config, settings=settings, budgets=config.budgets,
            filter=jaxlr.kernel_filter(include=r"^block"), pools="kind",
            tolerance=config.tolerance)
        for key in everything:
            everything[key] += out[key]
        tables[table] = results.table(
            table, lorita_study.by_depth_rows(out["training"]),
            lorita_study.by_depth_columns(config.depths),
            f"{captions[table]}: test accuracy of the model chosen on validation, per N.{note}")
    tables.update(lorita_study.write_tables(results, everything, note, config.tolerance))
    for name, table in tables.items():
        print(f"\n{name}\n{table}")
    return {"tables": tables, **everything}


def summarize(config: Config, out: dict[str, Any]) -> str:
    """What a run shows, in words computed from its results (docs/reproducing.md's findings).

    Args:
      config: the run's settings.
      out: what :func:`run` returned.

    Returns:
      One sentence: the chosen models' test accuracies and for how many ViTs the largest N is
      below the smallest.
    """
    chosen = [r for r in out["training"] if r["chosen"]]
    low, high = min(config.depths), max(config.depths)
    by_model: dict[str, dict[int, float]] = {}
    for r in chosen:
        by_model.setdefault(r["model"], {})[r["N"]] = r["test"]
    below = sum(tests[high] < tests[low] for tests in by_model.values())
    return (f"{len(by_model)} small ViTs ({', '.join(by_model)}), N = "
            f"{' and '.join(map(str, config.depths))}, {config.train.epochs} epochs: chosen "
            f"models' test accuracy {value_range([r['test'] for r in chosen])}; N = {high} below "
            f"N = {low} for {below} of {len(by_model)}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.lorita_vit [--preset NAME] [--set FIELD=VALUE] ...``."""
    return presets.cli(argv, PRESETS, run, description=__doc__.split("\n")[0],
                       default_output="results/lorita_vit", prog="python -m experiments.lorita_vit")


if __name__ == "__main__":
    main()
