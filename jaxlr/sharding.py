"""Where arrays live: the mesh jaxlr spreads its decompositions over, and keeping shardings.

jaxlr's decompositions (:mod:`jaxlr.svd`) run where the weights are. When the weights of a call
live on a mesh of more than one device, each matrix is decomposed once, by one device, where the
decompositions of a tree are spread evenly over the devices (about ``L / D`` of ``L`` matrices on
each of ``D`` devices), and no device gathers a whole kernel:

1. each matrix is seen in a *row layout*: tall (its longer side as rows) with its rows split over
   every device of the mesh. A kernel sharded on an axis of its longer side (the input channels
   of a convolution, FSDP's usual choice for a dense layer's input) is already in it; one
   sharded on the other side (FSDP on output channels) is moved there by one all-to-all;
2. the Gram matrix ``W^T W`` (``n x n``, ``n`` the shorter side) is the sum of the devices' local
   products (an all-reduce of ``n x n``); its owner runs ``eigh``;
3. the owner's top-``r`` eigenvectors reach every device (an all-reduce of ``n x r``), and each
   device computes its rows of ``U_r S_r`` and of the projection itself;
4. where the Gram path is not accurate enough (``method="auto"``'s fallback, or
   ``method="svd"``) the owner receives the matrix's row blocks (point-to-point, never an
   all-gather) and runs the SVD;
5. results take the sharding of the input they replace;
6. the matrices are taken one after the other (each made to depend on the previous one's result),
   so a device holds the temporaries of one matrix at a time, whatever the tree's size.

A matrix whose longer side has no axis divisible by the number of devices gets zero rows up to a
multiple of it (they change neither its Gram matrix nor its projection, and are dropped after).

**Which mesh.** :func:`mesh_of`: the ``mesh`` given (``ProjectionOptions(mesh=...)``, for the
projection and ``compress``), else the mesh of the arrays (a ``NamedSharding`` of arrays passed
eagerly, or of a mesh with ``Explicit`` axes inside ``jit``), else the mesh set by
``jax.set_mesh`` around the call. Under ``jax.jit`` on a mesh with ``Auto`` axes
(``jax.make_mesh(..., axis_types=(AxisType.Auto,) * k)``) the arrays do not carry their mesh:
set it with ``jax.set_mesh(mesh)`` or pass it, or the decompositions run where XLA's partitioner
puts them (every device decomposing every matrix, as jaxlr before 0.3 did). ``mesh=None`` asks
for that explicitly. There the library does not know a kernel's sharding either: the results
still take it (``shard_alike``), but a kernel whole on every device is rebuilt from its row
blocks (one all-gather of the projected kernel); on an ``Explicit`` mesh, or called eagerly,
such a kernel is rebuilt by every device with no gather.

Example:
  >>> import jax, jax.numpy as jnp
  >>> mesh_of([jnp.ones((4, 4))]) is None  # one device: nothing to spread
  True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlr.matrices import MatrixView

__all__ = [
    "MeshLike",
    "RowLayout",
    "check_mesh",
    "constrain",
    "explicit_spec",
    "factor_specs",
    "follow",
    "in_context",
    "is_explicit",
    "mesh_of",
    "like",
    "owners",
    "place_factors",
    "spec_of",
    "split_rows",
]

MeshLike = Mesh | AbstractMesh
"""A concrete ``jax.sharding.Mesh`` or the ``AbstractMesh`` seen inside ``jit``."""

AUTO = "auto"


def check_mesh(mesh: Any) -> Any:
    """Validates a ``mesh`` option: ``"auto"``, ``None`` or a mesh."""
    if mesh is None or (isinstance(mesh, str) and mesh == AUTO) or isinstance(mesh, MeshLike):
        return mesh
    raise TypeError(f"mesh must be 'auto' (the mesh of the arrays or of jax.set_mesh), None (no "
                    f"spreading) or a jax.sharding.Mesh, got {mesh!r}.")


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _typed_sharding(x: Any) -> NamedSharding | None:
    """The sharding in ``x``'s type (inside ``jit``, on a mesh with ``Explicit`` axes)."""
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
        return sharding
    return None


def explicit_spec(x: Any) -> PartitionSpec | None:
    """``x``'s partition spec when its type carries it: ``x`` (traced or concrete) lives on a mesh
    with ``Explicit`` axes; ``None`` otherwise."""
    sharding = _typed_sharding(x)
    if sharding is None or AxisType.Explicit not in tuple(sharding.mesh.axis_types):
        return None
    return sharding.spec


def is_explicit(x: Any) -> bool:
    """Whether ``x`` is traced on a mesh with ``Explicit`` axes (its sharding is in its type)."""
    return _is_tracer(x) and explicit_spec(x) is not None


def spec_of(x: Any) -> PartitionSpec | None:
    """``x``'s partition spec where it is known: a concrete array on a ``NamedSharding``, or an
    array traced on a mesh with ``Explicit`` axes; ``None`` otherwise."""
    if _is_tracer(x):
        return _typed_sharding(x).spec if is_explicit(x) else None
    sharding = getattr(x, "sharding", None)
    return sharding.spec if isinstance(sharding, NamedSharding) else None


def mesh_of(leaves: Sequence[Any], mesh: Any = AUTO) -> MeshLike | None:
    """The mesh over which the decompositions of ``leaves`` are spread, or ``None``.

    Args:
      leaves: the arrays of one call.
      mesh: ``"auto"`` (the default: the arrays' own mesh, else the one of ``jax.set_mesh``),
        a mesh (used as given), or ``None`` (no spreading).

    Returns:
      A mesh of more than one device, or ``None``.
    """
    mesh = check_mesh(mesh)
    if mesh is None or isinstance(mesh, MeshLike):
        return mesh if mesh is not None and mesh.size > 1 else None
    for leaf in leaves:
        if _is_tracer(leaf):
            # Traced on a mesh, a value's type carries the mesh (its spec too on Explicit axes,
            # not on Auto ones): the mesh the caller's jit runs on, found without mesh= or
            # jax.set_mesh.
            sharding = _typed_sharding(leaf)
        else:
            sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and context.size > 1 and any(_is_tracer(x) for x in leaves):
        return context
    return None


def follow(new: jax.Array, like: Any, mesh: MeshLike | None = None,
           spec: PartitionSpec | None = None) -> jax.Array:
    """``new`` (traced, the shape of ``like``) with the sharding of ``like``: ``spec`` where it is
    known, the typed spec on an ``Explicit`` mesh, else the same sharding as ``like``
    (``shard_alike``)."""
    if not _is_tracer(new) or np.shape(new) != np.shape(like):
        return new
    if spec is not None and mesh is not None:
        return jax.lax.with_sharding_constraint(new, NamedSharding(in_context(mesh), spec))
    if is_explicit(like):
        return jax.sharding.reshard(new, _typed_sharding(like).spec)
    if _is_tracer(like):
        from jax.experimental.shard_alike import shard_alike  # noqa: PLC0415

        return shard_alike(new, like)[0]
    return new


def in_context(mesh: MeshLike) -> MeshLike:
    """``mesh``, or the mesh of the same axes set around the trace (inside
    ``jax.sharding.auto_axes`` its axes are ``Auto``): the one ``shard_map`` must be given."""
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and context.shape_tuple == mesh.shape_tuple:
        return context
    return mesh


def split_rows(matrix: jax.Array, mesh: MeshLike, spec: PartitionSpec | None = None
               ) -> jax.Array:
    """``matrix`` (traced) with its rows split over every device of ``mesh``; when the spec of
    the kernel it came from is known, the kernel's own mesh axes come first, and the rows are then
    split over those axes only (the other axes hold copies, as the kernel's do), so that moving
    it to the kernel's sharding is one all-to-all."""
    mesh = in_context(mesh)
    own = tuple(name for entry in (spec or ()) for name in _names(entry))
    order = own + tuple(name for name in mesh.axis_names if name not in own)
    matrix = jax.lax.with_sharding_constraint(
        matrix, NamedSharding(mesh, PartitionSpec(order, None)))
    if own and own != order:
        matrix = jax.lax.with_sharding_constraint(
            matrix, NamedSharding(mesh, PartitionSpec(own, None)))
    return matrix


def factor_specs(spec: PartitionSpec | None, view: MatrixView
                 ) -> tuple[PartitionSpec, PartitionSpec] | None:
    """The specs of the factors ``A`` (``m x r``) and ``B`` (``r x n``) of a kernel of spec
    ``spec``: ``A``'s rows split over the mesh axes that split the kernel's row axes, ``B``'s
    columns over those that split its column axes; ``None`` when the kernel's spec is unknown."""
    if spec is None:
        return None
    entries = tuple(spec) + (None,) * (len(view.row_axes) + len(view.col_axes) - len(spec))

    def axes_of(dims: Sequence[int]) -> Any:
        return tuple(name for d in dims for name in _names(entries[d])) or None

    return (PartitionSpec(axes_of(view.row_axes), None),
            PartitionSpec(None, axes_of(view.col_axes)))


def constrain(x: jax.Array, mesh: MeshLike, spec: PartitionSpec) -> jax.Array:
    """``x`` (traced) sharded by ``spec`` on ``mesh``, where the sizes divide evenly (else as
    it is)."""
    if not _divides(x.shape, spec, mesh):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(in_context(mesh), spec))


def place_factors(factors: Sequence[jax.Array], kernel: Any, view: MatrixView
                  ) -> tuple[jax.Array, ...]:
    """Factors of a kernel on a mesh (concrete arrays), placed on that mesh: a factor's rows split
    like the kernel matrix's rows where it has their count, its columns like the kernel's columns
    where it has theirs (the kernel-shaped factor like the kernel; squares on one side). Factors
    of a kernel that is not on a ``NamedSharding``, or traced, are returned as they are."""
    sharding = getattr(kernel, "sharding", None)
    if _is_tracer(kernel) or not isinstance(sharding, NamedSharding):
        return tuple(factors)
    row_spec, col_spec = factor_specs(spec_of(kernel), view)
    m, n = view.matrix_shape(tuple(np.shape(kernel)))
    out = []
    for factor in factors:
        rows = row_spec[0] if factor.shape[0] == m else None
        cols = col_spec[1] if factor.shape[1] == n else None
        if rows is not None and cols is not None and set(_names(rows)) & set(_names(cols)):
            cols = None
        spec = PartitionSpec(rows, cols)
        if not _divides(factor.shape, spec, sharding.mesh):
            spec = PartitionSpec()
        out.append(jax.device_put(factor, NamedSharding(sharding.mesh, spec)))
    return tuple(out)


def _names(entry: Any) -> tuple[str, ...]:
    return tuple(entry) if isinstance(entry, tuple) else (entry,) if entry is not None else ()


def _divides(shape: Sequence[int], spec: PartitionSpec, mesh: MeshLike) -> bool:
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    return all(dim % math.prod(sizes[name] for name in _names(entry)) == 0
               for dim, entry in zip(shape, spec, strict=False))


def like(new: Any, old: Any) -> Any:
    """``new`` on ``old``'s sharding, when ``old`` is a concrete array on a ``NamedSharding``
    (eager results follow their inputs); traced values through :func:`follow`."""
    if _is_tracer(new) or _is_tracer(old):
        return follow(new, old)
    sharding = getattr(old, "sharding", None)
    if isinstance(sharding, NamedSharding) and np.shape(new) == np.shape(old):
        return jax.device_put(new, sharding)
    return new


def owners(costs: Sequence[float], devices: int) -> list[int]:
    """The device that decomposes each matrix: the most costly first, each to the device with the
    least work so far among those holding fewer than ``ceil(L / D)`` (ties: the lowest index), so
    each of ``D`` devices decomposes at most ``ceil(L / D)`` of ``L`` matrices, with as even a
    share of the work as that allows.

    Example:
      >>> owners([1.0, 1.0, 1.0, 8.0], 2)
      [1, 1, 0, 0]
    """
    cap = max(1, math.ceil(len(costs) / devices))
    load = [0.0] * devices
    count = [0] * devices
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        device = min((d for d in range(devices) if count[d] < cap),
                     key=lambda d: (load[d], d))
        out[i] = device
        load[device] += costs[i]
        count[device] += 1
    return out


class RowLayout(NamedTuple):
    """How a kernel leaf is seen as a tall matrix whose rows can be split over the devices.

    The longer side of the view's matrix becomes the rows (a wide matrix is transposed), and the
    largest axis of that side divisible by the number of devices is moved first, so that splitting
    the rows into equal blocks splits that axis: a kernel sharded on it needs no data movement.
    Without such an axis, zero rows are appended up to a multiple of the number of devices.
    Singular values and projections do not depend on the order of the rows nor on zero rows, so
    the result is put back through the inverse permutation.

    Attributes:
      perm: the leaf's axes in the order (rows, then columns) of the tall matrix.
      tall_shape: ``(rows, cols)`` of the tall matrix, ``rows >= cols``, zero rows included.
      transposed: whether the view's matrix is wide (its transpose is the tall matrix).
      pad: the zero rows appended.
    """

    perm: tuple[int, ...]
    tall_shape: tuple[int, int]
    transposed: bool
    pad: int

    @classmethod
    def of(cls, shape: tuple[int, ...], view: MatrixView, devices: int) -> RowLayout:
        """The layout of a leaf of ``shape`` seen through ``view``, for ``devices`` devices."""
        m, n = view.matrix_shape(shape)
        transposed = n > m
        long_axes, short_axes = ((tuple(view.col_axes), tuple(view.row_axes)) if transposed
                                 else (tuple(view.row_axes), tuple(view.col_axes)))
        divisible = [a for a in long_axes if shape[a] % devices == 0]
        lead = max(divisible, key=lambda a: (shape[a], -long_axes.index(a)), default=None)
        if lead is not None:
            long_axes = (lead, *(a for a in long_axes if a != lead))
        rows = math.prod(shape[a] for a in long_axes)
        cols = math.prod(shape[a] for a in short_axes)
        pad = -rows % devices
        return cls(long_axes + short_axes, (rows + pad, cols), transposed, pad)

    def to_rows(self, leaf: jax.Array) -> jax.Array:
        """The leaf as the tall matrix."""
        if self.perm != tuple(range(len(self.perm))):
            leaf = jnp.transpose(leaf, self.perm)
        rows, cols = self.tall_shape
        matrix = jnp.reshape(leaf, (rows - self.pad, cols))
        return jnp.pad(matrix, ((0, self.pad), (0, 0))) if self.pad else matrix

    def from_rows(self, matrix: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """The inverse of :meth:`to_rows`."""
        if self.pad:
            matrix = matrix[: matrix.shape[0] - self.pad]
        permuted = jnp.reshape(matrix, tuple(shape[a] for a in self.perm))
        if self.perm == tuple(range(len(self.perm))):
            return permuted
        return jnp.transpose(permuted, tuple(np.argsort(self.perm)))

    def to_view(self, matrix: jax.Array, shape: tuple[int, ...], view: MatrixView) -> jax.Array:
        """A tall matrix (or a factor with its rows) in the view's row order: the rows of the
        tall matrix (zero rows dropped) permuted back to the view's matrix (a wide view's
        columns)."""
        if self.pad:
            matrix = matrix[: matrix.shape[0] - self.pad]
        long_axes = self.perm[: len(view.col_axes if self.transposed else view.row_axes)]
        order = tuple(view.col_axes if self.transposed else view.row_axes)
        if long_axes == order:
            return matrix
        block = jnp.reshape(matrix, tuple(shape[a] for a in long_axes) + matrix.shape[1:])
        axes = tuple(long_axes.index(a) for a in order)
        block = jnp.transpose(block, axes + (len(axes),))
        return jnp.reshape(block, matrix.shape)
