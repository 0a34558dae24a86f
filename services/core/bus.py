"""The bus the services talk to: Kafka through aiokafka, or the in-memory bus of the same shape.

A service never constructs a Kafka client itself: it asks ``ctx.bus`` for a producer and a
consumer.  :class:`KafkaBus` is the production implementation (the embedded Tansu broker or a
real Kafka); :class:`services.core.memory_bus.MemoryBus` runs the same services in one process
for statistics tests and benchmarks, held to this one by a parity test.

Delivery is at-least-once: consumers commit only after their outputs are acknowledged, and every
effect that is not naturally idempotent dedupes by event id.  Idempotent/transactional producers
are opt-in (``bus.exactly_once``) because Tansu rejects InitProducerId.  Flushes and commits have
deadlines (``bus.request_timeout_s``): a broker that stopped answering raises
:class:`BrokerUnavailable` instead of hanging the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from services.core.config import BusConfig, ConfigError
from services.core.events import Envelope, Event
from services.core.offsets import LagProbe, PartitionLag, end_offsets, group_lag, lags_of, start_cleanly
from services.core.topics import ESCALATION_PREFIX, LOGICAL_TOPICS, Topics, escalation_topic

__all__ = [
    "ESCALATION_PREFIX",
    "LOGICAL_TOPICS",
    "BrokerUnavailable",
    "Bus",
    "Consumer",
    "EventProducer",
    "KafkaBus",
    "LagProbe",
    "PartitionLag",
    "Producer",
    "Topics",
    "client_security_kwargs",
    "end_offsets",
    "ensure_topics",
    "escalation_topic",
    "group_lag",
    "lags_of",
    "make_consumer",
]

log = logging.getLogger("autointerv.bus")


class BrokerUnavailable(RuntimeError):
    """The broker did not acknowledge a flush or a commit in time (or refused it)."""


#: Errors that mean "the infrastructure is not answering", never "this record is bad": the runtime
#: rewinds and retries the batch instead of dead-lettering its records.
BROKER_ERRORS: tuple[type[BaseException], ...] = (BrokerUnavailable, KafkaError)


class Consumer(Protocol):
    """The part of aiokafka's consumer the runtime uses; the memory bus implements the same."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Any]]: ...
    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    async def position(self, tp: TopicPartition) -> int: ...
    def seek(self, tp: TopicPartition, offset: int) -> None: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...


class EventProducer(ABC):
    """Stamps CloudEvents headers and tracks in-flight sends, so a consumer can ``flush()`` (wait
    for acknowledgements) before committing its input offsets."""

    def __init__(self, topics: Topics, source: str, request_timeout_s: float | None = None) -> None:
        self.topics = topics
        self.source = source
        self.request_timeout_s = request_timeout_s
        self._pending: list[asyncio.Future[object]] = []

    async def start(self) -> None:
        """Connect (no-op for transports that need no connection)."""

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()

    @abstractmethod
    async def _send(self, physical_topic: str, value: bytes, key: bytes | None,
                    headers: list[tuple[str, bytes]]) -> asyncio.Future[object]:
        """Queue one record; return a future resolved when the broker acknowledges it."""

    async def send(self, event: Event, topic: str | None = None) -> None:
        """Queue one event; ``topic`` overrides the event's logical topic (escalations)."""
        physical = self.topics.name(topic or event.topic)
        headers = Envelope.for_event(event, self.source).to_headers()
        self._pending.append(await self._send(physical, event.to_bytes(), event.partition_key().encode(), headers))

    async def send_raw(self, physical_topic: str, value: bytes, key: bytes | None = None,
                       headers: list[tuple[str, bytes]] | None = None) -> None:
        self._pending.append(await self._send(physical_topic, value, key, headers or []))

    @property
    def in_flight(self) -> int:
        return sum(1 for f in self._pending if not f.done())

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every queued record is acknowledged; :class:`BrokerUnavailable` when that takes
        longer than ``timeout_s`` (default ``request_timeout_s``) or the broker refused one."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        limit = self.request_timeout_s if timeout_s is None else timeout_s
        gathered = asyncio.gather(*pending)
        gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even after a timeout
        try:
            await asyncio.wait_for(asyncio.shield(gathered), limit)
        except TimeoutError:
            self._pending = [f for f in pending if not f.done()] + self._pending
            raise BrokerUnavailable(f"{len(self._pending)} record(s) not acknowledged within {limit:.0f}s") from None
        except KafkaError as exc:
            raise BrokerUnavailable(f"the broker refused a record: {exc!r}") from exc


class Producer(EventProducer):
    """The Kafka producer (aiokafka)."""

    def __init__(self, bus: BusConfig, bootstrap: str, topics: Topics, source: str) -> None:
        super().__init__(topics, source, bus.request_timeout_s)
        kwargs: dict[str, object] = {"acks": "all", "linger_ms": 5, "max_batch_size": 1 << 20,
                                     "max_request_size": 8 << 20,
                                     "request_timeout_ms": int(bus.request_timeout_s * 1000)}
        if bus.exactly_once:
            kwargs["enable_idempotence"] = True
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id=f"{bus.client_id}-{source}",
                                          **kwargs, **client_security_kwargs(bus))
        self._started = False

    async def start(self) -> None:
        await start_cleanly(self._producer, lambda: asyncio.wait_for(self._producer.stop(), self.request_timeout_s))
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        await super().stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._producer.stop(), self.request_timeout_s)
        self._started = False

    async def _send(self, physical_topic: str, value: bytes, key: bytes | None,
                    headers: list[tuple[str, bytes]]) -> asyncio.Future[object]:
        try:
            return await self._producer.send(physical_topic, value, key=key, headers=headers)
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot queue a record for {physical_topic}: {exc!r}") from exc


class Bus(ABC):
    """Where services get producers and consumers, and what operators' lag queries go through."""

    def __init__(self, cfg: BusConfig, topics: Topics) -> None:
        self.cfg = cfg
        self.topics = topics

    @abstractmethod
    async def ensure_topics(self, names: Iterable[str]) -> None:
        """Create missing topics (idempotent)."""

    @abstractmethod
    def producer(self, source: str) -> EventProducer: ...

    @abstractmethod
    def consumer(self, topics: list[str], group_id: str, client_id: str) -> Consumer: ...

    @abstractmethod
    async def end_offsets(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        """True end offset (last record + 1) of every partition of these physical topics."""

    @abstractmethod
    async def group_lag(self, group_id: str, topics: Iterable[str]) -> list[PartitionLag]: ...

    @property
    def address(self) -> str:
        """Where the bus is, in words (logged at start-up, printed by ``autointerv run``)."""
        return type(self).__name__

    async def ping(self) -> None:
        """Raise unless the bus answers now (the runtime's liveness probe)."""

    async def close(self) -> None:
        """Release connections held for lag queries."""


class KafkaBus(Bus):
    """aiokafka against the embedded Tansu broker or a real Kafka."""

    def __init__(self, cfg: BusConfig, bootstrap: str, topics: Topics) -> None:
        super().__init__(cfg, topics)
        self.bootstrap = bootstrap
        self.security = client_security_kwargs(cfg)
        self._probe = LagProbe(bootstrap, self.security)
        self._probe_lock = asyncio.Lock()  # the probe's consumer seeks: one query at a time
        self._last_ping: tuple[float, BaseException | None] = (float("-inf"), None)

    @property
    def address(self) -> str:
        return self.bootstrap

    async def ensure_topics(self, names: Iterable[str]) -> None:
        await ensure_topics(self.bootstrap, names, self.cfg.partitions, self.cfg.replication_factor, self.security)

    def producer(self, source: str) -> EventProducer:
        return Producer(self.cfg, self.bootstrap, self.topics, source)

    def consumer(self, topics: list[str], group_id: str, client_id: str) -> Consumer:
        return make_consumer(self.cfg, self.bootstrap, topics, group_id, client_id)

    @property
    def _probe_timeout_s(self) -> float:
        """Lag queries and pings are auxiliary: they answer within seconds or count as a failure
        (a 30 s request timeout here made a dead broker take minutes to notice)."""
        return min(PROBE_TIMEOUT_S, self.cfg.request_timeout_s)

    async def end_offsets(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        async with self._probe_lock:
            return await _within(self._probe.end_offsets(topics), self._probe_timeout_s)

    async def ping(self) -> None:
        """A metadata request that must reach a broker (aiokafka answers many queries from its
        cached metadata, so a dead broker can look alive to them).  Every service of the process
        asks; one request answers them all for ``PING_REUSE_S``, so the probes never pile up."""
        loop = asyncio.get_running_loop()
        async with self._probe_lock:
            if loop.time() - self._last_ping[0] < PING_REUSE_S:
                if self._last_ping[1] is not None:
                    raise self._last_ping[1]
                return
            try:
                await _within(self._probe.ping(), self._probe_timeout_s)
                self._last_ping = (loop.time(), None)
            except Exception as exc:
                self._last_ping = (loop.time(), exc)
                raise

    async def group_lag(self, group_id: str, topics: Iterable[str]) -> list[PartitionLag]:
        async with self._probe_lock:
            return await _within(self._probe.lag(group_id, topics), self._probe_timeout_s)

    async def close(self) -> None:
        closing = asyncio.ensure_future(self._probe.close())  # never waits on a dead broker for long
        await asyncio.wait({closing}, timeout=self._probe_timeout_s)


def client_security_kwargs(bus: BusConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """aiokafka keyword arguments for ``bus.security_protocol`` (SASL and/or TLS on a real Kafka);
    empty for PLAINTEXT.  Every producer, consumer and admin client takes them.  The SASL password
    is read from the environment variable ``bus.sasl_password_env`` names, never from the config."""
    if bus.security_protocol == "PLAINTEXT":
        return {}
    kwargs: dict[str, Any] = {"security_protocol": bus.security_protocol}
    if bus.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        kwargs["ssl_context"] = create_ssl_context(cafile=bus.ssl_cafile)
    if bus.security_protocol.startswith("SASL_"):
        env = os.environ if environ is None else environ
        name = bus.sasl_password_env or ""
        if not env.get(name):
            raise ConfigError(f"bus.sasl_password_env: environment variable {name!r} is not set")
        kwargs.update(sasl_mechanism=bus.sasl_mechanism, sasl_plain_username=bus.sasl_username,
                      sasl_plain_password=env[name])
    return kwargs



PROBE_TIMEOUT_S = 5.0
PING_REUSE_S = 2.0


async def _within(work: Any, timeout_s: float) -> Any:
    """``work`` within ``timeout_s`` or TimeoutError, without waiting for a cancelled aiokafka
    call to unwind (it keeps retrying the dead broker while cancelled)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise TimeoutError(f"no answer from the broker within {timeout_s:.0f}s")
    return task.result()


async def ensure_topics(bootstrap: str, names: Iterable[str], partitions: int, replication: int,
                        security: Mapping[str, Any] | None = None) -> None:
    """Create missing topics (idempotent; safe when several services race)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **(security or {}))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another service won the race
                await admin.create_topics([NewTopic(n, partitions, replication) for n in missing])
            log.info("created topics", extra={"topics": missing})
    finally:
        await admin.close()


def make_consumer(bus: BusConfig, bootstrap: str, topics: list[str], group_id: str,
                  client_id: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, group_id=group_id, client_id=client_id,
        enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=bus.max_poll_records,
        isolation_level="read_committed" if bus.exactly_once else "read_uncommitted",
        session_timeout_ms=bus.session_timeout_ms, heartbeat_interval_ms=bus.heartbeat_interval_ms,
        rebalance_timeout_ms=bus.session_timeout_ms, max_poll_interval_ms=600_000,
        fetch_max_wait_ms=bus.fetch_max_wait_ms, **client_security_kwargs(bus),
    )  # aiokafka's own request timeout (40 s) stays: a group join on Tansu takes session_timeout / 2
