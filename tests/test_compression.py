"""Tests of jaxlr.compress: factor pairs where they save, truncation, report: numpy and by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlr
from jaxlr import lorita
from tests.test_lorita import CNN, X, linen_variables


def np_truncate(matrix, rank):
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_compress_gives_the_truncated_tree_its_factor_pairs_and_a_hand_checked_report():
    variables = linen_variables()
    params = variables["params"]
    ranks = {"Conv_0/kernel": 2, "Dense_0/kernel": 16, "Dense_1/kernel": 4}
    result = jaxlr.compress(params, ranks)
    truncated = jaxlr.collapse(result.compressed)

    conv = np.asarray(params["Conv_0"]["kernel"])
    np.testing.assert_allclose(np.asarray(truncated["Conv_0"]["kernel"]),
                               np_truncate(conv.reshape(27, 8), 2).reshape(conv.shape), atol=1e-5)
    np.testing.assert_allclose(np.asarray(truncated["Dense_0"]["kernel"]),
                               np.asarray(params["Dense_0"]["kernel"]), atol=1e-5)  # full rank
    np.testing.assert_array_equal(np.asarray(truncated["Dense_0"]["bias"]),
                                  np.asarray(params["Dense_0"]["bias"]))
    CNN().apply({**variables, "params": truncated}, X)  # the unchanged model runs on it

    # Only Conv_0 saves by factoring: 2 * (27 + 8) = 70 < 216; 16 * (288 + 16) > 288 * 16.
    pairs = {jaxlr.matrices.path_key(p): n for p, n in jax.tree_util.tree_flatten_with_path(
        result.compressed, is_leaf=jaxlr.nodes.is_node)[0] if isinstance(n, jaxlr.LowRank)}
    assert list(pairs) == ["Conv_0/kernel"]
    a, b = pairs["Conv_0/kernel"].a, pairs["Conv_0/kernel"].b
    assert a.shape == (27, 2) and b.shape == (2, 8)
    np.testing.assert_allclose(np.asarray(a @ b), np_truncate(conv.reshape(27, 8), 2), atol=1e-5)

    report = result.report
    conv_report = report.layers["Conv_0/kernel"]
    assert conv_report.low_rank and conv_report.params_after == 70
    assert not report.layers["Dense_0/kernel"].low_rank
    # 216 + 8 (conv) + 16 (BatchNorm) + 4608 + 16 (Dense_0) + 64 + 4 (Dense_1) = 4932.
    assert report.params_before == 4932
    assert report.params_after == 4932 - (216 - 70)
    assert report.retained == pytest.approx((2 / 8 + 16 / 16 + 4 / 4) / 3)
    assert "Conv_0/kernel" in report.table() and "(dense)" in report.table()


def test_compress_collapses_a_factorized_tree_first_and_accepts_gsvt_pools():
    params = linen_variables()["params"]
    fparams = lorita.factorize(params, 3, jax.random.key(0))
    collapsed = jaxlr.collapse(fparams)
    ranks = jaxlr.gsvt_ranks(fparams, keep=0.5, pools="kind")  # the spectra of the products
    assert ranks == jaxlr.gsvt_ranks(collapsed, keep=0.5, pools="kind")
    result = jaxlr.compress(fparams, ranks)
    truncated = jaxlr.collapse(result.compressed)
    for name, rank in ranks.items():
        module = name.split("/")[0]
        kernel = np.asarray(collapsed[module]["kernel"])
        matrix = kernel.reshape(-1, kernel.shape[-1])
        np.testing.assert_allclose(
            np.asarray(truncated[module]["kernel"]).reshape(matrix.shape),
            np_truncate(matrix, rank), atol=1e-5)
    assert not any(isinstance(x, jaxlr.Product)
                   for x in jax.tree.leaves(result.compressed, is_leaf=jaxlr.nodes.is_node))


def test_compress_rejects_bad_ranks():
    params = linen_variables()["params"]
    with pytest.raises(ValueError, match=r"rank for 'Conv_0/kernel' is 9; .* = 8"):
        jaxlr.compress(params, {"Conv_0/kernel": 9})
    with pytest.raises(ValueError, match="not leaves of the tree"):
        jaxlr.compress(params, {"Conv_9/kernel": 1})
    with pytest.raises(TypeError, match="must be an int"):
        jaxlr.compress(params, {"Conv_0/kernel": jnp.float32(2.0)})


def test_compress_of_an_nnx_module_returns_a_module_with_pairs_and_ordinary_kernel_access():
    from flax import nnx

    from tests.test_lorita import NNXCNN

    model = NNXCNN(nnx.Rngs(0))
    ranks = {"Conv_0/kernel": 2, "Dense_0/kernel": 4}
    result = jaxlr.compress(model, ranks)
    small = result.compressed
    assert isinstance(small, NNXCNN) and isinstance(small.Conv_0, jaxlr.inference.LowRankLayer)
    # The kernel still reads as the (truncated) dense kernel.
    kernel = np.asarray(model.Dense_0.kernel[...])
    np.testing.assert_allclose(np.asarray(small.Dense_0.kernel[...]), np_truncate(kernel, 4),
                               atol=1e-5)
    dense = jaxlr.collapse(jaxlr.compress(nnx.state(model, nnx.Param), ranks).compressed)
    reference = nnx.clone(model)
    nnx.update(reference, dense)
    np.testing.assert_allclose(np.asarray(small(X)), np.asarray(reference(X)), rtol=1e-4,
                               atol=1e-5)
    assert result.report.layers["Conv_0/kernel"].params_after == 2 * (27 + 8)
