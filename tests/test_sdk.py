"""Plug-ins: a few-line consumer joins a running experiment on the real broker; discovery by entry point."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.core.bus import Producer, Topics, ensure_topics
from services.core.config import load_config
from services.core.events import DecodedText, Validation
from services.core.metrics import Metrics
from services.core.registry import SERVICES
from services.core.runtime import ServiceContext
from services.orchestrator import service_factory
from services.sdk import consumer


async def test_a_decorated_handler_is_a_full_service(kafka_bootstrap, redis_url, unique):
    cfg = load_config(None, environ={}, overrides={
        "experiment": {"id": f"sdk-{unique}"}, "bus": {"topic_prefix": f"sdk-{unique}", "partitions": 2},
        "observability": {"metrics_port": None}})
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), 2, 1)
    seen: list[str] = []

    @consumer("upper", DecodedText)
    async def upper(svc, event: DecodedText):
        seen.append(event.text_id)
        if event.text.startswith("x"):
            raise ValueError("poison")  # isolated and dead-lettered by the runtime
        return None

    svc = upper(ServiceContext(cfg, kafka_bootstrap, redis_url, Metrics(), topics))
    assert svc.group_id() == f"sdk-{unique}.sdk-{unique}.upper"
    task = asyncio.create_task(svc.run())
    prod = Producer(cfg.bus, kafka_bootstrap, topics, "test")
    await prod.start()
    for i in range(10):
        await prod.send(DecodedText(experiment_id=cfg.experiment_id, text_id=f"t{i}", request_id="r",
                                    role="base", model_id="m", prompt_id="p", text="x" if i == 3 else "ok"))
    await prod.flush()
    await prod.stop()
    deadline = time.monotonic() + 30
    while svc.metrics.value("records_processed_total", service="upper", topic="texts") < 9:
        assert time.monotonic() < deadline, "plug-in did not process its records"
        await asyncio.sleep(0.1)
    svc.stop()
    await task
    await svc.ctx.bus.close()  # its lag probe's consumer, opened if a lag check ran
    assert set(seen) >= {f"t{i}" for i in range(10)}
    assert svc.metrics.value("dead_letters_total", service="upper", topic="texts") == 1


def test_consumer_needs_event_types():
    with pytest.raises(ValueError):
        consumer("nothing")


def test_builtin_services_are_discoverable_by_name():
    assert {"generator", "embedder", "clusterer", "hypothesizer", "validator", "controller", "sink"} <= set(
        SERVICES.names())
    assert service_factory("embedder").__name__ == "EmbedderService"
    with pytest.raises(SystemExit, match="unknown service"):
        service_factory("no-such-service")


def test_example_plugin_is_a_service():
    from examples.plugin_example import ValidatedCounter

    assert ValidatedCounter.consumes == (Validation,) and ValidatedCounter.name == "validated-counter"
