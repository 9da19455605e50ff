"""How jaxlr selects, decomposes and projects: one options object, shared by the projection
(:func:`jaxlr.project`, :func:`jaxlr.low_rank_projection`, :func:`jaxlr.with_low_rank_projection`)
and :func:`jaxlr.compress`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

from jaxlr import _checks, batchnorm, matrices, sharding

__all__ = ["ProjectionOptions", "resolve"]


class _FrozenMap(Mapping[str, str]):
    """An immutable, hashable ``{key: key}`` mapping (options are static arguments of ``jit``);
    a value's ``epsilon`` (:class:`jaxlr.batchnorm.BatchNormKey`) counts in equality and hash."""

    def __init__(self, items: Mapping[str, str]):
        self._items = dict(items)

    def __getitem__(self, key: Any) -> str:
        return self._items[matrices.path_key(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def _described(self) -> tuple[tuple[str, str, float | None], ...]:
        return tuple(sorted((k, str(v), getattr(v, "epsilon", None))
                            for k, v in self._items.items()))

    def __hash__(self) -> int:
        return hash(self._described())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _FrozenMap):
            return self._described() == other._described()
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self) -> str:
        return repr(self._items)


@dataclasses.dataclass(frozen=True)
class ProjectionOptions:
    """How jaxlr selects, decomposes and projects: shared by :func:`low_rank_projection`,
    :func:`with_low_rank_projection`, :func:`project` and :func:`jaxlr.compress` (which reads
    the selection, view, method and mesh).

    Attributes:
      energy_transfer: keep each matrix's Frobenius norm (``False``: plain LRP).
      tail_scale: multiply the dropped singular values by this, ``0 <= tail_scale < 1`` (``0``,
        the default, is the hard projection; the LRPET release's ``--redu_fac``).
      bn_pairs: ``{kernel path: BatchNorm path}`` of the kernels projected through their
        BatchNorm (BN rectification), e.g. :func:`jaxlr.find_bn_pairs`, whose BatchNorm paths
        carry each BatchNorm's epsilon; ``None`` or empty: none.
      bn_epsilon: the epsilon of the BatchNorms given by plain path strings (Flax's default is
        1e-5); a path that carries its own (:func:`jaxlr.find_bn_pairs`) uses that.
      filter: which kernels ``prune=`` / ``keep=`` select: ``None``, the default selection (every
        kernel but the model's output layer, :mod:`jaxlr.selection`); ``"all"``; a kind name or
        tuple of them (``"conv"``: the LRPET paper's); or a ``(path, leaf) -> bool`` function.
      view: how each kernel is seen as a matrix (:mod:`jaxlr.matrices`).
      method: the decomposition (:mod:`jaxlr.svd`): ``"auto"``, ``"gram"`` or ``"svd"``.
      mesh: the devices the decompositions are spread over (:mod:`jaxlr.sharding`): ``"auto"``
        (the default: the mesh of the weights, or of ``jax.set_mesh``), a
        ``jax.sharding.Mesh``, or ``None`` (where XLA's partitioner puts them).

    Raises:
      TypeError / ValueError: at construction, naming the field, for a value of the wrong type or
        out of range.

    Example:
      >>> ProjectionOptions(energy_transfer=False, filter="conv").filter
      'conv'
      >>> ProjectionOptions(tail_scale=1.5)
      Traceback (most recent call last):
        ...
      ValueError: tail_scale must be a number in [0, 1) (0: the hard projection), got 1.5.
    """

    energy_transfer: bool = True
    tail_scale: float = 0.0
    bn_pairs: Mapping[Any, Any] | None = None
    bn_epsilon: float = 1e-5
    filter: matrices.Filter | None = None
    view: matrices.View = None
    method: _checks.Method = "auto"
    mesh: Any = "auto"

    def __post_init__(self) -> None:
        _checks.check_flag("energy_transfer", self.energy_transfer)
        object.__setattr__(self, "tail_scale", _checks.check_tail_scale(self.tail_scale))
        epsilon = self.bn_epsilon
        if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not (
                math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"bn_epsilon must be a number > 0, got {epsilon!r}.")
        pairs = self.bn_pairs
        if pairs is not None:
            if not isinstance(pairs, Mapping):
                raise TypeError(f"bn_pairs must be a mapping {{kernel path: BatchNorm path}} "
                                f"(jaxlr.find_bn_pairs gives one), got {type(pairs).__name__}.")
            try:
                frozen = {k: batchnorm.BatchNormKey(matrices.path_key(v), v.epsilon)
                          if isinstance(v, batchnorm.BatchNormKey) else matrices.path_key(v)
                          for k, v in matrices.keyed(pairs, "bn_pairs").items()}
            except TypeError as error:
                raise TypeError(f"bn_pairs must map kernel paths to BatchNorm paths: {error}"
                                ) from None
            object.__setattr__(self, "bn_pairs", _FrozenMap(frozen))
        matrices.resolve_filter(self.filter)
        matrices.resolve_view(self.view)
        _checks.check_method(self.method)
        sharding.check_mesh(self.mesh)

    @property
    def bn_rectification(self) -> bool:
        """Whether some kernel is projected through its BatchNorm."""
        return bool(self.bn_pairs)


def resolve(options: Any) -> ProjectionOptions:
    """``options``, or the defaults for ``None``; anything else is refused, naming the type."""
    if options is None:
        return ProjectionOptions()
    if not isinstance(options, ProjectionOptions):
        raise TypeError(f"options must be a jaxlr.ProjectionOptions, got "
                        f"{type(options).__name__}.")
    return options
