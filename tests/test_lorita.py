"""Tests of jaxlr.lorita: factorize / collapse, gradients, initial scale, decay, and the claim."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxlr
from jaxlr import lorita
from jaxlr.nodes import Product


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="Conv_0")(x))
        x = nn.BatchNorm(use_running_average=True, name="BatchNorm_0")(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16, name="Dense_0")(x))
        return nn.Dense(4, name="Dense_1")(x)


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.Conv_0 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.BatchNorm_0 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.Dense_0 = nnx.Linear(8 * 6 * 6, 16, rngs=rngs)
        self.Dense_1 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        x = self.BatchNorm_0(nnx.relu(self.Conv_0(x)))
        x = nnx.relu(self.Dense_0(x.reshape(x.shape[0], -1)))
        return self.Dense_1(x)


X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 3)), jnp.float32)


def linen_variables(seed=0):
    return CNN().init(jax.random.key(seed), X)


# ----------------------------------------------------------------------------------------------
# Structure.


@pytest.mark.parametrize(
    "placement, expected",
    [
        # Conv_0 is 27 x 8, Dense_0 288 x 16, Dense_1 16 x 4.
        ("smaller", [[(27, 8), (8, 8), (8, 8)], [(288, 16), (16, 16), (16, 16)],
                     [(16, 4), (4, 4), (4, 4)]]),
        ("input", [[(27, 27), (27, 27), (27, 8)], [(288, 288), (288, 288), (288, 16)],
                   [(16, 16), (16, 16), (16, 4)]]),
        ("paper", [[(27, 8), (8, 8), (8, 8)], [(288, 288), (288, 288), (288, 16)],
                   [(16, 16), (16, 16), (16, 4)]]),
    ],
)
def test_factor_shapes_follow_the_placement(placement, expected):
    params = linen_variables()["params"]
    fparams = lorita.factorize(params, 3, jax.random.key(1), placement=placement, filter="all")
    nodes = [fparams[name]["kernel"] for name in ("Conv_0", "Dense_0", "Dense_1")]
    assert [[tuple(f.shape) for f in node.factors] for node in nodes] == expected
    assert fparams["Dense_0"]["bias"] is params["Dense_0"]["bias"]


def test_depth_one_changes_nothing():
    params = linen_variables()["params"]
    collapsed = jaxlr.collapse(lorita.factorize(params, 1, filter="all"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(collapsed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_from_dense_round_trip_reproduces_the_tree():
    variables = linen_variables()
    params = variables["params"]
    for placement in ("smaller", "input", "output"):
        ftree = lorita.factorize(params, 3, jax.random.key(2), placement=placement, filter="all")
        pretrained = linen_variables(seed=5)["params"]
        restored = jaxlr.collapse(lorita.from_dense(ftree, pretrained))
        for a, b in zip(jax.tree.leaves(pretrained), jax.tree.leaves(restored), strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(a), 1e-30)
        # Balanced: the factors of each node have equal Frobenius norms.
        node = lorita.from_dense(ftree, pretrained)["Dense_0"]["kernel"]
        norms = [float(jnp.linalg.norm(f)) for f in node.factors]
        np.testing.assert_allclose(norms, norms[0], rtol=1e-4)
    balanced = jaxlr.collapse(lorita.factorize(params, 3, init="balanced", filter="all"))
    np.testing.assert_allclose(np.asarray(balanced["Dense_0"]["kernel"]),
                               np.asarray(params["Dense_0"]["kernel"]), atol=1e-5)


def test_unchanged_linen_and_nnx_models_give_identical_results():
    variables = linen_variables()
    graphdef, state = nnx.split(NNXCNN(nnx.Rngs(3)))
    linen_flat = {"/".join(jaxlr.matrices.path_names(p)): leaf
                  for p, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
    # Give the NNX model the Linen model's numbers; BatchNorm's mean and var are Linen's
    # `batch_stats`, everything else its `params`.

    def linen_value(path, leaf):
        names = jaxlr.matrices.path_names(path)
        collection = "batch_stats" if names[-1] in ("mean", "var") else "params"
        return linen_flat["/".join((collection, *names))]

    state = jax.tree_util.tree_map_with_path(linen_value, state)
    key = jax.random.key(4)
    f_linen = lorita.factorize(variables["params"], 3, key, filter="all")
    f_nnx = lorita.factorize(state, 3, key, filter="all")
    for name in ("Conv_0", "Dense_0", "Dense_1"):
        for a, b in zip(f_linen[name]["kernel"].factors, f_nnx[name]["kernel"].factors,
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    y_linen = CNN().apply({**variables, "params": jaxlr.collapse(f_linen)}, X)
    y_nnx = nnx.merge(graphdef, jaxlr.collapse(f_nnx))(X)
    np.testing.assert_allclose(np.asarray(y_linen), np.asarray(y_nnx), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradients and initial scale.


@pytest.mark.parametrize("depth", [2, 3])
def test_gradient_through_collapse_is_the_chain_rule(depth):
    rng = np.random.default_rng(depth)
    shapes = [(5, 5)] * (depth - 1) + [(5, 3)]
    factors = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
    node = Product(factors, (5, 3), jaxlr.MatrixView((0,), (1,)))

    def loss(node):
        return jnp.sum(jnp.sin(jaxlr.collapse({"k": node})["k"]))

    grads = jax.grad(loss)(node).factors
    f = [np.asarray(x, np.float64) for x in factors]
    w = np.linalg.multi_dot(f) if depth > 2 else f[0] @ f[1]
    c = np.cos(w)  # dL/dW
    # dL/dW_i = (W_1 ... W_{i-1})^T C (W_{i+1} ... W_N)^T
    for i in range(depth):
        left = np.eye(5) if i == 0 else np.linalg.multi_dot([np.eye(5), *f[:i]])
        right = np.eye(3) if i == depth - 1 else np.linalg.multi_dot([*f[i + 1:], np.eye(3)])
        np.testing.assert_allclose(np.asarray(grads[i]), left.T @ c @ right.T, rtol=1e-4,
                                   atol=1e-5)


def test_collapsed_product_has_the_scale_of_the_layers_own_initialiser():
    ratios = {name: [] for name in ("Conv_0", "Dense_0", "Dense_1")}
    for seed in range(20):
        own = linen_variables(seed)["params"]  # a fresh draw of each layer's own initialiser
        model_draw = linen_variables(100 + seed)["params"]
        collapsed = jaxlr.collapse(lorita.factorize(model_draw, 3, jax.random.key(seed),
                                                     filter="all"))
        for name in ratios:
            ratios[name].append(float(jnp.std(collapsed[name]["kernel"]))
                                / float(jnp.std(own[name]["kernel"])))
    for name, values in ratios.items():
        assert abs(np.mean(values) - 1) < 0.1, (name, np.mean(values))


# ----------------------------------------------------------------------------------------------
# Weight decay, optax and orbax.


def test_weight_decay_mask_reaches_every_factor_and_no_bias_or_norm():
    fparams = lorita.factorize(linen_variables()["params"], 3, jax.random.key(0),
                               filter=jaxlr.kernel_filter(exclude="Dense_1"))
    mask = lorita.weight_decay_mask(fparams)
    flat = {jaxlr.matrices.path_key(p): m
            for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(name for name, m in flat.items() if m)
    assert decayed == [
        "Conv_0/kernel/factors/0", "Conv_0/kernel/factors/1", "Conv_0/kernel/factors/2",
        "Dense_0/kernel/factors/0", "Dense_0/kernel/factors/1", "Dense_0/kernel/factors/2",
        "Dense_1/kernel",  # not factorized, still a kernel
    ]
    assert not any(m for name, m in flat.items() if "bias" in name or "BatchNorm" in name)


def test_coupled_and_decoupled_decay_by_closed_form():
    params = {"d": {"kernel": jnp.asarray([[2.0, -1.0], [0.5, 3.0]]), "bias": jnp.ones(2)}}
    fparams = lorita.factorize(params, 2, init="balanced", filter="all")
    zero = jax.tree.map(jnp.zeros_like, fparams)
    lr, wd = 0.1, 0.01

    coupled = lorita.coupled_adam(lr, wd)
    updates, _ = coupled.update(zero, coupled.init(fparams), fparams)
    # Coupled: Adam sees g = wd * w, so its first step is -lr * g / |g| = -lr * sign(w).
    for u, w in zip(updates["d"]["kernel"].factors, fparams["d"]["kernel"].factors, strict=True):
        np.testing.assert_allclose(np.asarray(u), -lr * np.sign(np.asarray(w)), rtol=1e-3)
    np.testing.assert_array_equal(np.asarray(updates["d"]["bias"]), 0.0)

    decoupled = optax.adamw(lr, weight_decay=wd, mask=lorita.weight_decay_mask)
    updates, _ = decoupled.update(zero, decoupled.init(fparams), fparams)
    # Decoupled: with a zero gradient only the decay moves the weights: -lr * wd * w.
    for u, w in zip(updates["d"]["kernel"].factors, fparams["d"]["kernel"].factors, strict=True):
        np.testing.assert_allclose(np.asarray(u), -lr * wd * np.asarray(w), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(updates["d"]["bias"]), 0.0)


def test_optax_masked_and_chain_and_orbax_work_on_a_factorized_tree(tmp_path):
    fparams = lorita.factorize(linen_variables()["params"], 3, jax.random.key(0), filter="all")
    tx = optax.chain(optax.masked(optax.add_decayed_weights(1e-2), lorita.weight_decay_mask),
                     optax.sgd(0.1))
    grads = jax.tree.map(jnp.ones_like, fparams)
    updates, _ = jax.jit(tx.update)(grads, tx.init(fparams), fparams)
    node, update = fparams["Dense_0"]["kernel"], updates["Dense_0"]["kernel"]
    for u, w in zip(update.factors, node.factors, strict=True):
        np.testing.assert_allclose(np.asarray(u), -0.1 * (1 + 1e-2 * np.asarray(w)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["Dense_0"]["bias"]), -0.1, rtol=1e-6)

    checkpointer = ocp.StandardCheckpointer()
    path = os.path.join(tmp_path, "fparams")
    checkpointer.save(path, fparams)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path, fparams)
    assert jax.tree.structure(restored) == jax.tree.structure(fparams)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fparams), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# The method's claim, measured on the embedded digits data.


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10, name="head")(x)


def _train_digits(depth, weight_decay=3e-3, steps=800):
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images = (digits.data[order] / 16.0).astype(np.float32)
    labels = digits.target[order].astype(np.int32)
    x, y, x_val, y_val = images[:1078], labels[:1078], images[1078:1437], labels[1078:1437]
    model = MLP()
    fparams = lorita.factorize(model.init(jax.random.key(0), x[:1])["params"], depth,
                               jax.random.key(1), filter="all")
    tx = lorita.coupled_adam(3e-3, weight_decay)

    def loss_fn(fparams):
        logits = model.apply({"params": jaxlr.collapse(fparams)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(fparams, state):
        loss, grads = jax.value_and_grad(loss_fn)(fparams)
        updates, state = tx.update(grads, state, fparams)
        return optax.apply_updates(fparams, updates), state, loss

    state = tx.init(fparams)
    for _ in range(steps):
        fparams, state, loss = step(fparams, state)
    params = jaxlr.collapse(fparams)

    def accuracy(p):
        return float(np.mean(np.argmax(model.apply({"params": p}, x_val), -1) == y_val))

    return params, float(loss), accuracy


@pytest.mark.slow
def test_depth_three_trains_to_lower_rank_and_truncates_with_less_loss():
    hidden = jaxlr.kernel_filter(exclude="head")
    results = {}
    for depth in (1, 3):
        params, loss, accuracy = _train_digits(depth)
        spectra = jaxlr.svd.singular_values(params, filter=hidden)
        numerical_rank = sum(int(np.sum(np.asarray(s) > 1e-3 * float(s[0])))
                             for s in spectra.values())
        total = sum(len(s) for s in spectra.values())
        # The same 15 singular values for both.
        kept = jaxlr.gsvt_ranks(params, keep=15 / total, filter=hidden, spectra=spectra)
        truncated = jaxlr.project(params, kept,
                                  options=jaxlr.ProjectionOptions(energy_transfer=False))
        results[depth] = (loss, numerical_rank, accuracy(params) - accuracy(truncated))
    (loss1, rank1, drop1), (loss3, rank3, drop3) = results[1], results[3]
    assert loss1 < 0.05 and loss3 < 0.05  # both fit the training data
    assert rank3 < 0.6 * rank1
    assert drop3 < drop1


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_is_rejected_when_given():
    params = linen_variables()["params"]
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        lorita.factorize(params, 0, jax.random.key(0), filter="all")
    with pytest.raises(ValueError, match="key is required"):
        lorita.factorize(params, 2, filter="all")
    with pytest.raises(ValueError, match="placement must be one of"):
        lorita.factorize(params, 2, jax.random.key(0), placement="middle", filter="all")
    with pytest.raises(ValueError, match="selected no matrix"):
        lorita.factorize(params, 2, jax.random.key(0), filter=lambda path, leaf: False)
    fparams = lorita.factorize(params, 2, jax.random.key(0), filter="all")
    with pytest.raises(ValueError, match="already factorized"):
        lorita.factorize(fparams, 2, jax.random.key(0), filter="all")

    node = fparams["Dense_1"]["kernel"]
    with pytest.raises(ValueError, match=r"factors of the product have shapes .* 16 x 4"):
        Product((node.factors[0], node.factors[1][:, :3]), node.shape, node.view)

    wrong = jax.tree.map(lambda x: x, params)
    wrong["Dense_1"] = {**wrong["Dense_1"], "kernel": jnp.zeros((16, 5))}
    with pytest.raises(ValueError, match=r"kernel 'Dense_1/kernel' has shape \(16, 5\)"):
        lorita.from_dense(fparams, wrong)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
            lorita.coupled_adam(1e-3, bad)
    with pytest.raises(TypeError, match="weight_decay must be a number"):
        lorita.coupled_adam(1e-3, "1e-4")


def test_attention_kernels_factorize_through_their_views():
    model = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, out_features=8)
    x = jnp.ones((1, 5, 8))
    params = model.init(jax.random.key(0), x, x)["params"]
    fparams = lorita.factorize(params, 2, init="balanced", filter="all")
    # query (8, 4, 4) is an 8 x 16 matrix; out (4, 4, 8) a 16 x 8 matrix.
    assert [f.shape for f in fparams["query"]["kernel"].factors] == [(8, 8), (8, 16)]
    assert [f.shape for f in fparams["out"]["kernel"].factors] == [(16, 8), (8, 8)]
    collapsed = jaxlr.collapse(fparams)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(collapsed), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    y = model.apply({"params": collapsed}, x, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model.apply({"params": params}, x, x)),
                               atol=1e-5)


def test_coupled_decay_without_a_mask_decays_every_parameter_as_pytorch_does():
    params = {"d": {"kernel": jnp.asarray([[2.0, -1.0], [0.5, 3.0]]), "bias": jnp.ones(2)}}
    fparams = lorita.factorize(params, 2, init="balanced", filter="all")
    lr, wd = 0.1, 0.01
    tx = lorita.coupled_adam(lr, wd, mask=None)
    grads = jax.tree.map(jnp.zeros_like, fparams)
    updates, _ = tx.update(grads, tx.init(fparams), fparams)
    # g = wd * w for every leaf, so Adam's first step is -lr * sign(w) everywhere, biases included.
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(fparams), strict=True):
        np.testing.assert_allclose(np.asarray(u), -lr * np.sign(np.asarray(w)), rtol=1e-3)


def test_nnx_modules_factorize_to_products_of_params_that_read_as_the_kernel():
    model = NNXCNN(nnx.Rngs(0))
    kernel = model.Dense_0.kernel[...]
    fmodel = lorita.factorize(model, 3, jax.random.key(0),
                              filter=jaxlr.kernel_filter(exclude="Dense_1"))
    assert isinstance(model.Dense_0.kernel, nnx.Param)  # the original module is untouched
    node = fmodel.Dense_0.kernel
    assert isinstance(node, Product) and all(isinstance(f, nnx.Param) for f in node.factors)
    product = np.linalg.multi_dot([np.asarray(f[...], np.float64) for f in node.factors])
    np.testing.assert_allclose(np.asarray(fmodel.Dense_0.kernel[...]), product, rtol=1e-5,
                               atol=1e-6)
    # The outer factor is the layer's own kernel, the squares orthogonal: the norm is kept.
    assert float(jnp.linalg.norm(fmodel.Dense_0.kernel[...])) == pytest.approx(
        float(jnp.linalg.norm(kernel)), rel=1e-5)
    # The model runs unchanged, on the products, and equals the collapsed model.
    np.testing.assert_allclose(np.asarray(fmodel(X)), np.asarray(jaxlr.collapse(fmodel)(X)),
                               rtol=1e-5, atol=1e-6)
    # Its Param state holds the factors, which the weight-decay mask selects; not the biases.
    state = nnx.state(fmodel, nnx.Param)
    mask = {jaxlr.matrices.path_key(p): m for p, m in
            jax.tree_util.tree_flatten_with_path(lorita.weight_decay_mask(state))[0]}
    assert sorted(k for k, m in mask.items() if m) == [
        "Conv_0/kernel/factors/0", "Conv_0/kernel/factors/1", "Conv_0/kernel/factors/2",
        "Dense_0/kernel/factors/0", "Dense_0/kernel/factors/1", "Dense_0/kernel/factors/2",
        "Dense_1/kernel"]
    with pytest.raises(ValueError, match="already factorized"):
        lorita.factorize(fmodel, 2, jax.random.key(0), filter="all")
    # from_dense refactors a module from dense numbers.
    restored = lorita.from_dense(fmodel, model)
    np.testing.assert_allclose(np.asarray(restored.Dense_0.kernel[...]), np.asarray(kernel),
                               atol=1e-5)


def test_paper_placement_puts_the_squares_of_1x1_convolutions_on_the_input_side():
    params = {"conv3x3": {"kernel": jnp.ones((3, 3, 64, 128))},
              "shortcut": {"kernel": jnp.ones((1, 1, 64, 128))},
              "fc": {"kernel": jnp.ones((512, 10))}}
    fparams = lorita.factorize(params, 2, jax.random.key(0), placement="paper", filter="all")
    shapes = {name: [tuple(f.shape) for f in fparams[name]["kernel"].factors] for name in params}
    # A k x k conv then a 1 x 1 conv; before a 1 x 1 conv (as the released code) and a dense
    # layer, the square goes on the input side: 64 x 64, not 128 x 128.
    assert shapes == {"conv3x3": [(576, 128), (128, 128)], "shortcut": [(64, 64), (64, 128)],
                      "fc": [(512, 512), (512, 10)]}

