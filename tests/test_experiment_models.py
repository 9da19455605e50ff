"""experiments.models: parameter counts against the published ones and closed forms; one training
step of each model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlr
from experiments import models
from experiments.train import Task, make_step, new_state

CIFAR = jnp.zeros((1, 32, 32, 3))


def count(model, images=CIFAR):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    return models.param_count(shapes["params"])


@pytest.mark.parametrize("model, published, exact", [
    # He et al. (2016), Table 6: 0.27M, 0.85M, 1.7M.
    (models.CifarResNet(20), 0.27e6, 269_722),
    (models.CifarResNet(56), 0.85e6, 853_018),
    (models.CifarResNet(110), 1.7e6, 1_727_962),
    # VGG-16 for CIFAR-10 with BatchNorm: 14.7M; ResNet-18 for CIFAR-10: 11.2M.
    (models.VGG(16), 14.7e6, 14_728_266),
    (models.ResNet18(), 11.2e6, 11_173_962),
])
def test_parameter_counts_match_the_published_ones(model, published, exact):
    assert count(model) == exact
    assert abs(exact - published) / published < 0.02


def test_vgg13_count_by_hand():
    widths = [3, 64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
    convs = sum(9 * a * b + b + 2 * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    assert count(models.VGG(13)) == convs + 512 * 10 + 10


def test_resnet20_count_by_hand():
    # Stem 3x3x3x16 + BN; per stage n = 3 blocks of two 3x3 convolutions + two BNs; head 64 -> 10.
    total = 27 * 16 + 2 * 16
    cin = 16
    for width in (16, 32, 64):
        for _ in range(3):
            total += 9 * cin * width + 9 * width * width + 4 * width
            cin = width
    assert count(models.CifarResNet(20)) == total + 64 * 10 + 10


@pytest.mark.parametrize("depth, width, batch_norm", [(1, 16, False), (4, 100, False),
                                                      (3, 32, True)])
def test_fcn_count_by_hand(depth, width, batch_norm):
    dims = [784] + [width] * (depth - 1)
    hidden = sum(a * b + (2 * b if batch_norm else b) for a, b in zip(dims[:-1], dims[1:],
                                                                      strict=True))
    model = models.FCN(depth, width, batch_norm)
    assert count(model, jnp.zeros((1, 28, 28, 1))) == hidden + dims[-1] * 10 + 10
    x = jnp.zeros((1, 28, 28, 1))
    pairs = jaxlr.find_bn_pairs(model, jax.eval_shape(model.init, jax.random.key(0), x), x)
    assert pairs == ({f"fc{i}/kernel": f"bn{i}" for i in range(depth - 1)} if batch_norm else {})


@pytest.mark.parametrize("depth", [4, 8, 16])
@pytest.mark.parametrize("heads", [1, 4, 8])
def test_vit_count_by_hand(depth, heads):
    dim, mlp, tokens = 256, 512, 65
    block = (4 * (dim * dim + dim)          # query, key, value, out kernels and biases
             + 2 * 2 * dim                  # two LayerNorms
             + dim * mlp + mlp + mlp * dim + dim)
    embed = 4 * 4 * 3 * dim + dim + dim + tokens * dim   # patches, cls token, positions
    expected = embed + depth * block + 2 * dim + dim * 10 + 10
    assert count(models.ViT(depth, heads)) == expected


def test_bad_model_settings_raise():
    with pytest.raises(ValueError, match="heads"):
        count(models.ViT(4, 3))
    with pytest.raises(ValueError, match="depth must be 6n"):
        count(models.CifarResNet(21))
    with pytest.raises(ValueError, match="depth must be one of"):
        count(models.VGG(11))
    with pytest.raises(ValueError, match="shortcut"):
        count(models.ResidualBlock(8, 1, "C"), jnp.zeros((1, 4, 4, 8)))


def quick_init(model, images):
    """Variables of the model's shapes drawn with numpy (Flax's initialisers compile slowly on
    the CPU for the large models): kernels N(0, 1 / fan-in), biases 0, BN scale 1, var 1."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name or "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if leaf.ndim < 2 and "pos" not in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
        return jnp.asarray(rng.normal(0, fan_in ** -0.5, leaf.shape), leaf.dtype)

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    return jax.tree_util.tree_map_with_path(draw, shapes)


STEP_MODELS = {
    "FCN": (models.FCN(3, 64, batch_norm=True), (28, 28, 1)),
    "ViT-L4-H4": (models.ViT(4, 4, dim=64, mlp_dim=128, dropout=0.1), (32, 32, 3)),
    "VGG-13": (models.VGG(13), (32, 32, 3)),
    "VGG-16": (models.VGG(16), (32, 32, 3)),
    "ResNet-18": (models.ResNet18(), (32, 32, 3)),
    "ResNet-20": (models.CifarResNet(20), (32, 32, 3)),
}


@pytest.mark.parametrize("name", list(STEP_MODELS))
def test_one_training_step_of_each_model(name):
    model, shape = STEP_MODELS[name]
    images = jax.random.normal(jax.random.key(1), (4, *shape))
    labels = jnp.array([0, 1, 2, 3])
    variables = quick_init(model, images)
    task = Task(model, optax.sgd(1e-3))
    params, stats = variables["params"], variables.get("batch_stats", {})
    state = new_state(task, params, stats)

    @jax.jit
    def loss(p):  # the training-mode loss
        logits, _ = model.apply({"params": p, "batch_stats": stats} if stats else {"params": p},
                                images, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(0)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    new, step_loss, correct, _ = make_step(task, jax.random.key(2))(state, images, labels)
    assert int(new.step) == 1 and 0 <= int(correct) <= 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new))
    if name.startswith("ViT"):  # with dropout the loss is of a random sub-network
        assert np.isfinite(float(step_loss))
    else:
        np.testing.assert_allclose(float(step_loss), float(loss(params)), rtol=1e-5)
        assert float(loss(new.params)) < float(step_loss)  # a small gradient step descends
    if stats:  # running means moved by 0.1 of the batch mean (PyTorch's momentum)
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.any(a != b), new.batch_stats,
                                             stats))
        assert all(bool(m) for m in moved)
