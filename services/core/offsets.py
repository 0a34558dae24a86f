"""Offsets and consumer lag on a Kafka broker: true end offsets (Tansu answers ListOffsets with
the last batch's base offset), committed offsets per group, and a probe that keeps its connections
for repeated queries (the runtime's lag metric and liveness probe, the generator's backpressure,
``autointerv status``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


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
                      correct: bool = True, timeout_s: float = 2.0,
                      security: Mapping[str, Any] | None = None) -> dict[TopicPartition, int]:
    """True end offsets (offset of the last record + 1) per partition.

    Tansu 0.6 answers ListOffsets(latest) with the *last batch's base offset* + 1, which is too
    small whenever the last batch holds several records (measured: 20 records in one batch per
    partition report an end offset of 1).  So after ListOffsets we fetch from ``end - 1`` and take
    the last record actually returned; on Apache Kafka this returns the same number.  ``correct``
    False skips that fetch (ListOffsets only).
    """
    own = probe is None
    consumer = probe or AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **(security or {}))
    try:
        if own:
            await consumer.start()
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


async def group_lag(bootstrap: str, group_id: str, topics: Iterable[str],
                    security: Mapping[str, Any] | None = None) -> list[PartitionLag]:
    """Lag of one consumer group on the given topics (end offset minus committed offset), over
    connections opened for this one query; :class:`LagProbe` keeps them for repeated queries."""
    probe = LagProbe(bootstrap, security)
    try:
        return await probe.lag(group_id, topics)
    finally:
        await probe.close()


async def start_cleanly(client: Any, stop: Callable[[], Awaitable[Any]]) -> Any:
    """``client`` started; a start that fails is stopped, never left half-open for the garbage
    collector ("Unclosed AIOKafkaConsumer" at interpreter exit)."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await stop()
        raise
    return client


class LagProbe:
    """A consumer (never in a group) and an admin client kept open for repeated lag queries:
    opening both per query cost two broker connections every ``generator.lag_check_s``."""

    def __init__(self, bootstrap: str, security: Mapping[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.security = dict(security or {})
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None

    async def _open(self) -> AIOKafkaConsumer:
        """The probe's consumer (callers serialise queries: KafkaBus holds one lock around them)."""
        if self._consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, **self.security)
            self._consumer = await start_cleanly(consumer, consumer.stop)
        return self._consumer

    async def end_offsets(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        return await end_offsets(self.bootstrap, topics, probe=await self._open())

    async def ping(self) -> None:
        consumer = await self._open()
        await consumer._client.fetch_all_metadata()  # raises KafkaConnectionError when no broker answers

    async def lag(self, group_id: str, topics: Iterable[str]) -> list[PartitionLag]:
        ends = await self.end_offsets(topics)
        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **self.security)
            self._admin = await start_cleanly(admin, admin.close)
        committed = await self._admin.list_consumer_group_offsets(group_id, partitions=list(ends))
        return lags_of(ends, committed)

    async def close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
        self._consumer = self._admin = None


def lags_of(ends: Mapping[TopicPartition, int], committed: Mapping[TopicPartition, Any]) -> list[PartitionLag]:
    """Per-partition lag rows from end offsets and committed offsets (``OffsetAndMetadata`` or int)."""
    out = []
    for tp, end in sorted(ends.items(), key=lambda kv: (kv[0].topic, kv[0].partition)):
        meta = committed.get(tp)
        off = meta if isinstance(meta, int) else (meta.offset if meta is not None else None)
        out.append(PartitionLag(tp.topic, tp.partition, end, off if off is not None and off >= 0 else None))
    return out

