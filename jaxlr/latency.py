"""Measured time of every layer, dense and factored, on the backend at hand; ranks chosen from it.

Multiply-accumulates do not set the time of a factored layer: on XLA's CPU backend a convolution
with a number of filters that is not a multiple of 8 can take longer than one with more, and a
narrow convolution may run no faster factored at any rank; on a GPU a small network's layers are
bound by launches and memory traffic (``BENCHMARKS.md`` measures both, with the commands).
:func:`measure_latency` therefore times each layer's own product, as the forward pass runs it, on
the device the inputs live on: once dense and once factored (a product with ``A``, then one with
``B``, as :mod:`jaxlr.inference` runs a :class:`~jaxlr.nodes.LowRank` pair) at a grid of ranks.
Layers with the same product are timed once.

The :class:`LatencyTable` it returns says, per layer, which ranks are *worth* running factored
(:meth:`LayerLatency.efficient_ranks`: faster than the dense layer and than every larger rank by
at least ``margin``), and :meth:`LatencyTable.snap` rounds chosen ranks up to the next such rank,
or to the full rank (the layer stays dense, untruncated) where none is. Rounding up keeps more
singular values, never fewer. ``jaxlr.target_ranks(..., latency=table)`` bisects its GSVT or LSVT
budget over the snapped ranks, so a MAC or parameter target is met by layers that run faster for
it, and the layers that would not gain are left whole.

The times are of the products alone (no normalisation, activations or memory traffic between
layers) and of one process on one machine: a guide to the choice, measured again where the model
will run. :meth:`LatencyTable.seconds` sums them for a choice of ranks.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> import jaxlr
  >>> model = nn.Dense(256)
  >>> x = jnp.ones((64, 512))
  >>> params = model.init(jax.random.key(0), x)["params"]
  >>> table = measure_latency(lambda p, x: model.apply({"params": p}, x), params, x,
  ...                         ranks=[32, 64], repeats=3)
  >>> sorted(table.layers["kernel"].factored)
  [32, 64]
  >>> table.layers["kernel"].matrix_shape, table.layers["kernel"].full_rank
  ((512, 256), 256)
  >>> snapped = table.snap(jaxlr.Ranks({"kernel": 20}, full={"kernel": 256}))
  >>> snapped["kernel"] in table.layers["kernel"].efficient_ranks() + (256,)
  True
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlr import matrices, nodes, selection
from jaxlr.cost import _products, _tagged_jaxpr
from jaxlr.policies import Ranks

__all__ = ["LatencyTable", "LayerLatency", "candidate_ranks", "measure_latency"]

CandidateRanks = Iterable[int] | Callable[[int, int], Iterable[int]] | None
"""Ranks to time: ``None`` (:func:`candidate_ranks`), the same ranks for every layer, or
``(m, n) -> ranks`` per layer. Ranks at which the factor pair would not save
(``r (m + n) >= m n``) are left out, since :func:`jaxlr.compress` keeps such layers dense."""


class LayerLatency(NamedTuple):
    """One layer's measured time per forward pass (its products only).

    Attributes:
      matrix_shape: ``(m, n)``, the kernel seen as a matrix.
      dense: seconds of the dense product(s).
      factored: ``{rank: seconds}`` of the two thin products, per timed rank.
      margin: the fraction of time a rank must save to count as faster (:meth:`efficient_ranks`).
    """

    matrix_shape: tuple[int, int]
    dense: float
    factored: dict[int, float]
    margin: float = 0.1

    @property
    def full_rank(self) -> int:
        """``min(m, n)``: the rank of the dense layer."""
        return min(self.matrix_shape)

    def efficient_ranks(self) -> tuple[int, ...]:
        """The timed ranks that run faster, by at least ``margin``, than the dense layer and than
        every larger timed rank: the only ranks worth running factored. Ascending.

        Example:
          >>> LayerLatency((64, 64), 1.0, {4: 0.2, 8: 0.1, 16: 0.5, 24: 1.2}).efficient_ranks()
          (8, 16)
        """
        found, fastest_above = [], self.dense
        for rank in sorted(self.factored, reverse=True):
            seconds = self.factored[rank]
            if seconds < (1 - self.margin) * fastest_above:
                found.append(rank)
            fastest_above = min(fastest_above, seconds)
        return tuple(sorted(found))

    def snap(self, rank: int) -> int:
        """The smallest efficient rank at least ``rank``; the full rank (dense) if there is none.

        Example:
          >>> layer = LayerLatency((64, 64), 1.0, {4: 0.2, 8: 0.1, 16: 0.5, 24: 1.2})
          >>> layer.snap(3), layer.snap(9), layer.snap(17)
          (8, 16, 64)
        """
        return next((r for r in self.efficient_ranks() if r >= rank), self.full_rank)

    def seconds(self, rank: int) -> float:
        """The time at ``rank``: the dense time where the pair would not save or at full rank.

        Raises:
          KeyError: for a rank that saves but was not timed.
        """
        m, n = self.matrix_shape
        if rank >= self.full_rank or not nodes.saves(rank, m, n):
            return self.dense
        if rank not in self.factored:
            raise KeyError(f"rank {rank} was not timed; timed ranks: {sorted(self.factored)}.")
        return self.factored[rank]


class LatencyTable(NamedTuple):
    """Measured layer times (:func:`measure_latency`).

    Attributes:
      layers: ``{key: LayerLatency}`` per timed matrix, in tree order.
      device: the device the times were taken on (``device_kind``, e.g. ``"cpu"``, ``"NVIDIA
        H100 80GB HBM3"``).
    """

    layers: dict[str, LayerLatency]
    device: str

    def _layer(self, key: Any) -> LayerLatency:
        name = matrices.path_key(key)
        if name not in self.layers:
            raise ValueError(f"the latency table has no layer {name!r}; timed layers: "
                             f"{sorted(self.layers)}. Measure the model the ranks belong to, "
                             "or leave the layer out with the policy's filter.")
        return self.layers[name]

    def snap(self, ranks: Mapping[Any, int]) -> Any:
        """``ranks`` with each rank rounded up to its layer's next efficient rank, or to the full
        rank where no efficient rank is as large (:meth:`LayerLatency.snap`).

        Args:
          ranks: a :class:`jaxlr.Ranks` (returned as one) or ``{path: rank}`` (returned as a
            dict).

        Raises:
          ValueError: for a path the table did not time, or whose full rank differs from the
            table's (another view of the kernel).
        """
        snapped = {}
        for key, rank in matrices.keyed(ranks, "ranks").items():
            layer = self._layer(key)
            full = ranks.full[key] if isinstance(ranks, Ranks) else layer.full_rank
            if full != layer.full_rank:
                raise ValueError(f"{key!r} has full rank {full} in the ranks but "
                                 f"{layer.full_rank} in the latency table (matrix shape "
                                 f"{layer.matrix_shape}): measure with the same view.")
            snapped[key] = layer.snap(rank)
        return Ranks(snapped, ranks.full) if isinstance(ranks, Ranks) else snapped

    def seconds(self, ranks: Mapping[Any, int] | None = None) -> float:
        """The summed time of every timed layer, each dense unless ``ranks`` factors it.

        Raises:
          ValueError: for a path the table did not time.
          KeyError: for a rank that saves but was not timed.
        """
        chosen = matrices.keyed(ranks or {}, "ranks")
        for key in chosen:
            self._layer(key)
        return sum(layer.seconds(chosen[key]) if key in chosen else layer.dense
                   for key, layer in self.layers.items())

    def table(self) -> str:
        """A plain-text table: per layer the dense time and the efficient ranks' times."""
        width = max([len(name) for name in self.layers] + [4])
        lines = [f"{'path':<{width}}  {'m x n':>11}  {'dense ms':>9}  efficient ranks (ms)"]
        for name, layer in self.layers.items():
            shape = f"{layer.matrix_shape[0]} x {layer.matrix_shape[1]}"
            ranks = ", ".join(f"{r}: {layer.factored[r] * 1e3:.3f}"
                              for r in layer.efficient_ranks()) or "none (stays dense)"
            lines.append(f"{name:<{width}}  {shape:>11}  {layer.dense * 1e3:>9.3f}  {ranks}")
        lines.append(f"device: {self.device}")
        return "\n".join(lines)


def candidate_ranks(m: int, n: int) -> tuple[int, ...]:
    """The default ranks to time for an ``m x n`` matrix: 1 to 7, then multiples of 8 in steps
    of a quarter of the rank's power of two (8, 16, ..., 64, 80, 96, 112, 128, 160, ..., 256,
    320, ...), every one at which the factor pair saves (``r (m + n) < m n``).

    Example:
      >>> candidate_ranks(144, 16)                     # saves up to r = 14
      (1, 2, 3, 4, 5, 6, 7, 8)
      >>> candidate_ranks(4608, 512)[-5:]             # saves up to r = 460
      (224, 256, 320, 384, 448)
    """
    limit = next((r for r in range(min(m, n), 0, -1) if nodes.saves(r, m, n)), 0)
    ranks = list(range(1, min(limit, 7) + 1))
    rank = 8
    while rank <= limit:
        ranks.append(rank)
        rank += max(8, 2 ** (rank.bit_length() - 3))
    return tuple(ranks)


class _Product(NamedTuple):
    """One product of the forward pass: the equation and which operand is the kernel."""

    eqn: Any
    kernel: int  # operand index of the kernel

    def signature(self) -> tuple:
        avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in self.eqn.invars)
        return (self.eqn.primitive.name, avals, self.kernel, repr(sorted(
            self.eqn.params.items())))


def _factored_fn(product: _Product, rank: int) -> tuple[Callable[..., Any], list[tuple]] | None:
    """``(f, shapes)``: the product run as two thin products at ``rank`` (``f(x, a, b)``), or
    ``None`` where :mod:`jaxlr.inference` would not run it so (a grouped or batched product, a
    kernel on the left of a convolution)."""
    eqn, k = product.eqn, product.kernel
    params = eqn.params
    x_aval, w_aval = eqn.invars[1 - k].aval, eqn.invars[k].aval
    kernel_shape = tuple(w_aval.shape)
    extra = {name: params[name] for name in ("precision", "preferred_element_type")
             if name in params}
    if eqn.primitive.name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        if lb or rb:
            return None
        kc, xc = (rc, lc) if k == 1 else (lc, rc)
        kept = [d for d in range(len(kernel_shape)) if d not in kc]
        a_shape = tuple(kernel_shape[d] for d in kc) + (rank,)
        b_shape = (rank,) + tuple(kernel_shape[d] for d in kept)

        def first(x: jax.Array, a: jax.Array) -> jax.Array:
            return jax.lax.dot_general(x, a, ((tuple(xc), tuple(range(len(kc)))), ((), ())),
                                       **extra)
    else:
        lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
        if k != 1 or params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
            return None
        a_shape = tuple(rank if d == rhs_spec[0] else s for d, s in enumerate(kernel_shape))
        b_shape = (rank, kernel_shape[rhs_spec[0]])
        feature = out_spec[1]

        def first(x: jax.Array, a: jax.Array) -> jax.Array:
            t = eqn.primitive.bind(x, a, **params)
            return jnp.moveaxis(t, feature, -1)

    def run(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        t = first(x, a)
        return jax.lax.dot_general(t, b, (((t.ndim - 1,), (0,)), ((), ())), **extra)

    return run, [(tuple(x_aval.shape), x_aval.dtype), (a_shape, w_aval.dtype),
                 (b_shape, w_aval.dtype)]


def _matrix_of(product: _Product) -> tuple[int, int]:
    """``(m, n)`` of the kernel as this product contracts it (contracted axes, then the rest)."""
    eqn, k = product.eqn, product.kernel
    shape = eqn.invars[k].aval.shape
    if eqn.primitive.name == "dot_general":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        contracted = rc if k == 1 else lc
        m = math.prod(shape[d] for d in contracted)
    else:
        m = math.prod(shape) // shape[eqn.params["dimension_numbers"][1][0]]
    return m, math.prod(shape) // m


def _arrays(shapes: list[tuple], seed: int) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), dtype) for shape, dtype in shapes]


def _seconds(fn: Callable[..., Any], args: list[jax.Array], repeats: int) -> float:
    """Median wall time of a compiled ``fn(*args)`` over ``repeats`` calls, after one warm-up."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency(
    fn: Callable[..., Any],
    params: Any,
    *inputs: Any,
    ranks: CandidateRanks = None,
    filter: matrices.Filter | None = None,  # noqa: A002
    view: matrices.View = None,
    repeats: int = 10,
    margin: float = 0.1,
) -> LatencyTable:
    """Times each matrix's products in ``fn(params, *inputs)``, dense and factored (module docs).

    Args:
      fn: the dense forward pass, parameters first, e.g.
        ``lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)``.
      params: the parameter tree (LoRITa products and factor pairs are collapsed first).
      *inputs: inputs of the size the model will run at (the batch matters); they are traced,
        not run, and every product is timed on the device of the first one that is a
        ``jax.Array`` (the default device otherwise).
      ranks: the ranks to time (:data:`CandidateRanks`; :func:`candidate_ranks` by default).
      filter: which matrices to time (the default selection, :mod:`jaxlr.selection`).
      view: how each kernel is seen as a matrix; the factored timing runs the kernel's input
        axes first, as :mod:`jaxlr.inference` does.
      repeats: timed calls per product (median), at least 1.
      margin: the fraction of the time a rank must save to count as faster, in ``[0, 1)``.

    Returns:
      A :class:`LatencyTable` of every selected matrix that takes part in a product; matrices
      whose product cannot run factored (grouped convolutions, batched products) are timed
      dense only, so :meth:`LatencyTable.snap` keeps them dense.

    Raises:
      ValueError: for ``repeats`` or ``margin`` out of range, a rank below 1, or no rank.
      NotImplementedError: for a ``while`` loop in ``fn``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}.")
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin < 1:
        raise ValueError(f"margin must be a number in [0, 1), got {margin!r}.")
    if ranks is not None and not callable(ranks):
        fixed = tuple(ranks)
        if not fixed or any(isinstance(r, bool) or not isinstance(r, int | np.integer) or r < 1
                            for r in fixed):
            raise ValueError(f"ranks must be positive integers, at least one, got {fixed!r}.")
        ranks = lambda m, n, fixed=fixed: fixed  # noqa: E731
    choose = ranks or candidate_ranks
    params = nodes.collapse_tree(params)
    found = selection.matrix_leaves(params, filter=filter, view=view)
    jaxpr, tags, _ = _tagged_jaxpr(fn, params, *inputs)
    products: dict[str, list[tuple[_Product, int]]] = {}
    for eqn, owner, times in _products(jaxpr, tags, 1):
        if owner in found:
            kernel = 1 if tags.get(eqn.invars[1]) == owner else 0
            products.setdefault(owner, []).append((_Product(eqn, kernel), times))

    device = next(iter(jax.tree.leaves(inputs)), None)
    device = (next(iter(device.devices())) if isinstance(device, jax.Array)
              else jax.devices()[0])
    cache: dict[tuple, float | None] = {}

    def timed(product: _Product, rank: int | None) -> float | None:
        key = (product.signature(), rank)
        if key not in cache:
            if rank is None:
                shapes = [(tuple(v.aval.shape), v.aval.dtype) for v in product.eqn.invars]
                run = product.eqn.primitive.bind
                fn_ = lambda *args: run(*args, **product.eqn.params)  # noqa: E731
            else:
                made = _factored_fn(product, rank)
                if made is None:
                    cache[key] = None
                    return None
                fn_, shapes = made
            with jax.default_device(device):
                cache[key] = _seconds(fn_, _arrays(shapes, len(cache)), repeats)
        return cache[key]

    layers = {}
    for key, leaf in found.items():
        if key not in products:
            continue
        m, n = leaf.matrix_shape
        uses = products[key]
        dense = sum(times * timed(p, None) for p, times in uses)
        factorable = all(_factored_fn(p, 1) is not None and _matrix_of(p) == (m, n)
                         for p, _ in uses)
        factored = {}
        if factorable:
            for rank in sorted({int(r) for r in choose(m, n)}):
                if rank < 1:
                    raise ValueError(f"ranks must be positive integers, got {rank} for {key!r}.")
                if rank < leaf.full_rank and nodes.saves(rank, m, n):
                    factored[rank] = sum(times * timed(p, rank) for p, times in uses)
        layers[key] = LayerLatency((m, n), dense, factored, float(margin))
    return LatencyTable(layers, device.device_kind)
