"""Tests of jaxlr.compress: truncated tree, factor pairs and report, against numpy and by hand."""

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

    conv = np.asarray(params["Conv_0"]["kernel"])
    np.testing.assert_allclose(np.asarray(result.params["Conv_0"]["kernel"]),
                               np_truncate(conv.reshape(27, 8), 2).reshape(conv.shape), atol=1e-5)
    np.testing.assert_allclose(np.asarray(result.params["Dense_0"]["kernel"]),
                               np.asarray(params["Dense_0"]["kernel"]), atol=1e-5)  # full rank
    np.testing.assert_array_equal(np.asarray(result.params["Dense_0"]["bias"]),
                                  np.asarray(params["Dense_0"]["bias"]))
    CNN().apply({**variables, "params": result.params}, X)  # the unchanged model runs on it

    # Only Conv_0 saves by factoring: 2 * (27 + 8) = 70 < 216; 16 * (288 + 16) > 288 * 16.
    assert list(result.factors) == ["Conv_0/kernel"]
    a, b = result.factors["Conv_0/kernel"]
    assert a.shape == (27, 2) and b.shape == (2, 8)
    np.testing.assert_allclose(np.asarray(a @ b), np_truncate(conv.reshape(27, 8), 2), atol=1e-5)

    report = result.report
    conv_report = report.layers["Conv_0/kernel"]
    assert conv_report.factored and conv_report.params_after == 70
    assert not report.layers["Dense_0/kernel"].factored
    # 216 + 8 (conv) + 16 (BatchNorm) + 4608 + 16 (Dense_0) + 64 + 4 (Dense_1) = 4932.
    assert report.params_before == 4932
    assert report.params_after == 4932 - (216 - 70)
    assert report.retained == pytest.approx((2 / 8 + 16 / 16 + 4 / 4) / 3)
    assert "Conv_0/kernel" in report.table() and "(dense)" in report.table()


def test_compress_collapses_a_factorized_tree_first_and_accepts_gsvt_pools():
    params = linen_variables()["params"]
    fparams = lorita.factorize(params, 3, jax.random.key(0))
    collapsed = lorita.collapse(fparams)
    spectra = jaxlr.singular_values_tree(collapsed)
    ranks = jaxlr.gsvt_ranks(spectra, 0.5, pools=jaxlr.kernel_kinds(collapsed))
    result = jaxlr.compress(fparams, ranks)
    for name, rank in ranks.items():
        module = name.split("/")[0]
        kernel = np.asarray(collapsed[module]["kernel"])
        matrix = kernel.reshape(-1, kernel.shape[-1])
        np.testing.assert_allclose(
            np.asarray(result.params[module]["kernel"]).reshape(matrix.shape),
            np_truncate(matrix, rank), atol=1e-5)
    assert not any(isinstance(x, lorita.Factored)
                   for x in jax.tree.leaves(result.params, is_leaf=lorita.is_factored))


def test_compress_rejects_bad_ranks():
    params = linen_variables()["params"]
    with pytest.raises(ValueError, match=r"rank for 'Conv_0/kernel' is 9; .* = 8"):
        jaxlr.compress(params, {"Conv_0/kernel": 9})
    with pytest.raises(ValueError, match="not leaves of the tree"):
        jaxlr.compress(params, {"Conv_9/kernel": 1})
    with pytest.raises(TypeError, match="must be an int"):
        jaxlr.compress(params, {"Conv_0/kernel": jnp.float32(2.0)})
