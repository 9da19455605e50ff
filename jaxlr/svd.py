"""Jitted singular-value truncation: the numerical core of every jaxlr method.

For one matrix:

* :func:`singular_values`: the spectrum, largest first.
* :func:`project_matrix`: the best rank-``r`` approximation ``W_r = U_r S_r V_r^T`` (Eckart-Young)
  with LRPET's *energy transfer* (on by default, as everywhere in jaxlr): the kept singular values
  are multiplied by ``alpha = sqrt(sum_all s^2 / sum_kept s^2)`` so that ``||W_r||_F = ||W||_F``.
  ``tail_scale`` makes the projection *soft*: the dropped singular values are multiplied by it
  instead of zeroed (``0``, the default, is the hard projection).
* :func:`truncated_factors`: ``A = U_r sqrt(S_r)`` (``m x r``) and ``B = sqrt(S_r) V_r^T``
  (``r x n``), whose product is the rank-``r`` approximation.

For every selected matrix of a tree, in one jitted call: :func:`singular_values_tree`, and the
functions :mod:`jaxlr.projection`, :mod:`jaxlr.compression` and :mod:`jaxlr.policies` build on
(:func:`project_leaves`, :func:`factor_leaves`, :func:`spectra_of`).

**Precision.** float16 and bfloat16 matrices are decomposed in float32 and the results (projected
matrices, factors) are returned in the input's dtype; singular values are returned in the dtype of
the computation (float32 for half-precision inputs), since they are statistics, not weights.
Matrix products use ``Precision.HIGHEST`` so that TPUs and GPUs do not drop to bf16/tf32 passes.

**Methods.** ``method="svd"`` runs a thin SVD. ``method="gram"`` runs the fast exact path: the
eigendecomposition of the Gram matrix of the shorter side (``W^T W`` or ``W W^T``), which gives the
top-``r`` singular subspace at a fraction of an SVD's cost; its error grows when the spectrum has
no gap at ``r`` or decays steeply, because the Gram matrix squares the condition number.
``method="auto"`` (the default) computes the Gram path, estimates its error from the computed
eigenvalues (the Davis-Kahan bound ``eps * s_1^2 / ((s_r - s_{r+1}) * ||W||_F)``) and, under
``jax.lax.cond``, falls back to the SVD for any matrix whose estimate exceeds ``2e-5`` relative
Frobenius error, so the result is within ``1e-4`` of the full SVD's. (Under ``vmap`` with a
batched predicate, ``cond`` becomes ``select`` and both paths run.) The decompositions of a tree
run as a Python loop inside one ``jit``: no ``vmap`` over ``eigh``, which deadlocked jaxlib
0.10.2's CPU runtime within a few hundred calls of a batched ResNet-56 projection under
``auto``'s ``cond`` (batching only the Gram products and rebuilds was slower than the loop; see
BENCHMARKS.md). ``tests/test_batched_decompositions.py`` soaks plain batched ``eigh`` and ``svd``
on the installed jaxlib, under a timeout, and decompositions run from several Python threads at
once. Called eagerly on the CPU, whole-tree decompositions run with one LAPACK thread per call
(:mod:`jaxlr.threads`), and their SVDs side by side: XLA runs the decompositions of one program
one after the other, so an eager ``"svd"`` call splits the tree into one program per core (groups
of about equal cost), and an eager ``"auto"`` call runs the Gram path of every matrix in one
program, then the SVDs of the large matrices it rejects as programs of their own, from a pool
of threads (faster than the one program on a CPU of several cores: BENCHMARKS.md, with the
command that measures it). The results are those of the one program. On a mesh of several devices
each matrix is decomposed by one device, one matrix after the other (:mod:`jaxlr.sharding`).

**Static and traced ranks.** Ranks are static Python ints on the fast path: only the top ``r``
singular triplets are formed. A traced rank (a schedule of the kept fraction, or
``optax.inject_hyperparams``) keeps every triplet and masks the singular values beyond the rank,
so shapes stay static under ``jit`` while the rank changes.

**NaN and Inf.** A matrix holding NaN or Inf is never decomposed (its NaN would spread to every
entry). Called eagerly, every function raises ``ValueError``, the tree-level ones naming the
matrix; traced under ``jit``, where nothing can be raised, the tree-level functions return such a
matrix unchanged and flag it, and the matrix-level ones return the input unchanged (projection) or
NaN (factors, singular values).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxlr import matrices, nodes, selection, sharding, threads
from jaxlr.matrices import MatrixView

__all__ = [
    "Method",
    "factor_leaves",
    "project_leaves",
    "project_matrix",
    "singular_values",
    "singular_values_tree",
    "spectra_of",
    "thin_svd",
    "truncated_factors",
]

Method = Literal["auto", "gram", "svd"]
METHODS = ("auto", "gram", "svd")

# `auto` keeps the Gram result where its estimated relative Frobenius error is below this. The
# estimate was never below 0.8x the measured error (tests/test_svd.py checks spectra of every kind),
# so accepted results stay well inside the 1e-4 that jaxlr promises against the full SVD.
_GRAM_TOLERANCE = 2e-5
_HIGHEST = lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Validation, shared by the matrix- and tree-level functions.


def check_method(method: Any) -> str:
    """Validates a decomposition method name and returns it."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    return method


def check_flag(name: str, value: Any) -> bool:
    """Validates a boolean option (a string such as ``"False"`` is refused, not read as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type "
                        f"{type(value).__name__}.")
    return value


def check_tail_scale(value: Any) -> float:
    """Validates the soft projection's tail factor, ``0 <= tail_scale < 1``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"tail_scale must be a number in [0, 1) (0: the hard projection), got "
                         f"{value!r}.")
    return float(value)


def _check_matrix(matrix: Any) -> None:
    if jnp.ndim(matrix) != 2:
        raise ValueError(f"matrix must be 2-D, got shape {jnp.shape(matrix)}.")
    matrices.check_floating("matrix", matrix)


def is_traced(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a tracer (the call runs inside ``jit``/``grad``)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def raise_if_nonfinite(names: Sequence[str], finite: jax.Array) -> None:
    """Raises ``ValueError`` naming the matrices whose ``finite`` flag (one stacked array, read
    with one transfer) is false; for eager calls."""
    bad = [name for name, ok in zip(names, np.asarray(finite), strict=True) if not ok]
    if bad:
        raise ValueError(
            f"matrices {bad} hold NaN or Inf; they cannot be decomposed. (Under jit they are "
            "returned unchanged.)"
        )


def _eager_finite(matrix: jax.Array, under_jit: str, result: Any, finite: jax.Array) -> Any:
    """``result`` of a one-matrix call; raises ``ValueError`` if the call is eager and ``matrix``
    holds NaN or Inf (``under_jit``: what the call gives then instead)."""
    if not is_traced(matrix) and not bool(finite):
        raise ValueError(
            f"matrix (shape {tuple(matrix.shape)}) holds NaN or Inf; it cannot be decomposed. "
            f"(Under jit {under_jit}.)")
    return result


def check_rank(label: str, rank: Any, full: int) -> int:
    """Validates one matrix's rank, ``1 <= rank <= full``, and returns it as a Python int.

    Raises:
      TypeError: if ``rank`` is not an integer (a bool is not one).
      ValueError: if it is outside ``[1, full]``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise TypeError(f"rank for {label} must be an int, got {rank!r}.")
    rank = int(rank)
    if not 1 <= rank <= full:
        raise ValueError(f"rank for {label} is {rank}; allowed 1 <= rank <= min(m, n) = {full}.")
    return rank


# ---------------------------------------------------------------------------------------------
# The numerical core: lists of matrices, decomposed in a Python loop inside one trace.


def _compute_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


Triplets = tuple[jax.Array, jax.Array, jax.Array]


# A matrix at least this many times taller than wide is first reduced by a QR decomposition: the
# SVD of its small triangular factor costs less than the SVD of the matrix (2x on 4608 x 512).
_QR_FIRST = 2


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


def _thin_svd(matrix: jax.Array, rank: int) -> Triplets:
    rows, cols = matrix.shape
    if cols >= _QR_FIRST * rows:
        u, s, vt = _thin_svd(matrix.T, rank)
        return vt.T, s, u.T
    if rows >= _QR_FIRST * cols:
        # W = Q R and R = U_R S V^T give W's S and V; W V_r = U_r S_r gives U_r.
        _, s, vt = thin_svd(jnp.linalg.qr(matrix, mode="r"))
        s, vt = s[:rank], vt[:rank]
        scaled = jnp.matmul(matrix, vt.T, precision=_HIGHEST)
        return scaled / jnp.where(s > 0, s, 1), s, vt
    u, s, vt = thin_svd(matrix)
    return u[:, :rank], s[:rank], vt[:rank]


def _gram_subspace(
    matrix: jax.Array, rank: int, cut: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The top-``rank`` eigenvectors of the Gram matrix of the shorter side (the right singular
    vectors of a tall matrix, the left ones of a wide one), and an estimate of the relative
    Frobenius error of the truncation they give at ``cut`` (default: ``rank``; a traced rank
    ``<= rank`` for the masked path)."""
    rows, cols = matrix.shape
    gram = (
        jnp.matmul(matrix.T, matrix, precision=_HIGHEST)
        if rows >= cols
        else jnp.matmul(matrix, matrix.T, precision=_HIGHEST)
    )
    norm = jnp.sqrt(jnp.sum(jnp.square(matrix)))
    return _subspace_of_gram(gram, norm, rank, cut, min(rows, cols))


def _subspace_of_gram(
    gram: jax.Array, norm: jax.Array, rank: int, cut: jax.Array | None, full: int
) -> tuple[jax.Array, jax.Array]:
    """:func:`_gram_subspace` from the Gram matrix and the matrix's Frobenius norm."""
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


def _triplets_from_subspace(matrix: jax.Array, top: jax.Array) -> Triplets:
    if matrix.shape[0] >= matrix.shape[1]:
        scaled = jnp.matmul(matrix, top, precision=_HIGHEST)  # U_r S_r
        s = jnp.linalg.norm(scaled, axis=0)
        return scaled / jnp.where(s > 0, s, 1), s, top.T
    scaled = jnp.matmul(top.T, matrix, precision=_HIGHEST)  # S_r V_r^T
    s = jnp.linalg.norm(scaled, axis=1)
    return top, s, scaled / jnp.where(s > 0, s, 1)[:, None]


class Spread(NamedTuple):
    """Decompositions spread over a mesh (:mod:`jaxlr.sharding`): the matrices are tall, their
    rows split over every device of ``mesh`` where ``sharded``, each decomposed by the device
    ``owners`` names."""

    mesh: Any
    sharded: tuple[bool, ...]
    owners: tuple[int, ...]

    def pick(self, indices: Sequence[int]) -> Spread:
        """The spread of the matrices at ``indices``."""
        return Spread(self.mesh, tuple(self.sharded[i] for i in indices),
                      tuple(self.owners[i] for i in indices))


def _top_triplets(
    mats: list[jax.Array],
    ranks: list[int],
    method: str,
    cuts: list[jax.Array] | None = None,
    spread: Spread | None = None,
) -> list[Triplets]:
    """The top-``rank`` singular triplets of every matrix (error estimated at ``cuts``, if
    given)."""
    if spread is not None and mats:
        return _spread_triplets(mats, ranks, method, cuts, spread)
    if method == "svd":
        return [_thin_svd(m, r) for m, r in zip(mats, ranks, strict=True)]
    fallbacks = [_thin_svd] * len(mats) if method == "auto" else None
    return _gram_triplets(mats, ranks, cuts, fallbacks)[0]


def _zero_triplets(matrix: jax.Array, rank: int) -> Triplets:
    """Zeros of the shapes of ``_thin_svd(matrix, rank)``: a placeholder (:func:`_side_by_side`)."""
    (m, n), dtype = matrix.shape, matrix.dtype
    return jnp.zeros((m, rank), dtype), jnp.zeros((rank,), dtype), jnp.zeros((rank, n), dtype)


def _gram_triplets(
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
    subspaces = [_gram_subspace(m, r, c) for m, r, c in zip(mats, ranks, cuts, strict=True)]
    # A NaN estimate (a zero gap over a zero norm) compares False and takes the fallback as well.
    accepted = [estimate <= _GRAM_TOLERANCE for _, estimate in subspaces]

    def all_gram() -> list[Triplets]:
        return [_triplets_from_subspace(m, top) for m, (top, _) in zip(mats, subspaces,
                                                                        strict=True)]

    if fallbacks is None or not subspaces:
        return all_gram(), accepted

    def each_its_own() -> list[Triplets]:
        return [
            lax.cond(
                ok,
                lambda m=m, top=top: _triplets_from_subspace(m, top),
                lambda m=m, r=r, fallback=fallback: fallback(m, r),
            )
            for ok, m, r, (top, _), fallback in zip(accepted, mats, ranks, subspaces, fallbacks,
                                                    strict=True)
        ]

    return lax.cond(jnp.all(jnp.stack(accepted)), all_gram, each_its_own), accepted


def _r_factor(x: jax.Array) -> jax.Array:
    """A matrix with ``x``'s Gram matrix and at most ``cols`` rows: ``x`` if it has no more rows
    than columns, else the triangular factor of its QR decomposition."""
    return jnp.linalg.qr(x, mode="r") if x.shape[0] > x.shape[1] else x


def _reduce_to_owner(block: jax.Array, owner: int, axes: tuple[str, ...], devices: int,
                     me: jax.Array) -> jax.Array:
    """Inside ``shard_map``: on device ``owner``, a matrix of at most ``n`` rows whose Gram
    matrix is the sum of every device's ``block^T block`` (a tall-skinny QR reduced along a
    binary tree: each device sends one ``n x n`` factor at most once, point to point, and only
    the devices that receive one factorize); elsewhere a buffer of that shape."""
    local = _r_factor(block)
    relative = (me - owner) % devices
    step = 1
    while step < devices:
        pairs = [((owner + rel + step) % devices, (owner + rel) % devices)
                 for rel in range(0, devices, 2 * step) if rel + step < devices]
        received = lax.ppermute(local, axes, perm=pairs)
        stacked = jnp.concatenate([local, received], axis=0)
        receives = (relative % (2 * step) == 0) & (relative + step < devices)
        rows = min(stacked.shape[0], stacked.shape[1])
        local = lax.cond(receives, _r_factor, lambda x, rows=rows: x[:rows], stacked) \
            if stacked.shape[0] > stacked.shape[1] else stacked
        step *= 2
    return local


def _spread_triplets(
    mats: list[jax.Array],
    ranks: list[int],
    method: str,
    cuts: list[jax.Array] | None,
    spread: Spread,
) -> list[Triplets]:
    """:func:`_top_triplets` of tall matrices, each decomposed by one device of the mesh (see
    :mod:`jaxlr.sharding`); ``u`` keeps the rows' split, ``s`` and ``vt`` are on every device."""
    mesh, sharded, owner = spread
    mesh = sharding.in_context(mesh)
    axes = tuple(mesh.axis_names)
    devices = mesh.size
    rows = P(axes, None)
    replicated = P()

    def reduce(x: jax.Array, split: bool) -> jax.Array:
        return lax.psum(x, axes) if split else x

    def body(blocks: list[jax.Array], local_cuts: list[jax.Array]) -> list[Triplets]:
        me = lax.axis_index(axes)
        out = []
        for i, w in enumerate(blocks):
            rank, split, mine = ranks[i], sharded[i], me == owner[i]
            cut = local_cuts[i] if cuts is not None else None
            n = w.shape[1]
            norm = jnp.sqrt(reduce(jnp.sum(jnp.square(w)), split))

            def nothing(*_: Any, n: int = n, rank: int = rank, dtype: Any = w.dtype
                        ) -> tuple[jax.Array, jax.Array]:
                return jnp.zeros((n, rank), dtype), jnp.zeros((), dtype)

            def by_gram(gram: jax.Array, norm: jax.Array = norm, rank: int = rank,
                        cut: Any = cut, full: int = min(mats[i].shape)
                        ) -> tuple[jax.Array, jax.Array]:
                return _subspace_of_gram(gram, norm, rank, cut, full)

            top = estimate = None
            if method != "svd":
                if split:  # the sum of the local Gram matrices; the owner decomposes it
                    gram = lax.psum(jnp.matmul(w.T, w, precision=_HIGHEST), axes)
                    top, estimate = lax.cond(mine, by_gram, nothing, gram)
                else:
                    top, estimate = lax.cond(
                        mine, lambda w=w, f=by_gram: f(jnp.matmul(w.T, w, precision=_HIGHEST)),
                        nothing)
                top, estimate = lax.psum(top, axes), lax.psum(estimate, axes)

            def by_svd(w: jax.Array = w, split: bool = split, rank: int = rank,
                       owner: int = owner[i], mine: jax.Array = mine, nothing: Any = nothing
                       ) -> jax.Array:
                # The right singular vectors of any matrix with W's Gram matrix are W's.
                reduced = _reduce_to_owner(w, owner, axes, devices, me) if split else w
                v = lax.cond(mine, lambda x: _thin_svd(x, rank)[2].T, lambda x: nothing()[0],
                             reduced)
                return lax.psum(v, axes)

            if method == "svd":
                top = by_svd()
            elif method == "auto":
                # The estimate is the same on every device, so all take the same branch.
                top = lax.cond(estimate <= _GRAM_TOLERANCE, lambda t=top: t, by_svd)
            scaled = jnp.matmul(w, top, precision=_HIGHEST)  # this device's rows of U_r S_r
            s = jnp.sqrt(reduce(jnp.sum(jnp.square(scaled), axis=0), split))
            out.append((scaled / jnp.where(s > 0, s, 1), s, top.T))
        return out

    in_specs = ([rows if split else replicated for split in sharded],
                [replicated] * (len(cuts) if cuts is not None else 0))
    out_specs = [(rows if split else replicated, replicated, replicated) for split in sharded]
    run = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return run(list(mats), list(cuts) if cuts is not None else [])


def _sanitize(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The matrix in its compute dtype, zeroed if it holds NaN/Inf, and whether it is finite."""
    finite = jnp.all(jnp.isfinite(matrix))
    work = matrix.astype(_compute_dtype(matrix.dtype))
    return jnp.where(finite, work, 0), finite


def _truncate(
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
    low_rank = jnp.matmul(u * (alpha - tail_scale) * s, vt, precision=_HIGHEST)
    return low_rank + tail_scale * work if tail_scale else low_rank


def _project_many(
    mats: list[jax.Array],
    ranks: list[int],
    energy_transfer: bool,
    tail_scale: float,
    method: str,
    traced_ranks: list[jax.Array] | None = None,
    spread: Spread | None = None,
    defer: Sequence[bool] | None = None,
) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array]]:
    """Projections of every matrix, whether each was finite, and whether each result is final.

    With ``traced_ranks``, ``ranks`` are the static upper bounds of the traced ones: every triplet
    up to the bound is formed and the values beyond the traced rank are masked. With ``spread``,
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
    sanitized = [_sanitize(mats[i]) for i in cut]
    cuts = None if traced_ranks is None else [traced_ranks[i] for i in cut]

    def finish(j: int, parts: Triplets) -> jax.Array:
        i, (work, finite) = cut[j], sanitized[j]
        mask = None if cuts is None else jnp.arange(ranks[i]) < cuts[j]
        projected = _truncate(work, parts, mask, energy_transfer, tail_scale)
        if cuts is not None:  # nothing cut: the matrix itself, not its rounded reconstruction
            projected = jnp.where(cuts[j] >= min(mats[i].shape), work, projected)
        return jnp.where(finite, projected.astype(mats[i].dtype), mats[i])

    works, cut_ranks = [w for w, _ in sanitized], [ranks[i] for i in cut]
    if defer is not None:
        triplets, verdicts = _gram_triplets(
            works, cut_ranks, None, [_zero_triplets if defer[i] else _thin_svd for i in cut])
        for j, i in enumerate(cut):
            accepted[i] = verdicts[j] | (not defer[i])
    else:
        triplets = _top_triplets(works, cut_ranks, method, cuts,
                                 None if spread is None else spread.pick(cut))
    for j, i in enumerate(cut):
        out[i] = finish(j, triplets[j])
    return out, flags, accepted


def _factors_many(
    mats: list[jax.Array], ranks: list[int], method: str, spread: Spread | None = None,
    defer: Sequence[bool] | None = None,
) -> tuple[list[tuple[jax.Array, jax.Array]], list[jax.Array], list[jax.Array]]:
    """Balanced factors of every matrix, whether each was finite, and whether each result is
    final (``defer``: as :func:`_project_many`)."""
    sanitized = [_sanitize(m) for m in mats]

    def finish(j: int, parts: Triplets) -> tuple[jax.Array, jax.Array]:
        (u, s, vt), finite, dtype = parts, sanitized[j][1], mats[j].dtype
        root = jnp.sqrt(s)
        return (jnp.where(finite, u * root, jnp.nan).astype(dtype),
                jnp.where(finite, root[:, None] * vt, jnp.nan).astype(dtype))

    works = [w for w, _ in sanitized]
    if defer is not None:
        triplets, verdicts = _gram_triplets(
            works, ranks, None, [_zero_triplets if d else _thin_svd for d in defer])
        accepted = [ok | (not d) for ok, d in zip(verdicts, defer, strict=True)]
    else:
        triplets = _top_triplets(works, ranks, method, None, spread)
        accepted = [jnp.ones((), bool)] * len(mats)
    return ([finish(j, t) for j, t in enumerate(triplets)], [finite for _, finite in sanitized],
            accepted)


def _spectrum(matrix: jax.Array) -> jax.Array:
    matrix = matrix.astype(_compute_dtype(matrix.dtype))
    if matrix.shape[1] > matrix.shape[0]:
        matrix = matrix.T
    if matrix.shape[0] >= _QR_FIRST * matrix.shape[1]:
        matrix = jnp.linalg.qr(matrix, mode="r")  # same singular values, a square matrix
    return jnp.linalg.svd(matrix, compute_uv=False)


# ---------------------------------------------------------------------------------------------
# One matrix.


def singular_values(matrix: jax.typing.ArrayLike) -> jax.Array:
    """Singular values of a matrix, largest first, in float32 or wider.

    Raises:
      ValueError: called eagerly on a matrix holding NaN or Inf (under ``jit`` the singular
        values come out NaN instead).

    Example:
      >>> import jax.numpy as jnp
      >>> singular_values(jnp.diag(jnp.array([1.0, 3.0, 2.0])))
      Array([3., 2., 1.], dtype=float32)
    """
    _check_matrix(matrix)
    matrix = jnp.asarray(matrix)
    return _eager_finite(matrix, "its singular values are not finite", *_jit_spectrum(matrix))


@jax.jit
def _jit_spectrum(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _spectrum(matrix), jnp.isfinite(matrix).all()


def project_matrix(
    matrix: jax.typing.ArrayLike,
    rank: int,
    *,
    energy_transfer: bool = True,
    tail_scale: float = 0.0,
    method: Method = "auto",
) -> jax.Array:
    """The best rank-``rank`` approximation of a matrix, with energy transfer by default.

    Args:
      matrix: an ``(m, n)`` floating-point matrix.
      rank: the number of singular values kept, ``1 <= rank <= min(m, n)``.
      energy_transfer: multiply the kept singular values by a common factor so that the Frobenius
        norm is unchanged (LRPET); ``False`` gives the plain Eckart-Young truncation. The zero
        matrix is returned unchanged.
      tail_scale: multiply the dropped singular values by this, ``0 <= tail_scale < 1``, instead
        of zeroing them (a soft projection; ``0`` is the hard one).
      method: ``"auto"``, ``"gram"`` or ``"svd"`` (see the module's documentation).

    Returns:
      The projected matrix, in the input's dtype.

    Raises:
      ValueError: called eagerly on a matrix holding NaN or Inf. Under ``jit``, where nothing can
        be raised, such a matrix is returned unchanged.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.diag(jnp.array([3.0, 4.0]))
      >>> project_matrix(w, 1, energy_transfer=False)
      Array([[0., 0.],
             [0., 4.]], dtype=float32)
      >>> project_matrix(w, 1)  # ||W||_F = 5 is kept
      Array([[0., 0.],
             [0., 5.]], dtype=float32)

    References:
      "Compact Model Training by Low-Rank Projection with Energy Transfer", arXiv:2204.05566.
    """
    _check_matrix(matrix)
    check_method(method)
    check_flag("energy_transfer", energy_transfer)
    tail_scale = check_tail_scale(tail_scale)
    rank = check_rank("matrix", rank, min(jnp.shape(matrix)))
    matrix = jnp.asarray(matrix)
    return _eager_finite(matrix, "it is returned unchanged",
                         *_jit_project(matrix, rank, energy_transfer, tail_scale, method))


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _jit_project(matrix: jax.Array, rank: int, energy_transfer: bool, tail_scale: float,
                 method: str) -> tuple[jax.Array, jax.Array]:
    out, finite, _ = _project_many([matrix], [rank], energy_transfer, tail_scale, method)
    return out[0], finite[0]


def truncated_factors(
    matrix: jax.typing.ArrayLike, rank: int, *, method: Method = "svd"
) -> tuple[jax.Array, jax.Array]:
    """Factors ``A = U_r sqrt(S_r)`` and ``B = sqrt(S_r) V_r^T`` of the rank-``rank`` truncation.

    Args:
      matrix: an ``(m, n)`` floating-point matrix.
      rank: ``1 <= rank <= min(m, n)``.
      method: ``"svd"`` (the default: factors are made once, after training, and are then exactly
        balanced), ``"auto"`` or ``"gram"``. With the Gram path ``A @ B`` is as accurate as the
        projection, but kept singular values closer than ``~1e-7 * s_1^2 / s_i`` may come out
        mixed, so ``A^T A`` and ``B B^T`` are diagonal only to that accuracy.

    Returns:
      ``(A, B)`` of shapes ``(m, rank)`` and ``(rank, n)`` in the input's dtype, balanced (both
      carry ``sqrt(S_r)``), so ``x @ A @ B`` applies the truncated matrix.

    Raises:
      ValueError: called eagerly on a matrix holding NaN or Inf (under ``jit`` both factors come
        out NaN instead).

    Example:
      >>> import jax.numpy as jnp
      >>> a, b = truncated_factors(jnp.diag(jnp.array([4.0, 1.0])), 1)
      >>> (a @ b).round(4)
      Array([[4., 0.],
             [0., 0.]], dtype=float32)
    """
    _check_matrix(matrix)
    check_method(method)
    rank = check_rank("matrix", rank, min(jnp.shape(matrix)))
    matrix = jnp.asarray(matrix)
    return _eager_finite(matrix, "both factors are NaN", *_jit_factors(matrix, rank, method))


@partial(jax.jit, static_argnums=(1, 2))
def _jit_factors(matrix: jax.Array, rank: int, method: str
                 ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    out, finite, _ = _factors_many([matrix], [rank], method)
    return out[0], finite[0]


# ---------------------------------------------------------------------------------------------
# Every selected matrix of a tree, in one jitted call.


def leaf_matrix(leaf: Any, view: MatrixView) -> jax.Array:
    """A selected leaf's matrix (a LoRITa product or factor pair is multiplied out)."""
    return leaf.matrix() if isinstance(leaf, nodes.Product) else view.to_matrix(
        leaf.kernel() if nodes.is_node(leaf) else leaf)


def spectra_of(leaves: Sequence[Any], views: Sequence[MatrixView]
               ) -> tuple[list[jax.Array], jax.Array]:
    """Singular values of each leaf's matrix and whether each was finite (stacked): in the
    caller's trace, or eagerly as jitted programs side by side (:func:`_side_by_side`)."""
    leaves, views = tuple(leaves), tuple(views)
    if is_traced(leaves):
        return _jit_spectra(leaves, views)

    def group(indices: list[int], _: str) -> tuple[list[jax.Array], jax.Array]:
        return _jit_spectra(*_pick(indices, leaves, views))

    return threads.run_limited(_side_by_side, len(leaves), leaves, leaves, views, "svd", group,
                               None)


@partial(jax.jit, static_argnums=(1,))
def _jit_spectra(leaves: tuple[Any, ...], views: tuple[MatrixView, ...]
                 ) -> tuple[list[jax.Array], jax.Array]:
    mats = [leaf_matrix(leaf, v) for leaf, v in zip(leaves, views, strict=True)]
    return [_spectrum(m) for m in mats], _stacked([jnp.all(jnp.isfinite(m)) for m in mats])


def _stacked(flags: list[jax.Array]) -> jax.Array:
    return jnp.stack(flags) if flags else jnp.zeros((0,), bool)


# An SVD of an m x n matrix with m n min(m, n) under this is not worth a program of its own: its
# time is then of the order of a program's dispatch and host sync (svd_projection --parts measures
# both; BENCHMARKS.md).
_OWN_PROGRAM_COST = float(1 << 23)


def _pick(indices: Sequence[int], *sequences: Sequence[Any]) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(sequence[i] for i in indices) for sequence in sequences)


def _side_by_side(leaves: tuple[Any, ...], views: tuple[MatrixView, ...], method: str,
                  group: Any, first: Any) -> tuple[list[Any], jax.Array]:
    """An eager whole-tree call without a mesh, its LAPACK calls side by side on the CPU.

    XLA's CPU runtime runs the decompositions of one program one after the other, each on the
    LAPACK threads of one call (one, under :func:`jaxlr.threads.one_per_call`); programs
    dispatched from several Python threads run at the same time (:func:`threads.concurrently`).
    So, where the CPU has room for two LAPACK calls or more (:func:`threads.workers`):

    * ``"svd"``: the matrices are split into that many groups of about equal SVD cost, one
      program each, all at once;
    * ``"auto"``: one program runs the Gram path of every matrix and keeps the results whose
      error estimates are accepted, with the SVD fallbacks of the small matrices
      (``m n min(m, n) < _OWN_PROGRAM_COST``) inline (``first(deferred)``); then the SVDs of the
      large matrices it rejected, one program per matrix (the set changes from call to call;
      each shape compiles once), run at the same time. The result is the one program's: the SVD
      where it falls back, the Gram path elsewhere.

    ``group(indices, method)`` runs the call on the leaves at ``indices`` (one jitted program)
    and returns ``(per-leaf results, finite flags)``; ``first(deferred)`` returns ``(per-leaf
    results, finite flags, whether each result is final)``. Otherwise (``"gram"``, whose
    products already fill the cores; one matrix; one worker; not on the CPU; no large matrix
    for ``auto``, less than twice that cost in all for ``svd``) it is one program, as before.
    """
    everything = list(range(len(leaves)))
    lanes = threads.workers() if len(leaves) >= 2 and threads.on_cpu(leaves) else 1
    if lanes < 2 or method == "gram":
        return group(everything, method)
    costs = [float(m) * n * min(m, n) for m, n in
             (view.matrix_shape(tuple(leaf.shape)) for leaf, view in zip(leaves, views,
                                                                          strict=True))]
    if method == "auto":
        deferred = tuple(cost >= _OWN_PROGRAM_COST for cost in costs)
        if not any(deferred):
            return group(everything, method)
        values, finite, final = first(deferred)  # the finite flags hold for every matrix
        redo = sorted(np.flatnonzero(~np.asarray(final)).tolist(), key=lambda i: (-costs[i], i))
        values = list(values)
        for i, (results, _) in zip(redo, threads.concurrently(
                [partial(group, [i], "svd") for i in redo], lanes), strict=True):
            values[i] = results[0]
        return values, finite
    if sum(costs) < 2 * _OWN_PROGRAM_COST:
        return group(everything, method)
    groups = threads.balanced(costs, lanes)
    values, finite = [None] * len(leaves), np.zeros(len(leaves), bool)
    for g, (results, flags) in zip(groups, threads.concurrently(
            [partial(group, g, "svd") for g in groups], lanes), strict=True):
        finite[g] = np.asarray(flags)
        for j, i in enumerate(g):
            values[i] = results[j]
    return values, jnp.asarray(finite)


def project_leaves(
    leaves: Sequence[jax.Array],
    views: Sequence[MatrixView],
    ranks: Sequence[int],
    *,
    energy_transfer: bool,
    tail_scale: float,
    method: str,
    traced_ranks: Sequence[jax.Array] | None = None,
    mesh: Any = "auto",
) -> tuple[list[jax.Array], jax.Array]:
    """Projects each leaf through its view onto its rank; returns the leaves and whether each was
    finite (one stacked array).

    ``ranks`` are static; with ``traced_ranks`` they are the static bounds of traced ranks (masked
    path). Runs inline when traced (inside the caller's ``jit``), else as jitted calls
    (:func:`_side_by_side`). The decompositions are spread over ``mesh``
    (:func:`jaxlr.sharding.mesh_of`), and each leaf keeps its sharding.
    """
    spread_over = sharding.mesh_of(leaves, mesh)
    specs = tuple(sharding.spec_of(leaf) for leaf in leaves) if spread_over is not None else None
    args = (tuple(views), tuple(ranks), energy_transfer, tail_scale, method)
    if traced_ranks is not None or is_traced(leaves):
        return _project_leaves(tuple(leaves), *args,
                               None if traced_ranks is None else tuple(traced_ranks), spread_over,
                               specs)
    if spread_over is not None:
        return threads.run_limited(_jit_project_leaves, len(leaves), leaves, tuple(leaves), *args,
                                   None, spread_over, specs)
    leaves, views, ranks = tuple(leaves), tuple(views), tuple(ranks)

    def group(indices: list[int], method: str) -> tuple[list[jax.Array], jax.Array]:
        return _jit_project_leaves(*_pick(indices, leaves, views, ranks), energy_transfer,
                                   tail_scale, method, None)

    def first(deferred: tuple[bool, ...]) -> tuple[list[jax.Array], jax.Array, jax.Array]:
        return _jit_first_projections(leaves, views, ranks, energy_transfer, tail_scale,
                                      deferred)

    return threads.run_limited(_side_by_side, len(leaves), leaves, leaves, views, method, group,
                               first)


def _project_leaves(leaves: tuple[jax.Array, ...], views: tuple[MatrixView, ...],
                    ranks: tuple[int, ...], energy_transfer: bool, tail_scale: float, method: str,
                    traced_ranks: tuple[jax.Array, ...] | None, mesh: Any = None,
                    specs: tuple[Any, ...] | None = None) -> tuple[list[jax.Array], jax.Array]:
    if mesh is not None:
        specs = specs if specs is not None else (None,) * len(leaves)
        layouts, spread = _layouts(leaves, views, mesh, specs)

        def run(leaves: tuple[jax.Array, ...], traced: Any) -> tuple[list[jax.Array], jax.Array]:
            return _project_spread(leaves, layouts, spread, ranks, energy_transfer, tail_scale,
                                   method, traced, specs)

        return _on_mesh(run, leaves, traced_ranks, mesh, (list(specs), P()))
    mats = [v.to_matrix(leaf) for leaf, v in zip(leaves, views, strict=True)]
    projected, flags, _ = _project_many(mats, list(ranks), energy_transfer, tail_scale, method,
                                     None if traced_ranks is None else list(traced_ranks))
    out = [v.from_matrix(p, leaf.shape) for p, leaf, v in zip(projected, leaves, views,
                                                                strict=True)]
    return out, _stacked(flags)


def _first_projections(leaves: tuple[jax.Array, ...], views: tuple[MatrixView, ...],
                       ranks: tuple[int, ...], energy_transfer: bool, tail_scale: float,
                       deferred: tuple[bool, ...]) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """The first phase of an eager ``auto`` projection (:func:`_side_by_side`): each leaf
    projected as ``auto`` does, except a ``deferred`` one whose estimate is not accepted (a
    placeholder); finite flags and whether each result is final."""
    mats = [v.to_matrix(leaf) for leaf, v in zip(leaves, views, strict=True)]
    projected, flags, accepted = _project_many(mats, list(ranks), energy_transfer, tail_scale,
                                               "auto", defer=deferred)
    out = [v.from_matrix(p, leaf.shape) for p, leaf, v in zip(projected, leaves, views,
                                                                strict=True)]
    return out, _stacked(flags), _stacked(accepted)


_jit_first_projections = jax.jit(_first_projections, static_argnums=(1, 2, 3, 4, 5))


def _on_mesh(fn: Any, leaves: Any, traced: Any, mesh: Any, out_specs: Any) -> Any:
    """``fn(leaves, traced)``; traced on a mesh with ``Explicit`` axes, it runs with ``Auto``
    axes (``jax.sharding.auto_axes``) and its outputs get ``out_specs``."""
    if not any(sharding.is_explicit(leaf) for leaf in jax.tree.leaves(leaves)):
        return fn(leaves, traced)
    abstract = mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh
    with jax.sharding.use_abstract_mesh(abstract):
        return jax.sharding.auto_axes(fn, out_sharding=out_specs)(leaves, traced)


def _project_spread(leaves: tuple[jax.Array, ...], layouts: list[Any], spread: Spread,
                    ranks: tuple[int, ...], energy_transfer: bool, tail_scale: float, method: str,
                    traced_ranks: tuple[jax.Array, ...] | None, specs: tuple[Any, ...]
                    ) -> tuple[list[jax.Array], jax.Array]:
    mesh = spread.mesh
    out, flags, previous = [], [], None
    for i, (leaf, layout) in enumerate(zip(leaves, layouts, strict=True)):
        if previous is not None:  # one matrix after the other: the temporaries of one at a time
            leaf = _after(leaf, previous)
        projected, finite, _ = _project_many(
            [layout.to_rows(leaf)], [ranks[i]], energy_transfer, tail_scale, method,
            None if traced_ranks is None else [traced_ranks[i]], spread.pick([i]))
        p = projected[0]
        if spread.sharded[i]:  # rebuilt where the rows are; moved to the leaf's sharding once
            p = sharding.split_rows(p, mesh, specs[i])
        previous = sharding.follow(layout.from_rows(p, leaf.shape), leaves[i], mesh, specs[i])
        out.append(previous)
        flags.extend(finite)
    return out, _stacked(flags)


def _after(x: jax.Array, previous: jax.Array) -> jax.Array:
    """``x``, made to depend on all of ``previous`` (its value unchanged), so that XLA computes
    whatever follows from ``x`` after ``previous``: one matrix's decomposition after the other's,
    with the temporaries of one alive at a time. (An ``optimization_barrier`` orders nothing once
    the SPMD partitioner has run: every Gram matrix was computed first, every kernel's moved copy
    alive at once.) The cost: a pass over ``previous`` and an all-reduce of a scalar."""
    peak = jnp.max(jnp.abs(previous)).astype(x.dtype)
    zero = jnp.where(jnp.isfinite(peak), peak, 0) * 0  # 0, not NaN, whatever ``previous`` holds
    return x + zero


def _layouts(leaves: Sequence[Any], views: Sequence[MatrixView], mesh: Any,
             specs: Sequence[Any] | None = None) -> tuple[list[Any], Spread]:
    """Each leaf's row layout on ``mesh``, and the spread: whether its rows are split over the
    devices (not for a leaf known to be whole on every device: one decomposes it, each rebuilds
    it) and which device decomposes it."""
    layouts = [sharding.RowLayout.of(tuple(leaf.shape), v, mesh.size)
               for leaf, v in zip(leaves, views, strict=True)]
    specs = specs if specs is not None else [sharding.spec_of(leaf) for leaf in leaves]
    split = tuple(not (spec is not None and all(entry is None for entry in spec))
                  for spec in specs)
    owners = sharding.owners([float(layout.tall_shape[1]) ** 3 for layout in layouts], mesh.size)
    return layouts, Spread(mesh, split, tuple(owners))


_jit_project_leaves = jax.jit(_project_leaves, static_argnums=(1, 2, 3, 4, 5, 6, 7, 8))


def factor_leaves(
    leaves: Sequence[Any], views: Sequence[MatrixView], ranks: Sequence[int], *, method: str,
    mesh: Any = "auto",
) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    """Balanced factors ``(A, B)`` of each leaf's matrix at its rank, and whether each matrix was
    finite (one stacked array). On a mesh (:func:`jaxlr.sharding.mesh_of`) the decompositions
    are spread over its devices, ``A`` takes the rows' sharding of the kernel and ``B`` its
    columns' sharding."""
    spread_over = sharding.mesh_of(
        [x for leaf in leaves for x in jax.tree.leaves(leaf)], mesh)
    specs = None
    if spread_over is not None:  # each kernel's spec (a LoRITa product's is not known)
        specs = tuple(None if nodes.is_node(leaf) else sharding.spec_of(leaf) for leaf in leaves)
    args = (tuple(leaves), tuple(views), tuple(ranks), method, spread_over, specs)
    if is_traced(leaves):
        return _factor_leaves(*args)
    if spread_over is not None:
        return threads.run_limited(_jit_factor_leaves, len(leaves), args[0], *args)
    leaves, views, ranks = args[:3]

    def group(indices: list[int], method: str) -> tuple[list[tuple[jax.Array, jax.Array]],
                                                         jax.Array]:
        return _jit_factor_leaves(*_pick(indices, leaves, views, ranks), method, None)

    def first(deferred: tuple[bool, ...]
              ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array, jax.Array]:
        return _jit_first_factors(leaves, views, ranks, deferred)

    return threads.run_limited(_side_by_side, len(leaves), leaves, leaves, views, method, group,
                               first)


def _factor_leaves(leaves: tuple[Any, ...], views: tuple[MatrixView, ...],
                   ranks: tuple[int, ...], method: str, mesh: Any, specs: Any = None
                   ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    if mesh is None:
        mats = [leaf_matrix(leaf, v) for leaf, v in zip(leaves, views, strict=True)]
        pairs, finite, _ = _factors_many(mats, list(ranks), method)
        return pairs, _stacked(finite)
    specs = specs if specs is not None else (None,) * len(leaves)
    factor_specs = [sharding.factor_specs(spec, view) for spec, view in zip(specs, views,
                                                                             strict=True)]
    shapes = [tuple(leaf.shape) for leaf in leaves]
    layouts, spread = _layouts(leaves, views, mesh, specs)

    def run(leaves: tuple[Any, ...], _: Any) -> tuple[list[tuple[jax.Array, jax.Array]],
                                                       jax.Array]:
        pairs, flags = [], []
        for i, (leaf, view, layout) in enumerate(zip(leaves, views, layouts, strict=True)):
            kernel = leaf[...] if nodes.is_node(leaf) else leaf
            if pairs:  # one matrix after the other (:func:`_after`)
                kernel = _after(kernel, pairs[-1][0])
            (a, b), finite, _ = (x[0] for x in _factors_many(
                [layout.to_rows(kernel)], [ranks[i]], method, spread.pick([i])))
            a = layout.to_view(a, shapes[i], view)
            a, b = (b.T, a.T) if layout.transposed else (a, b)
            if factor_specs[i] is not None:
                a, b = (sharding.constrain(x, spread.mesh, spec)
                        for x, spec in zip((a, b), factor_specs[i], strict=True))
            pairs.append((a, b))
            flags.append(finite)
        return pairs, _stacked(flags)

    out_specs = None
    if all(spec is not None for spec in factor_specs):
        out_specs = ([tuple(spec) for spec in factor_specs], P())
    return _on_mesh(run, leaves, None, mesh, out_specs)


_jit_factor_leaves = jax.jit(_factor_leaves, static_argnums=(1, 2, 3, 4, 5))


@partial(jax.jit, static_argnums=(1, 2, 3))
def _jit_first_factors(leaves: tuple[Any, ...], views: tuple[MatrixView, ...],
                       ranks: tuple[int, ...], deferred: tuple[bool, ...]
                       ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array, jax.Array]:
    """The first phase of an eager ``auto`` factorization (:func:`_side_by_side`), as
    :func:`_first_projections`."""
    mats = [leaf_matrix(leaf, v) for leaf, v in zip(leaves, views, strict=True)]
    pairs, finite, accepted = _factors_many(mats, list(ranks), "auto", defer=deferred)
    return pairs, _stacked(finite), _stacked(accepted)


def singular_values_tree(
    tree: Any,
    *,
    filter: matrices.Filter | None = None,  # noqa: A002
    view: matrices.View = None,
) -> dict[str, jax.Array]:
    """Singular values of every selected matrix of a tree, in one jitted call.

    LoRITa products and factor pairs (:mod:`jaxlr.nodes`) count as the kernels they stand for.

    Args:
      tree: a Flax Linen variable dict, an NNX ``State``, an Equinox module or any pytree.
      filter: which matrices (default: every kernel but the output layer,
        :mod:`jaxlr.selection`).
      view: how each leaf is seen as a matrix (:mod:`jaxlr.matrices`).

    Returns:
      ``{key: singular values}``, largest first, in tree order.

    Raises:
      ValueError: if the filter selects nothing, or (called eagerly) a matrix holds NaN or Inf.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.diag(jnp.array([2.0, 5.0]))}}
      >>> singular_values_tree(params)
      {'Dense_0/kernel': Array([5., 2.], dtype=float32)}
    """
    found = selection.matrix_leaves(tree, filter=filter, view=view)
    flat = [leaf for _, leaf in selection.flatten(tree)[0]]
    leaves = [flat[leaf.index] for leaf in found.values()]
    spectra, finite = spectra_of(leaves, [leaf.view for leaf in found.values()])
    if not is_traced(leaves):
        raise_if_nonfinite(list(found), finite)
    return dict(zip(found, spectra, strict=True))
