"""Flax Linen models of the papers' experiments, for 32 x 32 images (CIFAR) unless said otherwise.

* :class:`FCN`: a fully-connected ReLU network of ``depth`` layers (LoRITa's FCN on MNIST).
* :class:`ViT`: a pre-norm vision transformer with small patches, ``ViT-L{4,8,16}-H{1,4,8}``
  (LoRITa's ViTs on CIFAR-10).
* :class:`VGG`: VGG-13 / VGG-16 for CIFAR (3 x 3 convolutions with BatchNorm, one linear
  classifier on the 512 features): VGG-16 has 14.7M parameters.
* :class:`ResNet18`: ResNet-18 for CIFAR (3 x 3 stem, projection shortcuts): 11.2M parameters.
* :class:`CifarResNet`: ResNet-20 / 56 / 110 (He et al., CIFAR variant) with option-A shortcuts
  (subsample, zero-pad the channels; no parameters): 0.27M / 0.85M / 1.7M parameters.

Every model takes ``train`` (BatchNorm statistics and dropout) and flattens or pools what it needs,
so the training loop calls them all the same way. LRPET's BN rectification finds which BatchNorm
follows which kernel by tracing the model (:func:`jaxlr.find_bn_pairs`), whatever the names.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = CifarResNet(depth=20)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
  >>> model.apply(variables, jnp.ones((2, 32, 32, 3))).shape
  (2, 10)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "FCN",
    "VGG",
    "VGG_CONFIGS",
    "ViT",
    "CifarResNet",
    "EncoderBlock",
    "ResNet18",
    "ResidualBlock",
    "batch_norm",
    "create",
    "param_count",
    "shortcut_a",
]

VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """A BatchNorm as PyTorch's default, which both papers used: running statistics updated with
    weight 0.1 per step (Flax ``momentum=0.9``), epsilon 1e-5."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def param_count(params: Any) -> int:
    """The number of parameters in a tree."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))


class FCN(nn.Module):
    """``depth`` Dense layers: ``fc0`` ... ``fc{depth-2}`` of ``width`` units, ReLU, then ``head``.

    Images are flattened first. With ``batch_norm`` each hidden layer is followed by ``bn{i}``;
    with ``head_norm`` the classifier too, by ``bn_head`` (the LoRITa release's FCN: a BatchNorm
    after every Linear). A Dense layer followed by a BatchNorm has no bias.

    Attributes:
      depth: the number of Dense layers, the classifier included (>= 1).
      width: units of each hidden layer.
      batch_norm: a BatchNorm after each hidden Dense layer.
      num_classes: outputs of the classifier ``head``.
      head_norm: a BatchNorm after the classifier.
    """

    depth: int = 4
    width: int = 256
    batch_norm: bool = False
    num_classes: int = 10
    head_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth < 1 or self.width < 1:
            raise ValueError(f"depth and width must be >= 1, got {self.depth}, {self.width}.")
        x = x.reshape(x.shape[0], -1)
        for i in range(self.depth - 1):
            x = nn.Dense(self.width, use_bias=not self.batch_norm, name=f"fc{i}")(x)
            if self.batch_norm:
                x = batch_norm(train, name=f"bn{i}")(x)
            x = nn.relu(x)
        x = nn.Dense(self.num_classes, use_bias=not self.head_norm, name="head")(x)
        return batch_norm(train, name="bn_head")(x) if self.head_norm else x


class EncoderBlock(nn.Module):
    """A pre-norm transformer block: ``ln1`` -> ``attn`` -> residual, ``ln2`` -> ``fc1`` -> GELU
    -> ``fc2`` -> residual."""

    heads: int
    mlp_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.LayerNorm(name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(self.heads, name="attn")(y, y)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(y))
        y = nn.Dense(x.shape[-1], name="fc2")(y)
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class ViT(nn.Module):
    """A vision transformer for small images: ``ViT-L{depth}-H{heads}``.

    ``patch x patch`` patches (4 x 4 on 32 x 32 images: 64 tokens) embedded by a strided
    convolution ``embed``, a class token ``cls`` and learned position embeddings ``pos``, ``depth``
    :class:`EncoderBlock` s ``block{i}``, a final LayerNorm and the classifier ``head`` on the
    class token. The attention kernels (``attn/query``, ``key``, ``value``, ``out``) are
    ``DenseGeneral`` s, which :mod:`jaxlr` sees as ``dim x dim`` matrices.

    Attributes:
      depth: transformer blocks (the paper's L: 4, 8 or 16).
      heads: attention heads (the paper's H: 1, 4 or 8); must divide ``dim``.
      dim: token width.
      mlp_dim: hidden units of each block's MLP.
      patch: patch size; must divide the image size.
      dropout: dropout rate after attention and MLP (training only).
      num_classes: outputs of the classifier ``head``.
    """

    depth: int = 4
    heads: int = 4
    dim: int = 256
    mlp_dim: int = 512
    patch: int = 4
    dropout: float = 0.0
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim}).")
        if x.shape[1] % self.patch or x.shape[2] % self.patch:
            raise ValueError(f"patch ({self.patch}) must divide the image size {x.shape[1:3]}.")
        x = nn.Conv(self.dim, (self.patch, self.patch), self.patch, padding="VALID",
                    name="embed")(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
        for i in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp_dim, self.dropout, name=f"block{i}")(x, train)
        x = nn.LayerNorm(name="norm")(x[:, 0])
        return nn.Dense(self.num_classes, name="head")(x)


class VGG(nn.Module):
    """VGG for CIFAR: ``conv{i}`` (3 x 3) -> ``bn{i}`` -> ReLU, 2 x 2 max-pooling at each "M".

    Attributes:
      depth: 13 or 16 (ignored when ``config`` is given).
      num_classes: outputs of the classifier ``head``.
      config: the layers, as in :data:`VGG_CONFIGS` (widths and "M"), for a VGG-style network of
        another shape (e.g. ``(32, 32, "M", 64, 64, "M")`` for 8 x 8 digits).
    """

    depth: int = 16
    num_classes: int = 10
    config: Sequence[int | str] | None = None

    def setup(self) -> None:
        if self.config is None and self.depth not in VGG_CONFIGS:
            raise ValueError(f"depth must be one of {sorted(VGG_CONFIGS)}, got {self.depth}.")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        index = 0
        for item in VGG_CONFIGS[self.depth] if self.config is None else self.config:
            if item == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            x = nn.Conv(int(item), (3, 3), name=f"conv{index}")(x)
            x = batch_norm(train, name=f"bn{index}")(x)
            x = nn.relu(x)
            index += 1
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


def shortcut_a(x: jax.Array, features: int, stride: int) -> jax.Array:
    """Option-A shortcut: subsample by ``stride``, zero-pad the channels up to ``features``."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    missing = features - x.shape[-1]
    if missing:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (missing // 2, missing - missing // 2)))
    return x


class ResidualBlock(nn.Module):
    """Two 3 x 3 convolutions with BatchNorm, and a shortcut.

    Attributes:
      features: output channels.
      stride: of the first convolution (and the shortcut).
      shortcut: ``"A"``: subsample and zero-pad (no parameters); ``"B"``: a 1 x 1 convolution
        ``shortcut_conv`` with BatchNorm ``shortcut_bn`` where the shape changes, else identity.
    """

    features: int
    stride: int = 1
    shortcut: str = "A"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.Conv(self.features, (3, 3), self.stride, use_bias=False, name="conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
        y = batch_norm(train, "bn2")(y)
        if self.shortcut == "A":
            x = shortcut_a(x, self.features, self.stride)
        elif self.shortcut != "B":
            raise ValueError(f"shortcut must be 'A' or 'B', got {self.shortcut!r}.")
        elif self.stride != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.stride, use_bias=False,
                        name="shortcut_conv")(x)
            x = batch_norm(train, "shortcut_bn")(x)
        return nn.relu(y + x)


class ResNet18(nn.Module):
    """ResNet-18 for CIFAR: a 3 x 3 stem ``conv1``/``bn1`` (no max-pooling), four stages of two
    blocks (64, 128, 256, 512 channels) with projection shortcuts, global average pooling.

    Attributes:
      num_classes: outputs of the classifier ``head``.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(64, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.relu(batch_norm(train, name="bn1")(x))
        for stage, width in enumerate((64, 128, 256, 512)):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(width, stride, "B", name=f"stage{stage}_block{block}")(x, train)
        return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


class CifarResNet(nn.Module):
    """ResNet-(6n + 2) for CIFAR: widths 16, 32, 64, ``n`` blocks per stage, option-A shortcuts.

    Attributes:
      depth: 20, 32, 44, 56, 110, ... (``depth - 2`` divisible by 6).
      num_classes: outputs of the classifier ``head``.
      widths: channels of the three stages.
    """

    depth: int = 56
    num_classes: int = 10
    widths: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {self.depth}.")
        blocks = (self.depth - 2) // 6
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False, name="conv1")(x)
        x = nn.relu(batch_norm(train, name="bn1")(x))
        for stage, width in enumerate(self.widths):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(width, stride, name=f"stage{stage}_block{block}")(x, train)
        return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


def _option(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def create(spec: str, num_classes: int = 10) -> nn.Module:
    """A model from a short name, so presets can name models as strings.

    ``fcn{L}``, ``vit-l{L}-h{H}``, ``vgg13``, ``vgg16``, ``vgg`` (with ``config=32/32/M/64``),
    ``resnet18``, ``resnet{6n+2}``; attributes after a colon, e.g. ``fcn6:width=128``,
    ``vit-l4-h4:dim=64,mlp_dim=128,patch=2``.

    Example:
      >>> create("vit-l8-h4:dim=64").depth, create("resnet20").depth
      (8, 20)
    """
    name, _, text = spec.partition(":")
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"model options are key=value, got {item!r} in {spec!r}.")
        options[key] = _option(value)
    if "config" in options:
        options["config"] = tuple(_option(v) for v in str(options["config"]).split("/"))
    try:
        if match := re.fullmatch(r"fcn(\d+)", name):
            return FCN(int(match[1]), num_classes=num_classes, **options)
        if match := re.fullmatch(r"vit-l(\d+)-h(\d+)", name):
            return ViT(int(match[1]), int(match[2]), num_classes=num_classes, **options)
        if match := re.fullmatch(r"vgg(\d*)", name):
            depth = int(match[1]) if match[1] else 16
            return VGG(depth, num_classes=num_classes, **options)
        if name == "resnet18":
            return ResNet18(num_classes=num_classes, **options)
        if match := re.fullmatch(r"resnet(\d+)", name):
            return CifarResNet(int(match[1]), num_classes=num_classes, **options)
    except TypeError as error:
        raise ValueError(f"bad options in model {spec!r}: {error}") from error
    raise ValueError(f"unknown model {spec!r}: expected fcn{{L}}, vit-l{{L}}-h{{H}}, vgg13, "
                     "vgg16, vgg:config=..., resnet18 or resnet{6n+2}.")
