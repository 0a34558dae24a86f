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
import logging
import os
import socket
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from aiokafka import TopicPartition

from services.core.bus import Consumer
from services.core.context import (  # re-exported: plug-ins import them from here
    Incoming,
    ServiceContext,
    generator_group_suffix,
    group_name,
)
from services.core.events import ControlEvent, DeadLetter, Event
from services.core.faults import (  # re-exported: services import them from here
    INFRASTRUCTURE_ERRORS,
    REDIS_ERRORS,
    DeadLetterError,
    InfrastructureError,
    InfrastructureLost,
    OutageTracker,
    bounded,
)
from services.core.loop import ServiceLoop
from services.core.metrics import Health

__all__ = ["INFRASTRUCTURE_ERRORS", "REDIS_ERRORS", "DeadLetterError", "Incoming", "InfrastructureError",
           "InfrastructureLost", "Service", "ServiceContext", "bounded", "generator_group_suffix", "group_name",
           ]

log = logging.getLogger("autointerv.runtime")


class Service(ServiceLoop, ABC):
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
        self.outages = OutageTracker(
            self.display_name, {"broker": ctx.cfg.bus.broker_loss_s, "cache": ctx.cfg.cache.outage_s},
            {"broker": self.bus.address, "cache": "the cache (Redis)"}, self.clock, self.log,
            lambda kind: self.metrics.errors.labels(self.name, f"{kind}_unavailable").inc())
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
