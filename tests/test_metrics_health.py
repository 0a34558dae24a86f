"""Operator surface: metric totals, stall detection, and the /metrics + /healthz endpoint."""

from __future__ import annotations

import time

import httpx

from services.core.http import start_http
from services.core.infra import free_port
from services.core.metrics import Health, Metrics


def test_total_sums_one_series_by_label():
    m = Metrics()
    c = m.counter("generator_texts_total", "texts", ["backend", "role"])
    c.labels("sim", "base").inc(3)
    c.labels("sim", "intervention").inc(2)
    m.processed.labels("embedder", "texts").inc(7)
    m.processed.labels("sink", "texts").inc(1)
    assert m.total("generator_texts_total") == 5
    assert m.total("records_processed_total", service="embedder") == 7
    assert m.total("no_such_series") == 0


def test_health_flags_a_consumer_that_is_alive_but_stalled():
    h = Health("embedder", stall_after_s=10, last_poll=100.0, last_progress=100.0)
    assert h.status(now=105.0) == (True, "ok")
    h.lag = 50
    h.last_poll = 111.0  # polling, yet no progress for 11 s while there is lag
    ok, detail = h.status(now=111.0)
    assert not ok and "stalled" in detail
    h.paused = True  # backpressure is deliberate, not a stall
    assert h.status(now=111.0)[0]
    h.paused, h.lag = False, 0
    assert h.status(now=111.0)[0]  # no lag: idle is healthy
    assert not h.status(now=200.0)[0]  # but a poll loop blocked for 89 s is not


async def test_http_endpoint_serves_metrics_and_503_when_stalled():
    m = Metrics()
    m.processed.labels("embedder", "texts").inc(4)
    healthy = Health("embedder", stall_after_s=60)
    stalled = Health("clusterer", stall_after_s=1, lag=10, last_progress=0.0)
    port = free_port()
    runner = await start_http(m, lambda: [healthy, stalled], port, host="127.0.0.1")
    try:
        async with httpx.AsyncClient() as client:
            metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert 'autointerv_records_processed_total{service="embedder",topic="texts"} 4.0' in metrics.text
            health = await client.get(f"http://127.0.0.1:{port}/healthz")
            assert health.status_code == 503
            body = health.json()
            assert body["services"]["embedder"]["ok"] and not body["services"]["clusterer"]["ok"]
            stalled.lag = 0
            stalled.last_poll = stalled.last_progress = time.time()
            assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    finally:
        await runner.cleanup()
