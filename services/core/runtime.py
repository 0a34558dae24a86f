"""The service runtime: one consume loop shared by every service (and every plug-in).

A service declares the event types it ``consumes`` and ``produces`` and implements ``handle``.
The runtime polls a batch, decodes and validates each record (bad ones go to the dead-letter topic
with the reason and the original bytes), calls ``handle``, waits for every produced record to be
acknowledged, then commits the batch's offsets.  So a crash at any point re-delivers, never loses;
services make their effects idempotent by event id.

The loop is split into :meth:`Service.start`, :meth:`Service.step` and :meth:`Service.close` so
the in-memory bus can drive the very same loop in burst mode (``MemoryBus.run_until_idle``);
:meth:`Service.run` is ``start; step until stopped; close``.

Failures are sorted into two kinds:

* a bad record (undecodable, or its handler raises): dead-lettered, the rest of the batch goes on;
* the infrastructure not answering (broker, Redis: :data:`INFRASTRUCTURE_ERRORS`): nothing is
  dead-lettered; the batch is rewound to its first offsets and retried with backoff, and a service
  that cannot reach its infrastructure for ``bus.broker_loss_s`` / ``cache.outage_s`` stops with
  :class:`InfrastructureLost`, a message saying what and for how long.

SIGTERM (or ``stop()``) finishes the batch in flight, drains (``bus.shutdown_timeout_s`` at most),
commits and exits.
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
from dataclasses import dataclass, field
from typing import Any, ClassVar

import redis.asyncio as aioredis
import redis.exceptions
from aiokafka import TopicPartition
from pydantic import ValidationError

from services.core.bus import BROKER_ERRORS, Bus, Consumer, KafkaBus
from services.core.clock import Clock, SystemClock
from services.core.config import Config
from services.core.events import ControlEvent, DeadLetter, Envelope, Event
from services.core.metrics import Health, Metrics
from services.core.resources import Resources
from services.core.topics import Topics

log = logging.getLogger("autointerv.runtime")


class InfrastructureError(RuntimeError):
    """A dependency (broker, cache, model server) is not answering: retry the batch later, never
    dead-letter its records.  Services may raise it for dependencies of their own."""


class InfrastructureLost(RuntimeError):
    """The infrastructure stayed unreachable past its outage limit; the service stops."""


class DeadLetterError(Exception):
    """Raise from ``handle`` to dead-letter one record with a reason, without failing the batch."""


REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                                                 redis.exceptions.BusyLoadingError)
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (*BROKER_ERRORS, *REDIS_ERRORS, InfrastructureError)
FAILURE_LOG_EVERY_S = 10.0  # an outage is logged when it starts and then at most this often


@dataclass
class Incoming:
    """A decoded record: the event plus where it came from."""

    event: Event
    record: Any  # aiokafka ConsumerRecord or memory_bus.Record (None for events handed in directly)

    @property
    def envelope(self) -> Envelope | None:
        """The record's CloudEvents headers, parsed on demand (the loop itself needs only the
        experiment id, see :func:`header_experiment`)."""
        return Envelope.from_headers(self.record.headers) if self.record is not None else None


def header_experiment(headers: Sequence[tuple[str, bytes]] | None) -> str | None:
    """The ``ce_experiment_id`` header, without validating the whole envelope per record."""
    for k, v in headers or ():
        if k == "ce_experiment_id":
            return v.decode(errors="replace")
    return None


async def bounded(work: Any, timeout_s: float) -> bool:
    """Await ``work`` for at most ``timeout_s``; True when it finished.  Unlike ``wait_for`` it does
    not wait for a cancelled client call to unwind: aiokafka's ``stop()`` retries the dead
    broker while cancelled, and shutdown must stay bounded (``bus.shutdown_timeout_s``)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception not retrieved"
        return False
    if task.cancelled():  # the client cancelled its own work (aiokafka does, on a dead broker)
        return False
    exc = task.exception()
    if exc is not None:
        raise exc
    return True


def group_name(prefix: str, experiment_id: str, service: str) -> str:
    """The consumer group of ``service`` (a name plus any suffix a subclass adds) in one experiment;
    the orchestrator and backpressure look groups up by this name."""
    return f"{prefix}.{experiment_id}.{service}"


def generator_group_suffix(roles: list[str]) -> str:
    return "-" + "+".join(sorted(set(roles)))


@dataclass
class ServiceContext:
    """What a service gets from the process that runs it: config, bus, cache URL, metrics, clock
    and the process's shared resources (one embedding model for every service that needs one)."""

    cfg: Config
    bootstrap: str
    redis_url: str
    metrics: Metrics
    topics: Topics
    instance: str = ""
    bus: Bus = None  # type: ignore[assignment]  # None: a KafkaBus on ``bootstrap``
    clock: Clock = field(default_factory=SystemClock)
    resources: Resources = field(default_factory=Resources)

    def __post_init__(self) -> None:
        if self.bus is None:
            self.bus = KafkaBus(self.cfg.bus, self.bootstrap, self.topics)

    @property
    def experiment_id(self) -> str:
        return self.cfg.experiment_id

    def redis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2,
                                       health_check_interval=10)


@dataclass
class _Outage:
    """An infrastructure failure in progress: when it started and when it was last logged.  Only a
    success of the same piece of work (``source``) ends it: an idle poll that touched nothing
    proves nothing about a broker that stopped answering the lag probe."""

    kind: str  # "broker" or "cache"
    source: str  # "poll", "tick" or "probe"
    since: float
    failures: int = 0
    last_logged: float = float("-inf")


class Service(ABC):
    """Base class for pipeline services and plug-ins.

    Subclasses set ``name``, ``consumes`` and ``produces`` (event classes; their logical topics are
    the service's inputs and outputs in the topology) and implement :meth:`handle`.  ``origin``
    marks the service that starts the event cycle (the controller): the topology treats edges
    into it as feedback.
    """

    name: ClassVar[str] = "service"
    consumes: ClassVar[tuple[type[Event], ...]] = ()
    produces: ClassVar[tuple[type[Event], ...]] = ()
    origin: ClassVar[bool] = False
    tick_interval_s: ClassVar[float] = 1.0
    only_own_experiment: ClassVar[bool] = True

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.metrics = ctx.metrics
        self.bus = ctx.bus
        self.clock = ctx.clock
        self.log = logging.getLogger(f"autointerv.{self.name}")
        self.health = Health(self.display_name, ctx.cfg.observability.stall_after_s)
        self.producer = self.bus.producer(self.source)
        self._stop = asyncio.Event()
        self._consumer: Consumer | None = None
        self._lag_task: asyncio.Task[None] | None = None
        self._last_tick = float("-inf")
        self._last_lag = float("-inf")
        self._outage: _Outage | None = None
        self._lost: str | None = None
        self._started = False
        # the controller's end-of-experiment announcement, once seen; with exit_when_finished (a
        # process started for one service of one run) the service stops once it has also caught up
        # with its inputs, since everything upstream was produced before the announcement
        self.experiment_finished: ControlEvent | None = None
        self.exit_when_finished = False

    @classmethod
    def instances(cls, ctx: ServiceContext) -> list[Service]:
        """The instances one process runs for an experiment (the validator: one per tier)."""
        return [cls(ctx)]

    # ------------------------------------------------------------------ declarations

    @property
    def display_name(self) -> str:
        return self.name

    @property
    def source(self) -> str:
        inst = self.ctx.instance or f"{socket.gethostname()}-{os.getpid()}"
        return f"autointerv/{self.display_name}/{inst}"

    def inputs(self) -> list[str]:
        """Logical topics this instance reads: what it consumes, plus the control topic (every
        service learns that its experiment finished; see :meth:`finished`)."""
        topics = [e.topic for e in self.consumes]
        return topics if not topics or ControlEvent.topic in topics else [*topics, ControlEvent.topic]

    def outputs(self) -> list[str]:
        """Logical topics this instance writes (every service may dead-letter)."""
        return list(dict.fromkeys([*(e.topic for e in self.produces), DeadLetter.topic]))

    def input_topics(self) -> list[str]:
        return [self.ctx.topics.name(t) for t in self.inputs()]

    def group_id(self) -> str:
        """Consumer group: one per experiment and service, so replicas share partitions."""
        return group_name(self.ctx.topics.prefix, self.ctx.experiment_id, self.name)

    def decode(self, record: Any) -> Event:
        """Decode a record of one of the consumed topics (override for custom topics)."""
        logical = self.ctx.topics.logical(record.topic)
        for etype in (*self.consumes, ControlEvent):
            if etype.topic == logical:
                return etype.from_bytes(record.value)
        raise DeadLetterError(f"no decoder for topic {record.topic}")

    # ------------------------------------------------------------------ hooks

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

    async def finalize(self) -> None:
        """Called by the process after every service stopped (the sink writes the report here)."""

    def finished(self) -> bool:
        """True when the service has nothing left to do (the controller ends a run this way)."""
        return False

    def progress(self) -> dict[str, object]:
        """Numbers for progress displays (the controller's round, texts, findings)."""
        return {}

    # ------------------------------------------------------------------ helpers

    async def emit(self, event: Event, topic: str | None = None) -> None:
        await self.producer.send(event, topic)
        self.metrics.published.labels(self.name, topic or event.topic).inc()

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Flush what was emitted, then commit ``offsets`` (for services that commit outside a
        batch, e.g. after a periodic snapshot); both under ``bus.request_timeout_s``."""
        await self.producer.flush()
        if offsets and self._consumer is not None:
            await asyncio.wait_for(self._consumer.commit(offsets), self.cfg.bus.request_timeout_s)

    async def dead_letter(self, record: Any, reason: str) -> None:
        headers = {k: v.decode(errors="replace") for k, v in (record.headers or [])}
        dl = DeadLetter(
            experiment_id=headers.get("ce_experiment_id", self.ctx.experiment_id),
            source_topic=record.topic, source_partition=record.partition, source_offset=record.offset,
            service=self.display_name, reason=reason[:2000],
            original_b64=base64.b64encode(record.value or b"").decode(), original_headers=headers,
        )
        await self.emit(dl)
        self.metrics.dead_letters.labels(self.name, self.ctx.topics.logical(record.topic)).inc()
        self.log.warning("dead-lettered record", extra={"topic": record.topic, "offset": record.offset,
                                                        "reason": reason[:200]})

    def pause_input(self) -> None:
        """Stop fetching from the input topics (backpressure); polls return nothing until resumed."""
        if self._consumer is not None:
            self._consumer.pause(*self._consumer.assignment())

    def resume_input(self) -> None:
        if self._consumer is not None:
            self._consumer.resume(*self._consumer.assignment())

    @property
    def consuming(self) -> bool:
        """True once the service has joined its consumer group (it has input topics)."""
        return self._consumer is not None

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Run until stopped (or until the infrastructure is lost for good).  Once per instance."""
        await self.start()
        try:
            while not self._stop.is_set():
                await self.step()
        finally:
            await self.close()

    async def start(self) -> None:
        """Connect the producer, run ``setup`` and join the consumer group."""
        await self.producer.start()
        await self.setup()
        topics = self.input_topics()
        if topics:
            self._consumer = self.bus.consumer(topics, self.group_id(), client_id=self.source)
            await self._consumer.start()
        self._started = True
        self.metrics.healthy.labels(self.name).set(1)

    async def step(self, wait: bool = True) -> int:
        """One turn of the loop: poll one batch (waiting up to ``bus.poll_timeout_ms`` when ``wait``),
        then the tick if one is due.  Returns the records handled.  Raises InfrastructureLost."""
        if self._lost is not None:
            raise InfrastructureLost(self._lost)
        self.health.last_poll = time.time()
        handled = 0
        if self._consumer is not None:
            handled = await self._guarded(self._poll_once(self.cfg.bus.poll_timeout_ms if wait else 0), wait,
                                          "poll") or 0
        elif wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.cfg.bus.poll_timeout_ms / 1000)
        now = self.clock.monotonic()
        if now - self._last_tick >= self.tick_interval_s:
            self._last_tick = now
            await self._guarded(self._tick_and_flush(), wait, "tick")
        if wait and self._consumer is not None and now - self._last_lag >= 5.0 and (
                self._lag_task is None or self._lag_task.done()):
            self._last_lag = now  # in the background: a slow lag query must never stall consumption
            self._lag_task = asyncio.create_task(self._update_lag())
        if self.exit_when_finished and self.experiment_finished is not None and handled == 0 \
                and await self._caught_up():
            self.log.info("experiment finished and every input consumed; stopping",
                          extra={"stopped_because": self.experiment_finished.stopped_because})
            self.stop()
        return handled

    async def close(self) -> None:
        """Drain and commit (bounded by ``bus.shutdown_timeout_s``), leave the group, tear down."""
        self.health.running = False
        self.metrics.healthy.labels(self.name).set(0)
        if not self._started:
            await self.teardown()
            return
        limit = self.cfg.bus.shutdown_timeout_s
        try:
            if not await bounded(self._drain_and_commit(), limit):
                self.log.warning("drain did not finish in time; uncommitted work will be re-delivered",
                                 extra={"limit_s": limit})
        except Exception:
            self.log.exception("drain failed; uncommitted work will be re-delivered")
        if self._lag_task is not None:
            self._lag_task.cancel()
            await bounded(asyncio.wait({self._lag_task}), 1.0)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await bounded(self._consumer.stop(), min(limit, 5.0))
        try:
            await self.teardown()
        finally:
            with contextlib.suppress(Exception):
                await bounded(self.producer.stop(), min(limit, 5.0))
            self._started = False

    async def _caught_up(self) -> bool:
        """True when this instance has read everything on its input partitions."""
        if self._consumer is None:
            return True
        try:
            ends = await self.bus.end_offsets(self.input_topics())
            for tp in self._consumer.assignment():
                if await self._consumer.position(tp) < ends.get(tp, 0):
                    return False
        except Exception:
            return False
        return True

    async def _tick_and_flush(self) -> None:
        await self.tick()
        await self.producer.flush()

    async def _poll_once(self, timeout_ms: int) -> int:
        assert self._consumer is not None
        polled = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=self.cfg.bus.max_poll_records)
        records = [r for part in polled.values() for r in part]
        if not records:
            return 0
        starts = {tp: recs[0].offset for tp, recs in polled.items() if recs}
        t0 = time.perf_counter()
        try:
            batch = await self._decode_all(records)
            if batch:
                await self._handle_safely(batch)
            await self.producer.flush()  # outputs acknowledged before inputs are committed
            to_commit = await self.before_commit({tp: recs[-1].offset + 1 for tp, recs in polled.items() if recs})
            if to_commit:
                await asyncio.wait_for(self._consumer.commit(to_commit), self.cfg.bus.request_timeout_s)
        except (*INFRASTRUCTURE_ERRORS, TimeoutError):
            self._rewind(starts)  # the batch comes again once the infrastructure answers
            raise
        self.metrics.batch_seconds.labels(self.name).observe(time.perf_counter() - t0)
        self.metrics.batch_size.labels(self.name).observe(len(records))
        self.health.last_progress = time.time()
        self.metrics.last_progress.labels(self.name).set(self.health.last_progress)
        return len(records)

    def _rewind(self, starts: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        assigned = self._consumer.assignment()
        for tp, offset in starts.items():
            if tp in assigned:
                self._consumer.seek(tp, offset)

    async def _guarded(self, work: Any, wait: bool, source: str) -> Any:
        """Run one piece of the loop; infrastructure failures are retried, logged at a bounded rate,
        and turned into InfrastructureLost once they outlast their limit."""
        try:
            result = await work
        except (*INFRASTRUCTURE_ERRORS, TimeoutError) as exc:
            self._note_outage(exc, source)
            if wait:
                await self.clock.sleep(min(5.0, 0.2 * 2 ** min(self._outage.failures, 5)) if self._outage else 0.2)
            return None
        if source != "poll" or result:  # an empty poll touched nothing
            self._recovered(source)
        return result

    def _recovered(self, source: str) -> None:
        out = self._outage
        if out is not None and out.source == source:
            self.log.warning("infrastructure answers again", extra={
                "kind": out.kind, "after_s": round(self.clock.monotonic() - out.since, 1), "failures": out.failures})
            self._outage = None

    def _note_outage(self, exc: BaseException, source: str) -> None:
        kind = "cache" if isinstance(exc, REDIS_ERRORS) else "broker"
        now = self.clock.monotonic()
        if self._outage is None or self._outage.kind != kind:
            self._outage = _Outage(kind, source, now)
        out = self._outage
        out.failures += 1
        self.metrics.errors.labels(self.name, f"{kind}_unavailable").inc()
        limit = self.cfg.bus.broker_loss_s if kind == "broker" else self.cfg.cache.outage_s
        if now - out.since >= limit:
            where = self.bus.address if kind == "broker" else "the cache (Redis)"
            self._lost = (f"{self.display_name}: {where} unreachable for {now - out.since:.0f}s "
                          f"({out.failures} failures, last: {type(exc).__name__}: {str(exc)[:200]}); stopping. "
                          "Committed work is safe; uncommitted input will be re-delivered on restart.")
            self.log.error("infrastructure lost", extra={"kind": kind, "detail": self._lost})
            raise InfrastructureLost(self._lost) from exc
        if now - out.last_logged >= FAILURE_LOG_EVERY_S:
            out.last_logged = now
            self.log.warning("infrastructure not answering; retrying", extra={
                "kind": kind, "for_s": round(now - out.since, 1), "failures": out.failures,
                "limit_s": limit, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})

    async def _drain_and_commit(self) -> None:
        offsets = await self.drain()
        await self.producer.flush()
        if offsets and self._consumer is not None:
            await asyncio.wait_for(self._consumer.commit(offsets), self.cfg.bus.request_timeout_s)

    async def _decode_all(self, records: Sequence[Any]) -> list[Incoming]:
        out: list[Incoming] = []
        for rec in records:
            exp = header_experiment(rec.headers)
            if self.only_own_experiment and exp is not None and exp != self.ctx.experiment_id:
                continue  # another experiment sharing the cluster
            try:
                event = self.decode(rec)
            except (ValidationError, ValueError, TypeError, DeadLetterError) as exc:
                await self.dead_letter(rec, f"undecodable {self.ctx.topics.logical(rec.topic)} record: "
                                            f"{_short(exc)}")
                continue
            if self.only_own_experiment and event.experiment_id != self.ctx.experiment_id:
                continue
            if isinstance(event, ControlEvent):
                if event.kind == "finished":
                    self.experiment_finished = event
                if ControlEvent not in self.consumes:
                    continue  # the runtime's own business
            out.append(Incoming(event, rec))
        return out

    async def _handle_safely(self, batch: list[Incoming]) -> None:
        """Handle a batch; on failure retry one by one so a poison record is isolated.  An
        infrastructure error is not the records' fault: it propagates (the batch is rewound)."""
        try:
            await self.handle(batch)
            self._count(batch)
            return
        except INFRASTRUCTURE_ERRORS:
            raise
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
            except INFRASTRUCTURE_ERRORS:
                raise
            except Exception as exc:
                self.metrics.errors.labels(self.name, type(exc).__name__).inc()
                await self.dead_letter(item.record, f"handler failed: {_short(exc)}")

    def _count(self, batch: list[Incoming]) -> None:
        for item in batch:
            self.metrics.processed.labels(self.name, item.event.topic).inc()

    async def _update_lag(self) -> None:
        """Lag = true end offset minus position, per topic (see bus.end_offsets for why a probe).
        A failing query counts towards a broker outage: an idle service finds out this way."""
        consumer = self._consumer
        if consumer is None:
            return
        try:  # also the liveness probe: a consumer whose coordinator died has no assignment to show it
            await self.bus.ping()
            ends = await self.bus.end_offsets(self.input_topics())
        except Exception as exc:
            with contextlib.suppress(InfrastructureLost):
                self._note_outage(BROKER_ERRORS[0](f"lag query failed: {exc!r}"), "probe")
            return
        self._recovered("probe")
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
