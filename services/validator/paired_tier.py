"""How a validator tier decides a paired hypothesis (``Hypothesis.kind == "paired"``).

A paired hypothesis carries its own scorer spec (services/paired/scorers.py), so every tier scores
it the same way: the scorer is rebuilt with ``make_scorer`` and run on the held-out pairs (both
answers of a pair, never one its proposers saw), and ``decide_paired`` tests it: a paired sign test
(``paired.test``: sign, Wilcoxon signed-rank, or the anytime-valid e-process) through the tier's
own LORD++ stream, against ``paired.min_effect`` with the tier's ``escalate_band``.  The cascade is
the mode path's: a tier escalates what its interval cannot settle, the last tier decides.

The Validation it returns reads like any other: ``auc`` is the paired effect theta = P(the claimed
side's answer scores higher than its partner's), ties counted half, with its interval in
``auc_ci`` (so "validated on held-out texts" means the same thing for both kinds); ``effect``
carries every statistic of the paired test and P(the intervention's answer scores higher) with its
interval, which the sink words as "in 31% of pairs against 6%".

Kept apart from services/validator/service.py on purpose: the service calls ``PairedTier`` in one
place for each of scoring and deciding.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from services.core.events import Hypothesis, TextRef, Validation, stable_id
from services.paired.decision import decide_paired
from services.paired.features import FeatureCache
from services.paired.scorers import PairScores, make_scorer
from services.paired.service import pairs_of_refs
from services.stats.fdr import LordPlusPlus

if TYPE_CHECKING:
    from services.core.config import Config, TierConfig
    from services.embedder.encoder import Encoder
    from services.llm.client import LLMClient

# PairedResult fields copied into Validation.effect (all numbers)
RESULT_FIELDS = ("effect", "ci_low", "ci_high", "n", "n_higher", "n_lower", "n_tied", "rate_claimed", "rate_other",
                 "median_claimed", "median_other", "mean_claimed", "mean_other", "sign_p", "wilcoxon_p", "log_e")


class PairedTier:
    """Scores paired hypotheses for one tier; the encoder and the LLM client are made on first
    need (a direction scorer, an LLM judge), so a run of feature and phrase scorers loads neither."""

    def __init__(self, cfg: Config, tier: TierConfig, encoder: Callable[[], Awaitable[Encoder]],
                 llm_client: Callable[[], LLMClient | None]) -> None:
        self.cfg = cfg
        self.tier = tier
        self._encoder_factory = encoder
        self._llm_factory = llm_client
        self.cache = FeatureCache()
        self._encoder: Encoder | None = None
        self._llm: LLMClient | None = None

    async def score(self, h: Hypothesis, refs: Sequence[TextRef] | None = None) -> PairScores:
        """Held-out scores of ``h``'s pairs (``refs``: its held-out texts with their text, by
        default the ones the message carries).  Offline scorers read every pair it carries (at most
        ``paired.holdout_pairs``: they cost nothing, and a tier's ``max_texts`` per side would leave
        a paired test 60 pairs); an LLM judge at most ``min(tier.max_texts, paired.llm_judge_pairs)``."""
        kind = h.scorer.get("type")
        if kind == "direction" and self._encoder is None:
            self._encoder = await self._encoder_factory()
        if kind == "llm_judge" and self._llm is None:
            self._llm = self._llm_factory()
        pairs = pairs_of_refs(list(h.holdout_texts if refs is None else refs))
        scorer = make_scorer(h.scorer, cache=self.cache, encoder=self._encoder, llm=self._llm,
                             max_pairs=min(self.tier.max_texts, self.cfg.paired.llm_judge_pairs))
        return await scorer.ascore(pairs)

    async def aclose(self) -> None:
        if self._llm is not None:
            await self._llm.aclose()


def decide_paired_hypothesis(h: Hypothesis, scores: PairScores, lord: LordPlusPlus, cfg: Config, tier: TierConfig,
                             tier_index: int, is_last: bool) -> Validation:
    """The pure decision for one paired hypothesis on one tier (``lord`` is advanced in place)."""
    d = decide_paired(scores, h.direction, lord, cfg.paired, is_last=is_last, band=tier.escalate_band)
    r = d.result
    effect: dict[str, float] = {k: float(v) for k, v in asdict(r).items() if k in RESULT_FIELDS}
    ours = h.direction == "intervention"
    effect.update(
        n_pairs=float(r.n), dropped_unparsed=float(scores.dropped),
        p_intervention_higher=r.effect if ours else 1.0 - r.effect,
        p_intervention_higher_lo=r.ci_low if ours else 1.0 - r.ci_high,
        p_intervention_higher_hi=r.ci_high if ours else 1.0 - r.ci_low,
        too_few_pairs=float(r.n_higher + r.n_lower < cfg.paired.min_pairs),
    )
    effect.update(scores.notes)
    return Validation(experiment_id=h.experiment_id, validation_id=_validation_id(h, tier.name),
                      hypothesis_id=h.hypothesis_id, tier=tier.name, tier_index=tier_index, hypothesis=h,
                      decision=d.decision, auc=r.effect, auc_ci=(r.ci_low, r.ci_high), p_value=r.p_value,
                      alpha_level=d.level, n_pos=r.n, n_neg=r.n, calls=scores.calls, cost_usd=scores.cost_usd,
                      effect=effect)


def _validation_id(h: Hypothesis, tier: str) -> str:
    return stable_id(h.hypothesis_id, tier)  # the service's own id rule (ValidatorService._base)


def paired_result_of(effect: dict[str, Any], test: str, p_value: float) -> Any:
    """The PairedResult a paired Validation's ``effect`` holds (for wording a finding); None when
    the validation carries none."""
    from services.stats.paired import PairedResult

    if not all(k in effect for k in RESULT_FIELDS):
        return None
    vals = {k: effect[k] for k in RESULT_FIELDS}
    for k in ("n", "n_higher", "n_lower", "n_tied"):
        vals[k] = int(vals[k])
    return PairedResult(test=test, p_value=p_value, **vals)  # type: ignore[arg-type]
