"""Run by tests/test_calibration.py in a subprocess with 8 simulated CPU devices; prints one JSON.

A convolutional model is calibrated on batches sharded over the devices' ``data`` axis, and on the
same batches on one device; the compiled step's HLO says which collectives it runs.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before jax starts its backend; never on import
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import re  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxlr  # noqa: E402
from jaxlr import calibration  # noqa: E402


def main() -> None:
    model = nn.Sequential([nn.Conv(8, (3, 3)), nn.relu, lambda y: y.reshape(y.shape[0], -1),
                           nn.Dense(16), nn.relu, nn.Dense(4)])
    rng = np.random.default_rng(0)
    images = [jnp.asarray(rng.normal(size=(32, 8, 8, 3)), jnp.float32) for _ in range(3)]
    variables = model.init(jax.random.key(0), images[0])
    on_one = jaxlr.calibrate(model, [np.asarray(x) for x in images], variables=variables)
    out = {"devices": len(jax.devices())}
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in images]
        on_mesh = jaxlr.calibrate(model, sharded, variables=variables)
        run = calibration._prepare(model, variables, None, "all", None, jnp.float32)
        sums = {k: jnp.zeros(v.shape) for k, v in on_one.moments.items()}
        hlo = run.step.lower(sums, run.arrays, sharded[0]).compile().as_text()
        out_sums = run.step(sums, run.arrays, sharded[0])[0]
        out[str(axis_type)] = {
            "max_difference": max(float(jnp.max(jnp.abs(on_mesh.moments[k] - on_one.moments[k])))
                                  for k in on_one.moments),
            "all_reduces": len(re.findall(r"\ball-reduce(?:-start)?\(", hlo)),
            "all_gathers": len(re.findall(r"\ball-gather(?:-start)?\(", hlo)),
            "replicated": all(x.sharding.is_fully_replicated for x in out_sums.values()),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
