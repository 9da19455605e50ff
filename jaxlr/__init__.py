"""jaxlr: training compact low-rank neural networks in JAX and Flax, and compressing them after.

The names below are the library's front door, one way to do each thing; everything else lives in
its module (``jaxlr.svd.singular_values``, ``jaxlr.policies.fixed_ranks``, ...):

* LoRITa: :func:`factorize` kernels into products of matrices, :func:`collapse` them back
  (:mod:`jaxlr.lorita`: weight decay, placement, pre-trained starts).
* LRPET: :func:`low_rank_projection` (an optax transformation), :func:`with_low_rank_projection`
  (an optimizer with it), :func:`project` (once), configured by :class:`ProjectionOptions`
  (:mod:`jaxlr.projection`).
* After training: :func:`compress` to factor pairs (:class:`LowRank`), with ranks from a policy:
  :func:`lsvt_ranks`, :func:`gsvt_ranks`, :func:`energy_ranks`, :func:`target_ranks`
  (:class:`Ranks`; :mod:`jaxlr.policies`); :func:`sweep` decomposes once for many budgets.
* Data-aware: :func:`calibrate` measures each kernel's inputs on real batches; ``compress``,
  the policies and ``sweep`` take its result as ``calibration=`` and cut what costs the layers'
  outputs least (:mod:`jaxlr.whitening`).
* Which layers: every entry point makes the same default selection, every kernel but the model's
  output layer (:mod:`jaxlr.selection`); :func:`kernel_filter`, :func:`find_layers` (from the
  model's dataflow) and :func:`find_bn_pairs` (BN rectification) say otherwise; a
  :class:`MatrixView` says how a kernel is a matrix.
* Running and training: :func:`apply` runs a Linen model on factor pairs (NNX and Equinox
  modules come back runnable), :class:`TrainState` for Linen; :func:`forward_cost` and
  :func:`measure_latency` say what a compression saves; :mod:`jaxlr.export` checkpoints.
"""

from jaxlr import (
    batchnorm,
    calibration,
    compression,
    cost,
    dataflow,
    export,
    inference,
    latency,
    lorita,
    matrices,
    nodes,
    options,
    policies,
    projection,
    selection,
    sharding,
    svd,
    sweeps,
    threads,
    train_state,
    whitening,
)
from jaxlr._nnx import collapse
from jaxlr.batchnorm import find_bn_pairs
from jaxlr.calibration import calibrate
from jaxlr.compression import compress
from jaxlr.cost import forward_cost
from jaxlr.dataflow import find_layers
from jaxlr.inference import apply
from jaxlr.latency import measure_latency
from jaxlr.lorita import factorize
from jaxlr.matrices import MatrixView, kernel_filter
from jaxlr.nodes import LowRank, Product
from jaxlr.options import ProjectionOptions
from jaxlr.policies import Ranks, energy_ranks, gsvt_ranks, lsvt_ranks, target_ranks
from jaxlr.projection import low_rank_projection, project, with_low_rank_projection
from jaxlr.sweeps import sweep
from jaxlr.train_state import TrainState

__version__ = "1.0.0"

__all__ = [
    "LowRank",
    "MatrixView",
    "Product",
    "ProjectionOptions",
    "Ranks",
    "TrainState",
    "apply",
    "calibrate",
    "collapse",
    "compress",
    "energy_ranks",
    "factorize",
    "find_bn_pairs",
    "find_layers",
    "forward_cost",
    "gsvt_ranks",
    "kernel_filter",
    "low_rank_projection",
    "lsvt_ranks",
    "measure_latency",
    "project",
    "sweep",
    "target_ranks",
    "with_low_rank_projection",
]
