"""/metrics and /healthz: 127.0.0.1 by default, a free port when the configured one is taken (also
across processes), the address published per experiment in Redis and listed by `status`;
process_* metrics and an experiment label on every series; the dashboard's experiment variable."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from services.cli import main
from services.core.bus import client_security_kwargs, ensure_topics
from services.core.config import BusConfig, ConfigError, load_config
from services.core.endpoints import endpoints_key, list_endpoints, newest_registered_experiment
from services.core.http import bound_port, serve_endpoints, start_http
from services.core.infra import free_port
from services.core.metrics import Health, Metrics
from services.orchestrator import topic_names

ROOT = Path(__file__).resolve().parents[1]


def _cfg(unique: str, port: int, **over: object):
    return load_config(None, environ={}, overrides={
        "experiment": {"id": f"ep-{unique}"}, "cache": {"namespace": f"ep{unique}"},
        "observability": {"metrics_port": port}, **over})


async def test_a_taken_port_falls_back_and_the_default_host_is_loopback():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    m = Metrics()
    runner = await start_http(m, lambda: [Health("svc", 60)], taken)
    try:
        port = bound_port(runner)
        assert port != taken and runner.addresses[0][0] == "127.0.0.1"
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    finally:
        await runner.cleanup()
        holder.close()


async def test_endpoints_are_published_listed_and_withdrawn(redis_url, unique):
    port = free_port()
    cfg = _cfg(unique, port)
    first = await serve_endpoints(cfg, redis_url, Metrics(), lambda: [Health("sink", 60)], service="sink")
    second = await serve_endpoints(cfg, redis_url, Metrics(), lambda: [Health("embedder", 60)], service="embedder")
    assert first is not None and second is not None
    client = aioredis.Redis.from_url(redis_url)
    try:
        eps = await list_endpoints(client, cfg.cache.namespace, cfg.experiment_id)
        assert [e.service for e in eps] == ["sink", "embedder"]
        assert eps[0].url == f"http://127.0.0.1:{port}" and eps[1].url != eps[0].url  # the second fell back
        assert all(e.pid == os.getpid() for e in eps)
        assert 0 < await client.ttl(endpoints_key(cfg.cache.namespace, cfg.experiment_id)) <= cfg.cache.state_ttl_s
        assert (await newest_registered_experiment(client, cfg.cache.namespace))[0] == cfg.experiment_id
        async with httpx.AsyncClient() as http:
            body = (await http.get(eps[1].metrics_url)).text
        assert f'experiment="{cfg.experiment_id}"' in body and "process_cpu_seconds_total" in body
        await second.close()
        assert [e.service for e in await list_endpoints(client, cfg.cache.namespace, cfg.experiment_id)] == ["sink"]
    finally:
        await first.close()
        await client.aclose()


def test_status_lists_the_endpoints_of_an_experiment(redis_url, kafka_bootstrap, unique, monkeypatch, capsys):
    cfg = _cfg(unique, free_port(), bus={"topic_prefix": f"ep{unique}"})

    async def serve_and_ask() -> None:
        await ensure_topics(kafka_bootstrap, topic_names(cfg), 1, 1)
        served = await serve_endpoints(cfg, redis_url, Metrics(), lambda: [Health("controller", 60)], "pipeline")
        assert served is not None
        try:
            code = await asyncio.to_thread(main, ["status", "--experiment", "latest", "--set",
                                                  f"cache.namespace={cfg.cache.namespace}", "--set",
                                                  f"bus.topic_prefix={cfg.bus.topic_prefix}", "--set",
                                                  "experiment.run_dir=/nonexistent"])
            assert code == 0
        finally:
            await served.close()

    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("COLUMNS", "80")
    asyncio.run(serve_and_ask())
    out = capsys.readouterr().out
    assert f"Endpoints of {cfg.experiment_id}" in out and "pipeline" in out and "/metrics" in out and " ok " in out
    assert f"Consumer groups of {cfg.experiment_id}" in out


def _service(cfg_file: Path, name: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "services.cli", "--log-level", "INFO", "service", name,
                             "--config", str(cfg_file)], cwd=ROOT, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def test_two_processes_configured_with_one_port_both_serve(kafka_bootstrap, redis_url, unique, tmp_path):
    """Every process bound 9464, so the second died with a traceback; now it takes a free port."""
    port = free_port()
    cfg = _cfg(unique, port, bus={"bootstrap": kafka_bootstrap, "topic_prefix": f"tp{unique}"},
               experiment={"id": f"tp-{unique}", "run_dir": str(tmp_path / "runs")})
    cfg.cache.url = redis_url
    cfg_file = tmp_path / "exp.yaml"
    data = cfg.model_dump(mode="json")
    cfg_file.write_text(yaml.safe_dump(data))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_service(cfg_file, "hypothesizer", logs[0])]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _serving(port):
            assert procs[0].poll() is None, logs[0].read_text()
            time.sleep(0.5)
        procs.append(_service(cfg_file, "hypothesizer", logs[1]))
        fallback = None
        while time.monotonic() < deadline and fallback is None:
            assert procs[1].poll() is None, logs[1].read_text()
            m = re.search(r'"msg":"metrics port taken[^\n]*"port":(\d+)', logs[1].read_text())
            fallback = int(m.group(1)) if m else None
            time.sleep(0.5)
        assert fallback is not None and fallback != port, logs[1].read_text()
        assert _serving(port) and _serving(fallback)
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    assert "Traceback" not in logs[1].read_text()


def _serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def test_metrics_carry_process_series_and_the_experiment_label():
    m = Metrics(experiment="demo-7")
    m.processed.labels("embedder", "texts").inc(2)
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= set(families)
    for fam in families.values():
        for s in fam.samples:
            assert s.labels.get("experiment") == "demo-7", s
    monitor = m.gauge("monitor_window_records", "x", ["experiment", "topic"])
    monitor.labels("other-exp", "texts").set(1)  # a series about another experiment keeps its own label
    body = m.render().decode()
    assert 'autointerv_monitor_window_records{experiment="other-exp",topic="texts"} 1.0' in body
    assert m.value("records_processed_total", service="embedder", topic="texts") == 2.0


def test_dashboard_filters_every_query_by_the_experiment_variable():
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "autointerv.json").read_text())
    [var] = [v for v in dash["templating"]["list"] if v["name"] == "experiment"]
    assert "label_values" in var["query"]["query"] and var["includeAll"]
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    selectors = re.findall(r"\b((?:autointerv|process)_[a-z_]+)(\{[^}]*\})?", " ".join(exprs))
    assert selectors and all(sel == '{experiment=~"$experiment"}' for _, sel in selectors), selectors
    assert any("process_cpu_seconds_total" in e for e in exprs)


def test_sasl_ssl_kwargs_are_what_aiokafka_takes():
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    bus = BusConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                    sasl_password_env="KAFKA_PW_TEST")
    kw = client_security_kwargs(bus, environ={"KAFKA_PW_TEST": "hunter2"})
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_plain_password"] == "hunter2"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512" and kw["ssl_context"] is not None

    async def build() -> None:  # constructors validate the combination; nothing connects
        AIOKafkaProducer(bootstrap_servers="k:9093", **kw)
        AIOKafkaConsumer(bootstrap_servers="k:9093", **kw)
        AIOKafkaAdminClient(bootstrap_servers="k:9093", **kw)

    asyncio.run(build())
    assert client_security_kwargs(BusConfig()) == {}
    try:
        client_security_kwargs(bus, environ={})
    except ConfigError as exc:
        assert "KAFKA_PW_TEST" in str(exc) and "hunter2" not in str(exc)
    else:
        raise AssertionError("a missing password must be a ConfigError")


def test_top_scrapes_every_registered_endpoint_of_an_experiment(redis_url, unique, monkeypatch, capsys):
    cfg = _cfg(unique, free_port())

    async def serve_and_top() -> None:
        metrics = [Metrics(), Metrics()]
        metrics[0].processed.labels("embedder", "texts").inc(5)
        metrics[1].processed.labels("clusterer", "embeddings").inc(7)
        served = [await serve_endpoints(cfg, redis_url, m, lambda: [], f"proc{i}") for i, m in enumerate(metrics)]
        try:
            code = await asyncio.to_thread(main, ["top", "--experiment", cfg.experiment_id, "--once", "--refresh",
                                                  "0.05", "--set", f"cache.namespace={cfg.cache.namespace}"])
            assert code == 0
        finally:
            for s in served:
                await s.close()

    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("COLUMNS", "160")
    asyncio.run(serve_and_top())
    out = capsys.readouterr().out
    assert "2 endpoints" in out and "embedder" in out and "clusterer" in out


def test_run_prints_where_to_attach_with_the_password_masked():
    from services.cli import print_attach
    from services.core.infra import Endpoints

    cfg = load_config(None, environ={}, overrides={"experiment": {"id": "demo-1"}})
    ep = Endpoints("127.0.0.1:41025", "redis://autointerv:pw-very-secret@127.0.0.1:36115/0", True, True)
    console = Console(record=True, width=200, color_system=None)
    print_attach(console, cfg, ep)
    text = console.export_text()
    assert "127.0.0.1:41025" in text and "redis://autointerv:***@127.0.0.1:36115/0" in text
    assert "demo-1" in text and "pw-very-secret" not in text and "valkey/password" in text


@pytest.mark.parametrize(("bind", "reach"), [("0.0.0.0", None), ("::", None), ("", None),
                                             ("127.0.0.1", "127.0.0.1"), ("::1", "[::1]"), ("node7", "node7")])
def test_a_published_endpoint_names_an_address_others_can_reach(bind: str, reach: str | None) -> None:
    from services.core.endpoints import local_endpoint

    ep = local_endpoint("e", "s", bind, 9464)
    assert ep.url == f"http://{reach or socket.gethostname()}:9464"
