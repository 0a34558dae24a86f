"""The decision for one paired hypothesis, from its held-out scores: pure, no I/O.

Like the validator's AUC decision (services/validator/service.py), with the paired effect
theta = P(claimed side scores higher) + 1/2 P(tie) in place of the AUC:

- validated: p <= the level the online-FDR rule gives this test, and theta's interval lies above
  ``paired.min_effect`` (+ band);
- rejected: the interval lies below min_effect (- band);
- escalated: the interval straddles min_effect and a later tier exists; the last tier decides by
  the point estimate instead.

Too few untied pairs: no test is spent (LORD++ is not advanced); escalated, or rejected on the last
tier.  Which pairs tie depends only on the unordered pair of scores, which a pair swap leaves as is,
so skipping on it cannot bias the tests that do run.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.config import PairedConfig
from services.core.events import Role
from services.paired.hypotheses import Decision
from services.paired.scorers import PairScores
from services.stats.fdr import LordPlusPlus
from services.stats.paired import PairedResult, paired_test


@dataclass(frozen=True)
class PairedDecision:
    decision: Decision
    result: PairedResult
    level: float
    reason: str


def claimed_and_other(scores: PairScores, direction: Role) -> tuple:
    """(scores of the side the hypothesis says is higher, scores of its partner)."""
    if direction == "intervention":
        return scores.intervention, scores.base
    return scores.base, scores.intervention


def decide_paired(scores: PairScores, direction: Role, lord: LordPlusPlus, cfg: PairedConfig, *,
                  is_last: bool = True, band: float = 0.0) -> PairedDecision:
    """Test ``direction``'s claim on held-out scores and decide; ``lord`` is advanced in place."""
    claimed, other = claimed_and_other(scores, direction)
    result = paired_test(claimed, other, test=cfg.test, confidence=cfg.confidence)
    untied = result.n_higher + result.n_lower
    if untied < cfg.min_pairs:
        return PairedDecision("rejected" if is_last else "escalated", result, 0.0,
                              f"only {untied} untied held-out pairs (< {cfg.min_pairs}); no test spent")
    rejected_null, level = lord.record(result.p_value)
    lo, hi, m = result.ci_low, result.ci_high, cfg.min_effect
    if rejected_null and lo >= m + band:
        return PairedDecision("validated", result, level, f"p <= level and effect interval above {m}")
    if hi < m - band:
        return PairedDecision("rejected", result, level, f"effect interval below {m}")
    if not is_last:
        return PairedDecision("escalated", result, level, f"effect interval straddles {m}")
    if rejected_null and result.effect >= m:
        return PairedDecision("validated", result, level, f"p <= level and effect >= {m} (last tier)")
    why = "p above level" if not rejected_null else f"effect below {m}"
    return PairedDecision("rejected", result, level, why)
