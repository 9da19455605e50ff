"""Benchmark: forward time of the dense truncated model against its factor pairs (jaxlr.inference).

For VGG-16 and ResNet-56 (CIFAR, 32 x 32, batch 128 by default) the ranks cut the
multiply-accumulates (ptflops' convention, :mod:`jaxlr.cost`) by the papers' figure (VGG-16 74%,
ResNet-56 55%), chosen one of three ways (``--choice``):

* ``uniform``: every convolution gets ``round(ratio * min(m, n))`` (rounded up to a multiple of
  ``--align``) for one ``ratio``, the largest that meets the target (bisection);
* ``latency``: the library's way, ``jaxlr.target_ranks(params, target, cost=...,
  latency=jaxlr.measure_latency(...))`` with its defaults (GSVT, ranks rounded up to those the
  measured table finds faster, layers that gain nothing left whole);
* ``fastest``: the bound of the measured table: the ranks (or dense) per layer that minimise the
  table's summed time under the same MAC target, whatever they cost in singular values (a
  Lagrangian search over the table's options): what no choice of these ranks can beat.

Layers where factoring does not save stay dense. The weights are He-normal, truncated by
:func:`jaxlr.compress` (timings do not depend on the values). Both forward passes are jitted,
warmed up, then timed alternately in this process; the speed-up is the ratio of medians, compared
with the goal ``0.7 x`` the FLOP-reduction factor ``1 / (1 - reduction)``.

Run::

    python -m experiments.benchmarks.lowrank_inference --repeats 10
    python -m experiments.benchmarks.lowrank_inference --model vgg16 --batch 128 --align 8
    python -m experiments.benchmarks.lowrank_inference --choice latency --choice fastest
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

import jaxlr
from experiments.models import VGG, CifarResNet

MODELS = {
    "vgg16": (lambda: VGG(depth=16), 0.74),
    "resnet56": (lambda: CifarResNet(depth=56), 0.55),
}


def conv_ranks(cost: jaxlr.ForwardCost, leaves: dict, ratio: float, align: int) -> jaxlr.Ranks:
    """``round(ratio * min(m, n))`` (rounded up to a multiple of ``align``) per convolution."""
    convs = {name: leaf for name, leaf in leaves.items()
             if len(leaf.shape) == 4 and name in cost.layers}
    ranks = {name: max(1, round(ratio * leaf.full_rank)) for name, leaf in convs.items()}
    full = {name: leaf.full_rank for name, leaf in convs.items()}
    return jaxlr.Ranks(ranks, full).rounded_up(align)


def predicted_macs(cost: jaxlr.ForwardCost, leaves: dict, ranks: dict[str, int]) -> int:
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


def fastest_ranks(table: jaxlr.LatencyTable, cost: jaxlr.ForwardCost, leaves: dict,
                  target: float) -> jaxlr.Ranks:
    """The options of ``table`` (dense or a timed rank, per layer) with the least summed time
    whose MACs drop by at least ``target``: each layer minimises ``seconds + price * MACs`` for
    one price, the smallest (bisected on a log scale) that meets the target."""
    options = {}
    for name, layer in table.layers.items():
        macs = cost.layers[name].macs
        m, n = layer.matrix_shape
        options[name] = [(layer.dense, macs, layer.full_rank)] + [
            (seconds, macs * r * (m + n) // (m * n), r) for r, seconds in layer.factored.items()]

    def pick(price: float) -> dict[str, int]:
        return {name: min(opts, key=lambda o: o[0] + price * o[1])[2]
                for name, opts in options.items()}

    def meets(ranks: dict[str, int]) -> bool:
        return 1 - predicted_macs(cost, leaves, ranks) / cost.macs >= target

    low, high = -30.0, 2.0  # log10 of the price of a multiply-accumulate, in seconds
    if not meets(pick(10.0**high)):
        raise ValueError(f"no timed ranks cut {target:.0%} of the MACs.")
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (low, middle) if meets(pick(10.0**middle)) else (middle, high)
    ranks = pick(10.0**high)
    return jaxlr.Ranks(ranks, {name: table.layers[name].full_rank for name in ranks})


def _time(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench(name: str, batch: int, repeats: int, align: int = 1, seed: int = 0,
          choice: str = "uniform", latency_repeats: int = 10) -> dict[str, Any]:
    """Builds, compresses and times one network; returns a row of figures."""
    make, target = MODELS[name]
    model = make()
    one = jnp.ones((1, 32, 32, 3))
    variables = model.init(jax.random.key(seed), one)
    others = {k: v for k, v in variables.items() if k != "params"}

    def dense_fn(params, x):
        return model.apply({**others, "params": params}, x)

    def factored_fn(params, x):
        return jaxlr.apply(model, {**others, "params": params}, x)

    params = variables["params"]
    x = jax.random.normal(jax.random.key(seed + 1), (batch, 32, 32, 3))
    dense_cost = jaxlr.forward_cost(dense_fn, params, one, xla=False)
    leaves = jaxlr.matrix_leaves(params)
    ratio, table, measure_s = None, None, None
    if choice == "uniform":
        ratio, ranks = ratio_for_reduction(dense_cost, leaves, target, align)
    else:
        start = time.perf_counter()
        table = jaxlr.measure_latency(dense_fn, params, x, filter="conv",
                                      repeats=latency_repeats)
        measure_s = time.perf_counter() - start
        if choice == "latency":
            ranks = jaxlr.target_ranks(params, target, cost=dense_cost, filter="conv",
                                       latency=table)
        else:
            ranks = fastest_ranks(table, dense_cost, leaves, target)
    factored_params = jaxlr.compress(params, ranks).compressed
    truncated = jaxlr.collapse(factored_params)
    dense_cost = jaxlr.forward_cost(dense_fn, truncated, one)
    factored_cost = jaxlr.forward_cost(factored_fn, factored_params, one)
    reduction = 1 - factored_cost.macs / dense_cost.macs

    dense_jit, factored_jit = jax.jit(dense_fn), jax.jit(factored_fn)
    error = float(
        jnp.linalg.norm(factored_jit(factored_params, x) - dense_jit(truncated, x))
        / jnp.linalg.norm(dense_jit(truncated, x))
    )
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
        "choice": choice,
        "ratio": None if ratio is None else round(ratio, 4),
        "align": align,
        "factored_layers": sum(isinstance(n, jaxlr.LowRank) for n in jax.tree.leaves(
            factored_params, is_leaf=jaxlr.nodes.is_node)),
        "ranked_layers": len(ranks),
        "ranks": dict(sorted(collections.Counter(  # "full rank -> rank": layers
            f"{ranks.full[key]} -> {rank}" for key, rank in ranks.items()).items())),
        "retained": round(jaxlr.retained_fraction(ranks), 4),
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
    if table is not None:
        row.update(measure_latency_s=round(measure_s, 1),
                   table_speedup=round(table.seconds() / table.seconds(ranks), 3))
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), action="append")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--align", type=int, default=1, help="round ranks up to a multiple")
    parser.add_argument("--choice", choices=("uniform", "latency", "fastest"), action="append",
                        help="how the ranks are chosen (module docs); repeatable")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.align < 1:
        parser.error("--batch, --repeats and --align must be at least 1")
    device = jax.devices()[0]
    print(f"# {platform.processor() or platform.machine()}, {device.platform} "
          f"({device.device_kind}), jax {jax.__version__}")
    rows = []
    for name in args.model or sorted(MODELS):
        for choice in args.choice or ["uniform"]:
            row = bench(name, args.batch, args.repeats, args.align, choice=choice)
            rows.append(row)
            print(json.dumps(row))
    header = ("model", "ranks", "retained", "MACs before", "after", "drop", "dense s",
              "factored s", "speed-up", "goal")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        how = row["choice"] + (f" (align {row['align']})" if row["choice"] == "uniform" else "")
        print(f"| {row['model']} | {how} | {row['retained']:.1%} | "
              f"{row['macs_before'] / 1e6:.1f}M | {row['macs_after'] / 1e6:.1f}M"
              f" | {row['mac_reduction']:.1%} | {row['dense_s']:.3f} | {row['factored_s']:.3f} | "
              f"{row['speedup']:.2f}x | {row['goal']:.2f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(device), "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
