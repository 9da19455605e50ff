"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices; prints one JSON.

Every number is computed here from the library's outputs and an independent one-device run of the
same call on the same inputs; the assertions are in the test module.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before jax starts its backend; never on import
    # Appended: flags already set (an instruction-set cap, say) still hold.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

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
            # Without jax.set_mesh: the mesh is found in the traced values' types.
            bare = jax.jit(lambda p: jaxlr.project(p, prune=PRUNE, options=OPTIONS))
            bare_hlo = bare.lower(given).compile().as_text()
            rows.append({
                "error_jit_no_context": relative_errors(bare(given), reference),
                "whole_kernel_gathers_no_context": whole_kernel_gathers(bare_hlo),
                "mesh": kind, "layout": layout,
                "error_jit": relative_errors(jitted, reference),
                "error_eager": relative_errors(eager, reference),
                "shardings_jit": same_shardings(jitted, given),
                "shardings_eager": same_shardings(eager, given),
                "whole_kernel_gathers": whole_kernel_gathers(hlo),
                "eigh_calls": len(re.findall(r"syevd", hlo)),
            })
    return rows


def memory() -> dict:
    """Temporary memory per device of the compiled FSDP projection of 1 and of 4 same-shape
    kernels: the matrices are decomposed one after the other, so 4 cost about what 1 does."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(3)
    out = {}
    for count in (1, 4):
        tree = {f"Conv_{i}": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 128, 128)),
                                                    jnp.float32)} for i in range(count)}
        given = place(tree, mesh, "fsdp-out")
        step = jax.jit(lambda p: jaxlr.project(p, prune=PRUNE, options=OPTIONS))
        with jax.set_mesh(mesh):
            compiled = step.lower(given).compile()
        out[str(count)] = compiled.memory_analysis().temp_size_in_bytes
    out["kernel_bytes"] = 3 * 3 * 128 * 128 * 4
    return out


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
            factored = jaxlr.factorize(given, 3, jax.random.key(0), filter="all")
            product = factored["Dense_0"]["kernel"]
            rows.append({"mesh": kind, "layout": layout, "key": "factorize",
                         "specs": [[e for e in f.sharding.spec] for f in product.factors],
                         "shapes": [list(f.shape) for f in product.factors],
                         "norm_ratio": float(jnp.linalg.norm(product[...])
                                             / jnp.linalg.norm(given["Dense_0"]["kernel"]))})
    return rows


def inference() -> list[dict]:
    """Compressed NNX and Linen models run on a 2 x 4 Explicit mesh, factors laid out as data
    parallel, FSDP and tensor parallel, against the same model on one device."""
    from flax import linen as nn  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    general = jaxlr.MatrixView((0,), (1, 2))

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.conv = nnx.Conv(8, 16, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(16, 32, rngs=rngs)
            self.gen = nnx.LinearGeneral((32,), (4, 8), axis=-1, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.gen(self.fc(self.conv(x).mean((1, 2))))

    def view(path: tuple, leaf: jax.Array) -> jaxlr.MatrixView:
        return general if leaf.ndim == 3 else jaxlr.matrices.default_view(path, leaf)

    ranks = {"conv/kernel": 4, "fc/kernel": 6, "gen/kernel": 5}
    small = jaxlr.compress(Net(nnx.Rngs(0)), ranks,
                           options=jaxlr.ProjectionOptions(view=view)).compressed
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 8))
    want = np.asarray(small(x))
    layouts = {
        "dp": lambda v: P(),
        "fsdp": lambda v: P("model", None) if v.ndim == 2 and v.shape[0] % 4 == 0 else P(),
        "tp": lambda v: P(None, "model") if v.ndim == 2 and v.shape[1] % 4 == 0 else P(),
    }
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    rows = []
    for name, spec in layouts.items():
        model = nnx.clone(small)
        state = nnx.state(model)
        nnx.update(model, jax.tree.map(
            lambda v, spec=spec: jax.device_put(v, NamedSharding(mesh, spec(v))), state))
        with jax.set_mesh(mesh):
            got = nnx.jit(lambda m, x: m(x))(model, xs)
        rows.append({"api": "nnx", "layout": name, "spec": [e for e in got.sharding.spec],
                     "error": float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())})

    # Row parallel: the input's features split over "model", A's rows with them; the output
    # as asked for.
    layer = jaxlr.compress(nnx.Linear(32, 16, rngs=nnx.Rngs(2)), {"kernel": 4}).compressed
    h = jax.random.normal(jax.random.key(3), (8, 32))
    want = np.asarray(layer(h))
    nnx.update(layer, jax.tree.map(lambda v: jax.device_put(v, NamedSharding(
        mesh, P("model", None) if v.shape[0] == 32 else P())), nnx.state(layer)))
    hs = jax.device_put(h, NamedSharding(mesh, P("data", "model")))
    with jax.set_mesh(mesh):
        for label, out in (("row-parallel", None), ("row-parallel-out", P("data", "model"))):
            got = jax.jit(lambda x, out=out: layer(x, out_sharding=out))(hs)
            rows.append({"api": "nnx", "layout": label,
                         "spec": [e for e in got.sharding.spec],
                         "error": float(np.abs(np.asarray(got) - want).max()
                                        / np.abs(want).max())})

    class LinenNet(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            return nn.Dense(10)(nn.Conv(16, (3, 3))(x).mean((1, 2)))

    linen = LinenNet()
    params = linen.init(jax.random.key(4), x)["params"]
    packed = jaxlr.compress(params, {"Conv_0/kernel": 4, "Dense_0/kernel": 3}).compressed
    want = np.asarray(jaxlr.apply(linen, {"params": packed}, x))
    for name, spec in layouts.items():
        placed = jax.tree.map(lambda v, spec=spec: jax.device_put(
            v, NamedSharding(mesh, spec(v))), packed)
        with jax.set_mesh(mesh):
            got = jax.jit(lambda p, x: jaxlr.apply(linen, {"params": p}, x))(placed, xs)
        rows.append({"api": "linen", "layout": name, "spec": [e for e in got.sharding.spec],
                     "error": float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())})
    return rows


def experiments_loop() -> list[dict]:
    """experiments.train.train of a small VGG with BatchNorm under LRPET (projection every
    epoch, BN rectification) and of a LoRITa FCN (N = 3), with parallel="none", "data" and
    "fsdp" on the 8 devices: final parameters and accuracies compared with "none"."""
    from experiments import data as data_lib  # noqa: PLC0415
    from experiments import models  # noqa: PLC0415
    from experiments.train import Task, TrainConfig, lorita_task, train  # noqa: PLC0415

    data = data_lib.load("digits")
    steps = len(data.train) // 64
    vgg = models.VGG(config=(16, "M", 32), num_classes=data.num_classes)
    sample = data.normalize(data.test.images[:1])
    shapes = jax.eval_shape(vgg.init, jax.random.key(0), sample)
    options = jaxlr.ProjectionOptions(bn_pairs=jaxlr.find_bn_pairs(vgg, shapes, sample))
    lrpet = Task(vgg, optax.chain(optax.sgd(0.05, momentum=0.9),
                                  jaxlr.low_rank_projection(prune=0.5, every=steps,
                                                            options=options)))
    lorita = lorita_task(models.FCN(depth=3, width=64), optax.adam(1e-3), depth=3)
    rows = []
    for name, task in (("lrpet", lrpet), ("lorita", lorita)):
        runs = {}
        for parallel in ("none", "data", "fsdp"):
            config = TrainConfig(2, 64, seed=0, progress=False, parallel=parallel)
            result = train(task, data, config)
            leaves = jax.tree.leaves(result.state.params)
            runs[parallel] = (result, leaves)
        base, base_leaves = runs["none"]
        for parallel in ("data", "fsdp"):
            result, leaves = runs[parallel]
            split = [len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                     for x in leaves]
            rows.append({
                "task": name, "parallel": parallel,
                # Relative, with a floor: the biases of convolutions followed by BatchNorm get
                # no gradient in exact arithmetic (their values are rounding noise, ~1e-9).
                "error": max(float(jnp.linalg.norm(a - b) / max(jnp.linalg.norm(b), 1e-3))
                             for a, b in zip(leaves, base_leaves, strict=True)),
                "accuracy": [h["validation_accuracy"] for h in result.history],
                "base_accuracy": [h["validation_accuracy"] for h in base.history],
                "on_8_devices": all(len(x.sharding.device_set) == 8 for x in leaves),
                "split": sum(split), "leaves": len(leaves),
                "matrices": sum(x.ndim >= 2 for x in leaves),
            })
    try:  # 60 rows do not split over 8 devices
        train(lrpet, data, TrainConfig(1, 60, progress=False, parallel="data"))
        refused = ""
    except ValueError as error:
        refused = str(error)
    rows.append({"task": "refused", "parallel": "data", "message": refused})
    return rows


def main() -> None:
    parts = sys.argv[1:] or ["projections", "memory", "training", "compression", "inference",
                             "experiments_loop"]
    result = {part: globals()[part]() for part in parts}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
