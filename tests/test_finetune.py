"""Fine-tuning a compressed model (docs/inference.md): the factor pairs ``A``, ``B`` are trained
themselves, in Flax Linen (through :func:`jaxlr.apply`), Flax NNX (``nnx.Optimizer``) and Equinox
(``eqx.filter_value_and_grad``). Gradients are checked against the chain rule computed in numpy
(float64) or through the dense model, an SGD step against ``-lr * grad``, and the trained model
against its factored shapes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import jaxlr
from jaxlr.nodes import LowRank

M, HIDDEN, OUT, RANK, BATCH = 24, 40, 4, 5, 16
X = jax.random.normal(jax.random.key(1), (BATCH, M))
Y = jax.random.normal(jax.random.key(2), (BATCH, OUT))
LR = 0.05


def mse(out, target=Y):
    return jnp.mean((out - target) ** 2)


def np_pair_grads(a, b, bias, w2, b2):
    """``dL/dA``, ``dL/dB`` of ``L = mean((relu(X A B + bias) W2 + b2 - Y)^2)`` by hand:
    ``G = dL/dH`` for ``H = X A B + bias``, then ``dL/dA = X^T G B^T``, ``dL/dB = (X A)^T G``."""
    x, y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    a, b, bias, w2, b2 = (np.asarray(v, np.float64) for v in (a, b, bias, w2, b2))
    h = x @ a @ b + bias
    out = np.maximum(h, 0) @ w2 + b2
    d_out = 2 * (out - y) / out.size
    g = (d_out @ w2.T) * (h > 0)
    return x.T @ g @ b.T, (x @ a).T @ g


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-4, atol=1e-6)


def shapes_formed(jaxpr):
    """The shapes of every value a (closed) jaxpr computes, its sub-jaxprs included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = set()
    for eqn in jaxpr.eqns:
        found.update(tuple(v.aval.shape) for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    found |= shapes_formed(sub)
    return found


# --- Flax Linen ---------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(HIDDEN)(x))
        return nn.Dense(OUT)(x)


def linen_mlp():
    model = LinenMLP()
    params = model.init(jax.random.key(0), X)["params"]
    return model, jaxlr.compress(params, {"Dense_0/kernel": RANK}).compressed


def linen_loss(model, params):
    return mse(jaxlr.apply(model, {"params": params}, X))



def _train_further(step, params, opt_state, first_loss, steps=10):
    """Ten more steps of ``step``; the loss must fall by more than 10%. Returns the parameters."""
    losses = [float(first_loss)]
    for _ in range(steps):
        params, opt_state, loss, _ = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses
    return params


def test_linen_factor_gradients_through_apply_are_the_chain_rule():
    model, params = linen_mlp()
    node = params["Dense_0"]["kernel"]
    assert isinstance(node, LowRank)
    assert node.a.shape == (M, RANK) and node.b.shape == (RANK, HIDDEN)
    _, grads = jax.jit(jax.value_and_grad(functools.partial(linen_loss, model)))(params)
    pair = grads["Dense_0"]["kernel"]
    assert isinstance(pair, LowRank) and pair.rank == RANK  # the gradient has the pair's form
    d_a, d_b = np_pair_grads(node.a, node.b, params["Dense_0"]["bias"],
                             params["Dense_1"]["kernel"], params["Dense_1"]["bias"])
    assert_close(pair.a, d_a)
    assert_close(pair.b, d_b)
    assert np.abs(d_a).max() > 1e-3 and np.abs(d_b).max() > 1e-3  # both factors are trained


def test_linen_sgd_steps_move_the_factors_by_minus_lr_grad_and_keep_the_pair():
    model, params = linen_mlp()
    tx = optax.sgd(LR)
    loss_and_grad = jax.value_and_grad(functools.partial(linen_loss, model))

    @jax.jit
    def step(params, opt_state):
        loss, grads = loss_and_grad(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state = tx.init(params)
    new, opt_state, first, grads = step(params, opt_state)
    for name in ("a", "b"):
        before, after = getattr(params["Dense_0"]["kernel"], name), getattr(
            new["Dense_0"]["kernel"], name)
        np.testing.assert_allclose(after - before, -LR * getattr(grads["Dense_0"]["kernel"], name),
                                   rtol=1e-5, atol=1e-7)
    new = _train_further(step, new, opt_state, first)
    node = new["Dense_0"]["kernel"]
    assert isinstance(node, LowRank) and (node.rank, node.shape) == (RANK, (M, HIDDEN))
    assert node.a.shape == (M, RANK) and node.b.shape == (RANK, HIDDEN)
    # Neither the forward nor the backward pass forms the 24 x 40 kernel.
    formed = shapes_formed(jax.make_jaxpr(loss_and_grad)(new))
    assert (M, HIDDEN) not in formed and (HIDDEN, M) not in formed


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(OUT)(nn.relu(x).mean((1, 2)))


def test_linen_batchnorm_model_trains_its_conv_pair_and_recomputes_the_statistics():
    """``mutable=["batch_stats"]`` under ``jit``: the factors' gradients are the dense kernel's,
    ``dL/dW`` (through ``model.apply`` on ``W = A B``) carried to the pair by the chain rule
    (``dL/dA = dL/dW B^T``, ``dL/dB = A^T dL/dW``), and the new statistics are the batch's."""
    model = LinenCNN()
    images = jax.random.normal(jax.random.key(3), (BATCH, 6, 6, 3))
    variables = model.init(jax.random.key(0), images)
    params = jaxlr.compress(variables["params"], {"Conv_0/kernel": 3}).compressed
    stats = variables["batch_stats"]

    def loss_fn(params):
        out, updates = jaxlr.apply(model, {"params": params, "batch_stats": stats}, images,
                                   train=True, mutable=["batch_stats"])
        return mse(out), updates["batch_stats"]

    (_, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    node, pair = params["Conv_0"]["kernel"], grads["Conv_0"]["kernel"]
    kernel = np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)  # 27 x 8

    def dense_loss(w):
        dense = {**params, "Conv_0": {**params["Conv_0"], "kernel": w}}
        out, _ = model.apply({"params": dense, "batch_stats": stats}, images, train=True,
                             mutable=["batch_stats"])
        return mse(out)

    d_w = np.asarray(jax.grad(dense_loss)(jnp.asarray(kernel.reshape(3, 3, 3, 8), jnp.float32)),
                     np.float64).reshape(27, 8)
    assert_close(pair.a, d_w @ np.asarray(node.b, np.float64).T)
    assert_close(pair.b, np.asarray(node.a, np.float64).T @ d_w)

    # The statistics: the pre-BN activations of this batch, by numpy's own convolution.
    x = np.asarray(images, np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.stack([padded[:, i:i + 6, j:j + 6, :] for i in range(3) for j in range(3)], -2)
    pre = windows.reshape(BATCH, 6, 6, 27) @ kernel + np.asarray(params["Conv_0"]["bias"])
    mean, var = pre.mean((0, 1, 2)), pre.var((0, 1, 2))
    bn = stats["BatchNorm_0"]
    np.testing.assert_allclose(new_stats["BatchNorm_0"]["mean"],
                               0.9 * np.asarray(bn["mean"]) + 0.1 * mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new_stats["BatchNorm_0"]["var"],
                               0.9 * np.asarray(bn["var"]) + 0.1 * var, rtol=1e-4, atol=1e-5)


def test_optimizers_with_weight_decay_initialise_and_step_on_trees_holding_pairs():
    model, params = linen_mlp()
    grads = jax.grad(functools.partial(linen_loss, model))(params)
    kernels = traverse_util.path_aware_map(lambda path, _: path[-1] == "kernel", params)
    for tx in (optax.adamw(1e-3, weight_decay=1e-2),
               optax.adamw(1e-3, weight_decay=1e-2,
                           mask=lambda p: jax.tree.map(lambda v: v.ndim > 1, p)),
               optax.chain(optax.add_decayed_weights(1e-2, mask=kernels), optax.sgd(LR)),
               optax.adafactor(1e-3)):
        updates, _ = tx.update(grads, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        assert isinstance(new["Dense_0"]["kernel"], LowRank)
        assert new["Dense_0"]["kernel"].rank == RANK
    # Decoupled weight decay acts on each factor: -lr (g + wd p).
    tx = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(LR))
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in ("a", "b"):
        factor = getattr(params["Dense_0"]["kernel"], name)
        np.testing.assert_allclose(getattr(updates["Dense_0"]["kernel"], name),
                                   -LR * (getattr(grads["Dense_0"]["kernel"], name)
                                          + 0.1 * factor), rtol=1e-5, atol=1e-8)


# --- Flax NNX -----------------------------------------------------------------------------------


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(M, HIDDEN, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def test_nnx_factors_are_params_and_train_by_the_chain_rule():
    model = jaxlr.compress(NNXMLP(nnx.Rngs(0)), {"fc1/kernel": RANK}).compressed
    node = model.fc1.kernel
    assert isinstance(node, LowRank) and node.rank == RANK
    assert isinstance(node.a, nnx.Param) and isinstance(node.b, nnx.Param)
    a, b = np.asarray(node.a[...]), np.asarray(node.b[...])
    d_a, d_b = np_pair_grads(a, b, model.fc1.bias[...], model.fc2.kernel[...],
                             model.fc2.bias[...])

    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: mse(m(X)))(model)
        optimizer.update(model, grads)
        return loss, grads

    first, grads = step(model, optimizer)
    assert_close(grads["fc1"]["kernel"]["a"][...], d_a)
    assert_close(grads["fc1"]["kernel"]["b"][...], d_b)
    # One SGD step moved the factors, in place, by -lr * grad.
    np.testing.assert_allclose(model.fc1.kernel.a[...] - a, -LR * d_a, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(model.fc1.kernel.b[...] - b, -LR * d_b, rtol=1e-4, atol=1e-7)
    losses = [float(first)] + [float(step(model, optimizer)[0]) for _ in range(10)]
    assert losses[-1] < 0.9 * losses[0]
    trained = model.fc1.kernel
    assert type(model.fc1).__name__ == "LowRankLayer" and isinstance(trained, LowRank)
    assert isinstance(trained.a, nnx.Param) and trained.rank == RANK
    assert model.fc1.kernel.a[...].shape == (M, RANK)
    assert model.fc1.kernel.b[...].shape == (RANK, HIDDEN)
    params = nnx.state(model, nnx.Param)
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(params))["fc1"]["kernel"] == {
        "a": (M, RANK), "b": (RANK, HIDDEN)}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad_fn = jax.grad(lambda p: mse(nnx.merge(graphdef, p, rest)(X)))
    formed = shapes_formed(jax.make_jaxpr(grad_fn)(params))
    assert (M, HIDDEN) not in formed and (HIDDEN, M) not in formed


def test_nnx_batchnorm_statistics_are_recomputed_in_training_mode():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(M, HIDDEN, rngs=rngs)
            self.bn = nnx.BatchNorm(HIDDEN, momentum=0.9, rngs=rngs)
            self.fc2 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.relu(self.bn(self.fc1(x))))

    model = jaxlr.compress(Net(nnx.Rngs(0)), {"fc1/kernel": RANK}).compressed
    node = model.fc1.kernel
    pre = (np.asarray(X, np.float64) @ np.asarray(node.a[...], np.float64)
           @ np.asarray(node.b[...], np.float64) + np.asarray(model.fc1.bias[...]))
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: mse(m(X)))(model)
        optimizer.update(model, grads)
        return grads

    model.train()
    grads = step(model, optimizer)
    assert np.abs(grads["fc1"]["kernel"]["a"][...]).max() > 0
    np.testing.assert_allclose(model.bn.mean[...], 0.1 * pre.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.bn.var[...], 0.9 + 0.1 * pre.var(0), rtol=1e-4, atol=1e-6)
    model.eval()
    assert model(X).shape == (BATCH, OUT) and model.fc1.kernel.rank == RANK


# --- Equinox ------------------------------------------------------------------------------------


def test_equinox_factor_gradients_are_the_chain_rule_and_sgd_keeps_the_pair():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(M, OUT, HIDDEN, depth=1, key=jax.random.key(0))
    model = jaxlr.compress(mlp, {"layers/0/weight": RANK}).compressed
    node = model.layers[0].weight
    # Equinox's weight is out x in: the pair is of its transpose, x A B as in Flax.
    assert isinstance(node, LowRank) and node.shape == (HIDDEN, M)
    assert node.a.shape == (M, RANK) and node.b.shape == (RANK, HIDDEN)
    d_a, d_b = np_pair_grads(node.a, node.b, model.layers[0].bias, model.layers[1].weight.T,
                             model.layers[1].bias)

    def loss_fn(model):
        return mse(jax.vmap(model)(X))

    tx = optax.sgd(LR)

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss, grads

    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    new, opt_state, first, grads = step(model, opt_state)
    assert_close(grads.layers[0].weight.a, d_a)
    assert_close(grads.layers[0].weight.b, d_b)
    np.testing.assert_allclose(new.layers[0].weight.a - node.a, -LR * grads.layers[0].weight.a,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new.layers[0].weight.b - node.b, -LR * grads.layers[0].weight.b,
                               rtol=1e-5, atol=1e-7)
    new = _train_further(step, new, opt_state, first)
    trained = new.layers[0].weight
    assert isinstance(trained, LowRank) and trained.rank == RANK
    assert trained.a.shape == (M, RANK) and trained.b.shape == (RANK, HIDDEN)
    formed = shapes_formed(eqx.filter_make_jaxpr(eqx.filter_grad(loss_fn))(new)[0])
    assert (M, HIDDEN) not in formed and (HIDDEN, M) not in formed


def test_equinox_conv_pair_gradients_are_the_dense_kernels_by_the_chain_rule():
    eqx = pytest.importorskip("equinox")
    images = jax.random.normal(jax.random.key(3), (BATCH, 3, 6, 6))
    conv = eqx.nn.Conv2d(3, 8, 3, padding=1, key=jax.random.key(0))
    model = jaxlr.compress(conv, {"weight": 3}).compressed
    node = model.weight
    assert type(model).__name__ == "FactoredConv2d" and node.a.shape == (27, 3)

    def loss_fn(model):
        return jnp.mean(jax.vmap(model)(images) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss_fn))(model)
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    # The dense OIHW weight whose (in * 3 * 3) x out matrix is A B, and the gradient there.
    weight = (a @ b).T.reshape(8, 3, 3, 3)
    dense = eqx.tree_at(lambda c: c.weight, conv, jnp.asarray(weight, jnp.float32))
    d_w = np.asarray(eqx.filter_grad(loss_fn)(dense).weight, np.float64).reshape(8, 27).T
    assert_close(grads.weight.a, d_w @ b.T)
    assert_close(grads.weight.b, a.T @ d_w)
    new = eqx.apply_updates(model, jax.tree.map(lambda g: -LR * g, grads))
    assert type(new).__name__ == "FactoredConv2d" and new.weight.rank == 3
    assert float(loss_fn(new)) < float(loss_fn(model))
