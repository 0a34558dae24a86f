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

import time
from typing import ClassVar

import orjson
from aiokafka import TopicPartition
from threadpoolctl import threadpool_limits

from services.clusterer.state import ClusterState
from services.core.events import EmbeddedText
from services.core.runtime import Incoming, Service
from services.core.state import expire_in_pipeline


class ClustererService(Service):
    name: ClassVar[str] = "clusterer"
    consumes = (EmbeddedText,)
    tick_interval_s: ClassVar[float] = 0.5

    async def setup(self) -> None:
        self.redis = self.ctx.redis()
        self.k_state = f"{self.cfg.cache.namespace}:clusterer:{self.ctx.experiment_id}:state"
        self.k_offsets = f"{self.cfg.cache.namespace}:clusterer:{self.ctx.experiment_id}:offsets"
        self.k_pending = f"{self.cfg.cache.namespace}:clusterer:{self.ctx.experiment_id}:pending"
        self.pending: dict[str, tuple[EmbeddedText, int]] = {}
        self.arrivals = 0
        raw_pending = await self.redis.get(self.k_pending)
        if raw_pending:
            saved = orjson.loads(raw_pending)
            self.arrivals = saved["arrivals"]
            self.pending = {e["pair_id"]: (EmbeddedText.model_validate(e), at) for e, at in saved["items"]}
        raw = await self.redis.get(self.k_state)
        if raw:
            self.state = ClusterState.from_bytes(raw, self.cfg.clusterer)
            self.log.info("restored clusterer snapshot", extra={"n_seen": int(self.state.role_totals.sum())})
        else:
            self.state = ClusterState(self.cfg.clusterer, self.ctx.experiment_id, alpha=self.cfg.validator.alpha)
        self.uncommitted: dict[TopicPartition, int] = {}
        self.since_save = 0
        self.last_save = time.monotonic()
        self.last_emitted_n = -1
        self.last_emit = 0.0
        m = self.metrics
        self.m_texts = m.counter("clusterer_texts_total", "Texts ingested (new / duplicate)", ["kind"])
        self.m_k = m.gauge("clusterer_clusters", "Active clusters", ["service"])
        self.m_cand = m.counter("clusterer_candidates_total", "Divergent-cluster candidates", ["service"])
        self.m_unc = m.counter("clusterer_uncertainty_total", "Uncertainty events", ["kind"])
        self.m_sil = m.gauge("clusterer_silhouette", "Silhouette on the reservoir sample", ["service"])
        self.m_pending = m.gauge("clusterer_unpaired_texts", "Texts waiting for their pair partner", ["service"])
        self.m_state_bytes = m.gauge("clusterer_state_bytes", "Size of the persisted snapshot", ["service"])

    async def handle(self, batch: list[Incoming]) -> None:
        items = [i.event for i in batch if isinstance(i.event, EmbeddedText)]
        with threadpool_limits(self.cfg.clusterer.threads):  # BLAS threads spin against torch's on few cores
            res = self.state.ingest(self._pair_up(items))
        self.since_save += res.n_new
        self.m_texts.labels("new").inc(res.n_new)
        self.m_texts.labels("duplicate").inc(res.n_duplicates)
        for ev in res.uncertainty:
            await self.emit(ev)
            self.m_unc.labels(ev.kind).inc()
        for cand in res.candidates:
            await self.emit(cand)
            self.m_cand.labels(self.name).inc()

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
        if self.since_save >= c.snapshot_every_n or time.monotonic() - self.last_save >= c.snapshot_every_s:
            return await self._save()
        return None

    async def _save(self) -> dict[TopicPartition, int] | None:
        """Persist state + offsets atomically; return the offsets that may now be committed."""
        data = self.state.to_bytes()
        offsets = {f"{tp.topic}:{tp.partition}": off for tp, off in self.uncommitted.items()}
        pending = {"arrivals": self.arrivals,
                   "items": [(e.model_dump(mode="json"), at) for e, at in self.pending.values()]}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.k_state, data)
        pipe.set(self.k_offsets, orjson.dumps(offsets))
        pipe.set(self.k_pending, orjson.dumps(pending))
        expire_in_pipeline(pipe, self.cfg, self.k_state, self.k_offsets, self.k_pending)
        await pipe.execute()
        self.m_state_bytes.labels(self.name).set(len(data))
        self.since_save = 0
        self.last_save = time.monotonic()
        committed, self.uncommitted = self.uncommitted, {}
        return committed or None

    async def tick(self) -> None:
        n = int(self.state.role_totals.sum())
        if n != self.last_emitted_n and time.monotonic() - self.last_emit >= self.cfg.clusterer.snapshot_every_s:
            await self._emit_snapshot()
        if self.uncommitted and time.monotonic() - self.last_save >= self.cfg.clusterer.snapshot_every_s:
            offsets = await self._save()
            if offsets and self._consumer is not None:
                await self.producer.flush()
                await self._consumer.commit(offsets)

    async def _emit_snapshot(self) -> None:
        with threadpool_limits(self.cfg.clusterer.threads):
            snap = self.state.snapshot()
        await self.emit(snap)
        self.last_emitted_n = snap.n_seen
        self.last_emit = time.monotonic()
        self.m_k.labels(self.name).set(len(snap.clusters))
        if snap.quality.silhouette is not None:
            self.m_sil.labels(self.name).set(snap.quality.silhouette)

    async def drain(self) -> dict[TopicPartition, int] | None:
        if int(self.state.role_totals.sum()) != self.last_emitted_n:
            await self._emit_snapshot()
        return await self._save()

    async def teardown(self) -> None:
        if getattr(self, "redis", None) is not None:
            await self.redis.aclose()
