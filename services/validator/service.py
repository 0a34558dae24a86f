"""Validator service: one cascade tier per instance.

Tier 0 consumes ``hypotheses``; tier k>0 consumes ``escalations.<tier name>``.  A tier scores the
hypothesis' held-out texts (never the texts its labeler saw), tests AUC > 0.5 with a Mann-Whitney
p-value, and decides by the AUC's confidence interval against ``validator.min_auc``:

- validated: p <= the tier's online-FDR level and the interval lies above min_auc;
- rejected: the interval lies below min_auc;
- escalated: the interval straddles min_auc and a later tier exists (the last tier decides by the
  point estimate).

Error control: each tier runs LORD++ at alpha / n_tiers over the stream of hypotheses it tests
(FDR <= alpha/n_tiers per tier under independence; summed over tiers <= alpha).  A finding also
needs its cluster's share test to have passed (the candidate exists only then), so under "no
difference" the chance of any validated finding is at most the clusterer's alpha.  LORD++ state
and every decision live in Redis, so a re-delivered hypothesis gets the same decision and never
spends alpha twice.  A paired hypothesis (``kind: paired``) is scored by its own scorer on held-out
pairs and decided by a paired test through the same LORD++ stream (services/validator/paired_tier.py).
Every hypothesis, whatever its ``kind``, is decided on its held-out texts: the
cluster's share test made it a candidate, but a share statement is not a finding (nothing in a
message can stand in for the held-out test).  The held-out texts themselves are taken from the
generator's text store by id, never from the message (services/validator/trusted.py): unknown ids,
label ids and label-split ids are dropped and counted, and too few trusted texts is a rejection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from redis.asyncio import Redis

from services.core.events import ControlEvent, DeadLetter, Event, Hypothesis, Validation, stable_id
from services.core.registry import TIERS
from services.core.runtime import Incoming, Service, ServiceContext
from services.core.state import expire_state
from services.core.text_store import TextStore
from services.core.topics import escalation_topic
from services.stats.auc import auc_test
from services.stats.fdr import LordPlusPlus
from services.validator.paired_tier import PairedTier, decide_paired_hypothesis
from services.validator.tiers import Tier, TierDeps, TierScores, split_refs
from services.validator.trusted import trusted_holdout

if TYPE_CHECKING:
    from services.core.config import BaseTierConfig, Config, LLMConfig
    from services.embedder.cache import EmbeddingCache
    from services.embedder.encoder import Encoder
    from services.llm.client import LLMClient
    from services.paired.scorers import PairScores

MIN_PER_SIDE = 5


async def build_tier(cfg: Config, c: BaseTierConfig, *, encoder: Callable[[], Awaitable[Encoder]],
                     cache: Callable[[], EmbeddingCache | None],
                     llm_client: Callable[[LLMConfig], LLMClient]) -> Tier:
    """The tier class ``c.kind`` names in the registry (built-in or plug-in), built from its
    settings; callers differ only in where the encoder, the embedding cache and LLM clients come from."""
    cls: type[Tier] = TIERS.load(c.kind)
    return await cls.build(cfg, c, TierDeps(encoder=encoder, cache=cache, llm_client=llm_client))


class ValidatorService(Service):
    name: ClassVar[str] = "validator"
    consumes = (Hypothesis,)
    produces = (Validation, Hypothesis)  # hypotheses only to the next tier's escalation topic

    def __init__(self, ctx: ServiceContext, tier_index: int = 0) -> None:
        self.tier_index = tier_index
        self.tier_cfg = ctx.cfg.validator.tiers[tier_index]
        super().__init__(ctx)
        self.redis: Redis | None = None
        self.tier: Tier | None = None
        self.paired: PairedTier | None = None

    @classmethod
    def instances(cls, ctx: ServiceContext) -> list[Service]:
        """One instance per cascade tier."""
        return [cls(ctx, tier_index=i) for i in range(len(ctx.cfg.validator.tiers))]

    @property
    def display_name(self) -> str:
        return f"validator:{self.tier_cfg.name}"

    @property
    def n_tiers(self) -> int:
        return len(self.cfg.validator.tiers)

    @property
    def is_last(self) -> bool:
        return self.tier_index == self.n_tiers - 1

    def group_id(self) -> str:
        return f"{super().group_id()}.{self.tier_cfg.name}"

    def inputs(self) -> list[str]:
        return [Hypothesis.topic if self.tier_index == 0 else escalation_topic(self.tier_cfg.name), ControlEvent.topic]

    def outputs(self) -> list[str]:
        nxt = [] if self.is_last else [escalation_topic(self.cfg.validator.tiers[self.tier_index + 1].name)]
        return [Validation.topic, *nxt, DeadLetter.topic]

    def decode(self, record: Any) -> Event:
        """Hypotheses on the tier's input topic (``hypotheses`` or its escalation topic)."""
        if self.ctx.topics.logical(record.topic) == ControlEvent.topic:
            return ControlEvent.from_bytes(record.value)
        return Hypothesis.from_bytes(record.value)

    async def setup(self) -> None:
        self.redis = self.ctx.redis()
        ns, exp, tier = self.cfg.cache.namespace, self.ctx.experiment_id, self.tier_cfg.name
        self.k_lord = f"{ns}:lord:{exp}:{tier}"
        self.k_decided = f"{ns}:decided:{exp}:{tier}"
        self.store = TextStore(self.redis, self.cfg, exp)
        self.tier = await self._make_tier()
        self.paired = PairedTier(self.cfg, self.tier_cfg, lambda: self.ctx.resources.encoder(self.cfg.embedder),
                                 lambda: self._llm_client(self.cfg.paired.llm) if self.cfg.paired.llm else None)
        self.m_dec = self.metrics.counter("validator_decisions_total", "Decisions per tier", ["tier", "decision"])
        self.m_calls = self.metrics.counter("validator_scorer_calls_total", "Scorer calls (LLM calls for LLM tiers)",
                                            ["tier"])
        self.m_cost = self.metrics.counter("validator_cost_usd_total", "Estimated spend", ["tier"])

    async def _make_tier(self) -> Tier:
        from services.embedder.service import make_cache

        return await build_tier(self.cfg, self.tier_cfg, encoder=lambda: self.ctx.resources.encoder(self.cfg.embedder),
                                cache=lambda: make_cache(self.cfg, self.redis), llm_client=self._llm_client)

    def _llm_client(self, llm: LLMConfig) -> LLMClient:
        from services.llm.factory import experiment_llm_client

        return experiment_llm_client(self.cfg, llm, self.redis)

    async def handle(self, batch: list[Incoming]) -> None:
        for item in batch:
            h = item.event
            assert isinstance(h, Hypothesis)
            v = await self._decide_once(h)
            await expire_state(self.redis, self.cfg, self.k_lord, self.k_decided)
            await self.emit(v)
            if v.decision == "escalated":
                nxt = self.cfg.validator.tiers[self.tier_index + 1].name
                await self.emit(h, topic=escalation_topic(nxt))

    async def _decide_once(self, h: Hypothesis) -> Validation:
        """Idempotent: a hypothesis decided before gets its stored decision back."""
        stored = await self.redis.hget(self.k_decided, h.hypothesis_id)
        if stored is not None:
            return Validation.model_validate(orjson.loads(stored))
        scores = await self._score(h)
        async with self.redis.lock(self.k_lord + ":lock", timeout=30, blocking_timeout=60):
            stored = await self.redis.hget(self.k_decided, h.hypothesis_id)
            if stored is not None:
                return Validation.model_validate(orjson.loads(stored))
            raw = await self.redis.get(self.k_lord)
            lord = LordPlusPlus.from_dict(orjson.loads(raw)) if raw else self.new_lord()
            v = self.decide(h, scores, lord)
            await self.redis.set(self.k_lord, orjson.dumps(lord.to_dict()))
            await self.redis.hset(self.k_decided, h.hypothesis_id, v.to_bytes())
        return self._record_metrics(v, scores)

    def new_lord(self) -> LordPlusPlus:
        """This tier's online-FDR rule in its initial state: LORD++ at alpha / n_tiers."""
        return LordPlusPlus(self.cfg.validator.alpha / self.n_tiers)

    def decide(self, h: Hypothesis, scores: TierScores | PairScores, lord: LordPlusPlus) -> Validation:
        """The pure decision, no I/O: AUC of the held-out texts' scores + LORD++.

        ``lord`` is advanced in place.  Benchmarks that call a tier directly (bench/cascade.py) and
        the null tests use it too, so they exercise exactly the service's decision code.  A paired hypothesis is
        decided by the paired test (services/validator/paired_tier.py).
        """
        if h.kind == "paired":
            return decide_paired_hypothesis(h, scores, lord, self.cfg, self.tier_cfg, self.tier_index,  # type: ignore[arg-type]
                                            self.is_last)
        return self._auc_decision(h, scores, lord)

    def _record_metrics(self, v: Validation, scores: TierScores | PairScores) -> Validation:
        self.m_dec.labels(self.tier_cfg.name, v.decision).inc()
        self.m_calls.labels(self.tier_cfg.name).inc(scores.calls)
        self.m_cost.labels(self.tier_cfg.name).inc(scores.cost_usd)
        return v

    async def _score(self, h: Hypothesis) -> TierScores | PairScores:
        """Scores of the held-out texts the text store vouches for (none looked up for a tier that
        reads none); with too few of them nothing is scored and nothing spent.  A paired hypothesis
        is scored on both answers of each held-out pair, as the store has them."""
        if h.kind != "paired" and not self.tier.reads_holdout:
            return await self.tier.score(h, [], [])
        trusted = await trusted_holdout(h, self.store, self.cfg)
        if h.kind == "paired":
            return dataclasses.replace(await self.paired.score(h, trusted.texts), notes=trusted.notes())
        pos, neg = split_refs(trusted.texts, h.direction, self.tier_cfg.max_texts)
        if min(len(pos), len(neg)) < MIN_PER_SIDE:
            return TierScores([], [], notes={**trusted.notes(), "too_few_trusted": 1.0,
                                             "trusted_pos": float(len(pos)), "trusted_neg": float(len(neg))})
        scores = await self.tier.score(h, pos, neg)
        scores.notes = {**trusted.notes(), **scores.notes}
        return scores

    def _base(self, h: Hypothesis, **kw: object) -> Validation:
        fields: dict[str, object] = {"tier": self.tier_cfg.name, **kw}  # kw may name another tier
        return Validation(experiment_id=h.experiment_id,
                          validation_id=stable_id(h.hypothesis_id, self.tier_cfg.name),
                          hypothesis_id=h.hypothesis_id, tier_index=self.tier_index, hypothesis=h, **fields)

    def _auc_decision(self, h: Hypothesis, s: TierScores, lord: LordPlusPlus) -> Validation:
        min_auc = self.cfg.validator.min_auc
        band = self.tier_cfg.escalate_band
        if min(len(s.pos), len(s.neg)) < MIN_PER_SIDE:  # too few trusted texts: no tier can do better
            decision = "escalated" if not self.is_last and not s.notes.get("too_few_trusted") else "rejected"
            return self._base(h, decision=decision, auc=0.5, auc_ci=(0.0, 1.0), p_value=1.0, alpha_level=0.0,
                              n_pos=len(s.pos), n_neg=len(s.neg), calls=s.calls, cost_usd=s.cost_usd,
                              effect={**_share_effect(h.cluster_evidence), "too_few_texts": 1.0,
                                      "dropped_unparsed": float(s.dropped), **s.notes})
        res = auc_test(s.pos, s.neg)
        rejected_null, level = lord.record(res.p_value)
        if rejected_null and res.ci_low >= min_auc + band:
            decision = "validated"
        elif res.ci_high < min_auc - band:
            decision = "rejected"
        elif not self.is_last:
            decision = "escalated"
        else:
            decision = "validated" if rejected_null and res.auc >= min_auc else "rejected"
        effect = {**_share_effect(h.cluster_evidence), "dropped_unparsed": float(s.dropped), **s.notes}
        return self._base(h, decision=decision, auc=res.auc, auc_ci=(res.ci_low, res.ci_high),
                          p_value=res.p_value, alpha_level=level, n_pos=res.n_pos, n_neg=res.n_neg,
                          calls=s.calls, cost_usd=s.cost_usd, effect=effect)

    async def teardown(self) -> None:
        if self.tier is not None:
            await self.tier.aclose()
        if self.paired is not None:
            await self.paired.aclose()
        if self.redis is not None:
            await self.redis.aclose()


def _share_effect(ev: dict[str, float]) -> dict[str, float]:
    keys = ("share_intervention", "share_ci_low", "share_ci_high", "share_diff", "log_e_value", "n")
    return {k: float(ev[k]) for k in keys if k in ev}
