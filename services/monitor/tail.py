"""``autointerv tail TOPIC``: a topic's events as JSON lines, read with aiokafka.

Why not kcat: kcat, confluent-kafka and every other librdkafka client fail against the embedded
Tansu broker (``ApiVersionRequest failed: Local: Read underflow``, with default settings and with
``api.version.request=false``).  aiokafka (which the services use) works, so this command is the
portable way to look at a topic; against a real Kafka kcat works too.

Reads without a consumer group (assigns every partition), so it never moves any service's
committed offsets.  Each output line is the event's own JSON plus ``_topic``, ``_partition`` and
``_offset``; a record that is not JSON is printed as ``{"_undecodable_b64": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import Callable
from typing import TextIO

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from services.core.bus import Topics, end_offsets


def physical_topic(topics: Topics, name: str) -> str:
    """``texts`` -> ``<prefix>.texts``; a name that already has the prefix is kept."""
    return name if name.startswith(topics.prefix + ".") else topics.name(name)


def record_line(rec: ConsumerRecord, experiment: str | None) -> bytes | None:
    """The JSON line for one record, or None when it belongs to another experiment."""
    try:
        obj = orjson.loads(rec.value or b"")
    except orjson.JSONDecodeError:
        obj = {"_undecodable_b64": base64.b64encode(rec.value or b"").decode()}
    if not isinstance(obj, dict):
        obj = {"_value": obj}
    if experiment is not None:
        headers = {k: v.decode(errors="replace") for k, v in (rec.headers or [])}
        exp = obj.get("experiment_id", headers.get("ce_experiment_id"))
        if exp != experiment:
            return None
    obj.update({"_topic": rec.topic, "_partition": rec.partition, "_offset": rec.offset})
    return orjson.dumps(obj)


async def tail_topic(bootstrap: str, topic: str, *, experiment: str | None = None, from_beginning: bool = False,
                     limit: int | None = None, exit_at_end: bool = False, out: TextIO | None = None,
                     stop: Callable[[], bool] = lambda: False, client_kwargs: dict[str, object] | None = None) -> int:
    """Print events of ``topic`` (physical name); return how many were printed.

    Starts at the end (only new events) unless ``from_beginning``; stops after ``limit`` events,
    at the end of the topic when ``exit_at_end``, or when ``stop()`` is true."""
    out = out or sys.stdout
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                **(client_kwargs or {}))
    await consumer.start()
    printed = 0
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise SystemExit(f"topic {topic} does not exist on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        ends = await end_offsets(bootstrap, [topic], probe=None)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            for tp in tps:
                consumer.seek(tp, ends.get(tp, 0))
        while not stop():
            if exit_at_end and await _at_end(consumer, tps, ends):
                break
            got = await consumer.getmany(timeout_ms=500, max_records=500)
            for recs in got.values():
                for rec in recs:
                    line = record_line(rec, experiment)
                    if line is None:
                        continue
                    out.write(line.decode() + "\n")
                    printed += 1
                    if limit is not None and printed >= limit:
                        out.flush()
                        return printed
            out.flush()
    finally:
        await consumer.stop()
    return printed


async def _at_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition], ends: dict[TopicPartition, int]) -> bool:
    for tp in tps:
        if await consumer.position(tp) < ends.get(tp, 0):
            return False
    return True


def run_tail(bootstrap: str, topic: str, **kwargs: object) -> int:
    try:
        return asyncio.run(tail_topic(bootstrap, topic, **kwargs))  # type: ignore[arg-type]
    except KeyboardInterrupt:
        return 0
