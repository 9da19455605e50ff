"""Single-device linear algebra: the top singular triplets of a list of matrices (thin SVD, the Gram
path, ``auto``'s choice between them), and the truncations built from them (projection with
energy transfer, balanced factors, spectra), in a Python loop inside one trace.

It knows no mesh: a caller that decomposes over devices hands it an :class:`OnMesh` (the
``shard_map`` finder of :mod:`jaxlr._distributed`), which it asks for the triplets instead.
:mod:`jaxlr.svd` documents the methods and their accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["GRAM_TOLERANCE", "HIGHEST", "OnMesh", "Triplets", "compute_dtype", "factors_many",
           "gram_subspace", "gram_triplets", "project_many", "sanitize", "spectrum",
           "subspace_of_gram", "thin_svd", "top_svd", "top_triplets", "triplets_from_subspace",
           "truncate", "zero_triplets"]

# `auto` keeps the Gram result where its estimated relative Frobenius error is below this. The
# estimate was never below 0.8x the measured error (tests/test_svd.py checks spectra of every kind),
# so accepted results stay well inside the 1e-4 that jaxlr promises against the full SVD.
GRAM_TOLERANCE = 2e-5
HIGHEST = lax.Precision.HIGHEST


def compute_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


Triplets = tuple[jax.Array, jax.Array, jax.Array]


# A matrix at least this many times taller than wide is first reduced by a QR decomposition: the
# SVD of its small triangular factor costs less than the SVD of the matrix
# (`python -m experiments.benchmarks.svd_projection --parts`; BENCHMARKS.md).
QR_FIRST = 2


def thin_svd(matrix: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``jnp.linalg.svd(matrix, full_matrices=False)``, with the QR algorithm on GPUs.

    On NVIDIA and AMD GPUs JAX's default SVD is Jacobi's (cuSolver ``gesvdj``), whose float32
    reconstruction and orthogonality errors are far larger than the QR algorithm's, at some cost
    in time (BENCHMARKS.md, GPU rows). On the CPU the default (LAPACK's divide and conquer) is both
    accurate and faster than QR, so it stays.
    """

    def default(m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return lax.linalg.svd(m, full_matrices=False)

    def qr(m: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        return lax.linalg.svd(m, full_matrices=False, algorithm=lax.linalg.SvdAlgorithm.QR)

    return lax.platform_dependent(matrix, cuda=qr, rocm=qr, default=default)


def top_svd(matrix: jax.Array, rank: int) -> Triplets:
    rows, cols = matrix.shape
    if cols >= QR_FIRST * rows:
        u, s, vt = top_svd(matrix.T, rank)
        return vt.T, s, u.T
    if rows >= QR_FIRST * cols:
        # W = Q R and R = U_R S V^T give W's S and V; W V_r = U_r S_r gives U_r.
        _, s, vt = thin_svd(jnp.linalg.qr(matrix, mode="r"))
        s, vt = s[:rank], vt[:rank]
        scaled = jnp.matmul(matrix, vt.T, precision=HIGHEST)
        return scaled / jnp.where(s > 0, s, 1), s, vt
    u, s, vt = thin_svd(matrix)
    return u[:, :rank], s[:rank], vt[:rank]


def gram_subspace(
    matrix: jax.Array, rank: int, cut: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The top-``rank`` eigenvectors of the Gram matrix of the shorter side (the right singular
    vectors of a tall matrix, the left ones of a wide one), and an estimate of the relative
    Frobenius error of the truncation they give at ``cut`` (default: ``rank``; a traced rank
    ``<= rank`` for the masked path)."""
    rows, cols = matrix.shape
    gram = (
        jnp.matmul(matrix.T, matrix, precision=HIGHEST)
        if rows >= cols
        else jnp.matmul(matrix, matrix.T, precision=HIGHEST)
    )
    norm = jnp.sqrt(jnp.sum(jnp.square(matrix)))
    return subspace_of_gram(gram, norm, rank, cut, min(rows, cols))


def subspace_of_gram(
    gram: jax.Array, norm: jax.Array, rank: int, cut: jax.Array | None, full: int
) -> tuple[jax.Array, jax.Array]:
    """:func:`gram_subspace` from the Gram matrix and the matrix's Frobenius norm."""
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram)  # ascending
    top = eigenvectors[:, -rank:][:, ::-1]
    if cut is None and rank == full:  # nothing is cut: U S V^T = W V V^T = W, whatever the spectrum
        return top, jnp.zeros((), gram.dtype)
    # Davis-Kahan: rounding of the Gram matrix and of eigh perturbs it by ~eps * s_1^2, which moves
    # the projection by about that over the singular-value gap at the cut.
    sigma = jnp.sqrt(jnp.maximum(eigenvalues[::-1], 0))
    if cut is None:
        gap = sigma[rank - 1] - sigma[rank]
    else:
        padded = jnp.concatenate([sigma, jnp.zeros((1,), sigma.dtype)])
        gap = jnp.where(cut >= full, jnp.inf, padded[cut - 1] - padded[cut])
    largest = eigenvalues[-1]
    eps = jnp.finfo(gram.dtype).eps
    return top, jnp.where(largest > 0, eps * largest / (gap * norm), 0.0)


def triplets_from_subspace(matrix: jax.Array, top: jax.Array) -> Triplets:
    if matrix.shape[0] >= matrix.shape[1]:
        scaled = jnp.matmul(matrix, top, precision=HIGHEST)  # U_r S_r
        s = jnp.linalg.norm(scaled, axis=0)
        return scaled / jnp.where(s > 0, s, 1), s, top.T
    scaled = jnp.matmul(top.T, matrix, precision=HIGHEST)  # S_r V_r^T
    s = jnp.linalg.norm(scaled, axis=1)
    return top, s, scaled / jnp.where(s > 0, s, 1)[:, None]



class OnMesh(Protocol):
    """Decompositions over a mesh, handed in by the caller (:class:`jaxlr._distributed.Spread`)."""

    def pick(self, indices: Sequence[int]) -> OnMesh:
        """The same for the matrices at ``indices``."""

    def triplets(self, mats: list[jax.Array], ranks: list[int], method: str,
                 cuts: list[jax.Array] | None) -> list[Triplets]:
        """The top triplets of ``mats`` (:func:`top_triplets`), found on the mesh."""


def top_triplets(
    mats: list[jax.Array],
    ranks: list[int],
    method: str,
    cuts: list[jax.Array] | None = None,
    on_mesh: OnMesh | None = None,
) -> list[Triplets]:
    """The top-``rank`` singular triplets of every matrix (error estimated at ``cuts``, if
    given); with ``on_mesh``, found on its mesh."""
    if on_mesh is not None and mats:
        return on_mesh.triplets(mats, ranks, method, cuts)
    if method == "svd":
        return [top_svd(m, r) for m, r in zip(mats, ranks, strict=True)]
    fallbacks = [top_svd] * len(mats) if method == "auto" else None
    return gram_triplets(mats, ranks, cuts, fallbacks)[0]


def zero_triplets(matrix: jax.Array, rank: int) -> Triplets:
    """Zeros of the shapes of ``top_svd(matrix, rank)``: a placeholder (:func:`_side_by_side`)."""
    (m, n), dtype = matrix.shape, matrix.dtype
    return jnp.zeros((m, rank), dtype), jnp.zeros((rank,), dtype), jnp.zeros((rank, n), dtype)


def gram_triplets(
    mats: list[jax.Array], ranks: list[int], cuts: list[jax.Array] | None,
    fallbacks: Sequence[Any] | None,
) -> tuple[list[Triplets], list[jax.Array]]:
    """The triplets of the Gram path of every matrix, and whether each error estimate is under
    the tolerance; with ``fallbacks`` (``auto``), ``fallbacks[i](matrix, rank)`` replaces the
    triplets of matrix ``i`` where its estimate is not.

    The Gram eigendecompositions come first and one ``cond`` on "every estimate is under the
    tolerance" guards the per-matrix choices, so in the common case the fallbacks cost nothing at
    run time, and a matrix that falls back does not pay for the Gram projection.
    """
    cuts = cuts if cuts is not None else [None] * len(mats)
    subspaces = [gram_subspace(m, r, c) for m, r, c in zip(mats, ranks, cuts, strict=True)]
    # A NaN estimate (a zero gap over a zero norm) compares False and takes the fallback as well.
    accepted = [estimate <= GRAM_TOLERANCE for _, estimate in subspaces]

    def all_gram() -> list[Triplets]:
        return [triplets_from_subspace(m, top) for m, (top, _) in zip(mats, subspaces,
                                                                        strict=True)]

    if fallbacks is None or not subspaces:
        return all_gram(), accepted

    def each_its_own() -> list[Triplets]:
        return [
            lax.cond(
                ok,
                lambda m=m, top=top: triplets_from_subspace(m, top),
                lambda m=m, r=r, fallback=fallback: fallback(m, r),
            )
            for ok, m, r, (top, _), fallback in zip(accepted, mats, ranks, subspaces, fallbacks,
                                                    strict=True)
        ]

    return lax.cond(jnp.all(jnp.stack(accepted)), all_gram, each_its_own), accepted



def sanitize(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The matrix in its compute dtype, zeroed if it holds NaN/Inf, and whether it is finite."""
    finite = jnp.all(jnp.isfinite(matrix))
    work = matrix.astype(compute_dtype(matrix.dtype))
    return jnp.where(finite, work, 0), finite


def truncate(
    work: jax.Array, triplets: Triplets, mask: jax.Array | None, energy_transfer: bool,
    tail_scale: float,
) -> jax.Array:
    """``f W + (alpha - f) U_r S_r V_r^T``: the kept part scaled by ``alpha`` (energy transfer),
    the dropped tail by ``f`` (``tail_scale``; 0 drops it)."""
    u, s, vt = triplets
    if mask is not None:
        s = jnp.where(mask, s, 0)
    alpha = jnp.ones((), work.dtype)
    if energy_transfer:
        kept = jnp.sum(jnp.square(s))
        total = jnp.sum(jnp.square(work))  # = sum of all s^2
        # alpha^2 kept + f^2 (total - kept) = total. A matrix whose kept energy is 0 is the zero
        # matrix: leave it (no 0/0).
        ratio = total / jnp.where(kept > 0, kept, 1)
        alpha = jnp.where(kept > 0, jnp.sqrt(tail_scale**2 + (1 - tail_scale**2) * ratio), 1)
    low_rank = jnp.matmul(u * (alpha - tail_scale) * s, vt, precision=HIGHEST)
    return low_rank + tail_scale * work if tail_scale else low_rank


def project_many(
    mats: list[jax.Array],
    ranks: list[int],
    energy_transfer: bool,
    tail_scale: float,
    method: str,
    traced_ranks: list[jax.Array] | None = None,
    on_mesh: OnMesh | None = None,
    defer: Sequence[bool] | None = None,
) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array]]:
    """Projections of every matrix, whether each was finite, and whether each result is final.

    With ``traced_ranks``, ``ranks`` are the static upper bounds of the traced ones: every triplet
    up to the bound is formed and the values beyond the traced rank are masked. With ``on_mesh``,
    the matrices are tall and decomposed over its mesh. With ``defer`` (one flag per matrix;
    ``auto``, static ranks, no spread) a deferred matrix whose estimate is not accepted is not
    decomposed by the SVD: its result is a placeholder for :func:`_side_by_side` to replace, and
    it is not final. (The rebuild of the placeholder's zero triplets costs less than keeping the
    rebuilds inside ``cond`` branches, which cost a tree whose matrices were all accepted time of
    its own: ``experiments/benchmarks/svd_projection.py``.)"""
    out = list(mats)
    flags = [jnp.all(jnp.isfinite(m)) for m in mats]
    accepted = [jnp.ones((), bool)] * len(mats)
    if traced_ranks is None:
        cut = [i for i, (m, r) in enumerate(zip(mats, ranks, strict=True)) if r < min(m.shape)]
    else:
        cut = list(range(len(mats)))
    if not cut:
        return out, flags, accepted
    sanitized = [sanitize(mats[i]) for i in cut]
    cuts = None if traced_ranks is None else [traced_ranks[i] for i in cut]

    def finish(j: int, parts: Triplets) -> jax.Array:
        i, (work, finite) = cut[j], sanitized[j]
        mask = None if cuts is None else jnp.arange(ranks[i]) < cuts[j]
        projected = truncate(work, parts, mask, energy_transfer, tail_scale)
        if cuts is not None:  # nothing cut: the matrix itself, not its rounded reconstruction
            projected = jnp.where(cuts[j] >= min(mats[i].shape), work, projected)
        return jnp.where(finite, projected.astype(mats[i].dtype), mats[i])

    works, cut_ranks = [w for w, _ in sanitized], [ranks[i] for i in cut]
    if defer is not None:
        triplets, verdicts = gram_triplets(
            works, cut_ranks, None, [zero_triplets if defer[i] else top_svd for i in cut])
        for j, i in enumerate(cut):
            accepted[i] = verdicts[j] | (not defer[i])
    else:
        triplets = top_triplets(works, cut_ranks, method, cuts,
                                None if on_mesh is None else on_mesh.pick(cut))
    for j, i in enumerate(cut):
        out[i] = finish(j, triplets[j])
    return out, flags, accepted


def factors_many(
    mats: list[jax.Array], ranks: list[int], method: str, on_mesh: OnMesh | None = None,
    defer: Sequence[bool] | None = None,
) -> tuple[list[tuple[jax.Array, jax.Array]], list[jax.Array], list[jax.Array]]:
    """Balanced factors of every matrix, whether each was finite, and whether each result is
    final (``defer``: as :func:`project_many`)."""
    sanitized = [sanitize(m) for m in mats]

    def finish(j: int, parts: Triplets) -> tuple[jax.Array, jax.Array]:
        (u, s, vt), finite, dtype = parts, sanitized[j][1], mats[j].dtype
        root = jnp.sqrt(s)
        return (jnp.where(finite, u * root, jnp.nan).astype(dtype),
                jnp.where(finite, root[:, None] * vt, jnp.nan).astype(dtype))

    works = [w for w, _ in sanitized]
    if defer is not None:
        triplets, verdicts = gram_triplets(
            works, ranks, None, [zero_triplets if d else top_svd for d in defer])
        accepted = [ok | (not d) for ok, d in zip(verdicts, defer, strict=True)]
    else:
        triplets = top_triplets(works, ranks, method, None, on_mesh)
        accepted = [jnp.ones((), bool)] * len(mats)
    return ([finish(j, t) for j, t in enumerate(triplets)], [finite for _, finite in sanitized],
            accepted)


def spectrum(matrix: jax.Array) -> jax.Array:
    matrix = matrix.astype(compute_dtype(matrix.dtype))
    if matrix.shape[1] > matrix.shape[0]:
        matrix = matrix.T
    if matrix.shape[0] >= QR_FIRST * matrix.shape[1]:
        matrix = jnp.linalg.qr(matrix, mode="r")  # same singular values, a square matrix
    return jnp.linalg.svd(matrix, compute_uv=False)

