"""LoRITa: over-parameterise weight matrices as products of ``N`` matrices, and collapse them back.

:func:`factorize` replaces each selected kernel ``W`` (seen as an ``m x n`` matrix through its
:class:`~jaxlr.matrices.MatrixView`) by a :class:`Factored` node holding ``N`` factors with
``W = W_1 W_2 ... W_N``. The node is a pytree, so ``jit``, ``grad``, optax (``masked`` and
``chain`` included), orbax and ``jax.tree`` utilities see its factors as ordinary leaves.
:func:`collapse` multiplies every node back into a kernel of its own shape, so the user's model is
applied unchanged::

    fparams = jaxlr.lorita.factorize(params, depth=3, key=key)
    logits = model.apply({"params": jaxlr.lorita.collapse(fparams)}, x)       # Flax Linen
    logits = nnx.merge(graphdef, jaxlr.lorita.collapse(fstate))(x)            # Flax NNX

Weight decay on the factors, ``lambda * sum_i ||W_i||_F^2``, is a Schatten-``2/N`` quasi-norm
penalty on ``W`` (LoRITa, Prop. 4.2), which drives ``W`` towards low rank without choosing a rank.
The paper trains with Adam and *coupled* L2 decay, as PyTorch's ``Adam(weight_decay=...)`` does:
:func:`coupled_adam` (``optax.add_decayed_weights`` then ``optax.adam``) reproduces it. Decoupled
decay is ``optax.adamw(lr, weight_decay=..., mask=weight_decay_mask)``. Either way
:func:`weight_decay_mask` makes the decay reach every factor and every other kernel, and leaves
biases and normalisation parameters alone.

Shapes. With ``k = min(m, n)``, every inner dimension is at least ``k``, so the product can still
reach every ``m x n`` matrix (Prop. 4.1). ``placement`` says where the ``N - 1`` square factors go:

* ``"smaller"`` (the default): ``k x k`` squares on the smaller side, the cheapest choice:
  ``(m, m)...(m, m)(m, n)`` when ``m <= n``, else ``(m, n)(n, n)...(n, n)``.
* ``"input"``: ``(m, m)...(m, m)(m, n)``; ``"output"``: ``(m, n)(n, n)...(n, n)``.
* ``"paper"``: what the paper's code does: ``"input"`` for dense and attention kernels, ``"output"``
  for convolutions (a ``k x k`` convolution followed by ``N - 1`` ``1 x 1`` convolutions).

Initialisation (``init="orthogonal"``, the default): the non-square factor is the layer's own
initial kernel and the squares are random orthogonal matrices, so the product has exactly the
Frobenius norm, and (for rotation-invariant initialisers) the distribution, of the layer's own
initialisation: training starts where the baseline does. ``init="balanced"`` splits the given kernel
as ``U S^(1/N)``, ``S^(1/N)``, ..., ``S^(1/N) V^T`` (embedded in the factor shapes): the product is
the kernel itself and the factors have equal norms, the minimiser of the decay for that product;
use it to start from pre-trained weights (:func:`from_dense` does it for a factorized tree).

References:
  "Structure-Preserving Network Compression Via Low-Rank Induced Training Through Linear Layers
  Composition" (LoRITa).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from jaxlr import matrices, svd
from jaxlr.matrices import MatrixView

__all__ = [
    "Factored",
    "Placement",
    "collapse",
    "coupled_adam",
    "factorize",
    "from_dense",
    "is_factored",
    "weight_decay_mask",
]

Placement = Literal["smaller", "input", "output", "paper"]
_PLACEMENTS = ("smaller", "input", "output", "paper")
_INITS = ("orthogonal", "balanced")
_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["factors"], meta_fields=["shape", "view"]
)
@dataclasses.dataclass(frozen=True)
class Factored:
    """A kernel held as the product of its factors, ``view.from_matrix(W_1 @ ... @ W_N, shape)``.

    A pytree node: its children are the factors; the kernel's shape and view are static.

    Attributes:
      factors: the ``N`` factor matrices, first applied to the input first.
      shape: the shape of the kernel the product stands for.
      view: how that kernel is seen as a matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> node = Factored((jnp.eye(2), 2 * jnp.ones((2, 3))), shape=(2, 3),
      ...                 view=MatrixView((0,), (1,)))
      >>> node.kernel()
      Array([[2., 2., 2.],
             [2., 2., 2.]], dtype=float32)
    """

    factors: tuple[jax.Array, ...]
    shape: tuple[int, ...]
    view: MatrixView

    @property
    def depth(self) -> int:
        """``N``, the number of factors."""
        return len(self.factors)

    def matrix(self) -> jax.Array:
        """The product ``W_1 @ ... @ W_N`` as an ``m x n`` matrix."""
        return functools.reduce(lambda a, b: jnp.matmul(a, b, precision=_HIGHEST), self.factors)

    def kernel(self) -> jax.Array:
        """The product reshaped to the kernel's own shape."""
        return self.view.from_matrix(self.matrix(), self.shape)


def is_factored(node: Any) -> bool:
    """Whether ``node`` is a :class:`Factored` (use as ``is_leaf`` in ``jax.tree`` functions)."""
    return isinstance(node, Factored)


def _check_depth(depth: Any) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (N = 1 is the baseline), got {depth!r}.")
    return depth


def _factor_shapes(
    m: int, n: int, depth: int, placement: str, ndim: int
) -> tuple[list[tuple[int, int]], int]:
    """The factors' shapes, and the index of the one that is not a padding square."""
    if placement == "paper":
        placement = "output" if ndim >= 4 else "input"
    if placement == "smaller":
        placement = "input" if m <= n else "output"
    if placement == "input":
        return [(m, m)] * (depth - 1) + [(m, n)], depth - 1
    return [(m, n)] + [(n, n)] * (depth - 1), 0


def _orthogonal_factors(
    matrix: jax.Array, shapes: list[tuple[int, int]], outer: int, key: jax.Array
) -> tuple[jax.Array, ...]:
    """The matrix itself as the outer factor, random orthogonal squares elsewhere."""
    keys = jax.random.split(key, len(shapes))
    orthogonal = jax.nn.initializers.orthogonal()
    return tuple(
        matrix if i == outer else orthogonal(keys[i], shape, jnp.float32).astype(matrix.dtype)
        for i, shape in enumerate(shapes)
    )


def _balanced_factors(matrix: jax.Array, shapes: list[tuple[int, int]]) -> tuple[jax.Array, ...]:
    """Factors of the given shapes whose product is ``matrix`` and whose norms are equal.

    With ``W = U S V^T`` and ``k = min(m, n)``: ``W_1 = U S^(1/N) E^T``, ``W_i = E S^(1/N) E^T``,
    ``W_N = E S^(1/N) V^T``, where ``E`` (``d x k``, the identity's first ``k`` columns) embeds the
    ``k`` singular directions in each inner dimension ``d >= k``; ``E^T E = I_k``.
    """
    depth = len(shapes)
    work = matrix.astype(jnp.promote_types(matrix.dtype, jnp.float32))
    u, s, vt = svd.thin_svd(work)
    root = s ** (1.0 / depth)
    k = s.shape[0]
    factors = []
    for i, (rows, cols) in enumerate(shapes):
        left = u if i == 0 else jnp.eye(rows, k, dtype=work.dtype)
        right = vt if i == depth - 1 else jnp.eye(k, cols, dtype=work.dtype)
        factors.append(jnp.matmul(left * root, right, precision=_HIGHEST).astype(matrix.dtype))
    return tuple(factors)


def factorize(
    params: Any,
    depth: int,
    key: jax.Array | None = None,
    *,
    filter: matrices.Filter = matrices.is_kernel,  # noqa: A002
    view: matrices.ViewFn = matrices.default_view,
    placement: Placement = "smaller",
    init: Literal["orthogonal", "balanced"] = "orthogonal",
) -> Any:
    """Replaces every selected kernel by a :class:`Factored` node of ``depth`` factors.

    Args:
      params: a Flax Linen variable dict (or its ``"params"``), an NNX ``State``, or any pytree.
      depth: ``N >= 1``, the number of factors; ``N = 1`` holds each kernel as one ``m x n``
        factor and changes nothing else.
      key: a PRNG key for the orthogonal squares (needed when ``depth > 1`` and
        ``init="orthogonal"``).
      filter: which leaves are factorized (default: kernels of >= 2 dimensions).
      view: how each kernel is seen as a matrix.
      placement: where the square factors go (see the module's documentation).
      init: ``"orthogonal"`` (the product is the given kernel rotated: the layer's own initial
        scale) or ``"balanced"`` (the product is the given kernel, split with equal norms).

    Returns:
      The tree with each selected kernel replaced by a :class:`Factored` node.

    Raises:
      ValueError: for ``depth < 1``, an unknown placement or init, a missing key, a tree that is
        already factorized, or a filter that selects nothing.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}
      >>> fparams = factorize(params, 3, jax.random.key(0))
      >>> [f.shape for f in fparams["Dense_0"]["kernel"].factors]
      [(4, 4), (4, 4), (4, 6)]
      >>> bool(jnp.allclose(jnp.linalg.norm(collapse(fparams)["Dense_0"]["kernel"]),
      ...                   jnp.linalg.norm(params["Dense_0"]["kernel"])))
      True
    """
    depth = _check_depth(depth)
    if placement not in _PLACEMENTS:
        raise ValueError(f"placement must be one of {_PLACEMENTS}, got {placement!r}.")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}.")
    if depth > 1 and init == "orthogonal" and key is None:
        raise ValueError("key is required to draw the orthogonal factors when depth > 1.")
    if any(is_factored(node) for node in jax.tree.leaves(params, is_leaf=is_factored)):
        raise ValueError("params is already factorized; collapse(params) first to refactor it.")
    selected = matrices.matrix_leaves(params, filter=filter, view=view)
    by_index = {leaf.index: leaf for leaf in selected.values()}
    keys = jax.random.split(key, len(selected)) if key is not None else [None] * len(selected)
    key_of = dict(zip(by_index, keys, strict=True))

    flat, treedef = jax.tree_util.tree_flatten(params)
    for index, leaf in by_index.items():
        matrix = leaf.view.to_matrix(jnp.asarray(flat[index]))
        shapes, outer = _factor_shapes(*leaf.matrix_shape, depth, placement, len(leaf.shape))
        if depth == 1:
            factors = (matrix,)
        elif init == "balanced":
            factors = _balanced_factors(matrix, shapes)
        else:
            factors = _orthogonal_factors(matrix, shapes, outer, key_of[index])
        flat[index] = Factored(factors, leaf.shape, leaf.view)
    return jax.tree_util.tree_unflatten(treedef, flat)


def collapse(tree: Any) -> Any:
    """Multiplies every :class:`Factored` node back into a kernel of its own shape.

    Differentiable: gradients reach each factor through the product. A tree without nodes is
    returned as it is.

    Raises:
      ValueError: if a node's factors do not chain (``W_i.shape[1] != W_{i+1}.shape[0]``) or their
        product does not match the kernel's shape; the message names the node's path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"Conv_0": {"kernel": jnp.ones((3, 3, 2, 4))}}
      >>> collapse(factorize(params, 2, jax.random.key(0)))["Conv_0"]["kernel"].shape
      (3, 3, 2, 4)
    """

    def product(path: Any, node: Any) -> Any:
        if not is_factored(node):
            return node
        _check_chain(matrices.path_str(matrices.path_names(path)), node)
        return node.kernel()

    return jax.tree_util.tree_map_with_path(product, tree, is_leaf=is_factored)


def _check_chain(name: str, node: Factored) -> None:
    shapes = [tuple(jnp.shape(f)) for f in node.factors]
    expected = node.view.matrix_shape(node.shape)
    chained = all(len(s) == 2 for s in shapes) and all(
        a[1] == b[0] for a, b in zip(shapes, shapes[1:], strict=False)
    )
    if not shapes or not chained or (shapes[0][0], shapes[-1][1]) != expected:
        raise ValueError(
            f"factors of {name!r} have shapes {shapes}; they must chain into a {expected[0]} x "
            f"{expected[1]} matrix for the kernel of shape {node.shape}."
        )


def from_dense(ftree: Any, params: Any) -> Any:
    """Refactors the kernels of ``params`` into the factor shapes of the factorized ``ftree``.

    Each node of ``ftree`` gets balanced factors (see ``init="balanced"``) of the kernel at the same
    path of ``params``, with the node's own shapes: the product equals the kernel (to float32
    rounding). Use it to start LoRITa from pre-trained weights.

    Raises:
      ValueError: if ``params`` lacks a node's path or its kernel's shape differs from the node's.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.arange(12.0).reshape(3, 4)}}
      >>> ftree = factorize(params, 2, jax.random.key(0))
      >>> pretrained = {"Dense_0": {"kernel": jnp.ones((3, 4))}}
      >>> collapse(from_dense(ftree, pretrained))["Dense_0"]["kernel"].round(5)
      Array([[1., 1., 1., 1.],
             [1., 1., 1., 1.],
             [1., 1., 1., 1.]], dtype=float32)
    """
    dense = {
        matrices.path_str(matrices.path_names(p)): leaf
        for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }

    def refactor(path: Any, node: Any) -> Any:
        if not is_factored(node):
            return node
        name = matrices.path_str(matrices.path_names(path))
        if name not in dense:
            raise ValueError(f"params has no kernel at {name!r}, which ftree factorizes.")
        kernel = jnp.asarray(dense[name])
        if tuple(kernel.shape) != tuple(node.shape):
            raise ValueError(
                f"kernel {name!r} has shape {tuple(kernel.shape)}; ftree's factors stand for "
                f"a kernel of shape {node.shape}."
            )
        shapes = [tuple(jnp.shape(f)) for f in node.factors]
        factors = _balanced_factors(node.view.to_matrix(kernel), shapes)
        return Factored(factors, node.shape, node.view)

    return jax.tree_util.tree_map_with_path(refactor, ftree, is_leaf=is_factored)


def weight_decay_mask(tree: Any, include_kernels: bool = True) -> Any:
    """A mask tree for optax's weight decay: ``True`` on every factor (and, by default, on every
    other kernel of >= 2 dimensions), ``False`` on biases, norm scales and everything else.

    Pass it, or the function itself, as ``mask=`` to ``optax.add_decayed_weights`` or
    ``optax.adamw``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
      >>> jax.tree.leaves(weight_decay_mask(factorize(params, 2, jax.random.key(0))))
      [False, True, True]
    """

    def mark(path: Any, node: Any) -> Any:
        if is_factored(node):
            return jax.tree.map(lambda _: True, node)
        return include_kernels and matrices.is_kernel(matrices.path_names(path), node)

    return jax.tree_util.tree_map_with_path(mark, tree, is_leaf=is_factored)


def coupled_adam(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    *,
    mask: Any | Callable[[Any], Any] = weight_decay_mask,
) -> optax.GradientTransformation:
    """Adam with coupled L2 decay, as PyTorch's ``Adam(weight_decay=...)``: the paper's optimizer.

    ``optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.adam(learning_rate))``: the
    decay is added to the gradient before Adam's normalisation. For decoupled decay use
    ``optax.adamw(learning_rate, weight_decay=weight_decay, mask=weight_decay_mask)``.

    Raises:
      ValueError: for a negative ``weight_decay``.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    return optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.adam(learning_rate))
