"""How a kernel leaf of a parameter tree is seen as a matrix, which leaves are seen, and their keys.

A *view* is declarative: it names which axes of the leaf become the rows of the matrix and which
become its columns (like the dimension numbers of ``jax.lax.dot_general``). Every method of jaxlr
that cuts singular values works on that matrix and writes the result back through the same view,
so the leaf keeps its shape and the user's model is used unchanged.

Two layouts are built in (``view=`` takes a view function, a :class:`MatrixView`, or a preset name):

=================  ==========================================  ==========================
preset             kernel                                      matrix
=================  ==========================================  ==========================
``"flax"``         Dense ``(in, out)``                         ``(in, out)``
                   Conv ``(kh, kw, cin, cout)`` (HWIO)         ``(kh*kw*cin, cout)``
                   attention ``query/key/value`` ``(in, h, d)``  ``(in, h*d)``
                   attention ``out`` ``(h, d, out)``           ``(h*d, out)``
``"torch"``        Linear ``(out, in)`` (PyTorch, Equinox)     ``(in, out)``
                   Conv ``(cout, cin, kh, kw)`` (OIHW)         ``(cin*kh*kw, cout)``
=================  ==========================================  ==========================

The default (``view=None``) is the ``"flax"`` layout plus two checks that catch a kernel of the
other layout before anything is cut: a 4-D kernel whose trailing axes look like a convolution
window and leading ones do not (an OIHW kernel such as ``(16, 3, 3, 3)``) raises, and so does a
kernel whose column count differs from the size of the ``bias`` beside it. Both errors name the
``view="torch"`` / ``view="flax"`` option.

**Paths and keys.** A leaf's path is a tuple of names (``('params', 'Dense_0', 'kernel')`` in a
Flax Linen variable dict, ``('linear', 'kernel')`` in a Flax NNX ``State``; the trailing
``.value`` of an NNX variable is dropped). Mappings keyed by matrix (ranks, BatchNorm pairs, cost
tables) use the *key* of a path: its names joined by ``'/'``, without the leading ``params`` of a
Linen variable dict, so ``variables`` and ``variables["params"]`` give the same keys. Everywhere a
key is taken, a ``'/'``-joined string or a tuple of names is accepted (:func:`path_key`).

Which leaves are seen, and of which kind, is :mod:`jaxlr.selection`'s.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "KINDS",
    "Filter",
    "KernelFilter",
    "MatrixView",
    "Path",
    "View",
    "ViewFn",
    "checked_view",
    "default_view",
    "flax_view",
    "is_kernel",
    "kernel_filter",
    "path_key",
    "path_names",
    "resolve_filter",
    "resolve_view",
    "torch_view",
]

Path = tuple[str, ...]
"""A leaf's position in a tree, as a tuple of names (``('params', 'Dense_0', 'kernel')``)."""

KINDS = ("attention", "conv", "dense")
"""The kinds of matrices (module documentation)."""


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
        shape = self.matrix_shape(tuple(np.shape(leaf)))
        if perm != tuple(range(len(perm))):
            leaf = jnp.transpose(leaf, perm)
        return _reshape(leaf, shape, (len(self.row_axes), len(self.col_axes)), merge=True)

    def from_matrix(self, matrix: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """The inverse of :meth:`to_matrix`: an ``(m, n)`` matrix back to a leaf of ``shape``."""
        perm = tuple(self.row_axes) + tuple(self.col_axes)
        if tuple(matrix.shape) != self.matrix_shape(shape):
            raise ValueError(
                f"matrix of shape {tuple(matrix.shape)} cannot be viewed as a leaf of shape "
                f"{shape} through {self}: expected {self.matrix_shape(shape)}."
            )
        permuted = _reshape(matrix, tuple(shape[a] for a in perm),
                            (len(self.row_axes), len(self.col_axes)), merge=False)
        if perm == tuple(range(len(perm))):
            return permuted
        return jnp.transpose(permuted, np.argsort(perm))


ViewFn = Callable[[Path, Any], MatrixView]
"""``(path, leaf) -> MatrixView``: how a selected leaf is seen as a matrix."""

View = ViewFn | MatrixView | str | None
"""What ``view=`` arguments take: a view function, one :class:`MatrixView` for every leaf, a preset
name (``"flax"``, ``"torch"``, ``"default"``) or ``None`` (the default)."""

_ATTENTION_INPUTS = ("query", "key", "value")
ATTENTION_PROJECTIONS = (*_ATTENTION_INPUTS, "out")
GENERAL_DENSE = ("DenseGeneral", "LinearGeneral")
# A convolution window: every spatial axis of a kernel at most this long.
_WINDOW = 7


def _reshape(x: jax.Array, shape: tuple[int, ...], groups: tuple[int, int], merge: bool
             ) -> jax.Array:
    """``jnp.reshape`` between a leaf and its matrix (``groups``: the leaf axes of the rows and of
    the columns). On a mesh with ``Explicit`` axes, where JAX needs the output's sharding: a
    merged dimension keeps the sharding of its first axis when that is its only sharded axis, a
    split one gives its sharding to its first axis when that divides evenly; else unsharded."""
    typed = getattr(jax.typeof(x), "sharding", None)
    if not (isinstance(typed, jax.sharding.NamedSharding)
            and jax.sharding.AxisType.Explicit in typed.mesh.axis_types
            and any(entry is not None for entry in typed.spec)):
        return jnp.reshape(x, shape)
    spec = tuple(typed.spec) + (None,) * (x.ndim - len(typed.spec))
    sizes = dict(zip(typed.mesh.axis_names, typed.mesh.axis_sizes, strict=True))

    def count(entry: Any) -> int:
        names = entry if isinstance(entry, tuple) else (entry,)
        return math.prod(sizes[name] for name in names if name is not None)

    out: list[Any] = []
    if merge:
        start = 0
        for size in groups:
            block = spec[start:start + size]
            out.append(block[0] if all(e is None for e in block[1:]) else None)
            start += size
    else:
        for entry, size in zip(spec, groups, strict=True):
            first = len(out)
            out.extend([None] * size)
            if entry is not None and shape[first] % count(entry) == 0:
                out[first] = entry
    mesh = typed.mesh if isinstance(x, jax.core.Tracer) else x.sharding.mesh
    return jax.lax.reshape(x, shape, out_sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*out)))


def module_name(path: Path) -> str:
    return path[-2] if len(path) >= 2 else ""


def flax_view(path: Path, leaf: Any) -> MatrixView:
    """The Flax layout: kernels compute ``y = x @ W``, ``W`` of shape ``(inputs..., outputs...)``.

    * 2-D ``(in, out)``: rows ``in``, columns ``out``.
    * 3-D under a module named ``query``, ``key`` or ``value``, or a module whose name starts with
      ``DenseGeneral`` / ``LinearGeneral``: rows are the first axis (``(in, heads*head_dim)``).
    * 3-D under a module named ``out`` or whose name contains ``conv``: rows are the first two axes
      (``(heads*head_dim, out)``, ``(k*cin, cout)``).
    * 4-D and more (convolutions, HWIO): every axis but the last is a row axis.

    Raises:
      ValueError: for a leaf of fewer than two dimensions, or a 3-D kernel under a module whose name
        does not say which axes are its inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> flax_view(("Conv_0", "kernel"), jnp.zeros((3, 3, 8, 16)))
      MatrixView(row_axes=(0, 1, 2), col_axes=(3,))
      >>> flax_view(("attn", "query", "kernel"), jnp.zeros((64, 4, 16)))
      MatrixView(row_axes=(0,), col_axes=(1, 2))
    """
    ndim = len(np.shape(leaf))
    if ndim < 2:
        raise ValueError(f"leaf {path_key(path)!r} has {ndim} dimension(s); a matrix needs >= 2.")
    if ndim == 2:
        return MatrixView((0,), (1,))
    if ndim >= 4:
        return MatrixView.split(ndim, ndim - 1)
    module = module_name(path)
    if module in _ATTENTION_INPUTS or module.startswith(GENERAL_DENSE):
        return MatrixView.split(3, 1)
    if module == "out" or "conv" in module.lower():
        return MatrixView.split(3, 2)
    raise ValueError(
        f"cannot tell which axes of the 3-D kernel {path_key(path)!r} of shape {np.shape(leaf)} "
        "are inputs: its module name is neither an attention projection (query/key/value/out), "
        "a DenseGeneral/LinearGeneral nor a convolution. Pass view=MatrixView(row_axes=..., "
        "col_axes=...) or a function (path, leaf) -> MatrixView for it."
    )


def torch_view(path: Path, leaf: Any) -> MatrixView:
    """The PyTorch / Equinox layout: Linear ``(out, in)``, Conv ``(out, in, *window)`` (OIHW).

    The matrix is ``(in * prod(window), out)``, the same matrix (and singular values) as the Flax
    layout of the same layer.

    Example:
      >>> import jax.numpy as jnp
      >>> view = torch_view(("conv", "weight"), jnp.zeros((16, 3, 3, 3)))
      >>> view, view.matrix_shape((16, 3, 3, 3))
      (MatrixView(row_axes=(1, 2, 3), col_axes=(0,)), (27, 16))
    """
    ndim = len(np.shape(leaf))
    if ndim < 2:
        raise ValueError(f"leaf {path_key(path)!r} has {ndim} dimension(s); a matrix needs >= 2.")
    return MatrixView(tuple(range(1, ndim)), (0,))


def default_view(path: Path, leaf: Any) -> MatrixView:
    """:func:`flax_view`, refusing 4-D kernels that look like PyTorch/Equinox OIHW kernels.

    A kernel of ``>= 4`` dimensions whose trailing spatial axes are all at most 7 long while one
    of its leading ones is longer (``(16, 3, 3, 3)``: 16 filters of 3 x 3 x 3) is an OIHW kernel
    seen the wrong way round (as a ``144 x 3`` matrix), so it raises, naming ``view="torch"``;
    pass ``view="flax"`` for a Flax kernel that only looks like one.

    Example:
      >>> import jax.numpy as jnp
      >>> default_view(("Conv_0", "kernel"), jnp.zeros((3, 3, 8, 16)))
      MatrixView(row_axes=(0, 1, 2), col_axes=(3,))
    """
    shape = tuple(np.shape(leaf))
    if len(shape) >= 4:
        spatial = len(shape) - 2
        leading, trailing = shape[:spatial], shape[-spatial:]
        if max(trailing) <= _WINDOW < max(leading):
            raise ValueError(
                f"kernel {path_key(path)!r} of shape {shape} looks like a PyTorch/Equinox (OIHW) "
                f"kernel: the Flax layout (HWIO) would see it as a "
                f"{math.prod(shape[:-1])} x {shape[-1]} matrix. Pass view='torch' for OIHW "
                "kernels, or view='flax' if it is a Flax kernel."
            )
    return flax_view(path, leaf)


_VIEW_PRESETS: dict[str, ViewFn] = {"flax": flax_view, "torch": torch_view,
                                    "default": default_view}


def resolve_view(view: View) -> ViewFn:
    """The view function that ``view`` stands for (module documentation).

    Raises:
      ValueError: for an unknown preset name.
      TypeError: for anything that is not a view function, a :class:`MatrixView`, a preset name or
        ``None``.
    """
    if view is None:
        return default_view
    if isinstance(view, str):
        if view not in _VIEW_PRESETS:
            raise ValueError(f"view must be one of {sorted(_VIEW_PRESETS)} (a preset name), a "
                             f"MatrixView or a function (path, leaf) -> MatrixView; got {view!r}.")
        return _VIEW_PRESETS[view]
    if isinstance(view, MatrixView):
        return _ConstantView(checked_view(view))
    if callable(view):
        return view
    raise TypeError(f"view must be a function (path, leaf) -> MatrixView, a MatrixView or one of "
                    f"{sorted(_VIEW_PRESETS)}; got {view!r} of type {type(view).__name__}.")


def checked_view(view: MatrixView) -> MatrixView:
    """``view`` with its axes as tuples of distinct non-negative ints.

    Raises:
      TypeError: naming ``view``, for axes that are not so.
    """
    axes = (view.row_axes, view.col_axes)
    if not all(isinstance(group, tuple | list) for group in axes) or not all(
            isinstance(a, int | np.integer) and not isinstance(a, bool) and a >= 0
            for group in axes for a in group):
        raise TypeError(f"view must have row_axes and col_axes as tuples of non-negative ints, "
                        f"got {view!r}.")
    return MatrixView(tuple(int(a) for a in view.row_axes), tuple(int(a) for a in view.col_axes))


@dataclasses.dataclass(frozen=True)
class _ConstantView:
    """One :class:`MatrixView` for every leaf (hashable, so it can be a static argument)."""

    view: MatrixView

    def __call__(self, path: Path, leaf: Any) -> MatrixView:
        del path, leaf
        return self.view


# ---------------------------------------------------------------------------------------------
# Paths and keys.


def path_names(keypath: Iterable[Any]) -> Path:
    """Converts a ``jax.tree_util`` key path into a tuple of names.

    Dict keys, attribute names and sequence indices become strings; the trailing ``value``
    attribute of a Flax NNX variable is dropped, so a Linen dict and an NNX ``State`` holding the
    same model give the same paths.

    Example:
      >>> import jax
      >>> [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path({'a': [1, 2]})[0]]
      [('a', '0'), ('a', '1')]
    """
    keypath = tuple(keypath)
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


def path_key(path: str | Sequence[Any]) -> str:
    """The key of a path: its names joined by ``'/'``, without a leading ``params``.

    Accepts a ``'/'``-joined string, a tuple of names (as ``flax.traverse_util`` gives) or a
    ``jax.tree_util`` key path.

    Raises:
      TypeError: for anything else.

    Example:
      >>> path_key(("params", "Conv_0", "kernel")), path_key("Conv_0/kernel")
      ('Conv_0/kernel', 'Conv_0/kernel')
      >>> path_key(("blocks", 0, "conv1", "kernel"))
      'blocks/0/conv1/kernel'
    """
    if type(path) is tuple and all(type(name) is str for name in path):  # the common case
        names = path
    elif isinstance(path, str):
        names = tuple(name for name in path.split("/") if name)
    elif isinstance(path, Sequence) and not isinstance(path, bytes):
        if any(isinstance(k, jax.tree_util.DictKey | jax.tree_util.GetAttrKey
                          | jax.tree_util.SequenceKey | jax.tree_util.FlattenedIndexKey)
               for k in path):
            names = path_names(path)
        else:
            names = tuple(str(name) for name in path)
    else:
        raise TypeError(f"a path is a '/'-joined string or a tuple of names, got {path!r} of "
                        f"type {type(path).__name__}.")
    if len(names) > 1 and names[0] == "params":
        names = names[1:]
    return "/".join(names)


def keyed(mapping: Mapping[Any, Any], name: str = "mapping") -> dict[str, Any]:
    """``mapping`` with every key replaced by its :func:`path_key`.

    Raises:
      TypeError: if ``mapping`` is not a mapping.
      ValueError: if two keys name the same path.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{name} must be a mapping {{path: value}}, got {type(mapping).__name__}.")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        canonical = path_key(key)
        if canonical in out:
            raise ValueError(f"{name} names the path {canonical!r} twice.")
        out[canonical] = value
    return out


# ---------------------------------------------------------------------------------------------
# Filters.

Filter = Callable[[Path, Any], bool] | str | Sequence[str]
"""Which leaves are matrices: ``(path, leaf) -> bool``, ``"all"``, or a kind name or tuple of kind
names; ``None`` is the default selection (:mod:`jaxlr.selection`)."""


def is_kernel(path: Path, leaf: Any) -> bool:
    """Leaves named ``kernel`` with at least two dimensions: the kernels the default selection
    and ``filter="all"`` start from (:mod:`jaxlr.selection`).

    Biases, norm scales, BatchNorm statistics and embeddings (``embedding``) are left alone.
    """
    return bool(path) and path[-1] == "kernel" and len(np.shape(leaf)) >= 2


@dataclasses.dataclass(frozen=True)
class KernelFilter:
    """A filter of kernels by leaf name, path pattern and kind (built by :func:`kernel_filter`).

    Attributes:
      names: leaf names that are kernels.
      include: a regular expression searched in the key, or ``None``.
      exclude: a regular expression searched in the key, or ``None``.
      kinds: kinds of matrices selected (``None``: all), checked by
        :func:`jaxlr.selection.matrix_leaves`, which sees the whole tree.
    """

    names: tuple[str, ...] = ("kernel",)
    include: str | None = None
    exclude: str | None = None
    kinds: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for field in ("include", "exclude"):
            pattern = getattr(self, field)
            if pattern is None:
                continue
            if not isinstance(pattern, str):
                raise TypeError(f"{field} must be a regular expression (str) or None, got "
                                f"{pattern!r}.")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{field}={pattern!r} is not a valid regular expression: "
                                 f"{error}.") from None
        if isinstance(self.names, str) or not all(isinstance(n, str) for n in self.names):
            raise TypeError(f"names must be a tuple of leaf names, got {self.names!r}.")
        if self.kinds is not None:
            unknown = sorted(set(self.kinds) - set(KINDS))
            if isinstance(self.kinds, str) or unknown or not self.kinds:
                raise ValueError(f"kinds must be a non-empty tuple of {KINDS}, got "
                                 f"{self.kinds!r}.")

    def __call__(self, path: Path, leaf: Any) -> bool:
        if not path or path[-1] not in self.names or len(np.shape(leaf)) < 2:
            return False
        key = path_key(path)
        if self.include is not None and not re.search(self.include, key):
            return False
        return self.exclude is None or not re.search(self.exclude, key)


def kernel_filter(
    include: str | None = None,
    exclude: str | None = None,
    *,
    names: str | Sequence[str] = ("kernel",),
    kinds: str | Sequence[str] | None = None,
) -> KernelFilter:
    """A filter of kernels whose key matches ``include`` and not ``exclude``.

    Args:
      include: a regular expression searched in the key; ``None`` accepts every kernel.
      exclude: a regular expression searched in the key; ``None`` rejects none.
      names: leaf names that are kernels: ``"kernel"`` (Flax), ``"weight"`` (PyTorch, Equinox).
      kinds: ``"conv"``, ``"dense"``, ``"attention"`` or a tuple of them; ``None``: every kind.

    Returns:
      A :class:`KernelFilter`, a ``(path, leaf) -> bool`` filter of leaves named as ``names`` with
      at least two dimensions.

    Raises:
      ValueError: for a pattern that is not a regular expression or an unknown kind.

    Example:
      >>> import jax.numpy as jnp
      >>> keep = kernel_filter(exclude=r"head|classifier")
      >>> keep(("params", "Dense_0", "kernel"), jnp.zeros((4, 4)))
      True
      >>> keep(("params", "head", "kernel"), jnp.zeros((4, 4)))
      False
    """
    return KernelFilter(
        names=(names,) if isinstance(names, str) else tuple(names),
        include=include,
        exclude=exclude,
        kinds=(kinds,) if isinstance(kinds, str) else None if kinds is None else tuple(kinds),
    )


def resolve_filter(filter: Filter | None) -> Callable[[Path, Any], bool]:  # noqa: A002
    """The per-leaf filter function that ``filter`` stands for: ``None`` and ``"all"`` are
    :func:`is_kernel` (the default's output-layer rule needs the whole tree and is
    :func:`jaxlr.selection.matrix_leaves`'s); a kind name or a tuple of them is a
    :class:`KernelFilter` of those kinds.

    Raises:
      ValueError: for an unknown kind name.
      TypeError: for anything that is not a function, a kind name or a tuple of kind names.
    """
    if filter is None or (isinstance(filter, str) and filter == "all"):
        return is_kernel
    if isinstance(filter, str) or (isinstance(filter, Sequence) and not callable(filter)):
        kinds = (filter,) if isinstance(filter, str) else tuple(filter)
        if not kinds or not all(isinstance(k, str) and k in KINDS for k in kinds):
            raise ValueError(f"a filter given by name must be 'all', one of {KINDS} or a tuple of "
                             f"them, got {filter!r}; or pass a function (path, leaf) -> bool.")
        return KernelFilter(kinds=kinds)
    if callable(filter):
        return filter
    raise TypeError(f"filter must be a function (path, leaf) -> bool, a kind name among {KINDS} "
                    f"or a tuple of them; got {filter!r} of type {type(filter).__name__}.")


# ---------------------------------------------------------------------------------------------
# The dtype every decomposition needs.


def check_floating(name: str, leaf: Any) -> None:
    """Raises ``TypeError`` unless ``leaf`` has a floating dtype."""
    dtype = getattr(leaf, "dtype", None)
    dtype = np.dtype(dtype) if dtype is not None else jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"leaf {name!r} has dtype {dtype}; only floating-point matrices (float16, bfloat16, "
            "float32, float64) can be decomposed. Exclude it with a filter."
        )
