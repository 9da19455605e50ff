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

**The default selection** (``filter=None``, the same in every entry point of jaxlr: the policies,
``factorize``, ``project`` and the projection transformation, ``compress``, ``target_ranks``,
``singular_values``): every kernel (leaves named ``kernel`` of two or more dimensions; in an
Equinox module the ``weight`` of its layers, its ``Embedding`` s excepted) **except the model's
output layer** (a classifier, an LM head), as both papers leave it. Embeddings are never kernels.
From the tree alone, the output layer is the one kernel whose output no other kernel can read,
judged by widths: a dense or attention layer reads another when its input width (its matrix's
rows) is the other's output width (its matrix's columns), or a multiple of a convolution's output
channels (a flattened feature map); a convolution reads a convolution whose output channels are
its input channels, or a dense layer whose output is a square map of them (``s * s * c``,
``s >= 2``: a decoder's reshape). Then:

* a tree of one kernel, or of kernels none of which can read another, is a set of matrices, not
  a model: every kernel is selected;
* exactly one kernel that nothing reads: it is the output layer, and is left out;
* none, or several (a tied LM head, two heads, equal widths throughout, an autoencoder whose
  output has its input's channels): the rule cannot tell, and the entry point raises
  ``ValueError`` rather than guess.

Overriding it is one argument: ``filter="all"`` selects every kernel, the output layer included;
``filter=jaxlr.find_layers(model, ...)`` finds the output layer from the model's dataflow
(:func:`jaxlr.dataflow.find_layers`); any other filter selects exactly what it says.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxlr import _equinox, _nnx, nodes
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
    is_kernel,
    module_name,
    path_key,
    path_names,
    resolve_filter,
    resolve_view,
    torch_view,
)

__all__ = ["ALL", "MatrixLeaf", "flatten", "kernel_kinds", "matrix_leaves", "output_layer"]

ALL = "all"
"""``filter="all"``: every kernel, the model's output layer included (module documentation)."""


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


def _kernel_filter(tree: Any, filter: Filter | None) -> Any:  # noqa: A002
    """The per-leaf filter ``filter`` stands for on ``tree``: the default and ``"all"`` take the
    kernels (in an Equinox module, the weights of its layers other than embeddings)."""
    if filter is not None and not (isinstance(filter, str) and filter == ALL):
        return resolve_filter(filter)
    if not _equinox.is_module(tree):
        return is_kernel
    embeddings = _equinox.embedding_paths(tree)

    def equinox_kernel(path: Path, leaf: Any) -> bool:
        return (bool(path) and path[-1] in ("weight", "kernel") and len(np.shape(leaf)) >= 2
                and not any(path[:len(e)] == e for e in embeddings))

    return equinox_kernel


def _input_channels(leaf: MatrixLeaf) -> int:
    """A convolution's input channels: the row axis beside the columns in the Flax layout
    (HWIO), the first row axis in the PyTorch one (OIHW)."""
    rows, cols = leaf.view.row_axes, leaf.view.col_axes
    return leaf.shape[rows[-1] if max(rows) < min(cols) else rows[0]]


def _reads(reader: MatrixLeaf, source: MatrixLeaf) -> bool:
    """Whether ``reader``'s input could be ``source``'s output, judged by widths."""
    width = source.matrix_shape[1]
    if reader.kind == "conv":
        channels = _input_channels(reader)
        if source.kind == "conv":
            return channels == width
        # A dense output reshaped to a square map of the convolution's channels (a decoder).
        side = math.isqrt(width // channels) if width % channels == 0 else 0
        return side >= 2 and side * side * channels == width
    rows = reader.matrix_shape[0]
    return rows == width or (source.kind == "conv" and rows % width == 0)


def output_layer(leaves: dict[str, MatrixLeaf]) -> str | None:
    """The key of the model's output layer among ``leaves`` by the rule of the module
    documentation, or ``None`` where the leaves are a set of matrices rather than a model.

    Args:
      leaves: every kernel of a tree, as :func:`matrix_leaves` gives them with ``filter="all"``.

    Raises:
      ValueError: where no kernel, or several, are read by no other: the rule cannot tell.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.zeros((64, 128))},
      ...           "Dense_1": {"kernel": jnp.zeros((128, 128))},
      ...           "Dense_2": {"kernel": jnp.zeros((128, 10))}}
      >>> output_layer(matrix_leaves(params, filter="all"))
      'Dense_2/kernel'
    """
    items = list(leaves.values())
    read = dict.fromkeys(leaves, False)
    linked = False
    for source in items:
        for reader in items:
            if reader is not source and _reads(reader, source):
                read[source.key] = linked = True
                break
    if len(items) <= 1 or not linked:
        return None
    unread = [key for key, was_read in read.items() if not was_read]
    if len(unread) == 1:
        return unread[0]
    reason = (f"{len(unread)} kernels ({', '.join(map(repr, unread[:6]))}) feed no other kernel"
              if unread else "every kernel's output width is read by another kernel (a tied "
              "head, or equal widths throughout)")
    raise ValueError(
        "the default selection leaves the model's output layer out, and this tree does not show "
        f"which layer that is: {reason}. Pass filter='all' to select every kernel, a filter that "
        "leaves the output layer out (jaxlr.kernel_filter(exclude='head')), or "
        "filter=jaxlr.find_layers(model, ...) to find it from the model's dataflow."
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
      filter: which leaves are matrices: ``None``, the default selection (every kernel but the
        model's output layer, module documentation); ``"all"``, every kernel; a kind name or a
        tuple of them; or a function ``(path, leaf) -> bool``.
      view: how each selected leaf is seen as a matrix (:mod:`jaxlr.matrices`; the PyTorch layout
        by default in an Equinox module).

    Returns:
      An ordered mapping from each selected leaf's key to its :class:`MatrixLeaf`, in tree order.

    Raises:
      ValueError: if the filter selects no leaf, a view does not fit its leaf, or the default
        selection cannot tell the output layer.
      TypeError: if a selected leaf is not floating-point.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)},
      ...           "head": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)}}
      >>> list(matrix_leaves(params)), list(matrix_leaves(params, filter="all"))
      (['Dense_0/kernel'], ['Dense_0/kernel', 'head/kernel'])
    """
    select = _kernel_filter(tree, filter)
    if view is None and _equinox.is_module(tree):
        view = "torch"
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
    if filter is None and (head := output_layer(selected)) is not None:
        del selected[head]
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
      >>> kernel_kinds(params, filter="all")
      {'Conv_0/kernel': 'conv', 'Dense_0/kernel': 'dense'}
    """
    return {key: leaf.kind for key, leaf in matrix_leaves(tree, filter, view).items()}
