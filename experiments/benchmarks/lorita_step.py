"""Benchmark: a LoRITa training step (N = 3) against the same network's plain step (N = 1).

The FCN of LoRITa's MNIST experiments, 784 - 1000 x 7 - 10 (ReLU), batch 128, Adam, jitted
steps (``jax.value_and_grad`` of the cross-entropy, then the optimizer's update), timed in this
process on the same batch:

* ``N = 1``: ``model.apply`` on the plain kernels, the baseline;
* ``N = 3, ordered``: ``jaxlr.apply`` on the factorized tree: each layer multiplies its factors
  into the kernel or applies them to the activations one after the other, whichever costs fewer
  multiply-accumulates (:func:`jaxlr.inference.product_order`);
* ``N = 3, collapsed``: ``model.apply`` on ``jaxlr.collapse`` of the tree (every factor
  multiplied into its kernel at every step), what the step did before.

``--model resnet20`` times the same three steps for the CIFAR ResNet-20 (batch 128 of 32 x 32 x 3,
BatchNorm in training mode), every kernel a product of N matrices, as LoRITa's CNN experiments
train it.

The arithmetic minimum of the ratio is the multiply-accumulates of the cheaper order over those of
the plain kernels, summed over the layers (the backward pass scales with the forward one). The
step also runs Adam on three times the parameters, which no multiplication order removes, so the
gradients alone (``jax.value_and_grad``) are timed as well.

Run::

    python -m experiments.benchmarks.lorita_step --repeats 20
    python -m experiments.benchmarks.lorita_step --repeats 10 --model resnet20
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

import jaxlr
from experiments.benchmarks import write_rows
from jaxlr.inference import product_cost, product_order


class FCN(nn.Module):
    """``inputs - width x hidden - classes``, ReLU."""

    width: int = 1000
    hidden: int = 7
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.hidden):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(self.classes)(x)


def _step(apply: Any, tx: optax.GradientTransformation | None) -> Any:
    """The jitted step: gradients and the optimizer's update, or (``tx=None``) the loss and
    gradients only."""
    def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    if tx is None:
        return jax.jit(lambda params, _, x, y: jax.value_and_grad(loss)(params, x, y))

    @jax.jit
    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def _median_seconds(step: Any, params: Any, opt_state: Any, x: Any, y: Any, repeats: int
                    ) -> float:
    for _ in range(2):
        jax.block_until_ready(step(params, opt_state, x, y))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, opt_state, x, y))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def minimum_ratio(params: Any, ftree: Any, rows: int | dict[str, int]) -> float:
    """MACs of the factorized layers in their cheaper order over those of the plain kernels.

    ``rows``: the rows each layer's product meets (batch x output positions), one number for
    every layer (the FCN) or ``{key: rows}``.
    """
    products = {jaxlr.matrices.path_key(path): node for path, node in
                jax.tree_util.tree_flatten_with_path(ftree, is_leaf=jaxlr.nodes.is_node)[0]
                if isinstance(node, jaxlr.Product)}
    plain = factored = 0
    for key, leaf in jaxlr.selection.matrix_leaves(params, filter="all").items():
        m, n = leaf.matrix_shape
        met = rows if isinstance(rows, int) else rows[key]
        plain += met * m * n
        shapes = [f.shape for f in products[key].factors]
        factored += product_cost(met, shapes, product_order(met, shapes))
    return factored / plain


def rows_met(fn: Any, params: Any, x: jax.Array) -> dict[str, int]:
    """``{key: rows}`` each kernel's product meets in ``fn(params, x)`` (its MACs over ``m n``)."""
    cost = jaxlr.forward_cost(fn, params, x, xla=False)
    return {key: cost.layers[key].macs // math.prod(leaf.matrix_shape)
            for key, leaf in jaxlr.selection.matrix_leaves(params, filter="all").items()}


def _network(name: str, width: int, batch: int) -> tuple[Any, jax.Array, jax.Array, Any]:
    """``(model, x, y, variables)``: the FCN or ResNet-20 with a batch of random data."""
    from experiments.models import CifarResNet  # noqa: PLC0415

    model = FCN(width) if name == "fcn" else CifarResNet(depth=20)
    shape = (batch, 784) if name == "fcn" else (batch, 32, 32, 3)
    x = jax.random.normal(jax.random.key(0), shape)
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    return model, x, y, model.init(jax.random.key(2), x[:1])


def _forward(model: Any, variables: Any, runner: Any) -> Any:
    """``(params, x) -> logits`` with ``runner`` (``model.apply`` or ``jaxlr.apply``); BatchNorm
    models run in training mode, their updated statistics dropped."""
    rest = {k: v for k, v in variables.items() if k != "params"}
    if not rest:
        return lambda p, v: runner(model, {"params": p}, v)
    return lambda p, v: runner(model, {**rest, "params": p}, v, train=True,
                               mutable=list(rest))[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=3, help="LoRITa's N")
    parser.add_argument("--model", choices=("fcn", "resnet20"), default="fcn")
    parser.add_argument("--json", help="also write the row to this file")
    args = parser.parse_args(argv)

    model, x, y, variables = _network(args.model, args.width, args.batch)
    params = variables["params"]
    ftree = jaxlr.lorita.factorize(params, args.depth, jax.random.key(3), filter="all")
    tx = optax.adam(1e-3)

    def plain_apply(m: Any, *a: Any, **k: Any) -> Any:
        return m.apply(*a, **k)

    def collapsed_apply(m: Any, variables: Any, *a: Any, **k: Any) -> Any:
        return m.apply({**variables, "params": jaxlr.collapse(variables["params"])}, *a, **k)

    plain_fn = _forward(model, variables, plain_apply)
    ordered_fn = _forward(model, variables, jaxlr.apply)
    plain = _step(plain_fn, tx)
    ordered = _step(ordered_fn, tx)
    collapsed = _step(_forward(model, variables, collapsed_apply), tx)
    grads = {"plain": _step(plain_fn, None), "ordered": _step(ordered_fn, None)}
    times = {}
    for _ in range(2):  # alternate, keep the better median of each
        for label, step, tree in (("plain", plain, params), ("ordered", ordered, ftree),
                                  ("collapsed", collapsed, ftree),
                                  ("plain_grad", grads["plain"], params),
                                  ("ordered_grad", grads["ordered"], ftree)):
            seconds = _median_seconds(step, tree, tx.init(tree), x, y, args.repeats)
            times[label] = min(times.get(label, np.inf), seconds)
    row = {
        "model": args.model, "width": args.width, "batch": args.batch, "depth": args.depth,
        "plain_ms": times["plain"] * 1e3, "ordered_ms": times["ordered"] * 1e3,
        "collapsed_ms": times["collapsed"] * 1e3,
        "ordered_ratio": times["ordered"] / times["plain"],
        "collapsed_ratio": times["collapsed"] / times["plain"],
        "plain_grad_ms": times["plain_grad"] * 1e3,
        "ordered_grad_ms": times["ordered_grad"] * 1e3,
        "ordered_grad_ratio": times["ordered_grad"] / times["plain_grad"],
        "minimum_ratio": minimum_ratio(params, ftree, rows_met(plain_fn, params, x)),
        "parameters": [sum(int(np.size(v)) for v in jax.tree.leaves(t)) for t in (params, ftree)],
    }
    row["ordered_over_minimum"] = row["ordered_ratio"] / row["minimum_ratio"]
    row["ordered_grad_over_minimum"] = row["ordered_grad_ratio"] / row["minimum_ratio"]
    print(json.dumps(row, indent=1))
    print(f"\njax {jax.__version__}, {platform.processor() or platform.machine()}, "
          f"{jax.devices()[0].device_kind}")
    print("| N | batch | what | N = 1 (ms) | ordered (ms) | ratio | collapsed (ms) | ratio | "
          "arithmetic minimum | ordered / minimum |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.depth} | {args.batch} | step (gradients + Adam) | {row['plain_ms']:.2f} | "
          f"{row['ordered_ms']:.2f} | {row['ordered_ratio']:.2f}x | {row['collapsed_ms']:.2f} | "
          f"{row['collapsed_ratio']:.2f}x | {row['minimum_ratio']:.2f}x | "
          f"{row['ordered_over_minimum']:.2f} |")
    print(f"| {args.depth} | {args.batch} | gradients only | {row['plain_grad_ms']:.2f} | "
          f"{row['ordered_grad_ms']:.2f} | {row['ordered_grad_ratio']:.2f}x | | | "
          f"{row['minimum_ratio']:.2f}x | {row['ordered_grad_over_minimum']:.2f} |")
    write_rows(args.json, [row])
    return row


if __name__ == "__main__":
    main()
