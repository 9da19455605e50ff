"""Benchmark: what data-aware compression costs against plain compression, and what a sweep saves.

On one trained-shape model (random weights: the time does not depend on their values), in this
process:

* ``plain``: ``jaxlr.compress(params, ranks)`` (GSVT ranks at ``--keep``), the baseline;
* ``calibrate``: ``jaxlr.calibrate`` over ``--batches`` batches of ``--batch`` inputs;
* ``data-aware``: ``jaxlr.compress(params, ranks, calibration=...)``;
* ``sweep``: five budgets (0.5, 0.4, 0.3, 0.2, 0.1) by ``compress`` at each, against
  ``jaxlr.sweep`` (one decomposition) then ``Sweep.truncate`` and ``Sweep.compress`` at each.

Each is timed cold (its first call in the process, compilation included: what a user's script
pays) and warm (the median of ``--repeats`` further calls), as ratios to plain compression. Memory:
each kernel's moment (``m x m`` float32) against the kernel itself, and the calibration step's
temporary buffers (``memory_analysis()`` of the compiled step: the activations and patches of one
batch), which do not grow with the number of batches.

Run::

    python -m experiments.benchmarks.calibration --model fcn
    python -m experiments.benchmarks.calibration --model resnet20
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlr
from experiments import models
from experiments.benchmarks import machine_line, write_rows
from jaxlr import calibration as calibration_lib

BUDGETS = (0.5, 0.4, 0.3, 0.2, 0.1)


class FCN(nn.Module):
    """LoRITa's MNIST FCN, ``784 - width x 7 - 10`` (ReLU; width 1000)."""

    width: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for _ in range(7):
            x = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


def _network(name: str, width: int) -> tuple[Any, tuple[int, ...]]:
    if name == "fcn":
        return FCN(width), (28, 28, 1)
    return models.create(name), (32, 32, 3)


def _block(x: Any) -> Any:
    jax.block_until_ready(jax.tree.leaves(x))
    return x


def _timed(fn: Any, repeats: int) -> tuple[float, float]:
    """(cold seconds, warm median seconds) of ``fn()``."""
    start = time.perf_counter()
    _block(fn())
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        warm.append(time.perf_counter() - start)
    return cold, statistics.median(warm)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fcn", help="fcn, or a name of experiments.models")
    parser.add_argument("--width", type=int, default=1000, help="the FCN's hidden width")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--keep", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    print(machine_line())

    model, shape = _network(args.model, args.width)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.normal(size=(args.batch, *shape)), jnp.float32)
               for _ in range(args.batches)]
    variables = model.init(jax.random.key(0), batches[0][:1])
    params = variables["params"]
    ranks = jaxlr.gsvt_ranks(params, keep=args.keep)

    plain = _timed(lambda: jaxlr.compress(params, ranks).compressed, args.repeats)
    holder: dict[str, Any] = {}

    def calibrate() -> Any:
        holder["c"] = jaxlr.calibrate(model, batches, variables=variables)
        return holder["c"].moments

    calibrating = _timed(calibrate, args.repeats)
    calibration = holder["c"]
    aware = _timed(lambda: jaxlr.compress(params, ranks, calibration=calibration).compressed,
                   args.repeats)

    def compress_each() -> Any:
        return [jaxlr.compress(params, jaxlr.gsvt_ranks(params, keep=k)).compressed
                for k in BUDGETS]

    start = time.perf_counter()
    _block(compress_each())
    per_budget_cold = time.perf_counter() - start

    def sweep_each() -> Any:
        s = jaxlr.sweep(params)
        out = []
        for k in BUDGETS:
            r = jaxlr.gsvt_ranks(params, keep=k, spectra=s.spectra)
            out += [s.truncate(r), s.compress(r).compressed]
        return out

    start = time.perf_counter()
    _block(sweep_each())
    sweep_cold = time.perf_counter() - start

    run = calibration_lib._prepare(model, variables, None, "all", None, jnp.float32)
    sums = {k: jnp.zeros(v.shape) for k, v in calibration.moments.items()}
    memory = run.step.lower(sums, run.arrays, batches[0]).compile().memory_analysis()
    kernels = {key: leaf for key, leaf in jaxlr.selection.matrix_leaves(
        variables, filter="all").items()}
    moment_bytes = sum(4 * leaf.matrix_shape[0] ** 2 for leaf in kernels.values())
    kernel_bytes = sum(4 * math.prod(leaf.shape) for leaf in kernels.values())

    rows = [{
        "model": args.model, "kernels": len(kernels), "batches": args.batches,
        "batch": args.batch, "keep": args.keep,
        "plain_cold_s": plain[0], "plain_warm_s": plain[1],
        "calibrate_cold_s": calibrating[0], "calibrate_warm_s": calibrating[1],
        "aware_cold_s": aware[0], "aware_warm_s": aware[1],
        "ratio_cold": (calibrating[0] + aware[0]) / plain[0],
        "ratio_warm": (calibrating[1] + aware[1]) / plain[1],
        "per_budget_cold_s": per_budget_cold, "sweep_cold_s": sweep_cold,
        "sweep_ratio": sweep_cold / per_budget_cold,
        "moment_mib": moment_bytes / 2**20, "kernel_mib": kernel_bytes / 2**20,
        "step_temp_mib": (memory.temp_size_in_bytes / 2**20) if memory else None,
    }]
    row = rows[0]
    print("| model | kernels | plain (s) cold / warm | calibrate (s) | data-aware compress (s) "
          "| (calibrate + compress) / plain cold / warm | 5 budgets: compress each (s) | "
          "sweep (s) | sweep / each | moments (MiB) | kernels (MiB) | step temp (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['model']} | {row['kernels']} | {row['plain_cold_s']:.2f} / "
          f"{row['plain_warm_s']:.3f} | {row['calibrate_cold_s']:.2f} / "
          f"{row['calibrate_warm_s']:.3f} | {row['aware_cold_s']:.2f} / "
          f"{row['aware_warm_s']:.3f} | {row['ratio_cold']:.2f}x / {row['ratio_warm']:.2f}x | "
          f"{row['per_budget_cold_s']:.2f} | {row['sweep_cold_s']:.2f} | "
          f"{row['sweep_ratio']:.2f}x | {row['moment_mib']:.2f} | {row['kernel_mib']:.2f} | "
          f"{row['step_temp_mib']:.1f} |")
    write_rows(args.json, rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
