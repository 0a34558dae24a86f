"""Operator tooling against real parts: ``status`` on the real broker, ``top`` scraping a real
prometheus_client HTTP endpoint, the faust topic monitor on the real broker, and the deployment
files (parsed; no Docker engine or cluster exists here)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from services.core.bus import LOGICAL_TOPICS, Producer, Topics, ensure_topics
from services.core.config import load_config
from services.core.events import DecodedText, Envelope
from services.core.infra import free_port
from services.core.metrics import Metrics
from services.monitor.faust_app import (
    MonitorSettings,
    build_monitor,
    closed_window_start,
    count_key,
    record_identity,
    serve_monitor,
    window_summaries,
)
from services.monitor.status import collect_status, exact_end_offsets, render_status
from services.monitor.top import TopView, run_top, scrape

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- status


async def _produce_batched(bootstrap: str, topic: str, per_partition: dict[int, int]) -> None:
    """Send without waiting per record, so the broker receives multi-record batches."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    await producer.start()
    try:
        futs = [await producer.send(topic, b"{}", partition=p)
                for p, n in per_partition.items() for _ in range(n)]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def _commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))  # manual assignment: commit without a group join
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


async def test_status_reports_exact_offsets_and_lag(kafka_bootstrap: str, unique: str) -> None:
    topics = Topics(f"st{unique}")
    await ensure_topics(kafka_bootstrap, topics.all(), 3, 1)
    texts = topics.name("texts")
    await _produce_batched(kafka_bootstrap, texts, {0: 10, 1: 7, 2: 5})
    group = f"{topics.prefix}.exp.embedder"
    await _commit(kafka_bootstrap, group, {TopicPartition(texts, 0): 4, TopicPartition(texts, 1): 7})
    idle = f"{topics.prefix}.exp.clusterer"

    report = await collect_status(kafka_bootstrap, topics, [group, idle])

    assert {t.logical for t in report.topics} == set(LOGICAL_TOPICS)
    assert report.topic("texts").ends == {0: 10, 1: 7, 2: 5}
    assert report.topic("embeddings").total == 0
    embedder = report.group(group)
    assert embedder is not None and embedder.expected
    [row] = embedder.topics  # only the topic it committed on
    assert row.logical == "texts"
    assert [(p.partition, p.committed, p.lag) for p in row.partitions] == [(0, 4, 6), (1, 7, 0), (2, None, 5)]
    assert (row.committed, row.end, row.lag) == (11, 22, 11)
    assert report.group(idle).topics == []  # expected, never committed

    console = Console(record=True, width=200)
    render_status(report, console)
    out = console.export_text()
    assert "texts" in out and group in out and "0:6 1:0 2:5" in out


async def test_status_declared_topics_show_backlog_before_first_commit(kafka_bootstrap: str,
                                                                       unique: str) -> None:
    topics = Topics(f"sd{unique}")
    await ensure_topics(kafka_bootstrap, topics.all(), 2, 1)
    await _produce_batched(kafka_bootstrap, topics.name("embeddings"), {0: 3, 1: 4})
    group = f"{topics.prefix}.exp.clusterer"
    report = await collect_status(kafka_bootstrap, topics, [group],
                                  group_topics={group: [topics.name("embeddings")]})
    [row] = report.group(group).topics
    assert (row.logical, row.committed, row.lag) == ("embeddings", 0, 7)


async def test_exact_end_offsets_count_every_record_of_a_batch(kafka_bootstrap: str, unique: str) -> None:
    topic = f"eo{unique}.t"
    await ensure_topics(kafka_bootstrap, [topic], 1, 1)
    await _produce_batched(kafka_bootstrap, topic, {0: 25})
    ends = await exact_end_offsets(kafka_bootstrap, [topic])
    assert ends == {TopicPartition(topic, 0): 25}


# ---------------------------------------------------------------------------- top


@pytest.fixture()
def metrics_endpoint():  # yields (url, Metrics)
    metrics = Metrics()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    yield f"http://127.0.0.1:{port}/metrics", metrics
    server.shutdown()
    thread.join(timeout=5)


def test_top_rates_from_two_real_scrapes(metrics_endpoint) -> None:
    url, m = metrics_endpoint
    m.processed.labels("embedder", "texts").inc(100)
    view = TopView()
    first = {r.service: r for r in view.update(scrape(url), now=1000.0)}
    assert first["embedder"].processed == 100 and first["embedder"].processed_per_s is None
    m.processed.labels("embedder", "texts").inc(30)
    m.processed.labels("embedder", "embeddings").inc(20)  # summed over topics
    second = {r.service: r for r in view.update(scrape(url), now=1002.0)}
    assert second["embedder"].processed == 150
    assert second["embedder"].processed_per_s == pytest.approx(25.0)  # (150 - 100) / 2 s


def test_top_once_prints_one_frame(metrics_endpoint) -> None:
    url, m = metrics_endpoint
    now = time.time()
    m.processed.labels("embedder", "texts").inc(100)
    m.errors.labels("embedder", "ValueError").inc(2)
    m.dead_letters.labels("embedder", "texts").inc(1)
    m.lag.labels("embedder", "g", "texts").set(40)
    m.lag.labels("embedder", "g", "embeddings").set(2)
    m.healthy.labels("embedder").set(1)
    m.last_progress.labels("embedder").set(now - 5)
    m.processed.labels("generator", "generation-requests").inc(7)
    m.healthy.labels("generator").set(0)
    console = Console(record=True, width=200)

    rows = {r.service: r for r in run_top(url, refresh_s=0.05, once=True, console=console)}

    emb, gen = rows["embedder"], rows["generator"]
    assert (emb.processed, emb.errors, emb.dead_letters, emb.lag, emb.healthy) == (100, 2, 1, 42, 1)
    assert emb.processed_per_s == 0.0  # nothing changed between the two scrapes
    assert emb.last_progress == pytest.approx(now - 5)
    assert gen.healthy == 0 and gen.last_progress is None
    out = console.export_text()
    assert "embedder" in out and "generator" in out and "NO" in out


def test_top_reports_an_unreachable_endpoint() -> None:
    console = Console(record=True, width=200)
    rows = run_top(f"http://127.0.0.1:{free_port()}/metrics", refresh_s=0.0, once=True, console=console)
    assert rows == []
    assert "scrape failed" in console.export_text()


# ---------------------------------------------------------------------------- faust monitor


def test_record_identity_prefers_headers_then_body() -> None:
    ev = DecodedText(experiment_id="e9", text_id="t", request_id="r", role="base", model_id="m",
                     prompt_id="p", text="x")
    headers = Envelope.for_event(ev, "test").to_headers()
    assert record_identity("texts", headers, b"not json") == ("e9", "autointerv.text.decoded")
    body = b'{"experiment_id": "e2"}'
    assert record_identity("embeddings", None, body) == ("e2", "autointerv.text.embedded")
    assert record_identity("escalations.llm", [], b"garbage") == ("unknown", "unknown")


def test_window_summaries_group_one_window() -> None:
    items = [((count_key("e1", "texts", "a"), (10.0, 19.9)), 6),
             ((count_key("e1", "texts", "b"), (10.0, 19.9)), 4),
             ((count_key("e1", "embeddings", "c"), (10.0, 19.9)), 5),
             ((count_key("e1", "texts", "a"), (20.0, 29.9)), 99)]  # another window
    [summary] = window_summaries(items, 10.0, 10.0, generated_at=0.0).values()
    assert summary["total"] == 15 and summary["per_s"] == 1.5
    assert summary["topics"]["texts"] == {"records": 10, "per_s": 1.0, "types": {"a": 6, "b": 4}}
    assert closed_window_start(now=35.5, window_s=10.0, grace_s=1.0) == 20.0
    assert closed_window_start(now=30.5, window_s=10.0, grace_s=1.0) == 10.0


async def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.2)
    return predicate()


async def test_faust_monitor_counts_records_on_the_real_broker(kafka_bootstrap: str, unique: str) -> None:
    cfg = load_config(None, environ={}, overrides={"experiment": {"id": "e1"},
                                                   "bus": {"topic_prefix": f"fm{unique}", "partitions": 2}})
    topics = Topics(cfg.bus.topic_prefix)
    monitor = build_monitor(cfg, kafka_bootstrap, settings=MonitorSettings(window_s=2.0, grace_s=0.5))
    await monitor.start()
    try:
        producer = Producer(cfg.bus, kafka_bootstrap, topics, "test")
        await producer.start()
        for i in range(5):
            await producer.send(DecodedText(experiment_id="e1", text_id=f"t{i}", request_id="r", role="base",
                                            model_id="m", prompt_id="p", text="hello"))
        for _ in range(3):  # no headers: the experiment comes from the body
            await producer.send_raw(topics.name("embeddings"), b'{"experiment_id": "e2"}')
        await producer.send_raw(topics.name("hypotheses"), b"garbage")
        await producer.stop()

        expected = {("e1", "texts", "autointerv.text.decoded"): 5,
                    ("e2", "embeddings", "autointerv.text.embedded"): 3,
                    ("unknown", "hypotheses", "autointerv.hypothesis.proposed"): 1}
        assert await _wait_for(lambda: monitor.counts() == expected, 20.0), monitor.counts()
        # every window holding e1's records is published once it closes (records may straddle two)
        assert await _wait_for(lambda: sum(s["total"] for s in monitor.published
                                           if s["experiment_id"] == "e1") == 5, 10.0), monitor.published
        assert monitor.metrics.value("monitor_records_total", experiment="e2", topic="embeddings",
                                     type="autointerv.text.embedded") == 3
    finally:
        await monitor.stop()

    consumer = AIOKafkaConsumer(topics.name("monitor"), bootstrap_servers=kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        got = await consumer.getmany(timeout_ms=3000)
    finally:
        await consumer.stop()
    records = [r for part in got.values() for r in part]
    e1 = [orjson.loads(r.value) for r in records if r.key == b"e1"]
    assert sum(s["topics"]["texts"]["records"] for s in e1) == 5
    assert all(dict(r.headers)["ce_type"] == b"autointerv.monitor.window" for r in records)


async def test_serve_monitor_exposes_metrics_and_health(kafka_bootstrap: str, unique: str) -> None:
    port = free_port()
    cfg = load_config(None, environ={}, overrides={"experiment": {"id": "e1"},
                                                   "observability": {"metrics_port": port},
                                                   "bus": {"topic_prefix": f"sm{unique}", "partitions": 1}})
    stop = asyncio.Event()
    task = asyncio.create_task(serve_monitor(cfg, kafka_bootstrap, stop=stop, install_signals=False))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async def healthy() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    resp = await client.get("/healthz")
                    return resp.status_code == 200 and resp.json()["services"]["monitor"]["ok"]
                return False

            deadline = time.monotonic() + 30
            while not await healthy() and time.monotonic() < deadline and not task.done():
                await asyncio.sleep(0.3)
            assert await healthy()
            metrics = (await client.get("/metrics")).text
        assert 'autointerv_healthy{service="monitor"} 1.0' in metrics
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)  # re-raises if the monitor crashed


# ---------------------------------------------------------------------------- deployment files


def _yaml_docs(path: Path) -> list[object]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_deploy_yaml_and_json_parse() -> None:
    compose = _yaml_docs(ROOT / "docker-compose.yml")[0]
    needed = {"kafka", "redis", "prometheus", "grafana", "generator", "embedder", "monitor"}
    assert needed <= set(compose["services"])
    assert compose["services"]["generator"]["deploy"]["replicas"] >= 1
    redis_cmd = " ".join(compose["services"]["redis"]["command"])
    assert "--maxmemory-policy volatile-lru" in redis_cmd and "--appendonly yes" in redis_cmd
    files = [*(ROOT / "deploy").rglob("*.yml"), *(ROOT / "deploy").rglob("*.yaml")]
    assert len(files) >= 5
    kinds = []
    for f in files:
        for doc in _yaml_docs(f):
            assert isinstance(doc, dict), f
            kinds.append(doc.get("kind"))
    assert {"Namespace", "ConfigMap", "Deployment"} <= set(kinds)
    for f in (ROOT / "deploy").rglob("*.json"):
        json.loads(f.read_text())


def test_k8s_deployments_probe_healthz_and_generator_gets_a_gpu() -> None:
    deployments = [d for f in (ROOT / "deploy" / "k8s").glob("*.yaml") for d in _yaml_docs(f)
                   if isinstance(d, dict) and d.get("kind") == "Deployment"]
    assert len(deployments) >= 8
    for d in deployments:
        [container] = d["spec"]["template"]["spec"]["containers"]
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] == 9464, d["metadata"]["name"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    gen = next(d for d in deployments if d["metadata"]["name"] == "generator")
    assert gen["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_deploy_experiment_config_is_valid() -> None:
    cfg = load_config(ROOT / "deploy" / "experiment.yaml", environ={})
    assert cfg.experiment.id  # fixed, so every container joins the same consumer groups
    docs = _yaml_docs(ROOT / "deploy" / "k8s" / "configmap.yaml")
    cm = next(d for d in docs if d["metadata"]["name"] == "autointerv-experiment")
    assert cm["data"]["experiment.yaml"] == (ROOT / "deploy" / "experiment.yaml").read_text()


def _known_metric_names() -> set[str]:
    """Series registered anywhere in services/ (Metrics.counter/gauge/histogram) or documented."""
    names = set()
    for py in (ROOT / "services").rglob("*.py"):
        names |= {"autointerv_" + n for n in re.findall(r'\.(?:counter|gauge|histogram)\(\s*"([a-z0-9_]+)"',
                                                           py.read_text())}
    names |= set(re.findall(r"`(autointerv_[a-z0-9_]+)`", (ROOT / "docs" / "operations.md").read_text()))
    return names


def test_grafana_queries_reference_only_known_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "autointerv.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    names = {n for e in exprs for n in re.findall(r"autointerv_[a-z0-9_]+", e)}
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    known = _known_metric_names()
    for base in ("records_processed_total", "consumer_lag", "batch_seconds", "healthy", "dead_letters_total"):
        assert "autointerv_" + base in used
    assert used <= known, sorted(used - known)


def test_core_metrics_are_documented() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    sample = Metrics()
    sample.processed.labels("s", "t").inc()
    families = [f.name for f in text_string_to_metric_families(sample.render().decode())]
    assert len(families) >= 9
    for name in families:
        if not name.endswith("_created"):  # prometheus_client's per-series creation timestamps
            assert f"`{name}" in text, name


def test_asyncapi_covers_every_topic_with_existing_schemas() -> None:
    doc = yaml.safe_load((ROOT / "schemas" / "asyncapi.yaml").read_text())
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert {f"{{prefix}}.{t}" for t in LOGICAL_TOPICS} <= addresses
    files = set()
    for msg in doc["components"]["messages"].values():
        ref = msg["payload"]["$ref"] if "$ref" in msg["payload"] else msg["payload"]["schema"]["$ref"]
        if ref.startswith("#/components/schemas/"):
            assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], ref
        else:
            assert (ROOT / "schemas" / ref).is_file(), ref
            files.add(ref)
    assert files == {f"{t}.schema.json" for t in LOGICAL_TOPICS}
    for op in doc["operations"].values():
        assert op["action"] in ("send", "receive")
        assert op["channel"]["$ref"].removeprefix("#/channels/") in doc["channels"]
