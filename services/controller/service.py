"""Controller service: plans paired generation rounds, closes them, and ends the experiment.

A round goes through three gates before the next one is planned:

1. **generated**: a :class:`GenerationReport` has arrived for every request of the round, so the
   number of texts produced is known exactly (failed and exhausted prompts are counted, not
   waited for);
2. **arrived**: the controller publishes ``RoundClosed(expected_texts)`` on the control topic; the
   clusterer answers with a barrier snapshot once every one of those texts has reached it, and the
   controller has observed their embeddings itself (its contrast index);
3. **settled**: every candidate the barrier snapshot counts has all its hypotheses decided, and
   the paired-contrast service (``paired.enabled``) has answered the round with a ``PairedRound``
   whose hypotheses are decided too (with ``controller.wait_for_decisions``).

So every plan is made from the same evidence on every run of a config: with one partition per
topic, a run on the Kafka broker and a run on the in-memory bus make the same plans
(tests/test_memory_bus_parity.py).  What has not arrived after ``round_timeout_s`` counts as lost;
a run that loses more than ``max_lost_share`` of its texts stops.

The round's plan is saved to Redis *before* its requests are emitted, so a crash between the two
re-emits the same requests (same ids, so the same texts) and never plans a second round on the
same budget.  The tallies the gates need are saved with the state before offsets are committed.
When generation stops (budget, data exhausted, stable, wall time, lost texts), the controller says
so on the control topic (``stopping``: the paired-contrast service proposes once more from every
label pair and answers with a final ``PairedRound``), waits for the last decisions and publishes
``finished`` on the control topic with the reason and counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import orjson
from aiokafka import TopicPartition
from redis.asyncio import Redis

from services.controller.policy import (
    Plan,
    SamplingPolicy,
    paired_requests,
    plan_from_dict,
    plan_to_dict,
    rerun_seed_key,
)
from services.core.config import sim_settings
from services.core.decision import rank, supersedes
from services.core.events import (
    CandidateCluster,
    ClusterSnapshot,
    ControlEvent,
    EmbeddedText,
    GenerationReport,
    GenerationRequest,
    Hypothesis,
    PairedRound,
    UncertaintyEvent,
    Validation,
)
from services.core.runtime import Incoming, Service, ServiceContext
from services.core.state import expire_state
from services.generator.prompts import load_prompts

STATE_VERSION = 2


@dataclass
class ControllerState:
    """Everything a restarted controller needs to carry on (saved as JSON in Redis)."""

    round: int = 0
    texts_planned: int = 0
    phase: str = "planning"  # planning -> generating -> arriving -> settling -> planning ... -> done
    phase_since: float = 0.0
    emitted: bool = True  # False between saving a round's plan and emitting its requests
    plans: list[dict[str, Any]] = field(default_factory=list)  # the current round's plans (re-emitted on resume)
    requests: dict[str, int] = field(default_factory=dict)  # request id -> round, every request so far
    reports: dict[str, int] = field(default_factory=dict)  # request id -> texts produced
    failed: int = 0  # prompts x samples that produced nothing
    exhausted: int = 0  # of them, replayed data that ran out
    lost: int = 0  # texts that never reached the clusterer before a round timed out
    expected: int = 0  # texts produced in closed rounds (the last RoundClosed)
    barrier: int = -1  # last round whose barrier snapshot arrived
    barrier_candidates: int = 0
    barrier_uncertainty: int = 0
    candidates: list[str] = field(default_factory=list)
    hypotheses: dict[str, list[Any]] = field(default_factory=dict)  # id -> [candidate id, siblings]
    decisions: dict[str, str] = field(default_factory=dict)  # hypothesis id -> final decision
    decided_by: dict[str, Any] = field(default_factory=dict)  # hypothesis id -> rank of the deciding validation
    uncertainty: int = 0
    paired_round: int = -1  # last round the paired-contrast service answered (PairedRound)
    paired_final: bool = False  # it answered ``stopping`` (its last proposals are announced)
    stopped_because: str = ""
    stop_reason: str = ""
    finished_sent: bool = False
    rounds: list[dict[str, Any]] = field(default_factory=list)
    version: int = STATE_VERSION

    def produced(self, upto_round: int | None = None) -> int:
        return sum(n for rid, n in self.reports.items()
                   if upto_round is None or self.requests.get(rid, 0) <= upto_round)


class ControllerService(Service):
    name: ClassVar[str] = "controller"
    consumes = (EmbeddedText, GenerationReport, ClusterSnapshot, UncertaintyEvent, CandidateCluster, Hypothesis,
                Validation, PairedRound)
    produces = (GenerationRequest, ControlEvent)
    origin = True
    tick_interval_s: ClassVar[float] = 0.5
    policy_class: ClassVar[type[SamplingPolicy]] = SamplingPolicy  # benchmarks swap in an oracle

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.redis: Redis | None = None
        self.st = ControllerState()
        self.policy: SamplingPolicy | None = None
        self.observed: set[str] = set()  # embeddings seen by this process (the contrast index's texts)
        self.uncertainty_seen: set[str] = set()
        self.resumed = False
        self.dirty = False
        self.started = 0.0
        self.clustered = 0  # n_seen of the latest snapshot (progress display)

    # ------------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        self.redis = self.ctx.redis()
        self.k_state = f"{self.cfg.cache.namespace}:controller:{self.ctx.experiment_id}"
        prompts = load_prompts(self.cfg.prompts, sim_settings(self.cfg.models.intervention))
        from services.generator.backends.replay import pair_inventory

        inventory = pair_inventory({"base": self.cfg.models.base, "intervention": self.cfg.models.intervention})
        self.policy = self.policy_class(self.cfg.controller, prompts, seed=self.cfg.experiment.seed,
                                        inventory=inventory)
        self.started = self.clock.time()
        m = self.metrics
        self.m_round = m.gauge("controller_round", "Current sampling round", ["service"])
        self.m_planned = m.gauge("controller_texts_planned", "Texts requested (both roles)", ["service"])
        self.m_lost = m.gauge("controller_texts_lost", "Texts that never reached the clusterer", ["service"])
        self.m_failed = m.gauge("controller_texts_failed", "Requested texts the generators could not produce",
                                ["service"])
        self.m_hot = m.gauge("controller_hot_texts", "Texts only one model's texts surround", ["service"])
        self.m_modes = m.gauge("controller_open_modes", "Groups of hot texts still earning targeting", ["service"])
        saved = await self.redis.get(self.k_state)
        if saved:
            self._restore(orjson.loads(saved))
        else:
            await self._start_round(self.policy.initial_plans(), "initial sample")

    def _restore(self, raw: dict[str, Any]) -> None:
        if raw.get("version") != STATE_VERSION:
            raise RuntimeError(f"controller state {self.k_state} has version {raw.get('version')}, expected "
                               f"{STATE_VERSION}: use a new experiment id (or `autointerv clean`)")
        self.st = ControllerState(**raw)
        assert self.policy is not None
        self.policy.round, self.policy.texts_planned = self.st.round, self.st.texts_planned
        self.resumed = True  # the contrast index restarts empty: own-observation counts are not required
        self.log.info("resumed controller state", extra={"round": self.st.round, "phase": self.st.phase,
                                                         "texts_planned": self.st.texts_planned})

    async def teardown(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    # ------------------------------------------------------------------ events

    async def handle(self, batch: list[Incoming]) -> None:
        st, policy = self.st, self.policy
        assert policy is not None
        for item in batch:
            ev = item.event
            if isinstance(ev, EmbeddedText):
                if ev.text_id not in self.observed:
                    self.observed.add(ev.text_id)
                    policy.observe_embedding(ev.prompt_id, ev.role, ev.vector(), ev.text_id, ev.pair_id)
                continue
            self.dirty = True
            if isinstance(ev, GenerationReport):
                if ev.request_id not in st.reports:
                    st.reports[ev.request_id] = ev.texts
                    st.failed += sum(1 for _ in ev.failures)
                    st.exhausted += sum(1 for f in ev.failures if f.exhausted)
            elif isinstance(ev, ClusterSnapshot):
                self.clustered = max(self.clustered, ev.n_seen)
                if ev.barrier_round is not None and ev.barrier_round > st.barrier:
                    st.barrier, st.barrier_candidates = ev.barrier_round, ev.n_candidates
                    st.barrier_uncertainty = ev.n_uncertainty
                    st.lost = max(st.lost, st.expected - ev.n_arrived)
                    policy.observe_snapshot(ev)
            elif isinstance(ev, UncertaintyEvent) and ev.uncertainty_id not in self.uncertainty_seen:
                self.uncertainty_seen.add(ev.uncertainty_id)  # a rewound batch comes again
                st.uncertainty += 1
                policy.observe_uncertainty(ev)
            elif isinstance(ev, CandidateCluster):
                if ev.candidate_id not in st.candidates:
                    st.candidates.append(ev.candidate_id)
            elif isinstance(ev, Hypothesis):
                st.hypotheses.setdefault(ev.hypothesis_id, [ev.candidate_id, ev.siblings])
            elif isinstance(ev, PairedRound):
                st.paired_round = max(st.paired_round, ev.round)
                st.paired_final = st.paired_final or ev.final
                for hid in ev.hypothesis_ids:  # they may arrive after their announcement
                    st.hypotheses.setdefault(hid, [f"paired:{self.ctx.experiment_id}", 1])
            elif isinstance(ev, Validation) and supersedes(ev, st.decided_by.get(ev.hypothesis_id)):
                st.decisions[ev.hypothesis_id] = ev.decision
                st.decided_by[ev.hypothesis_id] = rank(ev)
                # a paired finding is about every answer, not some texts: nothing it explains to skip
                if ev.decision == "validated" and ev.hypothesis is not None and ev.hypothesis.kind != "paired":
                    policy.observe_explained(ev.hypothesis.text_ids)

    async def before_commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int] | None:
        """Committed offsets never run ahead of the saved tallies (a restart does not recount)."""
        if self.dirty:
            await self._save()
        return offsets

    # ------------------------------------------------------------------ the round gates

    async def tick(self) -> None:
        st, c = self.st, self.cfg.controller
        assert self.policy is not None
        self._gauges()
        if not st.emitted:  # a crash came between saving a round's plan and emitting it
            await self._emit_round()
        if st.phase == "done":
            return
        now = self.clock.time()
        waited = now - st.phase_since
        if st.phase == "generating":
            mine = [rid for rid, r in st.requests.items() if r == st.round]
            missing = [rid for rid in mine if rid not in st.reports]
            if missing and waited < c.round_timeout_s:
                return
            if missing:
                st.lost += self._planned_texts(missing)
                self.log.warning("generation reports missing; counting their texts as lost",
                                 extra={"round": st.round, "requests": len(missing)})
            await self._close_round(force=False)
        elif st.phase == "arriving":
            observed_all = self.resumed or len(self.observed) >= st.expected
            if st.barrier >= st.round and observed_all and st.uncertainty >= st.barrier_uncertainty:
                self._enter("settling")
            elif waited >= c.round_timeout_s:
                if st.barrier < st.round:
                    await self._close_round(force=True)  # the clusterer snapshots with what it has
                    self._enter("arriving_forced")
                else:
                    self._enter("settling")
        elif st.phase == "arriving_forced" and (st.barrier >= st.round or waited >= c.round_timeout_s):
            if not self.resumed:
                st.lost = max(st.lost, st.expected - len(self.observed))
            self._enter("settling")
        if st.phase == "settling":
            if self._settled() or waited >= c.settle_timeout_s or not c.wait_for_decisions:
                await self._next_round()
        elif st.phase == "stopping" and (self._settled(final=True) or waited >= c.settle_timeout_s):
            await self._finish()

    def _settled(self, final: bool = False) -> bool:
        """Every candidate the barrier counted has all its hypotheses, each with a final decision
        (at the end: every hypothesis seen), and the paired-contrast service, when it runs, has
        answered the round (its hypotheses are then among those seen)."""
        st = self.st
        if self.cfg.paired.enabled and (st.paired_round < st.round or (final and not st.paired_final)):
            return False
        if not final and len(st.candidates) < st.barrier_candidates:
            return False
        per: dict[str, int] = {}
        for cand, _ in st.hypotheses.values():
            per[cand] = per.get(cand, 0) + 1
        complete = all(per.get(cand, 0) >= sib for cand, sib in st.hypotheses.values())
        labelled = all(cand in per for cand in st.candidates)
        return complete and labelled and all(h in st.decisions for h in st.hypotheses)

    async def _close_round(self, force: bool) -> None:
        st = self.st
        st.expected = st.produced()
        self._enter("arriving")
        await self.emit(ControlEvent(experiment_id=self.ctx.experiment_id, kind="round_closed", round=st.round,
                                     expected_texts=st.expected, force=force))
        self.dirty = True

    async def _next_round(self) -> None:
        st, c = self.st, self.cfg.controller
        assert self.policy is not None
        produced = st.produced()
        if produced and st.lost > c.max_lost_share * produced:
            await self._stop_generation("lost_texts", f"{st.lost} of {produced} texts never reached the clusterer "
                                           f"(more than {c.max_lost_share:.0%})")
            return
        if c.max_wall_s and self.clock.time() - self.started > c.max_wall_s:
            await self._stop_generation("wall_time", f"wall-clock limit {c.max_wall_s:.0f}s reached")
            return
        plans, reason = self.policy.next_plans()
        if not plans:
            await self._stop_generation(self.policy.stopped_because or "budget", reason)
            return
        await self._start_round(plans, reason)

    async def _start_round(self, plans: list[Plan], reason: str) -> None:
        """Save the plan, then emit it (see the module docstring)."""
        st = self.st
        assert self.policy is not None
        st.round, st.texts_planned = self.policy.round, self.policy.texts_planned
        st.plans = [plan_to_dict(p) for p in plans]
        for req in paired_requests(self.ctx.experiment_id, st.round, plans):
            st.requests[req.request_id] = st.round
        st.emitted = False
        texts = sum(2 * p.texts_per_role for p in plans)
        st.rounds.append({"round": st.round, "reason": reason, "texts": texts, "requests": 2 * len(plans),
                          "texts_planned": st.texts_planned, "at": self.clock.time()})
        self._enter("generating")
        self.log.info("round planned", extra=st.rounds[-1])
        await self._emit_round()

    async def _emit_round(self) -> None:
        """Emit the current round's requests, but only once its plan is saved: a crash (or a Redis
        error) before the save re-plans from the last saved state; one after it re-emits the same
        requests.  Either way no round is paid for twice."""
        st = self.st
        await self._save()
        plans = [plan_from_dict(p) for p in st.plans]
        for req in paired_requests(self.ctx.experiment_id, st.round, plans, rerun_seed_key(self.cfg.experiment)):
            await self.emit(req)
        await self.producer.flush()
        st.emitted = True
        await self._save()

    async def _stop_generation(self, because: str, reason: str) -> None:
        st = self.st
        st.stopped_because, st.stop_reason = because, reason
        st.rounds.append({"round": st.round, "reason": f"stop: {reason}", "texts": 0,
                          "texts_planned": st.texts_planned, "at": self.clock.time()})
        self.log.info("generation stopped", extra={"because": because, "reason": reason,
                                                   "texts": st.texts_planned})
        self._enter("stopping")
        await self.emit(ControlEvent(experiment_id=self.ctx.experiment_id, kind="stopping", round=st.round,
                                     expected_texts=st.produced(), stopped_because=because, detail=reason))
        await self._save()

    async def _finish(self) -> None:
        st = self.st
        await self.emit(ControlEvent(
            experiment_id=self.ctx.experiment_id, kind="finished", round=st.round,
            stopped_because=st.stopped_because, detail=st.stop_reason, counts=self.counts()))
        await self.producer.flush()
        st.finished_sent = True
        self._enter("done")
        await self._save()

    def counts(self) -> dict[str, int]:
        st = self.st
        return {"rounds": st.round + 1, "planned": st.texts_planned, "produced": st.produced(),
                "failed": st.failed, "exhausted": st.exhausted, "lost": st.lost, "candidates": len(st.candidates),
                "hypotheses": len(st.hypotheses), "decided": len(st.decisions),
                "validated": sum(1 for d in st.decisions.values() if d == "validated")}

    def _enter(self, phase: str) -> None:
        self.st.phase, self.st.phase_since = phase, self.clock.time()
        self.dirty = True

    def _planned_texts(self, request_ids: list[str]) -> int:
        """Texts the given requests asked for (from the current round's plans)."""
        plans = [plan_from_dict(p) for p in self.st.plans]
        per_request = {req.request_id: plans[i // 2].texts_per_role for i, req in
                       enumerate(paired_requests(self.ctx.experiment_id, self.st.round, plans))}
        return sum(per_request.get(r, 0) for r in request_ids)

    async def _save(self) -> None:
        assert self.redis is not None
        await self.redis.set(self.k_state, orjson.dumps(asdict(self.st)))
        await expire_state(self.redis, self.cfg, self.k_state)
        self.dirty = False

    def _gauges(self) -> None:
        st = self.st
        self.m_planned.labels(self.name).set(st.texts_planned)
        self.m_round.labels(self.name).set(st.round)
        self.m_lost.labels(self.name).set(st.lost)
        self.m_failed.labels(self.name).set(st.failed)
        view = self.policy.last_view if self.policy is not None else None
        if view is not None:
            c = self.cfg.controller.contrast
            self.m_hot.labels(self.name).set(int(view.hot.sum()))
            self.m_modes.labels(self.name).set(view.open_modes(c.saturation_texts, c.min_mode_texts))

    # ------------------------------------------------------------------ for the process

    def finished(self) -> bool:
        return self.st.finished_sent

    def progress(self) -> dict[str, object]:
        st = self.st
        return {"round": st.round, "planned": st.texts_planned, "produced": st.produced(),
                "clustered": self.clustered, "candidates": len(st.candidates), "hypotheses": len(st.hypotheses),
                "validated": sum(1 for d in st.decisions.values() if d == "validated"),
                "decided": len(st.decisions), "failed": st.failed, "lost": st.lost, "phase": st.phase,
                "stopped_because": st.stopped_because, "stop_reason": st.stop_reason,
                "budget": self.cfg.controller.max_texts}
