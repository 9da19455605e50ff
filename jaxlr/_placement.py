"""The check that LRPET's projection goes last in its optax chain.

After a projection step the weights must be the projection's output; a transformation placed after
it (a learning-rate scale, say) changes them, and the projection is silently undone. The state
keeps, per projected matrix, two random sign sketches ``u^T W v`` of the weights before the step
and of the projection's result, and the next update compares the weights it is given with both: a
matrix that moved but is not the result is misplaced. Sketches cost ``O(m n)`` per matrix, and
only on the step after a projection (``jax.lax.cond`` on the state's ``pending`` flag).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SKETCHES", "misplaced", "raise_if_misplaced", "sketches"]

SKETCHES = 2
"""Random sign pairs ``(u, v)`` per matrix."""


def sketches(mats: list[jax.Array]) -> jax.Array:
    """``u_k^T W v_k`` for ``k < SKETCHES`` per matrix (fixed signs per position in the list):
    an array of shape ``(len(mats), SKETCHES)``."""
    rows = []
    for i, matrix in enumerate(mats):
        rng = np.random.default_rng(1_000_003 + i)
        m, n = matrix.shape
        u = jnp.asarray(rng.choice([-1.0, 1.0], (SKETCHES, m)), jnp.float32)
        v = jnp.asarray(rng.choice([-1.0, 1.0], (SKETCHES, n)), jnp.float32)
        work = matrix.astype(jnp.float32)
        left = jnp.matmul(u, work, precision=jax.lax.Precision.HIGHEST)
        rows.append(jnp.sum(left * v, axis=1))
    return jnp.stack(rows) if rows else jnp.zeros((0, SKETCHES), jnp.float32)


def raise_if_misplaced(misplaced: Any) -> None:
    """Raises the error that says where the projection goes, if ``misplaced``."""
    if bool(misplaced):
        raise ValueError(
            "low_rank_projection is not the last transformation of its optax chain: the weights "
            "after its projection step are not the projection it computed, because a "
            "transformation after it changed its output. Put it last, "
            "optax.chain(..., jaxlr.low_rank_projection(...)), or wrap the optimizer: "
            "jaxlr.with_low_rank_projection(optimizer, ...). (If the weights were changed on "
            "purpose between steps, pass check_placement=False.)")


def misplaced(matrices: Callable[[], list[jax.Array]], dtypes: list[Any], sketch: jax.Array,
              pending: jax.Array) -> jax.Array:
    """Whether the weights after the last projection step (``matrices()``, of ``dtypes``) are
    not its result although they changed. ``sketch`` holds per matrix the sketches before the
    step, those of the projection's result, and a scale (the state's ``sketch``); costs nothing
    unless ``pending`` (the matrices are formed only then)."""
    no = jnp.zeros((), bool)
    if not dtypes:
        return no
    eps = max(float(jnp.finfo(jnp.result_type(dtype)).eps) for dtype in dtypes)
    if eps > 1e-6:  # half precision: its rounding hides the signal
        return no

    def check() -> jax.Array:
        now = sketches(matrices())
        before, target = sketch[:, :SKETCHES], sketch[:, SKETCHES:2 * SKETCHES]
        scale = jnp.maximum(sketch[:, -1:], jnp.finfo(jnp.float32).tiny)
        tolerance = 1000 * eps
        moved = jnp.abs(now - before) / scale > tolerance
        off = jnp.abs(now - target) / scale > tolerance
        return jnp.any(moved & off)

    return jax.lax.cond(pending, check, lambda: no)
