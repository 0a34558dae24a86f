"""Experiments for benchmarks and statistics tests: the shipped pipeline on the in-memory bus.

This is the thin layer that replaced ``services/harness.py``: it builds a config, runs
``services.orchestrator.run_memory_pipeline`` (``build_services`` on the MemoryBus, burst mode)
and reads the outcome off the bus's records in publish order: how many texts had been generated
when each planted behaviour was first matched by a validated finding, every candidate, hypothesis
and final decision.  Nothing of the pipeline is wired here.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.core.config import Config, PlantedBehaviour, load_config
from services.core.decision import rank, supersedes
from services.core.events import CandidateCluster, DecodedText, EmbeddedText, Hypothesis, Validation
from services.core.memory_bus import Record
from services.core.resources import Resources
from services.core.runtime import Service
from services.core.topics import Topics
from services.groundtruth import (
    ALL_KINDS,
    GroundTruthRule,
    TextTruth,
    cluster_purity,
    is_finding,
    match_by_text,
    planted_behaviours,
)
from services.orchestrator import MemoryRun, run_memory_pipeline

Matcher = Callable[[Hypothesis, dict[str, TextTruth], Config], str | None]


def default_redis_url() -> str:
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def sim_config(*, seed: int = 0, null: bool = False, strategy: str = "active", max_texts: int = 20000,
               **sections: Any) -> Config:
    """A sim experiment for tests and benchmarks (hashing embedder, no metrics endpoint, no live
    progress, a fresh key namespace, topic prefix and run directory per call); ``sections`` merge
    over it.  The experiment id is a function of the seed, the null flag and the strategy only:
    request, text and pair ids derive from it, and so do the memory bus's partitions and the label
    split, so the same arguments give the same run every time (a random id made runs of one seed
    differ in the order texts arrive, and a statistics test pass or fail by the draw)."""
    sim = {"backend": "sim", "sim": {"identical": null}}
    run = uuid.uuid4().hex[:8]
    over: dict[str, Any] = {
        "experiment": {"name": "bench", "id": f"bench-{seed}-{'null' if null else 'planted'}-{strategy}",
                       "seed": seed, "run_dir": f"/tmp/autointerv-bench-runs/{run}"},
        "bus": {"topic_prefix": f"b-{run}"},
        # a key namespace of its own (cleaned after the run); no vector cache: the hashing encoder is
        # faster than a Redis round trip, and thousands of runs would fill Redis with vectors
        "cache": {"namespace": f"b-{run}", "enabled": False},
        "observability": {"metrics_port": None, "progress": False},
        "models": {"base": sim, "intervention": sim},
        "generator": {"seed": seed},
        "clusterer": {"seed": seed},
        "embedder": {"backend": "hashing"},
        "controller": {"strategy": strategy, "max_texts": max_texts},
    }
    for k, v in sections.items():
        over[k] = {**over.get(k, {}), **v}
    return load_config(None, environ={}, overrides=over)


class MatchByMeaning:
    """Ground truth as the sink scores it (services/groundtruth.py): a finding matches a planted
    behaviour when its text says it (cosine in the bundled MiniLM >= ground_truth.match_threshold).
    The encoder is loaded once, at the first finding, and shared by every run given this matcher."""

    def __init__(self) -> None:
        self._rules: dict[tuple[float, tuple[str, ...]], GroundTruthRule] = {}

    def __call__(self, h: Hypothesis, truth: dict[str, TextTruth], cfg: Config) -> str | None:
        key = (cfg.ground_truth.match_threshold, tuple(b.name for b in planted_behaviours(cfg, ALL_KINDS)))
        rule = self._rules.get(key)
        if rule is None:  # one per threshold and planted set (a sim with styles plants more)
            rule = self._rules[key] = GroundTruthRule.from_config(cfg, encoder_factory=self._shared_encoder)
        return match_by_text([h], rule.behaviours, rule.encoder(), rule.threshold, truth)[0].behaviour

    def _shared_encoder(self) -> Any:
        if not hasattr(self, "_encoder"):
            from services.core.config import EmbedderConfig
            from services.embedder.encoder import load_encoder

            self._encoder = load_encoder(EmbedderConfig())
        return self._encoder


def match_by_purity(h: Hypothesis, truth: dict[str, TextTruth], cfg: Config) -> str | None:
    """The sim's own labels: the majority behaviour of the finding's cluster (a diagnostic)."""
    return cluster_purity(h, truth)[0]


@dataclass
class ExperimentResult:
    cfg: Config
    reason: str
    texts: int  # texts generated (both roles)
    candidates: list[CandidateCluster]
    hypotheses: list[Hypothesis]
    validations: list[Validation]
    final: dict[str, Validation]  # hypothesis id -> its deciding validation (services/core/decision.py)
    found_at: dict[str, int]  # behaviour -> texts generated when a finding first said it (groundtruth by meaning)
    matched: dict[str, str | None]  # finding's hypothesis id -> behaviour its text says (None: none)
    behaviours: list[PlantedBehaviour]
    run: MemoryRun
    vectors: np.ndarray | None = None  # every embedded text's vector, in publish order (keep_vectors)
    truth: dict[str, TextTruth] = field(default_factory=dict)

    @property
    def validated(self) -> list[Hypothesis]:
        """Findings: hypotheses validated on held-out texts."""
        return [h for h in self.hypotheses if (v := self.final.get(h.hypothesis_id)) and is_finding(v.decision, v.auc)]

    @property
    def all_found(self) -> bool:
        return all(b.name in self.found_at for b in self.behaviours)

    @property
    def clusterer_state(self) -> Any:
        return self.run.services["clusterer"].state  # type: ignore[attr-defined]


class _Observer:
    """Reads the pipeline's records as they are published (the bus calls it synchronously)."""

    def __init__(self, cfg: Config, behaviours: list[PlantedBehaviour], matcher: Matcher, keep_vectors: bool) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.bus.topic_prefix)
        self.behaviours = behaviours
        self.matcher = matcher
        self.keep_vectors = keep_vectors
        self.texts = 0
        self.truth: dict[str, TextTruth] = {}
        self.candidates: list[CandidateCluster] = []
        self.hypotheses: dict[str, Hypothesis] = {}
        self.validations: list[Validation] = []
        self.final: dict[str, Validation] = {}
        self.found_at: dict[str, int] = {}
        self.matched: dict[str, str | None] = {}
        self.vectors: list[np.ndarray] = []

    def __call__(self, rec: Record) -> None:
        logical = self.topics.logical(rec.topic)
        if logical == "texts":
            t = DecodedText.from_bytes(rec.value)
            self.texts += 1
            self.truth[t.text_id] = (t.role, t.meta.get("behaviour"))
        elif logical == "embeddings" and self.keep_vectors:
            self.vectors.append(EmbeddedText.from_bytes(rec.value).vector().astype(np.float16))
        elif logical == "candidates":
            self.candidates.append(CandidateCluster.from_bytes(rec.value))
        elif logical == "hypotheses":
            h = Hypothesis.from_bytes(rec.value)
            self.hypotheses.setdefault(h.hypothesis_id, h)
        elif logical == "validations":
            v = Validation.from_bytes(rec.value)
            self.validations.append(v)
            current = self.final.get(v.hypothesis_id)
            if supersedes(v, rank(current) if current is not None else None):  # the sink's rule
                self.final[v.hypothesis_id] = v
                self._score(v)

    def _score(self, v: Validation) -> None:
        """Ground truth of a hypothesis' final decision as it arrives.  A finding superseded by a
        later tier's rejection (a re-run) loses its match; ``found_at`` keeps when it was first said."""
        h = self.hypotheses.get(v.hypothesis_id) or v.hypothesis
        if h is None or not self.behaviours or not is_finding(v.decision, v.auc):
            self.matched.pop(v.hypothesis_id, None)
            return
        name = self.matcher(h, self.truth, self.cfg)
        self.matched[h.hypothesis_id] = name
        if name is not None and name not in self.found_at:
            self.found_at[name] = self.texts

    def all_found(self) -> bool:
        return bool(self.behaviours) and len(self.found_at) == len(self.behaviours)


async def arun(cfg: Config, *, redis_url: str | None = None, until_all_found: bool = False,
               matcher: Matcher | None = None, keep_vectors: bool = False, with_sink: bool = False,
               resources: Resources | None = None,
               replace: Mapping[str, type[Service]] | None = None) -> ExperimentResult:
    """Run one experiment on the memory bus.  ``until_all_found`` stops once every planted behaviour
    has a matching validated finding; the sink (run directory, report) runs only ``with_sink``.
    Pass one ``resources`` to many runs so the embedding model is loaded once."""
    behaviours = planted_behaviours(cfg, ALL_KINDS)
    obs = _Observer(cfg, behaviours, matcher or MatchByMeaning(), keep_vectors)
    until = obs.all_found if until_all_found and behaviours else None
    run = await run_memory_pipeline(cfg, redis_url or default_redis_url(), until=until, observers=[obs],
                                    exclude=() if with_sink else ("sink",), resources=resources, replace=replace)
    await _clean_state(cfg, redis_url or default_redis_url())
    return ExperimentResult(
        cfg=cfg, reason=run.reason, texts=obs.texts, candidates=obs.candidates,
        hypotheses=list(obs.hypotheses.values()), validations=obs.validations, final=obs.final,
        found_at=obs.found_at, matched=obs.matched, behaviours=behaviours, run=run,
        vectors=np.stack(obs.vectors) if obs.vectors else None, truth=obs.truth)


def run(cfg: Config, **kwargs: Any) -> ExperimentResult:
    return asyncio.run(arun(cfg, **kwargs))


async def _clean_state(cfg: Config, redis_url: str) -> None:
    """Delete the run's per-experiment keys (the embedding cache, shared across runs, stays)."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    try:
        pattern = f"{cfg.cache.namespace}:*{cfg.experiment_id}*"  # the embedding cache has no experiment id
        batch: list[bytes] = []
        async for key in r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await r.delete(*batch)
                batch = []
        if batch:
            await r.delete(*batch)
    finally:
        await r.aclose()
