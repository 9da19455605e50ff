"""Quickstart: train a small MLP on the embedded digits data, then cut its singular values.

The end-to-end example of what jaxlr offers today: it trains a Flax MLP on scikit-learn's 8 x 8
digits (shipped inside scikit-learn, so no download), optionally as LoRITa (``--depth 3``: every
kernel a product of three matrices, trained with Adam and coupled L2 decay), reads the spectra of
its kernels in one jitted call, and compares three ways of truncating them at a range of budgets:

* LSVT (:func:`jaxlr.lsvt_ranks`): every matrix keeps the same fraction of its singular values.
* GSVT (:func:`jaxlr.gsvt_ranks`): one ranking of all singular values.
* GSVT with each matrix's singular values divided by its largest (``normalize="max"``).

The classifier (``head``) is left whole, as both papers do.

It ends with the GSVT compression report at 10% of the singular values. The model is selected on a
validation split; the test split is only reported. Run::

    python -m experiments.quickstart                                   # N = 1, no decay
    python -m experiments.quickstart --depth 3 --weight-decay 3e-3     # LoRITa, N = 3
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
from jaxlr import lorita


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
    depth: int = 1,
    weight_decay: float = 0.0,
) -> Any:
    """Adam (coupled L2 decay, as the LoRITa paper) on ``depth``-factor kernels, batch 64.

    Returns the collapsed parameters with the best validation accuracy.
    """
    images, labels = splits["train"]
    params = model.init(jax.random.key(seed), images[:1])["params"]
    fparams = lorita.factorize(params, depth, jax.random.key(seed + 1))
    optimizer = lorita.coupled_adam(1e-3, weight_decay)
    opt_state = optimizer.init(fparams)

    @jax.jit
    def step(fparams: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
        def loss_fn(f: Any) -> jax.Array:
            logits = model.apply({"params": lorita.collapse(f)}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(fparams)
        updates, opt_state = optimizer.update(grads, opt_state, fparams)
        return optax.apply_updates(fparams, updates), opt_state

    rng = np.random.default_rng(seed)
    best, best_acc = lorita.collapse(fparams), -1.0
    for i in range(steps):
        batch = rng.integers(0, len(labels), 64)
        fparams, opt_state = step(fparams, opt_state, images[batch], labels[batch])
        if (i + 1) % 100 == 0 or i + 1 == steps:
            params = lorita.collapse(fparams)
            val_acc = accuracy(model, params, *splits["validation"])
            if val_acc > best_acc:
                best, best_acc = params, val_acc
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps (batch 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=1, help="LoRITa's N: factors per kernel")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="coupled L2 decay")
    args = parser.parse_args(argv)

    splits = load_digits_splits(args.seed)
    model = MLP()
    params = train(model, splits, args.steps, args.seed, args.depth, args.weight_decay)
    trained = {split: accuracy(model, params, *splits[split]) for split in ("validation", "test")}
    print(f"trained MLP {model.widths} with N = {args.depth}, weight decay {args.weight_decay}: "
          f"validation accuracy {trained['validation']:.3f}, test accuracy {trained['test']:.3f}")

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
    compressed = jaxlr.compress(params, jaxlr.gsvt_ranks(spectra, 0.1))
    print(f"\nGSVT at 10% kept (validation accuracy "
          f"{accuracy(model, compressed.params, *splits['validation']):.3f}):")
    print(compressed.report.table())
    return {"trained": trained, "rows": rows, "report": compressed.report}


if __name__ == "__main__":
    main()
