"""One process of the 2-process x 4-CPU-device run of tests/test_sharding.py (``jax.distributed``
over gloo on 127.0.0.1).

Run as ``python _multihost_worker.py PROCESS_ID PORT OUT_DIR``: joins the 2-process cluster,
builds the parameters as global arrays FSDP-sharded over all 8 devices, runs two LRPET steps
(every step projects, with BN rectification) and two LoRITa steps (N = 3), and process 0 writes
the final parameters (gathered from both processes) to ``OUT_DIR/multihost.npz``.

Imported without arguments (by the test, on one device) it only defines the same steps, so the
test runs them on one device from identical inputs and compares.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

SHAPES = {"Conv_0": (3, 3, 8, 16), "Conv_1": (3, 3, 16, 32), "Dense_0": (128, 32)}
STEPS = 2
BATCH = 16


def arrays() -> dict[str, np.ndarray]:
    """The inputs, the same in every process: kernels, a BatchNorm scale and variance, a batch."""
    rng = np.random.default_rng(0)
    out = {f"{name}/kernel": rng.standard_normal(shape).astype(np.float32)
           / np.sqrt(math.prod(shape[:-1])) for name, shape in SHAPES.items()}
    out["bn/scale"] = np.linspace(0.5, 1.5, 32, dtype=np.float32)
    out["bn/var"] = np.linspace(0.5, 2.0, 32, dtype=np.float32)
    out["x"] = rng.standard_normal((BATCH, 128)).astype(np.float32)
    return out


def nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        head, tail = key.split("/")
        tree.setdefault(head, {})[tail] = value
    return tree


def steps():
    """``(lrpet_step, lrpet_tx, lorita_step)``: jitted steps taking and returning parameters."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    import jaxlr  # noqa: PLC0415

    options = jaxlr.ProjectionOptions(bn_pairs={"Conv_1/kernel": "bn"},
                                      filter=lambda path, leaf: path[-1] == "kernel")
    lrpet_tx = jaxlr.with_low_rank_projection(optax.sgd(1e-2), prune=0.5, every=1,
                                              options=options)

    def whole(a: jax.Array) -> jax.Array:  # FSDP: the kernel gathered where it is used
        return jax.sharding.reshard(a, P()) if jaxlr.sharding.is_explicit(a) else a

    def loss(params: dict, x: jax.Array) -> jax.Array:
        h = jnp.tanh(x @ whole(params["Dense_0"]["kernel"]))
        conv = sum(jnp.sum(jnp.sin(params[k]["kernel"])) for k in ("Conv_0", "Conv_1"))
        return jnp.mean(h**2) + 1e-2 * conv + jnp.sum(params["bn"]["scale"] ** 2)

    @jax.jit
    def lrpet_step(params, state, stats, x):
        grads = jax.grad(loss)(params, x)
        updates, state = lrpet_tx.update(grads, state, params, batch_stats=stats)
        return optax.apply_updates(params, updates), state

    sgd = optax.sgd(1e-1)

    @jax.jit
    def lorita_step(fparams, state, x):
        grads = jax.grad(lambda f: loss(jaxlr.collapse(f), x))(fparams)
        updates, state = sgd.update(grads, state, fparams)
        return optax.apply_updates(fparams, updates), state

    return lrpet_step, lrpet_tx, lorita_step, sgd


def run(put) -> dict[str, np.ndarray]:
    """The two LRPET and two LoRITa steps on inputs placed by ``put(name, array)``; returns the
    final parameters as ``{"lrpet/...": ..., "lorita/...": ...}`` (global arrays)."""
    import jax  # noqa: PLC0415

    import jaxlr  # noqa: PLC0415

    lrpet_step, lrpet_tx, lorita_step, sgd = steps()
    given = {name: put(name, value) for name, value in arrays().items()}
    x = given.pop("x")
    stats = {"bn": {"var": given.pop("bn/var")}}
    params = nest(given)
    state = lrpet_tx.init(params)
    p = params
    for _ in range(STEPS):
        p, state = lrpet_step(p, state, stats, x)
    fparams = jaxlr.factorize(params, 3, jax.random.key(0, impl="threefry2x32"), filter="all")
    fstate = sgd.init(fparams)
    for _ in range(STEPS):
        fparams, fstate = lorita_step(fparams, fstate, x)
    out = {f"lrpet/{k}/{leaf}": v for k, d in p.items() for leaf, v in d.items()}
    flat = jax.tree_util.tree_flatten_with_path(fparams)[0]
    out.update({"lorita/" + jaxlr.matrices.path_key(path): v for path, v in flat})
    out["compiles"] = np.asarray([lrpet_step._cache_size(), lorita_step._cache_size()])
    out["nonfinite"] = np.asarray(int(state[1].nonfinite))
    return out


def main() -> None:
    process_id, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")  # an instruction-set cap holds
                               + " --xla_force_host_platform_device_count=4").strip()
    import jax  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415
    from jax.sharding import AxisType, NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    assert jax.local_device_count() == 4
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))

    def put(name: str, value: np.ndarray) -> jax.Array:
        # FSDP on the output channels; the batch split over the devices; BatchNorm whole (as
        # P(None), the spec jit gives its outputs: a P() input would compile the step twice in
        # plain JAX too).
        spec = P("x") if name == "x" else P(*[None] * (value.ndim - 1),
                                            "x" if value.ndim > 1 else None)
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    with jax.set_mesh(mesh):
        out = run(put)
    specs = {k: str(v.sharding.spec) for k, v in out.items() if isinstance(v, jax.Array)}
    gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
                if isinstance(v, jax.Array) else v for k, v in out.items()}
    if process_id == 0:
        np.savez(os.path.join(out_dir, "multihost.npz"), **gathered)
        with open(os.path.join(out_dir, "specs.txt"), "w") as file:
            file.writelines(f"{k} {v}\n" for k, v in sorted(specs.items()))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
