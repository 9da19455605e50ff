"""Accuracy against retained singular values: LoRITa's LSVT / GSVT sweeps, and their acceptance.

:func:`sweep` chooses ranks at each budget with each policy (:func:`jaxlr.lsvt_ranks`,
:func:`jaxlr.gsvt_ranks`), truncates with :func:`jaxlr.compress` and evaluates the truncated
(dense) model on the validation and test splits. :func:`accept` chooses, per policy, the smallest
budget whose *validation* accuracy stays within a tolerance of the untruncated model's: the test
split is reported, never used to choose.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from experiments import data as data_lib, models
  >>> data = data_lib.load("digits")
  >>> model = models.FCN(depth=3, width=32)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
  >>> rows = sweep(model, variables, data, (1.0, 0.5), filter=jaxlr.kernel_filter(exclude="head"))
  >>> [(r["policy"], r["budget"], r["retained"]) for r in rows]
  [('none', 1.0, 1.0), ('LSVT', 1.0, 1.0), ('GSVT', 1.0, 1.0), ('LSVT', 0.5, 0.5),
   ('GSVT', 0.5, 0.5)]
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlr
from experiments import data as data_lib
from experiments.train import evaluate

__all__ = [
    "POLICIES",
    "accept",
    "compressed_variables",
    "curves",
    "forward_macs",
    "recompute_batch_stats",
    "smallest_budget",
    "sweep",
]

POLICIES = ("LSVT", "GSVT")


def sweep(
    model: nn.Module,
    variables: Mapping[str, Any],
    data: data_lib.Dataset,
    budgets: Sequence[float],
    *,
    filter: jaxlr.matrices.Filter,  # noqa: A002
    policies: Sequence[str] = POLICIES,
    pools: jaxlr.policies.Pools = None,
    normalize: str = "none",
    batch_size: int = 1000,
) -> list[dict[str, Any]]:
    """Rows ``{policy, budget, retained, params, params_fraction, validation, test}``.

    The first row (policy ``"none"``) is the untruncated model; then one row per budget and
    policy: LSVT keeps ``budget`` of each matrix's singular values, GSVT ``budget`` of each pool's.

    Args:
      model: the Linen model.
      variables: its trained ``{"params", "batch_stats"}``.
      data: the data set (validation and test splits are evaluated).
      budgets: fractions of singular values kept, each in ``(0, 1]``.
      filter: which matrices are truncated (leave the classifier out, as both papers do).
      policies: a subset of ``("LSVT", "GSVT")``.
      pools: GSVT's pools (see :func:`jaxlr.gsvt_ranks`): ``"kind"`` pools attention, conv and
        dense matrices apart.
      normalize: GSVT's normalisation, ``"none"`` or ``"max"``.
      batch_size: evaluation batch size.
    """
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"policies must be among {POLICIES}, got {unknown}.")
    params = variables["params"]
    spectra = jaxlr.svd.singular_values(params, filter=filter)
    total = sum(int(leaf.size) for leaf in jax.tree.leaves(params))

    def row(policy: str, budget: float, ranks: jaxlr.Ranks | None) -> dict[str, Any]:
        if ranks is None:
            cut, retained, size = params, 1.0, total
        else:
            compression = jaxlr.compress(params, ranks)
            cut, retained = jaxlr.collapse(compression.compressed), compression.report.retained
            size = compression.report.params_after
        scores = {split: evaluate(model, {**variables, "params": cut}, data, split,
                                  batch_size)["accuracy"] for split in ("validation", "test")}
        return {"policy": policy, "budget": budget, "retained": retained, "params": size,
                "params_fraction": size / total, **scores,
                "ranks": None if ranks is None else dict(ranks)}

    rows = [row("none", 1.0, None)]
    for budget in budgets:
        for policy in policies:
            if policy == "LSVT":
                ranks = jaxlr.lsvt_ranks(params, keep=budget, filter=filter)
            else:
                ranks = jaxlr.gsvt_ranks(params, keep=budget, pools=pools, normalize=normalize,
                                         filter=filter, spectra=spectra)
            rows.append(row(policy, budget, ranks))
    return rows


def _matrix(leaf: jaxlr.selection.MatrixLeaf, kernel: np.ndarray) -> np.ndarray:
    view = leaf.view
    return np.transpose(kernel, view.row_axes + view.col_axes).reshape(leaf.matrix_shape)


def _kernel(leaf: jaxlr.selection.MatrixLeaf, matrix: np.ndarray) -> np.ndarray:
    view = leaf.view
    order = view.row_axes + view.col_axes
    shape = [leaf.shape[axis] for axis in order]
    return np.transpose(matrix.reshape(shape), np.argsort(order))


def curves(
    model: nn.Module,
    variables: Mapping[str, Any],
    data: data_lib.Dataset,
    budgets: Sequence[float],
    *,
    filter: jaxlr.matrices.Filter,  # noqa: A002
    policies: Sequence[str] = POLICIES,
    spectra: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Validation and test accuracy of ``model`` with its matrices truncated at each budget: a
    faster :func:`sweep` for many budgets (no parameter counts, no pools).

    Ranks come from :func:`jaxlr.gsvt_ranks` / :func:`jaxlr.lsvt_ranks`; each matrix is
    decomposed once (numpy, float64) and its rank-r truncation ``U_r S_r V_r^T`` rebuilt per
    budget: what :func:`jaxlr.compress` followed by :func:`jaxlr.collapse` computes, without a
    decomposition per budget.

    Args:
      model: the Linen model.
      variables: its trained variables (``params``, and ``batch_stats`` if any).
      data: the data set (validation and test splits are evaluated).
      budgets: fractions of singular values kept, each in ``(0, 1]``.
      filter: which matrices are truncated.
      policies: among ``("LSVT", "GSVT")``.
      spectra: the matrices' singular values (:func:`jaxlr.svd.singular_values` of ``params``
        with ``filter``), where the caller has them already.

    Returns:
      Rows ``{policy, budget, retained, validation, test}``; the first (policy ``"none"``,
      budget 1) is the untruncated model, then one per policy and budget, in that order.
    """
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"policies must be among {POLICIES}, got {unknown}.")
    params = variables["params"]
    leaves = jaxlr.selection.matrix_leaves(params, filter=filter)
    kernels = {path: np.asarray(value) for path, value in
               ((jaxlr.matrices.path_key(p), v)
                for p, v in jax.tree_util.tree_flatten_with_path(params)[0]) if path in leaves}
    factors = {path: np.linalg.svd(_matrix(leaves[path], kernel).astype(np.float64),
                                   full_matrices=False) for path, kernel in kernels.items()}
    # The ranks come from the library's own spectra (float32), as a user's would.
    if spectra is None:
        spectra = jaxlr.svd.singular_values(params, filter=filter)

    def score(policy: str, budget: float, ranks: jaxlr.Ranks | None) -> dict[str, Any]:
        cut = params
        if ranks is not None:
            new = {}
            for path, rank in ranks.items():
                u, s, vt = factors[path]
                matrix = (u[:, :rank] * s[:rank]) @ vt[:rank]
                new[path] = jnp.asarray(_kernel(leaves[path], matrix), kernels[path].dtype)
            cut = jax.tree_util.tree_map_with_path(
                lambda p, x: new.get(jaxlr.matrices.path_key(p), x), params)
        accuracy = {split: evaluate(model, {**variables, "params": cut}, data,
                                    split)["accuracy"] for split in ("validation", "test")}
        return {"policy": policy, "budget": budget,
                "retained": 1.0 if ranks is None else jaxlr.policies.retained_fraction(ranks),
                **accuracy}

    rows = [score("none", 1.0, None)]
    for policy, budget in itertools.product(policies, budgets):
        if policy == "GSVT":
            ranks = jaxlr.gsvt_ranks(params, keep=budget, filter=filter, spectra=spectra)
        else:
            ranks = jaxlr.lsvt_ranks(params, keep=budget, filter=filter)
        rows.append(score(policy, budget, ranks))
    return rows


def smallest_budget(rows: Sequence[Mapping[str, Any]], policy: str, split: str,
                    tolerance: float) -> float:
    """The smallest retained fraction from which on every row of ``policy`` with at least that
    many singular values keeps ``split`` accuracy within ``tolerance`` of the untruncated row's
    (1.0 when even the largest budget does not).

    Example:
      >>> rows = [{"policy": "none", "retained": 1.0, "test": 0.95},
      ...         {"policy": "GSVT", "retained": 0.5, "test": 0.95},
      ...         {"policy": "GSVT", "retained": 0.2, "test": 0.90},
      ...         {"policy": "GSVT", "retained": 0.1, "test": 0.948}]
      >>> smallest_budget(rows, "GSVT", "test", 0.005)
      0.5
    """
    reference = next(r[split] for r in rows if r["policy"] == "none")
    kept = 1.0
    for r in sorted((r for r in rows if r["policy"] == policy), key=lambda r: -r["retained"]):
        if r[split] < reference - tolerance - 1e-9:
            break
        kept = r["retained"]
    return kept


def accept(rows: Sequence[Mapping[str, Any]], tolerance: float) -> dict[str, Mapping[str, Any]]:
    """Per policy, the row with the fewest retained singular values whose validation accuracy is
    at least the untruncated model's minus ``tolerance``."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}.")
    reference = next(r for r in rows if r["policy"] == "none")
    chosen: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        if r["policy"] == "none" or r["validation"] < reference["validation"] - tolerance:
            continue
        best = chosen.get(r["policy"])
        if best is None or r["retained"] < best["retained"]:
            chosen[r["policy"]] = r
    return chosen


def forward_macs(model: nn.Module, variables: Mapping[str, Any], sample: Any) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``sample`` (inference mode);
    :class:`jaxlr.LowRank` factor pairs in ``variables["params"]`` are counted as run factored."""
    rest = {k: v for k, v in variables.items() if k != "params"}

    def forward(params: Any, x: jax.Array) -> jax.Array:
        return jaxlr.apply(model, {"params": params, **rest}, x, train=False)

    return jaxlr.forward_cost(forward, variables["params"], sample, xla=False).macs


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_statistics(model: nn.Module, momentum: float, params: Any, stats: Any,
                      images: jax.Array) -> Any:
    """Each BatchNorm's mean and variance of one batch, in training mode."""
    zeros = jax.tree.map(jnp.zeros_like, stats)
    _, mutated = jaxlr.apply(model, {"params": params, "batch_stats": zeros}, images,
                             train=True, mutable=["batch_stats"])
    return jax.tree.map(lambda s: s / (1 - momentum), mutated["batch_stats"])


def recompute_batch_stats(model: nn.Module, variables: Mapping[str, Any],
                          data: data_lib.Dataset, batch_size: int = 128,
                          momentum: float = 0.9) -> dict[str, Any]:
    """``variables`` with every BatchNorm's statistics recomputed on the training split: the mean
    over its batches (in order, the last incomplete one dropped) of each batch's mean and
    variance, as the layer computes them in training mode. Factor pairs run factored
    (:func:`jaxlr.apply`). ``momentum`` is the layers' (Flax's) running-average momentum: a
    training-mode call from zero statistics returns ``(1 - momentum)`` times the batch's.

    A model truncated after training sees other activations than the ones its statistics were
    averaged over; this gives it statistics of its own without training it.
    """
    if "batch_stats" not in variables:
        return dict(variables)
    total, count = None, 0
    for start in range(0, len(data.train) - batch_size + 1, batch_size):
        images = jnp.asarray(data.normalize(data.train.images[start:start + batch_size]))
        stats = _batch_statistics(model, momentum, variables["params"],
                                  variables["batch_stats"], images)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        count += 1
    if total is None:
        raise ValueError(f"batch_size {batch_size} is larger than the training split "
                         f"({len(data.train)} examples).")
    return {**variables, "batch_stats": jax.tree.map(lambda s: s / count, total)}


def compressed_variables(
    variables: Mapping[str, Any], ranks: Mapping[str, int]
) -> tuple[dict[str, Any], jaxlr.compression.CompressionReport]:
    """``variables`` with the ranked kernels truncated and held as factor pairs where they save
    (:func:`jaxlr.compress`), and the compression report."""
    compression = jaxlr.compress(variables["params"], ranks)
    return {**variables, "params": compression.compressed}, compression.report
