"""Benchmark: forward time of the dense truncated model against its factor pairs (jaxlr.inference).

For VGG-16 and ResNet-56 (CIFAR, 32 x 32, batch 128 by default) the ranks cut the
multiply-accumulates (ptflops' convention, :mod:`jaxlr.cost`) by the papers' figure (VGG-16 74%,
ResNet-56 55%), chosen one of four ways (``--choice``):

* ``uniform``: every convolution gets ``round(ratio * min(m, n))`` (rounded up to a multiple of
  ``--align``) for one ``ratio``, the largest that meets the target (bisection);
* ``latency``: the library's way, ``jaxlr.target_ranks(params, target, cost=...,
  latency=jaxlr.measure_latency(...))`` with its defaults (GSVT, ranks rounded up to those the
  measured table finds faster, layers that gain nothing left whole);
* ``fastest``: the bound of the measured table: the ranks (or dense) per layer that minimise the
  table's summed time under the same MAC target, whatever they cost in singular values (a
  knapsack over the table's options, :func:`fastest_ranks`): what no choice of these ranks can
  beat;
* ``fastest-at-target``: the same, among the choices that cut the MACs by the target and at most
  ``--band`` more (one point by default): the bound for the reduction the goal is stated at, since
  the goal (``0.7 x`` the FLOP factor) grows with the reduction.

Layers where factoring does not save stay dense. The weights are He-normal, truncated by
:func:`jaxlr.compress` (timings do not depend on the values). Both forward passes are jitted,
warmed up, then timed alternately in this process; the speed-up is the ratio of medians, compared
with the goal ``0.7 x`` the FLOP-reduction factor ``1 / (1 - reduction)``.

The choices of one model share one measured table (``jaxlr.measure_latency``), printed per layer
product (matrix shape and input). Each row also gives the table's prediction of the whole pass:
the dense pass's measured time with the table's layer times replaced by those of the chosen
ranks, the rest of the pass (normalisation, activations, residual adds) unchanged. ``--chunk``
runs both passes over micro-batches (``jax.lax.map``) and measures the table on one; ``--dtype
bfloat16`` runs both in bfloat16 (parameters and images).

Run::

    python -m experiments.benchmarks.lowrank_inference --repeats 10
    python -m experiments.benchmarks.lowrank_inference --model vgg16 --batch 128 --align 8
    python -m experiments.benchmarks.lowrank_inference --choice latency --choice fastest-at-target
    python -m experiments.benchmarks.lowrank_inference --model resnet56 --chunk 16 --choice latency
    python -m experiments.benchmarks.lowrank_inference --batch 1024 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxlr
from experiments.benchmarks import machine_line, write_rows
from experiments.models import VGG, CifarResNet

DTYPES = ("float32", "bfloat16")
MODELS = {
    "vgg16": (lambda: VGG(depth=16), 0.74),
    "resnet56": (lambda: CifarResNet(depth=56), 0.55),
}


def conv_ranks(cost: jaxlr.cost.ForwardCost, leaves: dict, ratio: float, align: int) -> jaxlr.Ranks:
    """``round(ratio * min(m, n))`` (rounded up to a multiple of ``align``) per convolution."""
    convs = {name: leaf for name, leaf in leaves.items()
             if len(leaf.shape) == 4 and name in cost.layers}
    ranks = {name: max(1, round(ratio * leaf.full_rank)) for name, leaf in convs.items()}
    full = {name: leaf.full_rank for name, leaf in convs.items()}
    return jaxlr.Ranks(ranks, full).rounded_up(align)


def predicted_macs(cost: jaxlr.cost.ForwardCost, leaves: dict, ranks: dict[str, int]) -> int:
    """Multiply-accumulates after factoring, from the dense per-layer counts."""
    total = cost.other_macs
    for name, layer in cost.layers.items():
        m, n = leaves[name].matrix_shape if name in leaves else (1, 1)
        r = ranks.get(name)
        saves = r is not None and jaxlr.nodes.saves(r, m, n)
        total += layer.macs * r * (m + n) // (m * n) if saves else layer.macs
    return total


def ratio_for_reduction(cost, leaves, target: float, align: int) -> tuple[float, jaxlr.Ranks]:
    """The largest uniform ratio whose ranks still cut the MACs by at least ``target``."""
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        reduction = 1 - predicted_macs(cost, leaves, conv_ranks(cost, leaves, middle, align)) / (
            cost.macs
        )
        low, high = (middle, high) if reduction >= target else (low, middle)
    return low, conv_ranks(cost, leaves, low, align)


def fastest_ranks(table: jaxlr.latency.LatencyTable, cost: jaxlr.cost.ForwardCost, target: float,
                  band: float | None = None, units: int = 20_000) -> jaxlr.Ranks:
    """The options of ``table`` (dense or a timed rank, per layer) with the least summed time
    whose MAC reduction lies between ``target`` and ``target + band`` (no upper limit for
    ``band=None``).

    A knapsack over the layers: the MACs are counted in ``units`` steps of the dense total (exact
    when the total is smaller), and per reachable count the fastest combination is kept.
    """
    total = cost.macs
    unit = max(1, total // units)
    budget = total * (1 - target) - cost.other_macs   # the layers' MACs may not exceed this
    floor = -math.inf if band is None else total * (1 - target - band) - cost.other_macs
    names, choices = list(table.layers), []
    for name in names:
        layer = table.layers[name]
        macs, (m, n) = cost.layers[name].macs, layer.matrix_shape
        choices.append([(layer.dense, macs, layer.full_rank)] + [
            (seconds, macs * r * (m + n) // (m * n), r)
            for r, seconds in sorted(layer.factored.items())])
    size = sum(max(round(macs / unit) for _, macs, _ in options) for options in choices) + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    picks = []
    for options in choices:  # best[k]: the least time of the layers so far with k units of MACs
        candidates = np.full((len(options), size), np.inf)
        for i, (seconds, macs, _) in enumerate(options):
            shift = round(macs / unit)
            candidates[i, shift:] = best[:size - shift] + seconds
        picks.append(candidates.argmin(0))
        best = candidates.min(0)
    counts = np.arange(size) * unit
    allowed = (counts <= budget + unit / 2) & (counts >= floor - unit / 2) & np.isfinite(best)
    if not allowed.any():
        raise ValueError(f"no combination of timed ranks cuts the MACs by {target:.0%}"
                         + ("" if band is None else f" to {target + band:.0%}") + ".")
    k = int(np.flatnonzero(allowed)[best[allowed].argmin()])
    ranks = {}
    for name, options, pick in zip(reversed(names), reversed(choices), reversed(picks),
                                   strict=True):
        seconds, macs, rank = options[pick[k]]
        ranks[name] = rank
        k -= round(macs / unit)
    return jaxlr.Ranks({name: ranks[name] for name in names},
                       {name: table.layers[name].full_rank for name in names})


def _time(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench(name: str, batch: int, repeats: int, align: int = 1, seed: int = 0,
          choice: str = "uniform", latency_repeats: int = 10, band: float = 0.01,
          table: jaxlr.latency.LatencyTable | None = None, chunk: int | None = None,
          dtype: str = "float32") -> tuple[dict[str, Any], jaxlr.latency.LatencyTable | None]:
    """Builds, compresses and times one network; returns a row of figures and the latency table.

    ``table`` (measured here when a choice needs one and none is given) lets the choices of one
    model share one measurement. With ``chunk``, both passes run over the batch in micro-batches
    of ``chunk`` images, one after the other (``jax.lax.map``), and the table is measured on one
    micro-batch. ``dtype`` (``"float32"`` or ``"bfloat16"``) is that of the parameters and the
    images, so both passes compute in it (the BatchNorm statistics stay in float32)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    if chunk is not None and (chunk < 1 or batch % chunk):
        raise ValueError(f"chunk must divide the batch ({batch}), got {chunk}.")
    make, target = MODELS[name]
    model = make()
    one = jnp.ones((1, 32, 32, 3), dtype)
    variables = model.init(jax.random.key(seed), one)
    others = {k: v for k, v in variables.items() if k != "params"}

    def dense_fn(params, x):
        return model.apply({**others, "params": params}, x)

    def factored_fn(params, x):
        return jaxlr.apply(model, {**others, "params": params}, x)

    def chunked(fn):
        def run(params, x):
            batches = x.reshape(-1, chunk, *x.shape[1:])
            return jax.lax.map(lambda b: fn(params, b), batches).reshape(x.shape[0], -1)
        return fn if chunk is None else run

    params = jax.tree.map(lambda p: p.astype(dtype), variables["params"])
    x = jax.random.normal(jax.random.key(seed + 1), (batch, 32, 32, 3), dtype)
    dense_cost = jaxlr.forward_cost(dense_fn, params, one, xla=False)
    leaves = jaxlr.selection.matrix_leaves(params, filter="all")
    ratio, measure_s = None, None
    if choice == "uniform":
        ratio, ranks = ratio_for_reduction(dense_cost, leaves, target, align)
    else:
        if table is None:
            start = time.perf_counter()
            table = jaxlr.measure_latency(dense_fn, params, x[:chunk], filter="conv",
                                          repeats=latency_repeats)
            measure_s = time.perf_counter() - start
        if choice == "latency":
            ranks = jaxlr.target_ranks(params, reduction=target, cost=dense_cost, filter="conv",
                                       latency=table)
        else:
            ranks = fastest_ranks(table, dense_cost, target,
                                  band if choice == "fastest-at-target" else None)
    factored_params = jaxlr.compress(params, ranks).compressed
    truncated = jaxlr.collapse(factored_params)
    dense_cost = jaxlr.forward_cost(dense_fn, truncated, one)
    factored_cost = jaxlr.forward_cost(factored_fn, factored_params, one)
    reduction = 1 - factored_cost.macs / dense_cost.macs

    dense_jit, factored_jit = jax.jit(chunked(dense_fn)), jax.jit(chunked(factored_fn))
    reference = dense_jit(truncated, x).astype(jnp.float32)
    error = float(jnp.linalg.norm(factored_jit(factored_params, x).astype(jnp.float32) - reference)
                  / jnp.linalg.norm(reference))
    for _ in range(2):  # warm-up
        _time(dense_jit, truncated, x)
        _time(factored_jit, factored_params, x)
    dense_times, factored_times = [], []
    for _ in range(repeats):
        dense_times.append(_time(dense_jit, truncated, x))
        factored_times.append(_time(factored_jit, factored_params, x))
    dense_s, factored_s = statistics.median(dense_times), statistics.median(factored_times)
    factor = 1 / (1 - reduction)
    row = {
        "model": name,
        "batch": batch,
        "dtype": dtype,
        "chunk": chunk,
        "choice": choice,
        "ratio": None if ratio is None else round(ratio, 4),
        "align": align,
        "factored_layers": sum(isinstance(n, jaxlr.LowRank) for n in jax.tree.leaves(
            factored_params, is_leaf=jaxlr.nodes.is_node)),
        "ranked_layers": len(ranks),
        "ranks": dict(sorted(collections.Counter(  # "full rank -> rank": layers
            f"{ranks.full[key]} -> {rank}" for key, rank in ranks.items()).items())),
        "retained": round(jaxlr.policies.retained_fraction(ranks), 4),
        "params_before": dense_cost.params,
        "params_after": factored_cost.params,
        "macs_before": dense_cost.macs,
        "macs_after": factored_cost.macs,
        "mac_reduction": round(reduction, 4),
        "xla_flop_reduction": round(1 - factored_cost.xla_flops / dense_cost.xla_flops, 4),
        "flop_factor": round(factor, 3),
        "dense_s": round(dense_s, 4),
        "factored_s": round(factored_s, 4),
        "speedup": round(dense_s / factored_s, 3),
        "goal": round(0.7 * factor, 3),
        "speedup_over_flop_factor": round(dense_s / factored_s / factor, 3),
        "max_rel_output_error": error,
    }
    if choice != "uniform":
        # What the table says of the whole pass if the time it does not account for (the rest
        # of the dense pass: normalisation, activations, residual adds, layers in context) stays
        # as it is; no prediction where the layers alone take longer than the whole pass.
        passes = 1 if chunk is None else batch // chunk
        rest = dense_s - table.seconds() * passes
        predicted = dense_s / (table.seconds(ranks) * passes + rest) if rest >= 0 else None
        row.update(measure_latency_s=measure_s and round(measure_s, 1),
                   table_speedup=round(table.seconds() / table.seconds(ranks), 3),
                   rest_s=round(rest, 4),
                   predicted_speedup=predicted and round(predicted, 3),
                   table=by_shape(table))
    return row, table


def by_shape(table: jaxlr.latency.LatencyTable) -> list[dict[str, Any]]:
    """The measured table, one entry per distinct measurement (layers with the same product, the
    same matrix shape on the same input, are timed once): the matrix shape, the number of layers,
    the dense time and the time per timed rank, in milliseconds, in tree order."""
    entries: dict[Any, dict[str, Any]] = {}
    for layer in table.layers.values():
        key = (layer.matrix_shape, layer.dense, tuple(sorted(layer.factored.items())))
        if key in entries:
            entries[key]["layers"] += 1
        else:
            entries[key] = {
                "shape": "{} x {}".format(*layer.matrix_shape), "layers": 1,
                "dense_ms": round(layer.dense * 1e3, 3),
                "factored_ms": {r: round(t * 1e3, 3) for r, t in sorted(layer.factored.items())}}
    return list(entries.values())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--align", type=int, default=1, help="round ranks up to a multiple")
    parser.add_argument("--choice", action="append",
                        choices=("uniform", "latency", "fastest", "fastest-at-target"),
                        help="how the ranks are chosen (module docs); repeatable")
    parser.add_argument("--band", type=float, default=0.01,
                        help="fastest-at-target: the most the reduction may exceed the target")
    parser.add_argument("--chunk", type=int,
                        help="run both passes over micro-batches of this many images")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="of the parameters and images, so of both passes")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.align < 1:
        parser.error("--batch, --repeats and --align must be at least 1")
    if args.chunk is not None and (args.chunk < 1 or args.batch % args.chunk):
        parser.error(f"--chunk must divide --batch ({args.batch}), got {args.chunk}")
    if not 0 < args.band < 1:
        parser.error(f"--band must be in (0, 1), got {args.band}")
    print(machine_line())
    rows = []
    for name in args.model or sorted(MODELS):
        table = None  # measured by the first choice that needs it, shared by the others
        for choice in args.choice or ["uniform"]:
            row, table = bench(name, args.batch, args.repeats, args.align, choice=choice,
                               band=args.band, table=table, chunk=args.chunk,
                               dtype=args.dtype)
            rows.append(row)
            print(json.dumps(row))
    header = ("model", "ranks", "retained", "MACs before", "after", "drop", "dense s",
              "factored s", "speed-up", "table's prediction", "goal")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        how = row["choice"] + (f" (align {row['align']})" if row["choice"] == "uniform" else "")
        predicted = row.get("predicted_speedup")
        predicted = "" if predicted is None else f"{predicted:.2f}x"
        print(f"| {row['model']} | {how} | {row['retained']:.1%} | "
              f"{row['macs_before'] / 1e6:.1f}M | {row['macs_after'] / 1e6:.1f}M"
              f" | {row['mac_reduction']:.1%} | {row['dense_s']:.3f} | {row['factored_s']:.3f} | "
              f"{row['speedup']:.2f}x | {predicted} | {row['goal']:.2f}x |")
    for row in rows:  # the measured table, once per model
        if "table" in row and row is next(r for r in rows if r["model"] == row["model"]
                                          and "table" in r):
            print(f"\n{row['model']}: measured layer times (ms), per layer product")
            print("| m x n | layers | dense | factored, per rank |\n|---|---|---|---|")
            for entry in row["table"]:
                ranks = ", ".join(f"{r}: {ms:.2f}" for r, ms in entry["factored_ms"].items())
                print(f"| {entry['shape']} | {entry['layers']} | {entry['dense_ms']:.2f} | "
                      f"{ranks} |")
    write_rows(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
