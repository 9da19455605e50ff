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
from jaxlr.matrices import MatrixView, default_view, path_names
from jaxlr.selection import matrix_leaves


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
    selected = matrix_leaves(variables, filter="all")
    # By hand from the model: the 1-D conv's (3, 8, 8) kernel and the head's (8, 4) kernel;
    # not the embedding, BatchNorm scale/bias/statistics, LayerNorm or biases.
    assert list(selected) == ["conv_a/kernel", "head/kernel"]
    assert selected["conv_a/kernel"].matrix_shape == (24, 8)
    assert selected["head/kernel"].matrix_shape == (8, 4)
    # The variables dict and its params subtree give the same keys.
    assert list(matrix_leaves(variables["params"], filter="all")) == list(selected)


def test_kernel_filter_include_and_exclude():
    variables = LinenModel().init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    assert list(matrix_leaves(variables, filter=jaxlr.kernel_filter(exclude="head"))) == [
        "conv_a/kernel"
    ]
    assert list(matrix_leaves(variables, filter=jaxlr.kernel_filter(include="head"))) == [
        "head/kernel"
    ]
    assert list(matrix_leaves(variables, filter="conv")) == ["conv_a/kernel"]
    assert list(matrix_leaves(variables, filter=("dense",))) == ["head/kernel"]


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
    selected = matrix_leaves(state, filter="all")
    assert list(selected) == [
        "attn/key/kernel", "attn/out/kernel", "attn/query/kernel", "attn/value/kernel",
        "conv/kernel", "layers/0/kernel", "layers/1/kernel",
    ]
    assert selected["attn/query/kernel"].matrix_shape == (4, 8)
    assert selected["attn/out/kernel"].matrix_shape == (8, 4)
    assert selected["conv/kernel"].matrix_shape == (27, 4)
    assert jaxlr.selection.kernel_kinds(state, filter="all") == {
        "attn/key/kernel": "attention", "attn/out/kernel": "attention",
        "attn/query/kernel": "attention", "attn/value/kernel": "attention",
        "conv/kernel": "conv", "layers/0/kernel": "dense", "layers/1/kernel": "dense",
    }


def test_path_names_of_lists_and_attributes():
    tree = {"a": [jnp.zeros(1), {"b": jnp.zeros(1)}]}
    names = [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert names == [("a", "0"), ("a", "1", "b")]


def test_selecting_nothing_or_non_floating_leaves_is_an_error():
    with pytest.raises(ValueError, match="selected no matrix"):
        matrix_leaves({"bias": jnp.zeros(3)}, filter="all")
    with pytest.raises(TypeError, match="'q/kernel' has dtype int8"):
        matrix_leaves({"q": {"kernel": jnp.zeros((3, 3), jnp.int8)}}, filter="all")


def test_path_keys_accept_strings_and_tuples_and_drop_a_leading_params():
    assert jaxlr.matrices.path_key(("params", "a", "kernel")) == "a/kernel"
    assert jaxlr.matrices.path_key("params/a/kernel") == "a/kernel"
    assert jaxlr.matrices.path_key(("blocks", 0, "kernel")) == "blocks/0/kernel"
    keypath = jax.tree_util.tree_flatten_with_path({"params": {"a": {"kernel": 1}}})[0][0][0]
    assert jaxlr.matrices.path_key(keypath) == "a/kernel"
    with pytest.raises(TypeError, match="'/'-joined string or a tuple"):
        jaxlr.matrices.path_key(3)


class Renamed(nn.Module):
    """Attention under a name without "attn", beside convolutions of every rank."""

    @nn.compact
    def __call__(self, x):
        y = nn.MultiHeadDotProductAttention(2, qkv_features=8, name="mha")(x, x)
        y = nn.Conv(6, (3,), name="out")(y)          # a 1-D conv named like a projection
        return nn.DenseGeneral((2, 3), name="DenseGeneral_0")(y)


def test_attention_is_recognised_by_what_the_module_is():
    params = Renamed().init(jax.random.key(0), jnp.ones((1, 5, 6)))["params"]
    kinds = jaxlr.selection.kernel_kinds(params, view=lambda path, leaf: (
        MatrixView.split(3, 2) if path[-2] == "out" else default_view(path, leaf)), filter="all")
    assert kinds == {
        "DenseGeneral_0/kernel": "dense",
        "mha/key/kernel": "attention", "mha/out/kernel": "attention",
        "mha/query/kernel": "attention", "mha/value/kernel": "attention",
        "out/kernel": "conv",
    }


def test_the_torch_layout_sees_the_same_matrix_as_the_flax_layout():
    rng = np.random.default_rng(0)
    hwio = rng.standard_normal((3, 3, 4, 16)).astype(np.float32)
    oihw = np.transpose(hwio, (3, 2, 0, 1))
    flax_matrix = np.asarray(jaxlr.matrices.flax_view(("conv", "kernel"), hwio).to_matrix(hwio))
    view = jaxlr.matrices.torch_view(("conv", "weight"), oihw)
    torch_matrix = np.asarray(view.to_matrix(oihw))
    assert torch_matrix.shape == (36, 16)
    # Same singular values; rows in the order (cin, kh, kw) instead of (kh, kw, cin).
    np.testing.assert_allclose(np.linalg.svd(torch_matrix, compute_uv=False),
                               np.linalg.svd(flax_matrix, compute_uv=False), rtol=1e-5)
    np.testing.assert_array_equal(torch_matrix, oihw.reshape(16, 36).T)
    linear = rng.standard_normal((5, 3)).astype(np.float32)  # (out, in)
    np.testing.assert_array_equal(
        np.asarray(jaxlr.matrices.torch_view(("l", "weight"), linear).to_matrix(linear)),
        linear.T)


def test_a_kernel_of_the_other_layout_is_refused_naming_the_view_option():
    oihw = {"conv": {"kernel": jnp.ones((16, 3, 3, 3))}}
    with pytest.raises(ValueError, match="view='torch'"):
        matrix_leaves(oihw, filter="all")
    assert matrix_leaves(oihw, view="torch", filter="all")["conv/kernel"].matrix_shape == (27, 16)
    # A Flax kernel that only looks like OIHW goes through with the explicit Flax layout.
    assert matrix_leaves(oihw, view="flax", filter="all")["conv/kernel"].matrix_shape == (144, 3)
    # Columns that are not the bias's outputs: the wrong way round.
    transposed = {"fc": {"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(3)}}
    with pytest.raises(ValueError, match="bias beside it has 3 entries.*view='torch'"):
        matrix_leaves(transposed, filter="all")
    assert matrix_leaves(transposed, view="torch", filter="all")["fc/kernel"].matrix_shape == (5, 3)
    equinox_conv = {"conv": {"weight": jnp.ones((16, 3, 3, 3)), "bias": jnp.zeros((16, 1, 1))}}
    names = jaxlr.kernel_filter(names="weight")
    with pytest.raises(ValueError, match="view='torch'"):
        matrix_leaves(equinox_conv, filter=names, view="flax")
    assert matrix_leaves(equinox_conv, filter=names, view="torch")["conv/weight"].matrix_shape \
        == (27, 16)


def test_views_and_filters_given_wrongly_are_refused_when_given():
    with pytest.raises(ValueError, match="view must be one of"):
        jaxlr.matrices.resolve_view("oihw")
    with pytest.raises(TypeError, match="view must be a function"):
        jaxlr.matrices.resolve_view((0, 1))
    with pytest.raises(ValueError, match="one of .*'attention', 'conv', 'dense'"):
        jaxlr.matrices.resolve_filter("convolution")
    with pytest.raises(ValueError, match="include='\\[' is not a valid regular expression"):
        jaxlr.kernel_filter(include="[")
    with pytest.raises(ValueError, match="kinds must be"):
        jaxlr.kernel_filter(kinds="mlp")
