"""Plots of the experiments: accuracy drop against retained singular values, spectra, training.

matplotlib draws to files (the ``Agg`` backend), never to a screen.

Example:
  >>> import tempfile, pathlib
  >>> path = pathlib.Path(tempfile.mkdtemp()) / "drop.png"
  >>> accuracy_drop({"LSVT": [(1.0, 0.0), (0.5, 0.02)]}, path)
  >>> path.stat().st_size > 0
  True
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["accuracy_drop", "singular_value_decay", "training_curves"]


def _pyplot():  # noqa: ANN202 - matplotlib's module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_drop(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    title: str = "Accuracy drop against retained singular values",
    ylabel: str = "test accuracy drop (points)",
    styles: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """One line per curve of ``(retained fraction, accuracy drop)`` points; drops in [0, 1] are
    drawn in percentage points, the x-axis in percent, logarithmic. ``styles`` gives a curve's
    matplotlib keywords (colour, linestyle, marker)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in curves.items():
        retained, drop = np.asarray(sorted(points)).T
        style = {"marker": "o", **(styles or {}).get(label, {})}
        ax.plot(100 * retained, 100 * drop, label=label, **style)
    ax.set_xscale("log")
    ax.set_xlabel("retained singular values (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def singular_value_decay(
    spectra: Mapping[str, Mapping[str, np.ndarray]],
    path: str | os.PathLike,
    title: str = "Singular values per layer (divided by the largest)",
) -> None:
    """One panel per run (``{run: {layer: singular values}}``), one line per layer: ``s_i / s_1``
    against ``i / n``, on a logarithmic y-axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(spectra), figsize=(4.2 * len(spectra), 3.8), sharey=True,
                             squeeze=False)
    for ax, (run, layers) in zip(axes[0], spectra.items(), strict=True):
        for layer, values in layers.items():
            values = np.asarray(values, np.float64)
            ax.plot(np.arange(1, len(values) + 1) / len(values),
                    np.maximum(values / values[0], 1e-8), label=layer)
        ax.set_yscale("log")
        ax.set_title(run)
        ax.set_xlabel("index / number of singular values")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("s_i / s_1")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | os.PathLike,
    key: str = "validation_accuracy",
) -> None:
    """``key`` against the epoch, one line per run (records of :func:`experiments.train.train`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, history in histories.items():
        ax.plot([r["epoch"] for r in history], [r[key] for r in history], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
