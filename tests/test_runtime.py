"""The service runtime against the real broker and Redis: dead letters, SIGTERM drain, and a
stateful consumer killed with SIGKILL and restarted (nothing lost, nothing counted twice)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from service_helpers import read_records

from services.clusterer.state import ClusterState
from services.core.bus import Producer, Topics, ensure_topics, group_lag
from services.core.config import Config, dump_config, load_config
from services.core.events import ClusterSnapshot, DeadLetter, EmbeddedText, GenerationRequest, PromptRef
from services.core.metrics import Metrics
from services.core.runtime import ServiceContext
from services.generator import GeneratorService

ROOT = Path(__file__).resolve().parents[1]


def _cfg(unique: str, bootstrap: str, redis_url: str, **over: object) -> Config:
    base = {"experiment": {"id": f"exp-{unique}"}, "bus": {"topic_prefix": f"t-{unique}", "partitions": 2},
            "cache": {"namespace": f"ns-{unique}"}, "observability": {"metrics_port": None}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v)  # type: ignore[union-attr]
    return load_config(None, environ={"KAFKA_BOOTSTRAP": bootstrap, "REDIS_URL": redis_url}, overrides=base)


async def test_bad_records_are_dead_lettered_and_the_service_carries_on(kafka_bootstrap, redis_url, unique):
    cfg = _cfg(unique, kafka_bootstrap, redis_url)
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), 2, 1)
    svc = GeneratorService(ServiceContext(cfg, kafka_bootstrap, redis_url, Metrics(), topics))
    task = asyncio.create_task(svc.run())
    prod = Producer(cfg.bus, kafka_bootstrap, topics, "test")
    await prod.start()
    req_topic = topics.name(GenerationRequest.topic)
    await prod.send_raw(req_topic, b"\xff not json at all", key=b"k")
    await prod.send_raw(req_topic, orjson.dumps({"experiment_id": cfg.experiment_id, "role": "alien"}), key=b"k")
    good = GenerationRequest(experiment_id=cfg.experiment_id, role="base", n_per_prompt=2,
                             prompts=[PromptRef(prompt_id="p1", text="Write a short note about tea.")])
    await prod.send(good)
    await prod.flush()
    dead = await read_records(cfg, kafka_bootstrap, DeadLetter.topic, 2)
    texts = await read_records(cfg, kafka_bootstrap, "texts", 2)
    svc.stop()
    await task
    await prod.stop()
    assert len(dead) == 2 and len(texts) == 2
    letters = [DeadLetter.from_bytes(r.value) for r in dead]
    assert {dl.source_topic for dl in letters} == {req_topic}
    assert any("role" in dl.reason for dl in letters)  # the validation error names the field
    import base64

    assert base64.b64decode(letters[0].original_b64) == b"\xff not json at all"  # original bytes kept


def _service(name: str, cfg: Config, log: Path) -> subprocess.Popen[bytes]:
    """``autointerv service NAME`` in a subprocess, with exactly this test's config."""
    cfg_file = log.with_suffix(".yaml")
    cfg_file.write_text(dump_config(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "services.cli", "service", name, "--config", str(cfg_file)],
                            cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def _wait_committed(bootstrap: str, group: str, topic: str, at_least: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    done = 0
    while time.monotonic() < deadline:
        lags = await group_lag(bootstrap, group, [topic])
        done = sum(p.committed or 0 for p in lags)
        if done >= at_least:
            return done
        await asyncio.sleep(0.2)
    raise AssertionError(f"group {group} committed only {done} of {at_least} on {topic}")


async def test_sigterm_drains_and_commits(kafka_bootstrap, redis_url, unique, tmp_path):
    cfg = _cfg(unique, kafka_bootstrap, redis_url)
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), 2, 1)
    proc = _service("generator", cfg, tmp_path / "gen.log")
    prod = Producer(cfg.bus, kafka_bootstrap, topics, "test")
    await prod.start()
    for i in range(20):
        await prod.send(GenerationRequest(experiment_id=cfg.experiment_id, role="intervention", n_per_prompt=3,
                                          prompts=[PromptRef(prompt_id=f"p{i}", text="About coffee.")]))
    await prod.flush()
    await prod.stop()
    group = f"{cfg.bus.topic_prefix}.{cfg.experiment_id}.generator-base+intervention"
    await _wait_committed(kafka_bootstrap, group, topics.name("generation-requests"), 20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, (tmp_path / "gen.log").read_text()[-2000:]
    lags = await group_lag(kafka_bootstrap, group, [topics.name("generation-requests")])
    assert sum(p.lag for p in lags) == 0
    assert len(await read_records(cfg, kafka_bootstrap, "texts", 60)) == 60


def _embedded(cfg: Config, n: int, seed: int = 0) -> list[EmbeddedText]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((6, 32))
    out = []
    for i in range(n):
        c = i % 6
        v = centers[c] + 0.3 * rng.standard_normal(32)
        v /= np.linalg.norm(v)
        role = "intervention" if (c == 5 or rng.random() < 0.5) else "base"
        out.append(EmbeddedText(experiment_id=cfg.experiment_id, text_id=f"t{i}", role=role,
                                prompt_id=f"q{i % 17}", text=f"text {i}", embedding_model="test", dim=32,
                                vector_b64=EmbeddedText.encode_vector(v, "float32"), dtype="float32"))
    return out


@pytest.mark.slow
async def test_clusterer_killed_and_restarted_loses_nothing_and_counts_nothing_twice(
        kafka_bootstrap, redis_url, unique, tmp_path):
    cfg = _cfg(unique, kafka_bootstrap, redis_url, bus={"partitions": 1, "max_poll_records": 50},
               clusterer={"warmup": 100, "k_initial": 4, "k_max": 8, "snapshot_every_n": 150,
                          "snapshot_every_s": 0.3, "split_every": 500})
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), 1, 1)
    events = _embedded(cfg, 3000)
    prod = Producer(cfg.bus, kafka_bootstrap, topics, "test")
    await prod.start()
    for e in events[:1500]:  # the rest arrives while the clusterer is dead
        await prod.send(e)
    await prod.flush()
    group = f"{cfg.bus.topic_prefix}.{cfg.experiment_id}.clusterer"
    emb_topic = topics.name("embeddings")
    log = tmp_path / "clusterer.log"
    proc = _service("clusterer", cfg, log)
    at_kill = await _wait_committed(kafka_bootstrap, group, emb_topic, 600)
    proc.kill()  # SIGKILL: no drain, no final snapshot
    assert at_kill < len(events), "the kill must land mid-stream"
    for e in events[1500:]:
        await prod.send(e)
    await prod.flush()
    await prod.stop()
    proc.wait(timeout=10)
    proc = _service("clusterer", cfg, log)
    await _wait_committed(kafka_bootstrap, group, emb_topic, len(events), timeout_s=90)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
    snaps = [ClusterSnapshot.from_bytes(r.value) for r in
             await read_records(cfg, kafka_bootstrap, "cluster-snapshots", 10_000, timeout_s=5)]
    final = max(snaps, key=lambda s: (s.n_seen, s.seq))
    assert final.n_seen == len(events)  # nothing lost, nothing twice
    # the same events through one uninterrupted state give exactly the same counts
    ref = ClusterState(cfg.clusterer, cfg.experiment_id, alpha=cfg.validator.alpha)
    for i in range(0, len(events), 50):
        ref.ingest(events[i:i + 50])
    expected = ref.snapshot()
    assert [(c.cluster_id, c.count_base, c.count_intervention) for c in final.clusters] == \
           [(c.cluster_id, c.count_base, c.count_intervention) for c in expected.clusters]
