"""The clusterer's candidate tests: is one model's share of a cluster's texts other than 1/2?

Under the paired design P(intervention | cluster) = 1/2 for every cluster when the models do not
differ, so a cluster's ``own`` counts (texts assigned to it since it was created) are a fair-coin
sequence under H0, and the beta-binomial e-process of :mod:`services.stats.sequential` may be
looked at after every text.  Cluster id j is tested at a level from :class:`Spending`: the
levels sum to alpha, so the family-wise error over every cluster ever created, and every look, is
at most alpha.
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


class Spending:
    """Test levels for hypotheses created one at a time, in families that share alpha.

    Family f gets ``shares[f] * alpha`` and spends it over its members in creation order
    (``spending_level``), so the family-wise error over all families, all members ever created
    and every look is at most alpha.  A hypothesis's family must be fixed when it is created,
    before any text it is tested on arrives.  With one family, hypothesis j (the j-th created)
    is tested at ``spending_level(j, alpha)``.

    >>> s = Spending(0.05, (0.5, 0.5))
    >>> for fam in (0, 0, 1):
    ...     _ = s.add(fam)
    >>> s.level(2) == spending_level(0, 0.025) and s.level(1) == spending_level(1, 0.025)
    True
    """

    def __init__(self, alpha: float, shares: tuple[float, ...] = (1.0,)) -> None:
        if not math.isclose(sum(shares), 1.0) or min(shares) < 0:
            raise ValueError(f"family shares must be >= 0 and sum to 1, got {shares}")
        self.alpha = alpha
        self.shares = shares
        self.family: list[int] = []  # per hypothesis, in creation order
        self.index: list[int] = []  # its position within its family
        self._sizes = [0] * len(shares)

    def add(self, family: int = 0) -> int:
        """Register the next hypothesis; its number (0, 1, 2, ...)."""
        if family >= len(self.shares) or self.shares[family] == 0:  # a family without alpha: the first
            family = 0
        self.family.append(family)
        self.index.append(self._sizes[family])
        self._sizes[family] += 1
        return len(self.family) - 1

    def level(self, hyp: int) -> float:
        while hyp >= len(self.family):  # hypotheses created before any were registered: family 0
            self.add(0)
        f = self.family[hyp]
        return spending_level(self.index[hyp], self.shares[f] * self.alpha)

    def get_state(self) -> list[int]:
        return list(self.family)

    def set_state(self, families: list[int]) -> None:
        self.family, self.index, self._sizes = [], [], [0] * len(self.shares)
        for f in families:
            self.add(min(int(f), len(self.shares) - 1))


def crossed(ids: np.ndarray, own: np.ndarray, tested: np.ndarray, levels: np.ndarray,
            min_texts: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose e-value crossed 1/level with at least ``min_texts`` texts and not ``tested``
    before, every row's log e-value)."""
    log_e = share_log_e(own)
    if len(ids) == 0:
        return np.zeros(0, np.int64), log_e
    hit = (own.sum(axis=1) >= min_texts) & (log_e >= -np.log(levels)) & ~tested
    return np.flatnonzero(hit), log_e
