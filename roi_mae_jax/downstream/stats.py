"""Statistics for comparing pretraining strategies on the same evaluation splits.

    scores = {"roi": {("seed0", "seed0/fold1"): 0.81, ...}, "random": {...}}
    summary = describe(scores["roi"])                       # mean, std, n
    diff = paired_difference(scores["roi"], scores["random"], test_fraction=0.2)

Pairs are (pretraining seed, evaluation split) keys present in both. k-fold
splits share training subjects, so their differences are correlated and the
plain paired t-test is too confident; the interval and p-value use the
corrected resampled t-test of Nadeau & Bengio (2003): the variance of the mean
difference is (1/J + n_test/n_train) * s^2 instead of s^2 / J.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from scipy import stats


def describe(values: Mapping[tuple, float]) -> dict:
  """{mean, std, n} of the finite values."""
  x = np.array([v for v in values.values() if np.isfinite(v)], float)
  return {"mean": float(x.mean()) if len(x) else float("nan"),
          "std": float(x.std(ddof=1)) if len(x) > 1 else float("nan"), "n": int(len(x))}


def mean_interval(values: Mapping[tuple, float], test_fraction: float,
                  level: float = 0.95) -> dict:
  """The mean of split scores with its 95% interval (corrected t; see paired_difference).

      mean_interval({(seed, fold): score}, test_fraction=1 / folds)  # mean, ci_low, ci_high, n
  """
  out = paired_difference(values, {k: 0.0 for k in values}, test_fraction, level)
  return {k: out[k] for k in ("mean", "ci_low", "ci_high", "n")}


def paired_difference(a: Mapping[tuple, float], b: Mapping[tuple, float],
                      test_fraction: float, level: float = 0.95) -> dict:
  """a - b over shared keys: mean, 95% interval and two-sided p (corrected t-test).

  `test_fraction` is n_test / n_total of one split (1/k for k-fold); 0 gives
  the plain paired t-test.
  """
  keys = sorted(k for k in a if k in b and np.isfinite(a[k]) and np.isfinite(b[k]))
  d = np.array([a[k] - b[k] for k in keys], float)
  out = {"n": len(d), "mean": float(d.mean()) if len(d) else float("nan"),
         "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"),
         "correction": "Nadeau-Bengio corrected resampled t-test" if test_fraction else "paired t"}
  if len(d) < 2:
    return out
  ratio = test_fraction / (1 - test_fraction) if test_fraction else 0.0
  variance = (1 / len(d) + ratio) * d.var(ddof=1)
  if variance == 0:  # every pair differs by the same amount
    out.update(ci_low=out["mean"], ci_high=out["mean"], p=1.0 if out["mean"] == 0 else 0.0)
    return out
  se = math.sqrt(variance)
  t_crit = float(stats.t.ppf(0.5 + level / 2, df=len(d) - 1))  # plain floats out, not NumPy's
  out.update(ci_low=out["mean"] - t_crit * se, ci_high=out["mean"] + t_crit * se,
             p=float(2 * stats.t.sf(abs(out["mean"]) / se, df=len(d) - 1)))
  return out
