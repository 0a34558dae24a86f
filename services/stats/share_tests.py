"""The clusterer's candidate tests: is one model's share of a cluster's texts other than 1/2?

Under the paired design P(intervention | cluster) = 1/2 for every cluster when the models do not
differ, so a cluster's ``own`` counts (texts assigned to it since it was created) are a fair-coin
sequence under H0, and the beta-binomial e-process of :mod:`services.stats.sequential` may be
looked at after every text.  Cluster id j is tested at ``spending_level(j, alpha)``: the levels
sum to alpha, so the family-wise error over every cluster ever created, and every look, is at most
alpha.
"""

from __future__ import annotations

import math

import numpy as np

from services.stats.sequential import beta_binomial_log_e_many, spending_level


def share_log_e(own: np.ndarray) -> np.ndarray:
    """Log e-values of H0 "intervention share = 1/2" for rows of (base, intervention) counts."""
    own = np.asarray(own)
    if len(own) == 0:
        return np.zeros(0)
    return beta_binomial_log_e_many(own[:, 1], own.sum(axis=1), 0.5)


def crossed(ids: np.ndarray, own: np.ndarray, tested: np.ndarray, alpha: float,
            min_texts: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose e-value crossed 1/level with at least ``min_texts`` texts and not ``tested``
    before, every row's log e-value); id j is tested at ``spending_level(j, alpha)``."""
    log_e = share_log_e(own)
    if len(ids) == 0:
        return np.zeros(0, np.int64), log_e
    thresholds = np.array([-math.log(spending_level(int(c), alpha)) for c in ids])
    hit = (own.sum(axis=1) >= min_texts) & (log_e >= thresholds) & ~tested
    return np.flatnonzero(hit), log_e
