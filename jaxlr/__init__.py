"""jaxlr: training compact low-rank networks in JAX and Flax, and compressing them after training.

The public API, re-exported from the modules that define it:

* :mod:`jaxlr.matrices`: how kernel leaves are seen as matrices, and which leaves are selected.
* :mod:`jaxlr.svd`: jitted singular values, rank-``r`` projection (with energy transfer) and
  truncated factors, for one matrix or every selected matrix of a tree.
* :mod:`jaxlr.ranks`: rank policies (fixed, LRPET ratio, energy, LSVT, GSVT) and the retained
  singular values metric.
* :mod:`jaxlr.lorita`: LoRITa's factorize / collapse transforms and weight-decay helpers.
* :mod:`jaxlr.projection`: LRPET's periodic low-rank projection as an optax transformation.
* :mod:`jaxlr.compress`: after training: the truncated tree, its factor pairs and a report (the
  package exports its function, ``jaxlr.compress``; import its types from the module).
* :mod:`jaxlr.lowrank`: compressed inference: unchanged Linen and NNX models run on factor pairs.
* :mod:`jaxlr.cost`: parameters and multiply-accumulates of a forward pass, per layer, and XLA's
  count.
* :mod:`jaxlr.export`: save and load compressed trees (factor pairs) with orbax-checkpoint.
"""

from jaxlr import cost, export, lorita, lowrank, matrices, projection, ranks, svd
from jaxlr.compress import Compression, CompressionReport, compress
from jaxlr.cost import ForwardCost, LayerCost, forward_cost
from jaxlr.lorita import (
    Factored,
    collapse,
    coupled_adam,
    factorize,
    from_dense,
    weight_decay_mask,
)
from jaxlr.lowrank import LowRank, lowrank_params
from jaxlr.matrices import (
    MatrixView,
    default_view,
    is_kernel,
    kernel_filter,
    kernel_kinds,
    matrix_leaves,
)
from jaxlr.projection import LowRankProjectionState, low_rank_projection, project_params
from jaxlr.ranks import (
    Ranks,
    energy_ranks,
    fixed_ranks,
    gsvt_ranks,
    lsvt_ranks,
    ratio_ranks,
    retained_fraction,
)
from jaxlr.svd import (
    Factorization,
    Projection,
    project_matrix,
    project_tree,
    singular_values,
    singular_values_tree,
    truncated_factors,
    truncated_factors_tree,
)

__version__ = "0.1.0"

__all__ = [
    "Compression",
    "CompressionReport",
    "Factored",
    "Factorization",
    "ForwardCost",
    "LayerCost",
    "LowRank",
    "LowRankProjectionState",
    "MatrixView",
    "Projection",
    "Ranks",
    "collapse",
    "compress",
    "cost",
    "coupled_adam",
    "default_view",
    "energy_ranks",
    "export",
    "factorize",
    "fixed_ranks",
    "forward_cost",
    "from_dense",
    "gsvt_ranks",
    "is_kernel",
    "kernel_filter",
    "kernel_kinds",
    "lorita",
    "low_rank_projection",
    "lowrank",
    "lowrank_params",
    "lsvt_ranks",
    "matrices",
    "matrix_leaves",
    "project_matrix",
    "project_params",
    "project_tree",
    "projection",
    "ranks",
    "ratio_ranks",
    "retained_fraction",
    "singular_values",
    "singular_values_tree",
    "svd",
    "truncated_factors",
    "truncated_factors_tree",
    "weight_decay_mask",
]
