"""Statistics over seeds: mean, spread, Student-t intervals, and paired verdicts on a claim.

An experiment repeated over seeds gives one number per seed for each method. :func:`summarize`
describes those numbers (mean, sample standard deviation, the two-sided Student-t confidence
interval of the mean). :func:`compare` decides a claim about two methods run on the *same* seeds
(same data split, same initialisation) from their per-seed differences, by one stated rule:

* ``"greater"`` (``a > b``): **holds** when the interval of the mean difference ``a - b`` lies
  above 0, **does not hold** when it lies below 0, and is **not separable** when it contains 0.
* ``"less"``: the same, mirrored.
* ``"equal"`` (``a`` about ``b``, within ``margin``): **holds** when the interval lies inside
  ``(-margin, margin)``, **does not hold** when it lies wholly outside it, **not separable**
  otherwise (an equivalence test by two one-sided intervals at the same confidence, as the
  interval is two-sided).

No correction is made for the number of claims tested; each verdict stands on its own interval.

Example:
  >>> s = summarize([0.90, 0.92, 0.91, 0.93, 0.94])
  >>> round(s.mean, 3), round(s.std, 4), round(s.low, 4), round(s.high, 4)
  (0.92, 0.0158, 0.9004, 0.9396)
  >>> compare([0.95, 0.96, 0.94, 0.97, 0.95], [0.90, 0.92, 0.91, 0.93, 0.94], "greater").verdict
  'holds'
  >>> compare([0.91, 0.92], [0.90, 0.93], "greater").verdict
  'not separable'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
from scipy import stats as scipy_stats

__all__ = ["CLAIMS", "VERDICTS", "Comparison", "Summary", "compare", "summarize"]

CLAIMS = ("greater", "less", "equal")
VERDICTS = ("holds", "does not hold", "not separable")
Claim = Literal["greater", "less", "equal"]


class Summary(NamedTuple):
    """Numbers over seeds.

    Attributes:
      n: how many (seeds).
      mean: their mean.
      std: their sample standard deviation (``ddof=1``).
      low: the lower end of the confidence interval of the mean (Student's t, ``n - 1`` degrees
        of freedom).
      high: its upper end.
      confidence: the interval's confidence level.
    """

    n: int
    mean: float
    std: float
    low: float
    high: float
    confidence: float

    def interval(self, spec: str = ".4f") -> str:
        """``"[low, high]"`` formatted with ``spec``."""
        return f"[{self.low:{spec}}, {self.high:{spec}}]"


class Comparison(NamedTuple):
    """A paired comparison (:func:`compare`).

    Attributes:
      difference: the :class:`Summary` of the per-seed differences ``a - b``.
      claim: ``"greater"``, ``"less"`` or ``"equal"``.
      margin: the equivalence margin of ``"equal"`` (0 for the others).
      verdict: ``"holds"``, ``"does not hold"`` or ``"not separable"``.
      agree: seeds whose own difference goes the claim's way (strictly above 0 for
        ``"greater"``, strictly below for ``"less"``, inside the margin for ``"equal"``).
    """

    difference: Summary
    claim: str
    margin: float
    verdict: str
    agree: int


def _check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not (
            0 < confidence < 1):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}.")


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, standard deviation and the Student-t confidence interval of ``values``.

    Args:
      values: one finite number per seed, at least two.
      confidence: of the interval, in ``(0, 1)``.

    Raises:
      ValueError: for fewer than two values, a value that is not finite, or a confidence out of
        range.
    """
    _check_confidence(confidence)
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size < 2:
        raise ValueError(f"values needs at least two numbers (seeds) for a spread, got "
                         f"{array.size}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"values must be finite, got {array.tolist()}.")
    n = int(array.size)
    mean, std = float(array.mean()), float(array.std(ddof=1))
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, float(confidence))


def compare(
    a: Sequence[float],
    b: Sequence[float],
    claim: Claim,
    *,
    margin: float = 0.0,
    confidence: float = 0.95,
) -> Comparison:
    """Decides ``claim`` about ``a`` against ``b`` from their per-seed differences ``a - b``.

    Args:
      a: one number per seed.
      b: the other method's number for the same seeds, in the same order.
      claim: ``"greater"`` (a > b), ``"less"`` (a < b) or ``"equal"`` (|a - b| < ``margin``).
      margin: the equivalence margin of ``"equal"``, > 0; must be 0 (the default) otherwise.
      confidence: of the interval, in ``(0, 1)``.

    Returns:
      A :class:`Comparison` (the rule is in the module's documentation).

    Raises:
      ValueError: for an unknown claim, ``a`` and ``b`` of different lengths, a bad margin, or
        what :func:`summarize` refuses.
    """
    if claim not in CLAIMS:
        raise ValueError(f"claim must be one of {CLAIMS}, got {claim!r}.")
    a_array = np.asarray(a, dtype=np.float64).reshape(-1)
    b_array = np.asarray(b, dtype=np.float64).reshape(-1)
    if a_array.shape != b_array.shape:
        raise ValueError(f"a and b must hold one number per seed each, got {a_array.size} and "
                         f"{b_array.size}.")
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not (
            math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}.")
    if (claim == "equal") != (margin > 0):
        raise ValueError(f"margin must be > 0 for claim='equal' and 0 otherwise, got "
                         f"claim={claim!r}, margin={margin!r}.")
    deltas = a_array - b_array
    d = summarize(deltas, confidence)
    if claim == "greater":
        verdict = "holds" if d.low > 0 else "does not hold" if d.high < 0 else "not separable"
        agree = int(np.sum(deltas > 0))
    elif claim == "less":
        verdict = "holds" if d.high < 0 else "does not hold" if d.low > 0 else "not separable"
        agree = int(np.sum(deltas < 0))
    else:
        inside = -margin < d.low and d.high < margin
        outside = d.low >= margin or d.high <= -margin
        verdict = "holds" if inside else "does not hold" if outside else "not separable"
        agree = int(np.sum(np.abs(deltas) < margin))
    return Comparison(d, claim, float(margin), verdict, agree)
