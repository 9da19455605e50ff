"""Smoke test of the benchmark module on a tiny network (its figures live in BENCHMARKS.md)."""

import numpy as np
import pytest

from experiments.benchmarks import svd_projection


def test_shapes_of_the_benchmarked_networks():
    vgg = svd_projection.vgg16_conv_shapes()
    resnet = svd_projection.resnet56_conv_shapes()
    assert len(vgg) == 13 and vgg["Conv_12"] == (3, 3, 512, 512)
    # ResNet-56: 1 + 3 stages x 9 blocks x 2 convolutions; option-A shortcuts add none.
    assert len(resnet) == 55 and resnet["stage2_block8/conv2"] == (3, 3, 64, 64)


def test_bench_tree_runs_and_every_method_is_accurate():
    shapes = {"Conv_0": (3, 3, 3, 8), "block/conv1": (3, 3, 8, 16)}
    tree = svd_projection.make_tree(shapes, "projected", ratio=0.5)
    row = svd_projection.bench_tree("tiny", tree, ratio=0.5, repeats=1)
    assert row["matrices"] == 2 and 0 <= row["gram_accepted"] <= 2
    for method in ("auto", "gram", "svd"):
        assert row[f"jaxlr_{method}_max_rel_error"] < 1e-4
    assert row["numpy_max_rel_error"] < 1e-5
    for key in ("jaxlr_auto_s", "jaxlr_gram_s", "jaxlr_svd_s", "jaxlr_auto_free_threads_s",
                "numpy_s"):
        assert row[key] > 0
    if "torch_reference_s" in row:
        assert row["torch_reference_max_rel_error"] < 1e-4
        assert row["torch_reference_s"] > 0 and row["torch_tuned_s"] > 0
    # The "projected" weights are rank r plus 5% noise, as documented.
    kernel = np.asarray(tree["block"]["conv1"]["kernel"]).reshape(72, 16)
    s = np.linalg.svd(kernel, compute_uv=False)
    assert s[8] < 0.2 * s[7]


def test_block_medians_time_each_run_in_its_own_sized_block():
    calls = []
    runs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    # instant runs: one sizing call, then as many calls as allowed, one run after the other
    medians = svd_projection.block_medians(runs, repeats=3, max_calls=7, pause=0)
    assert calls == ["a"] * 8 + ["b"] * 8 and set(medians) == {"a", "b"}
    calls.clear()
    svd_projection.block_medians(runs, repeats=10, max_calls=7, pause=0)  # repeats come first
    assert calls == ["a"] * 11 + ["b"] * 11
    calls.clear()
    svd_projection.block_medians(runs, repeats=2, min_seconds=0.0, pause=0)  # no time to fill
    assert calls == ["a"] * 3 + ["b"] * 3
    with pytest.raises(ValueError, match="repeats >= 1"):
        svd_projection.block_medians(runs, repeats=0)


def test_lowrank_inference_bench_hits_its_flop_target_and_its_prediction(monkeypatch):
    from experiments.benchmarks import lowrank_inference
    from experiments.models import CifarResNet

    monkeypatch.setitem(lowrank_inference.MODELS, "tiny", (lambda: CifarResNet(depth=8), 0.5))
    row, table = lowrank_inference.bench("tiny", batch=2, repeats=1, align=8)
    assert table is None  # the uniform choice measures nothing
    assert row["mac_reduction"] >= 0.5  # the largest ratio that still reaches the target
    assert row["factored_layers"] == row["ranked_layers"] == 7
    assert row["max_rel_output_error"] < 1e-4
    assert row["params_after"] < row["params_before"]
    assert row["goal"] == round(0.7 / (1 - row["mac_reduction"]), 3)


def test_lowrank_inference_bench_computes_in_bfloat16(monkeypatch):
    from experiments.benchmarks import lowrank_inference
    from experiments.models import CifarResNet

    monkeypatch.setitem(lowrank_inference.MODELS, "tiny", (lambda: CifarResNet(depth=8), 0.5))
    row, _ = lowrank_inference.bench("tiny", batch=2, repeats=1, align=8, dtype="bfloat16")
    assert row["dtype"] == "bfloat16" and row["mac_reduction"] >= 0.5
    # bfloat16 keeps 8 bits: the two passes round differently (float32 passes agree to 1e-6).
    assert 1e-4 < row["max_rel_output_error"] < 3e-2
    with pytest.raises(ValueError, match="dtype must be one of"):
        lowrank_inference.bench("tiny", batch=2, repeats=1, dtype="float16")


def test_lowrank_inference_fastest_at_target_stays_in_its_band_over_micro_batches(monkeypatch):
    from experiments.benchmarks import lowrank_inference
    from experiments.models import CifarResNet

    monkeypatch.setitem(lowrank_inference.MODELS, "tiny", (lambda: CifarResNet(depth=8), 0.5))
    row, table = lowrank_inference.bench("tiny", batch=4, repeats=1, choice="fastest-at-target",
                                         band=0.05, chunk=2, latency_repeats=1)
    assert 0.5 - 1e-3 <= row["mac_reduction"] <= 0.55 + 1e-3
    assert row["max_rel_output_error"] < 1e-4  # the micro-batched passes agree
    assert sum(entry["layers"] for entry in row["table"]) == len(table.layers) == 7
    again, same = lowrank_inference.bench("tiny", batch=4, repeats=1, choice="fastest", table=table)
    assert same is table and again["measure_latency_s"] is None  # the table is shared
    with pytest.raises(ValueError, match="chunk must divide the batch"):
        lowrank_inference.bench("tiny", batch=4, repeats=1, chunk=3)


def test_predicted_macs_equal_the_count_of_the_factored_model():
    import jax
    import jax.numpy as jnp

    import jaxlr
    from experiments.benchmarks import lowrank_inference
    from experiments.models import CifarResNet

    model = CifarResNet(depth=8)
    x = jnp.ones((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]

    def fn(p, x, apply=model.apply):
        return apply({**variables, "params": p}, x)

    dense = jaxlr.forward_cost(fn, params, x, xla=False)
    leaves = jaxlr.selection.matrix_leaves(params, filter="all")
    ranks = lowrank_inference.conv_ranks(dense, leaves, 0.3, 1)
    assert dict(ranks)["stage2_block0/conv2/kernel"] == round(0.3 * 64)
    compressed = jaxlr.compress(params, ranks).compressed
    factored = jaxlr.forward_cost(
        lambda p, x: jaxlr.apply(model, {**variables, "params": p}, x), compressed, x,
        xla=False)
    assert lowrank_inference.predicted_macs(dense, leaves, ranks) == factored.macs


def test_projection_floor_is_the_stated_closed_form():
    from experiments.benchmarks import svd_projection

    # a 100 x 10 matrix at rank 2: Gram 2*100*10*10 + rebuild 4*100*10*2 flops, plus its eigh
    floor = svd_projection.floor_seconds([(100, 10), (10, 30)], [2, 3], 1e9, {10: 0.5})
    expected = (20_000 + 8_000) / 1e9 + 0.5 + (2 * 30 * 10 * 10 + 4 * 30 * 10 * 3) / 1e9 + 0.5
    assert abs(floor - expected) < 1e-12


def test_lorita_step_minimum_ratio_by_hand():
    import jax

    import jaxlr
    from experiments.benchmarks import lorita_step

    params = {"Dense_0": {"kernel": jax.numpy.ones((8, 8))}}
    ftree = jaxlr.lorita.factorize(params, 3, jax.random.key(0), filter="all")
    # batch 2: applied, 3 * 2*8*8 = 384 MACs against 2*8*8 = 128 for the plain kernel
    assert lorita_step.minimum_ratio(params, ftree, 2) == 3.0
    # batch 1000: multiplied out, 2 * 8^3 + 1000*8*8 against 1000*8*8
    assert lorita_step.minimum_ratio(params, ftree, 1000) == (1024 + 64_000) / 64_000


def test_lorita_step_rows_met_are_batch_times_output_positions():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from experiments.benchmarks import lorita_step

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), name="same")(x)               # 5 x 5 outputs
            x = nn.Conv(4, (3, 3), strides=2, name="strided")(x)  # 3 x 3 outputs
            return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))

    model, x = Net(), jnp.ones((2, 5, 5, 3))
    params = model.init(jax.random.key(0), x)["params"]
    rows = lorita_step.rows_met(lambda p, v: model.apply({"params": p}, v), params, x)
    assert rows == {"same/kernel": 50, "strided/kernel": 18, "head/kernel": 2}


def test_lrpet_overhead_formula_by_hand():
    from experiments.benchmarks import lrpet_overhead

    # An epoch of 10 SGD steps of 2 s. LRPET's updates: 8 of 3 ms against SGD's 1 ms, one
    # projecting of 50 ms, one checking of 5 ms: 8 x 2 + 49 + 4 = 69 ms more than 20 s.
    assert lrpet_overhead.epoch_overhead(2.0, 0.001, 0.003, 0.05, 0.005, 10) == pytest.approx(
        0.069 / 20)
    # The projection alone: the LRPET step that does not project as the baseline, 47 + 2 ms.
    assert lrpet_overhead.epoch_overhead(2.0, 0.003, 0.003, 0.05, 0.005, 10) == pytest.approx(
        0.049 / 20)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        lrpet_overhead.epoch_overhead(1.0, 1.0, 1.0, 1.0, 1.0, 1)
    with pytest.raises(ValueError, match="sgd_step_s must be > 0"):
        lrpet_overhead.epoch_overhead(0.0, 1.0, 1.0, 1.0, 1.0, 5)


def test_lrpet_overhead_times_the_states_an_epoch_goes_through():
    """The state ``at_count`` makes for the projecting step projects every conv kernel to its
    rank (checked with numpy), the one of an ordinary step does not, and the step after a
    projection is counted as checking it."""
    import jax
    import jax.numpy as jnp

    import jaxlr
    from experiments import models
    from experiments.benchmarks import lrpet_overhead
    from experiments.train import make_step, new_state

    model = models.create("vgg:config=8/M/16")
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    y = jnp.arange(4) % 10
    variables = model.init(jax.random.key(1), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    ranks = jaxlr.lsvt_ranks(params, prune=0.6, filter="conv")
    pairs = jaxlr.find_bn_pairs(model, variables, x, train=True)
    tasks = lrpet_overhead._tasks(model, ranks, pairs, every=5)
    task = tasks["lrpet"]
    state = new_state(task, params, stats)
    step = make_step(task, jax.random.key(2))

    def conv_ranks(tree):  # each kernel (kh, kw, cin, cout) as a (kh kw cin) x cout matrix
        kernels = {jaxlr.matrices.path_key(path): np.asarray(leaf) for path, leaf in
                   jax.tree_util.tree_flatten_with_path(tree)[0]}
        return {key: int(np.linalg.matrix_rank(kernels[key].reshape(-1, kernels[key].shape[-1]),
                                               tol=1e-4)) for key in ranks}

    off, *_ = step(state, x, y)
    projected, *_ = step(state.replace(opt_state=lrpet_overhead.at_count(state.opt_state, 4,
                                                                          False)), x, y)
    full = conv_ranks(params)
    assert conv_ranks(off.params) == full
    assert conv_ranks(projected.params) == dict(ranks) != full
    moved = lrpet_overhead.at_count(state.opt_state, 5, True)
    flags = [(int(n.count), bool(n.pending)) for n in lrpet_overhead.projection_states(moved)]
    assert flags == [(5, True)]
    with pytest.raises(ValueError, match="no LowRankProjectionState"):
        lrpet_overhead.at_count(tasks["sgd"].optimizer.init(params), 1, False)


def test_lrpet_overhead_bench_runs_a_tiny_model(monkeypatch):
    from experiments import models
    from experiments.benchmarks import lrpet_overhead

    row = lrpet_overhead.bench("tiny", batch=4, repeats=1, steps_per_epoch=3, direct=True,
                               model=models.create("vgg:config=8/M/16"), image_shape=(8, 8, 3))
    assert row["steps_per_epoch"] == 3 and row["projected"] == 2
    assert set(row["step_s"]) == set(row["update_s"]) == {"sgd", "off", "project", "check",
                                                          "every_step"}
    s, u = row["step_s"], row["update_s"]
    assert row["projection_overhead"] == pytest.approx(
        (u["project"] + u["check"] - 2 * u["off"]) / (3 * s["sgd"]))
    assert row["overhead"] == pytest.approx(
        (u["off"] + u["project"] + u["check"] - 3 * u["sgd"]) / (3 * s["sgd"]))
    assert row["every_step_overhead"] == pytest.approx((u["every_step"] - u["sgd"]) / s["sgd"])
    assert row["epoch_ratio"] == pytest.approx(row["epoch_s"]["lrpet"] / row["epoch_s"]["sgd"])


def test_alternating_medians_call_every_run_once_per_round_in_shuffled_orders(monkeypatch):
    from experiments.benchmarks import lrpet_overhead

    clock = [0.0]
    calls = []
    seconds = {"a": [1.0, 5.0, 2.0, 3.0, 4.0], "b": [0.5, 0.1, 0.3, 0.2, 0.4],
               "c": [7.0, 9.0, 8.0, 6.0, 10.0]}

    def run(name):
        def call():
            calls.append(name)
            clock[0] += seconds[name].pop(0)
        return call

    monkeypatch.setattr(lrpet_overhead.time, "perf_counter", lambda: clock[0])
    medians = lrpet_overhead.alternating_medians({n: run(n) for n in "abc"}, repeats=5)
    rounds = [calls[i:i + 3] for i in range(0, 15, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
    assert medians == pytest.approx({"a": 3.0, "b": 0.3, "c": 8.0})
    with pytest.raises(ValueError, match="repeats >= 1"):
        lrpet_overhead.alternating_medians({"a": lambda: None}, repeats=0)


class _Parsed(Exception):
    """Raised by the patched parser once a benchmark's arguments have parsed."""


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_every_suite_job_is_a_command_line_its_benchmark_accepts(monkeypatch, preset):
    import argparse
    import importlib

    from experiments.benchmarks import suite

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    labels = [job.label for job in suite.PRESETS[preset]]
    assert len(set(labels)) == len(labels)
    for job in suite.PRESETS[preset]:
        argv = suite.command(job, "rows.json")
        assert argv[1:3] == ["-m", f"experiments.benchmarks.{job.module}"]
        module = importlib.import_module(f"experiments.benchmarks.{job.module}")
        with pytest.raises(_Parsed) as parsed:
            module.main(argv[3:])
        assert parsed.value.args[0].json == "rows.json"  # every benchmark writes its rows
    bad = suite.Job("bad", "lowrank_inference", ("--dtype", "float16"))
    with pytest.raises(SystemExit):  # the check fails on a command its benchmark refuses
        importlib.import_module("experiments.benchmarks.lowrank_inference").main(
            suite.command(bad, "x.json")[3:])


def test_suite_runs_each_job_in_its_own_process_and_records_how_it_ended(monkeypatch, tmp_path):
    import json
    import sys

    from experiments.benchmarks import suite

    scripts = {"ok": "print('figures')", "fails": "raise SystemExit(3)",
               "slow": "import time; time.sleep(30)"}
    monkeypatch.setattr(suite, "command",
                        lambda job, path: [sys.executable, "-c", scripts[job.label]])
    jobs = [suite.Job(label, "unused") for label in scripts]
    summary = suite.run(jobs, tmp_path / "out", timeout=3)
    assert [(e["label"], e["returncode"]) for e in summary] == [
        ("ok", 0), ("fails", 3), ("slow", None)]
    assert 2.5 < summary[2]["seconds"] < 25  # stopped at its timeout
    assert (tmp_path / "out" / "ok.log").read_text() == "figures\n"
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    with pytest.raises(ValueError, match="timeout must be > 0"):
        suite.run(jobs, tmp_path, timeout=0)
    with pytest.raises(SystemExit):
        suite.main(["--preset", "gpu", "--only", "no-such-job"])


def test_sharded_projection_gets_its_devices_or_refuses_to_run():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def python(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120, check=False)

    # `python -m experiments.benchmarks.sharded_projection` sets XLA_FLAGS when it starts, which
    # only takes effect if importing its package has not started jax already.
    started = python("import sys, experiments.benchmarks; print('jax' in sys.modules)")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "False"
    # Imported (not run as a module) without the flag, it sees one CPU device and says so
    # instead of measuring one device under the heading of eight.
    one = python("from experiments.benchmarks import sharded_projection as s; "
                 "s.main(['--repeats', '1'])")
    assert one.returncode == 1
    assert "needs 8 devices, jax sees 1" in one.stderr
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=8" in one.stderr


def test_decomposition_parts_times_every_step_of_one_matrix():
    from experiments.benchmarks import svd_projection

    row = svd_projection.decomposition_parts(rows=64, cols=16, ratio=0.6, repeats=1)
    assert row["shape"] == "64 x 16" and row["rank"] == 6  # floor(16 - 0.6 * 16)
    steps = ("gram_product", "eigh", "qr", "square_svd", "project_svd", "project_auto",
             "project_gram", "4_qr_one_program", "4_qr_four_threads")
    assert all(row[f"jaxlr_{step}_s"] > 0 for step in steps)


def test_calibration_benchmark_times_every_path_on_a_tiny_fcn(tmp_path):
    import json

    from experiments.benchmarks import calibration

    out = calibration.main(["--width", "16", "--batches", "2", "--batch", "8", "--repeats", "1",
                            "--json", str(tmp_path / "rows.json")])
    row = out["rows"][0]
    assert row["kernels"] == 8
    assert row["moment_mib"] == (784**2 + 7 * 16**2) * 4 / 2**20   # every kernel's m x m
    for key in ("plain_warm_s", "calibrate_warm_s", "aware_warm_s", "sweep_cold_s"):
        assert row[key] > 0
    assert json.loads((tmp_path / "rows.json").read_text())["rows"][0]["model"] == "fcn"
