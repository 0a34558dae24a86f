"""Effect sizes that accompany the tests, so a report says how large a difference is, not only
whether it is there."""

from __future__ import annotations

import math

__all__ = ["cliffs_delta", "cohens_h"]


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's h = 2 asin(sqrt(p1)) - 2 asin(sqrt(p2)): a difference of proportions on a scale where
    equal steps are equally detectable (0.2 small, 0.5 medium, 0.8 large)."""
    for p in (p1, p2):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"proportions must be in [0, 1], got {p}")
    return 2.0 * math.asin(math.sqrt(p1)) - 2.0 * math.asin(math.sqrt(p2))


def cliffs_delta(auc: float) -> float:
    """Cliff's delta = P(pos > neg) - P(pos < neg) = 2 AUC - 1, in [-1, 1]."""
    if not 0.0 <= auc <= 1.0:
        raise ValueError(f"auc must be in [0, 1], got {auc}")
    return 2.0 * auc - 1.0
