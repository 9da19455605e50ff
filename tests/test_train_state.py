"""Tests of jaxlr.TrainState: Flax's TrainState, with the optimizer's extra arguments forwarded and
an apply_fn that runs factor pairs and LoRITa products."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import jaxlr


def recorder():
    """An optax transformation that keeps the extra arguments it is given in its state."""

    def init(params):
        del params
        return {"seen": jnp.zeros(()), "token": jnp.zeros(())}

    def update(updates, state, params=None, *, batch_stats=None, token=None, **extra):
        del params, extra
        seen = jnp.zeros(()) if batch_stats is None else jax.tree.leaves(batch_stats)[0].sum()
        return updates, {"seen": seen, "token": jnp.asarray(0.0 if token is None else token)}

    return optax.GradientTransformationExtraArgs(init, update)


def test_apply_gradients_forwards_the_new_batch_stats_and_extra_args():
    params = {"w": jnp.ones(3)}
    stats = {"bn": {"var": jnp.full(4, 2.0)}}
    tx = optax.chain(optax.sgd(0.1), recorder())
    state = jaxlr.TrainState.create(apply_fn=lambda v, x: x, params=params, tx=tx,
                                    batch_stats=stats)
    grads = {"w": jnp.ones(3)}
    new_stats = {"bn": {"var": jnp.full(4, 5.0)}}
    state = state.apply_gradients(grads=grads, batch_stats=new_stats, extra_args={"token": 7.0})
    assert float(state.opt_state[1]["seen"]) == 20.0  # the new statistics reached the optimizer
    assert float(state.opt_state[1]["token"]) == 7.0
    np.testing.assert_allclose(np.asarray(state.params["w"]), 0.9)
    assert state.step == 1 and state.batch_stats is new_stats
    # Without new ones, the state's own statistics are passed; Flax's state passes none.
    state = state.apply_gradients(grads=grads)
    assert float(state.opt_state[1]["seen"]) == 20.0
    flax_state = train_state.TrainState.create(apply_fn=lambda v, x: x, params=params,
                                               tx=optax.chain(optax.sgd(0.1), recorder()))
    assert float(flax_state.apply_gradients(grads=grads).opt_state[1]["seen"]) == 0.0


def test_a_plain_optimizer_ignores_the_extra_arguments():
    state = jaxlr.TrainState.create(apply_fn=lambda v, x: x, params={"w": jnp.ones(2)},
                                    tx=optax.adam(0.1), batch_stats={"v": jnp.ones(2)})
    state = state.apply_gradients(grads={"w": jnp.ones(2)})
    np.testing.assert_allclose(np.asarray(state.params["w"]), 0.9, rtol=1e-5)


def test_apply_fn_runs_factor_pairs_factored_and_products_as_their_kernels():
    model = nn.Dense(6)
    x = jnp.ones((2, 16))
    params = model.init(jax.random.key(0), x)["params"]
    compressed = jaxlr.compress(params, {"kernel": 2}).compressed
    state = jaxlr.TrainState.create(apply_fn=model.apply, params=compressed, tx=optax.sgd(0.1))
    # Factored: the jaxpr multiplies x by the 16 x 2 factor, never by a 16 x 6 kernel.
    jaxpr = jax.make_jaxpr(lambda p: state.apply_fn({"params": p}, x))(state.params)
    shapes = [tuple(e.invars[1].aval.shape) for e in jaxpr.eqns
              if e.primitive.name == "dot_general"]
    assert (16, 2) in shapes and (16, 6) not in shapes
    expected = model.apply({"params": jaxlr.collapse(compressed)}, x)
    np.testing.assert_allclose(np.asarray(state.apply_fn({"params": compressed}, x)),
                               np.asarray(expected), rtol=1e-5, atol=1e-6)
    fparams = jaxlr.factorize(params, 2, jax.random.key(1))
    state = jaxlr.TrainState.create(apply_fn=model.apply, params=fparams, tx=optax.sgd(0.1))
    np.testing.assert_allclose(np.asarray(state.apply_fn({"params": fparams}, x)),
                               np.asarray(model.apply({"params": jaxlr.collapse(fparams)}, x)),
                               rtol=1e-5, atol=1e-6)


def test_states_made_apart_from_one_model_share_a_structure_and_a_compiled_step():
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    tx = optax.sgd(0.1)
    first, second = (jaxlr.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
                     for _ in range(2))
    assert jax.tree.structure(first) == jax.tree.structure(second)
    traces = []

    @jax.jit
    def step(state):
        traces.append(1)
        grads = jax.grad(lambda p: jnp.sum(state.apply_fn({"params": p}, jnp.ones((1, 4)))))(
            state.params)
        return state.apply_gradients(grads=grads)

    step(first), step(second)
    assert len(traces) == 1
