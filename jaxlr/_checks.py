"""The argument checks the matrix- and tree-level functions share: a bad value is refused where it
is given, naming the parameter and its allowed range."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxlr import matrices

__all__ = ["METHODS", "Method", "by_name", "check_flag", "check_matrix", "check_method",
           "check_rank", "check_tail_scale", "eager_finite", "is_traced", "raise_if_nonfinite"]

F = TypeVar("F", bound=Callable[..., Any])

Method = Literal["auto", "gram", "svd"]
"""A decomposition method (:mod:`jaxlr.svd`)."""
METHODS = ("auto", "gram", "svd")


def check_method(method: Any) -> str:
    """Validates a decomposition method name and returns it."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    return method


def check_flag(name: str, value: Any) -> bool:
    """Validates a boolean option (a string such as ``"False"`` is refused, not read as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} of type "
                        f"{type(value).__name__}.")
    return value


def check_tail_scale(value: Any) -> float:
    """Validates the soft projection's tail factor, ``0 <= tail_scale < 1``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"tail_scale must be a number in [0, 1) (0: the hard projection), got "
                         f"{value!r}.")
    return float(value)


def check_matrix(matrix: Any) -> None:
    """Validates a one-matrix argument: 2-D and floating-point."""
    if jnp.ndim(matrix) != 2:
        raise ValueError(f"matrix must be 2-D, got shape {jnp.shape(matrix)}.")
    matrices.check_floating("matrix", matrix)


def is_traced(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a tracer (the call runs inside ``jit``/``grad``)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def raise_if_nonfinite(names: Sequence[str], finite: jax.Array) -> None:
    """Raises ``ValueError`` naming the matrices whose ``finite`` flag (one stacked array, read
    with one transfer) is false; for eager calls."""
    bad = [name for name, ok in zip(names, np.asarray(finite), strict=True) if not ok]
    if bad:
        raise ValueError(
            f"matrices {bad} hold NaN or Inf; they cannot be decomposed. (Under jit they are "
            "returned unchanged.)"
        )


def eager_finite(matrix: jax.Array, under_jit: str, result: Any, finite: jax.Array) -> Any:
    """``result`` of a one-matrix call; raises ``ValueError`` if the call is eager and ``matrix``
    holds NaN or Inf (``under_jit``: what the call gives then instead)."""
    if not is_traced(matrix) and not bool(finite):
        raise ValueError(
            f"matrix (shape {tuple(matrix.shape)}) holds NaN or Inf; it cannot be decomposed. "
            f"(Under jit {under_jit}.)")
    return result


def check_rank(label: str, rank: Any, full: int) -> int:
    """Validates one matrix's rank, ``1 <= rank <= full``, and returns it as a Python int.

    Raises:
      TypeError: if ``rank`` is not an integer (a bool is not one).
      ValueError: if it is outside ``[1, full]``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise TypeError(f"rank for {label} must be an int, got {rank!r}.")
    rank = int(rank)
    if not 1 <= rank <= full:
        raise ValueError(f"rank for {label} is {rank}; allowed 1 <= rank <= min(m, n) = {full}.")
    return rank


def by_name(positional: int, names: str) -> Callable[[F], F]:
    """A decorator for a function whose fractions are keyword-only after ``positional``
    arguments: a fraction given by position raises a ``TypeError`` that names them (``names``,
    e.g. ``"keep= or prune="``) instead of Python's count of arguments."""
    def wrap(function: F) -> F:
        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            if len(args) > positional:
                meaning = (" (keep= is the fraction of singular values kept, prune= the "
                           "fraction pruned)") if "keep=" in names else ""
                raise TypeError(
                    f"{function.__name__} takes its fraction by name, {names}{meaning}: got "
                    f"{args[positional]!r} as positional argument {positional + 1}.")
            return function(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return wrap
