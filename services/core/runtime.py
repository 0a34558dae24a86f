"""The service runtime: one consume loop shared by every service (and every plug-in).

A service declares the event types it consumes and implements ``handle``.  The runtime polls a
batch, decodes and validates each record (bad ones go to the dead-letter topic with the reason
and the original bytes), calls ``handle``, waits for every produced record to be acknowledged,
then commits the batch's offsets.  So a crash at any point re-delivers, never loses; services make
their effects idempotent by event id.  SIGTERM (or ``stop()``) finishes the batch in flight,
commits, and exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from services.core.bus import Producer, Topics, end_offsets, make_consumer
from services.core.config import Config
from services.core.events import DeadLetter, Envelope, Event
from services.core.metrics import Health, Metrics

log = logging.getLogger("autointerv.runtime")


@dataclass
class Incoming:
    """A decoded record: the event plus where it came from."""

    event: Event
    record: ConsumerRecord
    envelope: Envelope | None


class DeadLetterError(Exception):
    """Raise from ``handle_one`` to dead-letter one record with a reason, without failing the batch."""


def group_name(prefix: str, experiment_id: str, service: str) -> str:
    """The consumer group of ``service`` (a name plus any suffix a subclass adds) in one experiment;
    the orchestrator and backpressure look groups up by this name."""
    return f"{prefix}.{experiment_id}.{service}"


def generator_group_suffix(roles: list[str]) -> str:
    return "-" + "+".join(sorted(set(roles)))


@dataclass
class ServiceContext:
    cfg: Config
    bootstrap: str
    redis_url: str
    metrics: Metrics
    topics: Topics
    instance: str = ""

    @property
    def experiment_id(self) -> str:
        return self.cfg.experiment_id

    def redis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2,
                                       health_check_interval=10)


class Service(ABC):
    """Base class for pipeline services and plug-ins.

    Subclasses set ``name`` and ``consumes`` (event classes; their logical topics are subscribed)
    and implement :meth:`handle`.  Producers-only services (the controller's seeding) can leave
    ``consumes`` empty and work in :meth:`tick`.
    """

    name: ClassVar[str] = "service"
    consumes: ClassVar[tuple[type[Event], ...]] = ()
    tick_interval_s: ClassVar[float] = 1.0
    only_own_experiment: ClassVar[bool] = True

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.metrics = ctx.metrics
        self.log = logging.getLogger(f"autointerv.{self.name}")
        self.health = Health(self.name, ctx.cfg.observability.stall_after_s)
        self.producer = Producer(ctx.cfg.bus, ctx.bootstrap, ctx.topics, source=self.source)
        self._stop = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._probe: AIOKafkaConsumer | None = None  # for lag queries, never joins a group
        self._lag_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ hooks

    @property
    def source(self) -> str:
        inst = self.ctx.instance or f"{socket.gethostname()}-{os.getpid()}"
        return f"autointerv/{self.name}/{inst}"

    def group_id(self) -> str:
        """Consumer group: one per experiment and service, so replicas share partitions."""
        return group_name(self.ctx.topics.prefix, self.ctx.experiment_id, self.name)

    def input_topics(self) -> list[str]:
        return [self.ctx.topics.name(e.topic) for e in self.consumes]

    def decode(self, record: ConsumerRecord) -> Event:
        """Decode a record of one of the consumed topics (override for custom topics)."""
        logical = self.ctx.topics.logical(record.topic)
        for etype in self.consumes:
            if etype.topic == logical:
                return etype.from_bytes(record.value)
        raise DeadLetterError(f"no decoder for topic {record.topic}")

    async def setup(self) -> None:
        """Open resources (models, Redis).  Called before the first poll."""

    async def teardown(self) -> None:
        """Release resources.  Called after the last commit."""

    @abstractmethod
    async def handle(self, batch: list[Incoming]) -> None:
        """Process a batch.  Produce with ``await self.emit(event)``; never commit yourself."""

    async def tick(self) -> None:
        """Periodic work (timers, snapshots), called at most every ``tick_interval_s``."""

    async def before_commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int] | None:
        """Return the offsets to commit now, or None to hold them back.

        Stateful services that snapshot periodically (the clusterer) hold commits until their
        snapshot is saved, so committed offsets never run ahead of persisted state."""
        return offsets

    async def drain(self) -> dict[TopicPartition, int] | None:
        """Called once on shutdown after the last batch: persist state, return offsets to commit."""
        return None

    def finished(self) -> bool:
        """True when the service has nothing left to do (the controller ends a run this way)."""
        return False

    # ------------------------------------------------------------------ helpers

    async def emit(self, event: Event, topic: str | None = None) -> None:
        await self.producer.send(event, topic)
        self.metrics.published.labels(self.name, topic or event.topic).inc()

    async def dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        headers = {k: v.decode(errors="replace") for k, v in (record.headers or [])}
        dl = DeadLetter(
            experiment_id=headers.get("ce_experiment_id", self.ctx.experiment_id),
            source_topic=record.topic, source_partition=record.partition, source_offset=record.offset,
            service=self.name, reason=reason[:2000],
            original_b64=base64.b64encode(record.value or b"").decode(), original_headers=headers,
        )
        await self.emit(dl)
        self.metrics.dead_letters.labels(self.name, self.ctx.topics.logical(record.topic)).inc()
        self.log.warning("dead-lettered record", extra={"topic": record.topic, "offset": record.offset,
                                                        "reason": reason[:200]})

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Run until stopped.  Safe to call once per instance."""
        await self.producer.start()
        await self.setup()
        topics = self.input_topics()
        if topics:
            self._consumer = make_consumer(self.cfg.bus, self.ctx.bootstrap, topics, self.group_id(),
                                           client_id=self.source)
            await self._consumer.start()
        self.metrics.healthy.labels(self.name).set(1)
        last_tick = 0.0
        last_lag = 0.0
        try:
            while not self._stop.is_set():
                self.health.last_poll = time.time()
                if self._consumer is not None:
                    await self._poll_once()
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.cfg.bus.poll_timeout_ms / 1000)
                now = time.monotonic()
                if now - last_tick >= self.tick_interval_s:
                    last_tick = now
                    await self.tick()
                    await self.producer.flush()
                if self._consumer is not None and now - last_lag >= 5.0 and (
                        self._lag_task is None or self._lag_task.done()):
                    last_lag = now  # in the background: a slow lag query must never stall consumption
                    self._lag_task = asyncio.create_task(self._update_lag())
        finally:
            self.health.running = False
            self.metrics.healthy.labels(self.name).set(0)
            await self._drain_and_commit()  # flushes the producer before committing
            if self._lag_task is not None:
                self._lag_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._lag_task
            for c in (self._consumer, self._probe):
                if c is not None:
                    with contextlib.suppress(Exception):
                        await c.stop()
            await self.teardown()
            await self.producer.stop()

    async def _poll_once(self) -> None:
        assert self._consumer is not None
        polled = await self._consumer.getmany(timeout_ms=self.cfg.bus.poll_timeout_ms,
                                              max_records=self.cfg.bus.max_poll_records)
        records = [r for part in polled.values() for r in part]
        if not records:
            return
        t0 = time.perf_counter()
        batch = await self._decode_all(records)
        if batch:
            await self._handle_safely(batch)
        await self.producer.flush()  # outputs acknowledged before inputs are committed
        offsets = {tp: recs[-1].offset + 1 for tp, recs in polled.items() if recs}
        to_commit = await self.before_commit(offsets)
        if to_commit:
            await self._consumer.commit(to_commit)
        dt = time.perf_counter() - t0
        self.metrics.batch_seconds.labels(self.name).observe(dt)
        self.metrics.batch_size.labels(self.name).observe(len(records))
        self.health.last_progress = time.time()
        self.metrics.last_progress.labels(self.name).set(self.health.last_progress)

    async def _drain_and_commit(self) -> None:
        try:
            offsets = await self.drain()
            await self.producer.flush()
            if offsets and self._consumer is not None:
                await self._consumer.commit(offsets)
        except Exception:
            self.log.exception("drain failed")

    async def _decode_all(self, records: Sequence[ConsumerRecord]) -> list[Incoming]:
        out: list[Incoming] = []
        for rec in records:
            env = Envelope.from_headers(rec.headers)
            if self.only_own_experiment and env is not None and env.experiment_id != self.ctx.experiment_id:
                continue  # another experiment sharing the cluster
            try:
                event = self.decode(rec)
            except (ValidationError, ValueError, TypeError, DeadLetterError) as exc:
                await self.dead_letter(rec, f"undecodable {self.ctx.topics.logical(rec.topic)} record: "
                                            f"{_short(exc)}")
                continue
            if self.only_own_experiment and event.experiment_id != self.ctx.experiment_id:
                continue
            out.append(Incoming(event, rec, env))
        return out

    async def _handle_safely(self, batch: list[Incoming]) -> None:
        """Handle a batch; on failure retry one by one so a poison record is isolated."""
        try:
            await self.handle(batch)
            self._count(batch)
            return
        except DeadLetterError:
            pass
        except Exception as exc:
            self.metrics.errors.labels(self.name, type(exc).__name__).inc()
            if len(batch) == 1:
                await self.dead_letter(batch[0].record, f"handler failed: {_short(exc)}")
                return
            self.log.exception("batch failed; retrying records one by one")
        for item in batch:
            try:
                await self.handle([item])
                self._count([item])
            except Exception as exc:
                self.metrics.errors.labels(self.name, type(exc).__name__).inc()
                await self.dead_letter(item.record, f"handler failed: {_short(exc)}")

    def _count(self, batch: list[Incoming]) -> None:
        for item in batch:
            self.metrics.processed.labels(self.name, item.event.topic).inc()

    async def _update_lag(self) -> None:
        """Lag = true end offset minus position, per topic (see bus.end_offsets for why a probe)."""
        consumer = self._consumer
        if consumer is None or not consumer.assignment():
            return
        if self._probe is None:
            self._probe = AIOKafkaConsumer(bootstrap_servers=self.ctx.bootstrap, enable_auto_commit=False)
            await self._probe.start()
        try:
            ends = await end_offsets(self.ctx.bootstrap, self.input_topics(), probe=self._probe)
        except Exception as exc:
            self.log.debug("lag query failed", extra={"error": str(exc)})
            return
        total = 0
        per_topic: dict[str, int] = {}
        for tp in consumer.assignment():
            try:
                pos = await consumer.position(tp)
            except Exception:
                continue
            lag = max(0, ends.get(tp, pos) - pos)
            total += lag
            per_topic[tp.topic] = per_topic.get(tp.topic, 0) + lag
        for topic, lag in per_topic.items():
            self.metrics.lag.labels(self.name, self.group_id(), self.ctx.topics.logical(topic)).set(lag)
        self.health.lag = total
        ok, detail = self.health.status()
        self.health.detail = detail
        self.metrics.healthy.labels(self.name).set(1 if ok else 0)


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:500]}"


def plugin_registry() -> dict[str, Any]:
    """Services discovered through the ``autointerv.services`` entry-point group."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="autointerv.services")}
