"""Tests of jaxlr.inference: unchanged Flax models run on factor pairs, against the dense
truncated model, and every bad input named by its layer."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlr
from jaxlr import inference
from jaxlr.matrices import MatrixView
from jaxlr.nodes import LowRank
from tests import models
from tests.models import IMAGES

KINDS = ("mlp", "vgg", "resnet", "vit")


def quarter_ranks(params):
    """A quarter of each matrix's full rank: every layer of the test models then saves."""
    leaves = jaxlr.selection.matrix_leaves(params)
    return {name: max(1, leaf.full_rank // 4) for name, leaf in leaves.items()}


def relative_error(actual, expected):
    return float(jnp.linalg.norm(actual - expected) / jnp.linalg.norm(expected))


def np_truncated_factors(kernel, view, rank):
    """An independent factor pair from numpy's float64 SVD."""
    matrix = np.asarray(view.to_matrix(jnp.asarray(kernel)), np.float64)
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(s[:rank])
    return jnp.asarray(u[:, :rank] * root, jnp.float32), jnp.asarray(root[:, None] * vt[:rank],
                                                                     jnp.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_linen_models_run_factored_and_match_the_dense_truncated_model(kind):
    model, variables = models.linen_variables(kind)
    ranks = quarter_ranks(variables["params"])
    result = jaxlr.compress(variables["params"], ranks)
    params = result.compressed
    expected_pairs = {name for name, layer in result.report.layers.items() if layer.low_rank}
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=jaxlr.nodes.is_node)[0]
    held = {jaxlr.matrices.path_key(path) for path, node in flat if isinstance(node, LowRank)}
    assert held == expected_pairs and len(held) >= len(ranks) - 1  # a 3-channel stem may not
    others = {k: v for k, v in variables.items() if k != "params"}

    dense = model.apply({**others, "params": jaxlr.collapse(params)}, IMAGES)
    factored = jax.jit(functools.partial(jaxlr.apply, model))({**others, "params": params},
                                                              IMAGES)
    assert factored.shape == dense.shape
    assert relative_error(factored, dense) < 1e-4

    # A plain model.apply reads each pair as its dense product (Flax unboxes it): same numbers.
    assert relative_error(model.apply({**others, "params": params}, IMAGES), dense) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_nnx_models_run_factored_and_match_the_dense_truncated_model(kind):
    model = models.nnx_model(kind)
    state = nnx.state(model, nnx.Param)
    result = jaxlr.compress(state, quarter_ranks(state))
    truncated = nnx.clone(model)
    nnx.update(truncated, jaxlr.collapse(result.compressed))
    dense = truncated(IMAGES)

    factored_model = jaxlr.inference.nnx_model(model, result.compressed)
    replaced = [path for path, node in nnx.iter_graph(factored_model)
                if isinstance(node, inference.LowRankLayer)]
    pairs = [n for n in jax.tree.leaves(result.compressed, is_leaf=jaxlr.nodes.is_node)
             if isinstance(n, LowRank)]
    assert len(replaced) == len(pairs) > 0
    # compress of the module itself gives the same module.
    direct = jaxlr.compress(model, quarter_ranks(state)).compressed
    assert relative_error(direct(IMAGES), dense) < 1e-4
    factored = nnx.jit(lambda m, x: m(x))(factored_model, IMAGES)
    assert relative_error(factored, dense) < 1e-4
    # The original model is untouched and still holds its dense, untruncated kernels.
    np.testing.assert_array_equal(np.asarray(nnx.state(model, nnx.Param)["head"]["kernel"][...]),
                                  np.asarray(state["head"]["kernel"][...]))


def test_linen_and_nnx_give_the_same_factored_outputs_from_the_same_numbers():
    linen_model, variables = models.linen_variables("resnet")
    nnx_resnet = models.nnx_model("resnet")
    # Copy the Linen numbers into the NNX model (same paths; blocks are a list there).
    rename = {"block0": ("blocks", "0"), "block1": ("blocks", "1"), "block2": ("blocks", "2")}

    def nnx_path(path):
        return rename.get(path[0], (path[0],)) + path[1:]

    state = nnx.state(nnx_resnet)
    pure = nnx.to_pure_dict(state)
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            names = nnx_path(jaxlr.matrices.path_names(path))
            node = pure
            for key in names[:-1]:
                node = node[int(key) if key.isdigit() else key]
            node[names[-1]] = leaf
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(nnx_resnet, state)
    np.testing.assert_allclose(nnx_resnet(IMAGES), linen_model.apply(variables, IMAGES),
                               rtol=1e-5, atol=1e-5)

    ranks = quarter_ranks(variables["params"])
    result = jaxlr.compress(variables["params"], ranks)
    linen_out = jaxlr.apply(linen_model, {**variables, "params": result.compressed}, IMAGES)
    nnx_state = nnx.state(nnx_resnet, nnx.Param)
    nnx_result = jaxlr.compress(nnx_state, {
        nnx_path(tuple(name.split("/"))): r for name, r in ranks.items()})  # tuple keys
    nnx_out = jaxlr.inference.nnx_model(nnx_resnet, nnx_result.compressed)(IMAGES)
    np.testing.assert_allclose(nnx_out, linen_out, rtol=1e-4, atol=1e-4)


def test_factored_forward_equals_numpy_two_stage_computation():
    """The dense layer by hand: x @ A @ B + b, and the conv as k x k with r filters then 1 x 1."""
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 6, 6, 3)), np.float64)
    kernel = np.asarray(jax.random.normal(jax.random.key(2), (3, 3, 3, 5)))
    view = MatrixView((0, 1, 2), (3,))
    a, b = np_truncated_factors(kernel, view, 2)
    bias = np.arange(5, dtype=np.float32)
    node = LowRank(a, b, kernel.shape, view)
    model = nn.Conv(5, (3, 3), strides=2, padding="VALID")
    got = jaxlr.apply(model, {"params": {"kernel": node, "bias": jnp.asarray(bias)}},
                        jnp.asarray(x, jnp.float32))
    # numpy: 3 x 3 VALID stride-2 windows of x, times A (27 x 2), then B (2 x 5), plus bias.
    windows = np.stack([x[:, i:i + 3, j:j + 3, :].reshape(2, 27) for i in (0, 2)
                        for j in (0, 2)], axis=1).reshape(2, 2, 2, 27)
    expected = windows @ np.asarray(a, np.float64) @ np.asarray(b, np.float64) + bias
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_compress_keeps_a_kernel_dense_where_factoring_does_not_save():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))  # an 18 x 4 matrix, 72 entries
    params = {"Conv_0": {"kernel": kernel, "bias": jnp.zeros(4)}}
    out = jaxlr.compress(params, {"Conv_0/kernel": 4}).compressed  # 4 * (18 + 4) = 88 >= 72
    assert not isinstance(out["Conv_0"]["kernel"], LowRank)
    np.testing.assert_allclose(np.asarray(out["Conv_0"]["kernel"]), np.asarray(kernel),
                               atol=1e-5)  # full rank: the product is the kernel itself
    out = jaxlr.compress(params, {"Conv_0/kernel": 2}).compressed  # 2 * 22 = 44 < 72
    assert isinstance(out["Conv_0"]["kernel"], LowRank) and out["Conv_0"]["kernel"].saves


def test_collapse_and_the_kernel_access_of_a_pair_match_the_product():
    a = jax.random.normal(jax.random.key(0), (12, 2))
    b = jax.random.normal(jax.random.key(1), (2, 4))
    node = LowRank(a, b, (4, 3, 4), MatrixView((0, 1), (2,)))
    expected = (np.asarray(a, np.float64) @ np.asarray(b, np.float64)).reshape(4, 3, 4)
    np.testing.assert_allclose(np.asarray(jaxlr.collapse({"k": node})["k"]), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(node[...]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(node[1, :, 2]), expected[1, :, 2], rtol=1e-5)
    assert node.shape == (4, 3, 4) and node.dtype == jnp.float32 and node.ndim == 3
    assert node.param_count == 2 * (12 + 4) and node.rank == 2 and node.matrix_shape == (12, 4)
    assert jaxlr.nodes.saves(2, 12, 4) and not jaxlr.nodes.saves(3, 12, 4)  # 48 < 48 is false


def test_attention_projections_run_through_their_own_views():
    """query/key/value kernels (in, heads, head_dim) and out (heads, head_dim, out)."""
    model, variables = models.linen_variables("vit")
    ranks = {n: 4 for n in quarter_ranks(variables["params"]) if n.startswith("attn/")}
    assert sorted(ranks) == ["attn/key/kernel", "attn/out/kernel", "attn/query/kernel",
                             "attn/value/kernel"]
    result = jaxlr.compress(variables["params"], ranks)
    params = result.compressed
    assert params["attn"]["out"]["kernel"].a.shape == (64, 4)  # heads * head_dim rows
    assert params["attn"]["query"]["kernel"].b.shape == (4, 64)
    dense = model.apply({"params": jaxlr.collapse(params)}, IMAGES)
    assert relative_error(jaxlr.apply(model, {"params": params}, IMAGES), dense) < 1e-4


def test_bad_input_names_the_layer():
    view = MatrixView((0,), (1,))
    with pytest.raises(ValueError, match=r"rank 5 is outside \[1, 4\]"):
        LowRank(jnp.ones((4, 5)), jnp.ones((5, 6)), (4, 6), view)
    with pytest.raises(ValueError, match="do not chain"):
        LowRank(jnp.ones((4, 2)), jnp.ones((3, 6)), (4, 6), view)
    with pytest.raises(ValueError, match="4 x 6"):
        LowRank(jnp.ones((5, 2)), jnp.ones((2, 6)), (4, 6), view)

    model, variables = models.linen_variables("mlp")
    params = variables["params"]
    with pytest.raises(ValueError, match="'fc2/kernel' is 70"):
        jaxlr.compress(params, {"fc2/kernel": 70})
    with pytest.raises(ValueError, match="fc9/kernel"):
        jaxlr.compress(params, {"fc9/kernel": 2})

    # A pair made for another kernel shape: the module's kernel is 96 x 64.
    wrong = LowRank(jnp.ones((90, 2)), jnp.ones((2, 64)), (90, 64), view)
    bad = {"params": {**params, "fc2": {**params["fc2"], "kernel": wrong}}}
    with pytest.raises(ValueError, match=r"layer 'fc2'.*\(90, 64\).*\(96, 64\)"):
        jaxlr.apply(model, bad, IMAGES)

    # A view the module does not contract through (columns first).
    x = jnp.ones((2, 8))
    flipped = LowRank(jnp.ones((4, 2)), jnp.ones((2, 8)), (8, 4), MatrixView((1,), (0,)))
    with pytest.raises(ValueError, match="layer 'layers_0'.*leading 1 axes"):
        jaxlr.apply(nn.Sequential([nn.Dense(4)]),
                      {"params": {"layers_0": {"kernel": flipped, "bias": jnp.zeros(4)}}}, x)

    # Linen layers that cannot run a factor pair factored run the kernel it stands for.
    rng = np.random.default_rng(5)
    conv_node = LowRank(jnp.asarray(rng.normal(size=(18, 2)), jnp.float32),
                        jnp.asarray(rng.normal(size=(2, 4)), jnp.float32), (3, 3, 2, 4),
                        MatrixView((0, 1, 2), (3,)))
    grouped = LowRank(jnp.asarray(rng.normal(size=(9, 2)), jnp.float32),
                      jnp.asarray(rng.normal(size=(2, 4)), jnp.float32), (3, 3, 1, 4),
                      MatrixView((0, 1, 2), (3,)))
    images = jnp.asarray(rng.normal(size=(1, 5, 5, 2)), jnp.float32)
    for module, node in ((nn.ConvTranspose(4, (3, 3)), conv_node),
                         (nn.Conv(4, (3, 3), feature_group_count=2), grouped)):
        model = nn.Sequential([module])
        dense = np.asarray(node.a) @ np.asarray(node.b)  # the (kh kw cin) x cout matrix
        out = jaxlr.apply(model, {"params": {"layers_0": {"kernel": node,
                                                          "bias": jnp.zeros(4)}}}, images)
        want = model.apply({"params": {"layers_0": {"kernel": jnp.asarray(
            dense.reshape(node.shape)), "bias": jnp.zeros(4)}}}, images)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    embed = LowRank(jnp.ones((10, 2)), jnp.ones((2, 4)), (10, 4), view)
    with pytest.raises(TypeError, match="layer 'layers_0' \\(Embed\\).*\\['embedding'\\]"):
        jaxlr.apply(nn.Sequential([nn.Embed(10, 4)]),
                      {"params": {"layers_0": {"embedding": embed}}}, jnp.array([1, 2]))

    nnx_model = nnx.Sequential(nnx.Conv(2, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="layer 'layers/0' \\(Conv\\).*grouped"):
        jaxlr.inference.nnx_model(nnx_model,
                                  {"layers": {0: {"kernel": grouped, "bias": jnp.zeros(4)}}})
    nnx_mlp = models.nnx_model("mlp")
    with pytest.raises(ValueError, match=r"layer 'fc2'.*\(90, 64\).*\(96, 64\)"):
        jaxlr.inference.nnx_model(nnx_mlp, {"fc2": {"kernel": wrong}})
    with pytest.raises(KeyError, match="'fc7/kernel'"):
        jaxlr.inference.nnx_model(nnx_mlp, {"fc7": {"kernel": wrong}})
