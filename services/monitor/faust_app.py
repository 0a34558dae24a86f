"""The topic monitor: a faust-streaming app that counts every pipeline topic's records per
experiment and event type in tumbling windows, and publishes a per-window throughput summary.

Why faust here and aiokafka everywhere else (evidence in docs/faust-spike.md): the pipeline
services need batch polls, commits held until outputs are acknowledged (and, for the clusterer,
until a snapshot is saved), dead-lettering and pause/resume; faust's commit is periodic and
ack-driven, and a failing agent's event is acked anyway.  A monitor that only counts needs none of
that and gets faust's windowed, changelog-backed Table and timers for free.

Layout: one agent per pipeline topic (``<prefix>.<logical>``, escalation topics included) adds 1
to a tumbling-window Table keyed ``experiment|topic|type``; a timer publishes each closed window
as JSON (orjson) to ``<prefix>.monitor`` (one record per experiment, key = experiment id, the same
CloudEvents headers as pipeline records) and sets Prometheus gauges.  The table store is in memory
and is rebuilt from its changelog topic on restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson

from services.core.bus import ESCALATION_PREFIX, Topics, end_offsets, ensure_topics
from services.core.config import Config
from services.core.events import EVENTS_BY_TOPIC, SCHEMA_VERSION, new_id
from services.core.metrics import Health, Metrics

log = logging.getLogger("autointerv.monitor")

MONITOR_TOPIC = "monitor"  # logical name of the summary topic
SUMMARY_TYPE = "autointerv.monitor.window"
SERVICE = "monitor"
UNKNOWN = "unknown"
_SEP = "|"  # experiment ids match [A-Za-z0-9._-]+ and topics/types never contain "|"

WindowItem = tuple[tuple[str, tuple[float, float]], int]  # ((key, (start, end)), count)


@dataclass(frozen=True)
class MonitorSettings:
    """Knobs of the monitor; defaults suit both Tansu and a real Kafka."""

    window_s: float = 10.0
    expires_s: float = 600.0  # windows older than this are dropped from the table
    grace_s: float = 1.0  # a window is published this long after it ends (late records)
    # Tansu answers a JoinGroup only after half the session timeout; faust's default (60 s) would
    # make every start take 30 s there.
    session_timeout_s: float = 6.0
    heartbeat_s: float = 2.0
    offset_reset: str = "earliest"  # event-time windows make a replay land in the right windows
    app_id: str | None = None  # default "<prefix>.monitor" (also the consumer group id)


def count_key(experiment: str, topic: str, etype: str) -> str:
    return _SEP.join((experiment, topic, etype))


def split_key(key: str) -> tuple[str, str, str]:
    experiment, topic, etype = key.split(_SEP, 2)
    return experiment, topic, etype


def _header_map(headers: Any) -> dict[str, bytes]:
    if not headers:
        return {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {str(k): bytes(v) for k, v in items if v is not None}


def record_identity(logical: str, headers: Any, value: bytes | None) -> tuple[str, str]:
    """(experiment id, event type) of a record: from the CloudEvents headers, else the JSON body."""
    h = _header_map(headers)
    experiment = h.get("ce_experiment_id", b"").decode(errors="replace")
    etype = h.get("ce_type", b"").decode(errors="replace")
    if not experiment and value:
        with contextlib.suppress(orjson.JSONDecodeError, TypeError):
            body = orjson.loads(value)
            if isinstance(body, dict) and isinstance(body.get("experiment_id"), str):
                experiment = body["experiment_id"]
    if not etype:
        event_cls = EVENTS_BY_TOPIC.get(logical)
        etype = event_cls.type if event_cls is not None else UNKNOWN
    return experiment or UNKNOWN, etype


def closed_window_start(now: float, window_s: float, grace_s: float) -> float:
    """Start of the newest window that ended at least ``grace_s`` ago."""
    return math.floor((now - grace_s) / window_s) * window_s - window_s


def window_summaries(items: Iterable[WindowItem], window_start: float, window_s: float,
                     generated_at: float | None = None) -> dict[str, dict[str, Any]]:
    """Per-experiment summary of one window: records and records/s per topic, counts per type."""
    out: dict[str, dict[str, Any]] = {}
    for (key, (start, _end)), count in items:
        if abs(start - window_start) > 1e-6 or count <= 0:
            continue
        experiment, topic, etype = split_key(key)
        exp = out.setdefault(experiment, {
            "experiment_id": experiment, "window_start": window_start, "window_end": window_start + window_s,
            "window_s": window_s, "total": 0, "topics": {},
            "generated_at": time.time() if generated_at is None else generated_at,
        })
        t = exp["topics"].setdefault(topic, {"records": 0, "per_s": 0.0, "types": {}})
        t["records"] += count
        t["types"][etype] = t["types"].get(etype, 0) + count
        exp["total"] += count
    for exp in out.values():
        exp["per_s"] = exp["total"] / window_s
        for t in exp["topics"].values():
            t["per_s"] = t["records"] / window_s
    return out


def monitored_topics(cfg: Config) -> list[str]:
    """Physical names of every pipeline topic of this config, escalation topics included."""
    topics = Topics(cfg.bus.topic_prefix)
    return topics.all(ESCALATION_PREFIX + t.name for t in cfg.validator.tiers[1:])


def faust_broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip())


class TopicMonitor:
    """The faust app plus its table, timer and metrics; ``start``/``stop`` run it in this loop."""

    def __init__(self, cfg: Config, bootstrap: str, *, metrics: Metrics | None = None,
                 settings: MonitorSettings | None = None) -> None:
        self.cfg = cfg
        self.bootstrap = bootstrap
        self.settings = settings or MonitorSettings()
        self.metrics = metrics or Metrics()
        self.topics = Topics(cfg.bus.topic_prefix)
        self.output_topic = self.topics.name(MONITOR_TOPIC)
        self.app_id = self.settings.app_id or f"{cfg.bus.topic_prefix}.monitor"
        self.health = Health(SERVICE, cfg.observability.stall_after_s)
        self.health.running = False  # /healthz answers 503 until the faust worker is ready
        self.watched: list[str] = []
        self.published: list[dict[str, Any]] = []  # summaries sent, newest last (bounded)
        self._last_published: float | None = None
        self._gauge_labels: set[tuple[str, str]] = set()  # (experiment, topic) pairs with a gauge value
        self._records = self.metrics.counter("monitor_records_total", "Records seen by the topic monitor",
                                             ["experiment", "topic", "type"])
        self._window_records = self.metrics.gauge(
            "monitor_window_records", "Records in the last closed monitor window", ["experiment", "topic"])
        self._window_rate = self.metrics.gauge(
            "monitor_window_records_per_second", "Records/s in the last closed monitor window",
            ["experiment", "topic"])
        self._window_end = self.metrics.gauge(
            "monitor_window_end_timestamp_seconds", "End of the last published monitor window", [])
        self.app: Any = None
        self._table: Any = None
        self._out: Any = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create topics, build the faust app and start it; returns once partitions are assigned."""
        await ensure_topics(self.bootstrap, [*monitored_topics(self.cfg), self.output_topic],
                            self.cfg.bus.partitions, self.cfg.bus.replication_factor)
        self.watched = await self._copartitioned(monitored_topics(self.cfg))
        self.app = self._build_app()
        await self.app.start()
        self.health.running = True
        self.health.last_poll = self.health.last_progress = time.time()
        self.metrics.healthy.labels(SERVICE).set(1)
        log.info("topic monitor started", extra={"app_id": self.app_id, "topics": len(self.watched)})

    async def stop(self) -> None:
        self.health.running = False
        self.metrics.healthy.labels(SERVICE).set(0)
        if self.app is not None:
            await self.app.stop()

    @property
    def crashed(self) -> bool:
        return bool(self.app is not None and (self.app.crashed or self.app.should_stop))

    async def _copartitioned(self, names: list[str]) -> list[str]:
        """Topics whose partition count equals the table's; faust refuses to update a table from a
        topic with a different count (PartitionsMismatch), so those are skipped with a warning."""
        counts: dict[str, int] = {}
        for tp in await end_offsets(self.bootstrap, names):
            counts[tp.topic] = counts.get(tp.topic, 0) + 1
        keep = [n for n in names if counts.get(n) == self.cfg.bus.partitions]
        skipped = sorted(set(names) - set(keep))
        if skipped:
            log.warning("monitor skips topics whose partition count differs from bus.partitions",
                        extra={"topics": skipped, "partitions": self.cfg.bus.partitions})
        return keep

    def _build_app(self) -> Any:
        import faust  # lazy: heavy import, only the monitor needs it

        s = self.settings
        app = faust.App(
            self.app_id, broker=faust_broker_url(self.bootstrap), store="memory://", web_enabled=False,
            autodiscover=False, topic_partitions=self.cfg.bus.partitions,
            topic_replication_factor=self.cfg.bus.replication_factor,
            consumer_auto_offset_reset=s.offset_reset, broker_session_timeout=s.session_timeout_s,
            broker_heartbeat_interval=s.heartbeat_s, producer_acks=-1,
            table_cleanup_interval=max(s.window_s, 5.0),
        )
        self._table = app.Table(
            "counts", default=int, key_type=str, value_type=int, partitions=self.cfg.bus.partitions,
        ).tumbling(s.window_s, expires=timedelta(seconds=s.expires_s))
        self._out = app.topic(self.output_topic, key_serializer="raw", value_serializer="raw")
        for physical in self.watched:
            source = app.topic(physical, key_serializer="raw", value_serializer="raw")
            app.agent(source, name=f"{self.app_id}.count.{self.topics.logical(physical)}")(
                self._make_agent(self.topics.logical(physical)))
        app.timer(min(1.0, s.window_s / 2), name=f"{self.app_id}.tick")(self._tick)
        return app

    def _make_agent(self, logical: str) -> Any:
        async def count(stream: Any) -> None:
            async for event in stream.events():
                self._count(logical, event.message.headers, event.value)
        return count

    def _count(self, logical: str, headers: Any, value: bytes | None) -> None:
        """Add one record (must run inside the stream iteration: the window is the event's time)."""
        experiment, etype = record_identity(logical, headers, value)
        self._table[count_key(experiment, logical, etype)] += 1
        self._records.labels(experiment, logical, etype).inc()
        self.health.last_progress = time.time()
        self.metrics.last_progress.labels(SERVICE).set(self.health.last_progress)

    async def _tick(self) -> None:
        self.health.last_poll = time.time()
        ok, self.health.detail = self.health.status()
        self.metrics.healthy.labels(SERVICE).set(1 if ok else 0)
        await self.publish_closed_window()

    # ------------------------------------------------------------------ reading

    def window_items(self) -> list[WindowItem]:
        """The table's local contents as ((key, (start, end)), count) pairs."""
        if self._table is None:
            return []
        return list(self._table.table.data.items())

    def counts(self, window_start: float | None = None) -> dict[tuple[str, str, str], int]:
        """Counts per (experiment, topic, type), over all windows or one window."""
        out: dict[tuple[str, str, str], int] = {}
        for (key, (start, _end)), n in self.window_items():
            if window_start is None or abs(start - window_start) <= 1e-6:
                k = split_key(key)
                out[k] = out.get(k, 0) + n
        return out

    async def publish_closed_window(self, now: float | None = None) -> list[dict[str, Any]]:
        """Publish the newest closed window once (no-op if already published or empty)."""
        s = self.settings
        start = closed_window_start(time.time() if now is None else now, s.window_s, s.grace_s)
        if self._last_published is not None and start <= self._last_published:
            return []
        self._last_published = start
        summaries = list(window_summaries(self.window_items(), start, s.window_s).values())
        for summary in summaries:
            await self._send(summary)
        self._set_gauges(summaries)
        self._window_end.set(start + s.window_s)
        self.published = [*self.published, *summaries][-100:]
        return summaries

    def _set_gauges(self, summaries: list[dict[str, Any]]) -> None:
        """Gauges show the last closed window; pairs absent from it drop to 0 rather than go stale."""
        current: dict[tuple[str, str], dict[str, Any]] = {
            (sm["experiment_id"], topic): t for sm in summaries for topic, t in sm["topics"].items()}
        for labels in self._gauge_labels - set(current):
            self._window_records.labels(*labels).set(0)
            self._window_rate.labels(*labels).set(0)
        for labels, t in current.items():
            self._window_records.labels(*labels).set(t["records"])
            self._window_rate.labels(*labels).set(t["per_s"])
        self._gauge_labels |= set(current)

    async def _send(self, summary: dict[str, Any]) -> None:
        headers = [("ce_id", new_id().encode()), ("ce_type", SUMMARY_TYPE.encode()),
                   ("ce_source", f"autointerv/{SERVICE}/{self.app_id}".encode()),
                   ("ce_time", str(time.time()).encode()),
                   ("ce_experiment_id", summary["experiment_id"].encode()),
                   ("ce_schema_version", SCHEMA_VERSION.encode()), ("ce_specversion", b"1.0")]
        fut = await self._out.send(key=summary["experiment_id"].encode(), value=orjson.dumps(summary),
                                   headers=headers)
        await fut  # acknowledged by the broker, or raise


def build_monitor(cfg: Config, bootstrap: str, *, metrics: Metrics | None = None,
                  settings: MonitorSettings | None = None) -> TopicMonitor:
    """A monitor ready to ``await start()`` in the current event loop (tests use this)."""
    return TopicMonitor(cfg, bootstrap, metrics=metrics, settings=settings)


async def serve_monitor(cfg: Config, bootstrap: str, *, settings: MonitorSettings | None = None,
                        stop: asyncio.Event | None = None, install_signals: bool = True) -> None:
    """Run the monitor with /metrics and /healthz until SIGINT/SIGTERM (or ``stop`` is set)."""
    from services.core.http import start_http

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if install_signals else ()
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    monitor = build_monitor(cfg, bootstrap, settings=settings)
    runner = None
    try:
        if cfg.observability.metrics_port is not None:
            port = cfg.observability.metrics_port
            runner = await start_http(monitor.metrics, lambda: [monitor.health], port)
        await monitor.start()
        while not stop.is_set():
            if monitor.crashed:
                raise RuntimeError(f"faust monitor stopped: {monitor.app._crash_reason!r}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await monitor.stop()
        if runner is not None:
            await runner.cleanup()
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


def run_monitor(cfg: Config, bootstrap: str) -> None:
    """Blocking entry point for ``autointerv service monitor``: the faust worker in its own loop."""
    asyncio.run(serve_monitor(cfg, bootstrap))
