"""What a forward pass costs: parameters and multiply-accumulates per layer, and XLA's own count.

:func:`forward_cost` traces ``fn(params, *inputs)`` to a jaxpr and counts every matrix product
(``dot_general``) and convolution in it, nested jits, custom derivatives, ``scan`` and ``cond``
included. Each product whose operand is (a reshape or cast of) a parameter leaf is charged to that
leaf's path; a :class:`~jaxlr.nodes.LowRank` node's two factors are charged to its kernel's path,
so a dense model and its factored version report the same layers. Products of activations with
activations (attention's scores and weighted values) are reported as ``other``.

Two conventions for convolutions:

* ``macs``: every output position times the whole window, ``out_positions * k_h * k_w * c_in/g *
  c_out``, zero padding included: the convention of the counters the papers use (ptflops, NNI), and
  the figure the tables report;
* ``macs_in_bounds``: only the window taps that fall inside the (unpadded) input, which is what
  XLA's cost analysis counts. On a ``3 x 3`` "SAME" convolution of an ``H x W`` map the two differ
  by the factor ``((3H - 2) / 3H) ((3W - 2) / 3W)``: 4% at ``32 x 32``, 56% at ``2 x 2``.

Neither counts bias additions, normalisation, activations or pooling (ptflops adds one operation
per output element for a bias, below ``1 / (k_h k_w c_in)`` of the layer's count). XLA's
``flops`` counts a multiply-accumulate as two operations and every elementwise operation as one,
so ``xla_flops / 2`` is ``macs_in_bounds`` plus the elementwise work, a larger share of a
factored model's count than of its dense model's (its products shrink while the elementwise work
stays). Between a dense model and its
factored version, XLA's count changes by exactly twice the change of ``macs_in_bounds`` (tested).
XLA's figure is read from a CPU compilation by default (:func:`xla_flops`).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> model = nn.Dense(32)
  >>> x = jnp.ones((4, 64))
  >>> params = model.init(jax.random.key(0), x)["params"]
  >>> cost = forward_cost(lambda p, x: model.apply({"params": p}, x), params, x)
  >>> cost.layers["kernel"].macs, cost.params        # 4 * 64 * 32;  64 * 32 + 32
  (8192, 2080)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxlr import matrices, nodes

__all__ = ["ForwardCost", "LayerCost", "forward_cost", "xla_flops"]

# Primitives through which a parameter keeps its identity on the way to a product.
_PASS_THROUGH = frozenset(
    {
        "convert_element_type",
        "reshape",
        "transpose",
        "squeeze",
        "expand_dims",
        "copy",
        "copy_p",
        "reduce_precision",
    }
)


class LayerCost(NamedTuple):
    """One parameter leaf's share of the forward pass.

    Attributes:
      params: parameters of the leaf (``r (m + n)`` for a :class:`~jaxlr.nodes.LowRank` node).
      macs: multiply-accumulates of the products it takes part in (padding counted).
      macs_in_bounds: the same without the taps that fall on zero padding (XLA's convention).
    """

    params: int
    macs: int
    macs_in_bounds: int


class ForwardCost(NamedTuple):
    """The cost of one forward pass, per layer and in total (module docs for the conventions).

    Attributes:
      layers: ``{path: LayerCost}`` for every parameter leaf that takes part in a product.
      other_macs: multiply-accumulates of products between activations (attention).
      other_macs_in_bounds: the same in XLA's convention.
      params: every parameter of the tree.
      xla_flops: XLA's compiled cost analysis, ``flops`` (``None`` if not asked for or not
        reported by the backend).
    """

    layers: dict[str, LayerCost]
    other_macs: int
    other_macs_in_bounds: int
    params: int
    xla_flops: float | None

    @property
    def macs(self) -> int:
        """All multiply-accumulates, ptflops' convention."""
        return self.other_macs + sum(layer.macs for layer in self.layers.values())

    @property
    def macs_in_bounds(self) -> int:
        """All multiply-accumulates, XLA's convention."""
        return self.other_macs_in_bounds + sum(
            layer.macs_in_bounds for layer in self.layers.values()
        )

    def table(self, baseline: ForwardCost | None = None) -> str:
        """A plain-text table; with ``baseline`` (the dense model), before and after columns."""
        rows = [("path", "params", "MACs")]
        for name, layer in self.layers.items():
            before = baseline.layers.get(name) if baseline else None
            rows.append(
                (
                    name,
                    _change(before.params if before else None, layer.params),
                    _change(before.macs if before else None, layer.macs),
                )
            )
        rows.append(
            (
                "attention products" if self.other_macs else "other products",
                "",
                _change(baseline.other_macs if baseline else None, self.other_macs),
            )
        )
        rows.append(
            (
                "total",
                _change(baseline.params if baseline else None, self.params),
                _change(baseline.macs if baseline else None, self.macs),
            )
        )
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}" for row in rows
        ]
        if self.xla_flops is not None:
            xla = f"XLA flops / 2 {self.xla_flops / 2:.4g} vs MACs in bounds {self.macs_in_bounds}"
            if baseline is not None and baseline.xla_flops:
                xla += f"; XLA flops kept {self.xla_flops / baseline.xla_flops:.1%}"
            lines.append(xla)
        return "\n".join(lines)


def _change(before: int | None, after: int) -> str:
    """``before -> after (kept%)``: the fraction kept, as every jaxlr table prints it."""
    if before is None or before == after:
        return f"{after}"
    kept = f" ({after / before:.1%})" if before else ""
    return f"{before} -> {after}{kept}"


def xla_flops(fn: Callable[..., Any], *args: Any, backend: str | None = "cpu") -> float | None:
    """``flops`` of XLA's cost analysis of ``jax.jit(fn)`` compiled for ``args``.

    Args:
      fn: the function.
      *args: its arguments.
      backend: the backend to compile for; ``"cpu"`` by default, because the GPU backend runs
        convolutions as cuDNN calls that its cost analysis does not count as the CPU's does
        (on an H100 it reported a factored VGG-16 costing 21 times the dense one). ``None``:
        the arguments' own devices.
    """
    if backend is not None:
        args = jax.device_put(args, jax.devices(backend)[0])
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def _parameter_tags(params: Any) -> tuple[list[str], dict[str, int]]:
    """The kernel path of every flattened leaf of ``params``, and the parameters per path."""
    tags, sizes = [], {}
    for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=nodes.is_node)[0]:
        name = matrices.path_key(path)
        leaves = jax.tree.leaves(node)
        tags.extend([name] * len(leaves))
        sizes[name] = sum(math.prod(np.shape(leaf)) for leaf in leaves)
    return tags, sizes


def _valid_taps(size: int, window: int, stride: int, pad: int, lhs: int, rhs: int, out: int) -> int:
    """Window taps, summed over output positions, that land on a real input element."""
    position = np.arange(out)[:, None] * stride - pad + np.arange(window)[None, :] * rhs
    valid = (position >= 0) & (position <= (size - 1) * lhs) & (position % lhs == 0)
    return int(valid.sum())


def _conv_macs(eqn: Any) -> tuple[int, int]:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    out = eqn.outvars[0].aval.shape
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    spatial = len(rhs_spec) - 2
    window = [rhs[d] for d in rhs_spec[2:]]
    per_position = rhs[rhs_spec[1]] * math.prod(window)
    macs = math.prod(out) * per_position
    taps = 1
    for i in range(spatial):
        taps *= _valid_taps(
            lhs[lhs_spec[2 + i]],
            window[i],
            p["window_strides"][i],
            p["padding"][i][0],
            (p.get("lhs_dilation") or (1,) * spatial)[i],
            (p.get("rhs_dilation") or (1,) * spatial)[i],
            out[out_spec[2 + i]],
        )
    positions = math.prod(out[d] for d in out_spec[2:])
    in_bounds = math.prod(out) // max(positions, 1) * rhs[rhs_spec[1]] * taps
    return macs, in_bounds


def _dot_macs(eqn: Any) -> int:
    lhs = eqn.invars[0].aval.shape
    (contract, _), _ = eqn.params["dimension_numbers"]
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)


def _subjaxprs(eqn: Any) -> list[Any]:
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns") and hasattr(inner, "invars"):
                found.append(inner)
    return found


def _product_macs(eqn: Any) -> tuple[int, int]:
    """``(macs, macs_in_bounds)`` of one ``dot_general`` or ``conv_general_dilated``."""
    if eqn.primitive.name == "dot_general":
        macs = _dot_macs(eqn)
        return macs, macs
    return _conv_macs(eqn)


def _products(jaxpr: Any, tags: dict[Any, str], scale: int
              ) -> Iterator[tuple[Any, str | None, int]]:
    """``(eqn, owner, times)`` for every matrix product and convolution of ``jaxpr``.

    ``owner`` is the path of the parameter leaf the product's kernel (else its first operand)
    comes from, ``None`` for a product of activations; ``times`` is how often it runs (``scan``
    lengths multiplied). Nested jaxprs are followed; of a ``cond`` only the branch with the most
    multiply-accumulates.
    """
    def tag_of(var: Any) -> str | None:
        return tags.get(var) if not hasattr(var, "val") else None  # literals carry no tag

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            owner = tag_of(eqn.invars[1])
            yield eqn, tag_of(eqn.invars[0]) if owner is None else owner, scale
            continue
        if name == "while":
            raise NotImplementedError("a while loop in the forward pass cannot be counted: its "
                                      "number of iterations is unknown.")
        if name in _PASS_THROUGH:
            owners = {tag_of(v) for v in eqn.invars} - {None}
            if len(owners) == 1:
                tags[eqn.outvars[0]] = owners.pop()
            continue
        inner = _subjaxprs(eqn)
        if not inner:
            continue
        if name == "cond":  # the most expensive branch
            branches = [list(_products(branch, _inner_tags(eqn.invars[1:], branch, tag_of),
                                       scale)) for branch in inner]
            yield from max(branches, key=lambda found: sum(
                times * _product_macs(e)[0] for e, _, times in found))
            continue
        length = int(eqn.params.get("length", 1)) if name == "scan" else 1
        for sub_jaxpr in inner:
            yield from _products(sub_jaxpr, _inner_tags(eqn.invars, sub_jaxpr, tag_of),
                                 scale * length)


def _tagged_jaxpr(fn: Callable[..., Any], params: Any, *inputs: Any
                  ) -> tuple[Any, dict[Any, str], dict[str, int]]:
    """``fn``'s jaxpr, its parameter inputs tagged with their kernel paths, and the sizes."""
    closed = jax.make_jaxpr(fn)(params, *inputs)
    names, sizes = _parameter_tags(params)
    invars = closed.jaxpr.invars
    tags = {var: name for var, name in zip(invars[: len(names)], names, strict=True)}
    return closed.jaxpr, tags, sizes


def _inner_tags(outer: list[Any], inner: Any, tag_of: Callable[[Any], str | None]) -> dict:
    if len(outer) != len(inner.invars):
        return {}
    pairs = zip(outer, inner.invars, strict=True)
    return {v: tag_of(o) for o, v in pairs if tag_of(o) is not None}


def forward_cost(
    fn: Callable[..., Any],
    params: Any,
    *inputs: Any,
    xla: bool = True,
    xla_backend: str | None = "cpu",
) -> ForwardCost:
    """Counts the parameters and multiply-accumulates of ``fn(params, *inputs)``.

    Args:
      fn: the forward pass, parameters first, e.g. ``lambda p, x: model.apply({"params": p}, x)``
        or ``lambda p, x: jaxlr.apply(model, {"params": p}, x)``. Other variables
        (``batch_stats``) belong in the closure.
      params: the parameter tree (dense, or with :class:`~jaxlr.nodes.LowRank` nodes).
      *inputs: example inputs; the counts are for this batch (pass one example for per-example
        figures).
      xla: also compile ``fn`` and read XLA's cost analysis (:func:`xla_flops`).
      xla_backend: the backend XLA compiles for, the CPU by default (:func:`xla_flops`).

    Returns:
      A :class:`ForwardCost`.

    Raises:
      NotImplementedError: if the forward pass contains a ``while`` loop.
    """
    if not callable(fn):
        raise TypeError(f"fn must be the forward pass, a function (params, *inputs), got "
                        f"{type(fn).__name__}.")
    if not isinstance(xla, bool):
        raise TypeError(f"xla must be True or False, got {xla!r}.")
    jaxpr, tags, sizes = _tagged_jaxpr(fn, params, *inputs)
    totals: dict[str | None, list[int]] = {}
    for eqn, owner, times in _products(jaxpr, tags, 1):
        macs, in_bounds = _product_macs(eqn)
        entry = totals.setdefault(owner, [0, 0])
        entry[0] += times * macs
        entry[1] += times * in_bounds
    layers = {
        name: LayerCost(sizes[name], *totals[name]) for name in sizes if name in totals
    }
    other = totals.get(None, [0, 0])
    return ForwardCost(
        layers,
        other[0],
        other[1],
        sum(sizes.values()),
        xla_flops(fn, params, *inputs, backend=xla_backend) if xla else None,
    )
