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

__all__ = ["accuracy_drop", "bands", "intervals", "singular_value_decay", "training_curves"]


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


def _plain_log_ticks(axis: Any) -> None:
    """A log axis labelled at 1, 2 and 5 times the powers of ten, in plain numbers (matplotlib's
    default labels the minor ticks in scientific notation, which overlap on a short axis)."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def bands(
    panels: Mapping[str, Mapping[str, Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xlog: bool = False,
    ylog: bool = False,
) -> None:
    """One panel per ``{panel: {line: {"x", "y", "low", "high", "style"}}}``: each line its mean
    ``y`` against ``x``, with the band ``[low, high]`` (e.g. a confidence interval over seeds)
    shaded in its colour; ``style`` holds matplotlib keywords (optional)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0), sharey=True,
                             squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items(), strict=True):
        for label, line in lines.items():
            style = {"marker": "o", "markersize": 3, **line.get("style", {})}
            order = np.argsort(np.asarray(line["x"]))
            x = np.asarray(line["x"])[order]
            (drawn,) = ax.plot(x, np.asarray(line["y"])[order], label=label, **style)
            ax.fill_between(x, np.asarray(line["low"])[order], np.asarray(line["high"])[order],
                            color=drawn.get_color(), alpha=0.18, linewidth=0)
        if xlog:
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
        if ylog:
            ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def intervals(
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str,
    ylabel: str,
    confidence: float = 0.95,
) -> None:
    """One panel per ``{panel: {method: per-seed values}}``: each method's values as dots, their
    mean as a bar end and its Student-t ``confidence`` interval as an error bar."""
    from experiments import stats

    plt = _pyplot()
    width = max(5.2, 0.9 * max(len(methods) for methods in panels.values()) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.2), sharey=True,
                             squeeze=False)
    for ax, (panel, methods) in zip(axes[0], panels.items(), strict=True):
        for index, values in enumerate(methods.values()):
            s = stats.summarize(values, confidence)
            ax.errorbar(index, s.mean, yerr=[[s.mean - s.low], [s.high - s.mean]], fmt="s",
                        color=f"C{index}", capsize=4)
            ax.scatter(np.full(len(values), index) + 0.15, values, color=f"C{index}", s=10,
                       alpha=0.6)
        ax.set_xticks(range(len(methods)), list(methods), rotation=30, ha="right",
                      fontsize="small")
        ax.set_title(panel)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
