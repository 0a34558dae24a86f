"""An embedding direction: a linear probe on label pairs that says whether the models differ at all.

The probe is fit on pair differences (intervention vector - base vector, and its negation as the
other class, no intercept), so it learns a direction w with w.(v_I - v_B) > 0, symmetric in the two
roles.  On held-out pairs its AUC (intervention texts against base texts) gets a pair-swap
p-value: swapping the roles within random pairs is the exact null, and the pooled ranks do not
change under a swap, so thousands of swaps cost one ``rankdata``.

The texts at the two ends of the direction go to a labeler; offline, the labeler is the feature
bank and the log-odds phrases that separate the ends, and what it says becomes ordinary
hypotheses (validated by their own scorers, not by the direction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression

from services.core.config import PairedConfig
from services.paired.features import FeatureCache
from services.paired.hypotheses import PairedHypothesis, claim
from services.paired.pairs import Pair, have_vectors
from services.paired.proposers import distinguishing_phrases, phrase_hypothesis
from services.paired.scorers import direction_spec
from services.stats.auc import auc_test

MIN_PAIRS = 8


@dataclass(frozen=True)
class Direction:
    weights: np.ndarray  # unit norm; the intervention end is +
    label_pair_accuracy: float  # in-sample, for orientation only
    embedding_model: str = ""

    def spec(self) -> dict:
        return direction_spec(self.weights, self.embedding_model)


@dataclass(frozen=True)
class DirectionTest:
    """Held-out distinguishability: AUC of projections, its pair-swap p-value, pair accuracy."""

    auc: float
    p_value: float
    pair_accuracy: float  # P(intervention projects higher than its partner), ties half
    n_pairs: int
    swaps: int


def _vectors(pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
    b = np.stack([np.asarray(p.base_vector, dtype=np.float32) for p in pairs])
    i = np.stack([np.asarray(p.intervention_vector, dtype=np.float32) for p in pairs])
    return b, i


def find_embedding_direction(label_pairs: Sequence[Pair], c: float = 1.0,
                             embedding_model: str = "") -> Direction | None:
    """The probe's direction, or None without vectors or with fewer than MIN_PAIRS label pairs."""
    if len(label_pairs) < MIN_PAIRS or not have_vectors(label_pairs):
        return None
    b, i = _vectors(label_pairs)
    d = i - b
    x = np.vstack([d, -d])
    y = np.r_[np.ones(len(d)), np.zeros(len(d))]
    probe = LogisticRegression(C=c, fit_intercept=False, max_iter=2000).fit(x, y)
    w = probe.coef_.ravel().astype(np.float32)
    norm = float(np.linalg.norm(w))
    if norm == 0.0:
        return None
    w /= norm
    proj = d @ w
    return Direction(w, float((proj > 0).mean() + 0.5 * (proj == 0).mean()), embedding_model)


def how_distinguishable(direction: Direction, held_pairs: Sequence[Pair], swaps: int = 999,
                             seed: int = 0) -> DirectionTest:
    """Held-out AUC with a pair-swap permutation p-value ((1 + #{null AUC >= observed}) / (swaps + 1))."""
    n = len(held_pairs)
    if n == 0:
        return DirectionTest(0.5, 1.0, 0.5, 0, swaps)
    b, i = _vectors(held_pairs)
    sb, si = b @ direction.weights, i @ direction.weights
    ranks = rankdata(np.concatenate([si, sb]))
    r_i, r_b = ranks[:n], ranks[n:]

    def auc(rank_sums: np.ndarray) -> np.ndarray:
        return (rank_sums - n * (n + 1) / 2.0) / (n * n)

    observed = float(auc(np.asarray(r_i.sum())))
    flips = np.random.default_rng(seed).random((swaps, n)) < 0.5
    null = auc(np.where(flips, r_b, r_i).sum(axis=1))
    p = (1.0 + float((null >= observed - 1e-12).sum())) / (swaps + 1.0)
    diff = si - sb
    return DirectionTest(observed, p, float((diff > 0).mean() + 0.5 * (diff == 0).mean()), n, swaps)


def direction_ends(direction: Direction, label_pairs: Sequence[Pair],
                   k: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """((text, prompt) of the k label texts at the intervention end, the same at the base end)."""
    b, i = _vectors(label_pairs)
    items = [(p.base, p.prompt) for p in label_pairs] + [(p.intervention, p.prompt) for p in label_pairs]
    order = np.argsort(np.concatenate([b @ direction.weights, i @ direction.weights]), kind="stable")
    k = min(k, len(items) // 2)
    return [items[j] for j in order[::-1][:k]], [items[j] for j in order[:k]]


def describe_direction_ends(direction: Direction, label_pairs: Sequence[Pair], cfg: PairedConfig,
                            cache: FeatureCache | None = None, max_features: int = 5) -> list[PairedHypothesis]:
    """Offline labeler of the two ends: features whose values separate the ends best (AUC of the
    intervention end against the base end, furthest from 1/2 first) and phrases by log-odds."""
    cache = cache if cache is not None else FeatureCache()  # an empty cache is falsy
    top_items, bottom_items = direction_ends(direction, label_pairs, cfg.direction_end_texts)
    if not top_items:
        return []
    top, bottom = [t for t, _ in top_items], [t for t, _ in bottom_items]
    ft = cache.matrix(top, [p for _, p in top_items])
    fb = cache.matrix(bottom, [p for _, p in bottom_items])
    ranked = []
    for j, f in enumerate(cache.features):
        if np.ptp(np.r_[ft[:, j], fb[:, j]]) == 0:
            continue
        a = auc_test(ft[:, j], fb[:, j]).auc
        ranked.append((abs(a - 0.5), a, f))
    out = []
    for gap, a, f in sorted(ranked, key=lambda r: -r[0])[:max_features]:
        if gap < 0.15:
            break
        direction_side = "intervention" if a > 0.5 else "base"
        out.append(PairedHypothesis(claim(f.more if a > 0.5 else f.less), direction_side,  # type: ignore[arg-type]
                                    {"type": "feature", "name": f.name}, "offline:direction-ends", f.binary, f.unit))
    more, less = distinguishing_phrases(top, bottom, cfg, cache)
    out += [phrase_hypothesis(t, "intervention", "offline:direction-ends") for t in more]
    out += [phrase_hypothesis(t, "base", "offline:direction-ends") for t in less]
    return out
