"""Offline proposers: from label pairs only, hypotheses about how the intervention answers differently.

Each proposer reads the label split and returns hypotheses in its own order; ``screen`` keeps those
the label split itself supports (a paired sign test at ``paired.propose_max_p`` and an effect of at
least ``paired.min_effect``), and ``drop_redundant`` drops a hypothesis whose per-pair differences
repeat an earlier one's.  Nothing here may read held-out pairs: the online-FDR order of the tests,
and which tests exist at all, must not depend on the data that validates them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from services.core.config import PairedConfig
from services.paired.features import FeatureCache
from services.paired.hypotheses import PairedHypothesis, claim
from services.paired.pairs import Pair
from services.paired.scorers import PairScorer, keyword_spec, make_scorer
from services.stats.paired import sign_test_p

MIN_PHRASE_COUNT = 3  # label answers that must use a phrase before it can be proposed


def label_evidence(scores_base: np.ndarray, scores_intervention: np.ndarray) -> tuple[str, dict[str, float]]:
    """(side that scores higher on the label split, its sign-test p and effect there)."""
    d = scores_intervention - scores_base
    hi, lo, n = int((d > 0).sum()), int((d < 0).sum()), int(d.size)
    direction = "intervention" if hi >= lo else "base"
    win, lose, higher, lower = (hi, lo, scores_intervention, scores_base) if direction == "intervention" else (
        lo, hi, scores_base, scores_intervention)
    effect = 0.5 + (win - lose) / (2.0 * n) if n else 0.5
    return direction, {"effect": effect, "p_value": sign_test_p(win, lose), "n": float(n),
                       "rate_claimed": float((higher > 0).mean()) if n else 0.0,
                       "rate_other": float((lower > 0).mean()) if n else 0.0}


def find_features_that_differ(label_pairs: Sequence[Pair], cache: FeatureCache | None = None) -> list[PairedHypothesis]:
    """One hypothesis per feature of the bank, in the direction the label split shows."""
    cache = cache if cache is not None else FeatureCache()  # an empty cache is falsy
    prompts = [p.prompt for p in label_pairs]
    fb = cache.matrix([p.base for p in label_pairs], prompts)
    fi = cache.matrix([p.intervention for p in label_pairs], prompts)
    out = []
    for j, f in enumerate(cache.features):
        direction, ev = label_evidence(fb[:, j], fi[:, j])
        text = claim(f.more if direction == "intervention" else f.less)
        out.append(PairedHypothesis(text, direction, {"type": "feature", "name": f.name}, "offline:features",  # type: ignore[arg-type]
                                    f.binary, f.unit, ev))
    return out


def phrase_hypothesis(term: str, direction: str, proposer: str) -> PairedHypothesis:
    how = "more often" if direction == "intervention" else "less often"
    return PairedHypothesis(claim(f"use \u201c{term}\u201d {how}"), direction, keyword_spec([term]),  # type: ignore[arg-type]
                            proposer, binary=True)


def _pick(names: np.ndarray, z: np.ndarray, count: np.ndarray, cfg: PairedConfig) -> list[str]:
    chosen: list[str] = []
    covered: set[str] = set()
    for j in np.argsort(-z, kind="stable"):
        if z[j] < cfg.keyword_min_z or len(chosen) >= cfg.keywords_per_side:
            break
        words = set(str(names[j]).split())
        if count[j] >= MIN_PHRASE_COUNT and not words & covered:  # "important", then not "is important"
            chosen.append(str(names[j]))
            covered |= words
    return chosen


def term_log_odds(higher: Sequence[frozenset[str]], lower: Sequence[frozenset[str]], prior_scale: float = 0.5,
                  min_count: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(terms, z, texts of ``higher`` using each, texts of ``lower`` using each): the log-odds of
    `services.hypothesizer.offline.log_odds_z` (Monroe et al. 2008, informative Dirichlet prior
    from the pooled counts) from per-text term sets, so answers tokenised once serve every split.
    Only terms some side uses ``min_count`` times are returned (the totals count every term)."""
    c_hi: Counter[str] = Counter()
    c_lo: Counter[str] = Counter()
    for terms in higher:
        c_hi.update(terms)
    for terms in lower:
        c_lo.update(terms)
    n_t, n_c = float(sum(c_hi.values())), float(sum(c_lo.values()))
    a0 = prior_scale * (n_t + n_c)
    names = sorted(w for w in c_hi.keys() | c_lo.keys() if c_hi[w] >= min_count or c_lo[w] >= min_count)
    if not names:
        return np.array([], dtype=object), np.zeros(0), np.zeros(0), np.zeros(0)
    y_t = np.array([c_hi[w] for w in names], dtype=float)
    y_c = np.array([c_lo[w] for w in names], dtype=float)
    alpha_w = prior_scale * (y_t + y_c)
    log_odds_t = np.log(y_t + alpha_w) - np.log(n_t + a0 - y_t - alpha_w)
    log_odds_c = np.log(y_c + alpha_w) - np.log(n_c + a0 - y_c - alpha_w)
    z = (log_odds_t - log_odds_c) / np.sqrt(1.0 / (y_t + alpha_w) + 1.0 / (y_c + alpha_w))
    return np.array(names, dtype=object), z, y_t, y_c


def distinguishing_phrases(higher: list[str], lower: list[str], cfg: PairedConfig,
                           cache: FeatureCache | None = None) -> tuple[list[str], list[str]]:
    """(phrases over-represented in ``higher``, phrases over-represented in ``lower``): words and
    two-word phrases by log-odds with an informative Dirichlet prior, stop words kept because
    style lives in them; one computation gives both sides (z is antisymmetric)."""
    cache = cache if cache is not None else FeatureCache()  # an empty cache is falsy
    names, z, y_h, y_l = term_log_odds(cache.terms(higher), cache.terms(lower), min_count=MIN_PHRASE_COUNT)
    return _pick(names, z, y_h, cfg), _pick(names, -z, y_l, cfg)


def find_phrases_that_distinguish(label_pairs: Sequence[Pair], cfg: PairedConfig,
                                  cache: FeatureCache | None = None) -> list[PairedHypothesis]:
    """Phrases the intervention's label answers use more, then those the base's use more."""
    more, less = distinguishing_phrases([p.intervention for p in label_pairs], [p.base for p in label_pairs], cfg,
                                        cache)
    return ([phrase_hypothesis(t, "intervention", "offline:log-odds") for t in more]
            + [phrase_hypothesis(t, "base", "offline:log-odds") for t in less])


def _label_scores(h: PairedHypothesis, label_pairs: Sequence[Pair], cache: FeatureCache | None,
                  scorer: PairScorer | None = None) -> tuple[np.ndarray, np.ndarray]:
    s = (scorer or make_scorer(h.scorer, cache=cache)).score(label_pairs)
    return s.base, s.intervention


def screen(hypotheses: Sequence[PairedHypothesis], label_pairs: Sequence[Pair], cfg: PairedConfig,
           cache: FeatureCache | None = None) -> list[PairedHypothesis]:
    """Hypotheses the label split supports in their stated direction, strongest (lowest p) first."""
    kept = []
    for h in hypotheses:
        b, i = _label_scores(h, label_pairs, cache)
        direction, ev = label_evidence(b, i)
        if direction == h.direction and ev["p_value"] <= cfg.propose_max_p and ev["effect"] >= cfg.min_effect:
            kept.append(PairedHypothesis(h.text, h.direction, h.scorer, h.proposer, h.binary, h.unit, ev))
    return sorted(kept, key=lambda h: (h.label_evidence["p_value"], -h.label_evidence["effect"]))


def drop_redundant(hypotheses: Sequence[PairedHypothesis], label_pairs: Sequence[Pair], cfg: PairedConfig,
                   cache: FeatureCache | None = None) -> list[PairedHypothesis]:
    """Keep a hypothesis unless its per-pair differences (on label pairs) correlate with a kept
    one's beyond ``paired.redundancy`` (|Spearman|): "more words" and "more sentences" are one
    finding, not two tests that each spend alpha.  Repeated hypotheses (same id) are dropped."""
    unique = list({h.hypothesis_id: h for h in reversed(hypotheses)}.values())[::-1]  # first of each id
    if len(unique) < 2 or not label_pairs:
        return unique
    diffs = np.column_stack([np.subtract(*_label_scores(h, label_pairs, cache)[::-1]) for h in unique])
    constant = np.ptp(diffs, axis=0) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.abs(np.corrcoef(rankdata(diffs, axis=0), rowvar=False))  # Spearman = Pearson of ranks
    rho[np.isnan(rho)] = 0.0
    rho[constant, :] = rho[:, constant] = 0.0
    kept: list[int] = []
    for j in range(len(unique)):
        if all(rho[j, k] <= cfg.redundancy for k in kept):
            kept.append(j)
    return [unique[j] for j in kept]
