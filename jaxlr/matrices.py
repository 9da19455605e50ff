"""How a kernel leaf of a parameter tree is seen as a matrix, and which leaves are seen.

A *view* is declarative: it names which axes of the leaf become the rows of the matrix and which
become its columns (like the dimension numbers of ``jax.lax.dot_general``). Every method of jaxlr
that cuts singular values works on that matrix and writes the result back through the same view,
so the leaf keeps its shape and the user's model is used unchanged.

The views jaxlr chooses by default (:func:`default_view`), for Flax kernels that compute
``y = x @ W``:

=========================================  =========================  =========================
kernel                                     shape                      matrix
=========================================  =========================  =========================
``Dense`` / ``nnx.Linear``                 ``(in, out)``              ``(in, out)``
``Conv`` (any number of spatial axes)      ``(kh, kw, cin, cout)``    ``(kh*kw*cin, cout)``
attention ``query`` / ``key`` / ``value``  ``(in, heads, head_dim)``  ``(in, heads*head_dim)``
attention ``out``                          ``(heads, head_dim, out)`` ``(heads*head_dim, out)``
``DenseGeneral``, ``features=(a, b)``      ``(in, a, b)``             ``(in, a*b)``
=========================================  =========================  =========================

A 3-D kernel is ambiguous by shape alone (a 1-D convolution's ``(k, cin, cout)`` looks like an
attention projection's ``(in, heads, head_dim)``), so :func:`default_view` decides by the name of
the module that holds it and raises for a name it cannot place; pass a ``view`` function of your
own for such kernels, or for any layout not listed here.

Paths are tuples of names, e.g. ``('params', 'Dense_0', 'kernel')`` for a Flax Linen variable
dict and ``('linear', 'kernel')`` for a Flax NNX ``State`` (the trailing ``.value`` of an NNX
variable is dropped, so Linen and NNX trees are addressed alike). Mappings keyed by matrix, such as
ranks and singular values, use the ``'/'``-joined string: ``'params/Dense_0/kernel'``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Filter",
    "MatrixLeaf",
    "MatrixView",
    "Path",
    "ViewFn",
    "default_view",
    "is_kernel",
    "kernel_filter",
    "kernel_kinds",
    "matrix_leaves",
    "path_names",
    "path_str",
]

Path = tuple[str, ...]
"""A leaf's position in a tree, as a tuple of names (``('params', 'Dense_0', 'kernel')``)."""

Filter = Callable[[Path, Any], bool]
"""``(path, leaf) -> bool``: whether a leaf is treated as a weight matrix."""


class MatrixView(NamedTuple):
    """Which axes of a kernel leaf form the rows and which the columns of its matrix.

    ``row_axes + col_axes`` must be a permutation of ``range(leaf.ndim)``. The matrix is the leaf
    transposed to ``row_axes + col_axes`` and reshaped to ``(prod(rows), prod(cols))``; the view is
    undone exactly by :meth:`from_matrix`.

    Attributes:
      row_axes: leaf axes that become the matrix's rows, in order.
      col_axes: leaf axes that become the matrix's columns, in order.

    Example:
      >>> import jax.numpy as jnp
      >>> view = MatrixView(row_axes=(0, 1, 2), col_axes=(3,))  # a 2-D convolution kernel
      >>> kernel = jnp.zeros((3, 3, 16, 32))
      >>> view.to_matrix(kernel).shape
      (144, 32)
      >>> view.from_matrix(view.to_matrix(kernel), kernel.shape).shape
      (3, 3, 16, 32)
    """

    row_axes: tuple[int, ...]
    col_axes: tuple[int, ...]

    @classmethod
    def split(cls, ndim: int, num_row_axes: int) -> MatrixView:
        """The view whose rows are the leading ``num_row_axes`` axes and columns the rest."""
        return cls(tuple(range(num_row_axes)), tuple(range(num_row_axes, ndim)))

    def check(self, shape: tuple[int, ...], name: str = "leaf") -> None:
        """Raises ``ValueError`` if this view does not fit a leaf of ``shape``."""
        axes = tuple(self.row_axes) + tuple(self.col_axes)
        if not self.row_axes or not self.col_axes or sorted(axes) != list(range(len(shape))):
            raise ValueError(
                f"view {self} does not fit {name} of shape {shape}: row_axes and col_axes must "
                f"both be non-empty and together a permutation of range({len(shape)})."
            )

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The ``(m, n)`` shape of the matrix of a leaf of ``shape``."""
        return (
            math.prod(shape[a] for a in self.row_axes),
            math.prod(shape[a] for a in self.col_axes),
        )

    def to_matrix(self, leaf: jax.Array) -> jax.Array:
        """The leaf as an ``(m, n)`` matrix."""
        perm = tuple(self.row_axes) + tuple(self.col_axes)
        return jnp.transpose(leaf, perm).reshape(self.matrix_shape(leaf.shape))

    def from_matrix(self, matrix: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """The inverse of :meth:`to_matrix`: an ``(m, n)`` matrix back to a leaf of ``shape``."""
        perm = tuple(self.row_axes) + tuple(self.col_axes)
        if tuple(matrix.shape) != self.matrix_shape(shape):
            raise ValueError(
                f"matrix of shape {tuple(matrix.shape)} cannot be viewed as a leaf of shape "
                f"{shape} through {self}: expected {self.matrix_shape(shape)}."
            )
        permuted = matrix.reshape(tuple(shape[a] for a in perm))
        return jnp.transpose(permuted, np.argsort(perm))


ViewFn = Callable[[Path, Any], MatrixView]
"""``(path, leaf) -> MatrixView``: how a selected leaf is seen as a matrix."""

_ATTENTION_INPUT_PROJECTIONS = ("query", "key", "value")


def default_view(path: Path, leaf: Any) -> MatrixView:
    """The matrix view jaxlr uses for a Flax kernel unless told otherwise.

    * 2-D ``(in, out)``: rows ``in``, columns ``out``.
    * 3-D under a module named ``query``, ``key`` or ``value``, or a module whose name starts with
      ``DenseGeneral`` / ``LinearGeneral``: rows are the first axis (``(in, heads*head_dim)``).
    * 3-D under a module named ``out`` or whose name contains ``conv``: rows are the first two axes
      (``(heads*head_dim, out)``, ``(k*cin, cout)``).
    * 4-D and more (convolutions): every axis but the last is a row axis.

    Args:
      path: the leaf's path, as given by :func:`path_names`.
      leaf: the kernel (anything with a ``shape``).

    Returns:
      The :class:`MatrixView` of the leaf.

    Raises:
      ValueError: for a leaf of fewer than two dimensions, or a 3-D kernel under a module whose name
        does not say which axes are its inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> default_view(("params", "Conv_0", "kernel"), jnp.zeros((3, 3, 8, 16)))
      MatrixView(row_axes=(0, 1, 2), col_axes=(3,))
      >>> default_view(("attn", "query", "kernel"), jnp.zeros((64, 4, 16)))
      MatrixView(row_axes=(0,), col_axes=(1, 2))
    """
    ndim = len(np.shape(leaf))
    if ndim < 2:
        raise ValueError(f"leaf {path_str(path)!r} has {ndim} dimension(s); a matrix needs >= 2.")
    if ndim == 2:
        return MatrixView((0,), (1,))
    if ndim >= 4:
        return MatrixView.split(ndim, ndim - 1)
    module = path[-2] if len(path) >= 2 else ""
    if module in _ATTENTION_INPUT_PROJECTIONS or module.startswith(
        ("DenseGeneral", "LinearGeneral")
    ):
        return MatrixView.split(3, 1)
    if module == "out" or "conv" in module.lower():
        return MatrixView.split(3, 2)
    raise ValueError(
        f"cannot tell which axes of the 3-D kernel {path_str(path)!r} of shape {np.shape(leaf)} "
        "are inputs: its module name is neither an attention projection (query/key/value/out), "
        "a DenseGeneral/LinearGeneral nor a convolution. Pass view=lambda path, leaf: "
        "MatrixView(row_axes=..., col_axes=...) for it."
    )


def path_names(keypath: tuple[Any, ...]) -> Path:
    """Converts a ``jax.tree_util`` key path into a tuple of names.

    Dict keys, attribute names and sequence indices become strings; the trailing ``value``
    attribute of a Flax NNX variable is dropped, so a Linen dict and an NNX ``State`` holding the
    same model give the same paths.

    Example:
      >>> import jax
      >>> [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path({'a': [1, 2]})[0]]
      [('a', '0'), ('a', '1')]
    """
    names = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(str(key.key))
        else:
            names.append(str(key))
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names.pop()
    return tuple(names)


def path_str(path: Path) -> str:
    """The ``'/'``-joined form of a path, used as the key of per-matrix mappings."""
    return "/".join(path)


def is_kernel(path: Path, leaf: Any) -> bool:
    """The default filter: leaves named ``kernel`` with at least two dimensions.

    Biases, norm scales, BatchNorm statistics and embeddings (``embedding``) are left alone.
    """
    return bool(path) and path[-1] == "kernel" and len(np.shape(leaf)) >= 2


def kernel_filter(include: str | None = None, exclude: str | None = None) -> Filter:
    """A filter of kernels whose ``'/'``-joined path matches ``include`` and not ``exclude``.

    Args:
      include: a regular expression searched in the path; ``None`` accepts every kernel.
      exclude: a regular expression searched in the path; ``None`` rejects none.

    Returns:
      A ``(path, leaf) -> bool`` filter that also requires :func:`is_kernel`.

    Example:
      >>> import jax.numpy as jnp
      >>> keep = kernel_filter(exclude=r"head|classifier")
      >>> keep(("params", "Dense_0", "kernel"), jnp.zeros((4, 4)))
      True
      >>> keep(("params", "head", "kernel"), jnp.zeros((4, 4)))
      False
    """
    include_re = re.compile(include) if include is not None else None
    exclude_re = re.compile(exclude) if exclude is not None else None

    def select(path: Path, leaf: Any) -> bool:
        if not is_kernel(path, leaf):
            return False
        name = path_str(path)
        if include_re is not None and not include_re.search(name):
            return False
        return exclude_re is None or not exclude_re.search(name)

    return select


class MatrixLeaf(NamedTuple):
    """A selected leaf together with how it is seen as a matrix.

    Attributes:
      index: position of the leaf in ``jax.tree_util.tree_flatten_with_path(tree)``.
      path: the leaf's path (:func:`path_names`).
      view: its :class:`MatrixView`.
      shape: the leaf's shape.
      matrix_shape: ``(m, n)``, the shape of its matrix.
    """

    index: int
    path: Path
    view: MatrixView
    shape: tuple[int, ...]
    matrix_shape: tuple[int, int]

    @property
    def full_rank(self) -> int:
        """``min(m, n)``: the number of singular values of the matrix."""
        return min(self.matrix_shape)


def check_floating(name: str, leaf: Any) -> None:
    """Raises ``TypeError`` unless ``leaf`` has a floating dtype."""
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"leaf {name!r} has dtype {dtype}; only floating-point matrices (float16, bfloat16, "
            "float32, float64) can be decomposed. Exclude it with a filter."
        )


def matrix_leaves(
    tree: Any,
    filter: Filter = is_kernel,  # noqa: A002 - the name every caller expects.
    view: ViewFn = default_view,
) -> dict[str, MatrixLeaf]:
    """Selects the weight matrices of a tree and says how each is seen as a matrix.

    Args:
      tree: a parameter tree: a Flax Linen variable dict, a Flax NNX ``State``, or any pytree.
      filter: ``(path, leaf) -> bool``; which leaves are matrices.
      view: ``(path, leaf) -> MatrixView``; how each selected leaf is seen as a matrix.

    Returns:
      An ordered mapping from the ``'/'``-joined path to a :class:`MatrixLeaf`, in tree order.

    Raises:
      ValueError: if the filter selects no leaf, or a view does not fit its leaf.
      TypeError: if a selected leaf is not floating-point.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)}}
      >>> list(matrix_leaves(params))
      ['Dense_0/kernel']
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    selected = {}
    for index, (keypath, leaf) in enumerate(flat):
        path = path_names(keypath)
        if not filter(path, leaf):
            continue
        name = path_str(path)
        check_floating(name, leaf)
        leaf_view = view(path, leaf)
        shape = tuple(np.shape(leaf))
        leaf_view.check(shape, name=repr(name))
        selected[name] = MatrixLeaf(index, path, leaf_view, shape, leaf_view.matrix_shape(shape))
    if not selected:
        raise ValueError(
            "filter selected no leaf of the tree; paths in the tree: "
            f"{[path_str(path_names(p)) for p, _ in flat][:20]}"
        )
    return selected


def kernel_kinds(
    tree: Any,
    filter: Filter = is_kernel,  # noqa: A002
    view: ViewFn = default_view,
) -> dict[str, str]:
    """Names each selected matrix ``'attention'``, ``'conv'`` or ``'dense'``, e.g. for GSVT pools.

    A kernel is ``'attention'`` when its path has a ``query``/``key``/``value`` module or a module
    whose name contains ``attention`` or ``attn`` (any case); otherwise ``'conv'`` when it has three
    or more dimensions, else ``'dense'``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Conv_0": {"kernel": jnp.zeros((3, 3, 3, 8))},
      ...           "Dense_0": {"kernel": jnp.zeros((8, 2))}}
      >>> kernel_kinds(params)
      {'Conv_0/kernel': 'conv', 'Dense_0/kernel': 'dense'}
    """
    kinds = {}
    for name, leaf in matrix_leaves(tree, filter=filter, view=view).items():
        modules = leaf.path[:-1]
        if any(m in _ATTENTION_INPUT_PROJECTIONS or re.search("attn|attention", m, re.I)
               for m in modules):
            kinds[name] = "attention"
        elif len(leaf.shape) >= 3:
            kinds[name] = "conv"
        else:
            kinds[name] = "dense"
    return kinds
