"""95 % intervals of perplexity and paired comparisons (stagepipe/intervals.py), against what they
must be: the point inside its interval, the nominal coverage on a known distribution, the paired
test finding a consistent gap that the two marginal intervals cannot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stagepipe.intervals import compare, gain_retained, ppl_interval

T = 511  # predicted tokens per 512-token window


def windows(n: int, mean: float = 3.5, spread: float = 0.4, seed: int = 0) -> list[float]:
    """Summed NLL of ``n`` windows whose token-mean NLL is normal around ``mean``."""
    return list(np.random.default_rng(seed).normal(mean, spread, n) * T)


def test_the_interval_holds_the_point_and_is_deterministic() -> None:
    nll = windows(64)
    point = math.exp(sum(nll) / (64 * T))
    low, high = ppl_interval(nll, T)
    assert low < point < high
    assert (low, high) == ppl_interval(nll, T)  # fixed seed: an evaluation's digest never moves


def test_it_narrows_with_more_windows_and_collapses_without_spread() -> None:
    few, many = windows(16), windows(256)
    width = [math.log(h / lo) for lo, h in (ppl_interval(few, T), ppl_interval(many, T))]
    assert width[1] < width[0] / 2.5  # width ~ 1/√n: 16× the windows, ~4× narrower
    low, high = ppl_interval([3.0 * T] * 10, T)
    assert low == pytest.approx(math.exp(3.0)) and high == pytest.approx(math.exp(3.0))


def test_coverage_is_nominal_on_a_known_distribution() -> None:
    """The true perplexity exp(3.5) lies inside the 95 % interval of 64 windows in about 95 % of draws."""
    truth = math.exp(3.5)
    hits = [lo <= truth <= hi for lo, hi in (ppl_interval(windows(64, seed=s), T) for s in range(300))]
    assert 0.90 <= sum(hits) / len(hits) <= 0.99


def test_non_finite_and_single_windows_claim_nothing() -> None:
    assert ppl_interval([3.0 * T, math.inf, 3.1 * T], T) == (math.inf, math.inf)
    assert ppl_interval([3.0 * T, math.nan], T) == (math.inf, math.inf)
    assert ppl_interval([3.0 * T], T) == (1.0, math.inf)


def test_paired_comparison_resolves_a_consistent_gap_the_marginal_intervals_cannot() -> None:
    a = windows(64)
    b = [v + 0.01 * T for v in a]  # every window 1 % worse in NLL: the marginal intervals overlap
    (_, a_high), (b_low, _) = ppl_interval(a, T), ppl_interval(b, T)
    assert b_low < a_high  # overlapping: unpaired, no claim could be made
    result = compare(b, a, T)
    assert result.ratio == pytest.approx(math.exp(0.01)) and result.resolved and result.low > 1.0
    assert compare(a, b, T).high < 1.0


def test_identical_or_noisy_models_are_inside_the_noise() -> None:
    a = windows(64)
    same = compare(a, a, T)
    assert same.ratio == 1.0 and not same.resolved and same.low == same.high == 1.0
    noisy = [v + e * T for v, e in zip(a, np.random.default_rng(9).normal(0, 0.05, 64), strict=True)]
    assert not compare(noisy, a, T).resolved  # zero-mean differences


def test_comparisons_with_infinite_or_unpaired_windows() -> None:
    a = windows(8)
    bad = a[:-1] + [math.inf]
    assert compare(bad, a, T).resolved and compare(bad, a, T).ratio == math.inf
    assert compare(a, bad, T).resolved and compare(a, bad, T).ratio == 0.0
    assert not compare(bad, bad, T).resolved
    with pytest.raises(ValueError, match="same windows"):
        compare(a, a[:-1], T)


def test_gain_retained_is_the_share_of_the_nll_gain_with_a_paired_interval() -> None:
    """(NLL_base − NLL)/(NLL_base − NLL_ft) on the same windows; nan when there is no gain or a window is
    not finite (no share to report, never a made-up number)."""
    rng = np.random.default_rng(0)
    hard = rng.uniform(300, 400, size=40)  # window NLLs summed over 100 tokens: a hard window is hard for all three
    base, tuned = hard + 40, hard
    compressed = hard + 10 + rng.normal(0, 1, size=40)
    gain = gain_retained(base.tolist(), tuned.tolist(), compressed.tolist(), 100)
    assert gain.value == pytest.approx((base.sum() - compressed.sum()) / (base.sum() - tuned.sum()))
    assert gain.low < gain.value < gain.high and gain.low > 0.7 and gain.high < 0.8
    assert math.isnan(gain_retained(base.tolist(), base.tolist(), compressed.tolist(), 100).value)
    assert math.isnan(gain_retained(base.tolist(), tuned.tolist(), [math.inf, *compressed[1:]], 100).value)
