"""Rank policies: how many singular values each matrix keeps, decided before anything is cut.

Every policy takes the parameter tree (a Linen variable dict or its ``params``, an NNX ``State``,
an Equinox module, a LoRITa-factorized tree, ...) and returns a :class:`Ranks`: an immutable
mapping ``{key: rank}`` that also knows each matrix's full rank ``min(m, n)``, so it can be
printed, checked, overridden per layer and measured (:func:`retained_fraction`, the LoRITa paper's
x-axis) before it is handed to :func:`jaxlr.project`, :func:`jaxlr.low_rank_projection` or
:func:`jaxlr.compress`, which all take a :class:`Ranks` (or a function of the params returning
one).

* :func:`fixed_ranks`: the same rank for every matrix.
* :func:`lsvt_ranks`: each matrix keeps the same fraction of its singular values (LoRITa's local
  truncation, LSVT), ``r = max(1, floor(keep n))``. LRPET's unique pruning ratio ``p`` is the same
  rule with ``prune=p`` (``keep = 1 - p``): ``r = max(1, floor(n - n p))``.
* :func:`gsvt_ranks`: one ranking of the singular values of every matrix of a pool (LoRITa's
  global truncation, GSVT).
* :func:`energy_ranks`: the smallest ``r`` keeping a fraction of each matrix's ``sum s^2``.
* :func:`target_ranks`: the GSVT or LSVT budget that meets a target reduction of the parameters
  or of the multiply-accumulates of a forward pass (:func:`jaxlr.forward_cost`).

**Fractions.** ``keep=`` is always the fraction of singular values kept and ``prune=`` the fraction
pruned, ``keep = 1 - prune``; every entry point takes either. They are read as the decimal numbers
they are written as (``0.57`` is ``57/100``), so ``n - n * p`` is not spoiled by binary rounding
(``100 - 100 * 0.57`` is ``42.99999999999999`` in floating point; jaxlr's rank for it is 43).
:func:`local_rank` is that one formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlr import _checks, _nnx, matrices, nodes, selection, svd, whitening
from jaxlr._checks import check_rank
from jaxlr.calibration import Calibration

if TYPE_CHECKING:
    from jaxlr.cost import ForwardCost
    from jaxlr.latency import LatencyTable

__all__ = [
    "Pools",
    "RankRequest",
    "RankSpec",
    "Ranks",
    "energy_ranks",
    "fixed_ranks",
    "gsvt_ranks",
    "kept_fraction",
    "local_rank",
    "lsvt_ranks",
    "rank_request",
    "resolve_ranks",
    "retained_fraction",
    "select",
    "target_ranks",
]

Pools = Literal["kind"] | Mapping[Any, str] | Callable[[matrices.Path, Any], str] | None
"""GSVT's pools: ``None`` (one pool), ``"kind"`` (attention / conv / dense matrices apart, as the
paper pools ViTs and CNNs), ``{key: pool}`` or ``(path, leaf) -> pool``."""


class Ranks(Mapping[str, int]):
    """Chosen rank of every matrix, ``{key: rank}``, with each matrix's full rank.

    Keys are taken as ``'/'``-joined strings or tuples of names, with or without the leading
    ``params`` of a Linen variable dict (:func:`jaxlr.matrices.path_key`), and looked up the same
    way.

    Args:
      ranks: ``{path: rank}``.
      full: ``{path: min(m, n)}`` for the same paths.

    Raises:
      ValueError: if the paths differ or a rank is outside ``[1, full]``.

    Example:
      >>> ranks = Ranks({("params", "Dense_0", "kernel"): 3}, full={"Dense_0/kernel": 8})
      >>> dict(ranks), ranks["Dense_0/kernel"], ranks[("Dense_0", "kernel")]
      ({'Dense_0/kernel': 3}, 3, 3)
      >>> dict(ranks.with_overrides({"Dense_0/kernel": 5}))
      {'Dense_0/kernel': 5}
    """

    def __init__(self, ranks: Mapping[Any, int], full: Mapping[Any, int]):
        ranks, full = matrices.keyed(ranks, "ranks"), matrices.keyed(full, "full")
        if set(ranks) != set(full):
            raise ValueError(
                f"ranks and full must name the same paths; only in ranks: "
                f"{sorted(set(ranks) - set(full))}, only in full: {sorted(set(full) - set(ranks))}."
            )
        self._full = {name: check_rank(f"the full rank of {name!r}", full[name], 2**62)
                      for name in ranks}
        self._ranks = {name: check_rank(repr(name), rank, self._full[name])
                       for name, rank in ranks.items()}

    @property
    def full(self) -> dict[str, int]:
        """``{key: min(m, n)}``: the number of singular values of each matrix."""
        return dict(self._full)

    def __getitem__(self, key: Any) -> int:
        return self._ranks[matrices.path_key(key)]

    def __contains__(self, key: object) -> bool:
        try:
            return matrices.path_key(key) in self._ranks  # type: ignore[arg-type]
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._ranks)

    def __len__(self) -> int:
        return len(self._ranks)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ranks):
            return self._ranks == other._ranks and self._full == other._full
        if isinstance(other, Mapping):
            try:
                return self._ranks == matrices.keyed(other)
            except (TypeError, ValueError):
                return False
        return False

    __hash__ = None  # type: ignore[assignment]

    def with_overrides(self, overrides: Mapping[Any, int]) -> Ranks:
        """A copy with the ranks of some paths replaced.

        Raises:
          ValueError: for a path these ranks do not hold, or a rank outside ``[1, min(m, n)]``.
        """
        overrides = matrices.keyed(overrides, "overrides")
        unknown = sorted(set(overrides) - set(self._ranks))
        if unknown:
            raise ValueError(
                f"overrides name paths without a rank: {unknown}; paths: {sorted(self._ranks)}."
            )
        return Ranks({**self._ranks, **overrides}, self._full)

    def rounded_up(self, multiple: int) -> Ranks:
        """A copy with every rank rounded up to a multiple of ``multiple`` (at most the full rank).

        Hardware runs some widths much faster (XLA's CPU convolution with a number of filters
        that is not a multiple of 8 against the next multiple of 8: ``BENCHMARKS.md``). Rounding
        up keeps more singular values, never fewer.

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
        """A plain-text table: key, rank, full rank, kept fraction."""
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
# The one rank formula.


def _fraction(name: str, value: Any, *, closed_low: bool, closed_high: bool) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    low_ok = value >= 0 if closed_low else value > 0
    high_ok = value <= 1 if closed_high else value < 1
    if math.isnan(value) or not (low_ok and high_ok):
        interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}.")
    return Fraction(repr(value))


def kept_fraction(keep: Any = None, prune: Any = None) -> Fraction:
    """The kept fraction from exactly one of ``keep`` (in ``(0, 1]``) and ``prune`` (in
    ``[0, 1)``), as the exact decimal it is written as.

    Raises:
      ValueError: if both or neither are given, or the one given is out of its range.
      TypeError: if it is not a number.

    Example:
      >>> kept_fraction(prune=0.57), kept_fraction(keep=0.25)
      (Fraction(43, 100), Fraction(1, 4))
    """
    if (keep is None) == (prune is None):
        raise ValueError("give exactly one of keep (the fraction of singular values kept, in "
                         "(0, 1]) and prune (the fraction pruned, in [0, 1)).")
    if keep is not None:
        return _fraction("keep", keep, closed_low=False, closed_high=True)
    return 1 - _fraction("prune", prune, closed_low=True, closed_high=False)


def local_rank(n: int, *, keep: Any = None, prune: Any = None) -> int:
    """``max(1, floor(keep * n))`` with ``keep = 1 - prune``: the rank of a matrix with ``n``
    singular values under LSVT (``keep``) or LRPET's unique pruning ratio (``prune``).

    Example:
      >>> local_rank(100, prune=0.57), local_rank(16, prune=0.57), local_rank(10, keep=0.05)
      (43, 6, 1)
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n (the number of singular values) must be an int >= 1, got {n!r}.")
    return _rank(kept_fraction(keep, prune), n)


def _rank(kept: Fraction | float, n: int) -> int:
    return max(1, math.floor(kept * n))


def traced_local_rank(n: int, kept: jax.Array) -> jax.Array:
    """:func:`local_rank` for a traced kept fraction (a schedule, ``inject_hyperparams``): an int32
    in ``[1, n]``. The fraction arrives rounded to float32, so a product within ``n * 2^-20`` below
    an integer counts as that integer, as the decimal reading of the static path does."""
    value = jnp.asarray(kept, jnp.float32) * n + n * 2.0**-20
    return jnp.clip(jnp.floor(value), 1, n).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# From a specification to ranks.

def refuse_rank_spec(ranks: Any) -> None:
    """Raises the ``TypeError`` every entry point gives for a ``ranks=`` that is no rank
    specification (a number, say: fractions are given by name, ``keep=`` or ``prune=``)."""
    hint = (" A fraction of singular values is given by name: keep=0.3 (kept) or prune=0.3 "
            "(pruned).") if isinstance(ranks, int | float | np.integer | np.floating) else ""
    raise TypeError(f"ranks must be a Ranks, a mapping {{path: rank}} or a function of the params "
                    f"returning one; got {type(ranks).__name__}.{hint}")


RankSpec = Ranks | Mapping[Any, int] | Callable[[Any], Mapping[Any, int]]
"""What ``ranks=`` arguments take: a :class:`Ranks`, ``{path: rank}``, or a function of the params
returning either."""


def _named(keys: set[str]) -> Callable[[matrices.Path, Any], bool]:
    return lambda path, leaf: matrices.path_key(path) in keys


def resolve_ranks(spec: RankSpec, params: Any, view: matrices.View = None) -> Ranks:
    """The :class:`Ranks` that ``spec`` gives for ``params``, checked against the tree: every key
    must be a matrix of it and every rank at most its ``min(m, n)``.

    Raises:
      ValueError: for a key that is not a leaf of the tree, or a rank out of range.
      TypeError: for a spec that is neither a mapping nor a function returning one.
    """
    return select(params, rank_request(ranks=spec), view=view)[0]


class RankRequest(NamedTuple):
    """A rank request, read once by :func:`rank_request`: explicit ``ranks``, or a fraction of
    singular values (``keep`` or ``prune``), static (a number) or traced (a schedule of the step,
    or a scalar array).

    Attributes:
      ranks: a :data:`RankSpec`, or ``None`` for a fraction.
      name: ``"keep"`` or ``"prune"`` for a fraction, else ``None``.
      fraction: the number, schedule or scalar array given.
      traced: whether the fraction is a schedule or an array (known only at run time).
    """

    ranks: RankSpec | None
    name: str | None
    fraction: Any
    traced: bool

    @property
    def kept(self) -> Fraction:
        """The kept fraction of a static fraction request (:func:`kept_fraction`)."""
        if self.traced or self.name is None:
            raise TypeError("a kept fraction is known only for a fixed keep= or prune= number.")
        return _kept(self.name, self.fraction)


def _kept(name: str, value: Any) -> Fraction:
    return kept_fraction(keep=value) if name == "keep" else kept_fraction(prune=value)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


def rank_request(*, ranks: Any = None, keep: Any = None, prune: Any = None) -> RankRequest:
    """Reads and checks the rank request every entry point takes: exactly one of ``ranks`` (a
    :class:`Ranks`, ``{path: rank}`` or a function of the params), ``keep`` (the fraction of
    singular values kept, in ``(0, 1]``) and ``prune`` (the fraction pruned, in ``[0, 1)``); a
    fraction may be a number, a schedule (a function of the step, its first value checked) or a
    scalar array.

    Raises:
      ValueError: for none or several, an empty ``ranks`` or a fraction out of range.
      TypeError: for a ``ranks`` that is no rank specification (a number: fractions are named) or
        a fraction of another type.

    Example:
      >>> rank_request(prune=0.5).kept
      Fraction(1, 2)
    """
    given = [name for name, v in (("prune", prune), ("keep", keep), ("ranks", ranks))
             if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of prune (the fraction of singular values pruned, in "
                         "[0, 1)), keep (the fraction kept, in (0, 1]) and ranks (a Ranks, "
                         f"{{path: rank}} or a function of the params); got {given or 'none'}.")
    if ranks is not None:
        if not (isinstance(ranks, Mapping) or callable(ranks)):
            refuse_rank_spec(ranks)
        if isinstance(ranks, Mapping) and not ranks:
            raise ValueError("ranks is empty: name at least one matrix.")
        return RankRequest(ranks, None, None, False)
    name, value = ("prune", prune) if prune is not None else ("keep", keep)
    if _is_number(value):
        _kept(name, value)
        return RankRequest(None, name, value, False)
    if callable(value):
        first = value(0)
        if _is_array(first) and not isinstance(first, jax.core.Tracer):
            first = float(first)
        if _is_number(first):
            _kept(name, first)  # the schedule's first value
        return RankRequest(None, name, value, True)
    if _is_array(value) and jnp.ndim(value) == 0:
        if not isinstance(value, jax.core.Tracer):
            _kept(name, float(value))
        return RankRequest(None, name, value, True)
    raise TypeError(f"{name} must be a number, a schedule (a function of the step) or a scalar "
                    f"array; got {value!r} of type {type(value).__name__}.")


def select(
    params: Any,
    request: RankRequest,
    *,
    filter: matrices.Filter | None = None,  # noqa: A002
    view: matrices.View = None,
) -> tuple[Ranks, dict[str, selection.MatrixLeaf]]:
    """The matrices a static rank request selects, with their ranks, in one pass over the tree.

    Explicit ``ranks`` name their matrices; a fraction gives the matrices of ``filter`` their
    LSVT rank (:func:`local_rank`). :func:`jaxlr.project`, :func:`jaxlr.low_rank_projection`,
    :func:`jaxlr.compress` and :func:`lsvt_ranks` read their requests through it.

    Returns:
      ``(ranks, matrices)``: the :class:`Ranks` and ``{key: MatrixLeaf}`` of the same matrices,
      in tree order.
    """
    ranks = request.ranks
    if ranks is None:
        kept = request.kept
        found = selection.matrix_leaves(params, filter=filter, view=view)
        return Ranks({key: _rank(kept, leaf.full_rank) for key, leaf in found.items()},
                     {key: leaf.full_rank for key, leaf in found.items()}), found
    if callable(ranks) and not isinstance(ranks, Mapping):
        ranks = ranks(params)
    if not isinstance(ranks, Mapping):
        refuse_rank_spec(ranks)
    wanted = matrices.keyed(ranks, "ranks")
    if not wanted:
        raise ValueError("ranks is empty: name at least one matrix.")
    present = {matrices.path_key(path) for path, _ in selection.flatten(params)[0]}
    missing = sorted(set(wanted) - present)
    if missing:
        raise ValueError(f"ranks name paths that are not leaves of the tree: {missing}; leaves "
                         f"of the tree: {sorted(present)[:20]}.")
    found = selection.matrix_leaves(params, filter=_named(set(wanted)), view=view)
    return Ranks({key: wanted[key] for key in found},
                 {key: leaf.full_rank for key, leaf in found.items()}), found


def _shape_policy(params: Any, filter: matrices.Filter | None,  # noqa: A002
                  view: matrices.View, rank_of: Callable[[int], int]) -> Ranks:
    full = {key: leaf.full_rank
            for key, leaf in selection.matrix_leaves(params, filter=filter, view=view).items()}
    return Ranks({key: rank_of(n) for key, n in full.items()}, full)


def _spectra(params: Any, filter: matrices.Filter | None, view: matrices.View,  # noqa: A002
             spectra: Mapping[Any, Any] | None, calibration: Calibration | None = None
             ) -> tuple[dict[str, selection.MatrixLeaf], dict[str, np.ndarray]]:
    """The selected matrices and their spectra (computed, whitened by ``calibration``, or taken
    from ``spectra``), largest first, as float64."""
    found = selection.matrix_leaves(params, filter=filter, view=view)
    if calibration is not None:
        if spectra is not None:
            raise ValueError("pass spectra= or calibration=, not both (a sweep's spectra are "
                             "already whitened by its calibration).")
        given = whitened_spectra(params, found, calibration)
    elif spectra is None:
        given = svd.singular_values(params, filter=_named(set(found)), view=view)
    else:
        given = matrices.keyed(spectra, "spectra")
        missing = sorted(set(found) - set(given))
        if missing:
            raise ValueError(f"spectra lack the selected matrices {missing}.")
    out = {}
    for key, leaf in found.items():
        values = np.asarray(jax.device_get(given[key]), dtype=np.float64)
        if values.shape != (leaf.full_rank,):
            raise ValueError(f"singular values of {key!r} must be a 1-D array of its "
                             f"{leaf.full_rank} values, got shape {values.shape}.")
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError(f"singular values of {key!r} must be finite and >= 0.")
        out[key] = np.sort(values)[::-1]
    return found, out


def whitened_spectra(params: Any, found: Mapping[str, selection.MatrixLeaf],
                     calibration: Calibration) -> dict[str, jax.Array]:
    """The singular values of each found matrix whitened by ``calibration``
    (:mod:`jaxlr.whitening`), in one jitted call."""
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a jaxlr.calibration.Calibration (jaxlr.calibrate) "
                        f"or None, got {type(calibration).__name__}.")
    calibration.check(found, "the rank policy")
    tree = _nnx.parameters(params) if _nnx.is_module(params) else params
    flat = selection.flatten(nodes.collapse_tree(tree))[0]
    leaves = tuple(flat[leaf.index][1] for leaf in found.values())
    values, finite = whitening.spectra_of(
        leaves, whitening.moments_for(calibration, list(found)),
        tuple(leaf.view for leaf in found.values()), calibration.damping)
    if not _checks.is_traced(leaves):
        _checks.raise_if_nonfinite(list(found), finite)
    return dict(zip(found, values, strict=True))


# ---------------------------------------------------------------------------------------------
# Policies.


def fixed_ranks(
    params: Any,
    rank: int,
    *,
    filter: matrices.Filter | None = None,  # noqa: A002
    view: matrices.View = None,
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
    return _shape_policy(params, filter, view, lambda n: rank)


@_checks.by_name(1, "keep= or prune=")
def lsvt_ranks(
    params: Any,
    *,
    keep: float | None = None,
    prune: float | None = None,
    filter: matrices.Filter | None = None,  # noqa: A002
    view: matrices.View = None,
) -> Ranks:
    """Each matrix keeps the same fraction of its singular values: ``max(1, floor(keep n))``.

    LoRITa's local truncation (LSVT) with ``keep``; LRPET's unique pruning ratio ``p`` with
    ``prune=p`` (:func:`local_rank`).

    Args:
      params: the parameter tree.
      keep: the fraction of each matrix's singular values kept, in ``(0, 1]``.
      prune: instead of ``keep``: the fraction pruned, in ``[0, 1)``.
      filter: which matrices (default: every kernel but the output layer, :mod:`jaxlr.selection`).
      view: how each leaf is seen as a matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 16, 16))},
      ...           "fc": {"kernel": jnp.zeros((64, 100))},
      ...           "head": {"kernel": jnp.zeros((100, 10))}}
      >>> dict(lsvt_ranks(params, prune=0.57))  # floor(16 - 9.12) = 6; floor(64 - 36.48) = 27
      {'conv/kernel': 6, 'fc/kernel': 27}
      >>> dict(lsvt_ranks(params, keep=0.25, filter="all"))  # the output layer too
      {'conv/kernel': 4, 'fc/kernel': 16, 'head/kernel': 2}

    References:
      LoRITa: "Structure-Preserving Network Compression Via Low-Rank Induced Training Through
      Linear Layers Composition". LRPET: "Compact Model Training by Low-Rank Projection with Energy
      Transfer", arXiv:2204.05566.
    """
    request = rank_request(keep=keep, prune=prune)
    if request.traced:
        raise TypeError("lsvt_ranks takes a fixed keep= or prune= number; schedules belong to "
                        "jaxlr.low_rank_projection.")
    return select(params, request, filter=filter, view=view)[0]


def energy_ranks(
    params: Any,
    energy: float,
    *,
    filter: matrices.Filter | None = None,  # noqa: A002
    view: matrices.View = None,
    spectra: Mapping[Any, Any] | None = None,
    calibration: Calibration | None = None,
) -> Ranks:
    """The smallest rank keeping ``energy`` of each matrix's ``sum s^2``.

    Args:
      params: the parameter tree.
      energy: the fraction of ``sum s^2`` kept, in ``(0, 1]``. A zero matrix keeps 1.
      filter: which matrices (default: every kernel but the output layer, :mod:`jaxlr.selection`).
      view: how each leaf is seen as a matrix.
      spectra: ``{key: singular values}`` already computed (:func:`jaxlr.svd.singular_values`).
      calibration: a :class:`~jaxlr.calibration.Calibration`: the energy of each matrix's
        output on the calibration inputs instead of its own (:mod:`jaxlr.whitening`).

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"a": {"kernel": jnp.diag(jnp.array([3.0, 2.0, 1.0, 1.0]))}}
      >>> dict(energy_ranks(params, 0.8))  # (9 + 4) / 15 >= 0.8
      {'a/kernel': 2}
    """
    target = float(_fraction("energy", energy, closed_low=False, closed_high=True))
    found, values = _spectra(params, filter, view, spectra, calibration)
    ranks = {}
    for key, s in values.items():
        cumulative = np.cumsum(s**2)
        total = cumulative[-1]
        # The relative slack absorbs the rounding of the cumulative sum at energy = 1.
        reached = cumulative >= target * total * (1 - 1e-12)
        ranks[key] = max(1, int(np.argmax(reached)) + 1) if total > 0 else 1
    return Ranks(ranks, {key: leaf.full_rank for key, leaf in found.items()})


def _pool_of(found: dict[str, selection.MatrixLeaf], params: Any, pools: Pools) -> dict[str, str]:
    if pools is None:
        return dict.fromkeys(found, "all")
    if isinstance(pools, str):
        if pools != "kind":
            raise ValueError(f"pools given by name must be 'kind', got {pools!r}.")
        return {key: leaf.kind for key, leaf in found.items()}
    if isinstance(pools, Mapping):
        named = matrices.keyed(pools, "pools")
        missing = [key for key in found if key not in named]
        if missing:
            raise ValueError(f"pools assign no pool to {missing}; every matrix needs one.")
        return {key: str(named[key]) for key in found}
    if callable(pools):
        flat = [leaf for _, leaf in selection.flatten(params)[0]]
        return {key: str(pools(leaf.path, flat[leaf.index])) for key, leaf in found.items()}
    raise TypeError(f"pools must be None, 'kind', a mapping or a function (path, leaf) -> pool, "
                    f"got {type(pools).__name__}.")


def _normalize(normalize: Any) -> str:
    if normalize not in ("none", "max"):
        raise ValueError(f"normalize must be 'none' or 'max', got {normalize!r}.")
    return normalize


def _gsvt(values: dict[str, np.ndarray], pool_of: dict[str, str], kept: Fraction | float,
          normalize: str) -> dict[str, int]:
    ranks = {}
    for pool in dict.fromkeys(pool_of.values()):
        names = [name for name in values if pool_of[name] == pool]
        spectra, owners = [], []
        for owner, name in enumerate(names):
            spectrum = values[name]
            if normalize == "max" and spectrum[0] > 0:
                spectrum = spectrum / spectrum[0]
            spectra.append(spectrum)
            owners.append(np.full(spectrum.size, owner))
        pooled, owner_of = np.concatenate(spectra), np.concatenate(owners)
        count = math.floor(kept * pooled.size)
        # A stable sort of the negated values keeps tree order among equal values.
        chosen = owner_of[np.argsort(-pooled, kind="stable")[:count]]
        counts = np.bincount(chosen, minlength=len(names))
        for owner, name in enumerate(names):
            ranks[name] = max(1, int(counts[owner]))
    return ranks


@_checks.by_name(1, "keep= or prune=")
def gsvt_ranks(
    params: Any,
    *,
    keep: float | None = None,
    prune: float | None = None,
    pools: Pools = None,
    normalize: Literal["none", "max"] = "none",
    filter: matrices.Filter | None = None,  # noqa: A002
    view: matrices.View = None,
    spectra: Mapping[Any, Any] | None = None,
    calibration: Calibration | None = None,
) -> Ranks:
    """LoRITa's global truncation (GSVT): one ranking of singular values per pool.

    In each pool the ``floor(keep * N)`` largest of its ``N`` singular values are kept (ties
    broken by tree order, then by position in the spectrum) and every matrix keeps at least one.

    Args:
      params: the parameter tree (LoRITa products count as the kernels they stand for).
      keep: the fraction of each pool's singular values kept, in ``(0, 1]``.
      prune: instead of ``keep``: the fraction pruned, in ``[0, 1)``.
      pools: ``None`` (one pool), ``"kind"`` (attention, conv and dense matrices apart: the
        paper's pools for ViTs and CNNs), ``{key: pool}`` or ``(path, leaf) -> pool``.
      normalize: ``"none"`` ranks the raw singular values (the default, as the paper describes
        GSVT); ``"max"`` divides each matrix's values by its largest first, so matrices of
        different scale compete on shape alone (the paper's released code does this for the
        convolution pool of CNNs only).
      filter: which matrices (default: every kernel but the output layer, :mod:`jaxlr.selection`).
      view: how each leaf is seen as a matrix.
      spectra: ``{key: singular values}`` already computed (:func:`jaxlr.svd.singular_values`,
        :attr:`jaxlr.sweeps.Sweep.spectra`), to sweep many budgets without decomposing again.
      calibration: a :class:`~jaxlr.calibration.Calibration` (:func:`jaxlr.calibrate`): rank the
        whitened singular values, whose squares are the output error each direction's cut adds
        on the calibration inputs, so one global cut compares what it costs each layer's output
        (:mod:`jaxlr.whitening`); compress with the same calibration.

    Raises:
      ValueError: for a fraction out of range, an unknown ``normalize``, pools that leave a
        matrix out, or a calibration that lacks a selected matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"a": {"kernel": jnp.diag(jnp.array([10.0, 1.0]))},
      ...           "b": {"kernel": jnp.diag(jnp.array([0.5, 0.4]))}}
      >>> dict(gsvt_ranks(params, keep=0.5, filter="all"))  # 10 and 1 are the largest of four
      {'a/kernel': 2, 'b/kernel': 1}
      >>> dict(gsvt_ranks(params, keep=0.75, normalize="max", filter="all"))  # 1, 1, 0.8; not 0.1
      {'a/kernel': 1, 'b/kernel': 2}

    References:
      "Structure-Preserving Network Compression Via Low-Rank Induced Training Through Linear
      Layers Composition" (LoRITa).
    """
    kept = kept_fraction(keep, prune)
    normalize = _normalize(normalize)
    found, values = _spectra(params, filter, view, spectra, calibration)
    ranks = _gsvt(values, _pool_of(found, params, pools), kept, normalize)
    return Ranks(ranks, {key: leaf.full_rank for key, leaf in found.items()})


@_checks.by_name(1, "reduction=")
def target_ranks(
    params: Any,
    *,
    reduction: float,
    cost: ForwardCost | None = None,
    policy: Literal["gsvt", "lsvt"] = "gsvt",
    pools: Pools = None,
    normalize: Literal["none", "max"] = "none",
    filter: matrices.Filter | None = None,  # noqa: A002
    view: matrices.View = None,
    spectra: Mapping[Any, Any] | None = None,
    latency: LatencyTable | None = None,
    calibration: Calibration | None = None,
) -> Ranks:
    """The ranks of the largest GSVT or LSVT budget that cuts ``reduction`` of the cost.

    The cost is the parameter count of the whole tree, or, given ``cost``
    (:func:`jaxlr.forward_cost` of the dense model), the multiply-accumulates of its forward pass.
    A matrix of rank ``r`` is counted as its factor pair where that saves
    (:func:`jaxlr.nodes.saves`, as :func:`jaxlr.compress` stores it) and dense otherwise;
    everything else keeps its cost. The budget is bisected, since cutting more never costs more.

    Given ``latency`` (:func:`jaxlr.measure_latency` of the dense model on the device it will run
    on), every rank the budget gives is rounded up to the next rank its layer runs faster at
    (:meth:`jaxlr.latency.LatencyTable.snap`), or to the full rank, which leaves the layer whole,
    where no factored rank is faster; the bisection then finds the largest budget whose rounded
    ranks still meet the target. The target is met by the layers that gain time.

    Args:
      params: the parameter tree.
      reduction: the fraction of the cost to cut, in ``(0, 1)``.
      cost: the dense model's :class:`~jaxlr.cost.ForwardCost` for a MACs target; ``None`` for a
        parameter target.
      policy: ``"gsvt"`` (one ranking per pool) or ``"lsvt"`` (the same fraction per matrix, also
        LRPET's unique pruning ratio).
      pools: GSVT's pools (:func:`gsvt_ranks`).
      normalize: GSVT's normalisation (:func:`gsvt_ranks`).
      filter: which matrices may be cut (default: every kernel but the output layer, as both
        papers; :mod:`jaxlr.selection`).
      view: how each leaf is seen as a matrix.
      spectra: singular values already computed (GSVT).
      latency: measured layer times (:func:`jaxlr.measure_latency`); ``None``: ranks as the
        budget gives them.
      calibration: GSVT ranks the whitened singular values (:func:`gsvt_ranks`); LSVT's ranks
        depend on the shapes only, so it reads neither ``calibration`` nor ``spectra``.

    Raises:
      ValueError: if even one singular value per matrix does not cut ``reduction`` (the message
        says how much it cuts), for a layer ``cost`` does not count, or for one ``latency`` did
        not time (or timed with another matrix shape).

    Example:
      >>> import jax
      >>> params = {"fc1": {"kernel": jax.random.normal(jax.random.key(0), (64, 64))},
      ...           "fc2": {"kernel": jax.random.normal(jax.random.key(1), (64, 32))}}
      >>> ranks = target_ranks(params, reduction=0.5, policy="lsvt", filter="all")
      >>> dict(ranks)     # 17 x 128 + 8 x 96 = 2944 numbers of 6144 (one more: 3072 < 6144 / 2)
      {'fc1/kernel': 17, 'fc2/kernel': 8}
    """
    reduction = float(_fraction("reduction", reduction, closed_low=False, closed_high=False))
    if cost is not None and not hasattr(cost, "layers"):
        raise TypeError(f"cost must be a jaxlr.cost.ForwardCost (jaxlr.forward_cost of the dense "
                        f"model) or None, got {type(cost).__name__}.")
    if policy not in ("gsvt", "lsvt"):
        raise ValueError(f"policy must be 'gsvt' or 'lsvt', got {policy!r}.")
    normalize = _normalize(normalize)
    found = selection.matrix_leaves(params, filter=filter, view=view)
    if cost is None:
        flat = [leaf for _, leaf in selection.flatten(params)[0]]
        before = sum(math.prod(np.shape(leaf)) for leaf in flat)
        unit = dict.fromkeys(found, 1.0)
    else:
        missing = sorted(key for key in found if key not in cost.layers)
        if missing:
            raise ValueError(f"cost counts no product of {missing}; pass the forward_cost of the "
                             "model these params belong to.")
        before = cost.macs
        unit = {key: cost.layers[key].macs / math.prod(leaf.matrix_shape)
                for key, leaf in found.items()}

    full = {key: leaf.full_rank for key, leaf in found.items()}
    if latency is not None:
        if not hasattr(latency, "snap"):
            raise TypeError("latency must be a jaxlr.latency.LatencyTable (jaxlr.measure_latency) "
                            f"or None, got {type(latency).__name__}.")
        latency.snap(Ranks(full, full))  # every layer timed, with the same matrix shape

    if policy == "gsvt":
        _, values = _spectra(params, filter, view, spectra, calibration)
        pool_of = _pool_of(found, params, pools)

        def budget_ranks(budget: float) -> dict[str, int]:
            return _gsvt(values, pool_of, budget, normalize)
    else:
        def budget_ranks(budget: float) -> dict[str, int]:
            return {key: _rank(budget, leaf.full_rank) for key, leaf in found.items()}
    if latency is None:
        ranks_at = budget_ranks
    else:
        def ranks_at(budget: float) -> dict[str, int]:
            return dict(latency.snap(Ranks(budget_ranks(budget), full)))

    def cut(ranks: dict[str, int]) -> float:
        saved = 0.0
        for key, leaf in found.items():
            m, n = leaf.matrix_shape
            after = ranks[key] * (m + n) if nodes.saves(ranks[key], m, n) else m * n
            saved += unit[key] * (m * n - after)
        return saved / before if before else 0.0

    low, high = 0.0, 1.0
    deepest = cut(ranks_at(low))
    if deepest < reduction:
        raise ValueError(f"no {policy.upper()} budget cuts {reduction:.1%} of the "
                         f"{'parameters' if cost is None else 'MACs'}: one singular value per "
                         f"matrix{'' if latency is None else ', rounded up by the latency table,'}"
                         f" cuts {deepest:.1%}.")
    for _ in range(60):  # cut() falls as the budget grows: keep low good, high bad
        middle = (low + high) / 2
        if cut(ranks_at(middle)) >= reduction:
            low = middle
        else:
            high = middle
    return Ranks(ranks_at(low), full)
