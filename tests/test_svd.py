"""Tests of jaxlr.svd against numpy's float64 SVD and closed forms."""

import subprocess
import sys
import textwrap
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxlr
from jaxlr import _linalg

# ----------------------------------------------------------------------------------------------
# Independent references.


def np_svd(matrix):
    return np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)


def np_truncate(matrix, rank):
    u, s, vt = np_svd(matrix)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def with_spectrum(rng, m, n, spectrum):
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u * spectrum) @ v.T).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# One matrix: Eckart-Young, rank, energy transfer, idempotence (hypothesis).

DTYPES = {"float32": (jnp.float32, 1e-4), "bfloat16": (jnp.bfloat16, 2e-2)}


@st.composite
def matrix_and_rank(draw):
    m = draw(st.integers(1, 300))
    n = draw(st.integers(1, 40))
    if draw(st.booleans()):
        m, n = n, m
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((m, n))
    if draw(st.booleans()):  # a decaying spectrum as well as the flat one of a Gaussian matrix
        k = min(m, n)
        matrix = with_spectrum(rng, m, n, 0.8 ** np.arange(k))
    rank = draw(st.integers(1, min(m, n)))
    return matrix.astype(np.float32), rank


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@given(case=matrix_and_rank())
def test_projection_is_the_eckart_young_optimum(dtype_name, case):
    dtype, tol = DTYPES[dtype_name]
    matrix, rank = case
    x = jnp.asarray(matrix, dtype)
    x64 = np.asarray(x, np.float64)  # the values the function actually receives
    s = np_svd(x64)[1]
    norm = np.linalg.norm(x64)

    projected = jaxlr.svd.project_matrix(x, rank, energy_transfer=False)
    assert projected.dtype == dtype and projected.shape == x.shape
    p64 = np.asarray(projected, np.float64)
    optimum = np.sqrt(np.sum(s[rank:] ** 2))
    assert abs(np.linalg.norm(x64 - p64) - optimum) <= tol * norm + 1e-30
    # Rank <= r: singular values past r vanish to the dtype's rounding.
    sp = np.linalg.svd(p64, compute_uv=False)
    if rank < len(sp):
        assert sp[rank] <= tol * max(sp[0], 1e-30)
    # Idempotent.
    again = jaxlr.svd.project_matrix(projected, rank, energy_transfer=False)
    assert np.linalg.norm(np.asarray(again, np.float64) - p64) <= tol * max(norm, 1e-30)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@given(case=matrix_and_rank())
def test_energy_transfer_keeps_the_frobenius_norm(dtype_name, case):
    dtype, tol = DTYPES[dtype_name]
    matrix, rank = case
    x = jnp.asarray(matrix, dtype)
    x64 = np.asarray(x, np.float64)
    # Energy transfer is the default.
    projected = np.asarray(jaxlr.svd.project_matrix(x, rank), np.float64)
    assert np.linalg.norm(projected) == pytest.approx(np.linalg.norm(x64), rel=tol)
    # The same subspace as the plain projection, scaled by one common alpha.
    s = np_svd(x64)[1]
    alpha = np.sqrt(np.sum(s**2) / np.sum(s[:rank] ** 2))
    assert rel(projected, alpha * np_truncate(x64, rank)) <= 10 * tol or (
        # Repeated singular values at the cut make the optimal subspace ambiguous.
        rank < len(s) and np.isclose(s[rank - 1], s[rank], rtol=1e-3)
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_computed_in_float32(dtype):
    matrix = jnp.asarray(np.random.default_rng(0).standard_normal((50, 20)), dtype)
    for energy_transfer in (False, True):
        half = jaxlr.svd.project_matrix(matrix, 5, energy_transfer=energy_transfer, method="svd")
        full = jaxlr.svd.project_matrix(
            matrix.astype(jnp.float32), 5, energy_transfer=energy_transfer, method="svd"
        )
        assert half.dtype == dtype
        np.testing.assert_array_equal(np.asarray(half), np.asarray(full.astype(dtype)))
    a, b = jaxlr.svd.factor_matrix(matrix, 5)
    assert a.dtype == b.dtype == dtype
    assert jaxlr.svd.singular_values_matrix(matrix).dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# The fast path.

SPECTRA = {
    "flat (Gaussian)": None,
    "geometric 0.8^i": lambda k: 0.8 ** np.arange(k),
    "geometric 0.97^i": lambda k: 0.97 ** np.arange(k),
    "log-uniform 1..1e-6": lambda k: np.logspace(0, -6, k),
}
SHAPES = [(300, 40), (40, 300), (576, 64), (1152, 128)]


def _spectral_cases():
    rng = np.random.default_rng(42)
    for name, spectrum in SPECTRA.items():
        for m, n in SHAPES:
            k = min(m, n)
            if spectrum is None:
                matrix = rng.standard_normal((m, n)).astype(np.float32)
            else:
                matrix = with_spectrum(rng, m, n, spectrum(k))
            for fraction in (0.1, 0.4, 0.8):
                yield name, matrix, max(1, int(fraction * k))


def test_auto_is_within_1e4_of_the_full_svd_on_flat_and_decaying_spectra():
    for name, matrix, rank in _spectral_cases():
        truth = np_truncate(matrix, rank)
        auto = jaxlr.svd.project_matrix(matrix, rank, energy_transfer=False, method="auto")
        svd = jaxlr.svd.project_matrix(matrix, rank, energy_transfer=False, method="svd")
        assert rel(auto, truth) <= 1e-4, (name, matrix.shape, rank)
        assert rel(auto, svd) <= 1e-4, (name, matrix.shape, rank)
        a, b = jaxlr.svd.factor_matrix(matrix, rank, method="auto")
        assert rel(np.asarray(a, np.float64) @ np.asarray(b, np.float64), truth) <= 1e-4


def test_gram_error_estimate_is_honest_where_the_gram_path_is_taken():
    @partial(jax.jit, static_argnums=1)
    def gram_path(matrix, rank):
        top, estimate = _linalg.gram_subspace(matrix, rank)
        return _linalg.triplets_from_subspace(matrix, top), estimate

    taken = {name: 0 for name in SPECTRA}
    for name, matrix, rank in _spectral_cases():
        (u, s, vt), error = gram_path(jnp.asarray(matrix), rank)
        gram = np.asarray((u * s) @ vt, np.float64)
        actual = rel(gram, np_truncate(matrix, rank)) * np.linalg.norm(
            np_truncate(matrix, rank)
        ) / np.linalg.norm(matrix.astype(np.float64))
        # The estimate may overstate the error, but never understates it by more than 1/0.8.
        assert actual <= max(float(error) / 0.8, 2e-6), (name, matrix.shape, rank, error, actual)
        if float(error) <= _linalg.GRAM_TOLERANCE:
            taken[name] += 1
            assert rel(gram, np_truncate(matrix, rank)) <= 1e-4
    # The fast path is used where it is accurate: nearly always on flat spectra (a random gap at
    # the cut can be small), often with mild decay.
    assert taken["flat (Gaussian)"] >= len(SHAPES) * 3 - 2
    assert taken["geometric 0.8^i"] > 0


def test_gram_path_handles_wide_and_tall_matrices_alike():
    matrix = np.random.default_rng(3).standard_normal((30, 70)).astype(np.float32)
    wide = jaxlr.svd.project_matrix(matrix, 7, energy_transfer=False, method="gram")
    tall = jaxlr.svd.project_matrix(matrix.T, 7, energy_transfer=False, method="gram")
    np.testing.assert_allclose(np.asarray(wide), np.asarray(tall).T, atol=1e-5)
    assert rel(wide, np_truncate(matrix, 7)) <= 1e-5


# ----------------------------------------------------------------------------------------------
# Zero, NaN and Inf.


@pytest.mark.parametrize("method", ["auto", "gram", "svd"])
@pytest.mark.parametrize("energy_transfer", [False, True])
def test_zero_matrix_projects_to_itself(method, energy_transfer):
    zero = jnp.zeros((12, 5))
    out = jaxlr.svd.project_matrix(zero, 2, energy_transfer=energy_transfer, method=method)
    np.testing.assert_array_equal(np.asarray(out), np.zeros((12, 5)))
    a, b = jaxlr.svd.factor_matrix(zero, 2, method=method)
    np.testing.assert_array_equal(np.asarray(a @ b), np.zeros((12, 5)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_matrix_raises_eagerly_and_is_flagged_under_jit(bad):
    rng = np.random.default_rng(0)
    good = jnp.asarray(rng.standard_normal((20, 6)), jnp.float32)
    broken = good.at[3, 2].set(bad)
    tree = {"good": {"kernel": good}, "broken": {"kernel": broken}}
    ranks = {"good/kernel": 2, "broken/kernel": 2}

    with pytest.raises(ValueError, match="broken/kernel"):
        jaxlr.project(tree, ranks)
    with pytest.raises(ValueError, match="broken/kernel"):
        jaxlr.compress(tree, ranks)
    with pytest.raises(ValueError, match="broken/kernel"):
        jaxlr.svd.singular_values(tree, filter="all")

    params = jax.jit(lambda t: jaxlr.project(t, ranks))(tree)
    np.testing.assert_array_equal(np.asarray(params["broken"]["kernel"]), np.asarray(broken))
    # The NaN did not spread to the finite matrix, which is projected as usual.
    s = np_svd(good)[1]
    alpha = np.sqrt(np.sum(s**2) / np.sum(s[:2] ** 2))
    assert rel(params["good"]["kernel"], alpha * np_truncate(good, 2)) <= 1e-5

    single = jax.jit(lambda m: jaxlr.svd.project_matrix(m, 2, energy_transfer=True))(broken)
    np.testing.assert_array_equal(np.asarray(single), np.asarray(broken))
    a, b = jax.jit(lambda m: jaxlr.svd.factor_matrix(m, 2))(broken)
    assert np.isnan(np.asarray(a)).all() and np.isnan(np.asarray(b)).all()
    assert np.isnan(np.asarray(jax.jit(jaxlr.svd.singular_values_matrix)(broken))).all()

    # The one-matrix functions raise eagerly as the tree functions do, naming the shape.
    for method in ("auto", "gram", "svd"):
        with pytest.raises(ValueError, match=r"matrix \(shape \(20, 6\)\) holds NaN or Inf"):
            jaxlr.svd.project_matrix(broken, 2, method=method)
        with pytest.raises(ValueError, match=r"matrix \(shape \(20, 6\)\) holds NaN or Inf"):
            jaxlr.svd.factor_matrix(broken, 2, method=method)
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        jaxlr.svd.singular_values_matrix(np.asarray(broken))
    # Nothing of it applies to a finite matrix, whatever its values.
    huge = good * 1e30
    np.testing.assert_allclose(np.asarray(jaxlr.svd.singular_values_matrix(huge)),
                               np_svd(np.asarray(huge, np.float64))[1], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Factors.


@given(case=matrix_and_rank())
def test_truncated_factors_are_balanced_and_multiply_to_the_truncation(case):
    matrix, rank = case
    a, b = jaxlr.svd.factor_matrix(matrix, rank)
    assert a.shape == (matrix.shape[0], rank) and b.shape == (rank, matrix.shape[1])
    norm = np.linalg.norm(matrix.astype(np.float64))
    s = np_svd(matrix)[1]
    product = np.asarray(a @ b, np.float64)
    assert abs(np.linalg.norm(matrix - product) - np.sqrt(np.sum(s[rank:] ** 2))) <= 1e-4 * norm
    # A = U_r sqrt(S_r), B = sqrt(S_r) V_r^T: A^T A = B B^T = diag(s_r).
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a64.T @ a64, np.diag(s[:rank]), atol=1e-4 * s[0] + 1e-30)
    np.testing.assert_allclose(b64 @ b64.T, np.diag(s[:rank]), atol=1e-4 * s[0] + 1e-30)


# ----------------------------------------------------------------------------------------------
# Trees: Linen and NNX, views, untouched leaves.


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), name="Conv_0")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.Dense(12, name="Dense_0")(x)
        return nn.Dense(5, name="Dense_1")(nn.relu(x))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.Conv_0 = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.Dense_0 = nnx.Linear(6 * 8 * 8, 12, rngs=rngs)
        self.Dense_1 = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.Conv_0(x)).reshape(x.shape[0], -1)
        return self.Dense_1(nnx.relu(self.Dense_0(x)))


def _linen_params():
    x = jnp.ones((2, 8, 8, 3))
    return LinenNet().init(jax.random.key(0), x)["params"], x


def _nnx_copy_of(linen_params):
    model = NNXNet(nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    flat = {jaxlr.matrices.path_key(p): leaf for p, leaf in _named_leaves(linen_params)}
    state = jax.tree_util.tree_map_with_path(
        lambda p, leaf: flat[jaxlr.matrices.path_key(p)], state
    )
    return graphdef, state


def _named_leaves(tree):
    return [(jaxlr.matrices.path_names(p), leaf)
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_project_tree_matches_numpy_per_matrix_and_leaves_the_rest():
    params, _ = _linen_params()
    ranks = {"Conv_0/kernel": 2, "Dense_0/kernel": 3}
    out = jaxlr.project(params, ranks, options=jaxlr.ProjectionOptions(energy_transfer=False))
    assert jax.tree.structure(out) == jax.tree.structure(params)

    conv = np.asarray(params["Conv_0"]["kernel"])  # (3, 3, 3, 6) -> (27, 6)
    expected = np_truncate(conv.reshape(27, 6), 2).reshape(conv.shape)
    np.testing.assert_allclose(np.asarray(out["Conv_0"]["kernel"]), expected, atol=1e-5)
    dense = np.asarray(params["Dense_0"]["kernel"])
    np.testing.assert_allclose(np.asarray(out["Dense_0"]["kernel"]),
                               np_truncate(dense, 3), atol=1e-5)
    for untouched in (("Dense_1", "kernel"), ("Dense_0", "bias"), ("Conv_0", "bias")):
        a, b = params[untouched[0]][untouched[1]], out[untouched[0]][untouched[1]]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_linen_and_nnx_trees_give_identical_results():
    params, x = _linen_params()
    graphdef, state = _nnx_copy_of(params)
    ranks = {"Conv_0/kernel": 2, "Dense_0/kernel": 4, "Dense_1/kernel": 3}

    linen_out = jaxlr.project(params, ranks)
    nnx_out = jaxlr.project(state, ranks)
    linen_leaves = dict(_named_leaves(linen_out))
    for path, leaf in _named_leaves(nnx_out):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(linen_leaves[path]))

    # The projected trees run the unchanged models to the same outputs.
    y_linen = LinenNet().apply({"params": linen_out}, x)
    y_nnx = nnx.merge(graphdef, nnx_out)(x)
    np.testing.assert_allclose(np.asarray(y_linen), np.asarray(y_nnx), atol=1e-5)

    spectra_linen = jaxlr.svd.singular_values(params, filter="all")
    spectra_nnx = jaxlr.svd.singular_values(state, filter="all")
    assert list(spectra_linen) == list(spectra_nnx)
    for name in spectra_linen:
        np.testing.assert_array_equal(np.asarray(spectra_linen[name]),
                                      np.asarray(spectra_nnx[name]))


def test_attention_kernels_are_truncated_through_their_views():
    model = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, out_features=8)
    x = jnp.ones((1, 5, 8))
    params = model.init(jax.random.key(0), x, x)["params"]
    ranks = {"query/kernel": 3, "out/kernel": 2}
    out = jaxlr.project(params, ranks, options=jaxlr.ProjectionOptions(energy_transfer=False))
    query = np.asarray(params["query"]["kernel"])  # (8, 4, 4) -> (8, 16)
    np.testing.assert_allclose(np.asarray(out["query"]["kernel"]),
                               np_truncate(query.reshape(8, 16), 3).reshape(8, 4, 4), atol=1e-5)
    proj = np.asarray(params["out"]["kernel"])  # (4, 4, 8) -> (16, 8)
    np.testing.assert_allclose(np.asarray(out["out"]["kernel"]),
                               np_truncate(proj.reshape(16, 8), 2).reshape(4, 4, 8), atol=1e-5)

    spectra = jaxlr.svd.singular_values(params, filter="all")
    np.testing.assert_allclose(np.asarray(spectra["value/kernel"]),
                               np_svd(np.asarray(params["value"]["kernel"]).reshape(8, 16))[1],
                               rtol=1e-5)


def test_compressed_conv_kernel_is_a_pair_that_reshapes_to_a_conv_pair():
    params, _ = _linen_params()
    node = jaxlr.compress(params, {"Conv_0/kernel": 2}).compressed["Conv_0"]["kernel"]
    a, b = node.a, node.b
    conv = np.asarray(params["Conv_0"]["kernel"])
    assert a.shape == (27, 2) and b.shape == (2, 6)
    np.testing.assert_allclose(np.asarray(a @ b).reshape(conv.shape),
                               np_truncate(conv.reshape(27, 6), 2).reshape(conv.shape), atol=1e-5)


def test_tree_call_inside_jit_matches_eager_and_compiles_once():
    params, _ = _linen_params()
    ranks = jaxlr.lsvt_ranks(params, prune=0.5, filter="all")
    traces = 0

    @jax.jit
    def step(tree):
        nonlocal traces
        traces += 1
        return jaxlr.project(tree, ranks)

    eager = jaxlr.project(params, ranks)
    for scale in (1.0, 2.0, 3.0):
        scaled = jax.tree.map(lambda p, s=scale: p * s, params)
        jitted = step(scaled)
        expected = eager if scale == 1.0 else jax.tree.map(lambda p, s=scale: p * s, eager)
        for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert traces == 1


@pytest.mark.slow
def test_repeated_tree_calls_finish_under_a_timeout():
    # DESIGN.md section 6: a Gram + eigh path once deadlocked on its second call on this CPU build.
    script = textwrap.dedent(
        """
        import jax, numpy as np, jaxlr
        rng = np.random.default_rng(0)
        shapes = [(3, 3, 64, 128), (3, 3, 128, 128), (3, 3, 128, 256), (3, 3, 256, 256)]
        tree = {f"Conv_{i}": {"kernel": rng.standard_normal(s).astype(np.float32) / 30}
                for i, s in enumerate(shapes)}
        ranks = jaxlr.lsvt_ranks(tree, prune=0.6)
        for method in ("auto", "gram", "svd"):
            options = jaxlr.ProjectionOptions(method=method)
            for _ in range(10):
                jax.block_until_ready(jaxlr.project(tree, ranks, options=options))
        print("done")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("done")


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_ranks_and_methods_are_rejected_when_called():
    matrix = jnp.ones((6, 4))
    with pytest.raises(ValueError, match=r"rank for matrix is 0; allowed 1 <= rank <= .* = 4"):
        jaxlr.svd.project_matrix(matrix, 0)
    with pytest.raises(ValueError, match=r"rank for matrix is 5"):
        jaxlr.svd.factor_matrix(matrix, 5)
    with pytest.raises(TypeError, match="rank for matrix must be an int"):
        jaxlr.svd.project_matrix(matrix, 2.0)
    with pytest.raises(ValueError, match="method must be one of"):
        jaxlr.svd.project_matrix(matrix, 2, method="qr")
    with pytest.raises(ValueError, match="matrix must be 2-D"):
        jaxlr.svd.project_matrix(jnp.ones((2, 3, 4)), 1)
    with pytest.raises(TypeError, match="int32"):
        jaxlr.svd.project_matrix(jnp.ones((3, 3), jnp.int32), 1)


def test_bad_tree_input_is_rejected_when_called():
    params, _ = _linen_params()
    with pytest.raises(ValueError, match=r"not leaves of the tree: \['Dense_9/kernel'\]"):
        jaxlr.project(params, {"Dense_9/kernel": 1})
    with pytest.raises(ValueError, match="ranks is empty"):
        jaxlr.project(params, {})
    with pytest.raises(ValueError, match=r"rank for 'Dense_1/kernel' is 6; .* = 5"):
        jaxlr.project(params, {"Dense_1/kernel": 6})
    with pytest.raises(TypeError, match="int32"):
        jaxlr.project({"a": {"kernel": jnp.ones((3, 3), jnp.int32)}}, {"a/kernel": 1})
    with pytest.raises(ValueError, match="does not fit"):
        jaxlr.project(params, {"Dense_1/kernel": 1}, options=jaxlr.ProjectionOptions(
            view=jaxlr.MatrixView((0, 1), (2,))))
    with pytest.raises(ValueError, match="selected no matrix"):
        jaxlr.svd.singular_values(params, filter=lambda path, leaf: False)


@pytest.mark.parametrize("tail_scale", [0.0, 0.25, 0.9])
@pytest.mark.parametrize("energy_transfer", [False, True])
def test_soft_projection_scales_the_tail_and_keeps_the_norm(tail_scale, energy_transfer):
    matrix = np.random.default_rng(5).standard_normal((40, 12)).astype(np.float32)
    rank = 4
    u, s, vt = np_svd(matrix)
    kept, tail = np.sum(s[:rank] ** 2), np.sum(s[rank:] ** 2)
    # alpha^2 kept + f^2 tail = kept + tail with energy transfer; 1 without.
    alpha = np.sqrt((kept + tail - tail_scale**2 * tail) / kept) if energy_transfer else 1.0
    expected = (u * np.concatenate([alpha * s[:rank], tail_scale * s[rank:]])) @ vt
    for method in ("auto", "svd"):
        out = jaxlr.svd.project_matrix(matrix, rank, energy_transfer=energy_transfer,
                                   tail_scale=tail_scale, method=method)
        assert rel(out, expected) <= 1e-5
    if energy_transfer:
        assert np.linalg.norm(np.asarray(out, np.float64)) == pytest.approx(
            np.linalg.norm(matrix.astype(np.float64)), rel=1e-5)
    with pytest.raises(ValueError, match=r"tail_scale must be a number in \[0, 1\)"):
        jaxlr.svd.project_matrix(matrix, rank, tail_scale=1.0)
    with pytest.raises(TypeError, match="energy_transfer must be True or False"):
        jaxlr.svd.project_matrix(matrix, rank, energy_transfer="False")
