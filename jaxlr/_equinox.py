"""Equinox modules holding factor pairs and LoRITa products, made to run.

An Equinox layer uses its weight as an array: ``eqx.nn.Linear`` computes ``self.weight @ x``,
which a :class:`~jaxlr.nodes.LowRank` runs as two thin products and a
:class:`~jaxlr.nodes.Product` as its kernel (both define ``@``); ``eqx.nn.Conv`` hands its weight
to ``lax.conv_general_dilated``, which takes arrays only. :func:`runnable` gives every convolution
whose weight is a node a class of its own (a subclass of its class, so ``isinstance`` and the
module's fields are unchanged) whose call runs a factor pair as a ``k x k`` convolution with ``r``
filters followed by a ``1 x 1`` one, and a product as its kernel. Equinox is imported only when
the tree holds one of its modules.
"""

from __future__ import annotations

import copy
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp

from jaxlr import matrices, nodes

__all__ = ["embedding_paths", "is_module", "runnable"]


def is_module(tree: Any) -> bool:
    """Whether ``tree`` is an Equinox module (without importing Equinox)."""
    eqx = sys.modules.get("equinox")
    return eqx is not None and isinstance(tree, eqx.Module)


def embedding_paths(tree: Any) -> set[tuple[str, ...]]:
    """The paths of the ``eqx.nn.Embedding`` modules in an Equinox tree (their ``weight`` is an
    embedding table, not a kernel)."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return set()
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, eqx.nn.Embedding))
    return {matrices.path_names(path) for path, leaf in flat
            if isinstance(leaf, eqx.nn.Embedding)}


def _conv_call(self: Any, x: jax.Array, *, key: Any = None) -> jax.Array:
    import equinox as eqx  # noqa: PLC0415 - only reached with an Equinox module at hand

    base = type(self).__mro__[1]
    weight = self.weight
    if not nodes.is_node(weight):
        return base.__call__(self, x, key=key)
    factored = (isinstance(weight, nodes.LowRank) and self.groups == 1
                and weight.view.col_axes == (0,)
                and weight.view.row_axes == tuple(range(1, len(weight.shape))))
    if not factored:  # a product, or a pair of another layout: the kernel it stands for
        return base.__call__(eqx.tree_at(lambda c: c.weight, self, weight.kernel()), x, key=key)
    a, b = nodes.value_of(weight.a), nodes.value_of(weight.b)
    rank = a.shape[1]
    # The torch view's rows are (in, *kernel size): a^T is an OIHW weight of `rank` filters.
    first = a.T.reshape(rank, *weight.shape[1:])
    if self.use_bias:
        zero_bias = jnp.zeros((rank,) + (1,) * (len(weight.shape) - 2), self.bias.dtype)
        thin = eqx.tree_at(lambda c: (c.weight, c.bias), self, (first, zero_bias))
    else:
        thin = eqx.tree_at(lambda c: c.weight, self, first)
    hidden = base.__call__(thin, x, key=key)
    out = jnp.einsum("ro,r...->o...", b, hidden)  # the 1 x 1 convolution
    return out + self.bias if self.use_bias else out


@functools.cache
def _factored_class(base: type) -> type:
    return type(f"Factored{base.__name__}", (base,),
                {"__call__": _conv_call, "__module__": __name__, "__doc__": base.__doc__})


def runnable(tree: Any) -> Any:
    """``tree`` with each Equinox convolution whose weight is a node given the class that runs
    it (the module docstring); everything else, linear layers included, as it is."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return tree

    def convert(leaf: Any) -> Any:
        if not (isinstance(leaf, eqx.nn.Conv) and nodes.is_node(leaf.weight)):
            return leaf
        base = type(leaf).__mro__[1] if type(leaf).__name__.startswith("Factored") and \
            type(leaf).__module__ == __name__ else type(leaf)
        out = copy.copy(leaf)
        object.__setattr__(out, "__class__", _factored_class(base))
        return out

    return jax.tree_util.tree_map(convert, tree, is_leaf=lambda x: isinstance(x, eqx.nn.Conv))
