"""LoRITa: over-parameterise weight matrices as products of ``N`` matrices, and collapse them back.

:func:`factorize` replaces each selected kernel ``W`` (seen as an ``m x n`` matrix through its
:class:`~jaxlr.matrices.MatrixView`) by a :class:`~jaxlr.nodes.Product` of ``N`` factors with
``W = W_1 W_2 ... W_N``. It selects jaxlr's default layers (every kernel but the model's output
layer, :mod:`jaxlr.selection`); the paper's release factorizes the classifier too
(``filter="all"``). It takes a parameter tree, a Flax NNX module or an Equinox module:

* **Flax NNX.** ``factorize(model, ...)`` returns a copy of the module whose kernels are products
  of ``nnx.Param`` factors. NNX layers read their kernel as ``self.kernel[...]``, which multiplies
  the factors, so the model runs unchanged, and ``nnx.grad`` / ``nnx.Optimizer`` train the factors
  with no split or merge by the user::

      model = jaxlr.lorita.factorize(model, depth=3, key=key)
      optimizer = nnx.Optimizer(model, jaxlr.lorita.coupled_adam(1e-3, 1e-4), wrt=nnx.Param)

* **Flax Linen and other trees.** ``factorize(params, ...)`` returns the tree with product nodes,
  and an unchanged Linen model runs on it: ``model.apply({"params": p}, x)`` reads each node as
  the dense kernel it stands for (a Flax ``AxisMetadata`` box, unboxed when the layer reads it),
  gradients reaching the factors (so do :func:`jaxlr.apply` and :class:`jaxlr.TrainState`);
  :func:`jaxlr.collapse` gives plain arrays back.

Weight decay on the factors, ``lambda * sum_i ||W_i||_F^2``, is a Schatten-``2/N`` quasi-norm
penalty on ``W`` (LoRITa, Prop. 4.2), which drives ``W`` towards low rank without choosing a rank.
The paper trains with Adam and *coupled* L2 decay, as PyTorch's ``Adam(weight_decay=...)`` does:
:func:`coupled_adam` (``optax.add_decayed_weights`` then ``optax.adam``) with
:func:`weight_decay_mask` decays the factors and the other kernels and leaves biases and
normalisation parameters alone; PyTorch's optimizer decays every parameter, which
``coupled_adam(lr, wd, mask=None)`` reproduces. Decoupled decay is
``optax.adamw(lr, weight_decay=..., mask=weight_decay_mask)``.

Shapes. With ``k = min(m, n)``, every inner dimension is at least ``k``, so the product can still
reach every ``m x n`` matrix (Prop. 4.1). ``placement`` says where the ``N - 1`` square factors go:

* ``"smaller"`` (the default): ``k x k`` squares on the smaller side, the cheapest choice:
  ``(m, m)...(m, m)(m, n)`` when ``m <= n``, else ``(m, n)(n, n)...(n, n)``.
* ``"input"``: ``(m, m)...(m, m)(m, n)``; ``"output"``: ``(m, n)(n, n)...(n, n)``.
* ``"paper"``: what the paper's code does: ``"input"`` for dense and attention kernels and for
  ``1 x 1`` convolutions (such as ResNet projection shortcuts), ``"output"`` for other convolutions
  (a ``k x k`` convolution followed by ``N - 1`` ``1 x 1`` convolutions).

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

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlr import _checks, _equinox, _linalg, _nnx, matrices, nodes, selection, sharding
from jaxlr.nodes import Product

__all__ = [
    "Placement",
    "coupled_adam",
    "factorize",
    "from_dense",
    "weight_decay_mask",
]

Placement = Literal["smaller", "input", "output", "paper"]
_PLACEMENTS = ("smaller", "input", "output", "paper")
_INITS = ("orthogonal", "balanced")
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_depth(depth: Any) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (N = 1 is the baseline), got {depth!r}.")
    return depth


def _factor_shapes(
    m: int, n: int, depth: int, placement: str, shape: tuple[int, ...]
) -> tuple[list[tuple[int, int]], int]:
    """The factors' shapes, and the index of the one that is not a padding square."""
    if placement == "paper":  # a k x k conv then 1 x 1 convs; squares before a 1 x 1 conv
        window = len(shape) >= 4 and sum(d > 1 for d in shape) > 2
        placement = "output" if window else "input"
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
    u, s, vt = _linalg.thin_svd(work)
    root = s ** (1.0 / depth)
    k = s.shape[0]
    factors = []
    for i, (rows, cols) in enumerate(shapes):
        left = u if i == 0 else jnp.eye(rows, k, dtype=work.dtype)
        right = vt if i == depth - 1 else jnp.eye(k, cols, dtype=work.dtype)
        factors.append(jnp.matmul(left * root, right, precision=_HIGHEST).astype(matrix.dtype))
    return tuple(factors)


def _holds_products(tree: Any) -> bool:
    if _nnx.is_module(tree):
        return any(isinstance(node, Product) for _, node in _nnx.node_paths(tree))
    return any(isinstance(node, Product) for node in jax.tree.leaves(tree, is_leaf=nodes.is_node))


def _into_module(model: Any, replacements: dict[str, Any]) -> Any:
    """A copy of an NNX module with each ``{key: Product of arrays}`` written in as a product of
    ``nnx.Param`` factors."""
    from flax import nnx  # noqa: PLC0415

    model = nnx.clone(model)
    for key, node in replacements.items():
        path = tuple(key.split("/"))
        *_, parent, _ = (None, *_nnx.walk(model, path, key))
        factors = tuple(nnx.Param(f) for f in node.factors)
        _nnx.set_child(parent, path[-1], Product(factors, node.shape, node.view))
    return model


def factorize(
    params: Any,
    depth: int,
    key: jax.Array | None = None,
    *,
    filter: matrices.Filter | None = None,  # noqa: A002
    view: matrices.View = None,
    placement: Placement = "smaller",
    init: Literal["orthogonal", "balanced"] = "orthogonal",
) -> Any:
    """Replaces every selected kernel by a :class:`~jaxlr.nodes.Product` of ``depth`` factors.

    Args:
      params: a Flax NNX module (a factorized copy is returned), a Linen variable dict (or its
        ``params``), an NNX ``State``, an Equinox module, or any pytree.
      depth: ``N >= 1``, the number of factors; ``N = 1`` holds each kernel as one ``m x n``
        factor and changes nothing else.
      key: a PRNG key for the orthogonal squares (needed when ``depth > 1`` and
        ``init="orthogonal"``).
      filter: which kernels are factorized (default: every kernel but the output layer,
        :mod:`jaxlr.selection`; ``"all"``: every kernel, as the LoRITa release).
      view: how each kernel is seen as a matrix (:mod:`jaxlr.matrices`).
      placement: where the square factors go (see the module's documentation).
      init: ``"orthogonal"`` (the product is the given kernel rotated: the layer's own initial
        scale) or ``"balanced"`` (the product is the given kernel, split with equal norms).

    Returns:
      The tree (or a copy of the module) with each selected kernel replaced by a product. A
      kernel on a mesh gives factors on that mesh: each factor's rows split like the kernel's
      rows where they have the kernel's row count, its columns like the kernel's columns where
      they have its column count (:func:`jaxlr.sharding.place_factors`).

    Raises:
      ValueError: for ``depth < 1``, an unknown placement or init, a missing key, a tree that is
        already factorized, or a filter that selects nothing.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlr
      >>> params = {"Dense_0": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}}
      >>> fparams = factorize(params, 3, jax.random.key(0))
      >>> [f.shape for f in fparams["Dense_0"]["kernel"].factors]
      [(4, 4), (4, 4), (4, 6)]
      >>> bool(jnp.allclose(jnp.linalg.norm(jaxlr.collapse(fparams)["Dense_0"]["kernel"]),
      ...                   jnp.linalg.norm(params["Dense_0"]["kernel"])))
      True

      With Flax NNX the layers keep running, on the product of their factors:

      >>> from flax import nnx
      >>> model = factorize(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), 2, jax.random.key(0))
      >>> model(jnp.ones((1, 4))).shape, model.kernel[...].shape, model.kernel.depth
      ((1, 6), (4, 6), 2)
    """
    depth = _check_depth(depth)
    if placement not in _PLACEMENTS:
        raise ValueError(f"placement must be one of {_PLACEMENTS}, got {placement!r}.")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}.")
    if depth > 1 and init == "orthogonal" and key is None:
        raise ValueError("key is required to draw the orthogonal factors when depth > 1.")
    if key is not None and not (isinstance(key, jax.Array) and (
            jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,)))):
        raise TypeError(f"key must be a PRNG key (jax.random.key(seed)), got {key!r}.")
    if _holds_products(params):
        raise ValueError("params is already factorized; jaxlr.collapse(params) first to "
                         "refactor it.")
    if _nnx.is_module(params):
        tree = _nnx.parameters(params)
        factorized = factorize(tree, depth, key, filter=filter, view=view, placement=placement,
                               init=init)
        return _into_module(params, {matrices.path_key(path): leaf
                                     for path, leaf in selection.flatten(factorized)[0]
                                     if isinstance(leaf, Product)})

    selected = selection.matrix_leaves(params, filter=filter, view=view)
    keys = jax.random.split(key, len(selected)) if key is not None else [None] * len(selected)
    flat, treedef = selection.flatten(params)
    leaves = [leaf for _, leaf in flat]
    for leaf, leaf_key in zip(selected.values(), keys, strict=True):
        matrix = leaf.view.to_matrix(jnp.asarray(leaves[leaf.index]))
        shapes, outer = _factor_shapes(*leaf.matrix_shape, depth, placement, leaf.shape)
        if depth == 1:
            factors = (matrix,)
        elif init == "balanced":
            factors = _balanced_factors(matrix, shapes)
        else:
            factors = _orthogonal_factors(matrix, shapes, outer, leaf_key)
        factors = sharding.place_factors(factors, leaves[leaf.index], leaf.view)
        leaves[leaf.index] = Product(factors, leaf.shape, leaf.view)
    out = jax.tree_util.tree_unflatten(treedef, leaves)
    return _equinox.runnable(out) if _equinox.is_module(params) else out


def from_dense(ftree: Any, params: Any) -> Any:
    """Refactors the kernels of ``params`` into the factor shapes of the factorized ``ftree``.

    Each product of ``ftree`` (a tree, or an NNX module made by :func:`factorize`) gets balanced
    factors (see ``init="balanced"``) of the kernel at the same key of ``params`` (a tree, or an
    NNX module), with the product's own shapes: the product equals the kernel (to float32
    rounding). Use it to start LoRITa from pre-trained weights.

    Raises:
      ValueError: if ``ftree`` holds no product (the arguments swapped), or ``params`` lacks a
        product's key or its kernel's shape differs.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlr
      >>> params = {"Dense_0": {"kernel": jnp.arange(12.0).reshape(3, 4)}}
      >>> ftree = factorize(params, 2, jax.random.key(0))
      >>> pretrained = {"Dense_0": {"kernel": jnp.ones((3, 4))}}
      >>> jaxlr.collapse(from_dense(ftree, pretrained))["Dense_0"]["kernel"].round(5)
      Array([[1., 1., 1., 1.],
             [1., 1., 1., 1.],
             [1., 1., 1., 1.]], dtype=float32)
    """
    if not _holds_products(ftree):
        raise ValueError(
            "ftree holds no LoRITa product: from_dense(ftree, params) takes the factorized tree "
            "(from factorize) first and the dense params second.")
    if _nnx.is_module(params):
        params = _nnx.parameters(params)
    dense = {matrices.path_key(path): leaf for path, leaf in selection.flatten(params)[0]}

    def refactor(key: str, node: Product) -> Product:
        if key not in dense:
            raise ValueError(f"params has no kernel at {key!r}, which ftree factorizes.")
        kernel = dense[key]
        if nodes.is_node(kernel):
            kernel = kernel.kernel()
        if tuple(np.shape(kernel)) != tuple(node.shape):
            raise ValueError(f"kernel {key!r} has shape {tuple(np.shape(kernel))}; ftree's "
                             f"factors stand for a kernel of shape {node.shape}.")
        shapes = [tuple(np.shape(nodes.value_of(f))) for f in node.factors]
        factors = _balanced_factors(node.view.to_matrix(jnp.asarray(kernel)), shapes)
        return Product(factors, node.shape, node.view)

    if _nnx.is_module(ftree):
        return _into_module(ftree, {matrices.path_key(path): refactor(matrices.path_key(path), node)
                                    for path, node in _nnx.node_paths(ftree)})

    def visit(path: Any, node: Any) -> Any:
        if not isinstance(node, Product):
            return node
        return refactor(matrices.path_key(path), node)

    return jax.tree_util.tree_map_with_path(visit, ftree, is_leaf=nodes.is_node)


def _is_factor(path: matrices.Path) -> bool:
    """A factor of a product inside an NNX ``State`` (``.../kernel/factors/i``)."""
    return len(path) >= 3 and path[-2] == "factors" and path[-1].isdigit()


def weight_decay_mask(tree: Any, include_kernels: bool = True) -> Any:
    """A mask tree for optax's weight decay: ``True`` on every LoRITa factor (and, by default, on
    every other kernel of >= 2 dimensions), ``False`` on biases, norm scales and everything else.

    Pass it, or the function itself, as ``mask=`` to ``optax.add_decayed_weights`` or
    ``optax.adamw``. It reads a tree with product nodes (Linen) and an NNX ``State`` of a
    factorized module alike.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlr
      >>> params = {"Dense_0": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
      >>> jax.tree.leaves(weight_decay_mask(factorize(params, 2, jax.random.key(0))))
      [False, True, True]
    """
    _checks.check_flag("include_kernels", include_kernels)

    def mark(path: Any, node: Any) -> Any:
        if isinstance(node, Product):
            return jax.tree.map(lambda _: True, node)
        names = matrices.path_names(path)
        if _is_factor(names):
            return True
        return include_kernels and matrices.is_kernel(names, node)

    return jax.tree_util.tree_map_with_path(mark, tree, is_leaf=nodes.is_node)


def _check_decay(weight_decay: Any) -> float:
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float | np.floating):
        raise TypeError(f"weight_decay must be a number >= 0, got {weight_decay!r}.")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}.")
    return float(weight_decay)


def coupled_adam(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    *,
    mask: Any | Callable[[Any], Any] | None = weight_decay_mask,
) -> optax.GradientTransformation:
    """Adam with coupled L2 decay: the decay is added to the gradient before Adam's normalisation.

    ``optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.adam(learning_rate))``.
    PyTorch's ``Adam(weight_decay=...)``, which the paper used, decays every parameter: pass
    ``mask=None`` for exactly that. The default mask decays the LoRITa factors and the other
    kernels only, which is what the decay's low-rank argument needs. For decoupled decay use
    ``optax.adamw(learning_rate, weight_decay=weight_decay, mask=weight_decay_mask)``.

    Raises:
      ValueError: for a negative or non-finite ``weight_decay``, a learning rate <= 0.
      TypeError: for a value that is not a number (or, for the learning rate, a schedule).
    """
    weight_decay = _check_decay(weight_decay)
    if not callable(learning_rate):
        if isinstance(learning_rate, bool) or not isinstance(
                learning_rate, int | float | np.floating | np.integer):
            raise TypeError(f"learning_rate must be a number or a schedule, got "
                            f"{learning_rate!r}.")
        if not math.isfinite(learning_rate) or learning_rate <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}.")
    return optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.adam(learning_rate))
