"""An in-memory bus with Kafka's semantics, and a burst-mode driver that runs services on it.

In the spirit of FastStream's ``TestKafkaBroker`` and arq's ``burst=True``: the *same* service
classes, through the *same* runtime loop (``Service.step``), exchange real serialised records on
topics with partitions (by key), consumer groups, committed offsets, headers and dead letters.
Nothing is re-implemented: a statistics test or a benchmark that runs ``build_services(ctx)`` on
this bus runs what ships.  What it leaves out is the network and wall-clock time:

* :meth:`MemoryBus.run_until_idle` steps every service in a fixed order without waiting; when a
  whole pass handles nothing it advances the :class:`~services.core.clock.VirtualClock`, so
  timers (ticks, snapshot cadence, idle timeouts) fire as a function of the event stream.  A run
  is therefore deterministic for a given config and seed, and thousands of runs are affordable.
* Redis stays real (``REDIS_URL`` or the embedded Valkey): state, caches and budgets are the
  services' own code paths.

``tests/test_memory_bus_parity.py`` holds this bus to the Tansu broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition

from services.core.bus import Bus, EventProducer
from services.core.clock import VirtualClock
from services.core.config import BusConfig
from services.core.offsets import PartitionLag, lags_of
from services.core.topics import Topics

if TYPE_CHECKING:
    from services.core.runtime import Service


@dataclass(frozen=True)
class Record:
    """What a consumer receives: the fields of aiokafka's ``ConsumerRecord`` the runtime reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp: int
    seq: int  # position in the bus's global publish order (observers use it)


Observer = Callable[[Record], None]


@dataclass
class _Group:
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    members: list[MemoryConsumer] = field(default_factory=list)


class MemoryBus(Bus):
    """Topics as lists of partitions, consumer groups with committed offsets, observers."""

    def __init__(self, cfg: BusConfig, topics: Topics) -> None:
        super().__init__(cfg, topics)
        self._logs: dict[str, list[list[Record]]] = {}
        self._groups: dict[str, _Group] = {}
        self._seq = 0
        self._changed = asyncio.Event()
        self.observers: list[Observer] = []

    @property
    def address(self) -> str:
        return "memory"

    # ------------------------------------------------------------------ topics and records

    async def ensure_topics(self, names: Iterable[str]) -> None:
        for n in names:
            self._topic(n)

    def _topic(self, name: str) -> list[list[Record]]:
        if name not in self._logs:  # auto-created with the configured partitions, like Kafka's default
            self._logs[name] = [[] for _ in range(self.cfg.partitions)]
            for group in self._groups.values():
                for member in group.members:
                    member.reassign()
        return self._logs[name]

    def append(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> Record:
        parts = self._topic(topic)
        p = zlib.crc32(key) % len(parts) if key is not None else self._seq % len(parts)
        rec = Record(topic, p, len(parts[p]), key, value, list(headers), int(time.time() * 1000), self._seq)
        self._seq += 1
        parts[p].append(rec)
        for obs in self.observers:
            obs(rec)
        self._changed.set()
        return rec

    def records(self, topic: str) -> list[Record]:
        """Every record of a physical topic, in publish order."""
        return sorted((r for part in self._logs.get(topic, []) for r in part), key=lambda r: r.seq)

    def partitions_of(self, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, i) for i in range(len(self._logs.get(topic, [])))]

    def end(self, tp: TopicPartition) -> int:
        parts = self._logs.get(tp.topic)
        return len(parts[tp.partition]) if parts and tp.partition < len(parts) else 0

    def read(self, tp: TopicPartition, start: int, limit: int) -> list[Record]:
        return self._logs[tp.topic][tp.partition][start:start + limit]

    # ------------------------------------------------------------------ clients

    def producer(self, source: str) -> EventProducer:
        return MemoryProducer(self, source)

    def consumer(self, topics: list[str], group_id: str, client_id: str) -> MemoryConsumer:
        return MemoryConsumer(self, topics, group_id, client_id)

    def group(self, group_id: str) -> _Group:
        return self._groups.setdefault(group_id, _Group())

    async def end_offsets(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        return {tp: self.end(tp) for t in topics for tp in self.partitions_of(t)}

    async def group_lag(self, group_id: str, topics: Iterable[str]) -> list[PartitionLag]:
        ends = await self.end_offsets(topics)
        return lags_of(ends, dict(self.group(group_id).committed))

    async def wait_for_records(self, timeout_s: float) -> None:
        """Wait (in real time) until something is appended; for services run outside burst mode."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    # ------------------------------------------------------------------ burst mode

    async def run_until_idle(self, services: Sequence[Service], clock: VirtualClock, *,
                             until: Callable[[], bool] | None = None, tick_s: float = 0.25,
                             max_idle_s: float = 600.0, max_passes: int = 10_000_000) -> str:
        """Step ``services`` (already started) in order until ``until()`` is true, some service says
        it is ``finished()``, or nothing has happened for ``max_idle_s`` of virtual time.

        Each pass gives every service one ``step(wait=False)``: one poll of at most
        ``bus.max_poll_records`` records, then its tick if the virtual clock says one is due.  A pass
        that handles no record and publishes nothing advances the clock by ``tick_s``."""
        idle = 0.0
        for _ in range(max_passes):
            before = self._seq
            handled = 0
            for svc in services:
                handled += await svc.step(wait=False)
            if until is not None and until():
                return "until"
            done = [s.name for s in services if s.finished()]
            if done:
                return f"finished ({', '.join(done)})"
            if handled == 0 and self._seq == before:
                clock.advance(tick_s)
                idle += tick_s
                if idle >= max_idle_s:
                    return f"idle for {max_idle_s:.0f}s of virtual time"
            else:
                idle = 0.0
        return f"stopped after {max_passes} passes"


class MemoryProducer(EventProducer):
    """Appends at once; every send is acknowledged immediately (there is no broker to lose)."""

    def __init__(self, bus: MemoryBus, source: str) -> None:
        super().__init__(bus.topics, source, bus.cfg.request_timeout_s)
        self.bus = bus

    async def _send(self, physical_topic: str, value: bytes, key: bytes | None,
                    headers: list[tuple[str, bytes]]) -> asyncio.Future[object]:
        rec = self.bus.append(physical_topic, value, key, headers)
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        fut.set_result(rec)
        return fut


class MemoryConsumer:
    """A group member: partitions are shared round-robin among the group's members, positions start
    at the group's committed offsets, ``commit`` stores them (the same contract as aiokafka's)."""

    def __init__(self, bus: MemoryBus, topics: list[str], group_id: str, client_id: str) -> None:
        self.bus = bus
        self.topics = list(topics)
        self.group_id = group_id
        self.client_id = client_id
        self._assigned: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._started = False

    async def start(self) -> None:
        for t in self.topics:
            self.bus._topic(t)
        group = self.bus.group(self.group_id)
        group.members.append(self)
        self._started = True
        for member in group.members:
            member.reassign()

    async def stop(self) -> None:
        if not self._started:
            return
        group = self.bus.group(self.group_id)
        group.members.remove(self)
        self._started = False
        for member in group.members:
            member.reassign()

    def reassign(self) -> None:
        """Round-robin assignment over the group's members in join order (a rebalance)."""
        group = self.bus.group(self.group_id)
        if self not in group.members:
            self._assigned = []
            return
        subscribed = sorted({t for m in group.members for t in m.topics})
        every = [tp for t in subscribed for tp in self.bus.partitions_of(t)]
        i = group.members.index(self)
        mine = [tp for k, tp in enumerate(every) if k % len(group.members) == i and tp.topic in self.topics]
        self._assigned = mine
        self._positions = {tp: group.committed.get(tp, 0) for tp in mine}

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        out = self._take(partitions, max_records or self.bus.cfg.max_poll_records)
        if not out and timeout_ms > 0:
            await self.bus.wait_for_records(timeout_ms / 1000)
            out = self._take(partitions, max_records or self.bus.cfg.max_poll_records)
        return out

    def _take(self, partitions: Sequence[TopicPartition], limit: int) -> dict[TopicPartition, list[Any]]:
        out: dict[TopicPartition, list[Any]] = {}
        for tp in partitions or self._assigned:
            if limit <= 0:
                break
            if tp in self._paused or tp not in self._positions:
                continue
            recs = self.bus.read(tp, self._positions[tp], limit)
            if recs:
                out[tp] = recs
                self._positions[tp] += len(recs)
                limit -= len(recs)
        return out

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        committed = self.bus.group(self.group_id).committed
        for tp, off in (offsets if offsets is not None else self._positions).items():
            committed[tp] = off

    async def position(self, tp: TopicPartition) -> int:
        return self._positions[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp in self._positions:
            self._positions[tp] = offset

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused.difference_update(partitions)

    def pending(self) -> int:
        """Records assigned to this member and not yet polled."""
        return sum(self.bus.end(tp) - pos for tp, pos in self._positions.items())


def new_memory_bus(cfg: BusConfig, prefix: str | None = None) -> tuple[MemoryBus, VirtualClock]:
    """A memory bus and the virtual clock its burst driver advances."""
    return MemoryBus(cfg, Topics(prefix or cfg.topic_prefix)), VirtualClock()
