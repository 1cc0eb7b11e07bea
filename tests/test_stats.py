"""Intervals against known cases: Wilson on fixed counts, bootstrap coverage on a metric with a
known mean, paired differences, seeds."""

import math

import numpy as np
import pytest

from sslens.stats import (
    bootstrap_mean,
    difference_over_seeds,
    exact,
    format_estimate,
    over_seeds,
    paired_difference,
    paired_ratio,
    wilson,
)


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    # Brown, Cai & DasGupta (2001) / any statistics package's Wilson interval at 95%.
    [(8, 8, 0.6756, 1.0), (0, 10, 0.0, 0.2775), (50, 100, 0.4038, 0.5962), (339, 512, 0.6200, 0.7020)],
)
def test_wilson_matches_known_intervals(successes, n, low, high):
    e = wilson(successes, n, unit="test samples")
    assert e.mean == pytest.approx(successes / n)
    assert (e.ci_low, e.ci_high) == pytest.approx((low, high), abs=5e-4)
    assert e.n == n and e.unit == "test samples" and e.method == "wilson"


def test_wilson_refuses_impossible_counts_and_has_no_interval_for_nothing():
    with pytest.raises(ValueError):
        wilson(5, 4, unit="images")
    assert wilson(0, 0, unit="images").to_dict()["mean"] is None


@pytest.mark.parametrize(("n", "least"), [(8, 0.84), (30, 0.90)])
def test_bootstrap_covers_the_true_mean_about_as_often_as_it_says(n, least):
    """400 samples of a skewed metric with a known mean 0.5 (a Beta(2, 2) would be too easy):
    the 95% percentile interval must contain it in most of them, less often at 8 items."""
    rng = np.random.default_rng(0)
    hits = 0
    repetitions = 400
    for seed in range(repetitions):
        values = rng.beta(1.0, 1.0, size=n) ** 2 * 1.5  # E = 1.5 / 3 = 0.5
        e = bootstrap_mean(values, unit="images", seed=seed, resamples=1000)
        hits += e.ci_low <= 0.5 <= e.ci_high
    coverage = hits / repetitions
    assert least <= coverage <= 0.99


def test_bootstrap_is_seeded_and_its_ends_barely_move_between_seeds():
    values = np.random.default_rng(1).normal(size=50)
    first, again, other = (bootstrap_mean(values, unit="images", seed=s) for s in (3, 3, 4))
    assert first == again
    width = first.ci_high - first.ci_low
    assert abs(first.ci_low - other.ci_low) < 0.05 * width and abs(first.ci_high - other.ci_high) < 0.05 * width


def test_bootstrap_leaves_out_undefined_items_and_counts_the_rest():
    e = bootstrap_mean([0.1, float("nan"), 0.3, float("inf")], unit="images", seed=0)
    assert e.n == 2 and e.mean == pytest.approx(0.2)
    assert bootstrap_mean([float("nan")], unit="images", seed=0).to_dict()["mean"] is None
    single = bootstrap_mean([0.4], unit="images", seed=0)
    assert (single.ci_low, single.ci_high) == (0.4, 0.4)


def test_pairing_finds_a_difference_two_separate_intervals_miss():
    rng = np.random.default_rng(2)
    shared = rng.normal(size=40)  # what varies from image to image, for both models
    a, b = shared + 0.05, shared + rng.normal(scale=0.01, size=40)
    separate = [bootstrap_mean(x, unit="images", seed=0) for x in (a, b)]
    assert separate[0].ci_low < separate[1].ci_high  # the two intervals overlap
    difference = paired_difference(a, b, unit="images", seed=0)
    assert difference.excludes(0.0) and difference.mean == pytest.approx(0.05, abs=0.01)
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0, 2.0], [1.0], unit="images", seed=0)


def test_over_seeds_is_students_t():
    e = over_seeds([0.60, 0.62, 0.64])
    half = 4.302653 * 0.02 / math.sqrt(3)  # t(0.975, 2) · s / √k
    assert e.mean == pytest.approx(0.62) and (e.ci_low, e.ci_high) == pytest.approx((0.62 - half, 0.62 + half))
    assert e.unit == "seeds" and e.n == 3
    assert over_seeds([0.6]).to_dict()["ci_low"] is None


def test_difference_over_seeds_is_welchs_interval():
    """scipy's Welch t-test gives the same interval: df = 3.7 for these variances."""
    from scipy.stats import ttest_ind

    a, b = [0.70, 0.72, 0.69], [0.60, 0.66, 0.58, 0.64]
    e = difference_over_seeds(a, b)
    reference = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert e.mean == pytest.approx(np.mean(a) - np.mean(b))
    assert (e.ci_low, e.ci_high) == pytest.approx((reference.low, reference.high))
    assert e.n == 7 and e.unit == "seeds" and e.excludes(0.0)
    assert math.isnan(difference_over_seeds([0.7], [0.6, 0.5]).ci_low)


def test_formatting():
    assert format_estimate(wilson(1, 2, unit="images")) == "0.500 [0.095, 0.905]"
    assert format_estimate(exact(0.0, 8, "images")) == "0.000"
    assert format_estimate({"mean": None, "ci_low": None, "ci_high": None}) == "–"


def test_paired_ratio_is_the_ratio_of_means_with_a_paired_interval():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 1.5, 200)
    exact_ratio = paired_ratio(2 * b, b, unit="images", seed=0)
    # a = 2b on every item: every resample's ratio is 2, so the interval has zero width.
    assert exact_ratio.mean == pytest.approx(2) and exact_ratio.half_width == pytest.approx(0, abs=1e-12)
    noisy = paired_ratio(b * 1.5 + rng.normal(0, 0.2, 200), b, unit="images", seed=1)
    assert noisy.ci_low < 1.5 < noisy.ci_high and noisy.half_width < 0.1 and noisy.method == "paired bootstrap ratio"
    assert paired_ratio([1.0, np.nan, 2.0], [1.0, 5.0, 1.0], unit="images", seed=0).n == 2
    assert np.isnan(paired_ratio([1.0, 2.0], [0.0, 0.0], unit="images", seed=0).mean)
    with pytest.raises(ValueError, match="same items"):
        paired_ratio([1.0], [1.0, 2.0], unit="images", seed=0)
