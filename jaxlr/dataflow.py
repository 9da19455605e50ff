"""Which kernel is the model's output layer: found by tracing one forward pass of the user's model.

jaxlr's default selection (:mod:`jaxlr.selection`) leaves the model's output layer out. From a
tree alone it judges by widths; :func:`find_layers` looks at the model instead. It traces one
forward pass (shapes only, nothing is computed) in which the output of every layer holding a
``kernel`` is replaced by an input of its own, then follows the dataflow from those inputs to the
model's outputs: a layer is an output layer when some output of the model depends on it and on no
other kernel layer (a classifier, an LM head, whatever follows it: a softmax, a reshape). A model
whose outputs each mix several layers (a residual stream read by a tied embedding, two heads
summed) has no output layer, and every kernel is selected.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlr
  >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(16), nn.relu, nn.Dense(4)])
  >>> x = jnp.ones((1, 8))
  >>> variables = model.init(jax.random.key(0), x)
  >>> layers = find_layers(model, variables, x)
  >>> layers.exclude
  '^(?:layers_4/kernel)$'
  >>> list(jaxlr.selection.matrix_leaves(variables, filter=layers))
  ['layers_0/kernel', 'layers_2/kernel']
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from jaxlr import _nnx, matrices, nodes

__all__ = ["find_layers", "output_layers"]


def _depends(jaxpr: Any, sources: list[Any]) -> list[set[int]]:
    """For each output of ``jaxpr``, the indices of ``sources`` (input variables) it depends on.

    An equation's outputs depend on all its inputs (exact for primitives; for an equation that
    holds a sub-program, such as a ``jit`` or a ``custom_jvp``, a safe over-estimate)."""
    deps: dict[Any, set[int]] = {var: {i} for i, var in enumerate(sources)}

    def of(var: Any) -> set[int]:
        return set() if isinstance(var, jax.extend.core.Literal) else deps.get(var, set())

    for eqn in jaxpr.eqns:
        found = set().union(*(of(v) for v in eqn.invars)) if eqn.invars else set()
        for out in eqn.outvars:
            deps[out] = found
    return [of(v) for v in jaxpr.outvars]


Replace = Callable[[tuple[str, ...], Any], Any]
"""``replace(path, out)``: what the kernel layer at ``path`` returns instead of its ``out``."""


def _split(operands: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """The array leaves of ``operands`` (as shapes) and a function rebuilding ``operands`` from
    values for them, the other leaves (flags, names) kept as they are."""
    leaves, treedef = jax.tree.flatten(operands)
    dynamic = [i for i, leaf in enumerate(leaves) if hasattr(leaf, "shape")]

    def rebuild(values: list[Any]) -> Any:
        out = list(leaves)
        for i, value in zip(dynamic, values, strict=True):
            out[i] = value
        return jax.tree.unflatten(treedef, out)

    return [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in dynamic], rebuild


def _cut_run(run: Callable[[Replace, Any], Any], operands: Any
             ) -> tuple[list[tuple[str, ...]], list[set[int]]]:
    """Traces ``run(replace, operands)`` twice: once to record each kernel layer call's path and
    output shapes, once with each such output replaced by an input of its own; returns the calls'
    paths and, per output of the model, the calls it depends on."""
    shapes, rebuild = _split(operands)
    calls: list[tuple[tuple[str, ...], Any]] = []

    def record(path: tuple[str, ...], out: Any) -> Any:
        calls.append((path, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), out)))
        return out

    jax.eval_shape(lambda values: run(record, rebuild(values)), shapes)
    outputs = [shape for _, shape in calls]

    def cut(replacements: list[Any], values: list[Any]) -> Any:
        position = iter(range(len(replacements)))
        return run(lambda path, out: replacements[next(position)], rebuild(values))

    jaxpr = jax.make_jaxpr(cut)(outputs, shapes).jaxpr
    owner = [i for i, shape in enumerate(outputs) for _ in jax.tree.leaves(shape)]
    deps = _depends(jaxpr, list(jaxpr.invars[:len(owner)]))
    return [path for path, _ in calls], [{owner[i] for i in d} for d in deps]


def _linen_run(model: nn.Module, kwargs: dict) -> Callable[[Replace, Any], Any]:
    kwargs = {**kwargs, "mutable": True}
    kwargs.setdefault("rngs", {"dropout": jax.random.key(0), "params": jax.random.key(0)})

    def run(replace: Replace, operands: Any) -> Any:
        variables, inputs = operands

        def intercept(next_fun: Callable[..., Any], call_args: tuple, call_kwargs: dict,
                      context: Any) -> Any:
            module = context.module
            out = next_fun(*call_args, **call_kwargs)
            if (context.method_name == "__call__" and module.scope is not None
                    and nodes.holds_kernel(module.variables.get("params", {}).get("kernel"))):
                return replace(tuple(module.path), out)
            return out

        with nn.intercept_methods(intercept):
            out, _ = model.apply(nodes.collapse_tree(variables), *inputs, **kwargs)
        return out

    return run


def _replacing(base: type, names: tuple[str, ...], replace: Replace) -> type:
    """A subclass of the NNX module class ``base`` whose call output goes through ``replace``."""
    def __call__(self: Any, *call_args: Any, **call_kwargs: Any) -> Any:  # noqa: N807
        return replace(names, base.__call__(self, *call_args, **call_kwargs))

    return type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__})


def _nnx_run(model: Any, kwargs: dict) -> Callable[[Replace, Any], Any]:
    from flax import nnx  # noqa: PLC0415 - NNX is imported where an NNX model is at hand

    def run(replace: Replace, inputs: Any) -> Any:
        clone = nnx.clone(model)
        for path, node in list(nnx.iter_graph(clone)):
            if isinstance(node, nnx.Module) and nodes.holds_kernel(getattr(node, "kernel", None)):
                object.__setattr__(node, "__class__", _replacing(
                    type(node), tuple(str(p) for p in path), replace))
        return clone(*inputs, **kwargs)

    return run


def output_layers(model: Any, *args: Any, **kwargs: Any) -> tuple[str, ...]:
    """The keys of the kernels of ``model``'s output layers (module documentation).

    Args:
      model: a Flax Linen module, or a Flax NNX module.
      *args: Linen: the variables (shapes suffice, e.g. from ``jax.eval_shape(model.init, ...)``),
        then the model's inputs. NNX: the model's inputs.
      **kwargs: keyword arguments of the forward pass (``train=False`` ...).

    Returns:
      The kernels' keys (:func:`jaxlr.matrices.path_key`), in call order; empty where no output
      of the model depends on one kernel layer alone.
    """
    if _nnx.is_module(model):
        paths, deps = _cut_run(_nnx_run(model, kwargs), args)
    elif isinstance(model, nn.Module):
        if not args:
            raise TypeError("find_layers(model, variables, *inputs) needs the Linen model's "
                            "variables, then its inputs.")
        paths, deps = _cut_run(_linen_run(model, kwargs), (args[0], args[1:]))
    else:
        raise TypeError(f"model must be a Flax Linen or NNX module, got {type(model).__name__}.")
    last = {min(d) for d in deps if len(d) == 1}
    return tuple(dict.fromkeys(matrices.path_key((*paths[i], "kernel")) for i in sorted(last)))


def find_layers(model: Any, *args: Any, **kwargs: Any) -> matrices.KernelFilter:
    """The default selection of ``model``'s kernels, its output layer found from its dataflow.

    Pass it as ``filter=`` wherever jaxlr selects layers (the policies, ``factorize``,
    ``ProjectionOptions``, ``compress``), where the rule from widths alone
    (:mod:`jaxlr.selection`) cannot tell, or to be sure.

    Args:
      model, *args, **kwargs: as :func:`output_layers`.

    Returns:
      A :class:`jaxlr.matrices.KernelFilter` of every kernel but the output layers' (every kernel
      where the model has none).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.body = nnx.Linear(8, 8, rngs=rngs)
      ...         self.head = nnx.Linear(8, 8, rngs=rngs)    # equal widths: the rule cannot tell
      ...     def __call__(self, x):
      ...         return self.head(nnx.relu(self.body(x)))
      >>> find_layers(Net(nnx.Rngs(0)), jnp.ones((1, 8))).exclude
      '^(?:head/kernel)$'
    """
    keys = output_layers(model, *args, **kwargs)
    if not keys:
        return matrices.KernelFilter()
    return matrices.KernelFilter(exclude="^(?:" + "|".join(re.escape(k) for k in keys) + ")$")
