"""Anytime-valid sequential tests and proportion intervals.

The clusterer looks at every cluster again after each new batch of texts, so a fixed-n test would
inflate false positives with every look. The beta-binomial mixture e-value below is a nonnegative
martingale under the null (mean 1), so by Ville's inequality P(sup_n E_n >= 1/level) <= level: it may
be checked after every observation and the type-I error stays <= level.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import brentq
from scipy.special import betaln, ndtri, xlog1py, xlogy

__all__ = [
    "beta_binomial_log_e",
    "beta_binomial_log_e_many",
    "confidence_sequence_bernoulli",
    "newcombe_diff_interval",
    "spending_level",
    "wilson_interval",
]


def _check_p0_a(p0: float, a: float) -> None:
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"p0 must be in (0, 1), got {p0}")
    if a <= 0.0:
        raise ValueError(f"a must be > 0, got {a}")


def beta_binomial_log_e_many(k: ArrayLike, n: ArrayLike, p0: ArrayLike = 0.5, a: float = 0.5) -> np.ndarray:
    """Vectorised `beta_binomial_log_e` (broadcasts k, n and p0; p0 must lie in (0, 1)).

    log E = log[ B(a+k, a+n-k) / B(a, a) ] - [ k log p0 + (n-k) log(1-p0) ]: the Beta(a, a) mixture
    likelihood of the sequence over its likelihood under p0, in log space via betaln for stability.
    """
    k_arr = np.asarray(k, dtype=float)
    n_arr = np.asarray(n, dtype=float)
    p_arr = np.asarray(p0, dtype=float)
    mixture = betaln(a + k_arr, a + n_arr - k_arr) - betaln(a, a)
    null = xlogy(k_arr, p_arr) + xlog1py(n_arr - k_arr, -p_arr)
    return mixture - null


def beta_binomial_log_e(k: int, n: int, p0: float = 0.5, a: float = 0.5) -> float:
    """Log e-value of H0: success probability == p0, after k successes in n Bernoulli trials.

    Anytime-valid: reject as soon as the result is >= log(1/level), at any n, and the type-I error
    stays <= level (Ville). a is the Beta(a, a) mixing prior (a=0.5: Jeffreys / KT mixture).
    With n=0 the e-value is 1 (log 0).

    A cluster whose texts are 40 of 50 from the intervention model: e = exp(7.45) ~ 1700, past
    1/0.05 = 20 (log 3.0), so the share test rejects "both models equally often" at level 0.05;
    15 of 20 is not yet evidence (e ~ 2.4), and an even split lowers the e-value below 1:

    >>> round(beta_binomial_log_e(0, 0), 3), round(beta_binomial_log_e(15, 20), 3)
    (0.0, 0.877)
    >>> round(beta_binomial_log_e(40, 50), 3) >= math.log(1 / 0.05)
    True
    >>> round(beta_binomial_log_e(10, 20), 3)
    -1.736
    """
    _check_p0_a(p0, a)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    return float(beta_binomial_log_e_many(k, n, p0, a))


def spending_level(index: int, alpha: float) -> float:
    """Level of the index-th (0-based) hypothesis in an unbounded sequence: alpha * 6/(pi^2 (i+1)^2).

    The levels sum to alpha (sum 1/j^2 = pi^2/6), so the family-wise error over any number of
    clusters, tested in a fixed order of first appearance, stays <= alpha.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return alpha * 6.0 / (math.pi**2 * (index + 1) ** 2)


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(ndtri(0.5 + confidence / 2.0))


def _wilson_bounds(k: float, n: float, z: float) -> tuple[float, float]:
    # Hand-written (scipy's binomtest(...).proportion_ci needs an integer k): the AUC fallback and
    # Newcombe need the same closed form; tests check it against scipy for integer k.
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (no continuity correction); n=0 -> (0, 1).

    Unlike the Wald interval it keeps near-nominal coverage for small n and p near 0 or 1.
    """
    z = _z(confidence)
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    return _wilson_bounds(k, n, z)


def newcombe_diff_interval(
    k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Interval for p1 - p2 by Newcombe's hybrid score method (1998, method 10).

    Combines the two Wilson intervals; good coverage even for small counts and zero cells, where the
    Wald difference interval collapses. A side with n=0 carries no information: (-1, 1).
    """
    if n1 == 0 or n2 == 0:
        _z(confidence)
        return -1.0, 1.0
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    p1, p2 = k1 / n1, k2 / n2
    diff = p1 - p2
    lower = diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, lower), min(1.0, upper)


def _cs_lower(k: int, n: int, threshold: float, a: float) -> float:
    """Lower end of the confidence sequence: the root of log E(p0) = threshold below k/n."""
    if k == 0:
        return 0.0
    tiny = 1e-300  # -k log(tiny) ~ 690 k dominates any mixture term, so f(tiny) > 0 in practice

    def excess(p0: float) -> float:
        return float(beta_binomial_log_e_many(k, n, p0, a)) - threshold

    if excess(tiny) <= 0.0:
        return 0.0
    return float(brentq(excess, tiny, k / n, xtol=1e-15, rtol=1e-12))


def confidence_sequence_bernoulli(k: int, n: int, alpha: float = 0.05, a: float = 0.5) -> tuple[float, float]:
    """Anytime-valid (1 - alpha) confidence sequence for p: {p0 : log E(p0) < log(1/alpha)}.

    Covers the true p at every n simultaneously with probability >= 1 - alpha, so it may be
    reported after every batch. log E(p0) is convex in p0 and <= 0 at the MLE k/n (a mixture never
    beats the maximum likelihood), so the set is an interval around k/n whose ends are single roots:
    brentq finds them exactly (no grid rounding); the upper end is the lower end of the mirrored
    count because the Beta(a, a) prior is symmetric.

    40 of 50: the share lies in [0.586, 0.937], and 0.5 is outside, as the e-value said:

    >>> [round(x, 3) for x in confidence_sequence_bernoulli(40, 50)]
    [0.586, 0.937]
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    threshold = math.log(1.0 / alpha)
    return _cs_lower(k, n, threshold, a), 1.0 - _cs_lower(n - k, n, threshold, a)
