"""In-process experiment driver: the pipeline's own classes, wired with lists instead of Kafka.

For statistics tests and policy benchmarks that need thousands of runs, where going through a
broker would be far too slow.  Nothing is re-implemented: every stage is the code its service
runs.

* controller: :class:`SamplingPolicy` plans rounds and observes embeddings, uncertainty events
  and snapshots exactly as ``ControllerService`` feeds it;
* generator: a ``GeneratorService`` (never started; its ``emit`` appends to a list) serves the
  paired requests, so text ids, pair ids and sim ground truth are the service's;
* embedder: ``embed_with_cache`` without a cache, with vectors passed through the configured
  storage dtype (``cache.vector_dtype``) as the Redis round trip would;
* clusterer: :class:`ClusterState` ingests in chunks of ``bus.max_poll_records``.  Pairs are
  shuffled within a round (parallel generators interleave them) and the two texts of a pair
  arrive together in an order that does not depend on the role (a seeded coin per pair; the
  clusterer service orders each pair by its id), which the share test's null needs;
* hypothesizer: ``HypothesizerService.hypotheses_for`` (offline labeler);
* validators: each tier's ``ValidatorService.decide`` (share test, AUC + LORD++ at alpha/n_tiers
  per tier) on the scores of the same tier classes; escalations go to the next tier.

A round is fully clustered before the next is planned (the service plans at 90%), and a snapshot
is taken after each round; otherwise the order of events is the services'.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from services.clusterer.state import ClusterState
from services.controller.policy import Plan, SamplingPolicy, paired_requests
from services.core.bus import Topics
from services.core.config import Config, PlantedBehaviour
from services.core.events import (
    CandidateCluster,
    DecodedText,
    Event,
    Hypothesis,
    Validation,
    stable_id,
)
from services.core.metrics import Metrics
from services.core.runtime import Incoming, ServiceContext
from services.embedder.cache import embed_with_cache
from services.embedder.encoder import Encoder
from services.generator.prompts import load_prompts
from services.generator.service import GeneratorService
from services.groundtruth import GroundTruthRule, Match, TextTruth, is_finding, planted_behaviours
from services.hypothesizer.service import HypothesizerService
from services.stats.fdr import LordPlusPlus
from services.validator.service import ValidatorService, build_tier
from services.validator.tiers import Tier, split_holdout

log = logging.getLogger("autointerv.harness")


@dataclass
class RoundRecord:
    round: int
    reason: str
    texts: int  # texts generated so far, both roles
    candidates: int  # so far
    hypotheses: int
    validated: int  # hypotheses whose final decision is "validated", so far
    found: list[str]  # planted behaviours matched by a validated hypothesis, so far
    n_clusters: int


@dataclass
class HarnessResult:
    rounds: list[RoundRecord]
    candidates: list[CandidateCluster]
    hypotheses: list[Hypothesis]
    validations: list[Validation]  # every tier's decision, in order
    final: dict[str, Validation]  # hypothesis id -> its last (non-escalated) decision
    matches: dict[str, Match]  # hypothesis id -> ground-truth match (findings only)
    found_at: dict[str, int]  # behaviour -> texts generated when first found and validated
    behaviours: list[PlantedBehaviour]
    texts: int
    stop_reason: str
    state: ClusterState
    truth: dict[str, TextTruth]  # text id -> (role, planted behaviour or None)
    vectors: np.ndarray | None = None  # every text's vector in arrival order (keep_vectors=True)
    text_ids: list[str] = field(default_factory=list)  # ids of those vectors' texts
    decoded: list[DecodedText] = field(default_factory=list)  # every text (keep_texts=True)
    cluster_terms: dict[str, list[str]] = field(default_factory=dict)  # candidate id -> top terms then

    @property
    def validated(self) -> list[Hypothesis]:
        return [h for h in self.hypotheses if self.final.get(h.hypothesis_id, None) is not None
                and self.final[h.hypothesis_id].decision == "validated"]

    @property
    def all_found(self) -> bool:
        return all(b.name in self.found_at for b in self.behaviours)



class _CapturingGenerator(GeneratorService):
    """The generator service with ``emit`` appending to a list instead of producing to Kafka."""

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.out: list[DecodedText] = []

    async def emit(self, event: Event, topic: str | None = None) -> None:
        assert isinstance(event, DecodedText)
        self.out.append(event)


def _context(cfg: Config) -> ServiceContext:
    """A context for services that are constructed but never run (no broker, no Redis is touched)."""
    return ServiceContext(cfg=cfg, bootstrap="in-process:0", redis_url="redis://in-process:0",
                          metrics=Metrics(), topics=Topics(cfg.bus.topic_prefix))


async def make_tier(cfg: Config, index: int, encoder: Encoder) -> Tier:
    """The validator service's tier, without Redis: no embedding cache, an in-process LLM budget."""
    from services.llm.factory import make_budget, make_llm_client

    budget = make_budget(cfg.experiment.budget_usd)

    async def given_encoder() -> Encoder:
        return encoder

    return await build_tier(cfg, cfg.validator.tiers[index], encoder=given_encoder, cache=lambda: None,
                            llm_client=lambda llm: make_llm_client(llm, budget=budget))


class Cascade:
    """The validator tiers in order, each with its own LORD++ state, as the services chain them."""

    def __init__(self, cfg: Config, tiers: list[Tier]) -> None:
        ctx = _context(cfg)
        self.services = [ValidatorService(ctx, i) for i in range(len(tiers))]
        self.tiers = tiers
        self.lords: list[LordPlusPlus] = [s.new_lord() for s in self.services]

    @classmethod
    async def build(cls, cfg: Config, encoder: Encoder) -> Cascade:
        return cls(cfg, [await make_tier(cfg, i, encoder) for i in range(len(cfg.validator.tiers))])

    async def validate(self, h: Hypothesis) -> list[Validation]:
        """Every tier's decision for ``h`` until one is final (the last tier always is)."""
        out = []
        for svc, tier, lord in zip(self.services, self.tiers, self.lords, strict=True):
            pos, neg = split_holdout(h, svc.tier_cfg.max_texts)
            v = svc.decide(h, await tier.score(h, pos, neg), lord)
            out.append(v)
            if v.decision != "escalated":
                break
        return out

    async def aclose(self) -> None:
        for svc, tier in zip(self.services, self.tiers, strict=True):
            await tier.aclose()
            await svc.producer.stop()


def _interleave(texts: list[DecodedText], rng: random.Random) -> list[DecodedText]:
    """Pairs in random order, and each pair's two roles in random order (coin flip per pair)."""
    pairs: dict[str, list[DecodedText]] = defaultdict(list)
    for t in texts:
        pairs[t.pair_id or t.text_id].append(t)
    groups = list(pairs.values())
    rng.shuffle(groups)
    out: list[DecodedText] = []
    for g in groups:
        g = sorted(g, key=lambda t: t.role)
        if rng.random() < 0.5:
            g.reverse()
        out.extend(g)
    return out


class Harness:
    """One experiment, driven round by round; see :func:`run_experiment`."""

    def __init__(self, cfg: Config, encoder: Encoder, *, until_all_found: bool = False,
                 keep_vectors: bool = False, keep_texts: bool = False,
                 policy_cls: type[SamplingPolicy] = SamplingPolicy) -> None:
        self.cfg = cfg
        self.encoder = encoder
        self.until_all_found = until_all_found
        self.keep_vectors = keep_vectors
        self.keep_texts = keep_texts
        self.decoded: list[DecodedText] = []
        self.cluster_terms: dict[str, list[str]] = {}
        self.rng = random.Random(stable_id(cfg.experiment_id, cfg.experiment.seed, "harness"))
        prompts = load_prompts(cfg.prompts, cfg.models.intervention.sim)
        self.policy = policy_cls(cfg.controller, prompts, seed=cfg.experiment.seed)
        self.state = ClusterState(cfg.clusterer, cfg.experiment_id, alpha=cfg.validator.alpha)
        self.behaviours = planted_behaviours(cfg)
        self.ground_truth = GroundTruthRule.from_config(cfg)  # its encoder loads at the first finding
        self.ctx = _context(cfg)
        self.generator = _CapturingGenerator(self.ctx)
        self.hypothesizer = HypothesizerService(self.ctx)
        self.cascade: Cascade | None = None
        self.candidates: list[CandidateCluster] = []
        self.hypotheses: list[Hypothesis] = []
        self.validations: list[Validation] = []
        self.final: dict[str, Validation] = {}
        self.matches: dict[str, Match] = {}
        self.found_at: dict[str, int] = {}
        self.truth: dict[str, TextTruth] = {}
        self.rounds: list[RoundRecord] = []
        self.n_texts = 0
        self.vectors: list[np.ndarray] = []
        self.text_ids: list[str] = []

    async def run(self) -> HarnessResult:
        await self.generator.setup()
        await self.hypothesizer.setup()
        self.cascade = await Cascade.build(self.cfg, self.encoder)
        try:
            stop_reason = await self._loop()
        finally:
            await self._close()
        return HarnessResult(
            rounds=self.rounds, candidates=self.candidates, hypotheses=self.hypotheses,
            validations=self.validations, final=self.final, matches=self.matches, found_at=self.found_at,
            behaviours=self.behaviours, texts=self.n_texts, stop_reason=stop_reason, state=self.state,
            truth=self.truth, vectors=np.concatenate(self.vectors) if self.vectors else None,
            text_ids=self.text_ids, decoded=self.decoded, cluster_terms=self.cluster_terms)

    async def _loop(self) -> str:
        plans, reason = self.policy.initial_plans(), "initial sample"
        while True:
            await self._round(plans, reason)
            if self.until_all_found and self.behaviours and len(self.found_at) == len(self.behaviours):
                return f"every planted behaviour found and validated ({self.n_texts} texts)"
            plans, reason = self.policy.next_plans()
            if not plans:
                return reason

    async def _round(self, plans: list[Plan], reason: str) -> None:
        texts = await self._generate(plans)
        self.n_texts += len(texts)
        ordered = _interleave(texts, self.rng)
        X = await self._embed(ordered)
        for t, x in zip(ordered, X, strict=True):  # the controller consumes every embedding
            self.policy.observe_embedding(t.prompt_id, t.role, x, t.text_id, t.pair_id)
            self.truth[t.text_id] = (t.role, t.meta.get("behaviour"))
        if self.keep_texts:
            self.decoded += ordered
        if self.keep_vectors:
            self.vectors.append(X.astype(np.float16))
            self.text_ids += [t.text_id for t in ordered]
        step = self.cfg.bus.max_poll_records
        with self._clusterer_threads():
            for s in range(0, len(ordered), step):
                chunk = ordered[s:s + step]
                res = self.state.ingest_arrays(
                    [t.text_id for t in chunk], [t.prompt_id for t in chunk], [t.role for t in chunk],
                    [t.text for t in chunk], X[s:s + step])
                for ev in res.uncertainty:
                    self.policy.observe_uncertainty(ev)
                for cand in res.candidates:
                    await self._candidate(cand)
            self.policy.observe_snapshot(self.state.snapshot())
        validated = sum(1 for v in self.final.values() if v.decision == "validated")
        self.rounds.append(RoundRecord(self.policy.round, reason, self.n_texts, len(self.candidates),
                                       len(self.hypotheses), validated, sorted(self.found_at),
                                       len(self.state.engine.ids)))
        log.debug("round %d: %s", self.policy.round, self.rounds[-1])

    def _clusterer_threads(self) -> threadpool_limits:
        """BLAS threads for the clusterer's numpy/scipy work (``clusterer.threads``): on a small
        shared machine spin-waiting BLAS threads made the snapshot's PCA ~15x slower."""
        return threadpool_limits(self.cfg.clusterer.threads, user_api="blas")

    async def _generate(self, plans: list[Plan]) -> list[DecodedText]:
        """The controller service's paired requests, served by the generator."""
        self.generator.out = []
        for req in paired_requests(self.cfg.experiment_id, self.policy.round, plans):
            await self.generator.handle([Incoming(req, None, None)])  # type: ignore[arg-type]
        return self.generator.out

    async def _embed(self, texts: list[DecodedText]) -> np.ndarray:
        vecs, _ = await embed_with_cache(None, self.encoder, [t.text for t in texts])
        return vecs.astype(self.cfg.cache.vector_dtype).astype(np.float32)  # the cache's storage dtype

    async def _candidate(self, cand: CandidateCluster) -> None:
        assert self.cascade is not None
        self.candidates.append(cand)
        self.cluster_terms[cand.candidate_id] = self.state.top_terms(cand.cluster_id)  # label split only
        for h in await self.hypothesizer.hypotheses_for(cand):
            self.hypotheses.append(h)
            decisions = await self.cascade.validate(h)
            self.validations += decisions
            self.final[h.hypothesis_id] = decisions[-1]
            if decisions[-1].decision == "validated":
                self.policy.observe_explained(h.text_ids)
                await self._score(h, decisions[-1])

    async def _score(self, h: Hypothesis, v: Validation) -> None:
        """Ground truth of a finding (validated on held-out texts): does its text say a behaviour?"""
        if not self.behaviours or not is_finding(v.decision, v.auc):
            return
        m = (await self.ground_truth.match([h], truth=self.truth))[0]
        self.matches[h.hypothesis_id] = m
        if m.behaviour is not None and m.behaviour not in self.found_at:
            self.found_at[m.behaviour] = self.n_texts

    async def _close(self) -> None:
        if self.cascade is not None:
            await self.cascade.aclose()
        await self.generator.teardown()
        await self.hypothesizer.teardown()
        for svc in (self.generator, self.hypothesizer):
            await svc.producer.stop()


async def arun_experiment(cfg: Config, *, encoder: Encoder | None = None, until_all_found: bool = False,
                          keep_vectors: bool = False, keep_texts: bool = False,
                          policy_cls: type[SamplingPolicy] = SamplingPolicy) -> HarnessResult:
    """Async form of :func:`run_experiment` (for callers already in an event loop)."""
    cfg = cfg.model_copy(deep=True).resolve_ids()
    if encoder is None:
        from services.embedder.service import make_encoder

        encoder = await make_encoder(cfg.embedder)
    return await Harness(cfg, encoder, until_all_found=until_all_found, keep_vectors=keep_vectors,
                         keep_texts=keep_texts, policy_cls=policy_cls).run()


def run_experiment(cfg: Config, *, encoder: Encoder | None = None, until_all_found: bool = False,
                   keep_vectors: bool = False, keep_texts: bool = False,
                   policy_cls: type[SamplingPolicy] = SamplingPolicy) -> HarnessResult:
    """Run one experiment in process.

    The budget is ``controller.max_texts``; with ``until_all_found`` the run also stops once every
    planted behaviour has a finding (validated on held-out texts) whose text says it
    (services/groundtruth.py).  ``encoder``
    defaults to the configured embedder (``embedder.backend: hashing`` for the fast one).
    ``policy_cls`` swaps the controller's policy (benchmarks use it for an oracle ceiling).
    """
    return asyncio.run(arun_experiment(cfg, encoder=encoder, until_all_found=until_all_found,
                                       keep_vectors=keep_vectors, keep_texts=keep_texts, policy_cls=policy_cls))


def sim_config(*, seed: int = 0, null: bool = False, strategy: str = "active", max_texts: int = 20000,
               **sections: Any) -> Config:
    """A sim experiment config for tests and benchmarks; ``sections`` merge over the defaults."""
    from services.core.config import load_config

    sim = {"backend": "sim", "sim": {"identical": null}}
    over: dict[str, Any] = {
        "experiment": {"name": "harness", "id": f"harness-{seed}-{'null' if null else 'planted'}",
                       "seed": seed},
        "models": {"base": sim, "intervention": sim},
        "generator": {"seed": seed},
        "clusterer": {"seed": seed},
        "embedder": {"backend": "hashing"},
        "controller": {"strategy": strategy, "max_texts": max_texts},
    }
    for k, v in sections.items():
        over[k] = {**over.get(k, {}), **v}
    return load_config(None, environ={}, overrides=over)
