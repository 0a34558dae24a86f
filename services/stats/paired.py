"""Paired tests: each prompt gives one answer per model, and a scorer gives each answer a number.

For pair i let d_i = score(claimed side) - score(other side).  Under "no difference" (the two
answers of a pair are exchangeable, which a pair-swap makes exactly true for any data) every d_i
is symmetric about 0, so:

* the **sign test** on the non-tied pairs is exact: #(d > 0) ~ Binomial(#(d != 0), 1/2);
* the **Wilcoxon signed-rank** test is exact conditionally on |d| (scipy's normal approximation
  with ties is close from ~20 pairs);
* the **e-process** (a Beta mixture over "the claimed side is higher with probability p > 1/2" of
  likelihood ratios against p = 1/2) is a nonnegative supermartingale under any p <= 1/2, so
  ``1 / E`` is a p-value valid at any stopping time (streaming decisions).

The effect is theta = P(claimed side higher) + 1/2 P(tie) = 1/2 + (p_higher - p_lower) / 2, the
pairs' AUC; its interval is Tango's (1998) score interval for the difference of two paired
proportions p_higher - p_lower (discordant cells: pairs the claimed side wins and loses; ties are
the concordant cells), which keeps its coverage at small counts and near 0 or 1 where a Wald
interval does not.  No library ships Tango's interval for this (statsmodels has only unpaired
score intervals), so it is written out below in ~20 lines and checked by simulation in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import brentq
from scipy.special import betainc, ndtri
from scipy.stats import binomtest, wilcoxon

from services.stats.sequential import beta_binomial_log_e_many

__all__ = [
    "PairedResult",
    "PairedTest",
    "paired_differences",
    "paired_test",
    "sign_log_e",
    "sign_log_e_many",
    "sign_test_p",
    "tango_interval",
    "wilcoxon_p",
]

PairedTest = Literal["sign", "wilcoxon", "e-process"]
MAX_LOG_E = 700.0  # exp() of more overflows; such evidence is decisive anyway


def paired_differences(claimed: ArrayLike, other: ArrayLike) -> np.ndarray:
    """d_i = claimed_i - other_i as float; both sides must have the same length and be finite."""
    a = np.asarray(claimed, dtype=float).ravel()
    b = np.asarray(other, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal lengths, got {a.size} and {b.size}")
    d = a - b
    if not np.all(np.isfinite(d)):
        raise ValueError("paired scores must be finite")
    return d


def sign_test_p(n_higher: int, n_lower: int) -> float:
    """Exact one-sided sign test of "the claimed side is higher more often than lower"; 1 with no
    untied pair."""
    n = n_higher + n_lower
    if n == 0:
        return 1.0
    return float(binomtest(n_higher, n, 0.5, alternative="greater").pvalue)


def wilcoxon_p(d: ArrayLike) -> float:
    """One-sided Wilcoxon signed-rank p-value of "d is shifted above 0" (zeros dropped, Wilcoxon's
    rule); 1 when every d is 0."""
    arr = np.asarray(d, dtype=float).ravel()
    if not np.any(arr != 0):
        return 1.0
    return float(wilcoxon(arr, zero_method="wilcox", alternative="greater", method="auto").pvalue)


def sign_log_e_many(n_higher: ArrayLike, n_lower: ArrayLike, a: float = 0.5) -> np.ndarray:
    """Vectorised `sign_log_e` (broadcasts the two count arrays)."""
    k = np.asarray(n_higher, dtype=float)
    m = np.asarray(n_lower, dtype=float)
    if np.any(k < 0) or np.any(m < 0):
        raise ValueError("counts must be >= 0")
    two_sided = beta_binomial_log_e_many(k, k + m, 0.5, a)
    upper_mass = betainc(a + m, a + k, 0.5)  # = P(Beta(a + k, a + m) > 1/2)
    with np.errstate(divide="ignore"):
        log_e = two_sided + math.log(2.0) + np.log(upper_mass)
    return np.clip(log_e, -MAX_LOG_E, MAX_LOG_E)


def sign_log_e(n_higher: int, n_lower: int, a: float = 0.5) -> float:
    """Log e-value of the one-sided sign hypothesis after n_higher wins and n_lower losses.

    The mixing prior is Beta(a, a) restricted to p > 1/2 (times 2), so
    E = E_two-sided(k, n) * 2 * P(Beta(a + k, a + n - k) > 1/2), where E_two-sided is
    `beta_binomial_log_e_many` at p0 = 1/2.  Each mixed likelihood ratio (p / (1/2) for a win,
    (1 - p) / (1/2) for a loss, p > 1/2) has mean <= 1 under any win probability <= 1/2, so E is a
    test supermartingale for the composite null and Ville's inequality gives anytime validity.
    """
    return float(sign_log_e_many(n_higher, n_lower, a))


def _tango_statistic(delta: float, b: int, c: int, n: int) -> float:
    """Tango's score statistic for H: p_b - p_c = delta (b, c: the two discordant counts of n)."""
    aa = 2.0 * n
    bb = -b - c + (2.0 * n - b + c) * delta
    cc = -c * delta * (1.0 - delta)
    q21 = (math.sqrt(max(0.0, bb * bb - 4.0 * aa * cc)) - bb) / (2.0 * aa)  # constrained MLE of p_c
    var = n * (2.0 * q21 + delta * (1.0 - delta))
    if var <= 0.0:
        return math.copysign(math.inf, b - c - n * delta) if b - c != n * delta else 0.0
    return (b - c - n * delta) / math.sqrt(var)


def tango_interval(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Score interval for p_b - p_c from a paired 2x2 table (Tango 1998, Stat Med 17:891).

    b: pairs where the claimed side is higher, c: where it is lower, n: all pairs (ties included).
    The set {delta : |T(delta)| <= z}; T decreases in delta, so each end is one root (brentq).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need 0 <= b, c and b + c <= n, got b={b}, c={c}, n={n}")
    if n == 0:
        return -1.0, 1.0
    z = float(ndtri(0.5 + confidence / 2.0))
    est = (b - c) / n
    lo_edge, hi_edge = -1.0 + 1e-12, 1.0 - 1e-12

    def excess(delta: float, target: float) -> float:
        return _tango_statistic(delta, b, c, n) - target

    # T(est) = 0; an end is -1 or 1 when T never reaches the critical value before it
    lower = -1.0 if est <= lo_edge or excess(lo_edge, z) <= 0 else float(
        brentq(excess, lo_edge, est, args=(z,), xtol=1e-12))
    upper = 1.0 if est >= hi_edge or excess(hi_edge, -z) >= 0 else float(
        brentq(excess, est, hi_edge, args=(-z,), xtol=1e-12))
    return max(-1.0, lower), min(1.0, upper)


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison of the claimed side against its partner, on held-out pairs.

    effect = P(claimed higher) + 1/2 P(tie), with (ci_low, ci_high).  ``rate_claimed`` and
    ``rate_other`` are the shares of answers with a positive score (meaningful for binary
    scorers: "in 31% of pairs against 6%").  ``median_*`` and ``mean_*`` summarise continuous scorers.
    """

    test: PairedTest
    p_value: float
    effect: float
    ci_low: float
    ci_high: float
    n: int
    n_higher: int
    n_lower: int
    n_tied: int
    rate_claimed: float
    rate_other: float
    median_claimed: float
    median_other: float
    mean_claimed: float
    mean_other: float
    sign_p: float
    wilcoxon_p: float
    log_e: float


def paired_test(claimed: ArrayLike, other: ArrayLike, *, test: PairedTest = "sign",
                confidence: float = 0.95) -> PairedResult:
    """Every paired statistic of one hypothesis; ``test`` picks which p-value decides.

    All three p-values are one-sided in the claimed direction.  For "e-process" the p-value is
    min(1, 1/E), valid at any stopping time (at a fixed n it is more conservative than the sign test).
    """
    a = np.asarray(claimed, dtype=float).ravel()
    b = np.asarray(other, dtype=float).ravel()
    d = paired_differences(a, b)
    n = int(d.size)
    hi, lo = int((d > 0).sum()), int((d < 0).sum())
    sign_p, wil_p = sign_test_p(hi, lo), wilcoxon_p(d)
    log_e = sign_log_e(hi, lo)
    chosen = {"sign": sign_p, "wilcoxon": wil_p, "e-process": min(1.0, math.exp(-log_e))}
    if test not in chosen:
        raise ValueError(f"test must be one of {sorted(chosen)}, got {test!r}")
    if n == 0:
        return PairedResult(test, 1.0, 0.5, 0.0, 1.0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0)
    d_lo, d_hi = tango_interval(hi, lo, n, confidence)
    return PairedResult(
        test=test, p_value=float(chosen[test]), effect=0.5 + (hi - lo) / (2.0 * n),
        ci_low=0.5 + d_lo / 2.0, ci_high=0.5 + d_hi / 2.0, n=n, n_higher=hi, n_lower=lo, n_tied=n - hi - lo,
        rate_claimed=float((a > 0).mean()), rate_other=float((b > 0).mean()),
        median_claimed=float(np.median(a)), median_other=float(np.median(b)),
        mean_claimed=float(a.mean()), mean_other=float(b.mean()),
        sign_p=sign_p, wilcoxon_p=wil_p, log_e=log_e)
