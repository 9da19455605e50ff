"""Jitted singular-value truncation of matrices and of every selected matrix of a tree.

Three operations, each for one matrix and for a whole tree in one jitted call:

* :func:`singular_values` / :func:`singular_values_tree`: the spectrum, largest first.
* :func:`project_matrix` / :func:`project_tree`: the best rank-``r`` approximation
  ``W_r = U_r S_r V_r^T`` (Eckart-Young), optionally with *energy transfer*, which multiplies the
  kept singular values by ``alpha = sqrt(sum_all s^2 / sum_kept s^2)`` so that
  ``||W_r||_F = ||W||_F`` (LRPET's energy transfer).
* :func:`truncated_factors` / :func:`truncated_factors_tree`: ``A = U_r sqrt(S_r)`` (``m x r``) and
  ``B = sqrt(S_r) V_r^T`` (``r x n``), whose product is the rank-``r`` approximation.

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
Frobenius error, so the result is within ``1e-4`` of the full SVD's. Random (flat) spectra mostly
take the fast path; steeply decaying spectra cut deep in their tail, and spectra with repeated
singular values at the cut, take the SVD. (Under ``vmap`` with a batched predicate, ``cond``
becomes ``select`` and both paths run.) The decompositions of a tree run as a Python loop inside
one ``jit`` (no ``vmap`` over ``eigh``, which has deadlocked on some CPU builds of jaxlib).

**NaN and Inf.** A matrix holding NaN or Inf is never decomposed (its NaN would spread to every
entry). Called eagerly, the tree-level functions raise ``ValueError`` naming the matrix; traced
under ``jit``, such a matrix is returned unchanged and reported in the ``nonfinite`` flags of the
result. The matrix-level functions return the input unchanged (projection) or NaN factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxlr import matrices
from jaxlr.matrices import MatrixLeaf, MatrixView, ViewFn
from jaxlr.ranks import check_rank

__all__ = [
    "Factorization",
    "Method",
    "Projection",
    "project_matrix",
    "project_tree",
    "singular_values",
    "singular_values_tree",
    "thin_svd",
    "truncated_factors",
    "truncated_factors_tree",
]

Method = Literal["auto", "gram", "svd"]
_METHODS = ("auto", "gram", "svd")

# `auto` keeps the Gram result where its estimated relative Frobenius error is below this. The
# estimate was never below 0.8x the measured error (tests/test_svd.py checks spectra of every kind),
# so accepted results stay well inside the 1e-4 that jaxlr promises against the full SVD.
_GRAM_TOLERANCE = 2e-5
_HIGHEST = lax.Precision.HIGHEST


class Projection(NamedTuple):
    """The result of :func:`project_tree`.

    Attributes:
      params: the tree with every ranked matrix replaced by its (energy-transferred) rank-``r``
        projection; every other leaf is the input's own.
      nonfinite: ``{path: bool array}``; ``True`` where the matrix held NaN or Inf and was returned
        unchanged (only possible under ``jit``; eager calls raise instead).
    """

    params: Any
    nonfinite: dict[str, jax.Array]


class Factorization(NamedTuple):
    """The result of :func:`truncated_factors_tree`.

    Attributes:
      factors: ``{path: (A, B)}`` with ``A`` of shape ``(m, r)`` and ``B`` of shape ``(r, n)`` in
        the leaf's dtype; ``A @ B`` is the matrix (through its view) truncated to rank ``r``.
      nonfinite: ``{path: bool array}``; ``True`` where the matrix held NaN or Inf (its factors
        are NaN then; only possible under ``jit``; eager calls raise instead).
    """

    factors: dict[str, tuple[jax.Array, jax.Array]]
    nonfinite: dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------
# Validation, shared by the matrix- and tree-level functions.


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")


def _check_matrix(matrix: Any) -> None:
    if jnp.ndim(matrix) != 2:
        raise ValueError(f"matrix must be 2-D, got shape {jnp.shape(matrix)}.")
    matrices.check_floating("matrix", matrix)


def _is_traced(leaves: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(leaves))


def _raise_if_nonfinite(names: list[str], flags: list[jax.Array]) -> None:
    bad = [name for name, flag in zip(names, flags, strict=True) if bool(flag)]
    if bad:
        raise ValueError(
            f"matrices {bad} hold NaN or Inf; they cannot be decomposed. (Under jit they are "
            "returned unchanged and reported in the result's `nonfinite` flags.)"
        )


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

    On NVIDIA and AMD GPUs JAX's default SVD is Jacobi's (cuSolver ``gesvdj``), accurate to only
    about ``2e-4`` in float32 on a 512 x 512 matrix (reconstruction and orthogonality, measured on
    an H100), where the QR algorithm gives ``4e-6`` for 2.3x the time. On the CPU the default
    (LAPACK's divide and conquer) is both accurate and 8x faster than QR there, so it stays.
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


def _gram_subspace(matrix: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """The top-``rank`` eigenvectors of the Gram matrix of the shorter side (the right singular
    vectors of a tall matrix, the left ones of a wide one), and an estimate of the relative
    Frobenius error of the rank-``rank`` approximation they give."""
    rows, cols = matrix.shape
    gram = (
        jnp.matmul(matrix.T, matrix, precision=_HIGHEST)
        if rows >= cols
        else jnp.matmul(matrix, matrix.T, precision=_HIGHEST)
    )
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram)  # ascending
    top = eigenvectors[:, -rank:][:, ::-1]
    if rank == min(rows, cols):  # nothing is cut: U S V^T = W V V^T = W, whatever the spectrum
        return top, jnp.zeros((), matrix.dtype)
    # Davis-Kahan: rounding of the Gram matrix and of eigh perturbs it by ~eps * s_1^2, which moves
    # the projection by about that over the singular-value gap at the cut.
    sigma = jnp.sqrt(jnp.maximum(eigenvalues[::-1], 0))
    gap = sigma[rank - 1] - sigma[rank]
    largest = eigenvalues[-1]
    norm = jnp.sqrt(jnp.sum(jnp.square(matrix)))
    eps = jnp.finfo(matrix.dtype).eps
    return top, jnp.where(largest > 0, eps * largest / (gap * norm), 0.0)


def _triplets_from_subspace(matrix: jax.Array, top: jax.Array) -> Triplets:
    if matrix.shape[0] >= matrix.shape[1]:
        scaled = jnp.matmul(matrix, top, precision=_HIGHEST)  # U_r S_r
        s = jnp.linalg.norm(scaled, axis=0)
        return scaled / jnp.where(s > 0, s, 1), s, top.T
    scaled = jnp.matmul(top.T, matrix, precision=_HIGHEST)  # S_r V_r^T
    s = jnp.linalg.norm(scaled, axis=1)
    return top, s, scaled / jnp.where(s > 0, s, 1)[:, None]


def _top_triplets(matrices: list[jax.Array], ranks: list[int], method: str) -> list[Triplets]:
    """The top-``rank`` singular triplets of every matrix.

    Under ``auto``, the Gram eigendecompositions come first and one ``cond`` on "every estimate
    is under the tolerance" guards the per-matrix choices, so in the common case the SVD fallbacks
    cost nothing at run time, and a matrix that falls back does not pay for the Gram projection.
    """
    if method == "svd":
        return [_thin_svd(m, r) for m, r in zip(matrices, ranks, strict=True)]
    subspaces = [_gram_subspace(m, r) for m, r in zip(matrices, ranks, strict=True)]

    def all_gram() -> list[Triplets]:
        return [
            _triplets_from_subspace(m, top)
            for m, (top, _) in zip(matrices, subspaces, strict=True)
        ]

    if method == "gram" or not subspaces:
        return all_gram()
    # A NaN estimate (a zero gap over a zero norm) compares False and takes the SVD as well.
    accepted = [estimate <= _GRAM_TOLERANCE for _, estimate in subspaces]

    def each_its_own() -> list[Triplets]:
        return [
            lax.cond(
                ok,
                lambda m=m, top=top: _triplets_from_subspace(m, top),
                lambda m=m, r=r: _thin_svd(m, r),
            )
            for ok, m, r, (top, _) in zip(accepted, matrices, ranks, subspaces, strict=True)
        ]

    return lax.cond(jnp.all(jnp.stack(accepted)), all_gram, each_its_own)


def _sanitize(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The matrix in its compute dtype, zeroed if it holds NaN/Inf, and whether it is finite."""
    finite = jnp.all(jnp.isfinite(matrix))
    work = matrix.astype(_compute_dtype(matrix.dtype))
    return jnp.where(finite, work, 0), finite


def _project_many(
    matrices: list[jax.Array], ranks: list[int], energy_transfer: bool, method: str
) -> list[jax.Array]:
    out = list(matrices)
    cut = [i for i, (m, r) in enumerate(zip(matrices, ranks, strict=True)) if r < min(m.shape)]
    sanitized = [_sanitize(matrices[i]) for i in cut]
    triplets = _top_triplets([w for w, _ in sanitized], [ranks[i] for i in cut], method)
    for i, (work, finite), (u, s, vt) in zip(cut, sanitized, triplets, strict=True):
        if energy_transfer:
            kept = jnp.sum(jnp.square(s))
            total = jnp.sum(jnp.square(work))  # = sum of all s^2
            # A matrix whose kept energy is 0 is the zero matrix: leave it (no 0/0).
            s = s * jnp.where(kept > 0, jnp.sqrt(total / jnp.where(kept > 0, kept, 1)), 1)
        projected = jnp.matmul(u * s, vt, precision=_HIGHEST).astype(matrices[i].dtype)
        out[i] = jnp.where(finite, projected, matrices[i])
    return out


def _factors_many(
    matrices: list[jax.Array], ranks: list[int], method: str
) -> list[tuple[jax.Array, jax.Array]]:
    sanitized = [_sanitize(m) for m in matrices]
    triplets = _top_triplets([w for w, _ in sanitized], ranks, method)
    out = []
    for matrix, (_, finite), (u, s, vt) in zip(matrices, sanitized, triplets, strict=True):
        root = jnp.sqrt(s)
        a = jnp.where(finite, u * root, jnp.nan).astype(matrix.dtype)
        b = jnp.where(finite, root[:, None] * vt, jnp.nan).astype(matrix.dtype)
        out.append((a, b))
    return out


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

    Example:
      >>> import jax.numpy as jnp
      >>> singular_values(jnp.diag(jnp.array([1.0, 3.0, 2.0])))
      Array([3., 2., 1.], dtype=float32)
    """
    _check_matrix(matrix)
    return _jit_spectrum(jnp.asarray(matrix))


@jax.jit
def _jit_spectrum(matrix: jax.Array) -> jax.Array:
    return _spectrum(matrix)


def project_matrix(
    matrix: jax.typing.ArrayLike,
    rank: int,
    *,
    energy_transfer: bool = False,
    method: Method = "auto",
) -> jax.Array:
    """The best rank-``rank`` approximation of a matrix, optionally with energy transfer.

    Args:
      matrix: an ``(m, n)`` floating-point matrix.
      rank: the number of singular values kept, ``1 <= rank <= min(m, n)``.
      energy_transfer: multiply the kept singular values by ``sqrt(sum_all s^2 / sum_kept s^2)``
        so that the Frobenius norm is unchanged (LRPET). The zero matrix is returned unchanged.
      method: ``"auto"``, ``"gram"`` or ``"svd"`` (see the module's documentation).

    Returns:
      The projected matrix, in the input's dtype. A matrix holding NaN or Inf is returned unchanged.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.diag(jnp.array([3.0, 4.0]))
      >>> project_matrix(w, 1)
      Array([[0., 0.],
             [0., 4.]], dtype=float32)
      >>> project_matrix(w, 1, energy_transfer=True)  # ||W||_F = 5 is kept
      Array([[0., 0.],
             [0., 5.]], dtype=float32)

    References:
      "Compact Model Training by Low-Rank Projection with Energy Transfer", arXiv:2204.05566.
    """
    _check_matrix(matrix)
    _check_method(method)
    rank = check_rank("matrix", rank, min(jnp.shape(matrix)))
    return _jit_project(jnp.asarray(matrix), rank, energy_transfer, method)


@partial(jax.jit, static_argnums=(1, 2, 3))
def _jit_project(matrix: jax.Array, rank: int, energy_transfer: bool, method: str) -> jax.Array:
    return _project_many([matrix], [rank], energy_transfer, method)[0]


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

    Example:
      >>> import jax.numpy as jnp
      >>> a, b = truncated_factors(jnp.diag(jnp.array([4.0, 1.0])), 1)
      >>> (a @ b).round(4)
      Array([[4., 0.],
             [0., 0.]], dtype=float32)
    """
    _check_matrix(matrix)
    _check_method(method)
    rank = check_rank("matrix", rank, min(jnp.shape(matrix)))
    return _jit_factors(jnp.asarray(matrix), rank, method)


@partial(jax.jit, static_argnums=(1, 2))
def _jit_factors(matrix: jax.Array, rank: int, method: str) -> tuple[jax.Array, jax.Array]:
    return _factors_many([matrix], [rank], method)[0]


# ---------------------------------------------------------------------------------------------
# Every selected matrix of a tree, in one jitted call.


def _ranked_leaves(
    tree: Any, ranks: Mapping[str, int], view: ViewFn
) -> tuple[list[Any], Any, dict[str, MatrixLeaf], dict[str, int]]:
    """Flattens the tree, finds the leaf of every ranked path and validates each rank."""
    if not ranks:
        raise ValueError("ranks is empty: name at least one matrix to truncate.")
    wanted = set(ranks)
    flat_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [matrices.path_str(matrices.path_names(p)) for p, _ in flat_with_paths]
    missing = sorted(wanted - set(names))
    if missing:
        raise ValueError(
            f"ranks name paths that are not leaves of the tree: {missing}; "
            f"leaves of the tree: {names[:20]}."
        )
    found = matrices.matrix_leaves(
        tree, filter=lambda path, leaf: matrices.path_str(path) in wanted, view=view
    )
    checked = {
        name: check_rank(repr(name), ranks[name], leaf.full_rank) for name, leaf in found.items()
    }
    return [leaf for _, leaf in flat_with_paths], treedef, found, checked


def _plan(found: dict[str, MatrixLeaf], ranks: dict[str, int]) -> tuple[Any, ...]:
    return tuple((leaf.view, ranks[name]) for name, leaf in found.items())


def singular_values_tree(
    tree: Any,
    *,
    filter: matrices.Filter = matrices.is_kernel,  # noqa: A002
    view: ViewFn = matrices.default_view,
) -> dict[str, jax.Array]:
    """Singular values of every selected matrix of a tree, in one jitted call.

    Args:
      tree: a Flax Linen variable dict, an NNX ``State`` or any pytree of arrays.
      filter: which leaves are matrices (default: kernels of >= 2 dimensions).
      view: how each leaf is seen as a matrix (default: :func:`jaxlr.matrices.default_view`).

    Returns:
      ``{path: singular values}``, largest first, in tree order.

    Raises:
      ValueError: if the filter selects nothing, or (called eagerly) a matrix holds NaN or Inf.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.diag(jnp.array([2.0, 5.0]))}}
      >>> singular_values_tree(params)
      {'Dense_0/kernel': Array([5., 2.], dtype=float32)}
    """
    found = matrices.matrix_leaves(tree, filter=filter, view=view)
    flat = jax.tree_util.tree_leaves(tree)
    leaves = tuple(flat[leaf.index] for leaf in found.values())
    views = tuple(leaf.view for leaf in found.values())
    spectra, flags = _jit_spectra_tree(leaves, views)
    if not _is_traced(leaves):
        _raise_if_nonfinite(list(found), list(flags))
    return dict(zip(found, spectra, strict=True))


@partial(jax.jit, static_argnums=(1,))
def _jit_spectra_tree(
    leaves: tuple[jax.Array, ...], views: tuple[MatrixView, ...]
) -> tuple[list[jax.Array], list[jax.Array]]:
    mats = [v.to_matrix(leaf) for leaf, v in zip(leaves, views, strict=True)]
    return [_spectrum(m) for m in mats], [~jnp.all(jnp.isfinite(m)) for m in mats]


def project_tree(
    tree: Any,
    ranks: Mapping[str, int],
    *,
    energy_transfer: bool = False,
    method: Method = "auto",
    view: ViewFn = matrices.default_view,
) -> Projection:
    """Projects every ranked matrix of a tree onto its rank, in one jitted call.

    Args:
      tree: a Flax Linen variable dict, an NNX ``State`` or any pytree of arrays.
      ranks: ``{path: rank}``, e.g. from a policy of :mod:`jaxlr.ranks`; only these leaves change.
      energy_transfer: keep each matrix's Frobenius norm (LRPET); off gives the plain Eckart-Young
        truncation.
      method: ``"auto"`` (Gram fast path where it is accurate, SVD elsewhere), ``"gram"`` or
        ``"svd"``.
      view: how each leaf is seen as a matrix; must be the one the ranks were chosen with.

    Returns:
      A :class:`Projection` ``(params, nonfinite)``; ``params`` has the input's structure, shapes
      and dtypes.

    Raises:
      ValueError: for a path of ``ranks`` that is not in the tree, a rank outside
        ``[1, min(m, n)]``, an unknown method, or (called eagerly) a matrix holding NaN or Inf.
      TypeError: for a non-floating leaf or a rank that is not an int.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.diag(jnp.array([3.0, 4.0])), "bias": jnp.ones(2)}}
      >>> out = project_tree(params, {"Dense_0/kernel": 1}, energy_transfer=True)
      >>> out.params["Dense_0"]["kernel"]
      Array([[0., 0.],
             [0., 5.]], dtype=float32)
    """
    _check_method(method)
    flat, treedef, found, checked = _ranked_leaves(tree, ranks, view)
    leaves = tuple(flat[leaf.index] for leaf in found.values())
    projected, flags = _jit_project_tree(leaves, _plan(found, checked), energy_transfer, method)
    if not _is_traced(leaves):
        _raise_if_nonfinite(list(found), list(flags))
    for leaf, new in zip(found.values(), projected, strict=True):
        flat[leaf.index] = new
    return Projection(
        jax.tree_util.tree_unflatten(treedef, flat), dict(zip(found, flags, strict=True))
    )


@partial(jax.jit, static_argnums=(1, 2, 3))
def _jit_project_tree(
    leaves: tuple[jax.Array, ...], plan: tuple[Any, ...], energy_transfer: bool, method: str
) -> tuple[list[jax.Array], list[jax.Array]]:
    mats = [v.to_matrix(leaf) for leaf, (v, _) in zip(leaves, plan, strict=True)]
    projected = _project_many(mats, [r for _, r in plan], energy_transfer, method)
    out = [
        v.from_matrix(p, leaf.shape)
        for p, leaf, (v, _) in zip(projected, leaves, plan, strict=True)
    ]
    return out, [~jnp.all(jnp.isfinite(m)) for m in mats]


def truncated_factors_tree(
    tree: Any,
    ranks: Mapping[str, int],
    *,
    method: Method = "svd",
    view: ViewFn = matrices.default_view,
) -> Factorization:
    """Balanced factors ``(A, B)`` of every ranked matrix of a tree, in one jitted call.

    Args:
      tree: a Flax Linen variable dict, an NNX ``State`` or any pytree of arrays.
      ranks: ``{path: rank}``.
      method: ``"svd"`` (the default), ``"auto"`` or ``"gram"``, as for :func:`truncated_factors`.
      view: how each leaf is seen as a matrix. For a convolution kernel ``(kh, kw, cin, cout)``,
        ``A.reshape(kh, kw, cin, r)`` is a ``k x k`` convolution with ``r`` filters and ``B`` a
        ``1 x 1`` convolution from ``r`` to ``cout`` channels.

    Returns:
      A :class:`Factorization` ``(factors, nonfinite)``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.ones((6, 4))}}
      >>> a, b = truncated_factors_tree(params, {"Dense_0/kernel": 1}).factors["Dense_0/kernel"]
      >>> a.shape, b.shape
      ((6, 1), (1, 4))
    """
    _check_method(method)
    flat, _, found, checked = _ranked_leaves(tree, ranks, view)
    leaves = tuple(flat[leaf.index] for leaf in found.values())
    factors, flags = _jit_factors_tree(leaves, _plan(found, checked), method)
    if not _is_traced(leaves):
        _raise_if_nonfinite(list(found), list(flags))
    return Factorization(
        dict(zip(found, (tuple(f) for f in factors), strict=True)),
        dict(zip(found, flags, strict=True)),
    )


@partial(jax.jit, static_argnums=(1, 2))
def _jit_factors_tree(
    leaves: tuple[jax.Array, ...], plan: tuple[Any, ...], method: str
) -> tuple[list[tuple[jax.Array, jax.Array]], list[jax.Array]]:
    mats = [v.to_matrix(leaf) for leaf, (v, _) in zip(leaves, plan, strict=True)]
    factors = _factors_many(mats, [r for _, r in plan], method)
    return factors, [~jnp.all(jnp.isfinite(m)) for m in mats]
