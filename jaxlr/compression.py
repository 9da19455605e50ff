"""After training: truncate to chosen ranks, hold the layers that gain as factor pairs, report.

:func:`compress` takes a trained tree or Flax NNX module (LoRITa products are collapsed first) and
ranks from any policy of :mod:`jaxlr.policies`, decomposes every ranked matrix once, and returns a
:class:`CompressionResult`:

* ``compressed``: the input's kind (tree or NNX module) with each ranked kernel replaced by its
  :class:`~jaxlr.nodes.LowRank` factor pair ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T`` where
  that saves (:func:`jaxlr.nodes.saves`, ``r (m + n) < m n``) and by its dense truncation
  elsewhere; a matrix kept at its full rank stays exactly as it was (no decomposition). A Linen
  model runs it with :func:`jaxlr.apply` (the factor pairs as two thin layers);
  an NNX module comes back with those layers replaced (:mod:`jaxlr.inference`);
  :func:`jaxlr.collapse` gives the structure-preserving truncated tree; :mod:`jaxlr.export` saves
  it.
* ``report``: per-layer ranks, the retained singular values (the LoRITa paper's metric) and
  parameter counts before and after.

Example:
  >>> import jax, jax.numpy as jnp
  >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (64, 32)),
  ...                       "bias": jnp.zeros(32)}}
  >>> result = compress(params, ranks={"Dense_0/kernel": 4})
  >>> result.compressed["Dense_0"]["kernel"].rank
  4
  >>> result.report.params_before, result.report.params_after   # 64*32 + 32 -> 4*(64+32) + 32
  (2080, 416)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlr import _checks, _equinox, _nnx, inference, nodes, selection, sharding, svd, whitening
from jaxlr import options as options_lib
from jaxlr.calibration import Calibration
from jaxlr.options import ProjectionOptions
from jaxlr.policies import RankRequest, Ranks, RankSpec, rank_request, retained_fraction, select

__all__ = ["CompressionResult", "CompressionReport", "LayerReport", "compress"]


class LayerReport(NamedTuple):
    """One truncated matrix.

    Attributes:
      matrix_shape: ``(m, n)``.
      rank: singular values kept.
      full_rank: ``min(m, n)``.
      low_rank: whether the layer is held as a factor pair (``r (m + n) < m n``).
      params_before: ``m n``.
      params_after: ``r (m + n)`` if held as a factor pair, else ``m n``.
    """

    matrix_shape: tuple[int, int]
    rank: int
    full_rank: int
    low_rank: bool
    params_before: int
    params_after: int


class CompressionReport(NamedTuple):
    """What a compression kept and saved.

    Attributes:
      layers: ``{key: LayerReport}`` for every ranked matrix.
      retained: kept / total singular values per matrix, averaged (LoRITa's x-axis).
      params_before: parameters of the whole tree before.
      params_after: parameters of the whole tree with the factor pairs.
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
            after = f"{layer.params_after}" + ("" if layer.low_rank else " (dense)")
            lines.append(
                f"{name:<{width}}  {shape:>11}  {layer.rank:>5}  {layer.full_rank:>5}  "
                f"{layer.params_before:>7} -> {after}"
            )
        lines.append(
            f"retained singular values {self.retained:.1%}; parameters {self.params_before} -> "
            f"{self.params_after} ({self.params_after / self.params_before:.1%})"
        )
        return "\n".join(lines)


class CompressionResult(NamedTuple):
    """The result of :func:`compress`.

    Attributes:
      compressed: the input's kind (tree or NNX module) with factor pairs where they save and
        dense truncated kernels elsewhere.
      report: the :class:`CompressionReport`.
    """

    compressed: Any
    report: CompressionReport


def compress(
    params: Any,
    ranks: RankSpec | None = None,
    *,
    keep: float | None = None,
    prune: float | None = None,
    options: ProjectionOptions | None = None,
    calibration: Calibration | None = None,
) -> CompressionResult:
    """Truncates the selected matrices of a trained tree or module (module documentation).

    The rank request is :func:`jaxlr.project`'s: exactly one of ``ranks``, ``keep`` and
    ``prune``; so, after LRPET, ``compress`` with the training's request and options cuts exactly
    the matrices the training projected.

    Args:
      params: a trained tree (Linen ``variables`` or ``params``, NNX ``State``, any pytree), a
        Flax NNX module or an Equinox module; LoRITa products are collapsed first.
      ranks: a :class:`jaxlr.Ranks` (e.g. ``jaxlr.gsvt_ranks(params, keep=0.3)``),
        ``{path: rank}`` or a function of the params returning one.
      keep: instead of ``ranks``: the fraction of each selected matrix's singular values kept,
        in ``(0, 1]`` (LSVT).
      prune: instead of ``ranks``: the fraction pruned, in ``[0, 1)``.
      options: a :class:`jaxlr.ProjectionOptions`, of which ``compress`` reads the selection
        (``filter``, for ``keep`` / ``prune``), the ``view``, the ``method`` (``"auto"`` by
        default, as everywhere) and the ``mesh`` (``"auto"``: the weights' mesh; on a mesh ``A``
        keeps the kernel's row sharding, ``B`` its column sharding). Its training fields do not
        apply to a truncation: BatchNorm pairs and a tail scale are refused.
      calibration: a :class:`jaxlr.calibration.Calibration` of the model (:func:`jaxlr.calibrate`)
        for data-aware truncation: each matrix is cut to the rank-``r`` matrix nearest it on the
        calibration's inputs (:mod:`jaxlr.whitening`) instead of nearest it in its own norm.
        ``None`` (the default): plain truncation. The ranks are chosen as without it; for ranks
        that see the inputs too, pass the same calibration to the policy
        (``jaxlr.gsvt_ranks(params, keep=k, calibration=c)``).

    Returns:
      A :class:`CompressionResult` ``(compressed, report)``.

    Raises:
      ValueError / TypeError: for a bad rank request, a path not in the tree or a rank out of
        range (naming it), options with BatchNorm pairs or a tail scale, a calibration that lacks
        a cut matrix or saw it with another shape (naming it), or (called eagerly) a matrix
        holding NaN or Inf.

    Example:
      >>> import jax
      >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))},
      ...           "head": {"kernel": jax.random.normal(jax.random.key(1), (32, 10))}}
      >>> result = compress(params, keep=0.25)      # the default selection: the head is kept
      >>> result.compressed["Dense_0"]["kernel"].rank, list(result.report.layers)
      (8, ['Dense_0/kernel'])
    """
    options = options_lib.resolve(options)
    if options.bn_pairs or options.tail_scale:
        raise ValueError(
            "compress truncates: options.bn_pairs and options.tail_scale shape the projection "
            "during training, not the final cut. Project once with them (jaxlr.project(params, "
            "..., options=...)) if the weights are not projected yet, then compress with "
            "dataclasses.replace(options, bn_pairs=None, tail_scale=0.0).")
    request = rank_request(ranks=ranks, keep=keep, prune=prune)
    if request.traced:
        raise TypeError("compress takes a fixed keep= or prune= number; schedules belong to "
                        "jaxlr.low_rank_projection.")
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a jaxlr.calibration.Calibration (jaxlr.calibrate) "
                        f"or None, got {type(calibration).__name__}.")
    tree = _nnx.parameters(params) if _nnx.is_module(params) else params
    tree, report = _compress_tree(tree, request, options, calibration)
    return CompressionResult(wrap(params, tree), report)


def wrap(original: Any, tree: Any) -> Any:
    """The compressed ``tree`` in the kind of ``original``: a tree as it is, an NNX module with
    its layers replaced, an Equinox module made runnable."""
    if _nnx.is_module(original):
        return inference.nnx_model(original, tree)
    return _equinox.runnable(tree) if _equinox.is_module(original) else tree


def _compress_tree(params: Any, request: RankRequest, options: ProjectionOptions,
                   calibration: Calibration | None) -> tuple[Any, CompressionReport]:
    params = nodes.collapse_tree(params)
    chosen, found = select(params, request, filter=options.filter, view=options.view)
    flat = selection.flatten(params)[0]
    # A matrix kept at full rank stays as it is: exact, and no decomposition to pay for.
    cut = {key: leaf for key, leaf in found.items() if chosen[key] < leaf.full_rank}
    selected = [flat[leaf.index][1] for leaf in cut.values()]
    views, ranks = [leaf.view for leaf in cut.values()], [chosen[key] for key in cut]
    if not cut:
        pairs, finite = [], np.zeros(0, bool)
    elif calibration is None:
        pairs, finite = svd.factor_leaves(selected, views, ranks, method=options.method,
                                          mesh=options.mesh)
    else:
        calibration.check(cut)
        pairs, finite = whitening.factor_leaves(
            selected, whitening.moments_for(calibration, list(cut)), views, ranks,
            calibration.damping, method=options.method, mesh=options.mesh)
    return assemble(params, found, cut, pairs, finite)


def assemble(params: Any, found: dict[str, selection.MatrixLeaf],
             cut: dict[str, selection.MatrixLeaf], pairs: list[tuple[Any, Any]], finite: Any,
             dense: Callable[[Any, Any, selection.MatrixLeaf], Any] | None = None
             ) -> tuple[Any, CompressionReport]:
    """The tree with each cut matrix replaced by its factor pair (or dense truncation where a
    pair does not save: ``dense(a, b, leaf)``, the kernel of ``a @ b`` by default), and its
    report; ``found`` matrices not in ``cut`` stay whole. ``finite=None``: every matrix is known
    to be finite."""
    flat, treedef = selection.flatten(params)
    leaves = [leaf for _, leaf in flat]
    if finite is not None and not _checks.is_traced([leaves[leaf.index]
                                                     for leaf in found.values()]):
        whole = [key for key in found if key not in cut]
        _checks.raise_if_nonfinite(list(cut) + whole, np.concatenate([
            np.asarray(finite, bool).reshape(-1),
            [bool(jnp.isfinite(leaves[found[key].index]).all()) for key in whole]]))
    layers = {}
    for (key, leaf), (a, b) in zip(cut.items(), pairs, strict=True):
        node = nodes.LowRank(a, b, leaf.shape, leaf.view)
        m, n = leaf.matrix_shape
        if node.saves:
            leaves[leaf.index] = node
        else:
            kernel = node.kernel() if dense is None else dense(a, b, leaf)
            if kernel.dtype != jnp.result_type(leaves[leaf.index]):
                kernel = kernel.astype(jnp.result_type(leaves[leaf.index]))
            leaves[leaf.index] = sharding.like(kernel, leaves[leaf.index])
        layers[key] = LayerReport((m, n), node.rank, leaf.full_rank, node.saves, m * n,
                                  node.param_count if node.saves else m * n)
    for key, leaf in found.items():
        if key not in cut:
            m, n = leaf.matrix_shape
            layers[key] = LayerReport((m, n), leaf.full_rank, leaf.full_rank, False, m * n, m * n)
    layers = {key: layers[key] for key in found}
    before = sum(math.prod(np.shape(leaf)) for _, leaf in flat)
    after = before - sum(layer.params_before - layer.params_after for layer in layers.values())
    retained = retained_fraction(Ranks({k: layer.rank for k, layer in layers.items()},
                                       {k: layer.full_rank for k, layer in layers.items()}))
    return (jax.tree_util.tree_unflatten(treedef, leaves),
            CompressionReport(layers, retained, before, after))
