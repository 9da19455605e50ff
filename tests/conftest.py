"""Shared test configuration: full float32 matmuls, hypothesis profiles sized for a 2-core CI
machine."""

import os

import jax
from hypothesis import HealthCheck, settings

# Programs the tests run in subprocesses, not test modules: `--doctest-modules` would import them
# into the test process, and _sharded_worker.py sets XLA_FLAGS to 8 simulated devices at import,
# before jax starts its backend: every test after it would run on 8 devices.
collect_ignore = ["_sharded_worker.py", "_multihost_worker.py", "_calibration_worker.py"]

# Tests compare float32 computations at 1e-4 and below. That is what the CPU computes by default;
# on a GPU, JAX's default float32 matmuls and convolutions use TF32 (about 1e-3), so ask for full
# precision everywhere and the suite means the same on every backend.
jax.config.update("jax_default_matmul_precision", "highest")

# JAX compiles a new program for every new shape, so a first example can take seconds.
settings.register_profile(
    "default",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
# CI draws the same examples on every run, so that a red run is reproducible and a green one is not
# luck; local runs explore new examples each time (`HYPOTHESIS_PROFILE=thorough` for many more).
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True,
                          print_blob=True)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=300)
default_profile = "ci" if os.environ.get("CI") else "default"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", default_profile))
