"""Benchmark: the projection of a sharded VGG-16 (CIFAR, 13 convolutions) on 8 simulated devices.

For each layout of the kernels (whole on every device, FSDP on the output channels, FSDP on the
input channels) the jitted whole-tree projection (``jaxlr.project``, ``prune=0.6``, ``auto``) is
compiled twice in this process: with the decompositions spread over the mesh (the default) and
with ``ProjectionOptions(mesh=None)``, where XLA's partitioner places them (what jaxlr did before
0.3). Reported per device, from the compiled program: temporary memory
(``compiled.memory_analysis()``), all-gathers of a whole kernel, and decompositions (``eigh``
calls run: the owners' share when spread, every matrix when not; the compiled program holds one
``eigh`` per matrix either way, each spread one under a ``cond`` on the device's index); and the
median wall time of a call.

Run::

    python -m experiments.benchmarks.sharded_projection
"""

from __future__ import annotations

import os

DEVICES = 8

if __name__ == "__main__" and "jax" not in os.sys.modules:  # fixed when jax starts
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:  # other flags (an ISA cap) hold
        os.environ["XLA_FLAGS"] = (
            f"{_flags} --xla_force_host_platform_device_count={DEVICES}".strip())

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxlr  # noqa: E402
from experiments.benchmarks import write_rows  # noqa: E402
from experiments.benchmarks.svd_projection import make_tree, vgg16_conv_shapes  # noqa: E402

LAYOUTS = {"replicated": None, "FSDP (output channels)": -1, "FSDP (input channels)": -2}


def _place(tree: dict, mesh: jax.sharding.Mesh, axis: int | None) -> dict:
    def put(x: jax.Array) -> jax.Array:
        spec = [None] * x.ndim
        if axis is not None and x.shape[axis] % mesh.size == 0:
            spec[x.ndim + axis] = mesh.axis_names[0]
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))
    return jax.tree.map(put, tree)


def _whole_gathers(hlo: str, shapes: dict[str, tuple[int, ...]]) -> int:
    whole = set()
    for shape in shapes.values():
        m, n = math.prod(shape[:-1]), shape[-1]
        whole |= {tuple(sorted(shape)), tuple(sorted((m, n)))}
    found = 0
    for dims in re.findall(r"= f32\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", hlo):
        if tuple(sorted(int(d) for d in dims.split(",") if d and int(d) > 1)) in whole:
            found += 1
    return found


def run(repeats: int = 3, ratio: float = 0.6) -> list[dict[str, Any]]:
    """Measures every layout, spread and not; returns the rows."""
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("fsdp",), axis_types=(AxisType.Auto,))
    shapes = vgg16_conv_shapes()
    tree = make_tree(shapes, "projected", ratio)
    tall = [min(math.prod(s[:-1]), s[-1]) for s in shapes.values()]
    owners = jaxlr.sharding.owners([float(n) ** 3 for n in tall], devices)
    rows = []
    for layout, axis in LAYOUTS.items():
        given = _place(tree, mesh, axis)
        for spread in (True, False):
            options = jaxlr.ProjectionOptions(mesh="auto" if spread else None)
            step = jax.jit(lambda p, options=options: jaxlr.project(p, prune=ratio,
                                                                     options=options))
            with jax.set_mesh(mesh):
                compiled = step.lower(given).compile()
                jax.block_until_ready(step(given))
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(step(given))
                    times.append(time.perf_counter() - start)
            hlo = compiled.as_text()
            rows.append({
                "layout": layout, "spread": spread,
                "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
                "args_mib": compiled.memory_analysis().argument_size_in_bytes / 2**20,
                "whole_gathers": _whole_gathers(hlo, shapes),
                "eigh_compiled": len(re.findall(r"syevd", hlo)),
                "decompositions": int(np.bincount(owners).max()) if spread else len(shapes),
                "seconds": float(np.median(times)),
            })
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if jax.device_count() < DEVICES:
        raise SystemExit(
            f"sharded_projection needs {DEVICES} devices, jax sees {jax.device_count()}: run it as "
            f"`python -m experiments.benchmarks.sharded_projection` (which sets XLA_FLAGS="
            f"--xla_force_host_platform_device_count={DEVICES} before jax starts), or set that "
            "yourself before importing jax.")
    rows = run(args.repeats)
    print(f"{jax.device_count()} x {jax.devices()[0].platform} devices, jax {jax.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores:\n")
    print("| layout | decompositions | temp MiB / device | ratio | whole-kernel all-gathers | "
          "eigh per device | time (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for layout in LAYOUTS:
        new, old = (next(r for r in rows if r["layout"] == layout and r["spread"] == s)
                    for s in (True, False))
        for row, name in ((old, "XLA-placed (`mesh=None`)"), (new, "spread (default)")):
            print(f"| {layout} | {name} | {row['temp_mib']:.1f} | "
                  f"{row['temp_mib'] / old['temp_mib']:.2f} | {row['whole_gathers']} | "
                  f"{row['decompositions']} | {row['seconds']:.3f} |")
    write_rows(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
