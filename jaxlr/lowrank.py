"""Compressed inference: run an unchanged Flax model on low-rank factor pairs.

A truncated kernel of rank ``r``, seen as an ``m x n`` matrix ``W = A B``, costs ``r (m + n)``
parameters and multiply-accumulates per position instead of ``m n`` when it is *run* as two
products. This module runs it so, without touching the model's definition.

The convention is a parameter tree: a kernel to be run in factored form is replaced by a
:class:`LowRank` node holding ``A`` (``m x r``) and ``B`` (``r x n``); every other leaf stays as it
is. :func:`lowrank_params` builds that tree from :func:`jaxlr.compress`'s output, and only where
factoring saves, ``r (m + n) < m n`` (other layers keep their dense truncated kernel). Then

* Flax Linen: :func:`apply` is ``model.apply`` under a Flax method interceptor (:func:`intercept`)
  that runs each ``Dense``, ``DenseGeneral`` (attention's projections) and ``Conv`` whose kernel is
  a :class:`LowRank` in factored form;
* Flax NNX: :func:`nnx_model` returns a copy of the model in which those layers (``Linear``,
  ``LinearGeneral``, ``Conv``) are replaced by :class:`LowRankLayer` modules.

What runs, for input ``x``:

* dense layers: ``x`` contracted with ``A`` (the kernel's input axes, then ``r``), then with ``B``
  (``r``, then the kernel's feature axes), plus the bias;
* convolutions: a convolution with ``r`` filters (kernel ``A`` reshaped to ``(*window, c_in, r)``;
  the layer's strides, padding and dilations), followed by a ``1 x 1`` convolution ``r -> c_out``
  carrying the bias, computed as a product over the channel axis.

Both agree with the dense truncated model up to rounding (``W = A B`` exactly in real arithmetic).
Errors name the layer's path: a factor pair that does not fit the kernel the module expects, a rank
above ``min(m, n)``, a :class:`LowRank` in a module that cannot run it (grouped or masked
convolutions, custom ``dot_general``, ``ConvTranspose``, embeddings, user modules, ...).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import jaxlr
  >>> model = nn.Dense(64)
  >>> x = jnp.ones((2, 128))
  >>> variables = model.init(jax.random.key(0), x)
  >>> result = jaxlr.compress(variables["params"], {"kernel": 8})
  >>> params = lowrank_params(result.params, result.factors)
  >>> params["kernel"].a.shape, params["kernel"].b.shape
  ((128, 8), (8, 64))
  >>> y = apply(model, {"params": params}, x)
  >>> dense = model.apply({"params": result.params}, x)
  >>> bool(jnp.allclose(y, dense, atol=1e-5))
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxlr import matrices
from jaxlr.matrices import MatrixView

__all__ = [
    "LowRank",
    "LowRankLayer",
    "apply",
    "dense_params",
    "intercept",
    "interceptor",
    "is_lowrank",
    "lowrank_params",
    "nnx_model",
]

_HIGHEST = jax.lax.Precision.HIGHEST


def _static_shape(x: Any) -> tuple[int, ...] | None:
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else None


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["a", "b"], meta_fields=["shape", "view"]
)
@dataclasses.dataclass(frozen=True)
class LowRank:
    """A kernel held as a factor pair, ``view.from_matrix(a @ b, shape)``, run in factored form.

    A pytree node: its children are ``a`` and ``b``; the kernel's shape and view are static, so
    ``jit``, orbax and ``jax.tree`` utilities see two ordinary leaves.

    Attributes:
      a: the ``m x r`` left factor (applied to the input first).
      b: the ``r x n`` right factor.
      shape: the shape of the kernel the product stands for.
      view: how that kernel is seen as an ``m x n`` matrix.

    Raises:
      ValueError: at construction, if ``a`` and ``b`` are not matrices that chain into the
        kernel's ``m x n`` matrix, or ``r > min(m, n)``.

    Example:
      >>> import jax.numpy as jnp
      >>> node = LowRank(jnp.ones((4, 1)), jnp.ones((1, 3)), shape=(4, 3),
      ...                view=MatrixView((0,), (1,)))
      >>> node.rank, node.size, node.kernel().shape
      (1, 7, (4, 3))
    """

    a: jax.Array
    b: jax.Array
    shape: tuple[int, ...]
    view: MatrixView

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(
            self, "view", MatrixView(tuple(self.view.row_axes), tuple(self.view.col_axes))
        )
        a_shape, b_shape = _static_shape(self.a), _static_shape(self.b)
        if a_shape is None or b_shape is None:  # placeholders inside jax.tree utilities
            return
        self.view.check(self.shape, "the kernel")
        m, n = self.view.matrix_shape(self.shape)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
            raise ValueError(
                f"factors of shapes {a_shape} and {b_shape} do not chain: a must be m x r and b "
                f"r x n."
            )
        if (a_shape[0], b_shape[1]) != (m, n):
            raise ValueError(
                f"factors of shapes {a_shape} and {b_shape} make a {a_shape[0]} x {b_shape[1]} "
                f"matrix; the kernel of shape {self.shape} is {m} x {n} through {self.view}."
            )
        if not 1 <= a_shape[1] <= min(m, n):
            raise ValueError(
                f"rank {a_shape[1]} is outside [1, {min(m, n)}] for a {m} x {n} kernel."
            )

    @property
    def rank(self) -> int:
        """``r``."""
        return int(jnp.shape(self.a)[1])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)``."""
        return self.view.matrix_shape(self.shape)

    @property
    def size(self) -> int:
        """Parameters held, ``r (m + n)``."""
        m, n = self.matrix_shape
        return self.rank * (m + n)

    def kernel(self) -> jax.Array:
        """The dense kernel ``A B`` in its own shape (for checks; inference never builds it)."""
        return self.view.from_matrix(jnp.matmul(self.a, self.b, precision=_HIGHEST), self.shape)


def is_lowrank(node: Any) -> bool:
    """Whether ``node`` is a :class:`LowRank` (use as ``is_leaf`` in ``jax.tree`` functions)."""
    return isinstance(node, LowRank)


def lowrank_params(
    params: Any,
    factors: Mapping[str, tuple[jax.Array, jax.Array]],
    *,
    view: matrices.ViewFn = matrices.default_view,
) -> Any:
    """Replaces each kernel named in ``factors`` by a :class:`LowRank` node where that saves.

    Args:
      params: the truncated tree (``jaxlr.compress(...).params``), Linen dict or NNX state.
      factors: ``{path: (A, B)}`` (``jaxlr.compress(...).factors``).
      view: how each kernel is seen as a matrix; must be the view the factors were made with.

    Returns:
      The tree with a :class:`LowRank` in place of each kernel with ``r (m + n) < m n``; a pair
      that would not save is multiplied out into the dense kernel instead, as the papers do.

    Raises:
      KeyError: if a path of ``factors`` is not a leaf of ``params``.
      ValueError: if a pair does not fit its kernel or its rank exceeds ``min(m, n)``; the message
        names the path.
    """
    flat_paths = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [matrices.path_str(matrices.path_names(path)) for path, _ in flat_paths]
    missing = sorted(set(factors) - set(names))
    if missing:
        raise KeyError(f"factors given for {missing}, which are not leaves of params: {names}.")
    if not factors:
        return params
    selected = matrices.matrix_leaves(
        params, filter=lambda path, leaf: matrices.path_str(path) in factors, view=view
    )
    flat, treedef = jax.tree_util.tree_flatten(params)
    for name, leaf in selected.items():
        a, b = factors[name]
        try:
            node = LowRank(a, b, leaf.shape, leaf.view)
        except ValueError as error:
            raise ValueError(f"{name!r}: {error}") from None
        m, n = leaf.matrix_shape
        if node.rank * (m + n) < m * n:
            flat[leaf.index] = node
        else:
            flat[leaf.index] = node.kernel().astype(jnp.result_type(flat[leaf.index]))
    return jax.tree_util.tree_unflatten(treedef, flat)


def dense_params(tree: Any) -> Any:
    """Multiplies every :class:`LowRank` node back into its dense kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> tree = {"kernel": LowRank(jnp.ones((4, 1)), jnp.ones((1, 3)), (4, 3),
      ...                           MatrixView((0,), (1,)))}
      >>> dense_params(tree)["kernel"].shape
      (4, 3)
    """
    return jax.tree.map(
        lambda node: node.kernel() if is_lowrank(node) else node, tree, is_leaf=is_lowrank
    )


# --- the factored computations, shared by Linen and NNX -----------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layer:
    """What the factored forward pass needs to know about a layer (static, hashable)."""

    kind: Literal["dense", "conv"]
    axis: tuple[int, ...] = ()  # dense: input axes contracted with the kernel's leading axes
    kernel_size: tuple[int, ...] = ()  # conv
    strides: Any = 1
    padding: Any = "SAME"
    input_dilation: Any = 1
    kernel_dilation: Any = 1
    dtype: Any = None
    precision: Any = None


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _promote(dtype: Any, *arrays: jax.Array | None) -> list[jax.Array | None]:
    present = [x for x in arrays if x is not None]
    dtype = dtype if dtype is not None else jnp.result_type(*present)
    return [None if x is None else jnp.asarray(x, dtype) for x in arrays]


def _add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    if bias is None:
        return y
    return y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)


def _run(layer: _Layer, node: LowRank, bias: jax.Array | None, x: jax.Array) -> jax.Array:
    r = node.rank
    x, a, b, bias = _promote(layer.dtype, x, node.a, node.b, bias)
    if layer.kind == "dense":
        n_in = len(layer.axis)
        a = a.reshape(node.shape[:n_in] + (r,))
        b = b.reshape((r,) + node.shape[n_in:])
        axis = tuple(ax % x.ndim for ax in layer.axis)
        t = jax.lax.dot_general(x, a, ((axis, tuple(range(n_in))), ((), ())), layer.precision)
    else:
        a = a.reshape(node.shape[:-1] + (r,))
        b = b.reshape((r, node.shape[-1]))
        first = nn.Conv(
            features=r,
            kernel_size=layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            input_dilation=layer.input_dilation,
            kernel_dilation=layer.kernel_dilation,
            use_bias=False,
            dtype=a.dtype,
            param_dtype=a.dtype,
            precision=layer.precision,
        )
        t = first.apply({"params": {"kernel": a}}, x)
    y = jax.lax.dot_general(t, b, (((t.ndim - 1,), (0,)), ((), ())), layer.precision)
    return _add_bias(y, bias)


def _check_fits(name: str, node: LowRank, layer: _Layer, kernel_shape: tuple[int, ...]) -> None:
    if node.shape != tuple(kernel_shape):
        raise ValueError(
            f"layer {name!r}: the factor pair stands for a kernel of shape {node.shape}, but the "
            f"module's kernel has shape {tuple(kernel_shape)}."
        )
    rows = len(layer.axis) if layer.kind == "dense" else len(node.shape) - 1
    expected = MatrixView.split(len(node.shape), rows)
    if node.view != expected:
        raise ValueError(
            f"layer {name!r}: the factor pair was made through {node.view}, but the module "
            f"contracts its input with the kernel's leading {rows} axes ({expected})."
        )


def _unsupported(name: str, module: Any, why: str) -> TypeError:
    return TypeError(
        f"layer {name!r} ({type(module).__name__}) holds a LowRank kernel but cannot run it in "
        f"factored form: {why}. Keep it dense (jaxlr.lowrank.dense_params) or leave it out of the "
        f"factors."
    )


def _dense_layer(module: Any, axis: Any) -> _Layer:
    """A dense layer contracting the input's ``axis`` (an int or a sequence) with the kernel."""
    axes = tuple(axis) if isinstance(axis, list | tuple) else (int(axis),)
    return _Layer("dense", axis=axes, dtype=module.dtype, precision=_freeze(module.precision))


def _conv_layer(name: str, module: Any) -> _Layer:
    if module.feature_group_count != 1:
        raise _unsupported(name, module, "grouped convolutions are not factored")
    if module.mask is not None:
        raise _unsupported(name, module, "masked convolutions are not factored")
    return _Layer(
        "conv",
        kernel_size=_freeze(module.kernel_size),
        strides=_freeze(module.strides),
        padding=_freeze(module.padding),
        input_dilation=_freeze(module.input_dilation),
        kernel_dilation=_freeze(module.kernel_dilation),
        dtype=module.dtype,
        precision=_freeze(module.precision),
    )


def _check_plain(name: str, module: Any, *attributes: str) -> None:
    for attribute in attributes:
        value = getattr(module, attribute, None)
        if value is not None and value is not getattr(jax.lax, attribute, None):
            raise _unsupported(name, module, f"it sets a custom {attribute}")


# --- Flax Linen: a method interceptor -----------------------------------------------------------


def _linen_layer(name: str, module: nn.Module) -> _Layer:
    if type(module) is nn.Conv:
        _check_plain(name, module, "conv_general_dilated", "conv_general_dilated_cls")
        return _conv_layer(name, module)
    if type(module) is nn.Dense:
        _check_plain(name, module, "dot_general", "dot_general_cls")
        return _dense_layer(module, -1)
    if type(module) is nn.DenseGeneral:
        _check_plain(name, module, "dot_general", "dot_general_cls")
        if module.batch_dims:
            raise _unsupported(name, module, "batch_dims are not factored")
        return _dense_layer(module, module.axis)
    raise _unsupported(name, module, "only Dense, DenseGeneral and Conv are")


def _linen_kernel_shape(module: nn.Module, layer: _Layer, x: jax.Array) -> tuple[int, ...]:
    features = module.features if isinstance(module.features, tuple | list) else (module.features,)
    if layer.kind == "conv":
        return tuple(layer.kernel_size) + (x.shape[-1],) + tuple(features)
    return tuple(x.shape[ax] for ax in layer.axis) + tuple(features)


def _lowrank_entries(module: nn.Module) -> dict[str, LowRank]:
    if module.scope is None:
        return {}
    params = module.variables.get("params", {})
    return {key: value for key, value in params.items() if is_lowrank(value)}


def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    """The Flax Linen method interceptor behind :func:`intercept` and :func:`apply`.

    Runs a module's ``__call__`` in factored form when its ``kernel`` is a :class:`LowRank`;
    every other call goes through untouched.
    """
    module = context.module
    entries = _lowrank_entries(module)
    if not entries:
        return next_fun(*args, **kwargs)
    name = "/".join(module.path) or type(module).__name__
    extra = sorted(set(entries) - {"kernel"})
    if extra:
        raise _unsupported(name, module, f"its parameters {extra} are LowRank; only kernels can be")
    layer = _linen_layer(name, module)
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if len(args) != 1 or kwargs:
        raise _unsupported(name, module, "it was called with arguments other than its input")
    (x,) = args
    node = entries["kernel"]
    _check_fits(name, node, layer, _linen_kernel_shape(module, layer, x))
    bias = module.get_variable("params", "bias") if module.use_bias else None
    return _run(layer, node, bias, x)


def intercept() -> contextlib.AbstractContextManager:
    """A context in which Flax Linen modules run :class:`LowRank` kernels in factored form.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> model = nn.Dense(3)
      >>> node = LowRank(jnp.ones((4, 1)), jnp.ones((1, 3)), (4, 3), MatrixView((0,), (1,)))
      >>> with intercept():
      ...     y = model.apply({"params": {"kernel": node, "bias": jnp.zeros(3)}}, jnp.ones((1, 4)))
      >>> y
      Array([[4., 4., 4.]], dtype=float32)
    """
    return nn.intercept_methods(interceptor)


def apply(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.apply(variables, *args, **kwargs)`` with :class:`LowRank` kernels run factored.

    Args:
      model: the unchanged Flax Linen module.
      variables: its variables, with :class:`LowRank` nodes in ``params`` (:func:`lowrank_params`).
      *args: passed to ``model.apply``.
      **kwargs: passed to ``model.apply`` (``mutable``, ``method``, ``rngs``, ...).

    Returns:
      What ``model.apply`` returns. Jit it as usual: ``jax.jit(functools.partial(apply, model))``.
    """
    with intercept():
        return model.apply(variables, *args, **kwargs)


# --- Flax NNX: replace the layers ---------------------------------------------------------------


def _get(variable: nnx.Variable) -> Any:
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _set(variable: nnx.Variable, value: Any) -> None:
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


class LowRankLayer(nnx.Module):
    """An NNX layer that runs a :class:`LowRank` kernel in factored form (see :func:`nnx_model`).

    Attributes:
      kernel: ``nnx.Param`` holding the :class:`LowRank` node.
      bias: ``nnx.Param`` holding the bias, or ``None``.
    """

    def __init__(self, kernel: LowRank, bias: jax.Array | None, layer: _Layer):
        self.kernel = nnx.Param(kernel)
        self.bias = None if bias is None else nnx.Param(bias)
        self.layer = layer

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None:
            raise NotImplementedError("LowRankLayer does not take out_sharding.")
        bias = None if self.bias is None else _get(self.bias)
        return _run(self.layer, _get(self.kernel), bias, x)


def _nnx_layer(name: str, module: nnx.Module) -> _Layer:
    if getattr(module, "preferred_element_type", None) is not None:
        raise _unsupported(name, module, "it sets preferred_element_type")
    if type(module) is nnx.Conv:
        _check_plain(name, module, "conv_general_dilated")
        return _conv_layer(name, module)
    if type(module) is nnx.Linear:
        _check_plain(name, module, "dot_general")
        return _dense_layer(module, -1)
    if type(module) is nnx.LinearGeneral:
        _check_plain(name, module, "dot_general", "dot_general_cls")
        if module.batch_axis:
            raise _unsupported(name, module, "batch_axis is not factored")
        return _dense_layer(module, module.axis)
    raise _unsupported(name, module, "only Linear, LinearGeneral and Conv are")


def _child(node: Any, name: str) -> Any:
    if isinstance(node, nnx.Module) and hasattr(node, name):
        return getattr(node, name)
    try:
        return node[int(name) if name.isdigit() and not isinstance(node, Mapping) else name]
    except (KeyError, IndexError, TypeError):
        raise KeyError(name) from None


def _set_child(node: Any, name: str, value: Any) -> None:
    if isinstance(node, nnx.Module) and hasattr(node, name):
        setattr(node, name, value)
    else:
        node[int(name) if name.isdigit() and not isinstance(node, Mapping) else name] = value


def _walk(model: Any, path: tuple[str, ...], leaf: str) -> Iterator[Any]:
    """The nodes from ``model`` down ``path``; ``leaf`` is the params path named in errors."""
    node = model
    yield node
    for i, name in enumerate(path):
        try:
            node = _child(node, name)
        except KeyError:
            raise KeyError(
                f"params has {leaf!r}, but the model has no {name!r} under "
                f"{'/'.join(path[:i]) or 'its root'}."
            ) from None
        yield node


def nnx_model(model: nnx.Module, params: Any) -> nnx.Module:
    """A copy of an NNX model that runs the :class:`LowRank` kernels of ``params`` factored.

    Every leaf of ``params`` is written into the copy; each layer whose ``kernel`` is a
    :class:`LowRank` is replaced by a :class:`LowRankLayer`. The original model is not modified.

    Args:
      model: the NNX model (any values: its structure and settings are what count).
      params: a tree of the model's parameters (``nnx.State`` or the dict of
        ``nnx.to_pure_dict``) with :class:`LowRank` nodes, e.g. from :func:`lowrank_params`.

    Returns:
      The new model; call it as the original.

    Raises:
      KeyError: if a path of ``params`` is not in the model.
      ValueError / TypeError: as :func:`apply`, naming the layer.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> node = LowRank(jnp.ones((4, 1)), jnp.ones((1, 3)), (4, 3), MatrixView((0,), (1,)))
      >>> nnx_model(model, {"kernel": node, "bias": jnp.zeros(3)})(jnp.ones((1, 4)))
      Array([[4., 4., 4.]], dtype=float32)
    """
    model = nnx.clone(model)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lowrank)[0]
    leaves = [(matrices.path_names(path), leaf) for path, leaf in leaves]
    for path, node in leaves:
        if not is_lowrank(node):
            continue
        name = "/".join(path[:-1])
        if path[-1] != "kernel":
            raise TypeError(f"{'/'.join(path)!r}: only kernels can be LowRank.")
        *_, parent, module = (None, *_walk(model, path[:-1], '/'.join(path)))
        layer = _nnx_layer(name or type(module).__name__, module)
        _check_fits(name, node, layer, tuple(jnp.shape(_get(module.kernel))))
        bias = _get(module.bias) if module.bias is not None else None
        if parent is None:  # the model is the layer itself
            model = LowRankLayer(node, bias, layer)
        else:
            _set_child(parent, path[-2], LowRankLayer(node, bias, layer))
    for path, leaf in leaves:
        if is_lowrank(leaf):
            continue
        *_, variable = _walk(model, path, '/'.join(path))
        if not isinstance(variable, nnx.Variable):
            raise KeyError(f"{'/'.join(path)!r} is not a variable of the model.")
        if jnp.shape(_get(variable)) != jnp.shape(leaf):
            raise ValueError(
                f"{'/'.join(path)!r}: the model's variable has shape {jnp.shape(_get(variable))}, "
                f"params gives {jnp.shape(leaf)}."
            )
        _set(variable, leaf)
    return model
