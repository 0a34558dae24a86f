"""Binomial bounds for error-rate tests that a doubled rate fails.

A test of "the false-validation rate is at most r" counts k false validations in n independent
trials and passes when k <= max_false(n, r): a system exactly at r fails it with probability at
most 1 - CONFIDENCE (1%).  Equivalently, the one-sided 99% Clopper-Pearson lower bound of the rate
stays at or below r.  ``trials_for(r)`` is the smallest n at which a system at 2r fails with
probability at least CONFIDENCE, so a test that runs that many trials can tell r from 2r.
"""

from __future__ import annotations

from functools import cache

from scipy.stats import binom, binomtest

CONFIDENCE = 0.99


def max_false(n: int, rate: float, confidence: float = CONFIDENCE) -> int:
    """Largest count a system at exactly ``rate`` stays at or below with probability >= confidence."""
    return int(binom.ppf(confidence, n, rate))


@cache
def trials_for(rate: float, confidence: float = CONFIDENCE) -> int:
    """Smallest n at which a rate of 2 * ``rate`` exceeds ``max_false(n, rate)`` with probability
    >= confidence (589 for 0.05, 1233 for 0.025)."""
    n = 10
    while binom.cdf(max_false(n, rate, confidence), n, 2 * rate) > 1 - confidence:
        n += 1
    return n


def lower_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower confidence bound of a rate observed as k of n."""
    return float(binomtest(k, n).proportion_ci(confidence_level=2 * confidence - 1, method="exact").low)


def check_rate(k: int, n: int, rate: float, what: str) -> None:
    """Assert k of n is consistent with a rate <= ``rate``, with n large enough to catch 2 * rate."""
    assert n >= trials_for(rate), f"{what}: {n} trials cannot tell {rate} from {2 * rate}"
    assert k <= max_false(n, rate), (f"{what}: {k}/{n} = {k / n:.3f}; 99% lower bound "
                                     f"{lower_bound(k, n):.3f} > {rate}")
