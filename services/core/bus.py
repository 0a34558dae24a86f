"""Kafka plumbing on aiokafka: topic names, topic creation, a producer that stamps envelopes,
and consumer-lag queries.  The consume loop itself lives in :mod:`services.core.runtime`.

Delivery is at-least-once: consumers commit only after their outputs are acknowledged, and every
effect that is not naturally idempotent dedupes by event id.  Idempotent/transactional producers
are opt-in (``bus.exactly_once``) because Tansu rejects InitProducerId.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from services.core.config import BusConfig, ConfigError
from services.core.events import EVENT_TYPES, Envelope, Event

log = logging.getLogger("autointerv.bus")

LOGICAL_TOPICS: tuple[str, ...] = tuple(e.topic for e in EVENT_TYPES)
ESCALATION_PREFIX = "escalations."  # + tier name: input topic of validator tiers after the first


@dataclass(frozen=True)
class Topics:
    """Maps logical topic names to physical ones (``<prefix>.<logical>``)."""

    prefix: str

    def name(self, logical: str) -> str:
        return f"{self.prefix}.{logical}"

    def logical(self, physical: str) -> str:
        return physical[len(self.prefix) + 1:] if physical.startswith(self.prefix + ".") else physical

    def all(self, extra: Iterable[str] = ()) -> list[str]:
        return [self.name(t) for t in (*LOGICAL_TOPICS, *extra)]


async def ensure_topics(bootstrap: str, names: Iterable[str], partitions: int, replication: int) -> None:
    """Create missing topics (idempotent; safe when several services race)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
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


class Producer:
    """AIOKafkaProducer that stamps CloudEvents headers and tracks in-flight sends, so a
    consumer can ``flush()`` (wait for acks) before committing its input offsets."""

    def __init__(self, bus: BusConfig, bootstrap: str, topics: Topics, source: str) -> None:
        kwargs: dict[str, object] = {"acks": "all", "linger_ms": 5, "max_batch_size": 1 << 20,
                                     "max_request_size": 8 << 20}
        if bus.exactly_once:
            kwargs["enable_idempotence"] = True
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id=f"{bus.client_id}-{source}",
                                          **kwargs)
        self.topics = topics
        self.source = source
        self._pending: list[asyncio.Future[object]] = []

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        await self._producer.stop()

    async def send(self, event: Event, topic: str | None = None) -> None:
        """Queue one event; ``topic`` overrides the event's logical topic (escalations)."""
        physical = self.topics.name(topic or event.topic)
        headers = Envelope.for_event(event, self.source).to_headers()
        fut = await self._producer.send(physical, event.to_bytes(), key=event.partition_key().encode(),
                                        headers=headers)
        self._pending.append(fut)

    async def send_raw(self, physical_topic: str, value: bytes, key: bytes | None = None,
                       headers: list[tuple[str, bytes]] | None = None) -> None:
        self._pending.append(await self._producer.send(physical_topic, value, key=key, headers=headers or []))

    async def flush(self) -> None:
        """Wait until every queued record is acknowledged by the broker (raises on failure)."""
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)


def make_consumer(bus: BusConfig, bootstrap: str, topics: list[str], group_id: str,
                  client_id: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, group_id=group_id, client_id=client_id,
        enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=bus.max_poll_records,
        isolation_level="read_committed" if bus.exactly_once else "read_uncommitted",
        session_timeout_ms=bus.session_timeout_ms, heartbeat_interval_ms=bus.heartbeat_interval_ms,
        rebalance_timeout_ms=bus.session_timeout_ms, max_poll_interval_ms=600_000,
        fetch_max_wait_ms=bus.fetch_max_wait_ms,
    )


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    end_offset: int
    committed: int | None

    @property
    def lag(self) -> int:
        return self.end_offset - (self.committed or 0)


async def end_offsets(bootstrap: str, topics: Iterable[str], probe: AIOKafkaConsumer | None = None,
                      correct: bool = True, timeout_s: float = 2.0) -> dict[TopicPartition, int]:
    """True end offsets (offset of the last record + 1) per partition.

    Tansu 0.6 answers ListOffsets(latest) with the *last batch's base offset* + 1, which is too
    small whenever the last batch holds several records (measured: 20 records in one batch per
    partition report an end offset of 1).  So after ListOffsets we fetch from ``end - 1`` and take
    the last record actually returned; on Apache Kafka this returns the same number.  ``correct``
    False skips that fetch (ListOffsets only).
    """
    own = probe is None
    consumer = probe or AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    if own:
        await consumer.start()
    try:
        parts: list[TopicPartition] = []
        for t in topics:
            for p in consumer.partitions_for_topic(t) or await _partitions(consumer, t):
                parts.append(TopicPartition(t, p))
        if not parts:
            return {}
        listed = dict(await consumer.end_offsets(parts))
        return await _correct_ends(consumer, listed, timeout_s) if correct else listed
    finally:
        if own:
            await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or set()


async def _correct_ends(consumer: AIOKafkaConsumer, listed: dict[TopicPartition, int],
                        timeout_s: float = 2.0) -> dict[TopicPartition, int]:
    nonempty = [tp for tp, end in listed.items() if end > 0]
    if not nonempty:
        return listed
    consumer.assign(nonempty)
    for tp in nonempty:
        consumer.seek(tp, listed[tp] - 1)
    ends = dict(listed)
    waiting = set(nonempty)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while waiting and loop.time() < deadline:
        got = await consumer.getmany(*waiting, timeout_ms=200)
        for tp, recs in got.items():
            if recs:  # the batch holding offset end-1 is the log's last batch
                ends[tp] = max(ends[tp], recs[-1].offset + 1)
                waiting.discard(tp)
    return ends


async def group_lag(bootstrap: str, group_id: str, topics: Iterable[str]) -> list[PartitionLag]:
    """Lag of one consumer group on the given topics (end offset minus committed offset), over
    connections opened for this one query; :class:`LagProbe` keeps them for repeated queries."""
    probe = LagProbe(bootstrap)
    try:
        return await probe.lag(group_id, topics)
    finally:
        await probe.close()


class LagProbe:
    """A consumer (never in a group) and an admin client kept open for repeated lag queries:
    opening both per query cost two broker connections every ``generator.lag_check_s``."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None

    async def lag(self, group_id: str, topics: Iterable[str]) -> list[PartitionLag]:
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
            await self._consumer.start()
        if self._admin is None:
            self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await self._admin.start()
        ends = await end_offsets(self.bootstrap, topics, probe=self._consumer)
        committed = await self._admin.list_consumer_group_offsets(group_id, partitions=list(ends))
        return _lags(ends, committed)

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()
        self._consumer = self._admin = None


def _lags(ends: dict[TopicPartition, int], committed: Mapping[TopicPartition, Any]) -> list[PartitionLag]:
    out = []
    for tp, end in sorted(ends.items(), key=lambda kv: (kv[0].topic, kv[0].partition)):
        meta = committed.get(tp)
        off = meta.offset if meta is not None and meta.offset >= 0 else None
        out.append(PartitionLag(tp.topic, tp.partition, end, off))
    return out
