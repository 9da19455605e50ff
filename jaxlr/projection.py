"""LRPET: periodic low-rank projection with energy transfer and BatchNorm rectification.

Three entry points share one :class:`ProjectionOptions` and one rank specification (``prune=``,
``keep=`` or ``ranks=``, exactly one):

* :func:`with_low_rank_projection` wraps any optax optimizer, so the projection cannot be put in
  the wrong place::

      optimizer = jaxlr.with_low_rank_projection(
          optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9)),
          prune=0.57, every=steps_per_epoch, options=jaxlr.ProjectionOptions(bn_pairs=pairs))

* :func:`low_rank_projection` is the same projection as a transformation that goes **last** in an
  optax chain (``optax.chain(..., jaxlr.low_rank_projection(...))``). Put anywhere else, the
  transformations after it would rescale its output; the update after its first projection
  detects that (for free): it raises when ``update`` runs outside ``jit``, and inside ``jit``
  counts it in the state's ``misplaced`` (``check_placement="raise"`` raises there too, at the
  cost of JAX's fast dispatch path).
* :func:`project` applies the projection once, e.g. after the last step so the final weights are
  exactly of rank ``<= r``.

On a projection step the transformation sees the weights the step would produce,
``params + updates``, projects every selected matrix onto its rank and emits
``projected - params``; other leaves keep their updates bit for bit, and on every other step it
passes ``updates`` through and computes no decomposition: the projection runs in a
``jax.lax.while_loop`` that runs once when an int32 step counter says it is due and not at all
otherwise, so the updates stay in place. (The branches of a ``jax.lax.cond`` write the whole
update tree to buffers of their own at every step, which costs a step that does not project
more than the loop does; ``experiments/benchmarks/lrpet_overhead.py`` measures it, BENCHMARKS.md
holds the figures. The loop is not reverse-differentiable, so neither is the update.) Under
``vmap`` with a batched counter the loop runs while any batch member is due and keeps the others'
updates.

**Ranks.** ``prune=p`` gives each selected matrix ``r = max(1, floor(n - n p))`` with
``n = min(m, n)`` (LRPET's unique pruning ratio; :func:`jaxlr.lsvt_ranks` is the one rule);
``keep=k`` the same with ``keep = 1 - prune``; ``ranks=`` a :class:`jaxlr.Ranks`, a mapping
``{path: rank}`` or a function of the params returning one (from their shapes: it is called while
tracing). Python numbers give static ranks and the fast path. ``prune`` or ``keep`` may instead be
a schedule (a function of the step, e.g. ``optax.linear_schedule(0.0, 0.7, 10_000)`` for gradual
compression), and :func:`low_rank_projection` works with ``optax.inject_hyperparams`` (any of
``prune``, ``keep``, ``every``, ``start``, ``end`` becomes a hyperparameter): then the rank is
traced, every singular triplet is formed and those beyond the rank are masked, so shapes stay static
and the step compiles once.

**Which layers.** By default jaxlr's default selection (:mod:`jaxlr.selection`): every kernel but
the model's output layer, the selection every entry point makes, so ``jaxlr.compress`` with the
training's request and options cuts exactly what was projected. The paper projects the
convolutions only: ``ProjectionOptions(filter="conv")``. With ``ranks=``, exactly the matrices it
names.

**BN rectification** (paper eq. 16) projects the kernels of ``ProjectionOptions.bn_pairs``
(:func:`jaxlr.find_bn_pairs`) through the BatchNorm after them (the maths:
:mod:`jaxlr.batchnorm`); the running variances come from the ``batch_stats`` extra argument:
Linen's ``variables["batch_stats"]`` (:class:`jaxlr.TrainState` passes it) or NNX's
``nnx.state(model, nnx.BatchStat)`` (``optimizer.update(model, grads, batch_stats=...)``).

**Soft projection.** ``ProjectionOptions(tail_scale=f)`` multiplies the dropped singular values by
``f`` instead of zeroing them (the LRPET release's ``--redu_fac``); energy transfer then scales the
kept ones so that the Frobenius norm is still unchanged.

**NaN and Inf.** A matrix holding NaN or Inf is left unchanged; the state's ``nonfinite`` counts
those of the last projection, for logging.

**LoRITa trees** are refused: projecting a product would need refactoring it after every
projection, which throws away the optimizer's moments of the old factors.

References:
  "Compact Model Training by Low-Rank Projection with Energy Transfer", arXiv:2204.05566.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxlr import (
    _checks,
    _nnx,
    _placement,
    batchnorm,
    inference,
    matrices,
    nodes,
    policies,
    selection,
    sharding,
    svd,
)
from jaxlr import options as options_lib
from jaxlr.options import ProjectionOptions

__all__ = [
    "LowRankProjectionState",
    "low_rank_projection",
    "project",
    "with_low_rank_projection",
]

class LowRankProjectionState(NamedTuple):
    """State of :func:`low_rank_projection`.

    Attributes:
      count: the number of updates so far (int32).
      nonfinite: matrices left unchanged at the last projection because they held NaN or Inf.
      misplaced: updates whose weights showed that the last projection had been changed by a
        transformation after this one (it is not last in its chain); see ``check_placement``.
      pending: whether the last update projected (its result is checked at the next update).
      sketch: per projected matrix, two random sketches ``u^T M v`` of the weights before the last
        projection and two of its result, and the result's Frobenius norm (``(L, 5)``): the next
        update's weights must equal the result, which only holds when the transformation is last.
      ranks: per projected matrix, the rank of the last projection (int32 ``(L,)``, 0 before the
        first), in the order of
        ``jaxlr.selection.matrix_leaves(params, filter=options.filter)``: what a
        schedule reached, readable under ``jit`` for logging.
      kept: the fraction of singular values the last projection kept, the mean over the matrices
        of rank / full rank (float32; 0 before the first), the papers' "retained singular
        values".

    Its repr is one line: the counters, ``kept`` and the ranks, not the internal sketch.
    """

    count: jax.Array
    nonfinite: jax.Array
    misplaced: jax.Array
    pending: jax.Array
    sketch: jax.Array
    ranks: jax.Array
    kept: jax.Array

    def __repr__(self) -> str:
        def read(x: Any) -> str:
            if isinstance(x, jax.core.Tracer) or not hasattr(x, "shape"):
                return f"{type(x).__name__}"
            return np.array2string(np.asarray(x), separator=",", max_line_width=np.inf,
                                   threshold=np.inf) if np.ndim(x) else \
                str(np.asarray(x).item())
        fields = [f"{name}={read(getattr(self, name))}" for name in
                  ("count", "nonfinite", "misplaced", "pending", "kept", "ranks")]
        return f"LowRankProjectionState({', '.join(fields)})"


# ---------------------------------------------------------------------------------------------
# What is projected, and to which rank.


class _Plan(NamedTuple):
    """The projected matrices (static): their keys, leaves, and ranks (bounds when traced)."""

    keys: tuple[str, ...]
    leaves: tuple[selection.MatrixLeaf, ...]
    ranks: tuple[int, ...]
    traced: bool


def _refuse_nodes(params: Any) -> None:
    held = {type(n) for n in jax.tree.leaves(params, is_leaf=nodes.is_node) if nodes.is_node(n)}
    if nodes.Product in held:
        raise ValueError(
            "low-rank projection got a LoRITa-factorized tree; LRPET projects dense kernels "
            "(collapse the tree, or train it with LoRITa's weight decay instead).")
    if nodes.LowRank in held:
        raise ValueError("low-rank projection got a tree of factor pairs (LowRank): it is "
                         "compressed already; project the dense tree (jaxlr.collapse).")


def _plan(params: Any, spec: policies.RankRequest, options: ProjectionOptions) -> _Plan:
    _refuse_nodes(params)
    if options.bn_pairs:
        present = {matrices.path_key(path) for path, _ in selection.flatten(params)[0]}
        unknown = sorted(set(options.bn_pairs) - present)
        if unknown:
            raise ValueError(f"bn_pairs name kernels that are not in the params: {unknown}; "
                             f"leaves of the params: {sorted(present)[:20]}.")
    if spec.traced:  # every selected matrix, its rank traced and bounded by its full rank
        found = selection.matrix_leaves(params, filter=options.filter, view=options.view)
        bounds = tuple(leaf.full_rank for leaf in found.values())
        return _Plan(tuple(found), tuple(found.values()), bounds, True)
    try:
        chosen, found = policies.select(params, spec, filter=options.filter, view=options.view)
    except jax.errors.ConcretizationTypeError as error:
        raise TypeError(
            "the ranks function read the values of the params, which are traced during a "
            "training step; compute a Ranks beforehand (e.g. jaxlr.gsvt_ranks(params, ...)) "
            "and pass it as ranks=.") from error
    return _Plan(tuple(found), tuple(found.values()), tuple(chosen.values()), False)


_PLANS: collections.OrderedDict[Any, _Plan] = collections.OrderedDict()
_PLANS_KEPT = 32
_PLANS_LOCK = threading.Lock()


def _by_structure(choice: Any) -> bool:
    """Whether a filter or view decides from the tree's structure and shapes alone: given by name,
    as kind names or as one :class:`jaxlr.MatrixView` (a function might read the values)."""
    return choice is None or isinstance(choice, str | matrices.MatrixView) or (
        isinstance(choice, tuple) and all(isinstance(kind, str) for kind in choice))


def _plan_key(params: Any, spec: policies.RankRequest, options: ProjectionOptions) -> Any:
    """What the plan of an eager :func:`project` depends on, or ``None`` where that is not only
    the tree's structure, shapes and dtypes (a function of the params for ``ranks``, a filter or
    view function), or is not hashable."""
    if spec.traced or not (_by_structure(options.filter) and _by_structure(options.view)):
        return None
    if spec.ranks is None:
        rank_key = (spec.name, spec.fraction)
    elif isinstance(spec.ranks, Mapping):
        rank_key = tuple(spec.ranks.items())
    else:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shapes = tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves)
    key = (treedef, shapes, rank_key, options)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cached_plan(params: Any, spec: policies.RankRequest, options: ProjectionOptions) -> _Plan:
    """:func:`_plan`, reused for calls on trees of the same structure, shapes and dtypes with the
    same ranks and options (an eager call's planning costs about as much as decomposing a small
    network's matrices); recomputed where the plan could depend on the values."""
    key = _plan_key(params, spec, options)
    if key is None:
        return _plan(params, spec, options)
    with _PLANS_LOCK:
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
            return plan
    plan = _plan(params, spec, options)  # raises for bad input: nothing is kept then
    with _PLANS_LOCK:
        _PLANS[key] = plan
        while len(_PLANS) > _PLANS_KEPT:  # the least recently used go first
            _PLANS.popitem(last=False)
    return plan


def _traced_ranks(plan: _Plan, spec: policies.RankRequest, count: jax.Array
                  ) -> list[jax.Array] | None:
    if not plan.traced:
        return None
    value = spec.fraction(count) if callable(spec.fraction) else spec.fraction
    value = jnp.asarray(value, jnp.float32)
    kept = 1 - value if spec.name == "prune" else value
    return [policies.traced_local_rank(leaf.full_rank, kept) for leaf in plan.leaves]


# ---------------------------------------------------------------------------------------------
# The projection.


def _project(params: Any, batch_stats: Any, plan: _Plan, traced: list[jax.Array] | None,
             options: ProjectionOptions) -> tuple[Any, list[jax.Array]]:
    """The projected tree (every unprojected leaf the input's own) and the finiteness flags."""
    flat, treedef = selection.flatten(params)
    leaves = [leaf for _, leaf in flat]
    mesh = sharding.mesh_of([leaves[leaf.index] for leaf in plan.leaves], options.mesh)
    given = options.bn_pairs or {}
    pairs = {key: given[key] for key in plan.keys if key in given}
    widths = {key: plan.leaves[plan.keys.index(key)].matrix_shape[1] for key in pairs}
    scales = batchnorm.rectification_scales(params, batch_stats, pairs, widths,
                                            options.bn_epsilon, mesh)
    folded = []
    for key, leaf in zip(plan.keys, plan.leaves, strict=True):
        array = leaves[leaf.index]
        if key in scales:  # fold diag(a) into the output channels (the matrix's columns)
            array = batchnorm.scale_columns(array, leaf.view, scales[key][0])
        folded.append(array)
    projected, flags = svd.project_leaves(
        folded, [leaf.view for leaf in plan.leaves], plan.ranks,
        energy_transfer=options.energy_transfer, tail_scale=options.tail_scale,
        method=options.method, traced_ranks=traced, mesh=mesh)
    for key, leaf, new in zip(plan.keys, plan.leaves, projected, strict=True):
        if key in scales:  # unfold with the regularised inverse a / (a^2 + 1e-5)
            new = batchnorm.scale_columns(new, leaf.view, scales[key][1])
        leaves[leaf.index] = new
    return jax.tree_util.tree_unflatten(treedef, leaves), flags


def project(
    params: Any,
    ranks: policies.RankSpec | None = None,
    *,
    prune: float | None = None,
    keep: float | None = None,
    batch_stats: Any = None,
    options: ProjectionOptions | None = None,
) -> Any:
    """The projection of :func:`low_rank_projection`, applied once to ``params``.

    Use it in a loop of your own, or after the last step so that the final weights are exactly of
    rank ``<= r``. Repeated calls on trees of the same structure, shapes and dtypes, with the same
    ranks and options, reuse the selection of the matrices and their ranks (and the compiled
    decompositions); the selection is made again on every call where a ``ranks``, ``filter`` or
    ``view`` function could read the values.

    Args:
      params: the parameter tree (a Linen variable dict, whose ``batch_stats`` are then used, or
        its ``params``; an NNX ``State``; any pytree), or an NNX module (a projected copy is
        returned; its BatchNorm statistics are used).
      ranks: a :class:`jaxlr.Ranks`, ``{path: rank}`` or a function of the params returning one.
      prune: instead of ``ranks``: the fraction of singular values pruned, in ``[0, 1)``.
      keep: instead of ``ranks``: the fraction kept, in ``(0, 1]``.
      batch_stats: the BatchNorm statistics of the pairs of ``options.bn_pairs`` (BN
        rectification); not read without pairs, as in the optimizer's update, so one call can
        serve both.
      options: :class:`ProjectionOptions` (default: energy transfer, the default selection).

    Returns:
      The projected tree, with the input's structure, shapes and dtypes.

    Raises:
      ValueError: for a bad rank specification, a path not in the tree, missing BatchNorm
        statistics, or (called eagerly) a matrix holding NaN or Inf.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4)) + jnp.eye(4)[:2]}}
      >>> out = project(params, prune=0.5)
      >>> int(jnp.linalg.matrix_rank(out["Conv_0"]["kernel"].reshape(18, 4)))
      2
    """
    options = options_lib.resolve(options)
    spec = policies.rank_request(ranks=ranks, keep=keep, prune=prune)
    if spec.traced:
        raise TypeError("project takes a fixed prune or keep fraction; schedules belong to "
                        "low_rank_projection.")
    if _nnx.is_module(params):
        from flax import nnx  # noqa: PLC0415

        if batch_stats is None and options.bn_pairs:
            batch_stats = nnx.to_pure_dict(nnx.state(params, nnx.BatchStat))
        tree = project(_nnx.parameters(params), ranks, prune=prune, keep=keep,
                       batch_stats=batch_stats, options=options)
        return inference.nnx_model(params, tree)
    plan = _cached_plan(params, spec, options)
    out, flags = _project(params, batchnorm.stats_from(params, batch_stats), plan, None, options)
    if not _checks.is_traced(out):
        _checks.raise_if_nonfinite(plan.keys, flags)
    return out


def _check_step(name: str, value: Any, low: int) -> Any:
    """Validates ``every`` / ``start`` / ``end``: an int (or a scalar int array, as
    ``optax.inject_hyperparams`` passes it) ``>= low``."""
    if value is None:
        return None
    if isinstance(value, jax.Array | np.ndarray):
        if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.integer):
            raise TypeError(f"{name} must be an int, got an array of shape {jnp.shape(value)} "
                            f"and dtype {jnp.result_type(value)}.")
        if not isinstance(value, jax.core.Tracer) and int(value) < low:
            raise ValueError(f"{name} must be an int >= {low}, got {int(value)}.")
        return value
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}.")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}.")
    return int(value)


def _matrices_of(tree: Any, plan: _Plan) -> list[jax.Array]:
    leaves = [leaf for _, leaf in selection.flatten(tree)[0]]
    return [leaf.view.to_matrix(leaves[leaf.index]) for leaf in plan.leaves]


def _misplaced(params: Any, state: LowRankProjectionState, plan: _Plan) -> jax.Array:
    """Whether a transformation after this one changed the last projection (:mod:`_placement`)."""
    flat = selection.flatten(params)[0]
    dtypes = [jnp.result_type(flat[leaf.index][1]) for leaf in plan.leaves]
    return _placement.misplaced(lambda: _matrices_of(params, plan), dtypes, state.sketch,
                                state.pending)


def _when_due(due: jax.Array, projected: Callable[[Any], tuple[Any, ...]], updates: Any,
              *kept: jax.Array) -> tuple[Any, ...]:
    """``projected(updates)`` if ``due``, else ``(updates, *kept)`` as they are.

    A ``while_loop`` that runs at most once: its carry is updated in place, so a step that does not
    project leaves the updates where they are. The branches of a ``lax.cond`` write their outputs
    to buffers of their own, which cost a copy of the whole update tree on every step.
    """
    def body(carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
        _, values = carry
        out = projected(values[0])
        # The carry's types exactly (a weakly typed update stays weakly typed).
        out = jax.tree.map(lambda o, v: lax.convert_element_type(o, v.dtype)
                           if o.dtype != v.dtype else o, out, values)
        return jnp.ones((), bool), out

    _, values = lax.while_loop(lambda carry: due & ~carry[0], body,
                               (jnp.zeros((), bool), (updates, *kept)))
    return values


@_checks.by_name(0, "prune= or keep=")
def low_rank_projection(
    *,
    prune: float | Callable[[jax.Array], Any] | None = None,
    keep: float | Callable[[jax.Array], Any] | None = None,
    ranks: policies.RankSpec | None = None,
    every: int = 1,
    start: int | None = None,
    end: int | None = None,
    options: ProjectionOptions | None = None,
    check_placement: bool | Literal["raise"] = True,
) -> optax.GradientTransformationExtraArgs:
    """Periodic low-rank projection of the weights (LRPET); goes last in an optax chain.

    Args:
      prune: LRPET's unique pruning ratio ``p`` in ``[0, 1)``, or a schedule of it.
      keep: instead: the fraction of singular values kept, in ``(0, 1]``, or a schedule of it.
      ranks: instead: a :class:`jaxlr.Ranks`, ``{path: rank}`` or a function of the params
        returning one.
      every: project after every ``every``-th update (once per epoch in the paper; 1 gives the
        TRP-style every-step baseline).
      start: the number of the first projected update (default: ``every``).
      end: the number of the last update that may project (default: no end).
      options: :class:`ProjectionOptions` (energy transfer, BN pairs, filter, ...).
      check_placement: check, at the update after a projection, that the weights are its result
        (they are not when the transformation is not last in its chain and they changed). ``True``
        (the default): the check costs nothing on other steps; a failure raises at once when
        ``update`` runs outside ``jit``, and inside ``jit`` is counted in the state's
        ``misplaced``. ``"raise"``: raise inside ``jit`` as well, through a host callback (which
        takes the step off JAX's fast dispatch path, a cost per step). ``False``: no
        check (for weights changed on purpose between steps).

    Returns:
      A ``GradientTransformationExtraArgs``; its ``update`` takes ``params`` (required) and the
      keyword ``batch_stats`` (for BN rectification).

    Raises:
      ValueError / TypeError: for a bad rank specification, ``every < 1``, ``start < 1`` or
        ``end < start`` (here); for missing ``params`` or ``batch_stats`` (when updating).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"Conv_0": {"kernel": jnp.ones((3, 3, 4, 8)) + jnp.eye(8)[:4]}}
      >>> tx = optax.chain(optax.sgd(0.1), low_rank_projection(prune=0.5, every=2))
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> for _ in range(2):
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> int(jnp.linalg.matrix_rank(params["Conv_0"]["kernel"].reshape(36, 8)))
      4

    References:
      "Compact Model Training by Low-Rank Projection with Energy Transfer", arXiv:2204.05566.
    """
    spec = policies.rank_request(ranks=ranks, keep=keep, prune=prune)
    options = options_lib.resolve(options)
    if not (isinstance(check_placement, bool) or check_placement == "raise"):
        raise TypeError(f"check_placement must be True, False or 'raise', got "
                        f"{check_placement!r}.")
    every = _check_step("every", every, 1)
    start = _check_step("start", start, 1)
    first = every if start is None else start
    end = _check_step("end", end, 1)
    if end is not None and not any(isinstance(v, jax.core.Tracer) for v in (end, first)) and \
            int(end) < int(first):
        raise ValueError(f"end must be an int >= start ({int(first)}), got {int(end)}.")

    def init_fn(params: Any) -> LowRankProjectionState:
        plan = _plan(params, spec, options)
        return LowRankProjectionState(
            count=jnp.zeros([], jnp.int32), nonfinite=jnp.zeros([], jnp.int32),
            misplaced=jnp.zeros([], jnp.int32), pending=jnp.zeros([], bool),
            sketch=jnp.zeros((len(plan.keys), 2 * _placement.SKETCHES + 1), jnp.float32),
            ranks=jnp.zeros((len(plan.keys),), jnp.int32), kept=jnp.zeros([], jnp.float32))

    def step(updates: Any, state: LowRankProjectionState, params: Any,
             batch_stats: Any) -> tuple[Any, LowRankProjectionState, jax.Array]:
        """The update, the new state, and whether the last projection was found undone."""
        plan = _plan(params, spec, options)
        if state.sketch.shape[0] != len(plan.keys):
            raise ValueError(f"the projection state was made for {state.sketch.shape[0]} "
                             f"matrices, the params have {len(plan.keys)}: init it with these "
                             "params.")
        found = _misplaced(params, state, plan) if check_placement else jnp.zeros((), bool)
        if check_placement == "raise":
            jax.debug.callback(_placement.raise_if_misplaced, found)
        number = state.count + 1  # this update's number, 1-based
        due = (number >= first) & ((number - first) % every == 0)
        if end is not None:
            due = due & (number <= end)
        traced = _traced_ranks(plan, spec, state.count)

        if traced is None:
            ranks = jnp.asarray(plan.ranks, jnp.int32).reshape(len(plan.keys))
        else:
            ranks = jnp.stack([jnp.asarray(r, jnp.int32) for r in traced]) if traced else \
                jnp.zeros((0,), jnp.int32)
        full = jnp.asarray([leaf.full_rank for leaf in plan.leaves], jnp.float32)
        kept = jnp.mean(ranks / full) if plan.keys else jnp.ones([], jnp.float32)

        def projected(updates: Any) -> tuple[Any, ...]:
            new = optax.apply_updates(params, updates)
            target, flags = _project(new, batch_stats, plan, traced, options)
            goals = _matrices_of(target, plan)
            sketch = jnp.concatenate([
                _placement.sketches(_matrices_of(params, plan)), _placement.sketches(goals),
                jnp.stack([jnp.linalg.norm(g.astype(jnp.float32)) for g in goals])[:, None]
                if goals else jnp.zeros((0, 1), jnp.float32)], axis=1)
            skipped = jnp.sum(~flags, dtype=jnp.int32)
            keys = set(plan.keys)

            # Projected matrices move to their projection; every other leaf keeps its update.
            def emit(path: Any, update: Any, goal: Any, param: Any) -> Any:
                return goal - param if matrices.path_key(path) in keys else update

            out = jax.tree_util.tree_map_with_path(emit, updates, target, params)
            return out, skipped, sketch, ranks, kept.astype(jnp.float32)

        out, nonfinite, sketch, last_ranks, last_kept = _when_due(
            due, projected, updates, state.nonfinite, state.sketch, state.ranks, state.kept)
        # The logged ranks keep the state's own sharding (else a mesh may shard them, and the
        # next step compiles again for the new input sharding).
        last_ranks = sharding.follow(last_ranks, state.ranks)
        return out, LowRankProjectionState(
            count=optax.safe_int32_increment(state.count), nonfinite=nonfinite,
            misplaced=state.misplaced + found.astype(jnp.int32), pending=due,
            sketch=sketch, ranks=last_ranks, kept=last_kept), found

    # Called outside jit, the update runs as one jitted function: compiled once per structure of
    # its arguments, where the branches of an eager cond would be compiled anew at every call.
    eager_step = jax.jit(step)

    def update_fn(
        updates: Any,
        state: LowRankProjectionState,
        params: Any = None,
        *,
        batch_stats: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, LowRankProjectionState]:
        del extra_args
        if params is None:
            raise ValueError(
                "low_rank_projection needs params: put it last in the optax chain and call "
                "optimizer.update(grads, state, params).")
        if _checks.is_traced((updates, state, params, batch_stats)):
            out, new_state, _ = step(updates, state, params, batch_stats)
            return out, new_state
        batchnorm.check_variances(batch_stats, options.bn_pairs)
        out, new_state, found = eager_step(updates, state, params, batch_stats)
        if check_placement is True:
            _placement.raise_if_misplaced(found)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@_checks.by_name(1, "prune= or keep=")
def with_low_rank_projection(
    optimizer: optax.GradientTransformation,
    *,
    prune: float | Callable[[jax.Array], Any] | None = None,
    keep: float | Callable[[jax.Array], Any] | None = None,
    ranks: policies.RankSpec | None = None,
    every: int = 1,
    start: int | None = None,
    end: int | None = None,
    options: ProjectionOptions | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` followed by :func:`low_rank_projection`: the projection cannot be misplaced.

    Arguments after ``optimizer`` as :func:`low_rank_projection`. Extra arguments of ``update``
    (``batch_stats``) reach both; an optimizer that takes none ignores them.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"Conv_0": {"kernel": jnp.ones((3, 3, 4, 8)) + jnp.eye(8)[:4]}}
      >>> tx = with_low_rank_projection(optax.sgd(0.1, momentum=0.9), prune=0.5)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> int(jnp.linalg.matrix_rank(params["Conv_0"]["kernel"].reshape(36, 8)))
      4
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got "
                        f"{type(optimizer).__name__}.")
    projection = low_rank_projection(prune=prune, keep=keep, ranks=ranks, every=every, start=start,
                                     end=end, options=options)
    return optax.chain(optimizer, projection)
