"""Clusterer service: embedded texts in; snapshots, uncertainty events and candidates out.

All state lives in :class:`ClusterState`.  The service persists ``state.to_bytes()`` together with
the consumed offsets to Redis every ``snapshot_every_n`` texts or ``snapshot_every_s`` seconds and
only then commits those offsets to Kafka, so committed offsets never run ahead of persisted state.
After a crash it restores the snapshot and the consumer resumes at the committed offsets; events
between the snapshot and the crash are re-delivered and deduplicated by text id (no double
counting, no gap).  Texts are keyed by experiment id, so one clusterer instance owns an
experiment's stream; replicas of the group serve other experiments.
"""

from __future__ import annotations

from typing import ClassVar

import orjson
from aiokafka import TopicPartition
from redis.asyncio import Redis
from threadpoolctl import threadpool_limits

from services.clusterer.state import ClusterState
from services.core.events import CandidateCluster, ClusterSnapshot, ControlEvent, EmbeddedText, UncertaintyEvent
from services.core.runtime import Incoming, Service, ServiceContext
from services.core.state import expire_in_pipeline


class ClustererService(Service):
    name: ClassVar[str] = "clusterer"
    consumes = (EmbeddedText, ControlEvent)
    produces = (ClusterSnapshot, UncertaintyEvent, CandidateCluster)
    tick_interval_s: ClassVar[float] = 0.5

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.redis: Redis | None = None

    async def setup(self) -> None:
        self.redis = self.ctx.redis()
        self.k_state = f"{self.cfg.cache.namespace}:clusterer:{self.ctx.experiment_id}:state"
        self.k_offsets = f"{self.cfg.cache.namespace}:clusterer:{self.ctx.experiment_id}:offsets"
        self.k_pending = f"{self.cfg.cache.namespace}:clusterer:{self.ctx.experiment_id}:pending"
        self.pending: dict[str, tuple[EmbeddedText, int]] = {}
        self.arrivals = 0
        self.barrier: ControlEvent | None = None  # the latest RoundClosed not yet answered
        self.n_orphans = 0
        self.n_uncertainty = 0
        raw_pending = await self.redis.get(self.k_pending)
        if raw_pending:
            saved = orjson.loads(raw_pending)
            self.arrivals = saved["arrivals"]
            self.pending = {e["pair_id"]: (EmbeddedText.model_validate(e), at) for e, at in saved["items"]}
            self.n_orphans, self.n_uncertainty = saved.get("orphans", 0), saved.get("uncertainty", 0)
            if saved.get("barrier"):
                self.barrier = ControlEvent.model_validate(saved["barrier"])
        raw = await self.redis.get(self.k_state)
        if raw:
            self.state = ClusterState.from_bytes(raw, self.cfg.clusterer)
            self.log.info("restored clusterer snapshot", extra={"n_seen": int(self.state.role_totals.sum())})
        else:
            self.state = ClusterState(self.cfg.clusterer, self.ctx.experiment_id, alpha=self.cfg.validator.alpha)
        self.uncommitted: dict[TopicPartition, int] = {}
        self.since_save = 0
        self.last_save = self.clock.monotonic()
        self.last_emitted_n = -1
        self.last_emit = float("-inf")
        m = self.metrics
        self.m_texts = m.counter("clusterer_texts_total", "Texts ingested (new / duplicate)", ["kind"])
        self.m_k = m.gauge("clusterer_clusters", "Active clusters", ["service"])
        self.m_cand = m.counter("clusterer_candidates_total", "Divergent-cluster candidates", ["service"])
        self.m_unc = m.counter("clusterer_uncertainty_total", "Uncertainty events", ["kind"])
        self.m_sil = m.gauge("clusterer_silhouette", "Silhouette on the reservoir sample", ["service"])
        self.m_pending = m.gauge("clusterer_unpaired_texts", "Texts waiting for their pair partner", ["service"])
        self.m_state_bytes = m.gauge("clusterer_state_bytes", "Size of the persisted snapshot", ["service"])

    async def handle(self, batch: list[Incoming]) -> None:
        for i in batch:
            ev = i.event
            if isinstance(ev, ControlEvent) and ev.kind == "round_closed" and (
                    self.barrier is None or (ev.round, ev.force) > (self.barrier.round, self.barrier.force)):
                self.barrier = ev
        items = [i.event for i in batch if isinstance(i.event, EmbeddedText)]
        if items:
            with threadpool_limits(self.cfg.clusterer.threads):  # BLAS threads spin against torch's on few cores
                res = self.state.ingest(self._pair_up(items))
            self.since_save += res.n_new
            self.m_texts.labels("new").inc(res.n_new)
            self.m_texts.labels("duplicate").inc(res.n_duplicates)
            await self._emit_found(res.uncertainty, res.candidates)
        await self._answer_barrier()

    async def _emit_found(self, uncertainty: list[UncertaintyEvent], candidates: list[CandidateCluster]) -> None:
        for ev in uncertainty:
            await self.emit(ev)
            self.n_uncertainty += 1
            self.m_unc.labels(ev.kind).inc()
        for cand in candidates:
            await self.emit(cand)
            self.m_cand.labels(self.name).inc()

    @property
    def n_arrived(self) -> int:
        return int(self.state.role_totals.sum()) + len(self.pending) + self.n_orphans

    async def _answer_barrier(self) -> None:
        """Once every text of the closed round has arrived (or the controller forces it), texts of
        that round still waiting for a partner are orphans (their partner was never produced) and
        are dropped from the share test; then a barrier snapshot is emitted."""
        b = self.barrier
        if b is None or (self.n_arrived < b.expected_texts and not b.force):
            return
        orphans = [pid for pid, (ev, _) in self.pending.items() if ev.round <= b.round]
        for pid in orphans:
            del self.pending[pid]
        self.n_orphans += len(orphans)
        checkpoint = getattr(self.state, "checkpoint", None)
        if checkpoint is not None:  # candidates and uncertainty due at this position of the stream
            res = checkpoint()
            await self._emit_found(res.uncertainty, res.candidates)
        await self._emit_snapshot(barrier_round=b.round)
        self.barrier = None
        self.since_save = self.cfg.clusterer.snapshot_every_n  # save (and commit) with this batch

    def _pair_up(self, items: list[EmbeddedText]) -> list[EmbeddedText]:
        """Release texts pair by pair, each pair in an order fixed by its id (see pair_wait_texts)."""
        ready: list[EmbeddedText] = []
        for ev in items:
            if not ev.pair_id or self.state.has_seen(ev.text_id):
                ready.append(ev)  # unpaired source, or a re-delivery the state will dedupe
                continue
            waiting = self.pending.pop(ev.pair_id, None)
            if waiting is None:
                self.pending[ev.pair_id] = (ev, self.arrivals)
            elif waiting[0].text_id == ev.text_id:
                self.pending[ev.pair_id] = waiting  # the same text re-delivered
            else:
                pair = [waiting[0], ev]
                ready += pair[::-1] if int(ev.pair_id[:8] or "0", 16) & 1 else pair
            self.arrivals += 1
        limit = self.cfg.clusterer.pair_wait_texts
        expired = [pid for pid, (_, at) in self.pending.items() if self.arrivals - at > limit]
        for pid in expired:
            ready.append(self.pending.pop(pid)[0])
        self.m_pending.labels(self.name).set(len(self.pending))
        return ready

    async def before_commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int] | None:
        self.uncommitted.update(offsets)
        c = self.cfg.clusterer
        if self.since_save >= c.snapshot_every_n or self.clock.monotonic() - self.last_save >= c.snapshot_every_s:
            return await self._save()
        return None

    async def _save(self) -> dict[TopicPartition, int] | None:
        """Persist state + offsets atomically; return the offsets that may now be committed."""
        data = self.state.to_bytes()
        offsets = {f"{tp.topic}:{tp.partition}": off for tp, off in self.uncommitted.items()}
        pending = {"arrivals": self.arrivals, "orphans": self.n_orphans, "uncertainty": self.n_uncertainty,
                   "barrier": self.barrier.model_dump(mode="json") if self.barrier is not None else None,
                   "items": [(e.model_dump(mode="json"), at) for e, at in self.pending.values()]}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.k_state, data)
        pipe.set(self.k_offsets, orjson.dumps(offsets))
        pipe.set(self.k_pending, orjson.dumps(pending))
        expire_in_pipeline(pipe, self.cfg, self.k_state, self.k_offsets, self.k_pending)
        await pipe.execute()
        self.m_state_bytes.labels(self.name).set(len(data))
        self.since_save = 0
        self.last_save = self.clock.monotonic()
        committed, self.uncommitted = self.uncommitted, {}
        return committed or None

    async def tick(self) -> None:
        await self._answer_barrier()  # a forced barrier, or one whose texts all arrived before it
        n = int(self.state.role_totals.sum())
        if n != self.last_emitted_n and self.clock.monotonic() - self.last_emit >= self.cfg.clusterer.snapshot_every_s:
            await self._emit_snapshot()
        if self.uncommitted and self.clock.monotonic() - self.last_save >= self.cfg.clusterer.snapshot_every_s:
            offsets = await self._save()
            if offsets:
                await self.commit(offsets)

    async def _emit_snapshot(self, barrier_round: int | None = None) -> None:
        with threadpool_limits(self.cfg.clusterer.threads):
            snap = self.state.snapshot()
        snap.barrier_round, snap.n_arrived, snap.n_orphans = barrier_round, self.n_arrived, self.n_orphans
        snap.n_candidates, snap.n_uncertainty = self.state.n_candidates, self.n_uncertainty
        await self.emit(snap)
        self.last_emitted_n = snap.n_seen
        self.last_emit = self.clock.monotonic()
        self.m_k.labels(self.name).set(len(snap.clusters))
        if snap.quality.silhouette is not None:
            self.m_sil.labels(self.name).set(snap.quality.silhouette)

    async def drain(self) -> dict[TopicPartition, int] | None:
        if int(self.state.role_totals.sum()) != self.last_emitted_n:
            await self._emit_snapshot()
        return await self._save()

    async def teardown(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
