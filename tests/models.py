"""Small Linen and NNX models of the four kinds compressed inference must run: an MLP, a VGG-style
CNN with BatchNorm, a ResNet with option-A (zero-padding) shortcuts and a ViT block. The Linen and
NNX versions of a kind have the same parameter paths."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

IMAGES = jax.random.normal(jax.random.key(7), (4, 16, 16, 3))


def shortcut_a(x, features, stride):
    """Option A: subsample, then zero-pad the channels (no parameters)."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    missing = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (missing // 2, missing - missing // 2)))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(96, name="fc1")(x))
        x = nn.relu(nn.Dense(64, name="fc2")(x))
        return nn.Dense(10, name="head")(x)


class VGG(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, features in enumerate((16, 32, 48)):
            x = nn.Conv(features, (3, 3), name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=True, name=f"bn{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


class Block(nn.Module):
    features: int
    stride: int

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.features, (3, 3), self.stride, use_bias=False, name="conv1")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
        y = nn.BatchNorm(use_running_average=True, name="bn2")(y)
        return nn.relu(y + shortcut_a(x, self.features, self.stride))


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (3, 3), use_bias=False, name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(x))
        x = Block(16, 1, name="block0")(x)
        x = Block(32, 2, name="block1")(x)
        x = Block(64, 2, name="block2")(x)
        return nn.Dense(10, name="head")(x.mean((1, 2)))


class ViT(nn.Module):
    """Patch embedding, one pre-norm transformer block, classifier."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(64, (4, 4), strides=4, padding="VALID", name="embed")(x)
        x = x.reshape(x.shape[0], -1, 64)
        y = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(4, name="attn")(y, y)
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.Dense(64, name="fc2")(nn.gelu(nn.Dense(128, name="fc1")(y)))
        return nn.Dense(10, name="head")((x + y).mean(1))


LINEN = {"mlp": MLP, "vgg": VGG, "resnet": ResNet, "vit": ViT}


def linen_variables(kind, seed=0):
    """Initialised variables, with non-trivial BatchNorm statistics."""
    model = LINEN[kind]()
    return model, perturbed(model.init(jax.random.key(seed), IMAGES), seed)


def perturbed(tree, seed):
    """Running variances in [0.5, 2]; means, biases and scales moved off their initial values."""
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))

    def perturb(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return jax.random.uniform(next(keys), leaf.shape, minval=0.5, maxval=2.0)
        if "mean" in name or "bias" in name or "scale" in name:
            return leaf + 0.1 * jax.random.normal(next(keys), leaf.shape)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, tree)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(768, 96, rngs=rngs)
        self.fc2 = nnx.Linear(96, 64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class NNXVGG(nnx.Module):
    def __init__(self, rngs):
        widths = (3, 16, 32, 48)
        for i in range(3):
            setattr(self, f"conv{i}", nnx.Conv(widths[i], widths[i + 1], (3, 3), rngs=rngs))
            setattr(self, f"bn{i}", nnx.BatchNorm(widths[i + 1], use_running_average=True,
                                                  rngs=rngs))
        self.head = nnx.Linear(48 * 4, 10, rngs=rngs)

    def __call__(self, x):
        for i in range(3):
            x = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x))
            x = nnx.max_pool(nnx.relu(x), (2, 2), (2, 2))
        return self.head(x.reshape(x.shape[0], -1))


class NNXBlock(nnx.Module):
    def __init__(self, cin, features, stride, rngs):
        self.stride, self.features = stride, features
        self.conv1 = nnx.Conv(cin, features, (3, 3), stride, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(features, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(features, features, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(features, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + shortcut_a(x, self.features, self.stride))


class NNXResNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
        self.blocks = nnx.List([NNXBlock(16, 16, 1, rngs), NNXBlock(16, 32, 2, rngs),
                                NNXBlock(32, 64, 2, rngs)])
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((1, 2)))


class NNXViT(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Conv(3, 64, (4, 4), strides=4, padding="VALID", rngs=rngs)
        self.ln1 = nnx.LayerNorm(64, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, 64, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(64, rngs=rngs)
        self.fc1 = nnx.Linear(64, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        x = x.reshape(x.shape[0], -1, 64)
        x = x + self.attn(self.ln1(x))
        y = self.fc2(nnx.gelu(self.fc1(self.ln2(x))))
        return self.head((x + y).mean(1))


NNX = {"mlp": NNXMLP, "vgg": NNXVGG, "resnet": NNXResNet, "vit": NNXViT}


def nnx_model(kind, seed=0):
    """An NNX model with non-trivial BatchNorm statistics and biases."""
    model = NNX[kind](nnx.Rngs(seed))
    nnx.update(model, perturbed(nnx.state(model), seed))
    return model
