"""Clusterer service: embedded texts in; snapshots, uncertainty events and candidates out.

All state lives in :class:`ClusterState`.  The service persists ``state.to_bytes()`` together with
the consumed offsets to Redis every ``snapshot_every_n`` texts or ``snapshot_every_s`` seconds and
only then commits those offsets to Kafka, so committed offsets never run ahead of persisted state.
After a crash it restores the snapshot and the consumer resumes at the committed offsets; events
between the snapshot and the crash are re-delivered and deduplicated by text id (no double
counting, no gap).  Texts are keyed by experiment id, so one clusterer instance owns an
experiment's stream; replicas of the group serve other experiments.

Faults:

* a bad vector (not base64, wrong length, NaN/inf) fails :class:`EmbeddedText` validation, so the
  runtime dead-letters it at decode; a sound vector of another dim than the state's is
  dead-lettered here.  Neither reaches the pair buffer or the state;
* a batch that fails to ingest leaves the pair buffer and the state as they were (see
  :mod:`services.clusterer.pairing`), so the runtime's record-by-record retry loses nothing;
* a Redis error while saving is retried with backoff; offsets stay uncommitted until a save
  succeeds (a crash meanwhile re-delivers, never loses);
* a saved state that is corrupt (NaN/inf, unreadable) is moved aside to ``<key>:quarantined:<unix
  time>`` and the clusterer starts empty from the committed offsets, continuing the old state's
  cluster ids and snapshot numbers (:meth:`ClusterState.after_corrupt`): the texts before the
  committed offsets are no longer counted, but the share tests stay valid and no id is reused.
  Refusing to start instead would crash-loop; an operator who wants the old texts counted resets
  the group's offsets to the beginning on a persistent broker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import orjson
from aiokafka import TopicPartition
from redis.asyncio import Redis
from redis.exceptions import RedisError
from threadpoolctl import ThreadpoolController

from services.clusterer.pairing import PairBuffer
from services.clusterer.state import ClusterState, CorruptStateError, IngestResult
from services.core.events import CandidateCluster, ClusterSnapshot, ControlEvent, EmbeddedText, UncertaintyEvent
from services.core.runtime import Incoming, Service, ServiceContext
from services.core.state import expire_in_pipeline

T = TypeVar("T")
SAVE_RETRY_FIRST_S = 0.5
SAVE_RETRY_MAX_S = 30.0


class ClustererService(Service):
    name: ClassVar[str] = "clusterer"
    consumes = (EmbeddedText, ControlEvent)
    produces = (ClusterSnapshot, UncertaintyEvent, CandidateCluster)
    tick_interval_s: ClassVar[float] = 0.5

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self._pools: ThreadpoolController | None = None  # created at the first batch (a library scan)
        self.redis: Redis | None = None
        self.barrier: ControlEvent | None = None  # the latest RoundClosed not yet answered
        self.n_orphans = 0  # texts dropped at a barrier: their pair partner was never produced
        self.n_uncertainty = 0  # uncertainty events emitted (the controller waits for them at a barrier)

    async def setup(self) -> None:
        self.redis = self.ctx.redis()
        ns, exp = self.cfg.cache.namespace, self.ctx.experiment_id
        self.k_state = f"{ns}:clusterer:{exp}:state"
        self.k_offsets = f"{ns}:clusterer:{exp}:offsets"
        self.k_pending = f"{ns}:clusterer:{exp}:pending"
        self.k_seq = f"{ns}:clusterer:{exp}:seq"  # highest snapshot number ever published
        raw_pending, raw, raw_seq = await self._retrying(
            "restore", lambda: self.redis.mget(self.k_pending, self.k_state, self.k_seq))
        wait = self.cfg.clusterer.pair_wait_texts
        saved = orjson.loads(raw_pending) if raw_pending else None
        self.pairs = PairBuffer.from_json(saved, wait) if saved else PairBuffer(wait)
        if saved:
            self.n_orphans, self.n_uncertainty = saved.get("orphans", 0), saved.get("uncertainty", 0)
            self.barrier = ControlEvent.model_validate(saved["barrier"]) if saved.get("barrier") else None
        self.state = await self._restore(raw)
        # snapshots published after the last save must not see their numbers reused with other content
        # after a restart (the sink keeps one snapshot per number): continue after the highest published
        self.state.seq = max(self.state.seq, int(raw_seq or 0))
        self.uncommitted: dict[TopicPartition, int] = {}
        self.since_save = 0
        self.last_save = self.clock.monotonic()
        self.save_failures = 0
        self.next_save_at = 0.0
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
        self.m_save_errors = m.counter("clusterer_save_errors_total", "Failed snapshot saves (retried)",
                                       ["service"])

    async def _restore(self, raw: bytes | None) -> ClusterState:
        c, exp, alpha = self.cfg.clusterer, self.ctx.experiment_id, self.cfg.validator.alpha
        if not raw:
            return ClusterState(c, exp, alpha=alpha)
        try:
            state = ClusterState.from_bytes(raw, c)
        except CorruptStateError as exc:
            state = ClusterState.after_corrupt(raw, c, exp, alpha)  # raises if not even its ids read
            aside = f"{self.k_state}:quarantined:{int(self.clock.time())}"
            await self._retrying("quarantine", lambda: self.redis.rename(self.k_state, aside))
            self.log.error("corrupt clusterer snapshot moved aside; starting empty from the committed "
                           "offsets (cluster ids continue after %d)", state.engine.n_created,
                           extra={"reason": str(exc), "key": aside})
            return state
        self.log.info("restored clusterer snapshot", extra={"n_seen": int(state.role_totals.sum())})
        return state

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Redis calls at start-up: retried with backoff until they succeed or the service stops."""
        delay = SAVE_RETRY_FIRST_S
        while True:
            try:
                return await call()
            except (RedisError, OSError) as exc:
                if self.stopping:
                    raise
                self.log.warning("redis unavailable (%s), retrying in %.1f s", what, delay,
                                 extra={"error": str(exc)})
                await self.clock.sleep(delay)
                delay = min(2 * delay, SAVE_RETRY_MAX_S)

    # ------------------------------------------------------------------ consuming
    def _thread_limits(self) -> contextlib.AbstractContextManager[Any]:
        """Cap OpenMP/BLAS threads for one batch (BLAS threads spin against torch's on few cores).
        One library scan per service: ``threadpool_limits()`` rescans the loaded libraries on every
        call (7 ms per batch in bench/pipeline.py's profile, on the event loop's thread)."""
        threads = self.cfg.clusterer.threads
        if threads is None:
            return contextlib.nullcontext()
        if self._pools is None:
            self._pools = ThreadpoolController()
        return self._pools.limit(limits=threads)

    async def handle(self, batch: list[Incoming]) -> None:
        items = []
        dim = self.state.dim
        for inc in batch:
            ev = inc.event
            if isinstance(ev, ControlEvent) and ev.kind == "round_closed" and (
                    self.barrier is None or (ev.round, ev.force) > (self.barrier.round, self.barrier.force)):
                self.barrier = ev
            if not isinstance(ev, EmbeddedText):
                continue
            dim = dim or ev.dim
            if ev.dim != dim:  # another embedding model: not comparable with what is clustered
                await self.dead_letter(inc.record, f"embedding dim {ev.dim} ({ev.embedding_model}) does not "
                                                   f"match the clusterer's {dim}")
                continue
            items.append(ev)
        plan = self.pairs.plan(items, self.state.has_seen)
        with self._thread_limits():  # BLAS threads spin against torch's on few cores
            res = self.state.ingest(plan.ready)  # raises before changing the state on a bad text
        self.pairs.commit(plan)  # only now: a failed batch is retried on the buffer it saw
        self.m_pending.labels(self.name).set(len(self.pairs))
        await self._publish(res)
        await self._answer_barrier()

    async def _publish(self, res: IngestResult) -> None:
        self.since_save += res.n_new
        self.m_texts.labels("new").inc(res.n_new)
        self.m_texts.labels("duplicate").inc(res.n_duplicates)
        for ev in res.uncertainty:
            await self.emit(ev)
            self.n_uncertainty += 1
            self.m_unc.labels(ev.kind).inc()
        for cand in res.candidates:
            await self.emit(cand)
            self.m_cand.labels(self.name).inc()

    async def checkpoint(self) -> None:
        """Publish what is due at the current stream position: call at a barrier (a sampling round
        completely ingested), since checks otherwise run only every ``check_every`` texts."""
        with self._thread_limits():
            res = self.state.checkpoint()
        await self._publish(res)

    @property
    def n_arrived(self) -> int:
        return int(self.state.role_totals.sum()) + len(self.pairs) + self.n_orphans

    async def _answer_barrier(self) -> None:
        """Once every text of the closed round has arrived (or the controller forces it): drop that
        round's orphans from the share test, check what is due at this position, and emit the
        barrier snapshot the controller waits for."""
        b = self.barrier
        if b is None or (self.n_arrived < b.expected_texts and not b.force):
            return
        self.n_orphans += self.pairs.drop_orphans(b.round)
        await self.checkpoint()
        await self._emit_snapshot(barrier_round=b.round)
        self.barrier = None
        self.since_save = self.cfg.clusterer.snapshot_every_n  # save (and commit) with this batch

    # ------------------------------------------------------------------ persistence
    async def before_commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int] | None:
        self.uncommitted.update(offsets)
        c = self.cfg.clusterer
        if self.since_save >= c.snapshot_every_n or self.clock.monotonic() - self.last_save >= c.snapshot_every_s:
            return await self._save()
        return None

    async def _save(self) -> dict[TopicPartition, int] | None:
        """Persist state + offsets atomically; return the offsets that may now be committed.

        On a Redis error: None (nothing committed) and the next try waits a backoff doubling from
        0.5 s to 30 s, so an outage neither ends the service nor hammers the server."""
        if self.clock.monotonic() < self.next_save_at:
            return None
        data = self.state.to_bytes()
        offsets = {f"{tp.topic}:{tp.partition}": off for tp, off in self.uncommitted.items()}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.k_state, data)
        pipe.set(self.k_offsets, orjson.dumps(offsets))
        pipe.set(self.k_pending, orjson.dumps({
            **self.pairs.to_json(), "orphans": self.n_orphans, "uncertainty": self.n_uncertainty,
            "barrier": self.barrier.model_dump(mode="json") if self.barrier is not None else None}))
        expire_in_pipeline(pipe, self.cfg, self.k_state, self.k_offsets, self.k_pending, self.k_seq)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            self.save_failures += 1
            delay = min(SAVE_RETRY_FIRST_S * 2 ** (self.save_failures - 1), SAVE_RETRY_MAX_S)
            self.next_save_at = self.clock.monotonic() + delay
            self.m_save_errors.labels(self.name).inc()
            self.log.warning("snapshot save failed (%d in a row), next try in %.1f s; offsets held back",
                             self.save_failures, delay, extra={"error": str(exc)})
            return None
        if self.save_failures:
            self.log.info("snapshot saved again after %d failed tries", self.save_failures)
        self.save_failures, self.next_save_at = 0, 0.0
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
        with self._thread_limits():
            snap = self.state.snapshot()
        snap.barrier_round, snap.n_arrived, snap.n_orphans = barrier_round, self.n_arrived, self.n_orphans
        snap.n_candidates, snap.n_uncertainty = self.state.n_candidates, self.n_uncertainty
        try:  # before it is out: a crash after this never reuses the number
            await self.redis.set(self.k_seq, snap.seq)
        except (RedisError, OSError):  # during an outage saves are held back too; publishing goes on
            self.log.debug("snapshot number not recorded (Redis unavailable)", extra={"seq": snap.seq})
        await self.emit(snap)
        self.last_emitted_n = snap.n_seen
        self.last_emit = self.clock.monotonic()
        self.m_k.labels(self.name).set(len(snap.clusters))
        if snap.quality.silhouette is not None:
            self.m_sil.labels(self.name).set(snap.quality.silhouette)

    async def drain(self) -> dict[TopicPartition, int] | None:
        if int(self.state.role_totals.sum()) != self.last_emitted_n:
            await self._emit_snapshot()
        self.next_save_at = 0.0  # one last try even during a backoff
        return await self._save()

    async def teardown(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
