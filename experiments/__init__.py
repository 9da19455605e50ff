"""Runnable experiments built on jaxlr: the main job, the shared pieces, benchmarks.

Run modules from the root of the checkout: ``python -m experiments`` (the main job,
:mod:`experiments.main`), ``python -m experiments.data prepare cifar10``,
``python -m experiments.benchmarks.svd_projection``.

* :mod:`experiments.data`: data sets (embedded digits, tensorflow-datasets, IDX files), splits,
  augmentation, batches.
* :mod:`experiments.models`: the papers' Linen models.
* :mod:`experiments.train`: the one training loop, with orbax checkpoints and metrics.
* :mod:`experiments.truncation`: LSVT / GSVT sweeps and their acceptance on validation.
* :mod:`experiments.lorita_study`: the steps every LoRITa experiment takes.
* :mod:`experiments.results`, :mod:`experiments.plots`, :mod:`experiments.presets`: tables,
  figures, presets and the shared command line.
* :mod:`experiments.stats`: mean, spread, Student-t intervals and paired verdicts over seeds.
* :mod:`experiments.evidence`: the papers' central claims on real MNIST over seeds, with a
  verdict each (``smoke`` / ``default`` / ``full`` presets; the README's evidence section).
* :mod:`experiments.figures`: regenerates every figure of the README and docs from the current
  code (``python -m experiments.figures``).
* The papers' tables: :mod:`experiments.lorita_fcn`, :mod:`experiments.lorita_vit`,
  :mod:`experiments.lorita_cnn`, :mod:`experiments.lrpet_cifar`, :mod:`experiments.rank_search`
  (``smoke`` / ``default`` / ``paper`` presets; docs/reproducing.md).
"""
