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
default) and ``R = diag(sqrt(l)) Q^T`` (every root with ``R^T R = C`` gives the same cut and
singular values; this one costs one product to apply and one to undo). A singular ``C``
(constant input pixels such as MNIST's borders, dead ReLUs, fewer rows than inputs) thus gives a
finite ``R^{-1}``. With damping ``d``
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

from jaxlr import _linalg, nodes, svd
from jaxlr.matrices import MatrixView

__all__ = ["decompose", "whitened_factors", "whitened_spectrum", "whitener"]

HIGHEST = jax.lax.Precision.HIGHEST


def _eigen_root(moment: jax.Array, damping: float) -> tuple[jax.Array, jax.Array]:
    """``(Q, sqrt(l))`` of the damped moment ``Q diag(l) Q^T`` (module documentation), so that
    ``R = diag(sqrt(l)) Q^T`` is a square root (``R^T R = C``) that costs one product to apply,
    and ``R^{-1} = Q diag(1 / sqrt(l))``."""
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
    return q, jnp.sqrt(values)


def whitener(moment: jax.Array, damping: float) -> tuple[jax.Array, jax.Array]:
    """``(R, R^{-1})``: the damped symmetric square root of a second moment and its inverse
    (module documentation), in ``moment``'s dtype (at least float32). The truncations use the
    root ``diag(sqrt(l)) Q^T`` instead, which gives the same cuts and singular values for less
    arithmetic."""
    q, root = _eigen_root(moment, damping)
    return (jnp.matmul(q * root, q.T, precision=HIGHEST),
            jnp.matmul(q / root, q.T, precision=HIGHEST))


def _whiten(matrix: jax.Array, moment: jax.Array, damping: float
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(R W, Q, sqrt(l))`` in the compute dtype of ``matrix`` and ``moment``."""
    dtype = _linalg.compute_dtype(jnp.promote_types(matrix.dtype, moment.dtype))
    q, root = _eigen_root(moment.astype(dtype), damping)
    whitened = root[:, None] * jnp.matmul(q.T, matrix.astype(dtype), precision=HIGHEST)
    return whitened, q, root


def _unwhiten(q: jax.Array, root: jax.Array, u: jax.Array) -> jax.Array:
    """``R^{-1} U = Q diag(1 / sqrt(l)) U``."""
    return jnp.matmul(q, u / root[:, None], precision=HIGHEST)


def decompose(matrix: jax.Array, moment: jax.Array | None, damping: float
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(R^{-1} U, S, V^T)`` for ``U S V^T = svd(R W)``, all ``min(m, n)`` of them (plain SVD
    without a moment), so that ``W'_r = (R^{-1} U)_r S_r V_r^T`` for any ``r``."""
    if moment is None:
        return _linalg.thin_svd(matrix.astype(_linalg.compute_dtype(matrix.dtype)))
    whitened, q, root = _whiten(matrix, moment, damping)
    u, s, vt = _linalg.thin_svd(whitened)
    return _unwhiten(q, root, u), s, vt


def whitened_spectrum(matrix: jax.Array, moment: jax.Array, damping: float) -> jax.Array:
    """The singular values of ``R W``, largest first (``s_i^2``: the output error of each
    direction, module documentation)."""
    return _linalg.spectrum(_whiten(matrix, moment, damping)[0])


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


@partial(jax.jit, static_argnums=(2, 3))
def whiten_leaves(leaves: tuple[Any, ...], moments: tuple[jax.Array, ...],
                  views: tuple[MatrixView, ...], damping: float
                  ) -> tuple[list[jax.Array], list[tuple[jax.Array, jax.Array]], jax.Array]:
    """``R W`` of each leaf's matrix, the ``(Q, sqrt(l))`` that undo each ``R``, and whether each
    matrix was finite (its ``R W`` is then of zeros)."""
    works, roots, flags = [], [], []
    for leaf, moment, view in zip(leaves, moments, views, strict=True):
        work, finite = _linalg.sanitize(_matrix(leaf, view))
        whitened, q, root = _whiten(work, moment, damping)
        works.append(whitened)
        roots.append((q, root))
        flags.append(finite)
    return works, roots, jnp.stack(flags)


@partial(jax.jit, static_argnums=(3,))
def unwhiten_pairs(pairs: list[tuple[jax.Array, jax.Array]],
                   roots: list[tuple[jax.Array, jax.Array]], finite: jax.Array,
                   dtypes: tuple[Any, ...]) -> list[tuple[jax.Array, jax.Array]]:
    """The factors ``(R^{-1} A', B)`` of balanced factors ``(A', B)`` of each ``R W``, in each
    kernel's dtype (NaN where the kernel was not finite)."""
    out = []
    for (a, b), (q, root), ok, dtype in zip(pairs, roots, finite, dtypes, strict=True):
        out.append((jnp.where(ok, _unwhiten(q, root, a.astype(q.dtype)), jnp.nan).astype(dtype),
                    jnp.where(ok, b, jnp.nan).astype(dtype)))
    return out


def factor_leaves(leaves: Sequence[Any], moments: Sequence[jax.Array],
                  views: Sequence[MatrixView], ranks: Sequence[int], damping: float, *,
                  method: str = "auto", mesh: Any = "auto"
                  ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    """Whitened factors of each leaf's matrix at its rank, and whether each was finite: each
    ``R W`` is factored by :func:`jaxlr.svd.factor_leaves` (``method``, ``mesh``: as for plain
    truncation), then ``R`` is undone."""
    works, roots, finite = whiten_leaves(tuple(leaves), tuple(moments), tuple(views), damping)
    square = MatrixView((0,), (1,))
    pairs, _ = svd.factor_leaves(works, [square] * len(works), list(ranks), method=method,
                                 mesh=mesh)
    dtypes = tuple(jnp.result_type(leaf[...] if nodes.is_node(leaf) else leaf)
                   for leaf in leaves)
    return unwhiten_pairs(pairs, roots, finite, dtypes), finite


def _each(leaves: tuple[Any, ...], moments: tuple[Any, ...], views: tuple[MatrixView, ...],
          fn: Any) -> tuple[list[Any], jax.Array]:
    """``fn(matrix, moment)`` of each finite-sanitised leaf matrix, and whether each was finite."""
    out, flags = [], []
    for leaf, moment, view in zip(leaves, moments, views, strict=True):
        work, finite = _linalg.sanitize(_matrix(leaf, view))
        out.append(fn(work, moment))
        flags.append(finite)
    return out, jnp.stack(flags)


@partial(jax.jit, static_argnums=(2, 3))
def spectra_of(leaves: tuple[Any, ...], moments: tuple[jax.Array, ...],
               views: tuple[MatrixView, ...], damping: float
               ) -> tuple[list[jax.Array], jax.Array]:
    """Whitened spectra of each leaf's matrix, and whether each was finite."""
    return _each(leaves, moments, views, lambda w, c: whitened_spectrum(w, c, damping))


@partial(jax.jit, static_argnums=(2, 3))
def decompose_leaves(leaves: tuple[Any, ...], moments: tuple[jax.Array | None, ...],
                     views: tuple[MatrixView, ...], damping: float
                     ) -> tuple[list[tuple[jax.Array, jax.Array, jax.Array]], jax.Array]:
    """:func:`decompose` of each leaf's matrix (plain where its moment is ``None``), and whether
    each was finite."""
    return _each(leaves, moments, views, lambda w, c: decompose(w, c, damping))


def moments_for(calibration: Any, keys: Sequence[str]) -> tuple[jax.Array, ...]:
    """The calibration's moments of ``keys``, in order."""
    return tuple(calibration.moments[key] for key in keys)
