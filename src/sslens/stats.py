"""Intervals for every reported number: one :class:`Estimate` type and the few ways to make it.

Every number a study reports carries a 95% interval and the size and unit of the sample behind
it, so a reader can tell a difference from noise:

* :func:`wilson` — a proportion of successes (kNN and linear-probe top-1, the pointing game):
  Wilson's score interval (Wilson 1927; Brown, Cai & DasGupta, "Interval Estimation for a
  Binomial Proportion", Statistical Science 2001), which keeps its coverage near 0 and 1
  where the normal interval collapses to a point (a pointing game of 8/8 hits has a lower
  bound of 0.68, not 1).
* :func:`bootstrap_mean` — the mean of a per-item metric (a map metric per image): Efron's
  percentile bootstrap over the items, with a seeded generator and :data:`RESAMPLES` resamples
  (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13). With few items it
  is optimistic (its measured coverage is in docs/BENCHMARKS.md, "Interval coverage"); the
  report states every sample size next to its interval.
* :func:`paired_difference` — the mean of ``a − b`` over the same items (two models on the same
  images or test samples): the pairing removes the variation the items share, so a real
  difference shows with far fewer items than two separate intervals would need.
* :func:`over_seeds` — the spread over training seeds: Student's t interval of the mean of the
  per-seed values (the per-seed values are reported too); :func:`difference_over_seeds` —
  Welch's interval of the difference of two models' seed means.

>>> wilson(8, 8, unit="images").to_dict()["ci_low"] > 0.6
True
>>> e = bootstrap_mean([0.2, 0.4, 0.6, 0.8], unit="images", seed=0)
>>> round(e.mean, 2), e.n, e.unit
(0.5, 4, 'images')
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: Every interval's confidence level.
CONFIDENCE = 0.95
#: Bootstrap resamples: enough that the interval's ends barely move between bootstrap seeds
#: (checked in ``tests/test_stats.py``).
RESAMPLES = 2000
#: The fewest items a percentile-bootstrap interval is trusted with to call a difference real:
#: below 8 its measured coverage of a 95% interval falls under 0.85 (docs/BENCHMARKS.md,
#: "Interval coverage"), so fewer items are reported as too few to tell.
MIN_BOOTSTRAP_ITEMS = 8
#: Resamples drawn at once, so 10,000 test samples never need a 2000 × 10,000 index matrix.
_CHUNK = 200


@dataclass(frozen=True)
class Estimate:
    """A reported number: ``mean`` with its interval [``ci_low``, ``ci_high``] at
    :data:`CONFIDENCE`, from ``n`` items of ``unit`` ("images", "test samples", "seeds"), by
    ``method`` ("wilson", "bootstrap", "paired bootstrap", "t over seeds", "exact")."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    unit: str
    method: str

    def to_dict(self) -> dict:
        return {
            "mean": _finite(self.mean), "ci_low": _finite(self.ci_low), "ci_high": _finite(self.ci_high),
            "n": int(self.n), "unit": self.unit, "method": self.method, "confidence": CONFIDENCE,
        }

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    def excludes(self, value: float = 0.0) -> bool:
        """Whether the interval lies wholly on one side of ``value`` (a real difference from it)."""
        return bool(self.ci_low > value or self.ci_high < value)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def undefined(unit: str, method: str) -> Estimate:
    """The estimate of nothing (no item had a defined value): NaN everywhere, n = 0."""
    return Estimate(math.nan, math.nan, math.nan, 0, unit, method)


def exact(value: float, n: int, unit: str) -> Estimate:
    """A number with no sampling error (e.g. a constant map's score by construction)."""
    return Estimate(float(value), float(value), float(value), n, unit, "exact")


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: float, n: int, *, unit: str, confidence: float = CONFIDENCE) -> Estimate:
    """Wilson's score interval of the proportion ``successes / n``."""
    if n <= 0:
        return undefined(unit, "wilson")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}]; got {successes}")
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n, unit, "wilson")


def _defined(values: Iterable[float]) -> np.ndarray:
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def _bootstrap_means(values: np.ndarray, seed: int, resamples: int) -> np.ndarray:
    """Means of ``values`` (n,) or (n, k) resampled with replacement, drawn in chunks:
    (resamples,) or (resamples, k), every column resampled with the same items."""
    rng = np.random.Generator(np.random.PCG64(seed))
    n = len(values)
    means = np.empty((resamples, *values.shape[1:]))
    for start in range(0, resamples, _CHUNK):
        count = min(_CHUNK, resamples - start)
        index = rng.integers(0, n, size=(count, n))
        means[start : start + count] = values[index].mean(axis=1)
    return means


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    *,
    unit: str,
    seed: int,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    method: str = "bootstrap",
) -> Estimate:
    """Percentile-bootstrap interval of the mean of ``values`` (NaN and ±inf items left out and
    not counted in ``n``). One item gives an interval of zero width: nothing to resample."""
    defined = _defined(values)
    if len(defined) == 0:
        return undefined(unit, method)
    mean = float(defined.mean())
    if len(defined) == 1 or np.all(defined == defined[0]):
        return Estimate(mean, mean, mean, len(defined), unit, method)
    means = _bootstrap_means(defined, seed, resamples)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(mean, float(low), float(high), len(defined), unit, method)


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    unit: str,
    seed: int,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Bootstrap interval of the mean of ``a[i] − b[i]`` over the items defined in both."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a paired difference needs the same items in both; got {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, unit=unit, seed=seed, resamples=resamples, confidence=confidence,
                          method="paired bootstrap")


def paired_ratio(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    unit: str,
    seed: int,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Bootstrap interval of ``mean(a) / mean(b)`` over paired items (both resampled with the
    same indices), from the items defined in both; undefined when ``mean(b)`` is not positive."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a paired ratio needs the same items in both; got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) == 0 or b.mean() <= 0:
        return undefined(unit, "paired bootstrap ratio")
    ratio = float(a.mean() / b.mean())
    means = _bootstrap_means(np.stack([a, b], axis=1), seed, resamples)
    ratios = means[:, 0] / np.maximum(means[:, 1], 1e-300)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return Estimate(ratio, float(low), float(high), len(a), unit, "paired bootstrap ratio")


def over_seeds(values: Sequence[float], *, confidence: float = CONFIDENCE) -> Estimate:
    """Student's t interval of the mean over training seeds (at least two for an interval)."""
    from scipy.stats import t

    defined = _defined(values)
    if len(defined) == 0:
        return undefined("seeds", "t over seeds")
    mean = float(defined.mean())
    if len(defined) == 1:
        return Estimate(mean, math.nan, math.nan, 1, "seeds", "t over seeds")
    half = float(t.ppf(0.5 + confidence / 2, len(defined) - 1) * defined.std(ddof=1) / math.sqrt(len(defined)))
    return Estimate(mean, mean - half, mean + half, len(defined), "seeds", "t over seeds")


def difference_over_seeds(a: Sequence[float], b: Sequence[float], *, confidence: float = CONFIDENCE) -> Estimate:
    """Welch's t interval of ``mean(a) − mean(b)`` for two models' per-seed values (independent
    training runs, so unpaired), with the Welch–Satterthwaite degrees of freedom; ``n`` counts
    the seeds of both."""
    from scipy.stats import t

    a, b = _defined(a), _defined(b)
    n = len(a) + len(b)
    if len(a) == 0 or len(b) == 0:
        return undefined("seeds", "welch over seeds")
    mean = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Estimate(mean, math.nan, math.nan, n, "seeds", "welch over seeds")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return Estimate(mean, mean, mean, n, "seeds", "welch over seeds")
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(t.ppf(0.5 + confidence / 2, df) * math.sqrt(va + vb))
    return Estimate(mean, mean - half, mean + half, n, "seeds", "welch over seeds")


def format_estimate(estimate: Estimate | dict, decimals: int = 3) -> str:
    """``"0.662 [0.620, 0.703]"`` (``"–"`` when undefined; just the value when exact)."""
    e = estimate if isinstance(estimate, dict) else estimate.to_dict()
    if e["mean"] is None:
        return "–"
    if e["ci_low"] is None or e["ci_high"] is None or e.get("method") == "exact":
        return f"{e['mean']:.{decimals}f}"
    return f"{e['mean']:.{decimals}f} [{e['ci_low']:.{decimals}f}, {e['ci_high']:.{decimals}f}]"
