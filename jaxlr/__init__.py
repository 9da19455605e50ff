"""jaxlr: training compact low-rank networks in JAX and Flax, and compressing them after training.

The public API, re-exported from the modules that define it:

* :mod:`jaxlr.matrices`: how kernel leaves are seen as matrices (Flax and PyTorch/Equinox layouts),
  filters, and the keys of paths.
* :mod:`jaxlr.nodes`: the two kernel representations, LoRITa's ``Product`` and the factor pair
  ``LowRank``, and their collapse back to dense kernels (``jaxlr.collapse`` for NNX modules too).
* :mod:`jaxlr.selection`: which leaves of a tree are selected as matrices, and of which kind.
* :mod:`jaxlr.svd`: jitted singular values, rank-``r`` projection and truncated factors.
* :mod:`jaxlr.policies`: rank policies (fixed, LSVT / LRPET ratio, GSVT, energy, cost targets).
* :mod:`jaxlr.lorita`: LoRITa's factorization of trees and NNX modules, weight-decay helpers.
* :mod:`jaxlr.projection`: LRPET's low-rank projection as an optax transformation or wrapper.
* :mod:`jaxlr.batchnorm`: which BatchNorm follows which kernel, by tracing the model.
* :mod:`jaxlr.compression`: after training: factor pairs where they save, and a report.
* :mod:`jaxlr.inference`: unchanged Linen and NNX models run on factor pairs.
* :mod:`jaxlr.train_state`: a Linen ``TrainState`` that forwards ``batch_stats`` to the optimizer.
* :mod:`jaxlr.cost`: parameters and multiply-accumulates of a forward pass, per layer.
* :mod:`jaxlr.latency`: measured layer times, dense and factored; ranks that run faster.
* :mod:`jaxlr.export`: orbax checkpoints of trees with factor pairs and products.
* :mod:`jaxlr.threads`: LAPACK threads of the CPU decompositions.
"""

from jaxlr import (
    batchnorm,
    compression,
    cost,
    export,
    inference,
    latency,
    lorita,
    matrices,
    nodes,
    policies,
    projection,
    selection,
    sharding,
    svd,
    threads,
    train_state,
)
from jaxlr._nnx import collapse
from jaxlr.batchnorm import bn_pairs_by_name, find_bn_pairs
from jaxlr.compression import CompressionReport, CompressionResult, compress
from jaxlr.cost import ForwardCost, LayerCost, forward_cost
from jaxlr.inference import apply, nnx_model
from jaxlr.latency import LatencyTable, measure_latency
from jaxlr.lorita import factorize
from jaxlr.matrices import MatrixView, is_kernel, kernel_filter
from jaxlr.nodes import LowRank, Product
from jaxlr.policies import (
    Ranks,
    energy_ranks,
    fixed_ranks,
    gsvt_ranks,
    lsvt_ranks,
    retained_fraction,
    target_ranks,
)
from jaxlr.projection import (
    LowRankProjectionState,
    ProjectionOptions,
    low_rank_projection,
    project,
    with_low_rank_projection,
)
from jaxlr.selection import kernel_kinds, matrix_leaves
from jaxlr.svd import project_matrix, singular_values, singular_values_tree, truncated_factors
from jaxlr.threads import lapack_threads
from jaxlr.train_state import TrainState

__version__ = "0.2.0"

__all__ = [
    "CompressionResult",
    "CompressionReport",
    "ForwardCost",
    "LatencyTable",
    "LayerCost",
    "LowRank",
    "LowRankProjectionState",
    "MatrixView",
    "Product",
    "ProjectionOptions",
    "Ranks",
    "TrainState",
    "apply",
    "batchnorm",
    "bn_pairs_by_name",
    "collapse",
    "compress",
    "compression",
    "cost",
    "energy_ranks",
    "export",
    "factorize",
    "find_bn_pairs",
    "fixed_ranks",
    "forward_cost",
    "gsvt_ranks",
    "inference",
    "is_kernel",
    "kernel_filter",
    "kernel_kinds",
    "lapack_threads",
    "latency",
    "lorita",
    "low_rank_projection",
    "lsvt_ranks",
    "matrices",
    "matrix_leaves",
    "measure_latency",
    "nnx_model",
    "nodes",
    "project",
    "project_matrix",
    "projection",
    "selection",
    "sharding",
    "policies",
    "retained_fraction",
    "singular_values",
    "singular_values_tree",
    "svd",
    "target_ranks",
    "threads",
    "train_state",
    "truncated_factors",
    "with_low_rank_projection",
]
