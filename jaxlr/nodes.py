"""The two ways jaxlr holds a kernel other than as an array, and how to turn them back into one.

* :class:`Product`: LoRITa's over-parameterised kernel, the product ``W_1 W_2 ... W_N`` of its
  factors (:func:`jaxlr.lorita.factorize`), trained in place of the kernel.
* :class:`LowRank`: a truncated kernel held as its factor pair ``A B`` (``A`` is ``m x r``, ``B``
  ``r x n``; :func:`jaxlr.compress`), run as two thin layers (:mod:`jaxlr.inference`) and exported
  as such (:mod:`jaxlr.export`). It is the one form of a factor pair, from truncation to export.

Both are pytree nodes: their factors are the children (so ``jit``, ``grad``, optax and orbax see
plain arrays), the kernel's shape and :class:`~jaxlr.matrices.MatrixView` are static. Both read as
the kernel they stand for: ``node[...]`` (``node.value``) is the dense kernel, and ``node.shape``
and ``node.dtype`` are its shape and dtype. That is how a Flax NNX layer whose ``kernel`` is a node
reads it (``self.kernel[...]``), so NNX models run unchanged on them, and ``model.fc1.kernel[...]``
keeps working. Inside an NNX module the factors are ``nnx.Param`` s, found and updated by
``nnx.state``, ``nnx.grad`` and ``nnx.Optimizer`` like any other parameter; in a Linen variable
dict or any other tree they are arrays.

:func:`collapse_tree` multiplies every node of a tree back into its dense kernel
(:func:`jaxlr.collapse`, of a tree or an NNX module).
A layer is worth holding as a factor pair only where that saves, :func:`saves`:
``r (m + n) < m n``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta

from jaxlr import matrices
from jaxlr.matrices import MatrixView

__all__ = ["LowRank", "Product", "collapse_tree", "holds_kernel", "is_node", "saves"]

_HIGHEST = jax.lax.Precision.HIGHEST


def saves(rank: int, m: int, n: int) -> bool:
    """Whether a rank-``rank`` factor pair of an ``m x n`` matrix holds fewer numbers than the
    matrix, ``rank (m + n) < m n`` (and so costs fewer multiply-accumulates per position).

    Raises:
      TypeError: if an argument is not an integer.

    Example:
      >>> saves(8, 64, 64), saves(40, 64, 64)
      (True, False)
    """
    for name, value in (("rank", rank), ("m", m), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an int, got {value!r}.")
    return rank * (m + n) < m * n


def value_of(factor: Any) -> Any:
    """A factor's array (an NNX variable's value; the array itself otherwise)."""
    return factor[...] if isinstance(factor, nnx.Variable) else factor


def _frozen_view(view: Any) -> MatrixView:
    if not isinstance(view, MatrixView):
        raise TypeError(f"view must be a MatrixView, got {view!r} of type {type(view).__name__}.")
    return matrices.checked_view(view)


def _frozen_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list) or not all(
            isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 0
            for d in shape):
        raise TypeError(f"shape must be a tuple of non-negative ints, got {shape!r}.")
    return tuple(int(d) for d in shape)


def _matrices_given(*children: Any) -> bool:
    """Whether every child is a matrix (nodes built by ``jax.tree`` utilities may hold anything)."""
    return all(len(np.shape(value_of(c))) == 2 for c in children if c is not None) and all(
        hasattr(value_of(c), "shape") for c in children)


def _short(factor: Any) -> str:
    """A factor as ``dtype[shape]`` (``float32[48,8]``), as Flax summarises arrays; anything else
    (a placeholder a tree utility put there) as its type's name."""
    value = value_of(factor)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        return type(value).__name__
    return f"{np.dtype(dtype).name}[{','.join(str(d) for d in shape)}]"


def _matrix_kind(shape: tuple[int, ...], view: MatrixView) -> str:
    """``"dense"`` for a 2-D kernel seen as itself, ``"conv"`` for a kernel of more than two axes
    with one output axis, ``"view"`` for any other matrix view (attention, torch layouts)."""
    if len(shape) == 2 and view == MatrixView((0,), (1,)):
        return "dense"
    if len(shape) > 2 and view.col_axes == (len(shape) - 1,):
        return "conv"
    return "view"


def _kind_and_view(shape: tuple[int, ...], view: MatrixView) -> str:
    kind = _matrix_kind(shape, view)
    return f"kind={kind!r}" + (f", view={view}" if kind == "view" else "")


class _KernelLike(meta.AxisMetadata):
    """Reading a node as the dense kernel it stands for.

    A Flax ``AxisMetadata`` box whose content is the dense kernel: Flax Linen unboxes parameters
    when a layer reads them (``self.param``), so an unchanged Linen model runs on a tree holding
    these nodes, on the kernels they stand for, gradients reaching the factors.
    """

    shape: tuple[int, ...]

    def kernel(self) -> jax.Array:  # pragma: no cover - defined by the subclasses
        raise NotImplementedError

    def unbox(self) -> jax.Array:
        """The dense kernel (what a Flax Linen layer reads)."""
        return self.kernel()

    def replace_boxed(self, val: Any) -> Any:
        raise TypeError(f"a {type(self).__name__} holds its kernel as factors; one array cannot "
                        "replace it. Collapse the tree first (jaxlr.collapse).")

    def add_axis(self, index: int, params: dict[Any, Any]) -> Any:
        raise NotImplementedError(f"a {type(self).__name__} kernel cannot go through a lifted "
                                  "transformation that adds an axis (nn.scan, nn.vmap).")

    def remove_axis(self, index: int, params: dict[Any, Any]) -> Any:
        raise NotImplementedError(f"a {type(self).__name__} kernel cannot go through a lifted "
                                  "transformation that removes an axis (nn.scan, nn.vmap).")

    @property
    def value(self) -> jax.Array:
        """The dense kernel (as ``nnx.Param.value`` reads a kernel)."""
        return self.kernel()

    def __getitem__(self, index: Any) -> jax.Array:
        return self.kernel()[index]

    # Code that uses the kernel as an array (Equinox's ``self.weight @ x``, ``lax.conv`` on it,
    # ``jnp`` functions) gets the kernel it stands for; ``@`` with a 2-D factor pair runs as two
    # thin products (LowRank overrides ``_product``).
    def __jax_array__(self) -> jax.Array:
        return self.kernel()

    def _product(self, x: Any, kernel_first: bool) -> jax.Array:
        kernel = self.kernel()
        return jnp.matmul(kernel, x) if kernel_first else jnp.matmul(x, kernel)

    def __matmul__(self, x: Any) -> jax.Array:
        return self._product(x, kernel_first=True)

    def __rmatmul__(self, x: Any) -> jax.Array:
        return self._product(x, kernel_first=False)

    @property
    def ndim(self) -> int:
        """The kernel's number of dimensions."""
        return len(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)``, the shape of the kernel's matrix."""
        return self.view.matrix_shape(self.shape)  # type: ignore[attr-defined]


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["factors"], meta_fields=["shape", "view"]
)
@dataclasses.dataclass(frozen=True)
class Product(_KernelLike):
    """A kernel held as the product of its factors, ``view.from_matrix(W_1 @ ... @ W_N, shape)``.

    Attributes:
      factors: the ``N`` factor matrices, the first applied to the input first (arrays, or
        ``nnx.Param`` s inside an NNX module).
      shape: the shape of the kernel the product stands for.
      view: how that kernel is seen as a matrix.

    Raises:
      ValueError: at construction, if the factors are matrices that do not chain into the kernel's
        ``m x n`` matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> node = Product((jnp.eye(2), 2 * jnp.ones((2, 3))), shape=(2, 3),
      ...                view=MatrixView((0,), (1,)))
      >>> node[...]
      Array([[2., 2., 2.],
             [2., 2., 2.]], dtype=float32)
      >>> node.depth, node.shape, node.dtype
      (2, (2, 3), dtype('float32'))
    """

    factors: tuple[Any, ...]
    shape: tuple[int, ...]
    view: MatrixView

    def __post_init__(self) -> None:
        object.__setattr__(self, "factors", tuple(self.factors))
        object.__setattr__(self, "shape", _frozen_shape(self.shape))
        object.__setattr__(self, "view", _frozen_view(self.view))
        if self.factors and _matrices_given(*self.factors):
            self.check()

    def check(self, name: str = "the product") -> None:
        """Raises ``ValueError`` unless the factors chain into the kernel's matrix."""
        shapes = [tuple(np.shape(value_of(f))) for f in self.factors]
        self.view.check(self.shape, "the kernel")
        expected = self.view.matrix_shape(self.shape)
        chained = bool(shapes) and all(len(s) == 2 for s in shapes) and all(
            a[1] == b[0] for a, b in zip(shapes, shapes[1:], strict=False))
        if not chained or (shapes[0][0], shapes[-1][1]) != expected:
            raise ValueError(
                f"factors of {name} have shapes {shapes}; they must chain into a {expected[0]} x "
                f"{expected[1]} matrix for the kernel of shape {self.shape}."
            )

    def __repr__(self) -> str:
        factors = ", ".join(_short(f) for f in self.factors)
        return (f"Product(shape={self.shape}, depth={self.depth}, "
                f"{_kind_and_view(self.shape, self.view)}, factors=({factors}))")

    @property
    def depth(self) -> int:
        """``N``, the number of factors."""
        return len(self.factors)

    @property
    def dtype(self) -> Any:
        """The dtype of the kernel (the factors' common dtype)."""
        return jnp.result_type(*(value_of(f).dtype for f in self.factors))

    @property
    def param_count(self) -> int:
        """Numbers held by the factors."""
        return sum(int(np.prod(np.shape(value_of(f)))) for f in self.factors)

    def matrix(self) -> jax.Array:
        """The product ``W_1 @ ... @ W_N`` as an ``m x n`` matrix."""
        return functools.reduce(lambda a, b: jnp.matmul(a, b, precision=_HIGHEST),
                                [value_of(f) for f in self.factors])

    def kernel(self) -> jax.Array:
        """The product reshaped to the kernel's own shape."""
        return self.view.from_matrix(self.matrix(), self.shape)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["a", "b"], meta_fields=["shape", "view"]
)
@dataclasses.dataclass(frozen=True)
class LowRank(_KernelLike):
    """A kernel held as a factor pair, ``view.from_matrix(a @ b, shape)``.

    Attributes:
      a: the ``m x r`` left factor (applied to the input first).
      b: the ``r x n`` right factor.
      shape: the shape of the kernel the product stands for.
      view: how that kernel is seen as an ``m x n`` matrix.

    Raises:
      ValueError: at construction, if ``a`` and ``b`` are matrices that do not chain into the
        kernel's ``m x n`` matrix, or ``r > min(m, n)``.

    Example:
      >>> import jax.numpy as jnp
      >>> node = LowRank(jnp.ones((4, 1)), jnp.ones((1, 3)), shape=(4, 3),
      ...                view=MatrixView((0,), (1,)))
      >>> node.rank, node.param_count, node[...].shape, node.saves
      (1, 7, (4, 3), True)
    """

    a: Any
    b: Any
    shape: tuple[int, ...]
    view: MatrixView

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _frozen_shape(self.shape))
        object.__setattr__(self, "view", _frozen_view(self.view))
        if _matrices_given(self.a, self.b):
            self.check()

    def check(self, name: str = "the factor pair") -> None:
        """Raises ``ValueError`` unless ``a @ b`` is the kernel's matrix, of a valid rank."""
        self.view.check(self.shape, "the kernel")
        a_shape, b_shape = np.shape(value_of(self.a)), np.shape(value_of(self.b))
        m, n = self.view.matrix_shape(self.shape)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
            raise ValueError(f"{name}: factors of shapes {a_shape} and {b_shape} do not chain: "
                             f"a must be m x r and b r x n.")
        if (a_shape[0], b_shape[1]) != (m, n):
            raise ValueError(
                f"{name}: factors of shapes {a_shape} and {b_shape} make a {a_shape[0]} x "
                f"{b_shape[1]} matrix; the kernel of shape {self.shape} is {m} x {n} through "
                f"{self.view}.")
        if not 1 <= a_shape[1] <= min(m, n):
            raise ValueError(f"{name}: rank {a_shape[1]} is outside [1, {min(m, n)}] for a "
                             f"{m} x {n} kernel.")

    def __repr__(self) -> str:
        try:
            rank = f"rank={self.rank}, "
        except (IndexError, TypeError):  # placeholders (a tree utility's), not matrices
            rank = ""
        return (f"LowRank(shape={self.shape}, {rank}{_kind_and_view(self.shape, self.view)}, "
                f"a={_short(self.a)}, b={_short(self.b)})")

    @property
    def rank(self) -> int:
        """``r``."""
        return int(np.shape(value_of(self.a))[1])

    @property
    def dtype(self) -> Any:
        """The dtype of the kernel."""
        return jnp.result_type(value_of(self.a).dtype, value_of(self.b).dtype)

    @property
    def param_count(self) -> int:
        """Numbers held, ``r (m + n)``."""
        m, n = self.matrix_shape
        return self.rank * (m + n)

    @property
    def saves(self) -> bool:
        """Whether the pair holds fewer numbers than the kernel (:func:`saves`)."""
        return saves(self.rank, *self.matrix_shape)

    def _product(self, x: Any, kernel_first: bool) -> jax.Array:
        """``kernel @ x`` (or ``x @ kernel``) through the factors, never building the kernel, for
        a 2-D kernel seen as itself (Flax) or as its transpose (PyTorch, Equinox)."""
        a, b = value_of(self.a), value_of(self.b)
        if self.shape and len(self.shape) == 2 and self.view.row_axes == (1,):
            a, b = b.T, a.T  # the kernel is (a b)^T = b^T a^T
        elif len(self.shape) != 2:
            return super()._product(x, kernel_first)
        return jnp.matmul(a, jnp.matmul(b, x)) if kernel_first else jnp.matmul(
            jnp.matmul(x, a), b)

    def kernel(self) -> jax.Array:
        """The dense kernel ``A B`` in its own shape (inference never builds it)."""
        product = jnp.matmul(value_of(self.a), value_of(self.b), precision=_HIGHEST)
        return self.view.from_matrix(product, self.shape)


def holds_kernel(value: Any) -> bool:
    """Whether a layer's ``kernel`` attribute holds one: an array, a jaxlr node, or an array in a
    Flax metadata box (e.g. a partitioned kernel)."""
    if isinstance(value, meta.AxisMetadata) and not is_node(value):
        value = value.unbox()
    return hasattr(value, "shape") or is_node(value)


def is_node(x: Any) -> bool:
    """Whether ``x`` is a :class:`Product` or a :class:`LowRank` (use as ``is_leaf=``)."""
    return isinstance(x, Product | LowRank)


def collapse_tree(tree: Any) -> Any:
    """Multiplies every :class:`Product` and :class:`LowRank` of a tree back into its dense kernel
    (:func:`jaxlr.collapse` does this for Flax NNX modules too).

    Differentiable: gradients reach each factor through the product. Takes any tree (a Linen
    variable dict, an NNX ``State``, an Equinox module, ...) and returns it with arrays in place of
    the nodes.

    Raises:
      TypeError: for a Flax NNX module (its kernels are variables: use :func:`jaxlr.collapse`).

    Example:
      >>> import jax.numpy as jnp
      >>> tree = {"kernel": LowRank(jnp.ones((4, 1)), jnp.ones((1, 3)), (4, 3),
      ...                           MatrixView((0,), (1,)))}
      >>> collapse_tree(tree)["kernel"].shape
      (4, 3)
    """
    if isinstance(tree, nnx.Module):
        raise TypeError("collapse_tree takes trees; for a Flax NNX module use jaxlr.collapse.")

    def dense(path: Any, node: Any) -> Any:
        if not is_node(node):
            return node
        node.check(repr(matrices.path_key(path)))
        return node.kernel()

    return jax.tree_util.tree_map_with_path(dense, tree, is_leaf=is_node)
