"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices; prints one JSON.

Every number is computed here from the library's outputs and an independent one-device run of the
same call on the same inputs; the assertions are in the test module.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxlr  # noqa: E402

SHAPES = {"Conv_0": (3, 3, 3, 16), "Conv_1": (3, 3, 16, 32), "Conv_2": (3, 3, 32, 64),
          "Conv_3": (3, 3, 64, 64), "Dense_0": (256, 64)}
PRUNE = 0.6


def make_tree(seed: int = 0) -> dict:
    """Kernels of rank ``keep`` plus 5% noise: a clear gap at the cut, as after a projection."""
    rng = np.random.default_rng(seed)
    tree = {}
    for name, shape in SHAPES.items():
        m, n = math.prod(shape[:-1]), shape[-1]
        rank = max(1, math.floor(min(m, n) * (1 - PRUNE)))
        u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
        v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
        low = (u * np.linspace(2.0, 1.0, rank)) @ v.T
        matrix = low + 0.05 * rng.standard_normal((m, n)) / np.sqrt(m)
        tree[name] = {"kernel": jnp.asarray(matrix.reshape(shape), jnp.float32),
                      "bias": jnp.zeros((n,), jnp.float32)}
    return tree


OPTIONS = jaxlr.ProjectionOptions(filter=lambda path, leaf: path[-1] == "kernel")


def relative_errors(out: dict, ref: dict) -> float:
    return max(float(jnp.linalg.norm(out[k]["kernel"] - ref[k]["kernel"])
                     / jnp.linalg.norm(ref[k]["kernel"])) for k in ref)


def same_shardings(out: dict, given: dict) -> bool:
    return all(a.sharding.is_equivalent_to(b.sharding, a.ndim)
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(given), strict=True))


def whole_kernel_gathers(hlo: str) -> list[str]:
    """All-gathers whose result is a whole kernel larger than its Gram matrix: its axes in any
    order, or its matrix (either way round)."""
    whole = set()
    for shape in SHAPES.values():
        m, n = math.prod(shape[:-1]), shape[-1]
        if m * n > min(m, n) ** 2:
            whole |= {tuple(sorted(shape)), tuple(sorted((m, n)))}
    found = []
    for dims in re.findall(r"= f32\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", hlo):
        shape = tuple(sorted(int(d) for d in dims.split(",") if d and int(d) > 1))
        if shape in whole:
            found.append(dims)
    return found


def place(tree: dict, mesh: jax.sharding.Mesh, layout: str) -> dict:
    """Kernels laid out as data parallel (whole), FSDP on the output or input axis, or 2-D
    (the model axis on the output channels, the data axis nowhere)."""
    def put(x: jax.Array) -> jax.Array:
        spec = [None] * x.ndim
        axis = {"dp": None, "fsdp-out": -1, "fsdp-in": -2, "2d": -1}[layout]
        name = "model" if layout == "2d" else "x"
        size = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))[name]
        if axis is not None and x.ndim >= 2 and x.shape[axis] % size == 0:
            spec[x.ndim + axis] = name
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))
    return jax.tree.map(put, tree)


def mesh_for(layout: str, axis_type: AxisType) -> jax.sharding.Mesh:
    if layout == "2d":
        return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    return jax.make_mesh((8,), ("x",), axis_types=(axis_type,))


def projections() -> list[dict]:
    tree = make_tree()
    reference = jaxlr.project(tree, prune=PRUNE, options=OPTIONS)  # one device
    rows = []
    for kind, axis_type in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit)):
        for layout in ("dp", "fsdp-out", "fsdp-in", "2d"):
            mesh = mesh_for(layout, axis_type)
            given = place(tree, mesh, layout)
            step = jax.jit(lambda p: jaxlr.project(p, prune=PRUNE, options=OPTIONS))
            with jax.set_mesh(mesh):
                jitted = step(given)
                hlo = step.lower(given).compile().as_text()
            eager = jaxlr.project(given, prune=PRUNE, options=OPTIONS)
            rows.append({
                "mesh": kind, "layout": layout,
                "error_jit": relative_errors(jitted, reference),
                "error_eager": relative_errors(eager, reference),
                "shardings_jit": same_shardings(jitted, given),
                "shardings_eager": same_shardings(eager, given),
                "whole_kernel_gathers": whole_kernel_gathers(hlo),
                "eigh_calls": len(re.findall(r"syevd", hlo)),
            })
    return rows


def training() -> dict:
    """A jitted FSDP training step with BN-rectified projection every 2nd step: compiles once,
    keeps every sharding (the BatchNorm's too), projects."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    tree = make_tree(1)
    params = place(tree, mesh, "fsdp-out")
    whole = NamedSharding(mesh, P(None))
    params["bn"] = {"scale": jax.device_put(jnp.linspace(0.5, 1.5, 32), whole)}
    stats = {"bn": {"var": jax.device_put(jnp.linspace(0.5, 2.0, 32), whole)}}
    x = jax.device_put(jnp.ones((16, 256)), NamedSharding(mesh, P("x")))
    options = jaxlr.ProjectionOptions(bn_pairs={"Conv_1/kernel": "bn"},
                                      filter=lambda path, leaf: path[-1] == "kernel")
    tx = jaxlr.with_low_rank_projection(optax.sgd(1e-3), prune=0.5, every=2, options=options)

    def loss(p: dict) -> jax.Array:
        h = x @ p["Dense_0"]["kernel"]
        return jnp.mean(h**2) + sum(jnp.sum(p[k]["kernel"] ** 2) for k in SHAPES if k != "Dense_0")

    @jax.jit
    def step(p: dict, state: optax.OptState) -> tuple[dict, optax.OptState]:
        grads = jax.grad(loss)(p)
        updates, state = tx.update(grads, state, p, batch_stats=stats)
        return optax.apply_updates(p, updates), state

    with jax.set_mesh(mesh):
        state = tx.init(params)
        p = params
        for _ in range(4):
            p, state = step(p, state)
        compiles = step._cache_size()
        # The same steps on one device.
        q, qstate = jax.device_get(params), tx.init(jax.device_get(params))
        single = jax.jit(lambda p, state: step.__wrapped__(p, state))
    q = jax.tree.map(jnp.asarray, q)
    for _ in range(4):
        q, qstate = single(q, qstate)
    m = np.asarray(p["Conv_2"]["kernel"]).reshape(-1, 64)
    return {
        "compiles": compiles,
        "shardings": same_shardings(p, params),
        "rank_conv2": int(np.linalg.matrix_rank(m, tol=1e-5 * np.linalg.norm(m, 2))),
        "error_vs_one_device": max(
            float(jnp.linalg.norm(a - b) / max(jnp.linalg.norm(b), 1e-30))
            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True)),
        "nonfinite": int(state[1].nonfinite),
    }


def compression() -> list[dict]:
    tree = make_tree(2)
    ranks = {"Conv_2/kernel": 12, "Dense_0/kernel": 8}
    reference = jaxlr.compress(tree, ranks).compressed
    rows = []
    for kind, axis_type in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit)):
        mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
        for layout in ("fsdp-out", "fsdp-in"):
            given = place(tree, mesh, layout)
            out = jaxlr.compress(given, ranks).compressed
            for key in ranks:
                name = key.split("/")[0]
                node, ref = out[name]["kernel"], reference[name]["kernel"]
                rows.append({
                    "mesh": kind, "layout": layout, "key": key,
                    "error": float(jnp.linalg.norm(node[...] - ref[...])
                                   / jnp.linalg.norm(ref[...])),
                    "a_spec": [e for e in node.a.sharding.spec],
                    "b_spec": [e for e in node.b.sharding.spec],
                    "kernel_spec": [e for e in given[name]["kernel"].sharding.spec],
                })
            factored = jaxlr.factorize(given, 3, jax.random.key(0))
            product = factored["Dense_0"]["kernel"]
            rows.append({"mesh": kind, "layout": layout, "key": "factorize",
                         "specs": [[e for e in f.sharding.spec] for f in product.factors],
                         "shapes": [list(f.shape) for f in product.factors],
                         "norm_ratio": float(jnp.linalg.norm(product[...])
                                             / jnp.linalg.norm(given["Dense_0"]["kernel"]))})
    return rows


def main() -> None:
    parts = sys.argv[1:] or ["projections", "training", "compression"]
    result = {part: globals()[part]() for part in parts}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
