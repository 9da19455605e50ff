"""jaxlr 1.0, tried as a new user would: one test per point of the 1.0 review (issue 30, items
1-10), each written as user code and checked against an independent computation (numpy, a hand
count) or the exact input it must leave alone.
"""

import inspect
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlr


def np_rank(kernel, tol=1e-4):
    matrix = np.asarray(kernel, np.float64)
    matrix = matrix.reshape(-1, matrix.shape[-1])
    s = np.linalg.svd(matrix, compute_uv=False)
    return int(np.sum(s > tol * s[0]))


class MLP(nnx.Module):
    """The review's NNX MLP 64-128-128-10."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(64, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 128, rngs=rngs)
        self.head = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(16, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, epsilon=1e-3)(x)
        x = nn.relu(x)
        x = nn.Conv(16, (3, 3))(x)
        return nn.Dense(4)(nn.relu(x).reshape(x.shape[0], -1))


X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 6, 3)), jnp.float32)


# 1. One default selection: the output layer is never cut unless asked for.


def test_1_the_first_compression_a_user_writes_leaves_the_classifier_alone():
    model = MLP(nnx.Rngs(0))
    head = np.asarray(model.head.kernel[...])
    ranks = jaxlr.gsvt_ranks(model, keep=0.3)
    assert set(ranks) == {"fc1/kernel", "fc2/kernel"}
    small = jaxlr.compress(model, ranks).compressed
    np.testing.assert_array_equal(np.asarray(small.head.kernel[...]), head)
    # The same selection from every entry point: LSVT by hand (floor(0.3 n)), the factorization,
    # the projection, and compress with a kept fraction.
    assert dict(jaxlr.lsvt_ranks(model, keep=0.3)) == {"fc1/kernel": 19, "fc2/kernel": 38}
    factored = jaxlr.factorize(model, 3, jax.random.key(0))
    assert isinstance(factored.head.kernel[...], jax.Array) and factored.fc1.kernel.depth == 3
    projected = jaxlr.project(model, keep=0.3)
    np.testing.assert_array_equal(np.asarray(projected.head.kernel[...]), head)
    assert np_rank(projected.fc2.kernel[...]) == 38
    report = jaxlr.compress(model, keep=0.3).report
    assert list(report.layers) == ["fc1/kernel", "fc2/kernel"]
    # Overriding it is one argument.
    assert "head/kernel" in jaxlr.lsvt_ranks(model, keep=0.3, filter="all")


def test_1_after_lrpet_compress_with_the_same_request_cuts_exactly_what_was_projected():
    model = CNN()
    variables = model.init(jax.random.key(0), X)
    params = variables["params"]
    tx = optax.chain(optax.sgd(0.0), jaxlr.low_rank_projection(prune=0.5))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    trained = optax.apply_updates(params, updates)
    changed = {key for key in ("Conv_0", "Conv_1", "Dense_0")
               if not np.array_equal(trained[key]["kernel"], params[key]["kernel"])}
    assert changed == {"Conv_0", "Conv_1"}  # the head left alone
    report = jaxlr.compress(trained, prune=0.5).report
    assert {key.split("/")[0] for key in report.layers} == changed
    assert [layer.rank for layer in report.layers.values()] == [8, 8]  # floor(0.5 * 16)


def test_1_the_rule_from_the_tree_agrees_with_the_dataflow_or_says_it_cannot_tell():
    model = CNN()
    variables = model.init(jax.random.key(0), X)
    traced = jaxlr.find_layers(model, variables, X)
    assert list(jaxlr.selection.matrix_leaves(variables, filter=traced)) == list(
        jaxlr.selection.matrix_leaves(variables)) == ["Conv_0/kernel", "Conv_1/kernel"]
    # Two equal-width layers: no rule from widths can tell the head; a clear error, not a guess.
    square = {"body": {"kernel": jnp.ones((8, 8))}, "head": {"kernel": jnp.ones((8, 8))}}
    with pytest.raises(ValueError, match="filter='all'"):
        jaxlr.lsvt_ranks(square, keep=0.5)
    assert jaxlr.lsvt_ranks(square, keep=0.5, filter=jaxlr.kernel_filter(exclude="head")) == {
        "body/kernel": 4}


# 2. A fraction is always named.


def test_2_a_positional_fraction_is_refused_everywhere_naming_keep_and_prune():
    params = {"a": {"kernel": jnp.ones((8, 6))}, "b": {"kernel": jnp.ones((6, 4))}}
    calls = [lambda: jaxlr.lsvt_ranks(params, 0.3), lambda: jaxlr.gsvt_ranks(params, 0.3),
             lambda: jaxlr.low_rank_projection(0.3),
             lambda: jaxlr.with_low_rank_projection(optax.sgd(0.1), 0.3),
             lambda: jaxlr.project(params, 0.3), lambda: jaxlr.compress(params, 0.3)]
    for call in calls:
        with pytest.raises(TypeError, match="keep="):
            call()
    with pytest.raises(TypeError, match="reduction="):
        jaxlr.target_ranks(params, 0.3)


# 3. Equinox: factorized and compressed modules run.


def test_3_a_compressed_equinox_mlp_runs_on_its_factor_pairs():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(32, 10, width_size=64, depth=2, key=jax.random.key(0))
    result = jaxlr.compress(mlp, keep=0.25)  # Equinox layout and kernels by default
    assert list(result.report.layers) == ["layers/0/weight", "layers/1/weight"]  # not the head
    small = result.compressed
    assert isinstance(small.layers[0].weight, jaxlr.LowRank)
    x = jax.random.normal(jax.random.key(1), (32,))
    dense = [np.asarray(layer.weight, np.float64) for layer in mlp.layers]
    h = np.asarray(x, np.float64)
    for i, layer in enumerate(mlp.layers):
        w = dense[i]
        if i < 2:  # the numpy truncation of the (in, out) matrix to floor(min(m, n) / 4)
            r = min(w.shape) // 4
            u, s, vt = np.linalg.svd(w.T, full_matrices=False)
            w = ((u[:, :r] * s[:r]) @ vt[:r]).T
        h = w @ h + np.asarray(layer.bias, np.float64)
        if i < 2:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(np.asarray(small(x)), h, rtol=1e-4, atol=1e-4)


# 4. compress takes the request and the options of project.


def test_4_compress_takes_the_rank_request_and_options_of_project():
    rng = np.random.default_rng(1)
    params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
              "fc": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)},
              "head": {"kernel": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}}
    options = jaxlr.ProjectionOptions(filter="conv", energy_transfer=False)
    projected = jaxlr.project(params, prune=0.5, options=options)
    compressed = jaxlr.compress(params, prune=0.5, options=options)
    assert list(compressed.report.layers) == ["conv/kernel"]
    np.testing.assert_allclose(np.asarray(jaxlr.collapse(compressed.compressed)["conv"]["kernel"]),
                               np.asarray(projected["conv"]["kernel"]), atol=1e-5)
    assert jaxlr.ProjectionOptions().method == "auto"  # compress's default, as project's
    with pytest.raises(ValueError, match="bn_pairs"):
        jaxlr.compress(params, prune=0.5,
                       options=jaxlr.ProjectionOptions(bn_pairs={"conv/kernel": "bn"}))
    with pytest.raises(ValueError, match="exactly one of prune"):
        jaxlr.compress(params, keep=0.5, prune=0.5)


# 5. The transformation's state says what it did.


def test_5_the_projection_state_reports_ranks_and_kept_fraction_under_jit():
    params = {"a": {"kernel": jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 2, 8)),
                                          jnp.float32)}}
    tx = jaxlr.low_rank_projection(keep=0.5)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    assert np.asarray(state.ranks).tolist() == [4] and float(state.kept) == pytest.approx(0.5)
    assert "\n" not in repr(state) and "sketch" not in repr(state)


# 6. and 7. Compact reprs, one percent convention.


def test_6_7_reprs_are_one_line_and_tables_print_the_fraction_kept():
    params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (48, 64))}}
    node = jaxlr.compress(params, ranks={"Dense_0/kernel": 4}).compressed["Dense_0"]["kernel"]
    for text in (repr(node), repr(jaxlr.factorize(params, 3, jax.random.key(1))["Dense_0"][
            "kernel"])):
        assert "\n" not in text and "48" in text and "64" in text and len(text) < 200
    report = jaxlr.compress(params, ranks={"Dense_0/kernel": 4}).report
    kept = 4 * (48 + 64) / (48 * 64)
    assert f"({kept:.1%})" in report.table()
    model = nn.Dense(64)
    cost = jaxlr.forward_cost(lambda p, x: model.apply({"params": p}, x),
                              {"kernel": params["Dense_0"]["kernel"], "bias": jnp.zeros(64)},
                              jnp.ones((1, 48)))
    assert "-" not in cost.table().splitlines()[-1].split("(")[-1]  # a kept fraction, not a cut


# 8. find_bn_pairs carries each BatchNorm's epsilon into the projection.


def test_8_a_batchnorm_of_another_epsilon_is_rectified_with_its_own():
    model = CNN()
    variables = model.init(jax.random.key(0), X)
    pairs = jaxlr.find_bn_pairs(model, variables, X)
    assert pairs == {"Conv_0/kernel": "BatchNorm_0"} and pairs["Conv_0/kernel"].epsilon == 1e-3
    stats = {"BatchNorm_0": {"mean": jnp.zeros(16), "var": jnp.linspace(0.01, 0.5, 16)}}
    out = jaxlr.project(variables["params"], ranks={"Conv_0/kernel": 4}, batch_stats=stats,
                        options=jaxlr.ProjectionOptions(bn_pairs=pairs))
    kernel = np.asarray(variables["params"]["Conv_0"]["kernel"], np.float64).reshape(27, 16)
    a = np.ones(16) / np.sqrt(np.linspace(0.01, 0.5, 16) + 1e-3)  # gamma = 1
    u, s, vt = np.linalg.svd(kernel * a, full_matrices=False)
    kept = s[:4] * np.sqrt(np.sum(s**2) / np.sum(s[:4] ** 2))
    want = ((u[:, :4] * kept) @ vt[:4]) * (a / (a * a + 1e-5))
    np.testing.assert_allclose(np.asarray(out["Conv_0"]["kernel"]).reshape(27, 16), want,
                               rtol=1e-4, atol=1e-5)


# 9. A small public surface, no aliases.


def test_9_about_25_top_level_names_each_defined_once():
    assert len(jaxlr.__all__) <= 25
    for name in jaxlr.__all__:
        assert getattr(jaxlr, name) is not None
    assert not hasattr(jaxlr.lorita, "collapse") and not hasattr(jaxlr.lorita, "ordered")
    assert not {"intercept", "interceptor", "apply_fn"} & set(jaxlr.inference.__all__)
    for module in (jaxlr.svd, jaxlr.policies, jaxlr.selection, jaxlr.inference):
        for name in module.__all__:  # each function and class lives where it is documented
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                assert obj.__module__ == module.__name__, (module.__name__, name, obj.__module__)


# 10. The mesh default finds the mesh of traced values under jit.


def test_10_jit_on_an_auto_mesh_gathers_no_whole_kernel(tmp_path):
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, jaxlr
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
        spec = NamedSharding(mesh, P(None, None, None, "d"))
        params = {f"conv{i}": {"kernel": jax.device_put(
            jax.random.normal(jax.random.key(i), (3, 3, 64, 128)), spec)} for i in range(2)}
        step = jax.jit(lambda p: jaxlr.project(p, prune=0.5))
        hlo = step.lower(params).compile().as_text()
        gathers = [l for l in hlo.splitlines() if "all-gather" in l and "576,128" in l]
        print(len(gathers))
    """)
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_force_host_platform_device_count=8").strip()}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=240, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0"


def test_10_weights_on_a_mesh_of_explicit_axes_are_projected_compressed_and_measured():
    """The single-device maths on arrays typed with an Explicit sharding (a one-device mesh, or
    mesh=None): the results of the unsharded arrays, with the input's sharding."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))  # Explicit axes by default
    rng = np.random.default_rng(3)
    plain = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)},
             "head": {"kernel": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)}}
    placed = jax.device_put(plain, NamedSharding(mesh, P(None, "fsdp")))
    for options in (None, jaxlr.ProjectionOptions(mesh=None)):
        out = jaxlr.project(placed, prune=0.5, options=options)
        np.testing.assert_allclose(np.asarray(out["Dense_0"]["kernel"]),
                                   np.asarray(jaxlr.project(plain, prune=0.5)["Dense_0"]["kernel"]),
                                   atol=1e-5)
        assert out["Dense_0"]["kernel"].sharding.spec == P(None, "fsdp")
    small = jaxlr.compress(placed, keep=0.5).compressed["Dense_0"]["kernel"]
    u, s, vt = np.linalg.svd(np.asarray(plain["Dense_0"]["kernel"], np.float64))
    np.testing.assert_allclose(np.asarray(small.kernel()), (u[:, :16] * s[:16]) @ vt[:16],
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(jaxlr.svd.singular_values(placed)["Dense_0/kernel"]),
                               s, rtol=1e-5)


def test_1_a_decoder_reshape_does_not_hide_the_output_layer():
    """A dense layer reshaped into a map for a transposed convolution is a hidden layer, not the
    output layer: an autoencoder's output has its input's channels, so the widths cannot tell
    which layer is last and the default selection says so (it cut the output layer and left the
    dense one whole before); the dataflow can, and the compressed Linen model runs (a layer that
    cannot run a pair factored runs the kernel the pair stands for)."""

    class AutoEncoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Conv(16, (3, 3))(x))
            h = nn.relu(nn.Conv(32, (3, 3))(h)).mean((1, 2))
            h = nn.relu(nn.Dense(512)(nn.Dense(8)(h))).reshape(x.shape[0], 4, 4, 32)
            h = nn.relu(nn.ConvTranspose(16, (3, 3), strides=(2, 2))(h))
            return nn.ConvTranspose(3, (3, 3), strides=(2, 2))(h)

    model, x = AutoEncoder(), jnp.ones((2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="find_layers"):
        jaxlr.compress(variables["params"], keep=0.5)
    layers = jaxlr.find_layers(model, variables, x)
    assert layers.exclude == "^(?:ConvTranspose_1/kernel)$"
    result = jaxlr.compress(variables["params"], keep=0.5,
                            options=jaxlr.ProjectionOptions(filter=layers))
    assert "Dense_1/kernel" in result.report.layers
    out = jaxlr.apply(model, {"params": result.compressed}, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(
        model.apply({"params": jaxlr.collapse(result.compressed)}, x)), rtol=1e-5, atol=1e-5)
