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

from services.clusterer.state import ClusterState
from services.core.events import EmbeddedText
from services.core.runtime import Incoming, Service


class ClustererService(Service):
    name: ClassVar[str] = "clusterer"
    consumes = (EmbeddedText,)
    tick_interval_s: ClassVar[float] = 0.5

    async def setup(self) -> None:
        self.redis = self.ctx.redis()
        self.k_state = f"{self.cfg.cache.namespace}:clusterer:{self.ctx.experiment_id}:state"
        self.k_offsets = f"{self.cfg.cache.namespace}:clusterer:{self.ctx.experiment_id}:offsets"
        raw = await self.redis.get(self.k_state)
        if raw:
            self.state = ClusterState.from_bytes(raw, self.cfg.clusterer)
            self.log.info("restored clusterer snapshot", extra={"n_seen": int(self.state.role_totals.sum())})
        else:
            self.state = ClusterState(self.cfg.clusterer, self.ctx.experiment_id, alpha=self.cfg.validator.alpha)
        self.pending: dict[TopicPartition, int] = {}
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
        self.m_state_bytes = m.gauge("clusterer_state_bytes", "Size of the persisted snapshot", ["service"])

    async def handle(self, batch: list[Incoming]) -> None:
        items = [i.event for i in batch if isinstance(i.event, EmbeddedText)]
        res = self.state.ingest(items)
        self.since_save += res.n_new
        self.m_texts.labels("new").inc(res.n_new)
        self.m_texts.labels("duplicate").inc(res.n_duplicates)
        for ev in res.uncertainty:
            await self.emit(ev)
            self.m_unc.labels(ev.kind).inc()
        for cand in res.candidates:
            await self.emit(cand)
            self.m_cand.labels(self.name).inc()

    async def before_commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int] | None:
        self.pending.update(offsets)
        c = self.cfg.clusterer
        if self.since_save >= c.snapshot_every_n or time.monotonic() - self.last_save >= c.snapshot_every_s:
            return await self._save()
        return None

    async def _save(self) -> dict[TopicPartition, int] | None:
        """Persist state + offsets atomically; return the offsets that may now be committed."""
        data = self.state.to_bytes()
        offsets = {f"{tp.topic}:{tp.partition}": off for tp, off in self.pending.items()}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.k_state, data)
        pipe.set(self.k_offsets, orjson.dumps(offsets))
        await pipe.execute()
        self.m_state_bytes.labels(self.name).set(len(data))
        self.since_save = 0
        self.last_save = time.monotonic()
        committed, self.pending = self.pending, {}
        return committed or None

    async def tick(self) -> None:
        n = int(self.state.role_totals.sum())
        if n != self.last_emitted_n and time.monotonic() - self.last_emit >= self.cfg.clusterer.snapshot_every_s:
            await self._emit_snapshot()
        if self.pending and time.monotonic() - self.last_save >= self.cfg.clusterer.snapshot_every_s:
            offsets = await self._save()
            if offsets and self._consumer is not None:
                await self.producer.flush()
                await self._consumer.commit(offsets)

    async def _emit_snapshot(self) -> None:
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
