"""A confidence interval for R_med over the choice of the sampled coordinates (issue 11, item 3).

**What it is an interval for.** An audit samples n of a layer's N coordinates and reports R_med = max / median
of their |H_ii|. The layer's own max over all N entries cannot be bounded from above by n ≪ N samples without
assumptions (the largest entry may never be drawn), so the estimand is defined at the audit's coordinate count:

    θ_n = (the median, over random draws of n coordinates, of the largest sampled |H_ii|) / (the layer's median |H_ii|)

— "the max/median of this layer at the resolution of n coordinates", the value an audit with another seed
reports half the time above and half below. For N ≫ n the numerator is the quantile Q(2^(−1/n)) of the layer's
|H_ii|; for a layer audited in full (n = N) θ_n is its exact R_med, and the interval is that point.

**How.** On the log scale, ``log θ_n = log q − log m`` (q the numerator, m the median), bounded separately:

- ``m``: the exact distribution-free order-statistic interval for a median (binomial), at level 1 − α/5;
- ``q``: the largest sampled value Y_(n) = log max is the median-unbiased estimate of log q. Above the
  (n−k)-th order statistic the tail of log |H_ii| is taken as exponential with scale σ (a Pareto-type tail of
  |H_ii|; lighter tails make the interval conservative), σ estimated by Hill's estimator from the top k = √n
  values. Then (Y_(n) − log q) / σ̂ is a pivot whose distribution depends on n and k only (Rényi's
  representation: Y_(n) = Σ_{j≤n} E_j / j and σ̂ = mean of E_1..E_k for standard exponentials E_j); its
  quantiles are computed once per (n, k) by seeded Monte Carlo. Level 1 − 4α/5.

The two combine by the union bound, so the interval for θ_n covers at least 1 − α when the tail model holds.
A naive percentile bootstrap of max/median cannot do this: no resample's max exceeds the sample's, so its
interval sits below θ_n far more often than α/2 (the tests show it).
"""

import math
from functools import lru_cache

import numpy as np

CONFIDENCE = 0.95
MEDIAN_SHARE = 0.2  # of α spent on the median's interval; the rest goes to the max's
MIN_COORDS = 5
PIVOT_DRAWS = 40_000


def tail_count(n: int) -> int:
    """k, the number of top values the tail scale is estimated from: √n, at least 2 and at most n − 2."""
    return min(n - 2, max(2, round(math.sqrt(n))))


@lru_cache(maxsize=64)
def max_pivot(n: int, k: int, low: float, high: float) -> tuple[float, float]:
    """Quantiles ``low`` and ``high`` of (Y_(n) − log q) / σ̂ under an exponential tail (seeded Monte Carlo).

    With standard exponentials E_1..E_n, Y_(n) = Σ_j E_j / j, σ̂ = (E_1 + … + E_k) / k, and the median of
    Y_(n) is log q = −log(1 − 2^(−1/n)).
    """
    rng = np.random.default_rng(20231)
    e = rng.exponential(size=(PIVOT_DRAWS, n))
    top = e @ (1.0 / np.arange(1, n + 1))
    scale = e[:, :k].mean(axis=1)
    q = -math.log(-math.expm1(-math.log(2) / n))
    lo, hi = np.quantile((top - q) / scale, [low, high])
    return float(lo), float(hi)


def _binom_cdf(r: int, n: int) -> float:
    """P(Binomial(n, 1/2) ≤ r)."""
    if r < 0:
        return 0.0
    return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))
               for i in range(r + 1))


@lru_cache(maxsize=256)
def _median_rank(n: int, alpha: float) -> int:
    r = 0
    while _binom_cdf(r, n) <= alpha / 2:
        r += 1
    return r  # P(B ≤ r − 1) ≤ alpha/2 < P(B ≤ r)


def median_bounds(sorted_abs: np.ndarray, alpha: float) -> tuple[float, float]:
    """Exact order-statistic interval [x_(r), x_(n+1−r)] (1-based) for the median, coverage ≥ 1 − alpha:
    r is the largest with P(Binomial(n, 1/2) ≤ r − 1) ≤ alpha/2; 0 and inf where no order statistic will do.

    >>> median_bounds(np.arange(1.0, 21.0), 0.05)   # n = 20: the 6th and 15th values
    (6.0, 15.0)
    """
    n = len(sorted_abs)
    r = _median_rank(n, alpha)  # x_(r) is the lower bound (r = 0: none)
    if r == 0:
        return 0.0, math.inf
    return float(sorted_abs[r - 1]), float(sorted_abs[n - r])


def r_med_interval(h_diag: np.ndarray, full: bool = False, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(low, high) for θ_n of the module docstring; the point (R_med, R_med) when ``full`` (n = N); nan for
    fewer than ``MIN_COORDS`` sampled coordinates; ``inf`` as the high end where the median may be 0.

    >>> h = np.exp(np.random.default_rng(0).normal(size=200))
    >>> low, high = r_med_interval(h)
    >>> bool(low < h.max() / np.median(h) < high)
    True
    """
    a = np.sort(np.abs(np.asarray(h_diag, dtype=np.float64)))
    n = len(a)
    if full:
        r = a[-1] / np.median(a) if np.median(a) > 0 else math.inf
        return float(r), float(r)
    if n < MIN_COORDS or a[-1] == 0:
        return math.nan, math.nan
    alpha = 1 - confidence
    med_lo, med_hi = median_bounds(a, MEDIAN_SHARE * alpha)
    k = tail_count(n)
    t_lo, t_hi = max_pivot(n, k, (1 - MEDIAN_SHARE) * alpha / 2, 1 - (1 - MEDIAN_SHARE) * alpha / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(a)
        scale = float(np.mean(y[n - k:] - y[n - k - 1]))
    if not math.isfinite(scale):  # more than n − k − 1 exact zeros: no tail to speak of
        return 0.0, math.inf
    q_lo, q_hi = math.exp(y[-1] - t_hi * scale), math.exp(y[-1] - t_lo * scale)
    if med_hi == 0:  # the median is 0 for sure: R_med is infinite
        return math.inf, math.inf
    return q_lo / med_hi, (q_hi / med_lo if med_lo > 0 else math.inf)


def stabilised(r: float) -> float:
    """R_med_stab as a function of R_med: R / (1 + R/1000) (footnote 8), 1000 at R = inf; monotone, so it maps
    an interval for R_med to one for R_med_stab."""
    return 1000.0 if math.isinf(r) else r / (1 + r / 1000) if math.isfinite(r) else math.nan
