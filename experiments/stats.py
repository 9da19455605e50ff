"""Statistics over seeds: mean, spread, Student-t intervals, and paired verdicts on a claim.

An experiment repeated over seeds gives one number per seed for each method. :func:`summarize`
describes those numbers (mean, sample standard deviation, the two-sided Student-t confidence
interval of the mean). :func:`compare` decides a claim about two methods run on the *same* seeds
(same data split, same initialisation) from their per-seed differences, by one stated rule:

* ``"greater"`` (``a > b``) with margin ``m >= 0``: **holds** when the interval of the mean
  difference ``a - b`` lies above 0; otherwise **does not hold** when it lies below ``m`` (a gain
  as large as the margin, the smallest effect that matters, is excluded; with ``m = 0``: the
  interval lies below 0); otherwise **not separable** (the data cannot tell).
* ``"less"``: the same, mirrored (**does not hold** when the interval lies above ``-m``).
* ``"equal"`` (``a`` about ``b``, within ``margin``): **holds** when the interval lies inside
  ``(-margin, margin)``, **does not hold** when it lies wholly outside it, **not separable**
  otherwise (an equivalence test by two one-sided intervals at the same confidence, as the
  interval is two-sided).

Next to each verdict, :func:`detectable_effect` gives the smallest true mean difference the
seeds could detect: the one a two-sided paired t-test at the interval's confidence finds with
probability ``power`` (0.8 by default), given the spread of the per-seed differences,
``(t_{(1+c)/2} + t_{power}) * sd / sqrt(n)`` with ``n - 1`` degrees of freedom. A "not separable"
verdict whose detectable effect exceeds the claimed effect says the experiment was too small,
not that the effect is absent.

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

__all__ = ["CLAIMS", "VERDICTS", "Comparison", "Summary", "compare", "detectable_effect",
           "summarize"]

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
      margin: the smallest difference that matters (the module's rule).
      verdict: ``"holds"``, ``"does not hold"`` or ``"not separable"``.
      agree: seeds whose own difference goes the claim's way (strictly above 0 for
        ``"greater"``, strictly below for ``"less"``, inside the margin for ``"equal"``).
      detectable: the smallest mean difference these seeds detect with probability ``power``
        (:func:`detectable_effect`).
    """

    difference: Summary
    claim: str
    margin: float
    verdict: str
    agree: int
    detectable: float


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


def detectable_effect(std: float, n: int, confidence: float = 0.95, power: float = 0.8) -> float:
    """The smallest true mean difference a paired t-test over ``n`` seeds detects.

    ``(t_{(1 + confidence)/2} + t_{power}) * std / sqrt(n)``, Student's t with ``n - 1`` degrees
    of freedom: the difference whose interval excludes 0 with probability about ``power``.

    Args:
      std: the standard deviation of the per-seed differences.
      n: the number of seeds, at least 2.
      confidence: of the interval, in ``(0, 1)``.
      power: in ``(0, 1)``.

    Example:
      >>> round(detectable_effect(1.0, 5), 3)  # (2.776 + 0.941) / sqrt(5)
      1.662
    """
    _check_confidence(confidence)
    _check_confidence(power)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}.")
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}.")
    quantiles = (scipy_stats.t.ppf((1 + confidence) / 2, n - 1)
                 + scipy_stats.t.ppf(power, n - 1))
    return float(quantiles * std / math.sqrt(n))


def compare(
    a: Sequence[float],
    b: Sequence[float],
    claim: Claim,
    *,
    margin: float = 0.0,
    confidence: float = 0.95,
    power: float = 0.8,
) -> Comparison:
    """Decides ``claim`` about ``a`` against ``b`` from their per-seed differences ``a - b``.

    Args:
      a: one number per seed.
      b: the other method's number for the same seeds, in the same order.
      claim: ``"greater"`` (a > b), ``"less"`` (a < b) or ``"equal"`` (|a - b| < ``margin``).
      margin: the smallest difference that matters, >= 0 (> 0 for ``"equal"``): a "greater"
        or "less" claim whose interval excludes an effect this large does not hold.
      confidence: of the interval, in ``(0, 1)``.
      power: of :attr:`Comparison.detectable`, in ``(0, 1)``.

    Returns:
      A :class:`Comparison` (the rule is in the module's documentation).

    Raises:
      ValueError: for an unknown claim, ``a`` and ``b`` of different lengths, a bad margin, or
        what :func:`summarize` refuses.

    Example:
      >>> a, b = [0.30, 0.31, 0.29, 0.30], [0.30, 0.30, 0.30, 0.31]
      >>> compare(a, b, "less", margin=0.05).verdict  # a reduction of 0.05 is excluded
      'does not hold'
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
    if claim == "equal" and margin == 0:
        raise ValueError(f"margin must be > 0 for claim='equal', got {margin!r}.")
    deltas = a_array - b_array
    d = summarize(deltas, confidence)
    if claim == "greater":
        verdict = ("holds" if d.low > 0 else "does not hold" if d.high < margin
                   else "not separable")
        agree = int(np.sum(deltas > 0))
    elif claim == "less":
        verdict = ("holds" if d.high < 0 else "does not hold" if d.low > -margin
                   else "not separable")
        agree = int(np.sum(deltas < 0))
    else:
        inside = -margin < d.low and d.high < margin
        outside = d.low >= margin or d.high <= -margin
        verdict = "holds" if inside else "does not hold" if outside else "not separable"
        agree = int(np.sum(np.abs(deltas) < margin))
    detectable = detectable_effect(d.std, d.n, confidence, power)
    return Comparison(d, claim, float(margin), verdict, agree, detectable)
