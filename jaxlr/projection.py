"""LRPET: periodic low-rank projection with energy transfer and BatchNorm rectification.

:func:`low_rank_projection` is an optax transformation that goes **last** in a chain::

    optimizer = optax.chain(
        optax.add_decayed_weights(5e-4),
        optax.sgd(schedule, momentum=0.9),
        jaxlr.low_rank_projection(ratio=0.57, every=steps_per_epoch),
    )
    updates, state = optimizer.update(grads, state, params, batch_stats=batch_stats)

On a projection step it sees the weights the step would produce, ``params + updates``, projects
every selected matrix onto its rank (optionally keeping its Frobenius norm: energy transfer, and
optionally through the following BatchNorm: BN rectification) and emits
``projected - params``; on every other step it passes ``updates`` through untouched and computes no
decomposition (``jax.lax.cond`` on an int32 step counter). Under ``vmap`` with a batched predicate
``cond`` becomes ``select`` and both branches run. :func:`project_params` applies the same
projection once, e.g. after the last step so the final weights are exactly of rank ``<= r``.

**Which layers.** By default the convolution kernels (``>= 3``-D kernels outside attention), as the
paper: dense layers, the classifier among them, are left alone. Pass ``filter=`` for others.

**Ranks.** ``ratio=p`` gives ``r = max(1, floor(n - n p))`` with ``n = min(m, n)``; ``ranks=``
takes ``{path: rank}`` or a callable ``(path, (m, n)) -> rank``. Ranks are static, so a training
step compiles once.

**BN rectification** (paper eq. 16). With ``a = gamma / sqrt(running_var + bn_epsilon)`` of the
BatchNorm that follows a kernel (per output channel), the matrix ``M = W diag(a)`` is projected and
``W <- M_r diag(a / (a^2 + 1e-5))``. The BatchNorm is found by name in the same parent module: a
kernel in module ``<prefix>conv<suffix>`` (any case: ``conv1``, ``Conv_0``, ``shortcut_conv``)
pairs with the module ``<prefix>bn<suffix>`` or ``<prefix>BatchNorm<suffix>`` (``bn1``,
``BatchNorm_0``). ``bn_pairs={kernel path: BatchNorm module path}`` overrides it. ``gamma`` is read
from ``params`` (``<bn>/scale``) and the running variance from the ``batch_stats`` extra argument
(``<bn>/var``): Linen's ``variables["batch_stats"]`` or NNX's ``nnx.state(model, nnx.BatchStat)``.
A kernel without a BatchNorm raises, unless ``missing_bn="skip"`` (then it is projected plainly).

**LoRITa trees.** Projecting a :class:`~jaxlr.lorita.Factored` node would need refactoring its
product after every projection, which throws away the optimizer's moments of the old factors;
LRPET trains dense kernels, so factorized trees are rejected with an error.

References:
  "Compact Model Training by Low-Rank Projection with Energy Transfer", arXiv:2204.05566.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlr import lorita, matrices, svd
from jaxlr.ranks import check_fraction, check_rank

__all__ = [
    "LowRankProjectionState",
    "conv_kernels",
    "low_rank_projection",
    "project_params",
]

RankSpec = Mapping[str, int] | Callable[[str, tuple[int, int]], int]

# Paper eq. 16: the regulariser of the inverse of the BatchNorm scale.
_BN_INVERSE_EPSILON = 1e-5


def conv_kernels(path: matrices.Path, leaf: Any) -> bool:
    """The default LRPET filter: kernels of three or more dimensions outside attention modules."""
    if not matrices.is_kernel(path, leaf) or len(jnp.shape(leaf)) < 3:
        return False
    return not any(re.search("attn|attention", m, re.I) or m in ("query", "key", "value")
                   for m in path[:-1])


class LowRankProjectionState(NamedTuple):
    """State of :func:`low_rank_projection`.

    Attributes:
      count: the number of updates so far (int32).
    """

    count: jax.Array


class _Options(NamedTuple):
    ratio: Any
    ranks: RankSpec | None
    energy_transfer: bool
    bn_rectification: bool
    bn_pairs: Mapping[str, str] | None
    bn_epsilon: float
    missing_bn: str
    filter: matrices.Filter
    view: matrices.ViewFn
    method: str


def _options(
    ratio: float | None,
    ranks: RankSpec | None,
    energy_transfer: bool,
    bn_rectification: bool,
    bn_pairs: Mapping[str, str] | None,
    bn_epsilon: float,
    missing_bn: str,
    filter: matrices.Filter,  # noqa: A002
    view: matrices.ViewFn,
    method: str,
) -> _Options:
    if (ratio is None) == (ranks is None):
        raise ValueError("give exactly one of ratio (LRPET's p, in [0, 1)) and ranks.")
    if ratio is not None:
        ratio = check_fraction("ratio", ratio, 0.0, 1.0, low_open=False, high_open=True)
    if ranks is not None and not (callable(ranks) or isinstance(ranks, Mapping)):
        raise TypeError("ranks must be a mapping {path: rank} or a callable (path, shape) -> rank.")
    if missing_bn not in ("raise", "skip"):
        raise ValueError(f"missing_bn must be 'raise' or 'skip', got {missing_bn!r}.")
    if not bn_epsilon > 0:
        raise ValueError(f"bn_epsilon must be > 0, got {bn_epsilon}.")
    if method not in ("auto", "gram", "svd"):
        raise ValueError(f"method must be one of ('auto', 'gram', 'svd'), got {method!r}.")
    return _Options(ratio, ranks, energy_transfer, bn_rectification, bn_pairs, bn_epsilon,
                    missing_bn, filter, view, method)


def _ranks_of(params: Any, options: _Options) -> dict[str, int]:
    """Static ranks of the selected matrices, from shapes only."""
    if any(lorita.is_factored(n) for n in jax.tree.leaves(params, is_leaf=lorita.is_factored)):
        raise ValueError(
            "low-rank projection got a LoRITa-factorized tree; LRPET projects dense kernels "
            "(collapse the tree, or train it with LoRITa's weight decay instead)."
        )
    selected = matrices.matrix_leaves(params, filter=options.filter, view=options.view)
    ranks = {}
    for name, leaf in selected.items():
        n = leaf.full_rank
        if options.ratio is not None:
            rank = max(1, math.floor(n - n * options.ratio))
        elif callable(options.ranks):
            rank = options.ranks(name, leaf.matrix_shape)
        else:
            if name not in options.ranks:
                raise ValueError(f"ranks has no rank for the selected matrix {name!r}.")
            rank = options.ranks[name]
        ranks[name] = check_rank(repr(name), rank, n)
    if not callable(options.ranks) and options.ranks is not None:
        unknown = sorted(set(options.ranks) - set(selected))
        if unknown:
            raise ValueError(f"ranks name paths that the filter does not select: {unknown}.")
    return ranks


def _bn_module(kernel_path: matrices.Path, bn_modules: set[matrices.Path]) -> matrices.Path | None:
    module, parent = kernel_path[-2], kernel_path[:-2]
    match = re.fullmatch(r"(.*?)(conv)(.*)", module, re.I)
    if not match:
        return None
    prefix, _, suffix = match.groups()
    for name in ("bn", "BatchNorm", "batchnorm", "batch_norm", "norm"):
        candidate = (*parent, f"{prefix}{name}{suffix}")
        if candidate in bn_modules:
            return candidate
    return None


def _bn_scales(
    params: Any, batch_stats: Any, ranks: dict[str, int], options: _Options
) -> dict[str, jax.Array]:
    """``a = gamma / sqrt(var + eps)`` per output channel, for every ranked kernel with a BN."""
    if batch_stats is None:
        raise ValueError(
            "BN rectification needs the BatchNorm statistics: call "
            "update(updates, state, params, batch_stats=variables['batch_stats']) (Linen) or "
            "batch_stats=nnx.state(model, nnx.BatchStat) (NNX)."
        )

    def named(tree: Any) -> dict[matrices.Path, Any]:
        return {matrices.path_names(p): leaf
                for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    param_leaves, stat_leaves = named(params), named(batch_stats)
    bn_modules = {p[:-1] for p in stat_leaves if p[-1] == "var"}
    scales = {}
    for name in ranks:
        path = tuple(name.split("/"))
        if options.bn_pairs is not None and name in options.bn_pairs:
            bn = tuple(options.bn_pairs[name].split("/"))
            if bn not in bn_modules:
                raise ValueError(
                    f"bn_pairs pairs {name!r} with {options.bn_pairs[name]!r}, which has no "
                    "running variance in batch_stats."
                )
        else:
            bn = _bn_module(path, bn_modules)
        if bn is None:
            if options.missing_bn == "skip":
                continue
            raise ValueError(
                f"no BatchNorm follows {name!r} by the naming rule (conv* -> bn*/BatchNorm*); "
                "pass bn_pairs={kernel path: BatchNorm path}, or missing_bn='skip'."
            )
        if (*bn, "scale") not in param_leaves:
            raise ValueError(f"BatchNorm {'/'.join(bn)!r} has no scale in params.")
        gamma = param_leaves[(*bn, "scale")]
        variance = stat_leaves[(*bn, "var")]
        scales[name] = gamma / jnp.sqrt(variance + options.bn_epsilon)
    return scales


def _project(params: Any, batch_stats: Any, options: _Options) -> tuple[Any, dict[str, int]]:
    """The projected tree, and the ranks of the matrices it projected."""
    ranks = _ranks_of(params, options)
    if not options.bn_rectification:
        return svd.project_tree(params, ranks, energy_transfer=options.energy_transfer,
                                method=options.method, view=options.view).params, ranks
    scales = _bn_scales(params, batch_stats, ranks, options)

    def scaled(by: Callable[[jax.Array], jax.Array]) -> Callable[[Any, Any], Any]:
        def apply(path: Any, leaf: Any) -> Any:
            name = matrices.path_str(matrices.path_names(path))
            return leaf * by(scales[name]).astype(leaf.dtype) if name in scales else leaf
        return apply

    # Fold diag(a) into the output-channel (last) axis, project, unfold with the regularised
    # inverse a / (a^2 + 1e-5).
    folded = jax.tree_util.tree_map_with_path(scaled(lambda a: a), params)
    projected = svd.project_tree(folded, ranks, energy_transfer=options.energy_transfer,
                                 method=options.method, view=options.view).params
    unfolded = jax.tree_util.tree_map_with_path(
        scaled(lambda a: a / (a * a + _BN_INVERSE_EPSILON)), projected
    )
    return unfolded, ranks


def low_rank_projection(
    ratio: float | None = None,
    *,
    ranks: RankSpec | None = None,
    every: int = 1,
    start: int | None = None,
    end: int | None = None,
    energy_transfer: bool = True,
    bn_rectification: bool = False,
    bn_pairs: Mapping[str, str] | None = None,
    bn_epsilon: float = 1e-5,
    missing_bn: Literal["raise", "skip"] = "raise",
    filter: matrices.Filter = conv_kernels,  # noqa: A002
    view: matrices.ViewFn = matrices.default_view,
    method: svd.Method = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Periodic low-rank projection of the weights (LRPET); goes last in an optax chain.

    Args:
      ratio: LRPET's unique pruning ratio ``p`` in ``[0, 1)``.
      ranks: instead of ``ratio``: ``{path: rank}`` or ``(path, (m, n)) -> rank``.
      every: project after every ``every``-th update (once per epoch in the paper; 1 gives the
        TRP-style every-step baseline).
      start: the number of the first projected update (default: ``every``).
      end: the number of the last update that may project (default: no end).
      energy_transfer: keep each matrix's Frobenius norm (off: plain LRP).
      bn_rectification: project through the following BatchNorm (needs ``batch_stats``).
      bn_pairs: ``{kernel path: BatchNorm module path}`` for kernels the naming rule misses.
      bn_epsilon: the BatchNorm's epsilon (Flax's default is 1e-5).
      missing_bn: ``"raise"`` (default) or ``"skip"`` rectification of kernels without a BN.
      filter: which kernels are projected (default: convolutions, as the paper).
      view: how each kernel is seen as a matrix.
      method: decomposition method of :mod:`jaxlr.svd`.

    Returns:
      A ``GradientTransformationExtraArgs``; its ``update`` takes ``params`` (required) and the
      keyword ``batch_stats``.

    Raises:
      ValueError: for a bad ratio, ranks, ``every < 1``, ``start < 1`` or ``end < start`` (here),
        and for missing ``params``, missing ``batch_stats`` or BatchNorms (when updating).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"Conv_0": {"kernel": jnp.ones((3, 3, 4, 8)) + jnp.eye(8)[:4]}}
      >>> tx = optax.chain(optax.sgd(0.1), low_rank_projection(ratio=0.5, every=2))
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
    options = _options(ratio, ranks, energy_transfer, bn_rectification, bn_pairs, bn_epsilon,
                       missing_bn, filter, view, method)
    for name, value in (("every", every), ("start", start)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    first = every if start is None else start
    if end is not None and (not isinstance(end, int) or end < first):
        raise ValueError(f"end must be an int >= start ({first}), got {end!r}.")

    def init_fn(params: Any) -> LowRankProjectionState:
        del params
        return LowRankProjectionState(count=jnp.zeros([], jnp.int32))

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
                "optimizer.update(grads, state, params)."
            )
        number = state.count + 1  # this update's number, 1-based
        due = (number >= first) & ((number - first) % every == 0)
        if end is not None:
            due = due & (number <= end)

        def projected() -> Any:
            new = optax.apply_updates(params, updates)
            target, ranks = _project(new, batch_stats, options)

            # Projected matrices move to their projection; every other leaf keeps its update.
            def emit(path: Any, update: Any, goal: Any, param: Any) -> Any:
                name = matrices.path_str(matrices.path_names(path))
                return goal - param if name in ranks else update

            return jax.tree_util.tree_map_with_path(emit, updates, target, params)

        updates = jax.lax.cond(due, projected, lambda: updates)
        return updates, LowRankProjectionState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def project_params(
    params: Any,
    ratio: float | None = None,
    *,
    ranks: RankSpec | None = None,
    batch_stats: Any = None,
    energy_transfer: bool = True,
    bn_rectification: bool = False,
    bn_pairs: Mapping[str, str] | None = None,
    bn_epsilon: float = 1e-5,
    missing_bn: Literal["raise", "skip"] = "raise",
    filter: matrices.Filter = conv_kernels,  # noqa: A002
    view: matrices.ViewFn = matrices.default_view,
    method: svd.Method = "auto",
) -> Any:
    """The projection of :func:`low_rank_projection`, applied once to ``params``.

    Use it in a loop of your own, or after the last step so that the final weights are exactly of
    rank ``<= r``. Arguments as :func:`low_rank_projection`.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4)) + jnp.eye(4)[:2]}}
      >>> out = project_params(params, ratio=0.5)
      >>> int(jnp.linalg.matrix_rank(out["Conv_0"]["kernel"].reshape(18, 4)))
      2
    """
    options = _options(ratio, ranks, energy_transfer, bn_rectification, bn_pairs, bn_epsilon,
                       missing_bn, filter, view, method)
    return _project(params, batch_stats, options)[0]
