"""Which leaves of a tree are matrices, seen how, and of which kind: the selection every entry
point of jaxlr makes (:func:`matrix_leaves`), over a tree whose kernel nodes (LoRITa products,
factor pairs) count as one leaf each and whose Flax NNX modules stand for their parameters
(:func:`flatten`).

**Kinds.** Each selected matrix is an ``"attention"``, ``"conv"`` or ``"dense"`` matrix, decided
by what its module is, not by the name a user gave it: the projections of an attention module
(one whose children are ``query``, ``key``, ``value`` and ``out``, as Flax's attention modules)
are ``"attention"``; other kernels of three or more dimensions are ``"conv"`` (``DenseGeneral`` /
``LinearGeneral`` kernels excepted); the rest are ``"dense"``. A filter may be a kind name or a
tuple of them (``filter="conv"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxlr import _nnx, nodes
from jaxlr.matrices import (
    ATTENTION_PROJECTIONS,
    GENERAL_DENSE,
    Filter,
    MatrixView,
    Path,
    View,
    check_floating,
    default_view,
    flax_view,
    module_name,
    path_key,
    path_names,
    resolve_filter,
    resolve_view,
    torch_view,
)

__all__ = ["MatrixLeaf", "flatten", "kernel_kinds", "matrix_leaves"]


class MatrixLeaf(NamedTuple):
    """A selected leaf together with how it is seen as a matrix.

    Attributes:
      index: position of the leaf among the tree's leaves (jaxlr's nodes counted as one leaf).
      path: the leaf's path (:func:`path_names`).
      view: its :class:`MatrixView`.
      shape: the leaf's shape.
      matrix_shape: ``(m, n)``, the shape of its matrix.
      kind: ``"attention"``, ``"conv"`` or ``"dense"`` (module documentation).
    """

    index: int
    path: Path
    view: MatrixView
    shape: tuple[int, ...]
    matrix_shape: tuple[int, int]
    kind: str

    @property
    def key(self) -> str:
        """The leaf's key (:func:`path_key`)."""
        return path_key(self.path)

    @property
    def full_rank(self) -> int:
        """``min(m, n)``: the number of singular values of the matrix."""
        return min(self.matrix_shape)


def flatten(tree: Any) -> tuple[list[tuple[Path, Any]], Any]:
    """The tree's leaves with their paths, jaxlr's kernel nodes (LoRITa products, factor pairs)
    counted as one leaf each, and the treedef to rebuild it. A Flax NNX module stands for its
    ``nnx.Param`` s, with the nodes its layers hold."""
    if _nnx.is_module(tree):
        tree = _nnx.parameters(tree)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=nodes.is_node)
    return [(path_names(p), leaf) for p, leaf in flat], treedef


def _attention_modules(paths: Iterable[Path]) -> set[Path]:
    """Modules whose children include query, key, value and out projections (with kernels)."""
    children: dict[Path, set[str]] = {}
    for path in paths:
        if len(path) >= 2:
            children.setdefault(path[:-2], set()).add(path[-2])
    return {parent for parent, names in children.items()
            if set(ATTENTION_PROJECTIONS) <= names}


def _kind(path: Path, shape: tuple[int, ...], attention: set[Path]) -> str:
    module = module_name(path)
    if module in ATTENTION_PROJECTIONS and path[:-2] in attention:
        return "attention"
    if len(shape) >= 3 and not module.startswith(GENERAL_DENSE):
        return "conv"
    return "dense"


def _check_bias(key: str, path: Path, leaf: MatrixLeaf, siblings: dict[Path, Any],
                torch_layout: bool) -> None:
    """A preset view whose column count differs from the bias beside the kernel is the wrong way
    round."""
    bias = siblings.get((*path[:-1], "bias"))
    if bias is None or not hasattr(bias, "shape"):
        return
    size = math.prod(np.shape(bias))
    m, n = leaf.matrix_shape
    if size != n:
        other = "flax" if torch_layout else "torch"
        raise ValueError(
            f"kernel {key!r} of shape {leaf.shape} is seen as a {m} x {n} matrix, but the bias "
            f"beside it has {size} entries, so its columns are not the layer's outputs: the "
            f"kernel has another layout. Pass view='{other}' (or a MatrixView) for it."
        )


def matrix_leaves(
    tree: Any,
    filter: Filter | None = None,  # noqa: A002 - the name every caller expects.
    view: View = None,
) -> dict[str, MatrixLeaf]:
    """Selects the weight matrices of a tree and says how each is seen as a matrix.

    Args:
      tree: a parameter tree: a Flax Linen variable dict (or its ``params``), a Flax NNX
        ``State`` or module, an Equinox module, or any pytree; LoRITa products and factor pairs
        (:mod:`jaxlr.nodes`) count as one kernel each.
      filter: which leaves are matrices (default: kernels of >= 2 dimensions; a kind name or a
        tuple of them selects those kinds).
      view: how each selected leaf is seen as a matrix (module documentation).

    Returns:
      An ordered mapping from each selected leaf's key to its :class:`MatrixLeaf`, in tree order.

    Raises:
      ValueError: if the filter selects no leaf, or a view does not fit its leaf.
      TypeError: if a selected leaf is not floating-point.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)}}
      >>> list(matrix_leaves(params))
      ['Dense_0/kernel']
    """
    select = resolve_filter(filter)
    view_fn = resolve_view(view)
    kinds = getattr(select, "kinds", None)
    preset = view_fn in (flax_view, torch_view, default_view)
    flat, _ = flatten(tree)
    kernels = [path for path, leaf in flat if len(np.shape(leaf)) >= 2]
    attention = _attention_modules(kernels)
    siblings = dict(flat)
    selected: dict[str, MatrixLeaf] = {}
    for index, (path, leaf) in enumerate(flat):
        if not select(path, leaf):
            continue
        key = path_key(path)
        shape = tuple(np.shape(leaf))
        kind = _kind(path, shape, attention)
        if kinds is not None and kind not in kinds:
            continue
        check_floating(key, leaf)
        leaf_view = view_fn(path, leaf)
        if not isinstance(leaf_view, MatrixView):
            raise TypeError(f"view returned {leaf_view!r} for {key!r}; a view function must "
                            "return a MatrixView.")
        leaf_view.check(shape, name=repr(key))
        entry = MatrixLeaf(index, path, leaf_view, shape, leaf_view.matrix_shape(shape), kind)
        if preset:
            _check_bias(key, path, entry, siblings, view_fn is torch_view)
        if key in selected:
            raise ValueError(f"two leaves have the key {key!r}; keys must be unique.")
        selected[key] = entry
    if not selected:
        hint = ""
        if any(nodes.is_node(leaf) for _, leaf in flat):
            hint = " (the tree holds LoRITa products or factor pairs: they count as kernels)"
        elif any(len(p) >= 3 and p[-2] == "factors" for p, _ in flat):
            hint = (" (it is the State of a LoRITa-factorized NNX module, which holds only the "
                    "factors: pass the module itself)")
        raise ValueError(
            f"filter {filter!r} selected no matrix of the tree{hint}; leaves of the tree: "
            f"{[path_key(p) for p, _ in flat][:20]}"
        )
    return selected


def kernel_kinds(
    tree: Any,
    filter: Filter | None = None,  # noqa: A002
    view: View = None,
) -> dict[str, str]:
    """The kind (``'attention'``, ``'conv'`` or ``'dense'``) of each selected matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Conv_0": {"kernel": jnp.zeros((3, 3, 3, 8))},
      ...           "Dense_0": {"kernel": jnp.zeros((8, 2))}}
      >>> kernel_kinds(params)
      {'Conv_0/kernel': 'conv', 'Dense_0/kernel': 'dense'}
    """
    return {key: leaf.kind for key, leaf in matrix_leaves(tree, filter, view).items()}
