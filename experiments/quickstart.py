"""Quickstart: train a small MLP on the embedded digits data, then cut its singular values.

This is the end-to-end example of what jaxlr offers today (the SVD core): it trains a Flax MLP on
scikit-learn's 8 x 8 digits (shipped inside scikit-learn, so no download), reads the spectra of its
kernels in one jitted call, and compares three ways of truncating them at a range of budgets:

* LSVT (:func:`jaxlr.lsvt_ranks`): every matrix keeps the same fraction of its singular values.
* GSVT (:func:`jaxlr.gsvt_ranks`): one ranking of all singular values.
* GSVT with each matrix's singular values divided by its largest (``normalize="max"``).

The classifier (``head``) is left whole, as both papers do.

The model is selected on a validation split; the test split is only reported. Run::

    python -m experiments.quickstart
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlr


class MLP(nn.Module):
    """A ReLU multilayer perceptron."""

    widths: Sequence[int] = (256, 256)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.widths:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes, name="head")(x)


def load_digits_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits, scaled to [0, 1], split 60/20/20 into train/validation/test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.data / 16.0).astype(np.float32)
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut1, cut2 = int(0.6 * len(order)), int(0.8 * len(order))
    parts = {"train": order[:cut1], "validation": order[cut1:cut2], "test": order[cut2:]}
    return {name: (images[idx], labels[idx]) for name, idx in parts.items()}


def accuracy(model: nn.Module, params: Any, images: np.ndarray, labels: np.ndarray) -> float:
    logits = model.apply({"params": params}, images)
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def train(
    model: nn.Module,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    steps: int,
    seed: int = 0,
) -> Any:
    """Adam with batch 64; returns the parameters with the best validation accuracy."""
    images, labels = splits["train"]
    params = model.init(jax.random.key(seed), images[:1])["params"]
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
        def loss_fn(p: Any) -> jax.Array:
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    best, best_acc = params, -1.0
    for i in range(steps):
        batch = rng.integers(0, len(labels), 64)
        params, opt_state = step(params, opt_state, images[batch], labels[batch])
        if (i + 1) % 100 == 0 or i + 1 == steps:
            val_acc = accuracy(model, params, *splits["validation"])
            if val_acc > best_acc:
                best, best_acc = params, val_acc
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps (batch 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    splits = load_digits_splits(args.seed)
    model = MLP()
    params = train(model, splits, args.steps, args.seed)
    trained = {split: accuracy(model, params, *splits[split]) for split in ("validation", "test")}
    print(f"trained MLP {model.widths}: validation accuracy {trained['validation']:.3f}, "
          f"test accuracy {trained['test']:.3f}")

    hidden = jaxlr.kernel_filter(exclude="head")
    spectra = jaxlr.singular_values_tree(params, filter=hidden)
    for name, values in spectra.items():
        head = ", ".join(f"{v:.2f}" for v in np.asarray(values[:4]))
        print(f"  {name}: {len(values)} singular values, largest {head}, ...")

    rows = []
    print(f"\n{'kept':>5}  {'method':<23}  {'retained':>8}  {'val acc':>7}  {'test acc':>8}")
    for kept in (0.5, 0.25, 0.1, 0.05):
        policies = {
            "LSVT": jaxlr.lsvt_ranks(params, kept, filter=hidden),
            "GSVT": jaxlr.gsvt_ranks(spectra, kept),
            "GSVT, normalised by max": jaxlr.gsvt_ranks(spectra, kept, normalize="max"),
        }
        for method, ranks in policies.items():
            cut = jaxlr.project_tree(params, ranks).params
            row = {
                "kept": kept,
                "method": method,
                "retained": jaxlr.retained_fraction(ranks),
                "validation": accuracy(model, cut, *splits["validation"]),
                "test": accuracy(model, cut, *splits["test"]),
                "ranks": dict(ranks),
            }
            rows.append(row)
            print(f"{kept:>5.2f}  {method:<23}  {row['retained']:>8.1%}  "
                  f"{row['validation']:>7.3f}  {row['test']:>8.3f}")
    print("\nGSVT ranks at 10% kept:\n" + jaxlr.gsvt_ranks(spectra, 0.1).table())
    return {"trained": trained, "rows": rows}


if __name__ == "__main__":
    main()
