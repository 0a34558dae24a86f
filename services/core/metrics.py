"""Prometheus metrics and health, one registry per process (no module-level state).

Every service gets the same core series, labelled by service: records processed, errors, dead
letters, batch latency, consumer lag and last-progress time.  Services add their own series
through :meth:`Metrics.counter` / :meth:`Metrics.gauge` / :meth:`Metrics.histogram`.  The process's
own ``process_*`` (CPU, memory, file descriptors) and ``python_info`` series come with every registry,
and once :meth:`Metrics.label_experiment` is called every exposed sample carries an ``experiment``
label, so one Prometheus and one Grafana dashboard can tell experiments apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

PREFIX = "autointerv_"


class ConstLabels:
    """A view of a registry whose samples all carry ``labels`` (a sample's own label wins: the faust
    monitor's series already have an ``experiment`` label, for the experiment they count)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for fam in self.registry.collect():
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            out.samples = [s._replace(labels={**self.labels, **s.labels}) for s in fam.samples]
            yield out


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, experiment: str = "") -> None:
        self.registry = registry or CollectorRegistry()
        self.const_labels: dict[str, str] = {}
        if experiment:
            self.label_experiment(experiment)
        if registry is None:  # a caller's registry may have them already (they are per process)
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._series: dict[str, Counter | Gauge | Histogram] = {}
        self.processed = self.counter("records_processed_total", "Records handled successfully",
                                      ["service", "topic"])
        self.errors = self.counter("errors_total", "Errors while handling records", ["service", "kind"])
        self.dead_letters = self.counter("dead_letters_total", "Records sent to the dead-letter topic",
                                         ["service", "topic"])
        self.published = self.counter("records_published_total", "Records produced", ["service", "topic"])
        self.batch_seconds = self.histogram("batch_seconds", "Time to handle one polled batch", ["service"],
                                            buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch_size = self.histogram("batch_records", "Records per polled batch", ["service"],
                                         buckets=(1, 4, 16, 64, 128, 256, 512, 1024))
        self.lag = self.gauge("consumer_lag", "End offset minus position", ["service", "group", "topic"])
        self.last_progress = self.gauge("last_progress_timestamp_seconds", "Unix time of last handled batch",
                                        ["service"])
        self.healthy = self.gauge("healthy", "1 when the service is alive and not stalled", ["service"])

    def _get(self, kind: type, name: str, doc: str, labels: list[str], **kw: object):
        full = PREFIX + name
        if full not in self._series:
            self._series[full] = kind(full, doc, labels, registry=self.registry, **kw)
        return self._series[full]

    def counter(self, name: str, doc: str, labels: list[str]) -> Counter:
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: list[str]) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: list[str], buckets: tuple[float, ...] = ()) -> Histogram:
        kw = {"buckets": buckets} if buckets else {}
        return self._get(Histogram, name, doc, labels, **kw)

    def label_experiment(self, experiment_id: str) -> None:
        """Expose every sample with ``experiment=<id>`` (the dashboards' experiment variable)."""
        self.const_labels["experiment"] = experiment_id

    def render(self) -> bytes:
        if self.const_labels:
            return generate_latest(ConstLabels(self.registry, self.const_labels))  # type: ignore[arg-type]
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """Current value of one sample (tests use this; it scans the whole registry)."""
        v = self.registry.get_sample_value(PREFIX + name, labels)
        return 0.0 if v is None else float(v)

    def total(self, series: str, **match: str) -> float:
        """Sum of one series' samples whose labels include ``match``; reads only that series, so the
        terminal view can call it twice a second without collecting the whole registry."""
        metric = self._series.get(PREFIX + series)
        if metric is None:
            return 0.0
        wanted = {PREFIX + series + "_total", PREFIX + series}
        return float(sum(s.value for fam in metric.collect() for s in fam.samples
                         if s.name in wanted and all(s.labels.get(k) == v for k, v in match.items())))


@dataclass
class Health:
    """Liveness plus stall detection: alive but no progress while there is lag is unhealthy."""

    service: str
    stall_after_s: float
    started: float = field(default_factory=time.time)
    last_poll: float = field(default_factory=time.time)
    last_progress: float = field(default_factory=time.time)
    lag: int = 0
    running: bool = True
    paused: bool = False  # deliberately not consuming (backpressure): not a stall
    detail: str = ""

    def status(self, now: float | None = None) -> tuple[bool, str]:
        now = time.time() if now is None else now
        if not self.running:
            return False, "stopped"
        if now - self.last_poll > self.stall_after_s:
            return False, f"poll loop blocked for {now - self.last_poll:.0f}s"
        if self.paused:
            return True, "paused by backpressure"
        if self.lag > 0 and now - self.last_progress > self.stall_after_s:
            return False, f"stalled: lag {self.lag} and no progress for {now - self.last_progress:.0f}s"
        return True, "ok"
