"""Which BatchNorm follows which kernel: found by tracing one forward pass of the user's model.

LRPET's BN rectification (:mod:`jaxlr.projection`) projects a kernel through the BatchNorm that
normalises its output. :func:`find_bn_pairs` finds those pairs by dataflow: it runs the model once
under ``jax.eval_shape`` (nothing is computed), records the output of every layer that has a
``kernel`` and the input of every BatchNorm, and pairs a kernel with a BatchNorm when the
BatchNorm's input *is* that layer's output. So it works whatever the modules are called and however
they are held (``nn.Sequential``, ``nnx.Sequential``, ``nnx.List``, auto names such as ``Conv_0``,
VGG-style ``features_0`` / ``features_1``), and it never pairs a kernel with a BatchNorm its output
does not reach directly: a convolution followed by an activation, a pooling or a residual sum
before the BatchNorm, or by no BatchNorm at all, is left unpaired (its projection is plain). A layer
whose output feeds two BatchNorms, or a BatchNorm fed by two layers, is ambiguous and left out.

:func:`bn_pairs_by_name` is the fallback for a tree without its model: it pairs by the naming rule
``<prefix>conv<suffix>`` -> ``<prefix>bn<suffix>`` / ``<prefix>BatchNorm<suffix>`` in the same
parent module, and can be wrong where names mislead.

Both return ``{kernel key: BatchNorm key}`` (keys as :func:`jaxlr.matrices.path_key`), to pass as
``jaxlr.ProjectionOptions(bn_pairs=...)``. :func:`find_bn_pairs`'s BatchNorm keys are
:class:`BatchNormKey` s: strings that also carry the BatchNorm's ``epsilon``, which the projection
then uses (``ProjectionOptions.bn_epsilon`` serves pairs given as plain strings).

**BN rectification** (paper eq. 16) for the kernels of ``ProjectionOptions.bn_pairs``
(:func:`rectification_scales`, :func:`scale_columns`). With ``a = gamma / sqrt(running_var +
bn_epsilon)`` of the BatchNorm after a kernel (per output channel), the matrix ``M = W diag(a)`` is
projected and ``W <- M_r diag(a / (a^2 + 1e-5))``. A channel whose ``a^2 < 1e-5`` (its BatchNorm
all but silences it) is neither folded nor unfolded: eq. 16's regularised inverse would shrink it
to ``a^2 / 1e-5`` of its size (a BatchNorm with every scale near 0 would shrink the kernel to
nothing). Folding and unfolding are inverse only up to ``a^2 / (a^2 + 1e-5)``, so a BN-rectified
projection of weights already of rank ``<= r`` shrinks each channel by that factor again: after a
last training step that projected, the weights are final; otherwise project them once with the
training's options. ``gamma`` is read from ``params`` and the
running variance from the ``batch_stats`` extra argument: Linen's ``variables["batch_stats"]``
(:class:`jaxlr.TrainState` passes it) or NNX's ``nnx.state(model, nnx.BatchStat)``
(``optimizer.update(model, grads, batch_stats=...)``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlr import _checks, _nnx, matrices, nodes, selection, sharding

__all__ = ["INVERSE_EPSILON", "BatchNormKey", "bn_pairs_by_name", "check_variances",
           "find_bn_pairs", "rectification_scales", "scale_columns", "stats_from"]


class BatchNormKey(str):
    """A BatchNorm's key (a ``str``, equal to and printed as the key) with its ``epsilon``.

    Attributes:
      epsilon: the BatchNorm's epsilon, ``a = gamma / sqrt(var + epsilon)`` in BN rectification.

    Example:
      >>> key = BatchNormKey("block/bn1", epsilon=1e-3)
      >>> key == "block/bn1", key.epsilon
      (True, 0.001)
    """

    epsilon: float

    def __new__(cls, key: str, epsilon: float) -> BatchNormKey:
        if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not epsilon > 0:
            raise ValueError(f"epsilon must be a number > 0, got {epsilon!r}.")
        out = super().__new__(cls, key)
        out.epsilon = float(epsilon)
        return out

    def __reduce__(self) -> tuple[Any, ...]:
        return (BatchNormKey, (str(self), self.epsilon))


def _pairs(outputs: list[tuple[tuple[str, ...], Any]],
           inputs: list[tuple[tuple[str, ...], Any, float]]) -> dict[str, str]:
    """Kernel -> BatchNorm (with its epsilon) where the BatchNorm's input is the kernel layer's
    output object."""
    epsilons = {matrices.path_key(path): epsilon for path, _, epsilon in inputs}
    found: dict[str, set[str]] = {}
    fed: dict[str, set[str]] = {}
    for bn_path, x, _ in inputs:
        owners = {path for path, y in outputs if y is x}
        bn = matrices.path_key(bn_path)
        for owner in owners:
            kernel = matrices.path_key((*owner, "kernel"))
            found.setdefault(kernel, set()).add(bn)
            fed.setdefault(bn, set()).add(kernel)
    return {kernel: BatchNormKey(next(iter(bns)), epsilons[next(iter(bns))])
            for kernel, bns in found.items()
            if len(bns) == 1 and len(fed[next(iter(bns))]) == 1}


def _linen_pairs(model: nn.Module, variables: Any, args: tuple, kwargs: dict) -> dict[str, str]:
    outputs: list[tuple[tuple[str, ...], Any]] = []
    inputs: list[tuple[tuple[str, ...], Any, float]] = []

    def record(next_fun: Callable[..., Any], call_args: tuple, call_kwargs: dict,
               context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*call_args, **call_kwargs)
        if isinstance(module, nn.BatchNorm) and call_args:
            inputs.append((tuple(module.path), call_args[0], module.epsilon))
        out = next_fun(*call_args, **call_kwargs)
        if module.scope is not None and nodes.holds_kernel(
                module.variables.get("params", {}).get("kernel")):
            outputs.append((tuple(module.path), out))
        return out

    kwargs = {**kwargs, "mutable": True}
    kwargs.setdefault("rngs", {"dropout": jax.random.key(0), "params": jax.random.key(0)})
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(nodes.collapse_tree(v), *args, **kwargs), variables)
    return _pairs(outputs, inputs)


def _nnx_pairs(model: Any, args: tuple, kwargs: dict) -> dict[str, str]:
    from flax import nnx  # noqa: PLC0415

    outputs: list[tuple[tuple[str, ...], Any]] = []
    inputs: list[tuple[tuple[str, ...], Any, float]] = []

    def recording(cls: type, path: tuple[str, ...], is_bn: bool) -> type:
        def __call__(self: Any, *call_args: Any, **call_kwargs: Any) -> Any:  # noqa: N807
            if is_bn and call_args:
                inputs.append((path, call_args[0], self.epsilon))
            out = cls.__call__(self, *call_args, **call_kwargs)
            if not is_bn:
                outputs.append((path, out))
            return out

        return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})

    clone = nnx.clone(model)
    for path, node in list(nnx.iter_graph(clone)):
        if not isinstance(node, nnx.Module):
            continue
        is_bn = isinstance(node, nnx.BatchNorm)
        if is_bn or nodes.holds_kernel(getattr(node, "kernel", None)):
            names = tuple(str(p) for p in path)
            object.__setattr__(node, "__class__", recording(type(node), names, is_bn))
    graphdef, state = nnx.split(clone)

    def run(state: Any) -> None:
        nnx.merge(graphdef, state)(*args, **kwargs)

    jax.eval_shape(run, state)
    return _pairs(outputs, inputs)


def find_bn_pairs(model: Any, *args: Any, **kwargs: Any) -> dict[str, str]:
    """``{kernel key: BatchNorm key}`` for every kernel whose output a BatchNorm normalises.

    Runs one forward pass under ``jax.eval_shape`` (shapes only; nothing is computed or changed).

    Args:
      model: a Flax Linen module, or a Flax NNX module.
      *args: Linen: the variables (``{"params": ..., "batch_stats": ...}``; shapes suffice, e.g.
        from ``jax.eval_shape(model.init, ...)``) then the model's inputs. NNX: the model's inputs.
      **kwargs: keyword arguments of the forward pass (``train=True`` ...). Linen runs with
        ``mutable=True``, so the BatchNorms may be in training mode.

    Returns:
      The pairs, keyed as :func:`jaxlr.matrices.path_key` keys the kernels (no ``params``
      prefix); the BatchNorm's key is its module path.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> model = nn.Sequential([nn.Conv(8, (3, 3)), nn.BatchNorm(use_running_average=True),
      ...                        nn.relu, nn.Conv(8, (3, 3))])
      >>> x = jnp.ones((1, 8, 8, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> find_bn_pairs(model, variables, x)          # the second Conv has no BatchNorm after it
      {'layers_0/kernel': 'layers_1'}
    """
    if _nnx.is_module(model):
        return _nnx_pairs(model, args, kwargs)
    if isinstance(model, nn.Module):
        if not args:
            raise TypeError("find_bn_pairs(model, variables, *inputs) needs the Linen model's "
                            "variables, then its inputs.")
        return _linen_pairs(model, args[0], args[1:], kwargs)
    raise TypeError(f"model must be a Flax Linen or NNX module, got {type(model).__name__}.")


_BN_NAMES = ("bn", "BatchNorm", "batchnorm", "batch_norm", "norm")


def bn_pairs_by_name(params: Any, batch_stats: Any) -> dict[str, str]:
    """The naming-rule fallback of :func:`find_bn_pairs`, for a tree without its model.

    A kernel in module ``<prefix>conv<suffix>`` (any case: ``conv1``, ``shortcut_conv``) pairs with
    the module ``<prefix>bn<suffix>`` or ``<prefix>BatchNorm<suffix>`` (``bn1``, ``shortcut_bn``)
    of the same parent that has a running variance in ``batch_stats``. It cannot see dataflow: an
    auto-named ``Conv_0`` pairs with a ``BatchNorm_0`` whether or not the BatchNorm follows it.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"conv1": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn1": {"scale": jnp.ones(4)}}
      >>> bn_pairs_by_name(params, {"bn1": {"mean": jnp.zeros(4), "var": jnp.ones(4)}})
      {'conv1/kernel': 'bn1'}
    """
    stats = {matrices.path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        batch_stats)[0]}
    bn_modules = {path[:-1] for path in stats if path and path[-1] == "var"}
    if bn_modules and all(path[0] == "batch_stats" for path in bn_modules):
        bn_modules = {path[1:] for path in bn_modules}
    pairs = {}
    for path, leaf in selection.flatten(params)[0]:
        if path and path[0] == "params":
            path = path[1:]
        if not (len(path) >= 2 and path[-1] == "kernel" and nodes.holds_kernel(leaf)):
            continue
        match = re.fullmatch(r"(.*?)(conv)(.*)", path[-2], re.I)
        if not match:
            continue
        prefix, _, suffix = match.groups()
        for name in _BN_NAMES:
            candidate = (*path[:-2], f"{prefix}{name}{suffix}")
            if candidate in bn_modules:
                pairs[matrices.path_key(path)] = matrices.path_key(candidate)
                break
    return pairs


# ---------------------------------------------------------------------------------------------
# BN rectification (LRPET, eq. 16): the projection of a kernel through the BatchNorm after it.

INVERSE_EPSILON = 1e-5
"""Paper eq. 16: the regulariser of the inverse of the BatchNorm scale."""


def _named_leaves(tree: Any, strip: str) -> dict[str, Any]:
    out = {}
    for path, leaf in selection.flatten(tree)[0]:
        if path and path[0] == strip:
            path = path[1:]
        out[matrices.path_key(path)] = leaf
    return out


def stats_from(params: Any, batch_stats: Any) -> Any:
    """``batch_stats``, or the ``batch_stats`` collection of a Linen variable dict given as
    ``params``."""
    if batch_stats is None and isinstance(params, Mapping) and "batch_stats" in params \
            and "params" in params:
        return params["batch_stats"]
    return batch_stats


def _check_variance(bn: str, variance: Any) -> None:
    if not _checks.is_traced(variance) and np.any(np.asarray(variance) < 0):
        raise ValueError(f"the running variance {bn + '/var'!r} of batch_stats is negative "
                         "somewhere; a variance is >= 0.")


def check_variances(batch_stats: Any, pairs: Mapping[str, str] | None) -> None:
    """The values of the paired BatchNorms' variances, checked before a jitted update."""
    if batch_stats is None or not pairs:
        return
    stat_leaves = _named_leaves(batch_stats, "batch_stats")
    for bn in set(pairs.values()):
        if f"{bn}/var" in stat_leaves:
            _check_variance(bn, stat_leaves[f"{bn}/var"])


def rectification_scales(params: Any, batch_stats: Any, pairs: Mapping[str, str],
                         widths: Mapping[str, int], epsilon: float, mesh: Any = None
                         ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per kernel of ``pairs`` (``{kernel key: BatchNorm key}``, the kernel's output width in
    ``widths``): the per-channel factors that fold its BatchNorm into it,
    ``a = gamma / sqrt(var + epsilon)`` (a :class:`BatchNormKey`'s own epsilon first), and unfold
    it, ``a / (a^2 + 1e-5)`` (eq. 16); a channel whose ``a^2 < 1e-5`` (silenced by its
    BatchNorm) is neither folded nor unfolded. ``gamma`` is read from ``params`` (1 without a
    scale), the running variance from ``batch_stats``.

    Raises:
      ValueError: without ``batch_stats``, for a BatchNorm without a running variance, a scale or
        variance of another width than the kernel's outputs, or a negative variance.
    """
    if not pairs:
        return {}
    if batch_stats is None:
        raise ValueError(
            "BN rectification needs the BatchNorm statistics: pass "
            "jaxlr.project(params, ..., batch_stats=variables['batch_stats']) (or the whole "
            "variables dict as params); in training, update(updates, state, params, "
            "batch_stats=...) (Linen; jaxlr.TrainState passes them) or optimizer.update(model, "
            "grads, batch_stats=nnx.state(model, nnx.BatchStat)) (NNX).")
    param_leaves = _named_leaves(params, "params")
    stat_leaves = _named_leaves(batch_stats, "batch_stats")
    scales = {}
    for key, bn in pairs.items():
        variance = stat_leaves.get(f"{bn}/var")
        if variance is None:
            raise ValueError(f"bn_pairs pairs {key!r} with the BatchNorm {bn!r}, which has no "
                             f"running variance {bn + '/var'!r} in batch_stats.")
        gamma = param_leaves.get(f"{bn}/scale")
        n = widths[key]
        # The params decide whether the pairing fits; the statistics, whether they are these
        # params' statistics.
        if gamma is not None and np.shape(gamma) != (n,):
            raise ValueError(f"bn_pairs pairs the kernel {key!r} ({n} outputs) with the "
                             f"BatchNorm {bn!r}, whose scale in the params has "
                             f"{np.shape(gamma)} channels: not the BatchNorm that follows it.")
        if np.shape(variance) != (n,):
            fits = (f"the BatchNorm {bn!r} in the params and the kernel {key!r} have {n} channels"
                    if gamma is not None else f"the kernel {key!r} paired with it has {n} "
                    "outputs")
            raise ValueError(f"batch_stats holds a running variance {bn + '/var'!r} of shape "
                             f"{np.shape(variance)}, but {fits}: batch_stats are not the "
                             "statistics of these params.")
        if gamma is None:
            gamma = jnp.ones_like(variance)
        _check_variance(bn, variance)
        a = gamma / jnp.sqrt(variance + getattr(bn, "epsilon", epsilon))
        live = a * a >= INVERSE_EPSILON
        fold, unfold = jnp.where(live, a, 1), jnp.where(live, a / (a * a + INVERSE_EPSILON), 1)
        if mesh is not None and not sharding.is_explicit(fold):
            # Whole on every device: the kernel's sharding must not spread to the BatchNorm.
            whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            fold, unfold = (jax.lax.with_sharding_constraint(x, whole) for x in (fold, unfold))
        scales[key] = (fold, unfold)
    return scales


def scale_columns(leaf: jax.Array, view: matrices.MatrixView, factors: jax.Array) -> jax.Array:
    """``view.from_matrix(view.to_matrix(leaf) * factors)``, without reshaping the leaf (which
    would move a sharded kernel's data): ``factors`` is broadcast over the column axes."""
    cols = tuple(view.col_axes)
    block = jnp.reshape(factors.astype(leaf.dtype), tuple(leaf.shape[a] for a in cols))
    order = tuple(sorted(cols))
    block = jnp.transpose(block, tuple(cols.index(a) for a in order))
    shape = [1] * leaf.ndim
    for a in order:
        shape[a] = leaf.shape[a]
    return leaf * jnp.reshape(block, shape)
