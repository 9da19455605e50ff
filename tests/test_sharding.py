"""Sharded projection, compression and training on 8 simulated CPU devices (in a subprocess, since
the device count is fixed when jax starts), against the same calls on one device."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlr import matrices, sharding

WORKER = Path(__file__).with_name("_sharded_worker.py")
MULTIHOST = Path(__file__).with_name("_multihost_worker.py")


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, PYTHONPATH=str(WORKER.parent.parent))
    done = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                          timeout=900, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


LAYOUTS = [(mesh, layout) for mesh in ("auto", "explicit")
           for layout in ("dp", "fsdp-out", "fsdp-in", "2d")]


@pytest.mark.parametrize(("mesh", "layout"), LAYOUTS)
def test_projection_on_8_devices_equals_one_device(results, mesh, layout):
    row = next(r for r in results["projections"] if (r["mesh"], r["layout"]) == (mesh, layout))
    assert row["error_eager"] < 1e-6
    assert row["error_jit"] < 1e-6


@pytest.mark.parametrize(("mesh", "layout"), [
    ("auto", "fsdp-out"), ("auto", "fsdp-in"),
    ("explicit", "dp"), ("explicit", "fsdp-out"), ("explicit", "fsdp-in"), ("explicit", "2d")])
def test_jit_finds_the_mesh_in_the_traced_values_without_set_mesh(results, mesh, layout):
    """mesh="auto" reads the mesh from the types of the values traced by the caller's jit (an
    Auto mesh carries no spec there): no whole kernel gathered, the one-device result, as under
    jax.set_mesh (the layouts of test_compiled_projection_gathers_no_whole_kernel...)."""
    row = next(r for r in results["projections"] if (r["mesh"], r["layout"]) == (mesh, layout))
    assert row["error_jit_no_context"] < 1e-6
    assert row["whole_kernel_gathers_no_context"] == []


@pytest.mark.parametrize(("mesh", "layout"), LAYOUTS)
def test_eager_projection_keeps_every_sharding(results, mesh, layout):
    row = next(r for r in results["projections"] if (r["mesh"], r["layout"]) == (mesh, layout))
    assert row["shardings_eager"]


@pytest.mark.parametrize(("mesh", "layout"), [
    ("auto", "fsdp-out"), ("auto", "fsdp-in"),
    ("explicit", "dp"), ("explicit", "fsdp-out"), ("explicit", "fsdp-in"), ("explicit", "2d")])
def test_compiled_projection_gathers_no_whole_kernel_and_keeps_shardings(results, mesh, layout):
    # Under jit on an Auto mesh a kernel's sharding is unknown to the library: the FSDP layouts
    # still come back as given; a whole kernel (dp) is gathered back from its row blocks.
    row = next(r for r in results["projections"] if (r["mesh"], r["layout"]) == (mesh, layout))
    assert row["whole_kernel_gathers"] == []
    assert row["shardings_jit"]


def test_spread_projection_decomposes_one_matrix_at_a_time(results):
    # Four kernels need about the temporary memory of one: each is moved to its row layout and
    # decomposed after the previous one is done (not every moved copy alive at once).
    temp = results["memory"]
    assert temp["4"] <= 1.25 * temp["1"]


def test_sharded_training_step_compiles_once_keeps_shardings_and_projects(results):
    run = results["training"]
    assert run["compiles"] == 1
    assert run["shardings"]  # the BatchNorm scale (BN rectification) included
    assert run["rank_conv2"] == 32  # 288 x 64 pruned by half
    assert run["error_vs_one_device"] < 1e-4
    assert run["nonfinite"] == 0


@pytest.mark.parametrize("mesh", ["auto", "explicit"])
def test_compress_factors_follow_the_kernel_sharding(results, mesh):
    for row in results["compression"]:
        if row["mesh"] != mesh or row["key"] == "factorize":
            continue
        assert row["error"] < 1e-5
        split_rows = any(e is not None for e in row["kernel_spec"][:-1])
        split_cols = row["kernel_spec"][-1] is not None
        assert (bool(row["a_spec"]) and row["a_spec"][0] == "x") == split_rows
        assert (len(row["b_spec"]) > 1 and row["b_spec"][1] == "x") == split_cols


@pytest.mark.parametrize("mesh", ["auto", "explicit"])
def test_factorize_places_factors_on_the_kernel_mesh(results, mesh):
    rows = {r["layout"]: r for r in results["compression"]
            if r["mesh"] == mesh and r["key"] == "factorize"}
    # Dense (256, 64), squares on the output side: (256, 64), (64, 64), (64, 64).
    assert rows["fsdp-out"]["specs"] == [[None, "x"]] * 3
    assert rows["fsdp-in"]["specs"][0] == ["x", None]
    for row in rows.values():
        assert row["norm_ratio"] == pytest.approx(1.0, abs=1e-5)


def test_compressed_layers_run_on_an_explicit_mesh(results):
    rows = {(r["api"], r["layout"]): r for r in results["inference"]}
    assert len(rows) == 8
    for row in rows.values():
        assert row["error"] < 1e-5, row
    # The batch stays split over "data" (B's columns gathered where "model" cannot follow).
    for api, layout in [("nnx", "dp"), ("nnx", "fsdp"), ("nnx", "tp"), ("linen", "dp"),
                        ("linen", "fsdp"), ("linen", "tp")]:
        assert rows[(api, layout)]["spec"][0] == "data"
    assert rows[("nnx", "row-parallel")]["spec"] == ["data", None]
    assert rows[("nnx", "row-parallel-out")]["spec"] == ["data", "model"]
    assert rows[("linen", "tp")]["spec"] == ["data", None]  # 10 outputs: not split over 4


@pytest.mark.parametrize("task", ["lrpet", "lorita"])
@pytest.mark.parametrize("parallel", ["data", "fsdp"])
def test_experiment_training_loop_on_8_devices_equals_one_device(results, task, parallel):
    row = next(r for r in results["experiments_loop"]
               if (r["task"], r["parallel"]) == (task, parallel))
    assert row["error"] < 1e-4
    assert row["accuracy"] == row["base_accuracy"]
    assert row["on_8_devices"]
    # Data parallel: every parameter whole on each device; FSDP: the matrices whose last (or
    # another) axis 8 divides are split (LRPET's VGG: 2 convs and the head; LoRITa's FCN: every
    # factor but the 10-class head's last).
    expected = {"data": 0, "fsdp": {"lrpet": 3, "lorita": row["matrices"] - 2}[task]}[parallel]
    assert row["split"] == expected


def test_experiment_batch_size_must_split_over_the_devices(results):
    row = next(r for r in results["experiments_loop"] if r["task"] == "refused")
    assert "batch_size 60" in row["message"] and "8 local devices" in row["message"]


# ---------------------------------------------------------------------------------------------
# Two processes x 4 CPU devices (jax.distributed over gloo on 127.0.0.1).


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _load_multihost_worker():
    spec = importlib.util.spec_from_file_location("_multihost_worker", MULTIHOST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_train_lrpet_and_lorita_like_one_device(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(MULTIHOST.parent.parent))
    port = str(_free_port())
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]  # noqa: SIM115
    processes = [subprocess.Popen([sys.executable, str(MULTIHOST), str(i), port, str(tmp_path)],
                                  stdout=logs[i], stderr=subprocess.STDOUT, env=env)
                 for i in range(2)]
    try:
        codes = [p.wait(timeout=300) for p in processes]
    finally:  # a hung collective must not hang the suite
        for p in processes:
            p.kill()
        for log in logs:
            log.close()
    text = "\n".join((tmp_path / f"process{i}.log").read_text()[-2000:] for i in range(2))
    assert codes == [0, 0], text
    got = dict(np.load(tmp_path / "multihost.npz"))
    specs = dict(line.split(" ", 1) for line in
                 (tmp_path / "specs.txt").read_text().splitlines())

    worker = _load_multihost_worker()
    want = {k: np.asarray(v) for k, v in worker.run(lambda name, v: jnp.asarray(v)).items()}
    assert got["compiles"].tolist() == [1, 1]
    assert int(got["nonfinite"]) == 0
    assert sorted(got) == sorted(want)
    for key in want:
        if key in ("compiles", "nonfinite"):
            continue
        error = np.linalg.norm(got[key] - want[key]) / np.linalg.norm(want[key])
        assert error < 1e-5, key
    # The projection took effect: Conv_1 (288 x 32) pruned by half, as on one device.
    conv1 = got["lrpet/Conv_1/kernel"].reshape(-1, 32)
    assert np.linalg.matrix_rank(conv1, tol=1e-5 * np.linalg.norm(conv1, 2)) == 16
    # Kernels and LoRITa factors stay sharded over both processes' devices.
    for key, spec in specs.items():
        if key.endswith("kernel") or "/factors/" in key:
            assert spec.endswith("'x')"), (key, spec)


# ---------------------------------------------------------------------------------------------
# Pure functions, one device.


def test_owners_spread_the_matrices_evenly():
    costs = [512.0**3] * 6 + [256.0**3] * 3 + [128.0**3] * 2 + [64.0**3, 27.0**3]  # VGG-16
    got = sharding.owners(costs, 8)
    counts = np.bincount(got, minlength=8)
    assert counts.max() <= math.ceil(len(costs) / 8) + 1
    # The six largest go to six different devices.
    assert len(set(got[:6])) == 6


@pytest.mark.parametrize(("shape", "view", "devices"), [
    ((3, 3, 16, 32), matrices.MatrixView((0, 1, 2), (3,)), 8),
    ((3, 3, 3, 64), matrices.MatrixView((0, 1, 2), (3,)), 8),  # wide: 27 x 64
    ((3, 3, 3, 16), matrices.MatrixView((0, 1, 2), (3,)), 8),  # no divisible axis: padded
    ((64, 4, 8), matrices.MatrixView((0,), (1, 2)), 4),
])
def test_row_layout_round_trips_and_keeps_the_gram_matrix(shape, view, devices):
    leaf = jax.random.normal(jax.random.key(0), shape)
    layout = sharding.RowLayout.of(shape, view, devices)
    tall = layout.to_rows(leaf)
    assert tall.shape[0] % devices == 0 and tall.shape[0] >= tall.shape[1]
    np.testing.assert_array_equal(layout.from_rows(tall, shape), leaf)
    matrix = np.asarray(view.to_matrix(leaf))
    side = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    np.testing.assert_allclose(np.asarray(tall.T @ tall), side.T @ side, rtol=1e-5, atol=1e-5)
    # Rows put back in the view's order give the view's own (tall side) matrix.
    np.testing.assert_allclose(np.asarray(layout.to_view(tall, shape, view)), side, rtol=0,
                               atol=0)


def test_mesh_option_is_validated():
    with pytest.raises(TypeError, match="mesh"):
        sharding.check_mesh("everywhere")
    assert sharding.mesh_of([jnp.ones((4, 4))]) is None
