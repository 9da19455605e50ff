"""jaxlr inside the training code people write: one test per friction point a new user met.

Each test is written as user code (Linen ``TrainState``, NNX ``nnx.Optimizer``, plain optax loops,
Equinox) and checks the numbers against an independent numpy computation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util

import jaxlr

X = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8, 8, 3)), jnp.float32)
Y = jnp.asarray(np.arange(8) % 4)


def np_project(matrix, rank, energy_transfer=True):
    u, s, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    kept = s[:rank] * (np.sqrt(np.sum(s**2) / np.sum(s[:rank] ** 2)) if energy_transfer else 1)
    return (u[:, :rank] * kept) @ vt[:rank]


def np_rectified(kernel, gamma, var, rank, eps=1e-5):
    """LRPET eq. 16 in numpy: fold a = gamma / sqrt(var + eps), project with ET, unfold."""
    a = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    matrix = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    return (np_project(matrix * a, rank) * (a / (a * a + 1e-5))).reshape(kernel.shape)


def matrix_rank(kernel, columns, tol=1e-4):
    s = np.linalg.svd(np.asarray(kernel, np.float64).reshape(-1, columns), compute_uv=False)
    return int(np.sum(s > tol * s[0]))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(16, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(16, (3, 3))(x)  # no BatchNorm after this one
        return nn.Dense(4)(nn.relu(x).mean((1, 2)))


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# 1. Linen TrainState: batch_stats reach the transformation.


def test_1_linen_train_state_forwards_batch_stats_to_bn_rectification():
    model = CNN()
    variables = model.init(jax.random.key(0), X)
    pairs = jaxlr.find_bn_pairs(model, variables, X, train=True)
    tx = jaxlr.with_low_rank_projection(
        optax.sgd(0.05, momentum=0.9), prune=0.5, every=2,
        options=jaxlr.ProjectionOptions(bn_pairs=pairs))
    state = jaxlr.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                    batch_stats=variables["batch_stats"])

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                             x, train=True, mutable=["batch_stats"])
            return cross_entropy(logits, y), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), grads

    state, _ = train_step(state, X, Y)
    before = state
    state, grads = train_step(state, X, Y)  # the second step projects
    # Independently: the SGD step, then eq. 16 with the BatchNorm of this step (its scale after
    # the step, its running variance from this step's forward pass).
    momentum = jax.tree.map(lambda m, g: 0.9 * m + g, before.opt_state[0][0].trace, grads)
    stepped = before.params["Conv_0"]["kernel"] - 0.05 * momentum["Conv_0"]["kernel"]
    expected = np_rectified(stepped, state.params["BatchNorm_0"]["scale"],
                            state.batch_stats["BatchNorm_0"]["var"], 8)
    assert not np.allclose(state.batch_stats["BatchNorm_0"]["var"],
                           before.batch_stats["BatchNorm_0"]["var"])  # the new statistics
    np.testing.assert_allclose(np.asarray(state.params["Conv_0"]["kernel"]), expected,
                               rtol=1e-4, atol=1e-5)
    assert pairs == {"Conv_0/kernel": "BatchNorm_0"}  # Conv_1 has no BatchNorm after it
    assert matrix_rank(state.params["Conv_1"]["kernel"], 16) == 8


# 2. Chain order: a misplaced projection is an error; the wrapper cannot be misplaced.


def test_2_a_misplaced_projection_raises_and_the_wrapper_cannot_be_misplaced():
    params = CNN().init(jax.random.key(0), X)["params"]
    grads = jax.tree.map(jnp.ones_like, params)
    optimizer = optax.chain(jaxlr.low_rank_projection(prune=0.5), optax.sgd(0.1))
    opt_state = optimizer.init(params)
    with pytest.raises(Exception, match="not the last transformation of its optax chain"):
        for _ in range(3):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            jax.block_until_ready(params)

    params = CNN().init(jax.random.key(0), X)["params"]
    optimizer = jaxlr.with_low_rank_projection(optax.sgd(0.1), prune=0.5)
    opt_state = optimizer.init(params)
    for _ in range(3):
        previous = params
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    stepped = previous["Conv_0"]["kernel"] - 0.1
    np.testing.assert_allclose(np.asarray(params["Conv_0"]["kernel"]).reshape(27, 16),
                               np_project(np.asarray(stepped).reshape(27, 16), 8), atol=1e-5)


# 3. Schedules and inject_hyperparams.


def test_3_inject_hyperparams_and_a_gradual_schedule():
    params = CNN().init(jax.random.key(0), X)["params"]
    grads = jax.tree.map(jnp.zeros_like, params)
    optimizer = optax.chain(optax.sgd(0.1),
                            optax.inject_hyperparams(jaxlr.low_rank_projection)(prune=0.5))
    opt_state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for prune, rank in ((0.5, 8), (0.75, 4), (0.875, 2)):
        opt_state[1].hyperparams["prune"] = jnp.asarray(prune)
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        assert matrix_rank(params["Conv_0"]["kernel"], 16) == rank
    assert update._cache_size() == 1  # one compilation for every pruned fraction

    # Gradual compression: the kept fraction ramps from 1 to 1/4 over 6 steps.
    params = CNN().init(jax.random.key(0), X)["params"]
    optimizer = jaxlr.with_low_rank_projection(
        optax.sgd(0.1), keep=optax.linear_schedule(1.0, 0.25, transition_steps=6))
    opt_state = optimizer.init(params)
    ranks = []
    for _ in range(8):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ranks.append(matrix_rank(params["Conv_0"]["kernel"], 16))
    assert ranks == [16, 14, 12, 10, 8, 6, 4, 4]


# 4. NNX and LoRITa with nnx.Optimizer; compressed NNX models keep ordinary kernel access.


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(192, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 64, rngs=rngs)
        self.head = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def test_4_nnx_lorita_trains_with_nnx_optimizer_and_compresses_to_an_nnx_model():
    model = NNXMLP(nnx.Rngs(0))
    model = jaxlr.lorita.factorize(model, 3, jax.random.key(1))
    optimizer = nnx.Optimizer(model, jaxlr.lorita.coupled_adam(3e-3, 1e-4), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, X, Y)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    factors = [np.asarray(f[...], np.float64) for f in model.fc1.kernel.factors]
    np.testing.assert_allclose(np.asarray(model.fc1.kernel[...]), np.linalg.multi_dot(factors),
                               rtol=1e-4, atol=1e-6)

    ranks = jaxlr.lsvt_ranks(model, keep=0.25, filter=jaxlr.kernel_filter(exclude="head"))
    small = jaxlr.compress(model, ranks).compressed
    dense = np.asarray(model.fc2.kernel[...], np.float64)
    np.testing.assert_allclose(np.asarray(small.fc2.kernel[...]),
                               np_project(dense, 16, energy_transfer=False), atol=1e-4)
    collapsed = jaxlr.collapse(small)  # the same model with dense truncated kernels
    np.testing.assert_allclose(np.asarray(small(X)), np.asarray(collapsed(X)), rtol=1e-4,
                               atol=1e-4)


class NNXBNNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))


def test_4_nnx_lrpet_passes_batch_stats_through_nnx_optimizer():
    model = NNXBNNet(nnx.Rngs(0))
    pairs = jaxlr.find_bn_pairs(model, X)
    optimizer = nnx.Optimizer(model, jaxlr.with_low_rank_projection(
        optax.sgd(0.05), prune=0.5, options=jaxlr.ProjectionOptions(bn_pairs=pairs)),
        wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: cross_entropy(m(x), y))(model)
        kernel = model.conv.kernel[...] - 0.05 * grads["conv"]["kernel"][...]
        optimizer.update(model, grads, batch_stats=nnx.state(model, nnx.BatchStat))
        return kernel

    stepped = train_step(model, optimizer, X, Y)
    expected = np_rectified(np.asarray(stepped), model.bn.scale[...], model.bn.var[...], 8)
    np.testing.assert_allclose(np.asarray(model.conv.kernel[...]), expected, rtol=1e-4,
                               atol=1e-5)


# 5. Checkpoints: NNX State, typed nodes without a target, CheckpointManager.


def test_5_checkpoints_of_nnx_training_with_a_checkpoint_manager(tmp_path):
    model = jaxlr.lorita.factorize(NNXMLP(nnx.Rngs(0)), 2, jax.random.key(1))
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        manager.save(0, args=jaxlr.export.Save(nnx.state(model)))  # an NNX State
        manager.save(1, args=jaxlr.export.Save(model))              # the module: typed nodes
        assert manager.all_steps() == [1]
        restored = manager.restore(1, args=jaxlr.export.Restore())
    assert isinstance(restored["fc1"]["kernel"], jaxlr.Product)
    fresh = jaxlr.inference.nnx_model(NNXMLP(nnx.Rngs(7)), restored)
    np.testing.assert_array_equal(np.asarray(fresh(X)), np.asarray(model(X)))


# 6. Keys: a variables dict and its params, strings and tuples.


def test_6_ranks_of_a_variables_dict_work_on_its_params_and_tuple_paths_work_everywhere():
    variables = CNN().init(jax.random.key(0), X)
    ranks = jaxlr.lsvt_ranks(variables, prune=0.5, filter="conv")
    projected = jaxlr.project(variables["params"], ranks)
    assert matrix_rank(projected["Conv_1"]["kernel"], 16) == 8
    flat = traverse_util.flatten_dict(variables["params"])  # tuple keys, as users have them
    tuple_ranks = {path: 4 for path in flat if path[-1] == "kernel" and path[0] != "Dense_0"}
    assert ranks[("Conv_1", "kernel")] == ranks["params/Conv_1/kernel"] == 8
    small = jaxlr.compress(variables, tuple_ranks).compressed
    assert small["params"]["Conv_0"]["kernel"].rank == 4


# 7. One meaning per word, one default everywhere.


def test_7_keep_and_prune_mean_the_same_everywhere_and_energy_transfer_is_on_everywhere():
    params = CNN().init(jax.random.key(0), X)["params"]
    assert jaxlr.lsvt_ranks(params, keep=0.3) == jaxlr.lsvt_ranks(params, prune=0.7)
    assert jaxlr.gsvt_ranks(params, keep=0.3) == jaxlr.gsvt_ranks(params, prune=0.7)
    once = jaxlr.project(params, prune=0.5)
    optimizer = jaxlr.low_rank_projection(prune=0.5)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params),
                                  params)
    stepped = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(stepped), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    kernel = np.asarray(params["Conv_0"]["kernel"])
    assert np.linalg.norm(np.asarray(once["Conv_0"]["kernel"])) == pytest.approx(
        np.linalg.norm(kernel), rel=1e-5)  # energy transfer by default, in both
    assert float(jnp.linalg.norm(jaxlr.svd.project_matrix(kernel.reshape(27, 16), 8))) == (
        pytest.approx(np.linalg.norm(kernel), rel=1e-5))


# 8. BatchNorm pairing by dataflow in nn.Sequential.


def test_8_sequential_models_are_rectified_through_the_batchnorm_that_follows():
    model = nn.Sequential([nn.Conv(16, (3, 3)), nn.BatchNorm(use_running_average=True),
                           nn.relu, nn.Conv(16, (3, 3)), nn.relu])
    variables = model.init(jax.random.key(0), X)
    stats = jax.tree.map(lambda v: v + jnp.linspace(0.5, 2.0, v.shape[-1]),
                         variables["batch_stats"])
    pairs = jaxlr.find_bn_pairs(model, variables, X)
    assert pairs == {"layers_0/kernel": "layers_1"}
    out = jaxlr.project(variables["params"], prune=0.5, batch_stats=stats,
                        options=jaxlr.ProjectionOptions(bn_pairs=pairs, filter="all"))
    kernel = variables["params"]["layers_0"]["kernel"]
    np.testing.assert_allclose(
        np.asarray(out["layers_0"]["kernel"]),
        np_rectified(kernel, variables["params"]["layers_1"]["scale"],
                     stats["layers_1"]["var"], 8), rtol=1e-4, atol=1e-5)
    plain = np.asarray(variables["params"]["layers_3"]["kernel"]).reshape(144, 16)
    np.testing.assert_allclose(np.asarray(out["layers_3"]["kernel"]).reshape(144, 16),
                               np_project(plain, 8), atol=1e-5)


# 9. Other layouts: Equinox (OIHW) models.


def equinox_net(key, padding=0):
    """An Equinox CNN: a 3 x 3 convolution of 16 filters, ReLU, global mean, a 4-way head."""
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.conv = eqx.nn.Conv2d(3, 16, 3, padding=padding, key=k1)
            self.head = eqx.nn.Linear(16, 4, key=k2)

        def __call__(self, x):  # one CHW image
            return self.head(jax.nn.relu(self.conv(x)).mean((1, 2)))

    return Net(key)


def test_9_equinox_models_project_through_the_torch_layout():
    eqx = pytest.importorskip("equinox")
    model = equinox_net(jax.random.key(0))
    images = jnp.transpose(X, (0, 3, 1, 2))
    options = jaxlr.ProjectionOptions(filter=jaxlr.kernel_filter(names="weight", kinds="conv"),
                                      view="torch")
    optimizer = jaxlr.with_low_rank_projection(optax.sgd(0.1), prune=0.5, options=options)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state):
        def loss_fn(model):
            return cross_entropy(jax.vmap(model)(images), Y)

        grads = eqx.filter_grad(loss_fn)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state

    stepped_model, opt_state = train_step(model, opt_state)
    weight = np.asarray(stepped_model.conv.weight)  # (out, in, kh, kw)
    matrix = weight.reshape(16, 27).T  # the (in*kh*kw) x out matrix
    assert matrix_rank(matrix, 16) == 8
    # The default Flax layout refuses such a kernel instead of seeing a 144 x 3 matrix.
    with pytest.raises(ValueError, match="view='torch'"):
        jaxlr.project({"conv": {"kernel": model.conv.weight}}, prune=0.5)


# 10. Forgetting collapse: Linen runs a factorized tree as it is.


def test_10_linen_models_run_on_factorized_params_without_collapse():
    model = CNN()
    variables = model.init(jax.random.key(0), X)
    fparams = jaxlr.lorita.factorize(variables["params"], 3, jax.random.key(1), filter="all")
    y = model.apply({**variables, "params": fparams}, X)  # no collapse
    y_collapsed = model.apply({**variables, "params": jaxlr.collapse(fparams)}, X)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_collapsed), rtol=1e-6, atol=1e-6)

    def loss_fn(fparams):
        return cross_entropy(model.apply({**variables, "params": fparams}, X), Y)

    grads = jax.grad(loss_fn)(fparams)
    # The chain rule through W = W1 W2 W3 for the last factor: dL/dW3 = (W1 W2)^T dL/dW.
    node = fparams["Dense_0"]["kernel"]
    w = jaxlr.collapse(fparams)
    dense_grad = jax.grad(lambda p: cross_entropy(model.apply({**variables, "params": p}, X),
                                                  Y))(w)["Dense_0"]["kernel"]
    left = np.asarray(node.factors[0], np.float64) @ np.asarray(node.factors[1], np.float64)
    np.testing.assert_allclose(np.asarray(grads["Dense_0"]["kernel"].factors[2]),
                               left.T @ np.asarray(dense_grad, np.float64), rtol=1e-4, atol=1e-6)


# 11. Equinox first class: factorized and compressed modules run.


def test_11_factorized_and_compressed_equinox_modules_run_and_train():
    """LoRITa and compression of an Equinox model, as for NNX: the factorized module trains in an
    ordinary optax loop (gradients through the products), the compressed one runs its factor
    pairs (a convolution with r filters then a 1 x 1 one; two thin products for the linear
    layer), both equal to their collapsed dense models."""
    eqx = pytest.importorskip("equinox")
    images = jnp.transpose(X, (0, 3, 1, 2))
    weights = jaxlr.kernel_filter(names="weight")
    model = jaxlr.lorita.factorize(equinox_net(jax.random.key(0), padding=1), 3,
                                   jax.random.key(1), filter=weights, view="torch")
    assert isinstance(model.conv, eqx.nn.Conv2d) and model.conv.weight.depth == 3
    np.testing.assert_allclose(jax.vmap(model)(images),
                               jax.vmap(jaxlr.collapse(model))(images), rtol=1e-5, atol=1e-5)

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(
            lambda m: cross_entropy(jax.vmap(m)(images), Y))(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(20):
        model, opt_state, loss = train_step(model, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert model.conv.weight.depth == 3 and model.head.weight.depth == 3  # still factored

    dense = jaxlr.collapse(model)
    ranks = jaxlr.lsvt_ranks(dense, keep=0.25, filter=weights, view="torch")
    compressed = jaxlr.compress(dense, ranks).compressed
    assert isinstance(compressed.conv.weight, jaxlr.LowRank)
    out = jax.vmap(compressed)(images)
    np.testing.assert_allclose(out, jax.vmap(jaxlr.collapse(compressed))(images), rtol=1e-4,
                               atol=1e-5)
    # Factored: the convolution has r = 4 filters (keep 0.25 of 16), then a 1 x 1 product; the
    # linear layer multiplies by its 1 x 16 and 4 x 1 factors, never by a 4 x 16 matrix.
    convs = [e for e in jax.make_jaxpr(compressed.conv)(images[0]).jaxpr.eqns
             if e.primitive.name == "conv_general_dilated"]
    assert [tuple(e.invars[1].aval.shape) for e in convs] == [(4, 3, 3, 3)]
    products = [tuple(v.aval.shape) for e in jax.make_jaxpr(compressed.head)(jnp.ones(16))
                .jaxpr.eqns if e.primitive.name == "dot_general" for v in e.invars]
    assert (4, 16) not in products and (16, 4) not in products
