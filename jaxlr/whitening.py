"""Data-aware truncation: the rank-``r`` kernel closest to the trained one *on the layer's inputs*.

Plain truncation keeps the largest singular values of a kernel's matrix ``W`` (``m x n``): the
rank-``r`` ``W'`` nearest ``W`` itself. What the layer computes is ``x^T W`` for its input rows
``x`` (:mod:`jaxlr.calibration`: input vectors, or patches for a convolution), so what a cut costs
is ``E ||x^T W - x^T W'||^2 = ||R (W - W')||_F^2``, where ``R`` is a square root of the inputs'
second moment ``C = E[x x^T] = R^T R``. Its minimum at rank ``r`` is Eckart-Young's on ``R W``:

    ``U S V^T = svd(R W)``,  ``W' = R^{-1} U_r S_r V_r^T``,
    factors ``A = R^{-1} U_r S_r^{1/2}`` and ``B = S_r^{1/2} V_r^T``

(the whitening of SVD-LLM, arXiv:2403.07378; ASVD and FWSVD weigh ``W`` by other statistics).
:func:`jaxlr.compress`, :func:`jaxlr.gsvt_ranks`, :func:`jaxlr.energy_ranks`,
:func:`jaxlr.target_ranks` and :func:`jaxlr.sweep` do this when given a ``calibration=``.

**What the singular values measure.** ``s_i^2`` of ``R W`` is the mean squared output error (per
input row, in the units of the layer's output) that dropping the ``i``-th direction adds: the
error of a cut is ``sum_{i > r} s_i^2``. GSVT therefore ranks, across layers, what each cut costs
each layer's output, with the same ``pools`` and ``normalize`` options as for raw values
(``normalize="max"`` divides each layer's values by its largest, so layers whose outputs differ
in scale compete on the shape of their error curves).

**Numerics** (float32 unless the moments or kernel are float64). ``C`` is symmetrised and
decomposed as ``Q diag(l) Q^T`` (``eigh``, which never fails, unlike a Cholesky factorisation of
a ``C`` that is only positive *semi*-definite); eigenvalues below 0 (rounding) become 0; then
``damping`` times the mean eigenvalue is added to each (the calibration's ``damping``, 0.01 by
default) and ``R = Q diag(sqrt(l)) Q^T``. A singular ``C`` (constant input pixels such as MNIST's
borders, dead ReLUs, fewer rows than inputs) thus gives a finite ``R^{-1}``. With damping ``d``
the cut minimises ``E ||x^T (W - W')||^2 + d mean(l) ||W - W'||_F^2``: the inputs' error plus a
pull towards plain truncation (an infinite ``d`` is plain truncation), so directions the inputs
never excite keep the trained weights. With ``damping=0`` the cut is exactly optimal on the
inputs where ``C`` is well conditioned; eigenvalues are then floored at ``eps * max(l)`` so that
the inverse stays finite. A ``C`` of zeros (a layer whose inputs were all zero) is truncated
plainly.

Example:
  >>> import numpy as np, jax.numpy as jnp
  >>> x = np.random.default_rng(0).normal(size=(500, 6)) * [5, 1, 1, 1, 1, 0.1]
  >>> w = np.random.default_rng(1).normal(size=(6, 4))
  >>> a, b = whitened_factors(jnp.asarray(w), jnp.asarray(x.T @ x / 500), 2, damping=0.0)
  >>> error = np.linalg.norm(x @ w - x @ (np.asarray(a) @ np.asarray(b)))
  >>> best = np.sqrt(np.sum(np.linalg.svd(x @ w, compute_uv=False)[2:] ** 2))  # Eckart-Young
  >>> bool(np.isclose(error, best, rtol=1e-4))
  True
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxlr import _linalg, nodes
from jaxlr.matrices import MatrixView

__all__ = ["decompose", "whitened_factors", "whitened_spectrum", "whitener"]

HIGHEST = jax.lax.Precision.HIGHEST


def whitener(moment: jax.Array, damping: float) -> tuple[jax.Array, jax.Array]:
    """``(R, R^{-1})``: the damped symmetric square root of a second moment and its inverse
    (module documentation), in ``moment``'s dtype (at least float32)."""
    c = moment.astype(_linalg.compute_dtype(moment.dtype))
    c = (c + c.T) / 2
    finite = jnp.all(jnp.isfinite(c))
    c = jnp.where(finite, c, 0)
    values, q = jnp.linalg.eigh(c)
    values = jnp.maximum(values, 0)
    top = jnp.max(values)
    values = values + damping * jnp.mean(values)
    values = jnp.maximum(values, jnp.finfo(c.dtype).eps * top)
    plain = ~finite | (top <= 0)  # nothing measured: the identity, plain truncation
    values = jnp.where(plain, 1, values)
    q = jnp.where(plain, jnp.eye(c.shape[0], dtype=c.dtype), q)
    root = jnp.sqrt(values)
    return (jnp.matmul(q * root, q.T, precision=HIGHEST),
            jnp.matmul(q / root, q.T, precision=HIGHEST))


def decompose(matrix: jax.Array, moment: jax.Array | None, damping: float
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(R^{-1} U, S, V^T)`` for ``U S V^T = svd(R W)``, all ``min(m, n)`` of them (plain SVD
    without a moment), so that ``W'_r = (R^{-1} U)_r S_r V_r^T`` for any ``r``."""
    dtype = _linalg.compute_dtype(matrix.dtype if moment is None
                                  else jnp.promote_types(matrix.dtype, moment.dtype))
    work = matrix.astype(dtype)
    if moment is None:
        return _linalg.thin_svd(work)
    root, inverse = whitener(moment.astype(dtype), damping)
    u, s, vt = _linalg.thin_svd(jnp.matmul(root, work, precision=HIGHEST))
    return jnp.matmul(inverse, u, precision=HIGHEST), s, vt


def whitened_spectrum(matrix: jax.Array, moment: jax.Array, damping: float) -> jax.Array:
    """The singular values of ``R W``, largest first (``s_i^2``: the output error of each
    direction, module documentation)."""
    dtype = _linalg.compute_dtype(jnp.promote_types(matrix.dtype, moment.dtype))
    root, _ = whitener(moment.astype(dtype), damping)
    return _linalg.spectrum(jnp.matmul(root, matrix.astype(dtype), precision=HIGHEST))


def whitened_factors(matrix: jax.Array, moment: jax.Array, rank: int, *, damping: float
                     ) -> tuple[jax.Array, jax.Array]:
    """The factors ``A`` (``m x r``), ``B`` (``r x n``) of the rank-``r`` matrix nearest
    ``matrix`` on inputs of second moment ``moment`` (module documentation), in ``matrix``'s
    dtype."""
    left, s, vt = decompose(matrix, moment, damping)
    root = jnp.sqrt(s[:rank])
    return ((left[:, :rank] * root).astype(matrix.dtype),
            (root[:, None] * vt[:rank]).astype(matrix.dtype))


def _matrix(leaf: Any, view: MatrixView) -> jax.Array:
    return view.to_matrix(leaf[...] if nodes.is_node(leaf) else leaf)


@partial(jax.jit, static_argnums=(2, 3, 4))
def factor_leaves(leaves: tuple[Any, ...], moments: tuple[jax.Array, ...],
                  views: tuple[MatrixView, ...], ranks: tuple[int, ...], damping: float
                  ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    """Whitened factors of each leaf's matrix at its rank, and whether each was finite."""
    pairs, flags = [], []
    for leaf, moment, view, rank in zip(leaves, moments, views, ranks, strict=True):
        work, finite = _linalg.sanitize(_matrix(leaf, view))
        a, b = whitened_factors(work, moment, rank, damping=damping)
        dtype = jnp.result_type(leaf[...] if nodes.is_node(leaf) else leaf)
        pairs.append((jnp.where(finite, a, jnp.nan).astype(dtype),
                      jnp.where(finite, b, jnp.nan).astype(dtype)))
        flags.append(finite)
    return pairs, jnp.stack(flags)


@partial(jax.jit, static_argnums=(2, 3))
def spectra_of(leaves: tuple[Any, ...], moments: tuple[jax.Array, ...],
               views: tuple[MatrixView, ...], damping: float
               ) -> tuple[list[jax.Array], jax.Array]:
    """Whitened spectra of each leaf's matrix, and whether each was finite."""
    out, flags = [], []
    for leaf, moment, view in zip(leaves, moments, views, strict=True):
        work, finite = _linalg.sanitize(_matrix(leaf, view))
        out.append(whitened_spectrum(work, moment, damping))
        flags.append(finite)
    return out, jnp.stack(flags)


@partial(jax.jit, static_argnums=(2, 3))
def decompose_leaves(leaves: tuple[Any, ...], moments: tuple[jax.Array | None, ...],
                     views: tuple[MatrixView, ...], damping: float
                     ) -> tuple[list[tuple[jax.Array, jax.Array, jax.Array]], jax.Array]:
    """:func:`decompose` of each leaf's matrix (plain where its moment is ``None``), and whether
    each was finite."""
    out, flags = [], []
    for leaf, moment, view in zip(leaves, moments, views, strict=True):
        work, finite = _linalg.sanitize(_matrix(leaf, view))
        out.append(decompose(work, moment, damping))
        flags.append(finite)
    return out, jnp.stack(flags)


def moments_for(calibration: Any, keys: Sequence[str]) -> tuple[jax.Array, ...]:
    """The calibration's moments of ``keys``, in order."""
    return tuple(calibration.moments[key] for key in keys)
