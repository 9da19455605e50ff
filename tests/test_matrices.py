"""Tests of jaxlr.matrices: views, paths and selection on Linen and NNX trees."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxlr
from jaxlr.matrices import MatrixView, default_view, matrix_leaves, path_names


@st.composite
def leaf_and_view(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    perm = draw(st.permutations(range(ndim)))
    split = draw(st.integers(1, ndim - 1))
    leaf = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return leaf, MatrixView(tuple(perm[:split]), tuple(perm[split:]))


@given(case=leaf_and_view())
def test_views_round_trip_exactly_and_match_numpy(case):
    leaf, view = case
    matrix = view.to_matrix(jnp.asarray(leaf))
    expected = np.transpose(leaf, view.row_axes + view.col_axes).reshape(
        int(np.prod([leaf.shape[a] for a in view.row_axes])), -1
    )
    np.testing.assert_array_equal(np.asarray(matrix), expected)
    np.testing.assert_array_equal(np.asarray(view.from_matrix(matrix, leaf.shape)), leaf)


def test_default_views_of_flax_kernels_are_the_documented_unfoldings():
    conv = np.random.default_rng(0).standard_normal((3, 3, 4, 8)).astype(np.float32)
    view = default_view(("params", "Conv_0", "kernel"), conv)
    np.testing.assert_array_equal(np.asarray(view.to_matrix(conv)), conv.reshape(36, 8))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x, x)

    x = jnp.ones((1, 3, 6))
    params = Block().init(jax.random.key(0), x)["params"]["MultiHeadDotProductAttention_0"]
    for name in ("query", "key", "value"):
        kernel = np.asarray(params[name]["kernel"])  # (in, heads, head_dim)
        view = default_view(("attn", name, "kernel"), kernel)
        np.testing.assert_array_equal(np.asarray(view.to_matrix(kernel)), kernel.reshape(6, 8))
    out = np.asarray(params["out"]["kernel"])  # (heads, head_dim, out)
    view = default_view(("attn", "out", "kernel"), out)
    np.testing.assert_array_equal(np.asarray(view.to_matrix(out)), out.reshape(8, 6))

    conv1d = np.zeros((5, 4, 8))  # (k, cin, cout)
    assert default_view(("Conv_1", "kernel"), conv1d) == MatrixView((0, 1), (2,))
    dense_general = np.zeros((6, 2, 3))
    assert default_view(("DenseGeneral_0", "kernel"), dense_general) == MatrixView((0,), (1, 2))


def test_default_view_refuses_to_guess():
    with pytest.raises(ValueError, match="cannot tell which axes .* 'mlp/kernel'"):
        default_view(("mlp", "kernel"), np.zeros((4, 5, 6)))
    with pytest.raises(ValueError, match="1 dimension"):
        default_view(("bias",), np.zeros(4))


def test_views_that_do_not_fit_are_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        MatrixView((0,), (1,)).check((2, 3, 4))
    with pytest.raises(ValueError, match="does not fit"):
        MatrixView((0, 1), ()).check((2, 3))
    with pytest.raises(ValueError, match="cannot be viewed"):
        MatrixView((0,), (1, 2)).from_matrix(jnp.zeros((2, 5)), (2, 3, 4))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, tokens, train=False):
        x = nn.Embed(20, 8)(tokens)
        x = nn.Conv(8, (3,), name="conv_a")(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(4, name="head")(x)


def test_default_filter_picks_kernels_and_leaves_the_rest():
    variables = LinenModel().init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    selected = matrix_leaves(variables)
    # By hand from the model: the 1-D conv's (3, 8, 8) kernel and the head's (8, 4) kernel;
    # not the embedding, BatchNorm scale/bias/statistics, LayerNorm or biases.
    assert list(selected) == ["params/conv_a/kernel", "params/head/kernel"]
    assert selected["params/conv_a/kernel"].matrix_shape == (24, 8)
    assert selected["params/head/kernel"].matrix_shape == (8, 4)


def test_kernel_filter_include_and_exclude():
    variables = LinenModel().init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    assert list(matrix_leaves(variables, filter=jaxlr.kernel_filter(exclude="head"))) == [
        "params/conv_a/kernel"
    ]
    assert list(matrix_leaves(variables, filter=jaxlr.kernel_filter(include="head"))) == [
        "params/head/kernel"
    ]


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=8,
                                           decode=False, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])


def test_nnx_state_paths_drop_value_and_are_selected_like_linen():
    state = nnx.state(NNXModel(nnx.Rngs(0)))
    raw = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert all(isinstance(p[-1], jax.tree_util.GetAttrKey) and p[-1].name == "value" for p in raw)
    selected = matrix_leaves(state)
    assert list(selected) == [
        "attn/key/kernel", "attn/out/kernel", "attn/query/kernel", "attn/value/kernel",
        "conv/kernel", "layers/0/kernel", "layers/1/kernel",
    ]
    assert selected["attn/query/kernel"].matrix_shape == (4, 8)
    assert selected["attn/out/kernel"].matrix_shape == (8, 4)
    assert selected["conv/kernel"].matrix_shape == (27, 4)
    assert jaxlr.kernel_kinds(state) == {
        "attn/key/kernel": "attention", "attn/out/kernel": "attention",
        "attn/query/kernel": "attention", "attn/value/kernel": "attention",
        "conv/kernel": "conv", "layers/0/kernel": "dense", "layers/1/kernel": "dense",
    }


def test_path_names_of_lists_and_attributes():
    tree = {"a": [jnp.zeros(1), {"b": jnp.zeros(1)}]}
    names = [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert names == [("a", "0"), ("a", "1", "b")]


def test_selecting_nothing_or_non_floating_leaves_is_an_error():
    with pytest.raises(ValueError, match="filter selected no leaf"):
        matrix_leaves({"bias": jnp.zeros(3)})
    with pytest.raises(TypeError, match="'q/kernel' has dtype int8"):
        matrix_leaves({"q": {"kernel": jnp.zeros((3, 3), jnp.int8)}})
