"""What a service gets from the process that runs it, and the names derived from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from services.core.bus import Bus, KafkaBus
from services.core.clock import Clock, SystemClock
from services.core.config import Config
from services.core.events import Envelope, Event
from services.core.metrics import Metrics
from services.core.resources import Resources
from services.core.topics import Topics


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
    owns_bus: bool = field(default=False, init=False)  # True when __post_init__ made the bus

    def __post_init__(self) -> None:
        # a bus made here belongs to this context, and the services that use it close it when they
        # stop (a bus passed in belongs to its caller: the orchestrator closes it once, at the end)
        self.owns_bus = self.bus is None
        if self.bus is None:
            self.bus = KafkaBus(self.cfg.bus, self.bootstrap, self.topics)

    @property
    def experiment_id(self) -> str:
        return self.cfg.experiment_id

    def redis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2,
                                       health_check_interval=10)

