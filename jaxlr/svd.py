"""Jitted singular-value truncation: the numerical core of every jaxlr method.

The names follow one scheme: a function of one matrix ends in ``_matrix``; the same verb without
it takes a tree (:func:`jaxlr.project` and :func:`jaxlr.compress` are the tree versions of
:func:`project_matrix` and :func:`factor_matrix`). For one matrix:

* :func:`singular_values_matrix`: the spectrum, largest first.
* :func:`project_matrix`: the best rank-``r`` approximation ``W_r = U_r S_r V_r^T`` (Eckart-Young)
  with LRPET's *energy transfer* (on by default, as everywhere in jaxlr): the kept singular values
  are multiplied by ``alpha = sqrt(sum_all s^2 / sum_kept s^2)`` so that ``||W_r||_F = ||W||_F``.
  ``tail_scale`` makes the projection *soft*: the dropped singular values are multiplied by it
  instead of zeroed (``0``, the default, is the hard projection).
* :func:`factor_matrix`: ``A = U_r sqrt(S_r)`` (``m x r``) and ``B = sqrt(S_r) V_r^T``
  (``r x n``), whose product is the rank-``r`` approximation.

For every selected matrix of a tree, in one jitted call: :func:`singular_values`, and the
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

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlr import _checks, _distributed, _linalg, matrices, nodes, selection, sharding, threads
from jaxlr.matrices import MatrixView

__all__ = [
    "factor_leaves",
    "factor_matrix",
    "project_leaves",
    "project_matrix",
    "singular_values",
    "singular_values_matrix",
    "spectra_of",
]

_WHOLE = MatrixView((0,), (1,))  # a matrix seen as itself


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The static settings of one jitted call (hashable: a call compiles once per settings and
    leaf shapes). ``ranks`` are static (the bounds of traced ones on the masked path)."""

    views: tuple[MatrixView, ...]
    ranks: tuple[int, ...]
    method: str = "auto"
    energy_transfer: bool = False
    tail_scale: float = 0.0
    mesh: Any = None  # the mesh the decompositions are spread over, or None
    specs: tuple[Any, ...] | None = None  # each leaf's PartitionSpec on ``mesh``, where known
    deferred: tuple[bool, ...] | None = None  # the first phase of an eager ``auto`` call

    def pick(self, indices: Sequence[int], method: str) -> _Settings:
        """The settings of the leaves at ``indices``, decomposed by ``method``, no mesh."""
        return _Settings(tuple(self.views[i] for i in indices),
                         tuple(self.ranks[i] for i in indices), method, self.energy_transfer,
                         self.tail_scale)


# ---------------------------------------------------------------------------------------------
# One matrix.


def singular_values_matrix(matrix: jax.typing.ArrayLike) -> jax.Array:
    """Singular values of a matrix, largest first, in float32 or wider.

    Raises:
      ValueError: called eagerly on a matrix holding NaN or Inf (under ``jit`` the singular
        values come out NaN instead).

    Example:
      >>> import jax.numpy as jnp
      >>> singular_values_matrix(jnp.diag(jnp.array([1.0, 3.0, 2.0])))
      Array([3., 2., 1.], dtype=float32)
    """
    _checks.check_matrix(matrix)
    matrix = jnp.asarray(matrix)
    return _checks.eager_finite(matrix, "its singular values are not finite",
                                *_jit_spectrum(matrix))


@jax.jit
def _jit_spectrum(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _linalg.spectrum(matrix), jnp.isfinite(matrix).all()


def project_matrix(
    matrix: jax.typing.ArrayLike,
    rank: int,
    *,
    energy_transfer: bool = True,
    tail_scale: float = 0.0,
    method: _checks.Method = "auto",
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
    _checks.check_matrix(matrix)
    _checks.check_method(method)
    _checks.check_flag("energy_transfer", energy_transfer)
    tail_scale = _checks.check_tail_scale(tail_scale)
    rank = _checks.check_rank("matrix", rank, min(jnp.shape(matrix)))
    matrix = jnp.asarray(matrix)
    settings = _Settings((_WHOLE,), (rank,), method, energy_transfer, tail_scale)
    return _checks.eager_finite(matrix, "it is returned unchanged",
                                *_jit_project(matrix, settings))


@partial(jax.jit, static_argnums=(1,))
def _jit_project(matrix: jax.Array, settings: _Settings) -> tuple[jax.Array, jax.Array]:
    out, finite, _ = _linalg.project_many([matrix], list(settings.ranks), settings.energy_transfer,
                                          settings.tail_scale, settings.method)
    return out[0], finite[0]


def factor_matrix(
    matrix: jax.typing.ArrayLike, rank: int, *, method: _checks.Method = "svd"
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
      >>> a, b = factor_matrix(jnp.diag(jnp.array([4.0, 1.0])), 1)
      >>> (a @ b).round(4)
      Array([[4., 0.],
             [0., 0.]], dtype=float32)
    """
    _checks.check_matrix(matrix)
    _checks.check_method(method)
    rank = _checks.check_rank("matrix", rank, min(jnp.shape(matrix)))
    matrix = jnp.asarray(matrix)
    return _checks.eager_finite(matrix, "both factors are NaN",
                                *_jit_factors(matrix, _Settings((_WHOLE,), (rank,), method)))


@partial(jax.jit, static_argnums=(1,))
def _jit_factors(matrix: jax.Array, settings: _Settings
                 ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    out, finite, _ = _linalg.factors_many([matrix], list(settings.ranks), settings.method)
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
    if _checks.is_traced(leaves):
        return _jit_spectra(leaves, views)

    def group(indices: list[int], _: str) -> tuple[list[jax.Array], jax.Array]:
        return _jit_spectra(*_pick(indices, leaves, views))

    return threads.run_limited(_side_by_side, len(leaves), leaves, leaves, views, "svd", group,
                               None)


@partial(jax.jit, static_argnums=(1,))
def _jit_spectra(leaves: tuple[Any, ...], views: tuple[MatrixView, ...]
                 ) -> tuple[list[jax.Array], jax.Array]:
    def run(leaves: tuple[Any, ...], _: Any) -> tuple[list[jax.Array], jax.Array]:
        mats = [leaf_matrix(leaf, v) for leaf, v in zip(leaves, views, strict=True)]
        return ([_linalg.spectrum(m) for m in mats],
                _stacked([jnp.all(jnp.isfinite(m)) for m in mats]))

    return _untyped(run, leaves, None, ([P()] * len(leaves), P()))


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
    leaves = tuple(leaves)
    spread_over = sharding.mesh_of(leaves, mesh)
    specs = tuple(sharding.spec_of(leaf) for leaf in leaves) if spread_over is not None else None
    settings = _Settings(tuple(views), tuple(ranks), method, energy_transfer, tail_scale,
                         spread_over, specs)
    if traced_ranks is not None or _checks.is_traced(leaves):
        return _project_leaves(leaves, settings,
                               None if traced_ranks is None else tuple(traced_ranks))
    if spread_over is not None:
        return threads.run_limited(_jit_project_leaves, len(leaves), leaves, leaves, settings)

    def group(indices: list[int], method: str) -> tuple[list[jax.Array], jax.Array]:
        return _jit_project_leaves(_pick(indices, leaves)[0], settings.pick(indices, method))

    def first(deferred: tuple[bool, ...]) -> tuple[list[jax.Array], jax.Array, jax.Array]:
        return _jit_first_projections(leaves, dataclasses.replace(settings, deferred=deferred))

    return threads.run_limited(_side_by_side, len(leaves), leaves, leaves, settings.views, method,
                               group, first)


def _project_leaves(leaves: tuple[jax.Array, ...], settings: _Settings,
                    traced_ranks: tuple[jax.Array, ...] | None = None
                    ) -> tuple[list[jax.Array], jax.Array]:
    if settings.mesh is not None:
        specs = settings.specs if settings.specs is not None else (None,) * len(leaves)
        layouts, spread = _layouts(leaves, settings.views, settings.mesh, specs)

        def run(leaves: tuple[jax.Array, ...], traced: Any) -> tuple[list[jax.Array], jax.Array]:
            return _project_spread(leaves, layouts, spread, settings, traced, specs)

        return _on_mesh(run, leaves, traced_ranks, settings.mesh, (list(specs), P()))

    def run(leaves: tuple[jax.Array, ...], traced: Any) -> tuple[list[jax.Array], jax.Array]:
        mats = [v.to_matrix(leaf) for leaf, v in zip(leaves, settings.views, strict=True)]
        projected, flags, _ = _linalg.project_many(
            mats, list(settings.ranks), settings.energy_transfer, settings.tail_scale,
            settings.method, None if traced is None else list(traced))
        return [v.from_matrix(p, leaf.shape) for p, leaf, v in zip(
            projected, leaves, settings.views, strict=True)], _stacked(flags)

    return _untyped(run, leaves, traced_ranks, (_specs_or_whole(leaves), P()))


_jit_project_leaves = jax.jit(_project_leaves, static_argnums=(1,))


@partial(jax.jit, static_argnums=(1,))
def _jit_first_projections(leaves: tuple[jax.Array, ...], settings: _Settings
                           ) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """The first phase of an eager ``auto`` projection (:func:`_side_by_side`): each leaf
    projected as ``auto`` does, except a ``settings.deferred`` one whose estimate is not accepted
    (a placeholder); finite flags and whether each result is final."""
    def run(leaves: tuple[jax.Array, ...], _: Any
            ) -> tuple[list[jax.Array], jax.Array, jax.Array]:
        mats = [v.to_matrix(leaf) for leaf, v in zip(leaves, settings.views, strict=True)]
        projected, flags, accepted = _linalg.project_many(
            mats, list(settings.ranks), settings.energy_transfer, settings.tail_scale, "auto",
            defer=settings.deferred)
        return [v.from_matrix(p, leaf.shape) for p, leaf, v in zip(
            projected, leaves, settings.views, strict=True)], _stacked(flags), _stacked(accepted)

    return _untyped(run, leaves, None, (_specs_or_whole(leaves), P(), P()))


def _on_mesh(fn: Any, leaves: Any, traced: Any, mesh: Any, out_specs: Any) -> Any:
    """``fn(leaves, traced)``; traced on a mesh with ``Explicit`` axes, it runs with ``Auto``
    axes (``jax.sharding.auto_axes``) and its outputs get ``out_specs``."""
    if not any(sharding.is_explicit(leaf) for leaf in jax.tree.leaves(leaves)):
        return fn(leaves, traced)
    abstract = mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh
    with jax.sharding.use_abstract_mesh(abstract):
        return jax.sharding.auto_axes(fn, out_sharding=out_specs)(leaves, traced)


def _untyped(fn: Any, leaves: Any, traced: Any, out_specs: Any) -> Any:
    """``fn(leaves, traced)``, the single-device maths, on leaves that may be traced on a mesh of
    ``Explicit`` axes (where one device, or XLA's partitioner, decomposes each matrix): it runs
    with ``Auto`` axes, and its outputs get ``out_specs(explicit leaves' specs)``."""
    typed = [x for x in jax.tree.leaves(leaves) if sharding.is_explicit(x)]
    if not typed:
        return fn(leaves, traced)
    with jax.sharding.use_abstract_mesh(jax.typeof(typed[0]).sharding.mesh):
        return jax.sharding.auto_axes(fn, out_sharding=out_specs)(leaves, traced)


def _specs_or_whole(leaves: Sequence[Any]) -> list[Any]:
    """Each leaf's explicit spec, ``P()`` where it has none."""
    return [sharding.explicit_spec(leaf) or P() for leaf in leaves]


def _project_spread(leaves: tuple[jax.Array, ...], layouts: list[Any],
                    spread: _distributed.Spread, settings: _Settings,
                    traced_ranks: tuple[jax.Array, ...] | None, specs: tuple[Any, ...]
                    ) -> tuple[list[jax.Array], jax.Array]:
    mesh = spread.mesh
    out, flags, previous = [], [], None
    for i, (leaf, layout) in enumerate(zip(leaves, layouts, strict=True)):
        if previous is not None:  # one matrix after the other: the temporaries of one at a time
            leaf = _after(leaf, previous)
        projected, finite, _ = _linalg.project_many(
            [layout.to_rows(leaf)], [settings.ranks[i]], settings.energy_transfer,
            settings.tail_scale, settings.method,
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
             specs: Sequence[Any] | None = None) -> tuple[list[Any], _distributed.Spread]:
    """Each leaf's row layout on ``mesh``, and the spread: whether its rows are split over the
    devices (not for a leaf known to be whole on every device: one decomposes it, each rebuilds
    it) and which device decomposes it."""
    layouts = [sharding.RowLayout.of(tuple(leaf.shape), v, mesh.size)
               for leaf, v in zip(leaves, views, strict=True)]
    specs = specs if specs is not None else [sharding.spec_of(leaf) for leaf in leaves]
    split = tuple(not (spec is not None and all(entry is None for entry in spec))
                  for spec in specs)
    owners = sharding.owners([float(layout.tall_shape[1]) ** 3 for layout in layouts], mesh.size)
    return layouts, _distributed.Spread(mesh, split, tuple(owners))


def factor_leaves(
    leaves: Sequence[Any], views: Sequence[MatrixView], ranks: Sequence[int], *, method: str,
    mesh: Any = "auto",
) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    """Balanced factors ``(A, B)`` of each leaf's matrix at its rank, and whether each matrix was
    finite (one stacked array). On a mesh (:func:`jaxlr.sharding.mesh_of`) the decompositions
    are spread over its devices, ``A`` takes the rows' sharding of the kernel and ``B`` its
    columns' sharding."""
    leaves = tuple(leaves)
    spread_over = sharding.mesh_of(
        [x for leaf in leaves for x in jax.tree.leaves(leaf)], mesh)
    specs = None
    if spread_over is not None:  # each kernel's spec (a LoRITa product's is not known)
        specs = tuple(None if nodes.is_node(leaf) else sharding.spec_of(leaf) for leaf in leaves)
    settings = _Settings(tuple(views), tuple(ranks), method, mesh=spread_over, specs=specs)
    if _checks.is_traced(leaves):
        return _factor_leaves(leaves, settings)
    if spread_over is not None:
        return threads.run_limited(_jit_factor_leaves, len(leaves), leaves, leaves, settings)

    def group(indices: list[int], method: str) -> tuple[list[tuple[jax.Array, jax.Array]],
                                                         jax.Array]:
        return _jit_factor_leaves(_pick(indices, leaves)[0], settings.pick(indices, method))

    def first(deferred: tuple[bool, ...]
              ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array, jax.Array]:
        return _jit_first_factors(leaves, dataclasses.replace(settings, deferred=deferred))

    return threads.run_limited(_side_by_side, len(leaves), leaves, leaves, settings.views, method,
                               group, first)


def _factor_leaves(leaves: tuple[Any, ...], settings: _Settings
                   ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
    views, ranks, method, mesh = settings.views, settings.ranks, settings.method, settings.mesh
    if mesh is None:
        def plain(leaves: tuple[Any, ...], _: Any
                  ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array]:
            mats = [leaf_matrix(leaf, v) for leaf, v in zip(leaves, views, strict=True)]
            pairs, finite, _ = _linalg.factors_many(mats, list(ranks), method)
            return pairs, _stacked(finite)

        return _untyped(plain, leaves, None, ([(P(), P())] * len(leaves), P()))
    specs = settings.specs if settings.specs is not None else (None,) * len(leaves)
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
            (a, b), finite, _ = (x[0] for x in _linalg.factors_many(
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


_jit_factor_leaves = jax.jit(_factor_leaves, static_argnums=(1,))


@partial(jax.jit, static_argnums=(1,))
def _jit_first_factors(leaves: tuple[Any, ...], settings: _Settings
                       ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array, jax.Array]:
    """The first phase of an eager ``auto`` factorization (:func:`_side_by_side`), as
    :func:`_jit_first_projections`."""
    def run(leaves: tuple[Any, ...], _: Any
            ) -> tuple[list[tuple[jax.Array, jax.Array]], jax.Array, jax.Array]:
        mats = [leaf_matrix(leaf, v) for leaf, v in zip(leaves, settings.views, strict=True)]
        pairs, finite, accepted = _linalg.factors_many(mats, list(settings.ranks), "auto",
                                                       defer=settings.deferred)
        return pairs, _stacked(finite), _stacked(accepted)

    return _untyped(run, leaves, None, ([(P(), P())] * len(leaves), P(), P()))


def singular_values(
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
      >>> singular_values(params)
      {'Dense_0/kernel': Array([5., 2.], dtype=float32)}
    """
    if isinstance(tree, jax.Array | np.ndarray):
        raise TypeError("singular_values takes a tree of kernels; for one matrix call "
                        "jaxlr.svd.singular_values_matrix(matrix).")
    found = selection.matrix_leaves(tree, filter=filter, view=view)
    flat = [leaf for _, leaf in selection.flatten(tree)[0]]
    leaves = [flat[leaf.index] for leaf in found.values()]
    spectra, finite = spectra_of(leaves, [leaf.view for leaf in found.values()])
    if not _checks.is_traced(leaves):
        _checks.raise_if_nonfinite(list(found), finite)
    return dict(zip(found, spectra, strict=True))
