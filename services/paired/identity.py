"""Pair identity accuracy (VibeCheck's measure): how well a run's findings tell the models apart.

Each finding's scorer gives every answer a number; for a pair, the differences (intervention -
base) of all findings form one row.  A logistic model without intercept is fit on label pairs,
each row once as "intervention first" and negated as "base first", so it cannot favour a side;
accuracy is the share of held-out pairs whose intervention answer it picks (ties count half).
The findings were validated on held-out pairs, but the model weighting them never saw one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression

from services.paired.pairs import Pair
from services.paired.scorers import PairScorer


def pair_differences(scorers: Sequence[PairScorer], pairs: Sequence[Pair]) -> np.ndarray:
    """(len(pairs), len(scorers)) of intervention score - base score (offline scorers only)."""
    if not scorers:
        return np.zeros((len(pairs), 0))
    cols = []
    for s in scorers:
        sc = s.score(pairs)
        cols.append(sc.intervention - sc.base)
    return np.column_stack(cols)


def pair_identity_accuracy(label_diffs: np.ndarray, held_diffs: np.ndarray, c: float = 1.0) -> float:
    """Held-out share of pairs told apart; 0.5 without findings or without label pairs."""
    if held_diffs.shape[0] == 0:
        return float("nan")
    if label_diffs.shape[1] == 0 or label_diffs.shape[0] == 0:
        return 0.5
    scale = label_diffs.std(axis=0)
    scale[scale == 0] = 1.0
    x = label_diffs / scale
    if not np.any(x):
        return 0.5
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000)
    model.fit(np.vstack([x, -x]), np.r_[np.ones(len(x)), np.zeros(len(x))])
    margin = (held_diffs / scale) @ model.coef_.ravel()
    return float((margin > 0).mean() + 0.5 * (margin == 0).mean())


def identity_accuracy_of(scorers: Sequence[PairScorer], label_pairs: Sequence[Pair], held_pairs: Sequence[Pair],
                         c: float = 1.0) -> float:
    """Pair identity accuracy of these scorers: fit on label pairs, measured on held-out pairs."""
    return pair_identity_accuracy(pair_differences(scorers, label_pairs), pair_differences(scorers, held_pairs), c)
