"""After training: truncate a tree, export its factor pairs, and report what was saved.

:func:`compress` takes a trained tree (LoRITa-factorized trees are collapsed first) and ranks from
any policy of :mod:`jaxlr.ranks`, decomposes every ranked matrix once, and returns

* ``params``: the structure-preserving truncated tree (same shapes, usable with the unchanged
  model);
* ``factors``: ``{path: (A, B)}`` with ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T`` for each
  matrix where factoring saves parameters, ``r (m + n) < m n`` (others stay dense, truncated);
* ``report``: per-layer ranks, the retained singular values (the LoRITa paper's metric) and
  parameter counts before and after.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxlr
  >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (64, 32)),
  ...                       "bias": jnp.zeros(32)}}
  >>> result = compress(params, {"Dense_0/kernel": 4})
  >>> result.report.params_before, result.report.params_after   # 64*32 + 32 -> 4*(64+32) + 32
  (2080, 416)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlr import lorita, matrices, svd
from jaxlr.ranks import Ranks, retained_fraction

__all__ = ["Compression", "CompressionReport", "LayerReport", "compress"]


class LayerReport(NamedTuple):
    """One truncated matrix.

    Attributes:
      matrix_shape: ``(m, n)``.
      rank: singular values kept.
      full_rank: ``min(m, n)``.
      factored: whether the layer is exported as a factor pair (``r (m + n) < m n``).
      params_before: ``m n``.
      params_after: ``r (m + n)`` if factored, else ``m n``.
    """

    matrix_shape: tuple[int, int]
    rank: int
    full_rank: int
    factored: bool
    params_before: int
    params_after: int


class CompressionReport(NamedTuple):
    """What a compression kept and saved.

    Attributes:
      layers: ``{path: LayerReport}`` for every ranked matrix.
      retained: kept / total singular values per matrix, averaged (LoRITa's x-axis).
      params_before: parameters of the whole tree before.
      params_after: parameters of the whole tree with factored layers as factor pairs.
    """

    layers: dict[str, LayerReport]
    retained: float
    params_before: int
    params_after: int

    def table(self) -> str:
        """A plain-text table of the layers and the totals."""
        width = max([len(name) for name in self.layers] + [4])
        lines = [f"{'path':<{width}}  {'m x n':>11}  {'rank':>5}  {'of':>5}  {'params':>17}"]
        for name, layer in self.layers.items():
            shape = f"{layer.matrix_shape[0]} x {layer.matrix_shape[1]}"
            after = f"{layer.params_after}" + ("" if layer.factored else " (dense)")
            lines.append(
                f"{name:<{width}}  {shape:>11}  {layer.rank:>5}  {layer.full_rank:>5}  "
                f"{layer.params_before:>7} -> {after}"
            )
        lines.append(
            f"retained singular values {self.retained:.1%}; parameters {self.params_before} -> "
            f"{self.params_after} ({self.params_after / self.params_before:.1%})"
        )
        return "\n".join(lines)


class Compression(NamedTuple):
    """The result of :func:`compress`: ``params``, ``factors`` and ``report`` (module docs)."""

    params: Any
    factors: dict[str, tuple[jax.Array, jax.Array]]
    report: CompressionReport


def compress(
    params: Any,
    ranks: Mapping[str, int],
    *,
    view: matrices.ViewFn = matrices.default_view,
    method: svd.Method = "svd",
) -> Compression:
    """Truncates every ranked matrix of a trained tree; see the module's documentation.

    Args:
      params: a trained tree; :class:`~jaxlr.lorita.Factored` nodes are collapsed first.
      ranks: ``{path: rank}``, e.g. ``jaxlr.gsvt_ranks(jaxlr.singular_values_tree(p), 0.3)``.
      view: how each kernel is seen as a matrix.
      method: decomposition method (:mod:`jaxlr.svd`); the SVD by default, since it runs once.

    Returns:
      A :class:`Compression` ``(params, factors, report)``.

    Raises:
      ValueError / TypeError: as :func:`jaxlr.svd.truncated_factors_tree` for bad ranks or paths.
    """
    params = lorita.collapse(params)
    factorization = svd.truncated_factors_tree(params, ranks, method=method, view=view)
    selected = matrices.matrix_leaves(
        params, filter=lambda path, leaf: matrices.path_str(path) in ranks, view=view
    )
    flat, treedef = jax.tree_util.tree_flatten(params)
    factors, layers = {}, {}
    for name, leaf in selected.items():
        a, b = factorization.factors[name]
        truncated = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        dtype = jnp.result_type(flat[leaf.index])
        flat[leaf.index] = leaf.view.from_matrix(truncated, leaf.shape).astype(dtype)
        m, n = leaf.matrix_shape
        rank = int(ranks[name])
        factored = rank * (m + n) < m * n
        if factored:
            factors[name] = (a, b)
        layers[name] = LayerReport(
            (m, n), rank, leaf.full_rank, factored, m * n, rank * (m + n) if factored else m * n
        )
    before = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(params))
    after = before - sum(layer.params_before - layer.params_after for layer in layers.values())
    full = {name: layer.full_rank for name, layer in layers.items()}
    retained = retained_fraction(Ranks({name: layer.rank for name, layer in layers.items()}, full))
    return Compression(
        jax.tree_util.tree_unflatten(treedef, flat),
        factors,
        CompressionReport(layers, retained, before, after),
    )
