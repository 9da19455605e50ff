"""Tests of jaxlr.nodes: the LoRITa product and the factor pair read as the kernels they stand for,
survive jax.tree utilities, and are refused where they cannot go."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlr
from jaxlr.matrices import MatrixView
from jaxlr.nodes import LowRank, Product

VIEW = MatrixView((0, 1, 2), (3,))  # a 3 x 3 x 2 x 4 conv kernel as an 18 x 4 matrix


def product():
    rng = np.random.default_rng(0)
    return Product((jnp.asarray(rng.standard_normal((18, 4)), jnp.float32),
                    jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)), (3, 3, 2, 4), VIEW)


def test_a_product_reads_as_its_kernel():
    node = product()
    w = np.asarray(node.factors[0], np.float64) @ np.asarray(node.factors[1], np.float64)
    kernel = w.reshape(3, 3, 2, 4)
    np.testing.assert_allclose(np.asarray(node[...]), kernel, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(node.value), kernel, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(node[0, 1]), kernel[0, 1], rtol=1e-5)
    assert node.shape == (3, 3, 2, 4) and node.ndim == 4 and node.dtype == jnp.float32
    assert node.depth == 2 and node.param_count == 18 * 4 + 16 and node.matrix_shape == (18, 4)


def test_tree_utilities_may_map_factors_to_anything():
    node = product()
    norms = jax.tree.map(jnp.linalg.norm, {"k": node})  # scalars in place of the factors
    assert isinstance(norms["k"], Product) and norms["k"].factors[0].shape == ()
    masks = jax.tree.map(lambda _: True, LowRank(jnp.ones((18, 1)), jnp.ones((1, 4)),
                                                 (3, 3, 2, 4), VIEW))
    assert masks.a is True
    shapes = jax.eval_shape(lambda n: n, node)
    assert isinstance(shapes, Product) and shapes.factors[1].shape == (4, 4)


def test_matrices_that_do_not_chain_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"factors of the product have shapes \[\(18, 4\), "
                                         r"\(3, 4\)\]"):
        Product((jnp.ones((18, 4)), jnp.ones((3, 4))), (3, 3, 2, 4), VIEW)
    with pytest.raises(ValueError, match="18 x 4 matrix for the kernel"):
        Product((jnp.ones((16, 4)), jnp.ones((4, 4))), (3, 3, 2, 4), VIEW)
    with pytest.raises(ValueError, match=r"rank 5 is outside \[1, 4\]"):
        LowRank(jnp.ones((18, 5)), jnp.ones((5, 4)), (3, 3, 2, 4), VIEW)


def test_lifted_transformations_and_replacing_the_kernel_are_refused_clearly():
    node = product()
    with pytest.raises(NotImplementedError, match="lifted transformation"):
        node.add_axis(0, {})
    with pytest.raises(TypeError, match="Collapse the tree first"):
        node.replace_boxed(jnp.zeros((3, 3, 2, 4)))

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = nn.scan(lambda m, c, _: (m(c), None), variable_axes={"params": 0},
                            split_rngs={"params": True}, length=2)
            return layer(nn.Dense(4), x, None)[0]

    x = jnp.ones((1, 4))
    params = Scanned().init(jax.random.key(0), x)["params"]
    kernel = params["Dense_0"]["kernel"]  # (2, 4, 4): two stacked layers
    stacked = {"Dense_0": {**params["Dense_0"], "kernel": Product(
        (kernel.reshape(8, 4), jnp.eye(4)), (2, 4, 4), MatrixView((0, 1), (2,)))}}
    with pytest.raises(NotImplementedError, match="cannot go through a lifted transformation"):
        Scanned().apply({"params": stacked}, x)


def test_collapse_multiplies_every_node_of_a_tree():
    tree = {"a": {"kernel": product(), "bias": jnp.zeros(4)},
            "b": {"kernel": LowRank(jnp.ones((18, 1)), 2 * jnp.ones((1, 4)), (3, 3, 2, 4), VIEW)}}
    dense = jaxlr.collapse(tree)
    np.testing.assert_allclose(np.asarray(dense["a"]["kernel"]), np.asarray(product()[...]))
    np.testing.assert_array_equal(np.asarray(dense["b"]["kernel"]), np.full((3, 3, 2, 4), 2.0))
    assert dense["a"]["bias"] is tree["a"]["bias"]


def test_reprs_are_one_line_of_shapes_not_values():
    import jax.numpy as jnp

    dense = LowRank(jnp.ones((48, 8)), jnp.ones((8, 64)), (48, 64), MatrixView((0,), (1,)))
    assert repr(dense) == ("LowRank(shape=(48, 64), rank=8, kind='dense', a=float32[48,8], "
                           "b=float32[8,64])")
    conv = LowRank(jnp.ones((27, 4), jnp.bfloat16), jnp.ones((4, 16), jnp.bfloat16),
                   (3, 3, 3, 16), MatrixView((0, 1, 2), (3,)))
    assert repr(conv) == ("LowRank(shape=(3, 3, 3, 16), rank=4, kind='conv', a=bfloat16[27,4], "
                          "b=bfloat16[4,16])")
    torch = Product((jnp.eye(3), jnp.ones((3, 5))), (5, 3), MatrixView((1,), (0,)))
    assert repr(torch) == ("Product(shape=(5, 3), depth=2, kind='view', "
                           f"view={MatrixView((1,), (0,))}, factors=(float32[3,3], float32[3,5]))")
    assert "\n" not in repr(dense) and "1." not in repr(dense)
