"""LoRITa products run in the cheaper order by jaxlr.apply (Linen): the factors applied to the
activations one after the other when the batch is small, multiplied into the kernel when it is
large; outputs and gradients equal those of the collapsed kernel (model.apply on collapse)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlr
from jaxlr.inference import product_cost, product_order


def test_order_by_hand_worked_costs():
    # rows 128, three 1000 x 1000 factors: j=1 costs 128e6 + 2 * 128e6 = 3.84e8 MACs,
    # j=2 1e9 + 2 * 128e6, j=3 2e9 + 128e6: apply every factor to the activations.
    assert product_order(128, [(1000, 1000)] * 3) == 1
    # rows 1e5: j=1 3e11, j=2 1e9 + 2e11, j=3 2e9 + 1e11: multiply them out.
    assert product_order(100_000, [(1000, 1000)] * 3) == 3
    # (784 x 784)(784 x 10), rows 64: j=1 64*784*784 + 64*784*10 = 39.84e6; j=2 784*784*10 +
    # 64*784*10 = 6.65e6: the kernel, whose output is narrow.
    assert product_order(64, [(784, 784), (784, 10)]) == 2
    # a 3x3 conv (288 x 32) then two 32 x 32: the squares are cheap to apply and to multiply;
    # rows 10: j=1 10*288*32 + 2*10*32*32 = 112,640; j=3 2*288*32*32 + 10*288*32 = 681,984.
    assert product_order(10, [(288, 32), (32, 32), (32, 32)]) == 1
    assert product_order(5, [(7, 3)]) == 1  # one factor: nothing to choose


@pytest.mark.parametrize("rows, shapes, j, match", [
    (-1, [(4, 4)], 1, "rows must be an integer >= 0"),
    (8, [], 1, "shapes must be one or more"),
    (8, [(4, 0)], 1, "shapes must be one or more"),
    (8, [(4, 5), (4, 4)], 1, "shapes must chain"),
    (8, [(4, 4), (4, 4)], 3, r"j must be an integer in \[1, 2\]"),
    (8, [(4, 4), (4, 4)], 0, r"j must be an integer in \[1, 2\]"),
])
def test_costs_and_orders_reject_what_is_not_a_chain(rows, shapes, j, match):
    with pytest.raises(ValueError, match=match):
        product_cost(rows, shapes, j)
    if "j must" not in match:
        with pytest.raises(ValueError, match=match):
            product_order(rows, shapes)
    # an empty batch is allowed: applying factors to no rows costs nothing, the product 4 x 4 x 4
    assert (product_cost(0, [(4, 4), (4, 4)], 1), product_cost(0, [(4, 4), (4, 4)], 2)) == (0, 64)
    assert product_order(0, [(4, 4), (4, 4)]) == 1


def test_cost_takes_the_cheaper_way_round_for_the_prefix():
    shapes = [(100, 2), (2, 50), (50, 50)]
    # left to right: 100*2*50 + 100*50*50 = 260,000; right to left: 2*50*50 + 100*2*50 = 15,000
    assert product_cost(1, shapes, 3) == 15_000 + 1 * 100 * 50
    # j = 1: the 100 x 2 kernel, then 2 x 50 and 50 x 50 on 1 row
    assert product_cost(1, shapes, 1) == 200 + 100 + 2500
    assert product_order(1, shapes) == 1


class MLP(nn.Module):
    width: int = 48

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.relu(nn.Dense(self.width)(x))
        x = nn.DenseGeneral((2, 5))(x)
        return x.reshape(x.shape[0], -1)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(16, (3, 3), padding="VALID")(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def factored(model, x, placement="smaller"):
    variables = model.init(jax.random.key(0), x)
    return jaxlr.lorita.factorize(variables["params"], 3, jax.random.key(1),
                                  placement=placement, filter="all")


def dot_shapes(fn, *args):
    """Operand shapes of every dot_general in ``fn``'s jaxpr (all levels)."""
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                        walk(getattr(sub, "jaxpr", sub))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


@pytest.mark.parametrize("model, shape, placement", [
    (MLP(), (4, 48), "smaller"),       # small batch: factors applied one after the other
    (MLP(), (512, 48), "smaller"),     # large batch: multiplied out
    (CNN(), (2, 12, 12, 3), "paper"),  # k x k conv then 1 x 1 ones, applied
    (CNN(), (2, 12, 12, 3), "input"),  # squares on the conv's input side
])
def test_outputs_and_gradients_equal_the_collapsed_kernel(model, shape, placement):
    x = jax.random.normal(jax.random.key(2), shape)
    params = factored(model, x, placement)

    def ordered_loss(p):
        return jnp.sum(jnp.sin(jaxlr.apply(model, {"params": p}, x)))

    def collapsed_loss(p):
        return jnp.sum(jnp.sin(model.apply({"params": jaxlr.collapse(p)}, x)))

    y = jaxlr.apply(model, {"params": params}, x)
    expected = model.apply({"params": jaxlr.collapse(params)}, x)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    grads, reference = jax.grad(ordered_loss)(params), jax.grad(collapsed_loss)(params)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(r))) + 1e-7)


def test_small_batches_never_multiply_square_factors():
    model, x = MLP(width=64), jnp.ones((4, 64))
    params = factored(model, x)
    squares = ((64, 64), (64, 64))
    ordered = dot_shapes(lambda p: jaxlr.apply(model, {"params": p}, x), params)
    collapsed = dot_shapes(lambda p: model.apply({"params": jaxlr.collapse(p)}, x), params)
    assert squares in collapsed  # the plain path multiplies the factors
    assert squares not in ordered
    assert sum(s[0] == (4, 64) for s in ordered) >= 6  # each factor meets the activations


def test_products_in_other_modules_are_multiplied_out():
    # a Product in a module jaxlr does not run (here nn.Embed) is multiplied out as before
    class Emb(nn.Module):
        @nn.compact
        def __call__(self, i):
            return nn.Embed(10, 6)(i)

    model, i = Emb(), jnp.arange(4)
    variables = model.init(jax.random.key(0), i)
    params = jaxlr.lorita.factorize(variables["params"], 2, jax.random.key(1),
                                    filter=lambda path, leaf: leaf.ndim == 2)
    assert isinstance(params["Embed_0"]["embedding"], jaxlr.Product)
    np.testing.assert_allclose(jaxlr.apply(model, {"params": params}, i),
                               model.apply({"params": jaxlr.collapse(params)}, i), rtol=1e-5)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(8 * 36, 40, rngs=rngs)
        self.LinearGeneral_0 = nnx.LinearGeneral(40, (2, 5), rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x)).reshape(x.shape[0], -1)
        return self.LinearGeneral_0(nnx.relu(self.fc1(x))).reshape(x.shape[0], -1)


def test_nnx_ordered_model_has_the_same_outputs_gradients_and_training():
    model = jaxlr.lorita.factorize(NNXNet(nnx.Rngs(0)), 3, jax.random.key(1), placement="paper",
                                   filter="all")
    fast = jaxlr.inference.ordered(model)
    layers = (fast.conv, fast.fc1, fast.LinearGeneral_0)
    assert {type(m).__name__ for m in layers} == {"ProductLayer"}
    assert type(model.fc1).__name__ == "Linear"  # the original is left alone
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
    np.testing.assert_allclose(fast(x), model(x), rtol=1e-4, atol=1e-5)

    def loss(m):
        return jnp.sum(jnp.sin(m(x)))

    grads, reference = nnx.grad(loss)(fast), nnx.grad(loss)(model)
    flat, ref = nnx.to_flat_state(grads), nnx.to_flat_state(reference)
    assert [p for p, _ in flat] == [p for p, _ in ref]  # same parameters, same paths
    for (_, g), (_, r) in zip(flat, ref, strict=True):
        np.testing.assert_allclose(g[...], r[...], rtol=1e-4, atol=1e-5 * float(
            np.max(np.abs(r[...]))) + 1e-7)
    tx = optax.sgd(0.1)
    for m in (fast, model):
        optimizer = nnx.Optimizer(m, tx, wrt=nnx.Param)
        optimizer.update(m, nnx.grad(loss)(m))
    np.testing.assert_allclose(fast(x), model(x), rtol=1e-4, atol=1e-5)
    compressed = jaxlr.compress(fast, {"fc1/kernel": 4}).compressed  # runs on its factor pair
    reference = jaxlr.compress(model, {"fc1/kernel": 4}).compressed
    np.testing.assert_allclose(compressed(x), reference(x), rtol=1e-4, atol=1e-5)


def test_nnx_ordered_refuses_other_objects():
    with pytest.raises(TypeError, match="model must be a Flax NNX module"):
        jaxlr.inference.ordered({"kernel": jnp.ones((2, 2))})
