"""Rank policies: how many singular values each matrix keeps, decided before anything is cut.

Every policy returns a :class:`Ranks`: an immutable mapping ``{path: rank}`` that also knows each
matrix's full rank ``min(m, n)``, so it can be printed, checked, overridden per layer and measured
(:func:`retained_fraction`, the LoRITa paper's x-axis) before it is handed to
:func:`jaxlr.svd.project_tree` or :func:`jaxlr.svd.truncated_factors_tree`.

Policies that need only shapes take the parameter tree:

* :func:`fixed_ranks`: the same rank for every matrix.
* :func:`ratio_ranks`: LRPET's unique pruning ratio ``p``: ``r = max(1, floor(n - n p))``.
* :func:`lsvt_ranks`: LoRITa's local truncation: ``r = max(1, floor(ratio n))``.

Policies that need spectra take ``{path: singular values}``
(:func:`jaxlr.svd.singular_values_tree`):

* :func:`energy_ranks`: the smallest ``r`` keeping a fraction of ``sum s^2``.
* :func:`gsvt_ranks`: LoRITa's global truncation, one ranking of singular values per pool.

Ratios are read as the decimal numbers they are written as (``0.57`` is ``57/100``), so
``n - n * p`` is not spoiled by binary rounding (``100 - 100 * 0.57`` is ``42.99999999999999`` in
floating point; jaxlr's rank for it is 43).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from typing import Any

import numpy as np

from jaxlr import matrices

__all__ = [
    "Ranks",
    "check_fraction",
    "check_rank",
    "energy_ranks",
    "fixed_ranks",
    "gsvt_ranks",
    "lsvt_ranks",
    "ratio_ranks",
    "retained_fraction",
]

Pools = Mapping[str, str] | Callable[[str], str] | None


class Ranks(Mapping[str, int]):
    """Chosen rank of every matrix, ``{path: rank}``, with each matrix's full rank.

    Args:
      ranks: ``{path: rank}``.
      full: ``{path: min(m, n)}`` for the same paths.

    Raises:
      ValueError: if the paths differ or a rank is outside ``[1, full]``.

    Example:
      >>> ranks = Ranks({"Dense_0/kernel": 3}, full={"Dense_0/kernel": 8})
      >>> dict(ranks), ranks.full["Dense_0/kernel"]
      ({'Dense_0/kernel': 3}, 8)
      >>> dict(ranks.with_overrides({"Dense_0/kernel": 5}))
      {'Dense_0/kernel': 5}
    """

    def __init__(self, ranks: Mapping[str, int], full: Mapping[str, int]):
        if set(ranks) != set(full):
            raise ValueError(
                f"ranks and full must name the same paths; only in ranks: "
                f"{sorted(set(ranks) - set(full))}, only in full: {sorted(set(full) - set(ranks))}."
            )
        self._ranks = {
            name: check_rank(repr(name), rank, full[name]) for name, rank in ranks.items()
        }
        self._full = {name: int(full[name]) for name in ranks}

    @property
    def full(self) -> dict[str, int]:
        """``{path: min(m, n)}``: the number of singular values of each matrix."""
        return dict(self._full)

    def __getitem__(self, name: str) -> int:
        return self._ranks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ranks):
            return self._ranks == other._ranks and self._full == other._full
        return isinstance(other, Mapping) and self._ranks == dict(other)

    __hash__ = None  # type: ignore[assignment]

    def with_overrides(self, overrides: Mapping[str, int]) -> Ranks:
        """A copy with the ranks of some paths replaced.

        Raises:
          ValueError: for a path these ranks do not hold, or a rank outside ``[1, min(m, n)]``.
        """
        unknown = sorted(set(overrides) - set(self._ranks))
        if unknown:
            raise ValueError(
                f"overrides name paths without a rank: {unknown}; paths: {sorted(self._ranks)}."
            )
        return Ranks({**self._ranks, **overrides}, self._full)

    def rounded_up(self, multiple: int) -> Ranks:
        """A copy with every rank rounded up to a multiple of ``multiple`` (at most the full rank).

        Hardware runs some widths much faster: XLA's CPU convolution with a number of filters
        that is not a multiple of 8 took twice as long as with the next multiple of 8 in
        ``BENCHMARKS.md``. Rounding up keeps more singular values, never fewer.

        Raises:
          ValueError: if ``multiple`` is not a positive integer.

        Example:
          >>> dict(Ranks({"a": 6, "b": 13}, full={"a": 16, "b": 14}).rounded_up(8))
          {'a': 8, 'b': 14}
        """
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"multiple must be a positive integer, got {multiple!r}.")
        return Ranks(
            {
                name: min(self._full[name], -(-rank // multiple) * multiple)
                for name, rank in self._ranks.items()
            },
            self._full,
        )

    def table(self) -> str:
        """A plain-text table: path, rank, full rank, kept fraction."""
        width = max(len(name) for name in self._ranks) if self._ranks else 4
        lines = [f"{'path':<{width}}  {'rank':>6}  {'of':>6}  {'kept':>6}"]
        for name, rank in self._ranks.items():
            full = self._full[name]
            lines.append(f"{name:<{width}}  {rank:>6}  {full:>6}  {rank / full:>6.1%}")
        retained = retained_fraction(self)
        lines.append(f"retained singular values (mean of kept/total): {retained:.1%}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Ranks({self._ranks!r}, full={self._full!r})"


def retained_fraction(ranks: Ranks) -> float:
    """The LoRITa paper's metric: kept / total singular values per matrix, averaged.

    Example:
      >>> retained_fraction(Ranks({"a": 1, "b": 4}, full={"a": 4, "b": 4}))
      0.625
    """
    if not isinstance(ranks, Ranks):
        raise TypeError(
            "retained_fraction needs a Ranks (which knows each full rank), got "
            f"{type(ranks).__name__}; build one with Ranks(ranks, full=...)."
        )
    if not ranks:
        raise ValueError("retained_fraction of no matrices is undefined.")
    return float(np.mean([ranks[name] / ranks.full[name] for name in ranks]))


# ---------------------------------------------------------------------------------------------
# Validation.


def check_rank(label: str, rank: Any, full: int) -> int:
    """Validates one matrix's rank, ``1 <= rank <= full``, and returns it as a Python int.

    Args:
      label: how the matrix is named in the error, e.g. ``"'Dense_0/kernel'"``.
      rank: the rank to check.
      full: the matrix's ``min(m, n)``.

    Raises:
      TypeError: if ``rank`` is not an integer.
      ValueError: if it is outside ``[1, full]``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise TypeError(f"rank for {label} must be an int, got {rank!r}.")
    if not 1 <= rank <= full:
        raise ValueError(f"rank for {label} is {rank}; allowed 1 <= rank <= min(m, n) = {full}.")
    return int(rank)


def check_fraction(
    name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool
) -> Fraction:
    """Validates a ratio in a range and returns it as the decimal fraction it is written as.

    Raises:
      TypeError: if ``value`` is not a number.
      ValueError: naming ``name``, the interval and the value, if it lies outside.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}.")
    return Fraction(repr(value))


def _by_full_rank(
    tree: Any,
    filter: matrices.Filter,  # noqa: A002
    view: matrices.ViewFn,
    rank_of: Callable[[int], int],
) -> Ranks:
    """Ranks of a shape-only policy: ``rank_of(min(m, n))`` for every selected matrix."""
    full = {
        name: leaf.full_rank
        for name, leaf in matrices.matrix_leaves(tree, filter=filter, view=view).items()
    }
    return Ranks({name: rank_of(n) for name, n in full.items()}, full)


def _spectra(singular_values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not singular_values:
        raise ValueError("singular_values is empty.")
    spectra = {}
    for name, values in singular_values.items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(
                f"singular values of {name!r} must be a non-empty 1-D array, got shape "
                f"{values.shape}."
            )
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError(f"singular values of {name!r} must be finite and >= 0.")
        spectra[name] = np.sort(values)[::-1]
    return spectra


# ---------------------------------------------------------------------------------------------
# Shape-only policies.


def fixed_ranks(
    tree: Any,
    rank: int,
    *,
    filter: matrices.Filter = matrices.is_kernel,  # noqa: A002
    view: matrices.ViewFn = matrices.default_view,
) -> Ranks:
    """The same rank for every selected matrix.

    Raises:
      ValueError: if ``rank`` exceeds some matrix's ``min(m, n)`` (named in the message) or is < 1.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"a": {"kernel": jnp.zeros((8, 4))}, "b": {"kernel": jnp.zeros((3, 3, 4, 6))}}
      >>> dict(fixed_ranks(params, 2))
      {'a/kernel': 2, 'b/kernel': 2}
    """
    return _by_full_rank(tree, filter, view, lambda n: rank)


def ratio_ranks(
    tree: Any,
    ratio: float,
    *,
    filter: matrices.Filter = matrices.is_kernel,  # noqa: A002
    view: matrices.ViewFn = matrices.default_view,
) -> Ranks:
    """LRPET's unique pruning ratio: ``r = max(1, floor(n - n * ratio))`` with ``n = min(m, n)``.

    Args:
      tree: the parameter tree.
      ratio: the fraction of singular values pruned, ``0 <= ratio < 1``.
      filter: which leaves are matrices.
      view: how each leaf is seen as a matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 16, 16))},
      ...           "fc": {"kernel": jnp.zeros((64, 100))}}
      >>> dict(ratio_ranks(params, 0.57))  # floor(16 - 9.12) = 6; floor(64 - 36.48) = 27
      {'conv/kernel': 6, 'fc/kernel': 27}

    References:
      "Compact Model Training by Low-Rank Projection with Energy Transfer", arXiv:2204.05566.
    """
    pruned = check_fraction("ratio", ratio, 0.0, 1.0, low_open=False, high_open=True)
    return _by_full_rank(tree, filter, view, lambda n: max(1, math.floor(n - n * pruned)))


def lsvt_ranks(
    tree: Any,
    ratio: float,
    *,
    filter: matrices.Filter = matrices.is_kernel,  # noqa: A002
    view: matrices.ViewFn = matrices.default_view,
) -> Ranks:
    """LoRITa's local truncation (LSVT): each matrix keeps ``max(1, floor(ratio * n))`` values.

    Args:
      tree: the parameter tree.
      ratio: the fraction of each matrix's singular values kept, ``0 < ratio <= 1``.
      filter: which leaves are matrices.
      view: how each leaf is seen as a matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> dict(lsvt_ranks({"a": {"kernel": jnp.zeros((10, 20))}}, 0.29))
      {'a/kernel': 2}

    References:
      "Structure-Preserving Network Compression Via Low-Rank Induced Training Through Linear
      Layers Composition" (LoRITa).
    """
    kept = check_fraction("ratio", ratio, 0.0, 1.0, low_open=True, high_open=False)
    return _by_full_rank(tree, filter, view, lambda n: max(1, math.floor(kept * n)))


# ---------------------------------------------------------------------------------------------
# Spectral policies.


def energy_ranks(singular_values: Mapping[str, Any], fraction: float) -> Ranks:
    """The smallest rank keeping ``fraction`` of each matrix's energy ``sum s^2``.

    Args:
      singular_values: ``{path: singular values}``.
      fraction: the fraction of ``sum s^2`` kept, ``0 < fraction <= 1``. A zero matrix keeps 1.

    Example:
      >>> dict(energy_ranks({"a": [3.0, 2.0, 1.0, 1.0]}, 0.8))  # (9 + 4) / 15 >= 0.8
      {'a': 2}
    """
    target = float(check_fraction("fraction", fraction, 0.0, 1.0, low_open=True, high_open=False))
    ranks, full = {}, {}
    for name, values in _spectra(singular_values).items():
        energy = np.cumsum(values**2)
        total = energy[-1]
        # The relative slack absorbs the rounding of the cumulative sum at fraction = 1.
        reached = energy >= target * total * (1 - 1e-12)
        ranks[name] = max(1, int(np.argmax(reached)) + 1) if total > 0 else 1
        full[name] = values.size
    return Ranks(ranks, full)


def gsvt_ranks(
    singular_values: Mapping[str, Any],
    ratio: float,
    *,
    pools: Pools = None,
    normalize: str = "none",
) -> Ranks:
    """LoRITa's global truncation (GSVT): one ranking of singular values per pool.

    In each pool the ``floor(ratio * N)`` largest of its ``N`` singular values are kept (ties
    broken by tree order, then by position in the spectrum) and every matrix keeps at least one.

    Args:
      singular_values: ``{path: singular values}``.
      ratio: the fraction of each pool's singular values kept, ``0 < ratio <= 1``.
      pools: ``None`` (one pool), ``{path: pool name}`` covering every path, or a callable
        ``path -> pool name``. The paper pools attention and MLP matrices separately for ViTs and
        convolutions and dense layers separately for CNNs.
      normalize: ``"none"`` ranks the raw singular values (the default, as the paper describes
        GSVT); ``"max"`` divides each matrix's values by its largest first, so matrices of
        different scale compete on shape alone (the paper's released code does this for the
        convolution pool of CNNs only).

    Raises:
      ValueError: for a ratio outside ``(0, 1]``, an unknown ``normalize``, or pools that leave a
        path out.

    Example:
      >>> spectra = {"a": [10.0, 1.0], "b": [0.5, 0.4]}
      >>> dict(gsvt_ranks(spectra, 0.5))  # 10 and 1 are the two largest of four; b keeps one
      {'a': 2, 'b': 1}
      >>> dict(gsvt_ranks(spectra, 0.75, normalize="max"))  # keeps 1 (a), 1 and 0.8 (b), not 0.1
      {'a': 1, 'b': 2}

    References:
      "Structure-Preserving Network Compression Via Low-Rank Induced Training Through Linear
      Layers Composition" (LoRITa).
    """
    kept = check_fraction("ratio", ratio, 0.0, 1.0, low_open=True, high_open=False)
    if normalize not in ("none", "max"):
        raise ValueError(f"normalize must be 'none' or 'max', got {normalize!r}.")
    spectra = _spectra(singular_values)
    pool_of = _pool_assignment(list(spectra), pools)

    ranks = {}
    for pool in dict.fromkeys(pool_of.values()):
        names = [name for name in spectra if pool_of[name] == pool]
        values, owners = [], []
        for owner, name in enumerate(names):
            spectrum = spectra[name]
            if normalize == "max" and spectrum[0] > 0:
                spectrum = spectrum / spectrum[0]
            values.append(spectrum)
            owners.append(np.full(spectrum.size, owner))
        values, owners = np.concatenate(values), np.concatenate(owners)
        keep = math.floor(kept * values.size)
        # A stable sort of the negated values keeps tree order among equal values.
        chosen = owners[np.argsort(-values, kind="stable")[:keep]]
        counts = np.bincount(chosen, minlength=len(names))
        for owner, name in enumerate(names):
            ranks[name] = max(1, int(counts[owner]))
    return Ranks(ranks, {name: values.size for name, values in spectra.items()})


def _pool_assignment(names: list[str], pools: Pools) -> dict[str, str]:
    if pools is None:
        return {name: "all" for name in names}
    if callable(pools):
        return {name: str(pools(name)) for name in names}
    if isinstance(pools, Mapping):
        missing = [name for name in names if name not in pools]
        if missing:
            raise ValueError(f"pools assign no pool to {missing}; every matrix needs one.")
        return {name: str(pools[name]) for name in names}
    raise TypeError(f"pools must be None, a mapping or a callable, got {type(pools).__name__}.")
