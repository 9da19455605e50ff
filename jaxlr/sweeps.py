"""Sweeps: decompose each matrix once, then truncate at any number of budgets without compiling.

Choosing a budget means evaluating the model at many of them (an accuracy-against-budget curve).
:func:`jaxlr.compress` decomposes at each call, and each new set of ranks is a new program to
compile. :func:`sweep` decomposes every selected matrix once (plainly, or whitened by a
calibration: :mod:`jaxlr.whitening`) and keeps the decompositions; then, for any ranks,

* :meth:`Sweep.truncate` gives the tree with each kernel replaced by its truncation, of the same
  shape: one compiled program serves every budget (the ranks enter as masks), and so does the
  user's compiled model, whose inputs keep their shapes;
* :meth:`Sweep.compress` gives what :func:`jaxlr.compress` gives (factor pairs where they save,
  the report), its factors sliced on the host: no compilation;
* :attr:`Sweep.spectra` feeds the rank policies (``spectra=``), so choosing the ranks does not
  decompose again.

Memory: the decompositions of every selected matrix (``m x k``, ``k`` and ``k x n`` numbers for
``k = min(m, n)``, about twice the kernel), on the device and on the host.

Example:
  >>> import jax, jaxlr
  >>> params = {"fc1": {"kernel": jax.random.normal(jax.random.key(0), (64, 48))},
  ...           "fc2": {"kernel": jax.random.normal(jax.random.key(1), (48, 32))},
  ...           "head": {"kernel": jax.random.normal(jax.random.key(2), (32, 10))}}
  >>> s = jaxlr.sweep(params)
  >>> for keep in (0.5, 0.25):
  ...     ranks = jaxlr.gsvt_ranks(params, keep=keep, spectra=s.spectra)
  ...     tree = s.truncate(ranks)            # dense kernels, their shapes unchanged
  ...     result = s.compress(ranks)          # factor pairs, as jaxlr.compress gives them
  >>> tree["fc1"]["kernel"].shape, result.report.params_after < result.report.params_before
  ((64, 48), True)
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlr import _checks, _nnx, compression, matrices, nodes, selection, whitening
from jaxlr.calibration import Calibration
from jaxlr.matrices import MatrixView

__all__ = ["Sweep", "sweep"]


@partial(jax.jit, static_argnums=(4, 5))
def _rebuild(lefts: tuple[jax.Array, ...], values: tuple[jax.Array, ...],
             rights: tuple[jax.Array, ...], masks: tuple[jax.Array, ...],
             views: tuple[MatrixView, ...], shapes: tuple[tuple[tuple[int, ...], Any], ...]
             ) -> list[jax.Array]:
    out = []
    for left, s, vt, mask, view, (shape, dtype) in zip(lefts, values, rights, masks, views,
                                                       shapes, strict=True):
        matrix = jnp.matmul(left * jnp.where(mask, s, 0), vt, precision=whitening.HIGHEST)
        out.append(view.from_matrix(matrix, shape).astype(dtype))
    return out


class Sweep:
    """Every selected matrix of a tree decomposed once (module documentation); made by
    :func:`sweep`.

    Attributes:
      spectra: ``{key: singular values}`` (numpy, largest first; whitened with a calibration):
        pass them to a rank policy as ``spectra=``.
      calibration: the calibration the matrices were whitened by, or ``None``.
    """

    def __init__(self, original: Any, params: Any, found: dict[str, selection.MatrixLeaf],
                 parts: list[tuple[jax.Array, jax.Array, jax.Array]],
                 calibration: Calibration | None):
        self._original, self._params, self._found = original, params, found
        self._device = parts
        self._host = [tuple(np.asarray(x) for x in part) for part in jax.device_get(parts)]
        self.spectra = {key: part[1] for key, part in zip(found, self._host, strict=True)}
        self.calibration = calibration
        flat = selection.flatten(params)[0]
        self._dtypes = {key: jnp.result_type(flat[leaf.index][1]) for key, leaf in found.items()}

    def _ranks(self, ranks: Any) -> dict[str, int]:
        if not isinstance(ranks, Mapping):
            raise TypeError(f"ranks must be a jaxlr.Ranks or a mapping {{key: rank}}, got "
                            f"{type(ranks).__name__}.")
        wanted = matrices.keyed(ranks, "ranks")
        unknown = sorted(set(wanted) - set(self._found))
        if unknown:
            raise ValueError(f"ranks name {unknown}, which this sweep did not decompose; it holds "
                             f"{list(self._found)[:20]}.")
        out = {}
        for key, leaf in self._found.items():
            out[key] = _checks.check_rank(repr(key), wanted.get(key, leaf.full_rank),
                                          leaf.full_rank)
        return out

    def truncate(self, ranks: Mapping[Any, int]) -> Any:
        """The tree (or module: the input's kind) with each decomposed kernel replaced by its
        truncation at its rank, dense and of its own shape; a matrix ``ranks`` does not name
        keeps its full rank. Compiles once for all ranks."""
        chosen = self._ranks(ranks)
        keys = list(self._found)
        masks = tuple(_to_device(np.arange(self._found[k].full_rank) < chosen[k])
                      for k in keys)
        dense = _rebuild(tuple(p[0] for p in self._device), tuple(p[1] for p in self._device),
                         tuple(p[2] for p in self._device), masks,
                         tuple(self._found[k].view for k in keys),
                         tuple((self._found[k].shape, self._dtypes[k]) for k in keys))
        flat, treedef = selection.flatten(self._params)
        leaves = [leaf for _, leaf in flat]
        for key, kernel in zip(keys, dense, strict=True):
            # A matrix at its full rank stays exactly as it was.
            if chosen[key] < self._found[key].full_rank:
                leaves[self._found[key].index] = kernel
        tree = jax.tree_util.tree_unflatten(treedef, leaves)
        if _nnx.is_module(self._original):  # a LoRITa module's products become dense kernels
            return _nnx_with(_nnx.collapse(self._original), tree)
        return tree

    def compress(self, ranks: Mapping[Any, int]) -> compression.CompressionResult:
        """What :func:`jaxlr.compress` gives for these ranks (with this sweep's calibration), its
        factors sliced from the decompositions on the host: no compilation."""
        chosen = self._ranks(ranks)
        cut = {k: leaf for k, leaf in self._found.items() if chosen[k] < leaf.full_rank}
        pairs = []
        for key, (left, s, vt) in zip(self._found, self._host, strict=True):
            if key in cut:
                r, dtype = chosen[key], self._dtypes[key]
                root = np.sqrt(s[:r])
                pairs.append((_to_device((left[:, :r] * root).astype(dtype)),
                              _to_device((root[:, None] * vt[:r]).astype(dtype))))
        tree, report = compression.assemble(self._params, self._found, cut, pairs, None,
                                            dense=_host_dense)
        return compression.CompressionResult(compression.wrap(self._original, tree), report)


def _to_device(x: np.ndarray) -> jax.Array:
    """A host array on the default device, without compiling (``jnp.asarray`` compiles a copy
    program per new shape)."""
    return jax.device_put(np.ascontiguousarray(x))


def _host_dense(a: jax.Array, b: jax.Array, leaf: selection.MatrixLeaf) -> jax.Array:
    """The kernel of ``a @ b``, formed on the host (on the device, a new shape would compile)."""
    order = (*leaf.view.row_axes, *leaf.view.col_axes)
    matrix = np.matmul(np.asarray(a), np.asarray(b))
    kernel = matrix.reshape([leaf.shape[i] for i in order]).transpose(np.argsort(order))
    return _to_device(kernel)


def _nnx_with(model: Any, tree: Any) -> Any:
    from flax import nnx  # noqa: PLC0415

    model = nnx.clone(model)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, tree)
    nnx.update(model, state)
    return model


def sweep(
    params: Any,
    *,
    calibration: Calibration | None = None,
    filter: matrices.Filter | None = None,  # noqa: A002
    view: matrices.View = None,
) -> Sweep:
    """Decomposes every selected matrix once, for truncations at any budget (module
    documentation).

    Args:
      params: a trained tree, Flax NNX module or Equinox module (LoRITa products are collapsed).
      calibration: a :class:`~jaxlr.calibration.Calibration` (:func:`jaxlr.calibrate`) for
        data-aware truncation (:mod:`jaxlr.whitening`); ``None``: plain SVD.
      filter: which matrices (default: every kernel but the output layer,
        :mod:`jaxlr.selection`).
      view: how each leaf is seen as a matrix.

    Returns:
      A :class:`Sweep`.

    Raises:
      ValueError: if the filter selects nothing, a matrix holds NaN or Inf, or the calibration
        lacks a selected matrix or saw it with another shape.
    """
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a jaxlr.calibration.Calibration (jaxlr.calibrate) "
                        f"or None, got {type(calibration).__name__}.")
    tree = _nnx.parameters(params) if _nnx.is_module(params) else params
    tree = nodes.collapse_tree(tree)
    found = selection.matrix_leaves(tree, filter=filter, view=view)
    if calibration is not None:
        calibration.check(found, "sweep")
        moments = whitening.moments_for(calibration, list(found))
        damping = calibration.damping
    else:
        moments, damping = (None,) * len(found), 0.0
    flat = selection.flatten(tree)[0]
    leaves = tuple(flat[leaf.index][1] for leaf in found.values())
    parts, finite = whitening.decompose_leaves(
        leaves, moments, tuple(leaf.view for leaf in found.values()), damping)
    _checks.raise_if_nonfinite(list(found), finite)
    return Sweep(params, tree, found, parts, calibration)
