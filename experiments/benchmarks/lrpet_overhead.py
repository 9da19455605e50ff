"""Benchmark: what LRPET's projection adds to an epoch of training, at the paper's cadence.

The training step of the experiments (:func:`experiments.train.make_step`: cross-entropy,
``jax.value_and_grad``, BatchNorm in training mode, the papers' SGD with momentum and coupled
weight decay) of the CIFAR ResNet-56 and VGG-16, batch 128 of 32 x 32 x 3, three ways, timed in
this process on the same batch, in rounds of one call of each in a shuffled order
(:func:`alternating_medians`):

* ``SGD``: the optimizer without projection, the baseline;
* ``LRPET``: the same chain ending in :func:`jaxlr.low_rank_projection` (``prune``, energy transfer
  and BN rectification, ``every`` = the steps of a CIFAR epoch, 50,000 // batch = 390), timed in
  the three states an epoch goes through: a step that does not project (``count`` 0), the step
  that projects (``count = every - 1``) and the step after it, which checks that the projection
  was kept (``pending``);
* ``every step``: projection at every update (``every=1``), the TRP-style baseline the LRPET paper
  compares against (+371% there).

An epoch of ``S`` steps at the paper's cadence is ``S - 2`` steps that do not project, one that
projects and one that checks, so LRPET adds to an epoch of SGD steps of ``t_sgd`` seconds::

    overhead = ((S - 2) (t_off - t_sgd) + (t_project - t_sgd) + (t_check - t_sgd)) / (S t_sgd)

(:func:`epoch_overhead`), of which the projection itself is ``(t_project + t_check - 2 t_off) /
(S t_sgd)`` and the bookkeeping of the other steps (a step counter and a ``cond``) the rest.
Whole steps of about a second (CPU) differ by more than the projection from one call to the next,
so the differences are taken on the optimizer's update alone (the same jitted ``update`` on the
step's gradients, in each state; at least 100 rounds), over the whole SGD step: the figures the
goal (<= 1% per epoch) is judged on. Projecting at every step costs ``(u_every - u_sgd) / t_sgd``
per step. The whole steps are timed as well, as a check (``off_ratio``, ``every_step_ratio``).

``--direct`` also runs one whole epoch of each (``S`` steps, the state carried, every step
dispatched before the last returns) and reports its ratio; on a CPU that takes minutes per model.

Run::

    python -m experiments.benchmarks.lrpet_overhead --repeats 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlr
from experiments import models
from experiments.benchmarks import machine_line, write_rows
from experiments.train import Task, make_step, new_state, step_decay_sgd

MODELS = ("resnet56", "vgg16")  # experiments.models.create names
CIFAR_TRAIN = 50_000
UPDATE_ROUNDS = 100  # the updates take milliseconds: many rounds for their small differences


def epoch_overhead(sgd_step_s: float, sgd_s: float, off_s: float, project_s: float,
                   check_s: float, steps: int) -> float:
    """What LRPET adds to an epoch of ``steps`` SGD steps of ``sgd_step_s`` seconds, as a fraction
    of it.

    ``sgd_s``, ``off_s``, ``project_s`` and ``check_s`` time the same work (whole steps, or the
    optimizer's update alone) without projection, and with LRPET on a step that does not project,
    on the step that projects and on the step after it, which checks the projection; an epoch
    has one of each of the last two and ``steps - 2`` of the others.

    Example:
      >>> # updates of 2 ms (SGD), 2.5 ms, 9 ms and 3 ms (LRPET) in an epoch of 100 steps of 1 s
      >>> round(epoch_overhead(1.0, 0.002, 0.0025, 0.009, 0.003, 100), 8)  # (98 x 0.5 + 7 + 1) ms
      0.00057
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (a projecting step and the one after), got {steps}.")
    if sgd_step_s <= 0:
        raise ValueError(f"sgd_step_s must be > 0, got {sgd_step_s}.")
    extra = (steps - 2) * (off_s - sgd_s) + (project_s - sgd_s) + (check_s - sgd_s)
    return extra / (steps * sgd_step_s)


def at_count(opt_state: Any, count: int, pending: bool) -> Any:
    """``opt_state`` with every :class:`jaxlr.projection.LowRankProjectionState` in it at update
    ``count``,
    its ``pending`` flag (a projection to check at the next update) set to ``pending``."""
    def move(node: Any) -> Any:
        if _is_state(node):
            return node._replace(count=jnp.asarray(count, node.count.dtype),
                                 pending=jnp.asarray(pending))
        return node

    if not projection_states(opt_state):
        raise ValueError("opt_state holds no LowRankProjectionState.")
    return jax.tree.map(move, opt_state, is_leaf=_is_state)


def projection_states(opt_state: Any) -> list[jaxlr.projection.LowRankProjectionState]:
    """Every :class:`jaxlr.projection.LowRankProjectionState` in ``opt_state``."""
    return [n for n in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(n)]


def _is_state(node: Any) -> bool:
    return isinstance(node, jaxlr.projection.LowRankProjectionState)


def alternating_medians(runs: dict[str, Callable[[], Any]], repeats: int,
                        seed: int = 0) -> dict[str, float]:
    """The median time of each of ``runs`` over ``repeats`` rounds, each round calling every run
    once, in an order shuffled per round: a drift of the machine's speed then falls on every run
    alike, and so does the cost of following a run that leaves the caches cold (a projection of
    VGG-16 evicts everything an SGD update would find there). The runs must be warm (compiled)
    and block until their results are ready."""
    if repeats < 1 or not runs:
        raise ValueError(f"need repeats >= 1 and at least one run, got {repeats} and {list(runs)}.")
    order = random.Random(seed)
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def _tasks(model: Any, ranks: Any, pairs: dict[str, str], every: int) -> dict[str, Task]:
    options = jaxlr.ProjectionOptions(bn_pairs=pairs)

    def sgd() -> optax.GradientTransformation:
        return step_decay_sgd(0.1, 5e-4, 200 * every)

    return {
        "sgd": Task(model, sgd()),
        "lrpet": Task(model, jaxlr.with_low_rank_projection(sgd(), ranks=ranks, every=every,
                                                            options=options)),
        "every_step": Task(model, jaxlr.with_low_rank_projection(sgd(), ranks=ranks, every=1,
                                                                 options=options)),
    }


def _update_fn(task: Task) -> Callable[..., Any]:
    tx = optax.with_extra_args_support(task.optimizer)
    return jax.jit(lambda grads, opt_state, params, stats: tx.update(
        grads, opt_state, params, batch_stats=stats))


def bench(name: str, batch: int = 128, repeats: int = 10, prune: float = 0.6,
          steps_per_epoch: int | None = None, direct: bool = False,
          model: Any = None, image_shape: tuple[int, ...] = (32, 32, 3)) -> dict[str, Any]:
    """One model's row (``model`` overrides the CIFAR model ``name`` names, for tests)."""
    every = steps_per_epoch or CIFAR_TRAIN // batch
    model = model if model is not None else models.create(name)
    x = jax.random.normal(jax.random.key(0), (batch, *image_shape))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    variables = jax.jit(model.init, static_argnames="train")(jax.random.key(2), x[:1],
                                                            train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    ranks = jaxlr.lsvt_ranks(params, prune=prune, filter="conv")
    pairs = jaxlr.find_bn_pairs(model, variables, x[:1], train=True)
    tasks = _tasks(model, ranks, pairs, every)
    steps = {key: make_step(task, jax.random.key(3)) for key, task in tasks.items()}
    fresh = {key: new_state(task, params, stats)
             for key, task in tasks.items()}
    lrpet = fresh["lrpet"]
    states = {  # (step, state): the states an epoch's steps start from
        "sgd": (steps["sgd"], fresh["sgd"]),
        "off": (steps["lrpet"], lrpet),
        "project": (steps["lrpet"], lrpet.replace(
            opt_state=at_count(lrpet.opt_state, every - 1, False))),
        "check": (steps["lrpet"], lrpet.replace(
            opt_state=at_count(lrpet.opt_state, every, True))),
        "every_step": (steps["every_step"], fresh["every_step"].replace(
            opt_state=at_count(fresh["every_step"].opt_state, 0, True))),
    }
    # The gradients of one step, for the update-only timings (one jitted update per optimizer).
    grads = jax.jit(jax.grad(lambda p: _loss(model, p, stats, x, y)))(params)
    by_task = {key: _update_fn(task) for key, task in tasks.items()}
    updates = {key: by_task[key if key in tasks else "lrpet"] for key in states}

    def whole(key: str) -> Callable[[], Any]:
        step, state = states[key]
        return lambda: jax.block_until_ready(step(state, x, y))

    def update(key: str) -> Callable[[], Any]:
        state = states[key][1]
        fn = updates[key]
        return lambda: jax.block_until_ready(fn(grads, state.opt_state, params, stats))

    threads = jaxlr.threads.lapack_threads(1) if jax.default_backend() == "cpu" else \
        contextlib.nullcontext()
    with threads:
        compiled = time.perf_counter()
        for key in states:
            whole(key)()
            whole(key)()
        for key in updates:
            update(key)()
            update(key)()
        compiled = time.perf_counter() - compiled
        step_s = alternating_medians({key: whole(key) for key in states}, repeats)
        update_s = alternating_medians({key: update(key) for key in updates},
                                       max(repeats, UPDATE_ROUNDS))
        epoch = _direct(steps, fresh, x, y, every) if direct else None

    sgd, u = step_s["sgd"], update_s
    row = {
        "model": name, "batch": batch, "prune": prune, "steps_per_epoch": every,
        "projected": len(ranks), "warmup_s": compiled,
        "step_s": step_s, "update_s": update_s,
        "overhead": epoch_overhead(sgd, u["sgd"], u["off"], u["project"], u["check"], every),
        "projection_overhead": epoch_overhead(sgd, u["off"], u["off"], u["project"], u["check"],
                                              every),
        "every_step_overhead": (u["every_step"] - u["sgd"]) / sgd,
        "off_ratio": step_s["off"] / sgd,
        "every_step_ratio": step_s["every_step"] / sgd,
        "step_overhead": epoch_overhead(sgd, sgd, step_s["off"], step_s["project"],
                                        step_s["check"], every),
    }
    if epoch is not None:
        row["epoch_s"] = epoch
        row["epoch_ratio"] = epoch["lrpet"] / epoch["sgd"]
    return row


def _loss(model: Any, params: Any, stats: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    variables = {"params": params, **({"batch_stats": stats} if stats else {})}
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _direct(steps: dict[str, Any], fresh: dict[str, jaxlr.TrainState], x: jax.Array, y: jax.Array,
            every: int) -> dict[str, float]:
    """Seconds of one whole epoch (``every`` steps, the state carried) of SGD and of LRPET."""
    seconds = {}
    for key in ("sgd", "lrpet"):
        state = fresh[key]
        start = time.perf_counter()
        for _ in range(every):
            state, *_ = steps[key](state, x, y)
        jax.block_until_ready(state)
        seconds[key] = time.perf_counter() - start
        if key == "lrpet":  # the epoch's last update projected: every kernel is at its rank
            if not bool(projection_states(state.opt_state)[0].pending):
                raise RuntimeError("the LRPET epoch ended without a projection.")
    return seconds


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, action="append")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prune", type=float, default=0.6, help="LRPET's pruning ratio p")
    parser.add_argument("--steps-per-epoch", type=int,
                        help="the cadence (default: 50,000 CIFAR images // batch)")
    parser.add_argument("--direct", action="store_true",
                        help="also time one whole epoch of SGD and of LRPET")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 2:
        parser.error(f"--steps-per-epoch must be at least 2, got {args.steps_per_epoch}")
    if not 0 <= args.prune < 1:
        parser.error(f"--prune must be in [0, 1), got {args.prune}")
    print(machine_line())
    rows = []
    for name in args.model or MODELS:
        row = bench(name, args.batch, args.repeats, args.prune, args.steps_per_epoch, args.direct)
        rows.append(row)
        print(json.dumps(row))
    header = ("model", "steps / epoch", "SGD step (s)", "update, SGD / LRPET off / projecting / "
              "after (ms)", "LRPET per epoch", "of which projection", "every step, per step",
              "whole steps: LRPET off / SGD", "every step / SGD", "whole epoch: LRPET / SGD")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        u = row["update_s"]
        direct = f"{row['epoch_ratio']:.4f}" if "epoch_ratio" in row else ""
        print(f"| {row['model']} | {row['steps_per_epoch']} | {row['step_s']['sgd']:.3f} | "
              f"{u['sgd'] * 1e3:.2f} / {u['off'] * 1e3:.2f} / {u['project'] * 1e3:.2f} / "
              f"{u['check'] * 1e3:.2f} | {row['overhead']:+.4%} | "
              f"{row['projection_overhead']:+.4%} | {row['every_step_overhead']:+.2%} | "
              f"{row['off_ratio']:.3f}x | {row['every_step_ratio']:.3f}x | {direct} |")
    write_rows(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
