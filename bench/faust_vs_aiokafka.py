"""Spike: faust-streaming vs plain aiokafka as the consume loop, on the embedded Tansu broker.

    .venv/bin/python bench/faust_vs_aiokafka.py [--records 50000] [--partitions 4] [--bootstrap H:P]

Measures (a) a faust agent with ``stream.take(256, within=0.2)`` and (b) aiokafka
``getmany(max_records=256)`` with a manual commit after every batch, both decoding every JSON
record, and prints records/s side by side (plus a per-event faust agent for reference).
Then it checks faust's commit control:

(c) ordering: an agent that forwards every record to an output topic; each offset commit faust
    makes is intercepted and compared with the number of outputs the broker has acknowledged;
(d) failure: an agent that raises on one record; does faust commit past the failed batch?

Throughput is the steady-state rate from the first delivered batch to the last record (group-join
time on Tansu is half the session timeout and is reported separately as "wall").  Last line:
``aiokafka_vs_faust=<ratio of records/s>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# imports below follow the sys.path line, so the bench runs from a checkout without installing
from services.core.bus import ensure_topics
from services.core.infra import EmbeddedBroker
from services.monitor.faust_app import faust_broker_url
from services.monitor.status import exact_end_offsets

BATCH = 256
SESSION_TIMEOUT_S = 6.0  # Tansu completes JoinGroup after half the session timeout


@dataclass
class Run:
    name: str
    records: int = 0
    first_batch_at: float | None = None
    first_batch_len: int = 0
    done_at: float | None = None
    started_at: float = field(default_factory=time.perf_counter)
    batches: int = 0

    def add(self, n: int) -> None:
        now = time.perf_counter()
        if self.first_batch_at is None:
            self.first_batch_at, self.first_batch_len = now, n
        self.records += n
        self.batches += 1

    @property
    def rate(self) -> float:
        if self.first_batch_at is None or self.done_at is None or self.done_at <= self.first_batch_at:
            return float("nan")
        return (self.records - self.first_batch_len) / (self.done_at - self.first_batch_at)

    @property
    def wall(self) -> float:
        return (self.done_at or time.perf_counter()) - self.started_at


async def produce(bootstrap: str, topic: str, n: int) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1 << 20, acks="all")
    await producer.start()
    t0 = time.perf_counter()
    try:
        futs = []
        for i in range(n):
            value = orjson.dumps({"experiment_id": "spike", "i": i, "text": f"record {i} of the spike"})
            futs.append(await producer.send(topic, value, key=str(i % 97).encode()))
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return time.perf_counter() - t0


async def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        got = await admin.list_consumer_group_offsets(group, partitions=parts)
        return sum(max(0, m.offset) for m in got.values() if m is not None)
    finally:
        await admin.close()


# ---------------------------------------------------------------------------- (b) aiokafka


async def run_aiokafka(bootstrap: str, topic: str, n: int) -> Run:
    run = Run("aiokafka getmany+commit")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"{topic}.aiokafka",
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                session_timeout_ms=int(SESSION_TIMEOUT_S * 1000), heartbeat_interval_ms=2000)
    await consumer.start()
    try:
        while run.records < n:
            polled = await consumer.getmany(timeout_ms=200, max_records=BATCH)
            records = [r for part in polled.values() for r in part]
            if not records:
                continue
            for r in records:
                orjson.loads(r.value)
            await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in polled.items() if recs})
            run.add(len(records))
        run.done_at = time.perf_counter()
    finally:
        await consumer.stop()
    return run


# ---------------------------------------------------------------------------- faust helpers


def faust_app(bootstrap: str, app_id: str, partitions: int) -> Any:
    import faust

    return faust.App(app_id, broker=faust_broker_url(bootstrap), store="memory://", web_enabled=False,
                     autodiscover=False, topic_partitions=partitions, consumer_auto_offset_reset="earliest",
                     broker_session_timeout=SESSION_TIMEOUT_S, broker_heartbeat_interval=2.0)


async def run_faust_app(app: Any, done: asyncio.Event, timeout_s: float) -> None:
    await app.start()
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        await app.stop()


# ---------------------------------------------------------------------------- (a) faust


async def run_faust(bootstrap: str, topic: str, n: int, partitions: int, timeout_s: float,
                    per_event: bool = False) -> Run:
    """``stream.take(256, within=0.2)`` batches, or (``per_event``) plain ``async for value in stream``."""
    group = f"{topic}.faust" + ("-event" if per_event else "")
    app = faust_app(bootstrap, group, partitions)
    run = Run("faust per-event" if per_event else "faust take(256, 0.2)")
    done = asyncio.Event()
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")

    def count(k: int) -> None:
        run.add(k)
        if run.records >= n and not done.is_set():
            run.done_at = time.perf_counter()
            done.set()

    async def take_agent(stream: Any) -> None:
        async for batch in stream.take(BATCH, within=0.2):
            for value in batch:
                orjson.loads(value)
            count(len(batch))

    async def event_agent(stream: Any) -> None:
        async for value in stream:
            orjson.loads(value)
            count(1)

    app.agent(source, name=f"{group}.agent")(event_agent if per_event else take_agent)
    await run_faust_app(app, done, timeout_s)
    return run


# ---------------------------------------------------------------------------- (c) commit ordering


@dataclass
class CommitCheck:
    commits: int = 0
    violations: int = 0  # commits that covered inputs whose outputs were not yet acknowledged
    max_committed: int = 0
    acked_outputs: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)  # (committed inputs, acked outputs)


def _spy_commits(app: Any, check: CommitCheck, topic: str) -> None:
    """Wrap faust's low-level commit (a private method: the spike needs to see the moment of commit)."""
    consumer = app.consumer
    original: Callable[[Any], Awaitable[bool]] = consumer._commit  # private, see docstring
    positions: dict[int, int] = {}

    async def spy(offsets: Any) -> bool:
        for tp, off in offsets.items():
            if tp.topic == topic:
                positions[tp.partition] = off
        total = sum(positions.values())
        check.commits += 1
        check.max_committed = max(check.max_committed, total)
        check.samples.append((total, check.acked_outputs))
        if total > check.acked_outputs:
            check.violations += 1
        return await original(offsets)

    consumer._commit = spy


async def run_commit_check(bootstrap: str, topic: str, out_topic: str, n: int, partitions: int,
                           timeout_s: float, publish_on_commit: bool = False) -> CommitCheck:
    """``publish_on_commit``: faust's stream_publish_on_commit (outputs held until the commit)."""
    app = faust_app(bootstrap, f"{topic}.faust-commit{'-poc' if publish_on_commit else ''}", partitions)
    app.conf.broker_commit_every = 500  # commit often, so there are many commits to check
    app.conf.stream_publish_on_commit = publish_on_commit
    check = CommitCheck()
    done = asyncio.Event()
    seen = 0
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")
    sink = app.topic(out_topic, key_serializer="raw", value_serializer="raw")

    def on_sent(_fut: Any) -> None:
        check.acked_outputs += 1

    async def agent(stream: Any) -> None:
        nonlocal seen
        async for batch in stream.take(BATCH, within=0.2):
            for value in batch:
                await sink.send(value=value, callback=on_sent)  # queued; not awaited for the ack
            seen += len(batch)
            if seen >= n:
                done.set()

    app.agent(source, name=f"{topic}.faust.forward")(agent)
    _spy_commits(app, check, topic)
    await run_faust_app(app, done, timeout_s)
    return check


# ---------------------------------------------------------------------------- (d) failure


@dataclass
class FailureCheck:
    poison_index: int
    handled: int = 0
    committed: int = 0
    lost: int = 0  # committed but never handled successfully


async def run_failure_check(bootstrap: str, topic: str, n: int, partitions: int,
                            timeout_s: float) -> FailureCheck:
    group = f"{topic}.faust-fail"
    app = faust_app(bootstrap, group, partitions)
    check = FailureCheck(poison_index=n // 2)
    handled: set[int] = set()
    source = app.topic(topic, key_serializer="raw", value_serializer="raw")

    async def agent(stream: Any) -> None:
        async for batch in stream.take(BATCH, within=0.2):
            items = [orjson.loads(v)["i"] for v in batch]
            if check.poison_index in items:
                raise RuntimeError("poison record")  # the agent crashes; the supervisor restarts it
            handled.update(items)

    app.agent(source, name=f"{topic}.faust.poison")(agent)
    await app.start()
    try:  # done when faust has committed the whole topic (records handled or not)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            check.committed = await committed_total(bootstrap, group, topic, partitions)
            if check.committed >= n:
                break
            await asyncio.sleep(0.5)
    finally:
        await app.stop()
    check.committed = await committed_total(bootstrap, group, topic, partitions)
    check.handled = len(handled)
    check.lost = max(0, check.committed - check.handled)
    return check


# ---------------------------------------------------------------------------- main


async def main(args: argparse.Namespace, bootstrap: str) -> float:
    token = uuid.uuid4().hex[:8]
    topic, out_topic, small = f"spike-{token}.in", f"spike-{token}.out", f"spike-{token}.small"
    await ensure_topics(bootstrap, [topic, small], args.partitions, 1)
    t_prod = await produce(bootstrap, topic, args.records)
    await produce(bootstrap, small, args.check_records)
    ends = await exact_end_offsets(bootstrap, [topic])
    print(f"produced {args.records:,} records to {topic} in {t_prod:.2f}s "
          f"({args.records / t_prod:,.0f}/s); end offsets sum {sum(ends.values()):,}")

    aio = await run_aiokafka(bootstrap, topic, args.records)
    fst = await run_faust(bootstrap, topic, args.records, args.partitions, args.timeout)
    runs = [(aio, f"{topic}.aiokafka"), (fst, f"{topic}.faust")]
    if not args.skip_per_event:
        runs.append((await run_faust(bootstrap, topic, args.records, args.partitions, args.timeout,
                                     per_event=True), f"{topic}.faust-event"))

    print(f"\n{'consumer':<28}{'records':>10}{'batches':>9}{'records/s':>12}{'wall s':>9}{'committed':>11}")
    for run, group in runs:
        committed = await committed_total(bootstrap, group, topic, args.partitions)
        print(f"{run.name:<28}{run.records:>10,}{run.batches:>9,}{run.rate:>12,.0f}{run.wall:>9.1f}{committed:>11,}")

    print()
    for poc in (False, True):
        out = f"{out_topic}{'-poc' if poc else ''}"
        await ensure_topics(bootstrap, [out], args.partitions, 1)
        cc = await run_commit_check(bootstrap, small, out, args.check_records, args.partitions, args.timeout,
                                    publish_on_commit=poc)
        outs = sum((await exact_end_offsets(bootstrap, [out])).values())
        print(f"(c) faust commit ordering, stream_publish_on_commit={poc}: {cc.commits} commits intercepted, "
              f"{cc.violations} with committed inputs ahead of acknowledged outputs; max committed "
              f"{cc.max_committed:,}, outputs acked {cc.acked_outputs:,}, output topic end offsets {outs:,}")
        print(f"    first samples (committed inputs, acked outputs at commit time): {cc.samples[:4]}")

    logging.getLogger("faust.agents").setLevel(logging.CRITICAL)  # the crash in (d) is the point
    fc = await run_failure_check(bootstrap, small, args.check_records, args.partitions, args.timeout)
    print(f"(d) faust failure: poison record {fc.poison_index} raised in its batch; handled {fc.handled:,}, "
          f"committed {fc.committed:,} of {args.check_records:,}; committed but never handled: {fc.lost}")

    ratio = aio.rate / fst.rate
    print(f"aiokafka_vs_faust={ratio:.2f}")
    return ratio


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--check-records", type=int, default=5_000, help="records for the commit/failure checks")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--bootstrap", help="use this broker instead of starting an embedded Tansu")
    p.add_argument("--timeout", type=float, default=60.0, help="per faust run")
    p.add_argument("--skip-per-event", action="store_true", help="skip the per-event faust variant")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.bootstrap:
        asyncio.run(main(args, args.bootstrap))
        return
    with EmbeddedBroker() as broker:
        asyncio.run(main(args, broker.bootstrap))


if __name__ == "__main__":
    cli()
