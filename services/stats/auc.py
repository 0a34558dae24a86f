"""AUC of a scorer that separates two groups, with its p-value and confidence interval.

A validator scores held-out texts of the intervention model (pos) and of the base model (neg) given
a hypothesis; AUC = P(score_pos > score_neg) + 0.5 P(tie) is the Mann-Whitney U over n_pos n_neg,
so the U test gives its p-value (ties handled) and DeLong's variance its interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import expit, logit, ndtri
from scipy.stats import mannwhitneyu, permutation_test, rankdata

from services.stats.sequential import wilson_interval

__all__ = ["AucResult", "auc_test", "delong_variance", "permutation_auc_p"]

_ALTERNATIVES = ("greater", "less", "two-sided")


@dataclass(frozen=True)
class AucResult:
    """AUC with its (1 - confidence) interval and the p-value of the chosen alternative vs AUC = 0.5."""

    auc: float
    ci_low: float
    ci_high: float
    p_value: float
    n_pos: int
    n_neg: int


def _as_scores(values: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} scores must be finite")
    return arr


def delong_variance(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(AUC, DeLong variance of the AUC) from midranks (Sun & Xu 2014's fast form, O(n log n)).

    The placement values v10[i] = P(neg < pos_i) + 0.5 P(tie) and v01[j] likewise for neg_j are the
    structural components; var = var(v10)/n_pos + var(v01)/n_neg. Both sides need >= 2 scores.
    """
    m, n = pos.size, neg.size
    ranks_all = rankdata(np.concatenate([pos, neg]))
    v10 = (ranks_all[:m] - rankdata(pos)) / n
    v01 = 1.0 - (ranks_all[m:] - rankdata(neg)) / m
    auc = float(v10.mean())
    return auc, float(v10.var(ddof=1) / m + v01.var(ddof=1) / n)


def _interval(auc: float, var: float, n_pos: int, n_neg: int, confidence: float) -> tuple[float, float]:
    """Logit-DeLong interval, which stays inside (0, 1) and covers better near the edges than the
    plain Wald one. With zero variance DeLong says nothing about uncertainty.  All scores tied (a
    keyword tier whose words no text contains): |AUC - 1/2| <= (P(pos score differs from the common
    value) + P(neg score differs)) / 2, each bounded by its one-sided Clopper-Pearson bound for 0
    of n at (1 - confidence) / 2, so both hold together with the stated confidence.  Perfect
    separation: a Wilson interval with the smaller group as effective n."""
    z = float(ndtri(0.5 + confidence / 2.0))
    if var <= 0.0 and auc == 0.5:
        miss = (1.0 - confidence) / 2.0
        slack = (2.0 - miss ** (1.0 / n_pos) - miss ** (1.0 / n_neg)) / 2.0
        return max(0.0, 0.5 - slack), min(1.0, 0.5 + slack)
    if var <= 0.0 or not 0.0 < auc < 1.0:
        n_eff = min(n_pos, n_neg)
        return wilson_interval(round(auc * n_eff), n_eff, confidence)
    centre = float(logit(auc))
    half = z * math.sqrt(var) / (auc * (1.0 - auc))
    return float(expit(centre - half)), float(expit(centre + half))


def auc_test(
    pos: ArrayLike, neg: ArrayLike, confidence: float = 0.95, alternative: str = "greater"
) -> AucResult:
    """AUC of pos vs neg scores, Mann-Whitney p-value and logit-DeLong interval.

    alternative "greater" tests AUC > 0.5 (pos scores higher). The p-value uses scipy's
    method="auto": exact for small untied samples, tie-corrected normal approximation otherwise;
    for very small tied samples prefer `permutation_auc_p`. An empty side gives AUC 0.5, p 1, CI (0, 1).
    """
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative must be one of {_ALTERNATIVES}, got {alternative!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x, y = _as_scores(pos, "pos"), _as_scores(neg, "neg")
    if x.size == 0 or y.size == 0:
        return AucResult(0.5, 0.0, 1.0, 1.0, int(x.size), int(y.size))
    test = mannwhitneyu(x, y, alternative=alternative, method="auto")
    auc = float(test.statistic) / (x.size * y.size)
    if x.size < 2 or y.size < 2:  # DeLong needs a sample variance on both sides
        ci = (0.0, 1.0)
    else:
        _, var = delong_variance(x, y)
        ci = _interval(auc, var, x.size, y.size, confidence)
    return AucResult(auc, ci[0], ci[1], float(test.pvalue), int(x.size), int(y.size))


def _auc_statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Vectorised AUC along axis: (rank sum of x - n_x(n_x+1)/2) / (n_x n_y)."""
    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    n_x, n_y = x.shape[-1], y.shape[-1]
    ranks = rankdata(np.concatenate([x, y], axis=-1), axis=-1)
    return (ranks[..., :n_x].sum(axis=-1) - n_x * (n_x + 1) / 2.0) / (n_x * n_y)


def permutation_auc_p(pos: ArrayLike, neg: ArrayLike, n_perm: int = 2000, seed: int = 0) -> float:
    """One-sided (AUC > 0.5) permutation p-value, for small or heavily tied samples.

    scipy's permutation_test enumerates all splits when there are no more than n_perm of them
    (exact), and otherwise counts the observed split in the null sample ((b+1)/(n_perm+1)), so the
    p-value is valid either way. An empty side gives 1.0.
    """
    x, y = _as_scores(pos, "pos"), _as_scores(neg, "neg")
    if x.size == 0 or y.size == 0:
        return 1.0
    result = permutation_test(
        (x, y),
        _auc_statistic,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_perm,
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)
