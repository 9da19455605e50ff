"""Private helpers for Flax NNX modules: finding jaxlr's kernel nodes in a module, reading a
module's parameters as a plain tree (nodes kept), and writing such a tree into a copy of a
module."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from flax import nnx

from jaxlr import matrices, nodes

__all__ = [
    "child", "collapse", "is_module", "node_paths", "parameters", "replace_nodes", "set_child",
    "walk", "write",
]


def write(variable: nnx.Variable, value: Any) -> None:
    """Sets a variable's value (``set_value`` where Flax has it, ``.value`` before 0.12.8)."""
    if hasattr(type(variable), "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


def is_module(x: Any) -> bool:
    """Whether ``x`` is a Flax NNX module."""
    return isinstance(x, nnx.Module)


def child(node: Any, name: str) -> Any:
    """The attribute or item ``name`` of an NNX graph node (``KeyError`` if it has none)."""
    if isinstance(node, nnx.Module) and not isinstance(node, Mapping) and hasattr(node, name):
        return getattr(node, name)
    try:
        return node[int(name) if str(name).isdigit() and not isinstance(node, Mapping) else name]
    except (KeyError, IndexError, TypeError):
        raise KeyError(name) from None


def set_child(node: Any, name: str, value: Any) -> None:
    """Sets the attribute or item ``name`` of an NNX graph node."""
    if isinstance(node, nnx.Module) and not isinstance(node, Mapping) and hasattr(node, name):
        setattr(node, name, value)
    else:
        node[int(name) if str(name).isdigit() and not isinstance(node, Mapping) else name] = value


def walk(model: Any, path: tuple[str, ...], what: str) -> Iterator[Any]:
    """The graph nodes from ``model`` down ``path``; ``what`` names the path in errors."""
    node = model
    yield node
    for i, name in enumerate(path):
        try:
            node = child(node, name)
        except KeyError:
            raise KeyError(f"{what!r} names {name!r}, which the model does not have under "
                           f"{'/'.join(path[:i]) or 'its root'}.") from None
        yield node


def node_paths(model: nnx.Module) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, node)`` for every :class:`~jaxlr.nodes.Product` and
    :class:`~jaxlr.nodes.LowRank` held by the module, in graph order."""
    return [(tuple(str(k) for k in path), node) for path, node in nnx.iter_graph(model)
            if nodes.is_node(node)]


def _arrays(node: Any) -> Any:
    """A node with arrays in place of its NNX variables."""
    return jax.tree.map(nodes.value_of, node, is_leaf=lambda v: isinstance(v, nnx.Variable))


def parameters(model: nnx.Module, which: Any = nnx.Param) -> dict[str, Any]:
    """The module's variables of type ``which`` as nested dicts of arrays, with each jaxlr node
    kept as a node (of arrays) at its kernel's path."""
    tree = nnx.to_pure_dict(nnx.state(model, which))
    for path, node in node_paths(model):
        parent = tree
        for name in path[:-1]:
            key = int(name) if name.isdigit() and int(name) in parent else name
            parent = parent[key]
        last = path[-1]
        parent[int(last) if last.isdigit() and int(last) in parent else last] = _arrays(node)
    return tree


def replace_nodes(model: nnx.Module, dense: Callable[[tuple[str, ...], Any], Any]) -> nnx.Module:
    """A copy of the module with each jaxlr node replaced by ``nnx.Param(dense(path, node))``."""
    model = nnx.clone(model)
    for path, node in node_paths(model):
        *_, parent, _ = (None, *walk(model, path, "/".join(path)))
        node.check(repr(matrices.path_key(path)))
        set_child(parent, path[-1], nnx.Param(dense(path, node)))
    return model


def collapse(tree: Any) -> Any:
    """Multiplies every :class:`~jaxlr.nodes.Product` and :class:`~jaxlr.nodes.LowRank` back into
    its dense kernel.

    Differentiable: gradients reach each factor through the product. Takes any tree (a Linen
    variable dict, an NNX ``State``, an Equinox module, ...) and returns it with arrays in place of
    the nodes; given a Flax NNX module it returns a copy whose kernels are ``nnx.Param`` arrays
    again (the module itself is left as it is).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlr.nodes import LowRank
      >>> from jaxlr.matrices import MatrixView
      >>> tree = {"kernel": LowRank(jnp.ones((4, 1)), jnp.ones((1, 3)), (4, 3),
      ...                           MatrixView((0,), (1,)))}
      >>> collapse(tree)["kernel"].shape
      (4, 3)
    """
    if is_module(tree):
        return replace_nodes(tree, lambda path, node: node.kernel())
    return nodes.collapse_tree(tree)
