"""Intervals over seeds: every claim is a mean with a Student-t 95 % confidence half-width."""

from __future__ import annotations

import math
from typing import Sequence

from scipy import stats


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
  """(mean, half-width) of the two-sided 95 % Student-t interval of the mean.

  half = t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation (ddof = 1); one value
  has no interval (nan).
  """
  values = [float(v) for v in values]
  n = len(values)
  if n == 0:
    raise ValueError("no values")
  mean = sum(values) / n
  if n == 1:
    return mean, math.nan
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def final_accuracy(rows: Sequence[dict], last: int = 3) -> float:
  """Mean test accuracy of the last `last` evaluated rounds (less seed noise than one round)."""
  evaluated = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
  if not evaluated:
    raise ValueError("no evaluated round")
  tail = evaluated[-last:]
  return sum(tail) / len(tail)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
  """Two-sided p-value of Welch's t-test of equal means (unequal variances).

  Two samples without spread have no t statistic: p is 1 when their means agree, else 0.
  """
  p = float(stats.ttest_ind(list(a), list(b), equal_var=False).pvalue)
  if math.isnan(p):
    return 1.0 if math.isclose(sum(a) / len(a), sum(b) / len(b)) else 0.0
  return p
