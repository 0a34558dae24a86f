"""Faults the runtime must survive or report, against real servers (issue: "run it for weeks").

* the broker goes away: a service stops within ``bus.broker_loss_s`` with a message naming the
  broker, instead of hanging, and the client libraries' reconnect noise is rate-limited;
* Redis goes away in the middle of a run and comes back: stateful services retry, and the
  generation budget is never exceeded (the controller saves a round's plan before emitting it);
* SIGTERM ends ``autointerv run`` promptly: drained, committed, and ``summary.json`` says why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml

from bench.experiments import sim_config
from services.core.bus import Producer, Topics
from services.core.config import load_config
from services.core.events import DecodedText, GenerationRequest, PromptRef
from services.core.infra import EmbeddedBroker, EmbeddedCache
from services.core.logs import RepeatFilter
from services.core.metrics import Metrics
from services.core.runtime import InfrastructureLost, ServiceContext
from services.generator import GeneratorService
from services.orchestrator import MemoryPipeline

ROOT = Path(__file__).resolve().parents[1]


async def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_broker_loss_stops_the_service_with_a_clear_message(tmp_path: Path, redis_url: str,
                                                                   unique: str) -> None:
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    try:
        cfg = load_config(None, environ={}, overrides={
            "experiment": {"id": f"loss-{unique}"}, "bus": {"topic_prefix": f"l-{unique}", "partitions": 1,
                                                             "broker_loss_s": 3, "request_timeout_s": 2},
            "cache": {"url": redis_url, "namespace": f"l-{unique}"}, "observability": {"metrics_port": None}})
        topics = Topics(cfg.bus.topic_prefix)
        ctx = ServiceContext(cfg, broker.bootstrap, redis_url, Metrics(), topics)
        await ctx.bus.ensure_topics(topics.all())
        svc = GeneratorService(ctx)
        task = asyncio.create_task(svc.run())
        prod = Producer(cfg.bus, broker.bootstrap, topics, "test")
        await prod.start()
        await prod.send(GenerationRequest(experiment_id=cfg.experiment_id, role="base",
                                          prompts=[PromptRef(prompt_id="p", text="Write about tea.")]))
        await prod.flush()
        await prod.stop()
        await _wait_for(lambda: svc.metrics.total("generator_texts_total") >= 1, 30, "the first text")
        broker.stop()
        t0 = time.monotonic()
        with pytest.raises(InfrastructureLost, match=rf"{broker.bootstrap} unreachable for \d+s"):
            await asyncio.wait_for(task, 60)
        assert time.monotonic() - t0 < 40  # broker_loss_s 3 plus the lag checks that notice it (every 5 s)
    finally:
        broker.stop()


def test_repeated_library_log_lines_are_rate_limited() -> None:
    filt = RepeatFilter(("aiokafka",), every_s=10.0)

    def rec(name: str, at: float) -> logging.LogRecord:
        r = logging.LogRecord(name, logging.ERROR, "x", 1, "Unable connect to node %s", ("0",), None)
        r.created = at
        return r

    passed = [filt.filter(rec("aiokafka.conn", 1000 + i * 0.1)) for i in range(200)]  # 20 s of a flood
    assert sum(passed) == 2  # one at the start, one 10 s later
    late = rec("aiokafka.conn", 1020.5)
    assert filt.filter(late) and late.repeats_suppressed == 99  # says how many it held back
    assert all(filt.filter(rec("autointerv.clusterer", 1000 + i * 0.1)) for i in range(50))  # ours: untouched


async def test_redis_outage_mid_run_retries_and_never_overspends(tmp_path: Path, unique: str) -> None:
    """Redis stops while the controller is about to plan (its save fails), then comes back: the run
    goes on, and every round is planned exactly once within the budget."""
    cache = EmbeddedCache(tmp_path / "valkey").start()
    port = cache.port
    try:
        cfg = sim_config(seed=4, max_texts=2000, controller={"initial_texts": 800, "round_texts": 400,
                                                             "stop_when_stable": False})
        async with MemoryPipeline(cfg, cache.url, exclude=("sink",)) as p:
            ctl = p.services["controller"]
            await p.run(until=lambda: ctl.st.phase == "arriving" and ctl.st.round == 1)  # type: ignore[attr-defined]
            cache.stop()
            planned_before = ctl.st.texts_planned  # type: ignore[attr-defined]
            reason = await p.run(until=lambda: ctl.metrics.total("errors_total", service="controller") >= 3,
                                 max_idle_s=30)
            assert reason == "until", reason  # the controller kept failing to save, and kept running
            cache = EmbeddedCache(tmp_path / "valkey", port=port).start()
            reason = await p.run()
            progress = ctl.progress()
        assert reason.startswith("finished"), reason
        assert progress["stopped_because"] == "budget"
        assert planned_before <= progress["planned"] <= cfg.controller.max_texts
        texts = [r for r in p.bus.records(p.bus.topics.name(DecodedText.topic))]
        ids = {DecodedText.from_bytes(r.value).text_id for r in texts}
        assert len(ids) == progress["produced"] <= cfg.controller.max_texts  # nothing generated twice over budget
    finally:
        cache.stop()


def _run_config(tmp_path: Path, unique: str) -> Path:
    cfg = {
        "experiment": {"id": f"sig-{unique}", "run_dir": str(tmp_path / "runs"), "data_dir": str(tmp_path / "data")},
        "observability": {"metrics_port": None, "progress": False},
        "models": {"base": {"backend": "sim"}, "intervention": {"backend": "sim"}},
        "embedder": {"backend": "hashing"},
        "controller": {"max_texts": 400000, "round_texts": 2000, "stop_when_stable": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_sigterm_ends_autointerv_run_promptly_with_a_summary(tmp_path: Path, unique: str) -> None:
    cfg = _run_config(tmp_path, unique)
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP", "REDIS_URL")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "--config", str(cfg)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = tmp_path / "runs" / f"sig-{unique}" / "autointerv.log"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log.exists() and b"round planned" in log.read_bytes()
                                               and log.read_bytes().count(b"round planned") >= 2):
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - t0
    assert elapsed < 20, f"SIGTERM took {elapsed:.1f}s"  # drain is bounded by bus.shutdown_timeout_s (8 s)
    summary = orjson.loads((tmp_path / "runs" / f"sig-{unique}" / "summary.json").read_bytes())
    assert summary["stopped_because"] == "signal" and summary["complete"] is False
    assert summary["texts"]["total"] > 0
