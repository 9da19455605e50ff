"""Flax Linen models of the papers' experiments, for 32 x 32 images (CIFAR) unless said otherwise.

* :class:`VGG`: VGG-13 / VGG-16 for CIFAR (3 x 3 convolutions with BatchNorm, one linear
  classifier on the 512 features): VGG-16 has 14.7M parameters.
* :class:`CifarResNet`: ResNet-20 / 56 / 110 (He et al., CIFAR variant) with option-A shortcuts
  (subsample, zero-pad the channels; no parameters): 0.27M / 0.85M / 1.7M parameters.

Layer names follow :mod:`jaxlr.projection`'s BatchNorm pairing (``conv1`` -> ``bn1``), so LRPET's
BN rectification finds every pair.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = CifarResNet(depth=20)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
  >>> model.apply(variables, jnp.ones((2, 32, 32, 3))).shape
  (2, 10)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["VGG", "VGG_CONFIGS", "CifarResNet", "ResidualBlock", "shortcut_a"]

VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG for CIFAR: ``conv{i}`` (3 x 3) -> ``bn{i}`` -> ReLU, 2 x 2 max-pooling at each "M".

    Attributes:
      depth: 13 or 16.
      num_classes: outputs of the classifier ``head``.
    """

    depth: int = 16
    num_classes: int = 10

    def setup(self) -> None:
        if self.depth not in VGG_CONFIGS:
            raise ValueError(f"depth must be one of {sorted(VGG_CONFIGS)}, got {self.depth}.")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        index = 0
        for item in VGG_CONFIGS[self.depth]:
            if item == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            x = nn.Conv(int(item), (3, 3), name=f"conv{index}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"bn{index}")(x)
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
    """Two 3 x 3 convolutions with BatchNorm and an option-A shortcut."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
        y = nn.Conv(self.features, (3, 3), self.stride, use_bias=False, name="conv1")(x)
        y = nn.relu(norm("bn1")(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
        y = norm("bn2")(y)
        return nn.relu(y + shortcut_a(x, self.features, self.stride))


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
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
        for stage, width in enumerate(self.widths):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(width, stride, name=f"stage{stage}_block{block}")(x, train)
        return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))
