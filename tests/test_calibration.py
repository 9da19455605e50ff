"""Data-aware truncation: calibration moments against numpy (dense inputs, explicit im2col patches,
attention), whitened cuts against the Eckart-Young optimum of ``X W``, singular moments, GSVT on
whitened spectra, sweeps, Linen / NNX / Equinox, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlr
from jaxlr import whitening

WORKER = Path(__file__).with_name("_calibration_worker.py")


def np_(x):
    return np.asarray(x, np.float64)


def dense(leaf):
    """A compressed kernel as its dense matrix (a factor pair, or a kernel kept dense)."""
    return np_(leaf.kernel() if isinstance(leaf, jaxlr.LowRank) else leaf)


def batches_of(x, size):
    return [x[i:i + size] for i in range(0, len(x), size)]


def optimum(xw: np.ndarray, rank: int) -> float:
    """Eckart-Young: the least ``||X W - M||_F`` over matrices ``M`` of rank ``rank``."""
    return float(np.sqrt(np.sum(np.linalg.svd(xw, compute_uv=False)[rank:] ** 2)))


def im2col(x: np.ndarray, kernel: tuple[int, int], strides, padding, dilation,
           channels_first: bool = False) -> np.ndarray:
    """Explicit patches of an NHWC image batch, rows ordered (kh, kw, c) (Flax's HWIO matrix
    rows), or (c, kh, kw) with ``channels_first`` (PyTorch's OIHW matrix rows)."""
    (pt, pb), (pl, pr) = padding
    x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    n, h, w, c = x.shape
    kh, kw = kernel
    oh = (h - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    rows = []
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = np.empty((kh, kw, c))
                for a in range(kh):
                    for d in range(kw):
                        patch[a, d] = x[b, i * strides[0] + a * dilation[0],
                                        j * strides[1] + d * dilation[1]]
                rows.append(patch.transpose(2, 0, 1).ravel() if channels_first
                            else patch.ravel())
    return np.stack(rows)


# ------------------------------------------------------------------------------------------------
# Moments against numpy.


def test_dense_moments_are_the_mean_outer_product_of_each_layers_inputs():
    model = nn.Sequential([nn.Dense(12), nn.relu, nn.Dense(5)])
    x = jax.random.normal(jax.random.key(0), (70, 9))
    variables = model.init(jax.random.key(1), x)
    c = jaxlr.calibrate(model, batches_of(x, 32), variables=variables)   # 32 + 32 + 6 rows
    p = variables["params"]
    hidden = np.maximum(np_(x) @ np_(p["layers_0"]["kernel"]) + np_(p["layers_0"]["bias"]), 0)
    np.testing.assert_allclose(np_(c.moments["layers_0/kernel"]), np_(x).T @ np_(x) / 70,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_(c.moments["layers_2/kernel"]), hidden.T @ hidden / 70,
                               rtol=1e-5, atol=1e-6)
    assert c.counts == {"layers_0/kernel": 70, "layers_2/kernel": 70} and c.unseen == {}


@pytest.mark.parametrize("strides,padding,dilation", [
    ((1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 1), ((0, 2), (1, 0)), (1, 2)),
])
def test_conv_moments_equal_those_of_explicit_im2col_patches(strides, padding, dilation):
    model = nn.Conv(4, (3, 2), strides=strides, padding=padding, kernel_dilation=dilation)
    x = jax.random.normal(jax.random.key(0), (3, 7, 6, 2))
    variables = model.init(jax.random.key(1), x)
    c = jaxlr.calibrate(model, [x[:2], x[2:]], variables=variables)
    patches = im2col(np_(x), (3, 2), strides, padding, dilation)
    np.testing.assert_allclose(np_(c.moments["kernel"]), patches.T @ patches / len(patches),
                               rtol=1e-5, atol=1e-6)
    assert c.counts["kernel"] == len(patches)


def test_equinox_conv_moments_follow_the_torch_layout():
    conv = eqx.nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=((1, 0), (2, 1)),
                         key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 2, 5, 6))          # NCHW, one image per call
    c = jaxlr.calibrate(conv, [x], filter="all")
    patches = im2col(np_(x).transpose(0, 2, 3, 1), (2, 3), (1, 2), ((1, 0), (2, 1)), (1, 1),
                     channels_first=True)
    np.testing.assert_allclose(np_(c.moments["weight"]), patches.T @ patches / len(patches),
                               rtol=1e-5, atol=1e-6)


def test_attention_projections_see_the_block_input_and_the_heads_output():
    block = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    x = jax.random.normal(jax.random.key(0), (3, 5, 6))
    variables = block.init(jax.random.key(1), x)
    c = jaxlr.calibrate(block, [x], variables=variables)
    p = jax.tree.map(np_, variables["params"])
    rows = np_(x).reshape(-1, 6)
    for name in ("query", "key", "value"):
        np.testing.assert_allclose(np_(c.moments[f"{name}/kernel"]), rows.T @ rows / len(rows),
                                   rtol=1e-5, atol=1e-6)
    q, k, v = (np.einsum("btf,fhd->bthd", np_(x), p[n]["kernel"]) + p[n]["bias"]
               for n in ("query", "key", "value"))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(4)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(-1, 8)
    np.testing.assert_allclose(np_(c.moments["out/kernel"]), heads.T @ heads / len(heads),
                               rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Whitened truncation against Eckart-Young.


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_whitened_dense_cut_reaches_the_eckart_young_optimum_of_x_w(rank):
    rng = np.random.default_rng(rank)
    x = rng.normal(size=(400, 16)) * np.linspace(0.05, 4, 16)     # anisotropic, full column rank
    model = nn.Dense(12)
    variables = model.init(jax.random.key(0), jnp.ones((1, 16)))
    x32 = jnp.asarray(x, jnp.float32)
    c = jaxlr.calibrate(model, batches_of(x32, 128), variables=variables, damping=0.0)
    w = np_(variables["params"]["kernel"])
    xw = np_(x32) @ w
    aware = jaxlr.compress(variables, ranks={"kernel": rank}, calibration=c).compressed
    plain = jaxlr.compress(variables, ranks={"kernel": rank}).compressed
    error = np.linalg.norm(xw - np_(x32) @ dense(aware["params"]["kernel"]))
    plain_error = np.linalg.norm(xw - np_(x32) @ dense(plain["params"]["kernel"]))
    best = optimum(xw, rank)
    assert error == pytest.approx(best, rel=2e-4, abs=1e-5)
    assert plain_error > best * 1.05          # plain SVD is not optimal on these inputs


def test_whitened_conv_cut_reaches_the_optimum_on_the_patches():
    model = nn.Conv(6, (3, 3), padding="VALID")
    x = jax.random.normal(jax.random.key(0), (6, 9, 9, 2)) * jnp.array([3.0, 0.2])
    variables = model.init(jax.random.key(1), x)
    c = jaxlr.calibrate(model, [x], variables=variables, damping=0.0)
    patches = im2col(np_(x), (3, 3), (1, 1), ((0, 0), (0, 0)), (1, 1))
    w = np_(variables["params"]["kernel"]).reshape(18, 6)
    node = jaxlr.compress(variables, ranks={"kernel": 2}, calibration=c).compressed[
        "params"]["kernel"]
    cut = dense(node).reshape(18, 6)
    error = np.linalg.norm(patches @ w - patches @ cut)
    assert error == pytest.approx(optimum(patches @ w, 2), rel=2e-4)


def test_whitened_spectra_measure_the_output_error_of_each_cut():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(300, 10)) * np.arange(1, 11), jnp.float32)
    model = nn.Dense(8)
    variables = model.init(jax.random.key(0), x[:1])
    c = jaxlr.calibrate(model, [x], variables=variables, damping=0.0)
    values = np_(jaxlr.sweep(variables, calibration=c, filter="all").spectra["kernel"])
    xw = np_(x) @ np_(variables["params"]["kernel"])
    # s_i^2 of R W are the singular values of X W / sqrt(rows), squared.
    np.testing.assert_allclose(values, np.linalg.svd(xw / np.sqrt(300), compute_uv=False),
                               rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Singular moments.


def test_singular_moments_give_finite_documented_cuts():
    rng = np.random.default_rng(0)
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)])
    x = rng.normal(size=(6, 20))                  # fewer rows than inputs
    x[:, :5] = 0.0                                # constant (border) inputs
    x = jnp.asarray(x, jnp.float32)
    variables = model.init(jax.random.key(0), x)
    for damping in (0.0, 0.01):
        c = jaxlr.calibrate(model, [x], variables=variables, damping=damping)
        eigenvalues = np.linalg.eigvalsh(np_(c.moments["layers_0/kernel"]))
        assert np.all(eigenvalues[:-6] < 1e-5 * eigenvalues[-1])      # singular: rank 6 of 20
        out = jaxlr.compress(variables, keep=0.5, calibration=c, options=jaxlr.ProjectionOptions(
            filter="all")).compressed
        for leaf in jax.tree.leaves(out):
            assert np.all(np.isfinite(np_(leaf)))


def test_zero_inputs_cut_plainly_and_a_large_damping_tends_to_plain_svd():
    model = nn.Dense(6)
    variables = model.init(jax.random.key(0), jnp.ones((1, 10)))
    plain = dense(jaxlr.compress(variables, ranks={"kernel": 3}).compressed["params"]["kernel"])
    zeros = jaxlr.calibrate(model, [jnp.zeros((4, 10))], variables=variables)
    dead = dense(jaxlr.compress(variables, ranks={"kernel": 3}, calibration=zeros).compressed[
        "params"]["kernel"])
    np.testing.assert_allclose(dead, plain, atol=1e-5)
    x = jax.random.normal(jax.random.key(1), (50, 10)) * jnp.linspace(0.1, 3, 10)
    heavy = jaxlr.calibrate(model, [x], variables=variables, damping=1e6)
    damped = dense(jaxlr.compress(variables, ranks={"kernel": 3}, calibration=heavy).compressed[
        "params"]["kernel"])
    np.testing.assert_allclose(damped, plain, atol=1e-3)


def test_whitener_is_the_damped_square_root_of_the_moment():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5))                               # rank 3 of 5
    moment = x.T @ x / 3
    root, inverse = (np_(a) for a in whitening.whitener(jnp.asarray(moment, jnp.float32), 0.1))
    damped = moment + 0.1 * np.trace(moment) / 5 * np.eye(5)
    np.testing.assert_allclose(root @ root, damped, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(root @ inverse, np.eye(5), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Policies and sweeps.


def test_gsvt_with_a_calibration_pools_the_whitened_values():
    rng = np.random.default_rng(0)
    model = nn.Sequential([nn.Dense(10), nn.relu, nn.Dense(7), nn.relu, nn.Dense(3)])
    x = jnp.asarray(rng.normal(size=(200, 12)) * np.linspace(0.2, 2, 12), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    c = jaxlr.calibrate(model, [x], variables=variables)
    values = {}
    for key in ("layers_0/kernel", "layers_2/kernel"):
        w = np_(variables["params"][key.split("/")[0]]["kernel"])
        moment = np_(c.moments[key])
        eig, q = np.linalg.eigh(moment)
        eig = np.maximum(eig, 0)
        root = (q * np.sqrt(eig + 0.01 * eig.mean())) @ q.T
        values[key] = np.linalg.svd(root @ w, compute_uv=False)
    pooled = sorted(((v, k) for k, vs in values.items() for v in vs), reverse=True)
    for keep in (0.2, 0.5, 0.8):
        kept = pooled[:int(keep * len(pooled))]
        expected = {k: max(1, sum(1 for _, owner in kept if owner == k)) for k in values}
        assert dict(jaxlr.gsvt_ranks(variables, keep=keep, calibration=c)) == expected


def test_sweep_gives_compress_results_and_compiles_nothing_per_budget():
    rng = np.random.default_rng(0)
    model = nn.Sequential([nn.Conv(8, (3, 3)), nn.relu, lambda y: y.reshape(y.shape[0], -1),
                           nn.Dense(16), nn.relu, nn.Dense(4)])
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    c = jaxlr.calibrate(model, [x], variables=variables)
    s = jaxlr.sweep(variables, calibration=c)
    run = jax.jit(model.apply)
    compiles = []

    def listen(event, duration, **kwargs):
        if "backend_compile" in event:
            compiles.append(event)

    outputs = {}
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for i, keep in enumerate((0.6, 0.45, 0.3, 0.2, 0.1)):
            ranks = jaxlr.gsvt_ranks(variables, keep=keep, spectra=s.spectra)
            before = len(compiles)
            tree = s.truncate(ranks)
            result = s.compress(ranks)
            outputs[keep] = np_(run(tree, x))
            if i:
                assert len(compiles) == before, keep
            reference = jaxlr.compress(variables, ranks, calibration=c)
            assert result.report == reference.report
            for key in ranks:
                name = key.split("/")[0]
                got = result.compressed["params"][name]["kernel"]
                want = reference.compressed["params"][name]["kernel"]
                np.testing.assert_allclose(dense(got), dense(want), atol=1e-5)
                np.testing.assert_allclose(np_(tree["params"][name]["kernel"]), dense(want),
                                           atol=1e-5)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert not np.allclose(outputs[0.6], outputs[0.1])


# ------------------------------------------------------------------------------------------------
# The three frameworks and LoRITa.


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(12, 10, rngs=rngs)
        self.fc2 = nnx.Linear(10, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def test_nnx_and_equinox_layers_reach_the_optimum_through_the_same_api():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(120, 12)) * np.linspace(0.1, 3, 12), jnp.float32)
    model = _NNXNet(nnx.Rngs(0))
    c = jaxlr.calibrate(model, [x[:60], x[60:]], damping=0.0)
    out = jaxlr.compress(model, ranks={"fc1/kernel": 3}, calibration=c).compressed
    w = np_(model.fc1.kernel[...])
    hidden = np_(jax.nn.relu(out.fc1(x)))               # the compressed module runs
    assert np.all(np.isfinite(hidden))
    cut = np_(out.fc1(x)) - np_(model.fc1.bias[...])
    assert np.linalg.norm(np_(x) @ w - cut) == pytest.approx(optimum(np_(x) @ w, 3), rel=2e-4)

    linear = eqx.nn.Linear(12, 6, key=jax.random.key(0))
    c = jaxlr.calibrate(linear, [x], filter="all", damping=0.0)
    small = jaxlr.compress(linear, ranks={"weight": 2}, calibration=c,
                           options=jaxlr.ProjectionOptions(filter="all")).compressed
    xw = np_(x) @ np_(linear.weight).T
    outputs = np_(jax.vmap(small)(x)) - np_(linear.bias)
    assert np.linalg.norm(xw - outputs) == pytest.approx(optimum(xw, 2), rel=2e-4)


def test_a_lorita_model_is_calibrated_as_the_dense_model_it_stands_for():
    model = nn.Sequential([nn.Dense(10), nn.relu, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (40, 8))
    variables = model.init(jax.random.key(1), x)
    factored = jaxlr.factorize(variables, depth=3, key=jax.random.key(2))
    dense = jaxlr.collapse(factored)
    c = jaxlr.calibrate(model, [x], variables=factored)
    reference = jaxlr.calibrate(model, [x], variables=dense)
    for key in reference.moments:
        np.testing.assert_allclose(np_(c.moments[key]), np_(reference.moments[key]), rtol=1e-5)
    out = jaxlr.compress(factored, keep=0.5, calibration=c)
    assert out.report.layers["layers_0/kernel"].rank == 4


# ------------------------------------------------------------------------------------------------
# Bad input.


@pytest.fixture(scope="module")
def small():
    model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])
    x = jnp.ones((4, 5))
    return model, model.init(jax.random.key(0), x), x


def test_bad_batches_are_refused_by_index(small):
    model, variables, x = small
    with pytest.raises(ValueError, match="batches is empty"):
        jaxlr.calibrate(model, [], variables=variables)
    with pytest.raises(ValueError, match="batch 1 has .*unlike batch 0"):
        jaxlr.calibrate(model, [x, jnp.ones((4, 6))], variables=variables)
    with pytest.raises(ValueError, match="batch 1 has .*unlike batch 0"):
        jaxlr.calibrate(model, [x, jnp.ones((4, 5), jnp.int32)], variables=variables)
    with pytest.raises(ValueError, match="batch 2 holds NaN or Inf"):
        jaxlr.calibrate(model, [x, x, x.at[0, 0].set(jnp.inf)], variables=variables)
    with pytest.raises(TypeError, match="numeric"):
        jaxlr.calibrate(model, [np.array([["a"] * 5])], variables=variables)
    with pytest.raises(ValueError, match="could not run on batch 0"):
        jaxlr.calibrate(model, [jnp.ones((4, 7))], variables=variables)
    with pytest.raises(TypeError, match="not one array"):
        jaxlr.calibrate(model, x, variables=variables)
    with pytest.raises(TypeError, match="needs its variables"):
        jaxlr.calibrate(model, [x])


def test_bad_settings_are_refused(small):
    model, variables, x = small
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        jaxlr.calibrate(model, [x], variables=variables, damping=-1.0)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        jaxlr.calibrate(model, [x], variables=variables, dtype=jnp.float16)
    with pytest.raises(TypeError, match="calibration must be a jaxlr.calibration.Calibration"):
        jaxlr.compress(variables, keep=0.5, calibration={"layers_0/kernel": jnp.eye(5)})


def test_a_calibration_of_another_tree_or_selection_is_refused(small):
    model, variables, x = small
    c = jaxlr.calibrate(model, [x], variables=variables,
                        filter=lambda path, leaf: path[-2:] == ("layers_2", "kernel"))
    with pytest.raises(ValueError, match="'layers_0/kernel' was not calibrated"):
        jaxlr.compress(variables, keep=0.5, calibration=c)
    with pytest.raises(ValueError, match="'layers_0/kernel' was not calibrated"):
        jaxlr.gsvt_ranks(variables, keep=0.5, calibration=c)
    wider = nn.Sequential([nn.Dense(7), nn.relu, nn.Dense(3)])
    other = wider.init(jax.random.key(0), x)
    c = jaxlr.calibrate(model, [x], variables=variables)
    with pytest.raises(ValueError, match=r"'layers_0/kernel' has shape \(5, 7\).*saw shape"):
        jaxlr.compress(other, keep=0.5, calibration=c)
    with pytest.raises(ValueError, match="spectra= or calibration=, not both"):
        jaxlr.gsvt_ranks(variables, keep=0.5, calibration=c, spectra={})


def test_a_kernel_the_pass_cannot_follow_is_named():
    class Reshaped(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", nn.initializers.normal(), (4, 6))
            return x @ kernel.reshape(6, 4)

    model = Reshaped()
    x = jnp.ones((3, 6))
    variables = model.init(jax.random.key(0), x)
    c = jaxlr.calibrate(model, [x], variables=variables)
    assert "reshape" in c.unseen["kernel"] and "kernel" not in c.moments
    with pytest.raises(ValueError, match="could not follow kernel 'kernel'.*reshape"):
        jaxlr.compress(variables, ranks={"kernel": 2}, calibration=c)


# ------------------------------------------------------------------------------------------------
# On a mesh.


@pytest.mark.slow
def test_calibration_on_a_mesh_all_reduces_the_moments_and_gathers_no_activation():
    out = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                         check=True, timeout=240)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result.pop("devices") == 8
    assert len(result) == 2                       # explicit and automatic sharding
    for mode in result.values():
        assert mode["max_difference"] < 1e-5      # the same moments as on one device
        assert mode["all_reduces"] >= 1 and mode["all_gathers"] == 0
        assert mode["replicated"]


def test_remat_layers_bf16_batches_and_numpy_damping_are_calibrated():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.relu(nn.remat(nn.Dense)(16)(x)))

    x = jax.random.normal(jax.random.key(0), (32, 6))
    variables = Net().init(jax.random.key(1), x)
    c = jaxlr.calibrate(Net(), [x], variables=variables, damping=np.float32(0.1))
    assert c.unseen == {} and c.damping == pytest.approx(0.1)
    np.testing.assert_allclose(np_(c.moments["CheckpointDense_0/kernel"]),
                               np_(x).T @ np_(x) / 32, rtol=1e-5, atol=1e-6)
    model = nn.Dense(3)
    small = model.init(jax.random.key(0), x)
    half = jaxlr.calibrate(model, [x.astype(jnp.bfloat16)], variables=small)
    rows = np_(x.astype(jnp.bfloat16))
    np.testing.assert_allclose(np_(half.moments["kernel"]), rows.T @ rows / 32, rtol=1e-5)


def test_a_moment_that_overflows_is_refused_by_name():
    model = nn.Sequential([nn.Dense(8), nn.Dense(4)])
    x = jnp.ones((4, 5)) * 1e19                                   # finite inputs, squares overflow
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"layers_0/kernel.*not finite"):
        jaxlr.calibrate(model, [x], variables=variables)


def test_nnx_policies_and_lorita_sweeps_take_a_calibration():
    model = _NNXNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (50, 12))
    c = jaxlr.calibrate(model, [x])
    state = nnx.state(model, nnx.Param)
    assert (dict(jaxlr.gsvt_ranks(model, keep=0.5, calibration=c))
            == dict(jaxlr.gsvt_ranks(state, keep=0.5, calibration=c)))
    factored = jaxlr.factorize(model, depth=3, key=jax.random.key(1))
    s = jaxlr.sweep(factored, calibration=jaxlr.calibrate(factored, [x]))
    truncated = s.truncate({"fc1/kernel": 3})
    reference = jaxlr.compress(jaxlr.collapse(factored), ranks={"fc1/kernel": 3},
                               calibration=jaxlr.calibrate(jaxlr.collapse(factored), [x]))
    np.testing.assert_allclose(np_(truncated(x)), np_(reference.compressed(x)), atol=1e-4)
