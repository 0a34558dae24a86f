"""Controller service: seeds the experiment, runs active-sampling rounds, and ends the run.

It consumes embeddings (for the per-text contrast index), cluster snapshots, uncertainty events,
candidates, hypotheses and validations; it produces paired generation requests (one per role with
the same prompts).  A new round starts once the previous rounds' texts have reached the clusterer.
The run is finished when generation has stopped, every text has been clustered, and every
hypothesis has a final decision (or nothing has moved for ``idle_finish_s``, or ``max_wall_s``
passed).  Progress (round, texts planned) is kept in Redis so a restarted controller resumes
instead of re-seeding.
"""

from __future__ import annotations

import time
from typing import ClassVar

import orjson

from services.controller.policy import Plan, SamplingPolicy, paired_requests, rerun_seed_key
from services.core.events import (
    CandidateCluster,
    ClusterSnapshot,
    EmbeddedText,
    Hypothesis,
    UncertaintyEvent,
    Validation,
)
from services.core.runtime import Incoming, Service
from services.core.state import expire_state
from services.generator.prompts import load_prompts

ROUND_READY_FRACTION = 0.9  # share of planned texts clustered before the next round is planned


class ControllerService(Service):
    name: ClassVar[str] = "controller"
    consumes = (EmbeddedText, ClusterSnapshot, UncertaintyEvent, CandidateCluster, Hypothesis, Validation)
    tick_interval_s: ClassVar[float] = 0.5

    async def setup(self) -> None:
        self.redis = self.ctx.redis()
        self.k_state = f"{self.cfg.cache.namespace}:controller:{self.ctx.experiment_id}"
        prompts = load_prompts(self.cfg.prompts, self.cfg.models.intervention.sim)
        self.policy = SamplingPolicy(self.cfg.controller, prompts, seed=self.cfg.experiment.seed)
        self.started = time.time()
        self.n_clustered = 0
        self.candidates: set[str] = set()
        self.hypotheses: dict[str, str] = {}  # hypothesis id -> candidate id
        self.hypothesis_texts: dict[str, list[str]] = {}  # hypothesis id -> its cluster's text ids
        self.final: dict[str, str] = {}  # hypothesis id -> decision
        self.last_change = time.time()
        self.generation_done = False
        self.stop_reason = ""
        self.rounds: list[dict[str, object]] = []
        self.m_round = self.metrics.gauge("controller_round", "Current sampling round", ["service"])
        self.m_planned = self.metrics.gauge("controller_texts_planned", "Texts requested (both roles)", ["service"])
        self.m_hot = self.metrics.gauge("controller_hot_texts", "Texts only one model's texts surround", ["service"])
        self.m_modes = self.metrics.gauge("controller_open_modes", "Groups of hot texts still earning targeting",
                                          ["service"])
        saved = await self.redis.get(self.k_state)
        if saved:
            st = orjson.loads(saved)
            self.policy.round, self.policy.texts_planned = st["round"], st["texts_planned"]
            self.generation_done, self.stop_reason = st["generation_done"], st["stop_reason"]
            self.rounds = st.get("rounds", [])
            self.log.info("resumed controller state", extra=st)
        else:
            await self._send(self.policy.initial_plans(), "initial sample")

    async def handle(self, batch: list[Incoming]) -> None:
        for item in batch:
            ev = item.event
            if isinstance(ev, EmbeddedText):
                self.policy.observe_embedding(ev.prompt_id, ev.role, ev.vector(), ev.text_id, ev.pair_id)
                continue
            if isinstance(ev, ClusterSnapshot):
                if ev.n_seen > self.n_clustered:
                    self.n_clustered = ev.n_seen
                    self.last_change = time.time()
                self.policy.observe_snapshot(ev)
                continue
            self.last_change = time.time()
            if isinstance(ev, UncertaintyEvent):
                self.policy.observe_uncertainty(ev)
            elif isinstance(ev, CandidateCluster):
                self.candidates.add(ev.candidate_id)
            elif isinstance(ev, Hypothesis):
                self.hypotheses[ev.hypothesis_id] = ev.candidate_id
                self.hypothesis_texts[ev.hypothesis_id] = ev.text_ids
            elif isinstance(ev, Validation) and ev.decision != "escalated":
                self.final[ev.hypothesis_id] = ev.decision
                texts = self.hypothesis_texts.pop(ev.hypothesis_id, [])
                if ev.decision == "validated":
                    self.policy.observe_explained(texts)

    async def tick(self) -> None:
        self.m_planned.labels(self.name).set(self.policy.texts_planned)
        if self.generation_done:
            return
        if self.cfg.controller.max_wall_s and time.time() - self.started > self.cfg.controller.max_wall_s:
            await self._stop_generation(f"wall-clock limit {self.cfg.controller.max_wall_s:.0f}s reached")
            return
        if self.n_clustered < ROUND_READY_FRACTION * self.policy.texts_planned:
            return
        plans, reason = self.policy.next_plans()
        if not plans:
            await self._stop_generation(reason)
            return
        await self._send(plans, reason)

    async def _send(self, plans: list[Plan], reason: str) -> None:
        rnd = self.policy.round
        for req in paired_requests(self.ctx.experiment_id, rnd, plans, rerun_seed_key(self.cfg.experiment)):
            await self.emit(req)
        texts = sum(2 * p.texts_per_role for p in plans)
        self.rounds.append({"round": rnd, "reason": reason, "texts": texts, "requests": 2 * len(plans),
                            "texts_planned": self.policy.texts_planned, "at": time.time()})
        self.m_round.labels(self.name).set(rnd)
        view = self.policy.last_view
        if view is not None:
            self.m_hot.labels(self.name).set(int(view.hot.sum()))
            c = self.cfg.controller.contrast
            self.m_modes.labels(self.name).set(view.open_modes(c.saturation_texts, c.min_mode_texts))
        self.log.info("round planned", extra=self.rounds[-1])
        await self._save()

    async def _stop_generation(self, reason: str) -> None:
        self.generation_done = True
        self.stop_reason = reason
        self.rounds.append({"round": self.policy.round, "reason": f"stop: {reason}", "texts": 0,
                            "texts_planned": self.policy.texts_planned, "at": time.time()})
        self.log.info("generation stopped", extra={"reason": reason, "texts": self.policy.texts_planned})
        await self._save()

    async def _save(self) -> None:
        await self.redis.set(self.k_state, orjson.dumps({
            "round": self.policy.round, "texts_planned": self.policy.texts_planned,
            "generation_done": self.generation_done, "stop_reason": self.stop_reason, "rounds": self.rounds,
        }))
        await expire_state(self.redis, self.cfg, self.k_state)

    def finished(self) -> bool:
        """True once generation stopped and everything downstream has settled."""
        if not getattr(self, "generation_done", False):
            return False
        idle = time.time() - self.last_change
        if idle > self.cfg.controller.idle_finish_s:
            return True
        all_clustered = self.n_clustered >= self.policy.texts_planned
        decided = all(h in self.final for h in self.hypotheses)
        labelled = all(c in set(self.hypotheses.values()) for c in self.candidates)
        return all_clustered and decided and labelled and idle > 2.0

    def progress(self) -> dict[str, object]:
        if not hasattr(self, "policy"):  # before setup() finished
            return {}
        return {"round": self.policy.round, "planned": self.policy.texts_planned, "clustered": self.n_clustered,
                "candidates": len(self.candidates), "hypotheses": len(self.hypotheses),
                "validated": sum(1 for d in self.final.values() if d == "validated"),
                "decided": len(self.final), "stop_reason": self.stop_reason}

    async def teardown(self) -> None:
        if getattr(self, "redis", None) is not None:
            await self.redis.aclose()
