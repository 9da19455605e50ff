"""Compressed inference: run an unchanged Flax model on low-rank factor pairs.

A truncated kernel of rank ``r``, seen as an ``m x n`` matrix ``W = A B``, costs ``r (m + n)``
parameters and multiply-accumulates per position instead of ``m n`` when it is *run* as two
products. This module runs it so, without touching the model's definition. The kernels to run that
way are :class:`~jaxlr.nodes.LowRank` factor pairs (:func:`jaxlr.compress` puts them where they
save); every other leaf stays as it is.

* Flax Linen: :func:`apply` is ``model.apply`` under a Flax method interceptor
  that runs each ``Dense``, ``DenseGeneral`` (attention's projections) and ``Conv`` whose kernel is
  a :class:`~jaxlr.nodes.LowRank` in factored form (LoRITa products run as the kernels they stand
  for, as with ``model.apply``), so it runs any tree jaxlr makes.
* Flax NNX: :func:`nnx_model` returns a copy of a model holding a given tree: each layer
  (``Linear``, ``LinearGeneral``, ``Conv``) whose kernel is a factor pair is replaced by a
  :class:`LowRankLayer` (its ``kernel`` is the :class:`~jaxlr.nodes.LowRank` of ``nnx.Param``
  factors, so ``model.fc1.kernel[...]`` still reads the dense kernel); LoRITa products become
  products of ``nnx.Param`` factors. :func:`jaxlr.compress` of an NNX module returns such a copy.

What runs, for input ``x``:

* dense layers: ``x`` contracted with ``A`` (the kernel's input axes, then ``r``), then with ``B``
  (``r``, then the kernel's feature axes), plus the bias;
* convolutions: a convolution with ``r`` filters (kernel ``A`` reshaped to ``(*window, c_in, r)``;
  the layer's strides, padding and dilations), followed by a ``1 x 1`` convolution ``r -> c_out``
  carrying the bias, computed as a product over the channel axis.

Both agree with the dense truncated model up to rounding (``W = A B`` exactly in real arithmetic).
On a mesh with ``Explicit`` axes (sharded factors or inputs) ``A`` is gathered before use, as FSDP
gathers a weight, and split as the input is on the contracted axes (row-parallel layers add their
partial sums over the mesh); ``B`` keeps its column split unless that mesh axis splits the batch;
:class:`LowRankLayer` takes ``out_sharding`` as ``nnx.Linear`` does.
A Linen kernel layer that cannot run a pair factored (a grouped or masked convolution, a custom
``dot_general``, ``ConvTranspose``, a user module) runs the kernel the pair stands for, as
``model.apply`` does: the parameters stay factored, its products are dense. NNX layers are replaced,
so :func:`nnx_model` refuses such a layer. Errors name the layer's path: a factor pair that does not
fit the kernel the module expects, a :class:`~jaxlr.nodes.LowRank` outside a kernel (an
embedding), a layer NNX cannot replace.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import jaxlr
  >>> model = nn.Dense(64)
  >>> x = jnp.ones((2, 128))
  >>> variables = model.init(jax.random.key(0), x)
  >>> params = jaxlr.compress(variables["params"], {"kernel": 8}).compressed
  >>> params["kernel"].a.shape, params["kernel"].b.shape
  ((128, 8), (8, 64))
  >>> y = apply(model, {"params": params}, x)
  >>> dense = model.apply({"params": jaxlr.collapse(params)}, x)
  >>> bool(jnp.allclose(y, dense, atol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from jaxlr import _nnx, matrices, nodes, sharding
from jaxlr.matrices import MatrixView
from jaxlr.nodes import LowRank, Product

__all__ = [
    "LowRankLayer",
    "ProductLayer",
    "apply",
    "nnx_model",
    "ordered",
    "product_cost",
    "product_order",
]

_HIGHEST = jax.lax.Precision.HIGHEST


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


def _contract(layer: _Layer, kernel: jax.Array, x: jax.Array) -> jax.Array:
    """The layer's own computation with ``kernel`` (its input axes first, then any outputs)."""
    if layer.kind == "dense":
        n_in = len(layer.axis)
        axis = tuple(ax % x.ndim for ax in layer.axis)
        return jax.lax.dot_general(x, kernel, ((axis, tuple(range(n_in))), ((), ())),
                                   layer.precision)
    conv = nn.Conv(
        features=kernel.shape[-1],
        kernel_size=layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        input_dilation=layer.input_dilation,
        kernel_dilation=layer.kernel_dilation,
        use_bias=False,
        dtype=kernel.dtype,
        param_dtype=kernel.dtype,
        precision=layer.precision,
    )
    return conv.apply({"params": {"kernel": kernel}}, x)


def _explicit(x: Any) -> bool:
    """Whether ``x`` is typed on a mesh with ``Explicit`` axes (its sharding is in its type)."""
    return sharding.explicit_spec(x) is not None


def _entries(x: jax.Array) -> tuple[Any, ...]:
    """``x``'s partition spec, one entry per axis (``x`` typed on an ``Explicit`` mesh)."""
    spec = tuple(sharding.explicit_spec(x))
    return spec + (None,) * (x.ndim - len(spec))


def _axis_names(entries: Any) -> set[str]:
    return {name for entry in entries if entry is not None
            for name in (entry if isinstance(entry, tuple) else (entry,))}


def _to(x: jax.Array, entries: Any) -> jax.Array:
    """``x`` (on an ``Explicit`` mesh) resharded to ``entries``; as it is when already so."""
    entries = tuple(entries)
    if _entries(x) == entries:
        return x
    return jax.sharding.reshard(x, PartitionSpec(*entries))


def _run_explicit(layer: _Layer, node: LowRank, a: jax.Array, b: jax.Array, x: jax.Array,
                  out_sharding: Any) -> jax.Array:
    """The two thin products on a mesh with ``Explicit`` axes, where every result's sharding must
    be determined: ``A`` is gathered (FSDP's gather of a weight before its use: ``m r`` values)
    and split on its input axes as ``x`` is on the axes they contract (a row-parallel layer: the
    partial sums are added over the mesh); ``B``'s rank axis is whole, its feature axis split as
    given unless that mesh axis already splits the batch; ``out_sharding`` is the second
    product's."""
    r = node.rank
    n_in = len(layer.axis) if layer.kind == "dense" else len(node.shape) - 1
    x_entries = _entries(x)
    if layer.kind == "dense":
        contracted_axes = [ax % x.ndim for ax in layer.axis]
        contracted = [x_entries[ax] for ax in contracted_axes]
        kept = [e for i, e in enumerate(x_entries) if i not in contracted_axes]
    else:  # a convolution contracts the window and the channels: the channels made whole
        x = _to(x, (*x_entries[:-1], None))
        contracted, kept = [None] * n_in, list(x_entries[:-1])
    a = _to(_to(a, (None, None)).reshape(node.shape[:n_in] + (r,)), (*contracted, None))
    if _axis_names(contracted):
        t = jax.lax.dot_general(x, a, ((tuple(contracted_axes), tuple(range(n_in))), ((), ())),
                                layer.precision, out_sharding=PartitionSpec(*kept, None))
    else:
        t = _contract(layer, a, x)
    features = node.shape[n_in:]
    col = _entries(b)[1]
    if len(features) != 1 or _axis_names([col]) & _axis_names(kept):
        col = None
    b = _to(b, (None, col)).reshape((r,) + features)
    return jax.lax.dot_general(t, b, (((t.ndim - 1,), (0,)), ((), ())), layer.precision,
                               out_sharding=out_sharding)


def _run(layer: _Layer, node: Any, bias: jax.Array | None, x: jax.Array,
         out_sharding: Any = None) -> jax.Array:
    """The layer with a :class:`LowRank` kernel run as two thin products (or a dense kernel)."""
    if not isinstance(node, LowRank):  # a dense kernel (e.g. after jaxlr.collapse)
        x, kernel, bias = _promote(layer.dtype, x, nodes.value_of(node), bias)
        return _add_bias(_contract(layer, kernel, x), bias)
    r = node.rank
    x, a, b, bias = _promote(layer.dtype, x, nodes.value_of(node.a), nodes.value_of(node.b), bias)
    if any(_explicit(v) for v in (x, a, b)):
        y = _run_explicit(layer, node, a, b, x, out_sharding)
        if bias is not None and _explicit(bias):
            bias = _to(bias, _entries(y)[y.ndim - bias.ndim:])
        return _add_bias(y, bias)
    n_in = len(layer.axis) if layer.kind == "dense" else len(node.shape) - 1
    t = _contract(layer, a.reshape(node.shape[:n_in] + (r,)), x)
    b = b.reshape((r,) + node.shape[n_in:])
    y = jax.lax.dot_general(t, b, (((t.ndim - 1,), (0,)), ((), ())), layer.precision,
                            out_sharding=out_sharding)
    return _add_bias(y, bias)


def _prefix_costs(shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Multiply-accumulates of ``W_1 @ ... @ W_j`` (matrices of ``shapes``) from the left and
    from the right."""
    m, last = shapes[0][0], shapes[-1][1]
    if len(shapes) == 1:
        return 0, 0
    left = sum(m * a * b for a, b in shapes[1:])
    right = sum(a * b * last for a, b in shapes[1:-1]) + m * shapes[0][1] * last
    return left, right


def _check_chain(rows: Any, shapes: Any) -> list[tuple[int, int]]:
    """``shapes`` as a list of ``(k_{i-1}, k_i)`` pairs, checked: a chain of at least one matrix
    whose sizes are positive integers, and ``rows`` an integer >= 0."""
    if isinstance(rows, bool) or not isinstance(rows, int | np.integer) or rows < 0:
        raise ValueError(f"rows must be an integer >= 0 (the input rows the kernel meets), got "
                         f"{rows!r}.")
    chain = [tuple(shape) for shape in shapes]
    if not chain or any(len(shape) != 2 or any(
            isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 for k in shape)
            for shape in chain):
        raise ValueError(f"shapes must be one or more (rows, columns) pairs of positive "
                         f"integers, got {shapes!r}.")
    for (_, inner), (following, _) in zip(chain, chain[1:], strict=False):
        if inner != following:
            raise ValueError(f"shapes must chain (each matrix's columns the next one's rows), got "
                             f"{shapes!r}.")
    return chain


def product_cost(rows: int, shapes: Sequence[tuple[int, int]], j: int) -> int:
    """Multiply-accumulates of a layer whose kernel is the product of matrices of ``shapes``,
    run with its ``j`` leading factors multiplied into the kernel (the cheaper way round) and the
    rest applied to the activations, for ``rows`` input rows.

    Raises:
      ValueError: for ``rows`` below 0, shapes that do not chain, or ``j`` outside
        ``[1, len(shapes)]``.

    Example:
      >>> product_cost(10, [(4, 3), (3, 2)], 2)  # 4 x 3 x 2 for the product, 10 x 4 x 2 to run
      104
      >>> product_cost(10, [(4, 3), (3, 2)], 1)  # 10 x 4 x 3, then 10 x 3 x 2
      180
    """
    shapes = _check_chain(rows, shapes)
    if isinstance(j, bool) or not isinstance(j, int | np.integer) or not 1 <= j <= len(shapes):
        raise ValueError(f"j must be an integer in [1, {len(shapes)}] (the leading factors "
                         f"multiplied into the kernel), got {j!r}.")
    return _cost(rows, shapes, j)


def _cost(rows: int, shapes: list[tuple[int, int]], j: int) -> int:
    """:func:`product_cost` of checked arguments."""
    return (min(_prefix_costs(shapes[:j])) + rows * shapes[0][0] * shapes[j - 1][1]
            + sum(rows * a * b for a, b in shapes[j:]))


def product_order(rows: int, shapes: Sequence[tuple[int, int]]) -> int:
    """How many leading factors of a LoRITa product to multiply into the kernel the input meets:
    the rest are applied to the activations one after the other. Chosen by multiply-accumulates
    of the forward pass (:func:`product_cost`; the backward pass scales with them): ``j`` costs
    the prefix product ``W_1 ... W_j`` (the cheaper of left to right and right to left) plus
    ``rows * m * k_j`` for the layer plus ``rows * k_{i-1} * k_i`` for each later factor, where
    ``rows`` is the number of input rows the kernel meets (the batch, times the output positions
    of a convolution). Ties go to the larger ``j`` (fewer, larger products).

    Raises:
      ValueError: for ``rows`` below 0 or shapes that do not chain.

    Example:
      >>> product_order(128, [(1000, 1000)] * 3)  # a small batch: apply every factor
      1
      >>> product_order(100_000, [(1000, 1000)] * 3)  # a large one: multiply them out
      3
    """
    shapes = _check_chain(rows, shapes)
    return min(range(len(shapes), 0, -1), key=lambda j: _cost(rows, shapes, j))


def _chain(factors: Sequence[jax.Array]) -> jax.Array:
    """``W_1 @ ... @ W_j``, in the cheaper of the two simple orders."""
    mul = functools.partial(jnp.matmul, precision=_HIGHEST)
    left, right = _prefix_costs([f.shape for f in factors])
    if left <= right:
        return functools.reduce(mul, factors)
    return mul(factors[0], functools.reduce(lambda acc, f: mul(f, acc), factors[-2:0:-1],
                                            factors[-1]))


def _rows_met(layer: _Layer, n_in: int, node: Product, x: jax.Array) -> int:
    """Input rows the kernel meets: the batch (times a convolution's output positions)."""
    contracted = int(np.prod(node.shape[:n_in])) if layer.kind == "dense" else node.shape[-2]
    rows = x.size // max(contracted, 1)
    if layer.kind == "conv":
        strides = layer.strides if isinstance(layer.strides, tuple) else (layer.strides,) * (
            len(node.shape) - 2)
        rows //= max(int(np.prod(strides)), 1)
    return max(rows, 1)


def _run_product(layer: _Layer, node: Product, bias: jax.Array | None,
                 x: jax.Array) -> jax.Array:
    """The layer with a LoRITa :class:`~jaxlr.nodes.Product` kernel, its factors multiplied
    into the kernel or applied to the activations one after the other, whichever costs fewer
    multiply-accumulates (:func:`product_order`)."""
    n_in = len(layer.axis) if layer.kind == "dense" else len(node.shape) - 1
    x, bias, *factors = _promote(layer.dtype, x, bias,
                                 *(nodes.value_of(f) for f in node.factors))
    j = product_order(_rows_met(layer, n_in, node, x), [f.shape for f in factors])
    head = _chain(factors[:j])
    y = _contract(layer, head.reshape(node.shape[:n_in] + (head.shape[1],)), x)
    for factor in factors[j:]:
        y = jax.lax.dot_general(y, factor, (((y.ndim - 1,), (0,)), ((), ())), layer.precision)
    if j < len(factors) or len(node.shape) - n_in != 1:
        y = y.reshape(y.shape[:-1] + node.shape[n_in:])
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
        f"factored form: {why}. Keep it dense (jaxlr.collapse) or leave it out of the ranks."
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
    return {key: value for key, value in params.items() if isinstance(value, LowRank)}


def _ordered_product(module: nn.Module, args: tuple, kwargs: dict, context: Any) -> Any:
    """The module's output with its LoRITa product kernel run in the cheaper order, or None where
    it is not a plain ``Dense``/``DenseGeneral``/``Conv`` call on a kernel seen the usual way
    (those run the product multiplied out, as ``model.apply`` does)."""
    if module.scope is None or context.method_name != "__call__" or len(args) != 1 or kwargs:
        return None
    params = module.variables.get("params", {})
    node = params.get("kernel")
    if not isinstance(node, Product) or any(
            isinstance(v, LowRank | Product) for k, v in params.items() if k != "kernel"):
        return None
    name = "/".join(module.path) or type(module).__name__
    try:
        layer = _linen_layer(name, module)
    except TypeError:
        return None
    (x,) = args
    if any(_explicit(v) for v in (x, *(nodes.value_of(f) for f in node.factors))):
        return None  # sharded on an Explicit mesh: the product multiplied out, as model.apply
    n_in = len(layer.axis) if layer.kind == "dense" else len(node.shape) - 1
    if (node.shape != _linen_kernel_shape(module, layer, x)
            or node.view != MatrixView.split(len(node.shape), n_in)):
        return None
    bias = module.get_variable("params", "bias") if module.use_bias else None
    return _run_product(layer, node, bias, x)


def _interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
    """The Flax Linen method interceptor behind :func:`apply`.

    Runs a module's ``__call__`` in factored form when its ``kernel`` is a
    :class:`~jaxlr.nodes.LowRank`, and a ``Dense``/``DenseGeneral``/``Conv`` whose kernel is a
    LoRITa :class:`~jaxlr.nodes.Product` in the cheaper order (:func:`product_order`); every
    other call goes through untouched.
    """
    module = context.module
    entries = _lowrank_entries(module)
    if not entries:
        ordered = _ordered_product(module, args, kwargs, context)
        return next_fun(*args, **kwargs) if ordered is None else ordered
    name = "/".join(module.path) or type(module).__name__
    extra = sorted(set(entries) - {"kernel"})
    if extra:
        raise _unsupported(name, module, f"its parameters {extra} are LowRank; only kernels can be")
    try:
        layer = _linen_layer(name, module)
    except TypeError:  # it cannot run the pair factored: it runs the kernel (Flax unboxes it)
        return next_fun(*args, **kwargs)
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if len(args) != 1 or kwargs:
        raise _unsupported(name, module, "it was called with arguments other than its input")
    (x,) = args
    node = entries["kernel"]
    _check_fits(name, node, layer, _linen_kernel_shape(module, layer, x))
    bias = module.get_variable("params", "bias") if module.use_bias else None
    return _run(layer, node, bias, x)


def apply(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.apply(variables, *args, **kwargs)`` with factor pairs run as two thin layers.

    :class:`~jaxlr.nodes.LowRank` kernels run factored (a plain ``model.apply`` would run their
    dense product); LoRITa products run as their kernels, as with ``model.apply``.

    Args:
      model: the unchanged Flax Linen module.
      variables: its variables, possibly holding products and factor pairs in ``params``.
      *args: passed to ``model.apply``.
      **kwargs: passed to ``model.apply`` (``mutable``, ``method``, ``rngs``, ...).

    Returns:
      What ``model.apply`` returns. Jit it as usual: ``jax.jit(functools.partial(apply, model))``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a Flax Linen module, got {type(model).__name__} "
                        "(for NNX, jaxlr.compress returns the module to call).")
    with nn.intercept_methods(_interceptor):
        return model.apply(variables, *args, **kwargs)


class _FactoredApply:
    """``fn`` (a ``model.apply``) running factor pairs as :func:`apply` does: what
    :class:`jaxlr.TrainState` stores as its ``apply_fn``. Two of the same ``fn`` are equal (and
    hash alike), so states made apart have one tree structure: ``jit`` compiles once for them and
    a restored state matches a fresh one."""

    def __init__(self, fn: Any):
        self.__wrapped__ = fn

    def __call__(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(_interceptor):
            return self.__wrapped__(variables, *args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return type(other) is _FactoredApply and other.__wrapped__ == self.__wrapped__

    def __hash__(self) -> int:
        return hash(self.__wrapped__)

    def __repr__(self) -> str:
        return f"factored({self.__wrapped__!r})"


def _wrap_apply_fn(fn: Any) -> _FactoredApply:
    """:class:`_FactoredApply` of ``fn`` (the same for an already wrapped ``fn``)."""
    return fn if isinstance(fn, _FactoredApply) else _FactoredApply(fn)


# --- Flax NNX: replace the layers ---------------------------------------------------------------


class LowRankLayer(nnx.Module):
    """An NNX layer that runs a :class:`~jaxlr.nodes.LowRank` kernel in factored form.

    Made by :func:`nnx_model` (and :func:`jaxlr.compress`) in place of a ``Linear``,
    ``LinearGeneral`` or ``Conv`` whose kernel is held as a factor pair.

    Attributes:
      kernel: the :class:`~jaxlr.nodes.LowRank` of ``nnx.Param`` factors ``a`` and ``b``;
        ``layer.kernel[...]`` reads the dense kernel, as for the layer it replaced.
      bias: ``nnx.Param`` holding the bias, or ``None``.
    """

    def __init__(self, kernel: LowRank, bias: jax.Array | None, layer: _Layer):
        self.kernel = nnx.data(LowRank(nnx.Param(nodes.value_of(kernel.a)),
                                       nnx.Param(nodes.value_of(kernel.b)), kernel.shape,
                                       kernel.view))
        self.bias = None if bias is None else nnx.Param(bias)
        self.layer = layer

    def __call__(self, x: jax.Array, out_sharding: Any = None) -> jax.Array:
        """The layer's output for ``x``.

        Args:
          x: the input, as for the layer replaced.
          out_sharding: the output's sharding (a ``PartitionSpec`` or ``NamedSharding``), as
            ``nnx.Linear`` and ``nnx.Conv`` take it. On a mesh with ``Explicit`` axes it may be
            left out: the output is split as the input's batch axes and ``B``'s columns are.
        """
        bias = None if self.bias is None else self.bias[...]
        return _run(self.layer, self.kernel, bias, x, out_sharding)


class ProductLayer(nnx.Module):
    """An NNX layer that runs a LoRITa :class:`~jaxlr.nodes.Product` kernel in the cheaper order
    (:func:`product_order`): its factors multiplied into the kernel, or applied to the
    activations one after the other. Made by :func:`ordered` in place of a ``Linear``,
    ``LinearGeneral`` or ``Conv``; it holds the same ``nnx.Param`` factors.

    Attributes:
      kernel: the :class:`~jaxlr.nodes.Product` of ``nnx.Param`` factors; ``layer.kernel[...]``
        reads the dense kernel, as for the layer it replaced.
      bias: ``nnx.Param`` holding the bias, or ``None``.
    """

    def __init__(self, kernel: Product, bias: Any, layer: _Layer):
        self.kernel = nnx.data(kernel)
        self.bias = bias
        self.layer = layer

    def __call__(self, x: jax.Array) -> jax.Array:
        """The layer's output for ``x`` (as the layer replaced computes it, up to rounding)."""
        bias = None if self.bias is None else self.bias[...]
        if not isinstance(self.kernel, Product):  # a dense kernel written in (jaxlr.compress)
            return _run(self.layer, self.kernel[...], bias, x)
        factors = [nodes.value_of(f) for f in self.kernel.factors]
        if any(_explicit(v) for v in (x, *factors)):  # sharded: multiplied out, as before
            x, kernel, bias = _promote(self.layer.dtype, x, self.kernel[...], bias)
            return _add_bias(_contract(self.layer, kernel, x), bias)
        return _run_product(self.layer, self.kernel, bias, x)


def ordered(model: nnx.Module) -> nnx.Module:
    """A copy of a LoRITa-factorized NNX model whose product layers run in the cheaper order.

    Each ``Linear``, ``LinearGeneral`` and ``Conv`` whose kernel is a
    :class:`~jaxlr.nodes.Product` (seen the usual way: input axes first) becomes a
    :class:`ProductLayer`: when the batch (times a convolution's output positions) is small
    against the width, the factors are applied to the activations one after the other instead of
    being multiplied into the kernel at every step; the outputs and gradients are the same up to
    rounding. Other layers are left as they are. In Linen, :func:`apply` (and
    :class:`jaxlr.TrainState`) do this for every call.

    Args:
      model: an NNX model from :func:`jaxlr.lorita.factorize`.

    Returns:
      The new model; build the optimizer on it (``nnx.Optimizer(model, tx, wrt=nnx.Param)``).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlr
      >>> from flax import nnx
      >>> model = jaxlr.lorita.factorize(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), 3,
      ...                                jax.random.key(0))
      >>> fast = ordered(model)
      >>> type(fast).__name__
      'ProductLayer'
      >>> x = jnp.ones((2, 64))
      >>> bool(jnp.allclose(fast(x), model(x), atol=1e-5))
      True
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a Flax NNX module, got {type(model).__name__}.")
    model = nnx.clone(model)
    for path, node in _nnx.node_paths(model):
        if not isinstance(node, Product) or path[-1] != "kernel":
            continue
        *_, parent, module, _ = (None, *_nnx.walk(model, path, "/".join(path)))
        name = "/".join(path[:-1]) or type(module).__name__
        try:
            layer = _nnx_layer(name, module)
        except TypeError:
            continue
        n_in = len(layer.axis) if layer.kind == "dense" else len(node.shape) - 1
        if node.view != MatrixView.split(len(node.shape), n_in):
            continue
        replacement = ProductLayer(node, getattr(module, "bias", None), layer)
        if parent is None:
            model = replacement
        else:
            _nnx.set_child(parent, path[-2], replacement)
    return model


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


def _leaves(params: Any) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params) if not any(
            nodes.is_node(n) for n in jax.tree.leaves(params, is_leaf=nodes.is_node)) else params
    return [(matrices.path_names(path), leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(params, is_leaf=nodes.is_node)[0]]


def nnx_model(model: nnx.Module, params: Any) -> nnx.Module:
    """A copy of an NNX model holding ``params``: arrays, LoRITa products and factor pairs.

    Every leaf of ``params`` is written into the copy: an array into the variable at its path, a
    :class:`~jaxlr.nodes.Product` as a product of ``nnx.Param`` factors in place of the kernel, a
    :class:`~jaxlr.nodes.LowRank` by replacing its layer with a :class:`LowRankLayer`. The
    original model is not modified. Use it to run a tree loaded by :func:`jaxlr.export.load`.

    Args:
      model: the NNX model (any values: its structure and settings are what count).
      params: a tree of some of the model's variables (``nnx.State`` or nested dicts, as from
        ``nnx.to_pure_dict`` or :func:`jaxlr.export.load`).

    Returns:
      The new model; call it as the original.

    Raises:
      KeyError: if a path of ``params`` is not in the model.
      ValueError / TypeError: for a factor pair that does not fit its layer, naming it.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> node = LowRank(jnp.ones((4, 1)), jnp.ones((1, 3)), (4, 3), MatrixView((0,), (1,)))
      >>> small = nnx_model(model, {"kernel": node, "bias": jnp.zeros(3)})
      >>> small(jnp.ones((1, 4))), small.kernel[...].shape
      (Array([[4., 4., 4.]], dtype=float32), (4, 3))
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a Flax NNX module, got {type(model).__name__}.")
    model = nnx.clone(model)
    leaves = _leaves(params)
    for path, node in leaves:
        if not isinstance(node, LowRank):
            continue
        key = "/".join(path)
        if path[-1] != "kernel":
            raise TypeError(f"{key!r}: only kernels can be LowRank.")
        *_, parent, module = (None, *_nnx.walk(model, path[:-1], key))
        name = "/".join(path[:-1]) or type(module).__name__
        if isinstance(module, LowRankLayer | ProductLayer):
            layer, kernel_shape = module.layer, module.kernel.shape
        else:
            layer = _nnx_layer(name, module)
            kernel_shape = tuple(jnp.shape(module.kernel))
        _check_fits(name, node, layer, kernel_shape)
        bias = None if getattr(module, "bias", None) is None else module.bias[...]
        replacement = LowRankLayer(node, bias, layer)
        if parent is None:  # the model is the layer itself
            model = replacement
        else:
            _nnx.set_child(parent, path[-2], replacement)
    for path, leaf in leaves:
        if isinstance(leaf, LowRank):
            continue
        key = "/".join(path)
        *_, parent, current = (None, *_nnx.walk(model, path, key))
        if isinstance(leaf, Product):
            leaf.check(repr(key))
            value = Product(tuple(nnx.Param(nodes.value_of(f)) for f in leaf.factors),
                            leaf.shape, leaf.view)
            _nnx.set_child(parent, path[-1], value)
            continue
        if nodes.is_node(current):  # a product or pair in the model, an array given
            if tuple(jnp.shape(leaf)) != tuple(current.shape):
                raise ValueError(f"{key!r}: the model's kernel has shape {current.shape}, params "
                                 f"gives {jnp.shape(leaf)}.")
            _nnx.set_child(parent, path[-1], nnx.Param(leaf))
            continue
        if not isinstance(current, nnx.Variable):
            raise KeyError(f"{key!r} is not a variable of the model.")
        if jnp.shape(current[...]) != jnp.shape(leaf):
            raise ValueError(f"{key!r}: the model's variable has shape "
                             f"{jnp.shape(current[...])}, params gives {jnp.shape(leaf)}.")
        _nnx.write(current, leaf)
    return model
