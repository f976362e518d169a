"""95 % intervals of perplexity, and whether two models differ outside the noise.

Perplexity is ``exp(Σ window NLL / tokens)`` over non-overlapping windows of equal length; the
windows are the sampling unit (tokens inside a window are not independent). The interval is the
percentile bootstrap over windows: resample the windows with replacement, recompute the
perplexity, take the 2.5 % and 97.5 % quantiles. Two models evaluated on the same windows are
compared by the *paired* bootstrap (the same resampled windows for both), which removes the
variation the two share — most of it: a hard window is hard for both. Their perplexity ratio is
outside the noise when its interval excludes 1.

Deterministic (a fixed seed and resample count), so an evaluation's results, and with them its
content digest, are the same on every run. A non-finite window makes every bound ``inf``: the
result is already ``inf`` (``perplexity.py``), and no interval hides that. One window gives no
estimate of the spread: the interval is then ``[1, inf]`` (perplexity is at least 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: bootstrap resamples and seed: fixed, so the same windows always give the same interval
RESAMPLES, SEED, LEVEL = 2000, 0, 0.95


def _resampled_means(columns: Sequence[Sequence[float]], tokens_per_window: int) -> np.ndarray:
    """Token-mean NLL of each bootstrap resample, one row per column (the same windows for all)."""
    nll = np.asarray(columns, dtype=np.float64)
    n = nll.shape[1]
    picks = np.random.default_rng(SEED).integers(0, n, size=(RESAMPLES, n))
    return nll[:, picks].sum(axis=2) / (n * tokens_per_window)


def bounds(values: np.ndarray) -> tuple[float, float]:
    """The central ``LEVEL`` percentile interval of bootstrap values."""
    tail = (1.0 - LEVEL) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def ppl_interval(window_nll: Sequence[float], tokens_per_window: int) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of ``exp(Σ window_nll / tokens)`` over the windows
    (``window_nll``: each window's summed NLL over its ``tokens_per_window`` predicted tokens)."""
    if not all(math.isfinite(v) for v in window_nll):
        return math.inf, math.inf
    if len(window_nll) < 2:
        return 1.0, math.inf
    low, high = bounds(_resampled_means([window_nll], tokens_per_window)[0])
    return _exp(low), _exp(high)


@dataclass(frozen=True)
class Comparison:
    """``ratio = ppl(a)/ppl(b)`` on the same windows with its paired 95 % interval; ``resolved``
    when the interval excludes 1 (the difference is outside the noise)."""

    ratio: float
    low: float
    high: float
    resolved: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        verdict = "outside the noise" if self.resolved else "inside the noise"
        return f"×{self.ratio:.4f} [{self.low:.4f}, {self.high:.4f}], {verdict}"


def compare(a_nll: Sequence[float], b_nll: Sequence[float], tokens_per_window: int) -> Comparison:
    """Paired bootstrap of the perplexity ratio of two models evaluated on the same windows."""
    if len(a_nll) != len(b_nll):
        raise ValueError(f"paired comparison needs the same windows: {len(a_nll)} against {len(b_nll)}")
    a_bad, b_bad = (not all(math.isfinite(v) for v in x) for x in (a_nll, b_nll))
    if a_bad or b_bad:  # an infinite perplexity is worse than any finite one; two of them cannot be ranked
        if a_bad and b_bad:
            return Comparison(math.nan, math.nan, math.nan, False)
        return Comparison(math.inf, math.inf, math.inf, True) if a_bad else Comparison(0.0, 0.0, 0.0, True)
    n = len(a_nll)
    ratio = _exp((math.fsum(a_nll) - math.fsum(b_nll)) / (n * tokens_per_window))
    if n < 2:
        return Comparison(ratio, 0.0, math.inf, False)
    means = _resampled_means([a_nll, b_nll], tokens_per_window)
    low, high = bounds(means[0] - means[1])
    low, high = _exp(low), _exp(high)
    return Comparison(ratio, low, high, high < 1.0 or low > 1.0)


@dataclass(frozen=True)
class GainRetained:
    """The share of a fine-tune's gain a compressed delta keeps, in token-mean NLL:
    ``(nll_base − nll_compressed)/(nll_base − nll_finetuned)`` (1: all of it, 0: none; a perplexity
    between base and fine-tuned maps linearly in log space), with its paired 95 % interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return asdict(self)


def gain_retained(base_nll: Sequence[float], finetuned_nll: Sequence[float], compressed_nll: Sequence[float],
                  tokens_per_window: int) -> GainRetained:
    """Paired bootstrap over the same windows of all three models. A non-finite window anywhere, or
    no gain at all (the fine-tune no better than its base), gives ``nan``: there is no share to report."""
    columns = [base_nll, finetuned_nll, compressed_nll]
    if len({len(c) for c in columns}) != 1:
        raise ValueError("gain retained needs the same windows for the base, the fine-tuned and the compressed model")
    if not all(math.isfinite(v) for c in columns for v in c):
        return GainRetained(math.nan, math.nan, math.nan)
    n = len(base_nll)
    base, tuned, compressed = (math.fsum(c) / (n * tokens_per_window) for c in columns)
    if not base > tuned:
        return GainRetained(math.nan, math.nan, math.nan)
    value = (base - compressed) / (base - tuned)
    if n < 2:
        return GainRetained(value, -math.inf, math.inf)
    means = _resampled_means(columns, tokens_per_window)
    low, high = bounds((means[0] - means[2]) / (means[0] - means[1]))
    return GainRetained(value, low, high)
