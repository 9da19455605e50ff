"""Tests of jaxlr.batchnorm: BatchNorm pairing by dataflow on Linen and NNX models of every shape,
against pairs written out by hand from each model's definition."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxlr
from tests import models
from tests.test_projection import Block, NNXBlock

IMAGES = jnp.ones((2, 8, 8, 3))


def linen_pairs(model, x=IMAGES, **kwargs):
    variables = jax.eval_shape(lambda key: model.init(key, x, **kwargs), jax.random.key(0))
    return jaxlr.find_bn_pairs(model, variables, x, **kwargs)


def test_linen_sequential_pairs_each_conv_with_the_batchnorm_it_feeds():
    model = nn.Sequential([
        nn.Conv(8, (3, 3)), nn.BatchNorm(use_running_average=True), nn.relu,
        nn.Conv(8, (3, 3)), nn.relu, nn.BatchNorm(use_running_average=True),  # ReLU between
        nn.Conv(8, (3, 3)),                                                   # no BatchNorm
        nn.Conv(8, (1, 1)), nn.BatchNorm(use_running_average=True),
    ])
    assert linen_pairs(model) == {"layers_0/kernel": "layers_1", "layers_7/kernel": "layers_8"}


class AutoNamed(nn.Module):
    """``Conv_0`` has no BatchNorm after it; ``BatchNorm_0`` follows ``Conv_1``."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(4)(x.mean((1, 2)))


def test_auto_names_are_paired_by_dataflow_not_by_number():
    assert linen_pairs(AutoNamed()) == {"Conv_1/kernel": "BatchNorm_0"}
    assert linen_pairs(AutoNamed(), train=True) == {"Conv_1/kernel": "BatchNorm_0"}
    # The naming rule gets it wrong: Conv_0 -> BatchNorm_0 (documented as the fallback's limit).
    variables = AutoNamed().init(jax.random.key(0), IMAGES)
    by_name = jaxlr.batchnorm.bn_pairs_by_name(variables["params"], variables["batch_stats"])
    assert by_name == {"Conv_0/kernel": "BatchNorm_0"}


class VGGFeatures(nn.Module):
    """torchvision-style names: ``features_0`` (conv), ``features_1`` (BatchNorm), ..."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="features_0")(x)
        x = nn.BatchNorm(use_running_average=True, name="features_1")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = nn.Conv(16, (3, 3), name="features_4")(x)
        x = nn.BatchNorm(use_running_average=True, name="features_5")(x)
        return nn.Dense(4, name="classifier")(x.reshape(x.shape[0], -1))


def test_vgg_style_feature_names_and_resnet_blocks():
    assert linen_pairs(VGGFeatures()) == {"features_0/kernel": "features_1",
                                          "features_4/kernel": "features_5"}
    x = jnp.ones((2, 6, 6, 4))
    assert linen_pairs(Block(), x) == {"conv1/kernel": "bn1", "conv2/kernel": "bn2",
                                       "shortcut_conv/kernel": "shortcut_bn"}
    model, variables = models.linen_variables("resnet")
    pairs = jaxlr.find_bn_pairs(model, variables, models.IMAGES)
    assert pairs == {"conv/kernel": "bn",
                     **{f"block{i}/conv{j}/kernel": f"block{i}/bn{j}"
                        for i in range(3) for j in (1, 2)}}


def test_nnx_models_in_lists_and_sequentials():
    assert jaxlr.find_bn_pairs(NNXBlock(nnx.Rngs(0)), jnp.ones((2, 6, 6, 4))) == {
        "conv1/kernel": "bn1", "conv2/kernel": "bn2", "shortcut_conv/kernel": "shortcut_bn"}
    resnet = models.nnx_model("resnet")  # blocks in an nnx.List
    assert jaxlr.find_bn_pairs(resnet, models.IMAGES) == {
        "conv/kernel": "bn",
        **{f"blocks/{i}/conv{j}/kernel": f"blocks/{i}/bn{j}" for i in range(3) for j in (1, 2)}}
    rngs = nnx.Rngs(0)
    sequential = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.BatchNorm(8, rngs=rngs),
                                nnx.relu, nnx.Conv(8, 8, (3, 3), rngs=rngs), nnx.relu,
                                nnx.BatchNorm(8, rngs=rngs))
    assert jaxlr.find_bn_pairs(sequential, IMAGES) == {"layers/0/kernel": "layers/1"}
    # Tracing changed nothing: the model still runs as before, with its own classes.
    assert type(sequential.layers[0]) is nnx.Conv
    sequential(IMAGES)


def test_a_layer_feeding_two_batchnorms_is_ambiguous_and_left_out():
    class Fork(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Conv(8, (3, 3), name="conv")(x)
            a = nn.BatchNorm(use_running_average=True, name="bn_a")(y)
            b = nn.BatchNorm(use_running_average=True, name="bn_b")(y)
            z = nn.Conv(8, (3, 3), name="other")(x)
            return a + b + nn.BatchNorm(use_running_average=True, name="bn_c")(z)

    assert linen_pairs(Fork()) == {"other/kernel": "bn_c"}


def test_pairs_of_a_factorized_tree_and_bad_calls():
    variables = AutoNamed().init(jax.random.key(0), IMAGES)
    factorized = {**variables, "params": jaxlr.factorize(variables["params"], 2,
                                                         jax.random.key(1))}
    assert jaxlr.find_bn_pairs(AutoNamed(), factorized, IMAGES) == {
        "Conv_1/kernel": "BatchNorm_0"}
    with pytest.raises(TypeError, match="needs the Linen model's variables"):
        jaxlr.find_bn_pairs(AutoNamed())
    with pytest.raises(TypeError, match="Flax Linen or NNX module"):
        jaxlr.find_bn_pairs(lambda x: x, IMAGES)
