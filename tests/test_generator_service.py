"""The generator service against the real broker: two replicas with one SIGKILLed mid-stream (nothing
lost, re-deliveries yield identical text ids), samples and exemplar continuations, and backpressure
that pauses on embedder lag and resumes once an embedder drains it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import RecordMetadata

from services.core.bus import Producer, Topics, ensure_topics, group_lag
from services.core.config import Config, load_config
from services.core.events import DecodedText, Envelope, Exemplar, GenerationRequest, PromptRef, stable_id
from services.core.metrics import Metrics
from services.core.runtime import ServiceContext
from services.embedder import EmbedderService
from services.generator import GeneratorService

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4


def _cfg(unique: str, bootstrap: str, redis_url: str, **over: dict[str, object]) -> Config:
    base: dict[str, dict[str, object]] = {
        "experiment": {"id": f"exp-{unique}"},
        "bus": {"topic_prefix": f"g-{unique}", "partitions": PARTITIONS},
        "cache": {"namespace": f"ns-{unique}"}, "observability": {"metrics_port": None},
        "embedder": {"backend": "hashing"}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_config(None, environ={"KAFKA_BOOTSTRAP": bootstrap, "REDIS_URL": redis_url}, overrides=base)


def _env(cfg: Config, bootstrap: str, redis_url: str) -> dict[str, str]:
    """The same config for every replica, so they share one consumer group."""
    return {**os.environ, "KAFKA_BOOTSTRAP": bootstrap, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1",
            "AUTOINTERV__EXPERIMENT__ID": cfg.experiment_id,
            "AUTOINTERV__BUS__TOPIC_PREFIX": cfg.bus.topic_prefix,
            "AUTOINTERV__BUS__PARTITIONS": str(cfg.bus.partitions),
            "AUTOINTERV__BUS__MAX_POLL_RECORDS": "8",
            "AUTOINTERV__CACHE__NAMESPACE": cfg.cache.namespace,
            "AUTOINTERV__OBSERVABILITY__METRICS_PORT": ""}


def _replica(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "services.cli", "service", "generator"], cwd=ROOT, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


class Reader:
    """Reads a topic from the start, without a group (no join wait), keeping every record seen."""

    def __init__(self, cfg: Config, bootstrap: str, logical: str) -> None:
        self.topic = Topics(cfg.bus.topic_prefix).name(logical)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                         auto_offset_reset="earliest", fetch_max_wait_ms=100)
        self._texts: list[tuple[DecodedText, str]] = []

    async def __aenter__(self) -> Reader:
        await self.consumer.start()
        self.consumer.assign([TopicPartition(self.topic, p) for p in range(PARTITIONS)])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def poll(self) -> int:
        got = await self.consumer.getmany(timeout_ms=200)
        new = [r for recs in got.values() for r in recs]
        for r in new:
            env = Envelope.from_headers(r.headers)
            self._texts.append((DecodedText.from_bytes(r.value), env.source if env else ""))
        return len(new)

    async def until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await self.poll()

    async def drain(self) -> None:
        """Read on until a poll comes back empty (late duplicates included)."""
        while await self.poll():
            pass

    def texts(self) -> list[tuple[DecodedText, str]]:
        """(event, ce_source: the producing instance) per record read so far."""
        return self._texts


def _requests(cfg: Config, n: int, n_per_prompt: int = 2, first: int = 0) -> list[GenerationRequest]:
    return [GenerationRequest(experiment_id=cfg.experiment_id, role="base" if i % 2 else "intervention",
                              request_id=stable_id(cfg.experiment_id, "req", i), n_per_prompt=n_per_prompt,
                              prompts=[PromptRef(prompt_id=f"p{i}-{j}", text=f"Write about topic {i} {j}.")
                                       for j in range(2)])
            for i in range(first, first + n)]


def _expected_ids(req: GenerationRequest) -> set[str]:
    return {stable_id(req.request_id, req.role, p.prompt_id, "", s)
            for p in req.prompts for s in range(req.n_per_prompt)}


async def _send(raw: AIOKafkaProducer, topic: str,
                reqs: list[GenerationRequest]) -> dict[str, RecordMetadata]:
    """Send and wait for acks; the metadata says which partition/offset each request landed on."""
    futs = [await raw.send(topic, r.to_bytes(), key=r.partition_key().encode(),
                           headers=Envelope.for_event(r, "test").to_headers()) for r in reqs]
    return {r.request_id: md for r, md in zip(reqs, await asyncio.gather(*futs), strict=True)}


async def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    return {p.partition: p.committed or 0 for p in await group_lag(bootstrap, group, [topic])}


@pytest.mark.slow
async def test_two_replicas_one_killed_mid_stream_lose_nothing(kafka_bootstrap, redis_url, unique, tmp_path):
    cfg = _cfg(unique, kafka_bootstrap, redis_url)
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), PARTITIONS, 1)
    req_topic = topics.name(GenerationRequest.topic)
    group = f"{cfg.bus.topic_prefix}.{cfg.experiment_id}.generator-base+intervention"
    env = _env(cfg, kafka_bootstrap, redis_url)
    procs = [_replica(env, tmp_path / f"gen{i}.log") for i in range(2)]
    sources = [f"autointerv/generator/{socket.gethostname()}-{p.pid}" for p in procs]
    victim, survivor = procs
    reqs = _requests(cfg, 200)
    # heavy requests (80 texts each) keep the victim busy when it is killed
    heavy = _requests(cfg, 20, n_per_prompt=40, first=1000)
    where: dict[str, RecordMetadata] = {}
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await raw.start()
    sent = 0
    try:
        async with Reader(cfg, kafka_bootstrap, DecodedText.topic) as reader:
            # 1. trickle requests until both replicas have served some (both joined the group)
            deadline = time.monotonic() + 90
            while {s for _, s in reader.texts()} < set(sources):
                assert time.monotonic() < deadline and sent < 140, \
                    f"both replicas never served: {Counter(s for _, s in reader.texts())}"
                where.update(await _send(raw, req_topic, reqs[sent:sent + 1]))
                sent += 1
                await reader.poll()
                await asyncio.sleep(0.1)
            # 2. the victim has committed some of the requests it served (their offset is below the
            #    group's committed offset of their partition)
            served = {t.request_id for t, s in reader.texts() if s == sources[0]}

            async def victim_committed() -> bool:
                committed = await _committed(kafka_bootstrap, group, req_topic)
                return any(committed.get(where[r].partition, 0) > where[r].offset for r in served)

            deadline = time.monotonic() + 30
            while not await victim_committed():
                assert time.monotonic() < deadline, "the victim never committed what it served"
                await asyncio.sleep(0.2)
            # 3. kill it while it works through the heavy requests; the rest come afterwards
            where.update(await _send(raw, req_topic, heavy))
            busy = {(r.request_id, sources[0]) for r in heavy}
            await reader.until(lambda: any((t.request_id, s) in busy for t, s in reader.texts()),
                               30, "the victim to serve a heavy request")
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            for i in range(sent, len(reqs), 10):
                where.update(await _send(raw, req_topic, reqs[i:i + 10]))
                await asyncio.sleep(0.05)
            # requests sent after the kill land on every partition, the victim's included
            assert {where[r.request_id].partition for r in reqs[sent:]} == set(range(PARTITIONS))
            # 4. the survivor takes the victim's partitions over (after the rebalance) and finishes
            deadline = time.monotonic() + 90
            while sum((await _committed(kafka_bootstrap, group, req_topic)).values()) < len(where):
                assert survivor.poll() is None, (tmp_path / "gen1.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the survivor never finished the stream"
                await asyncio.sleep(0.3)
            expected = set().union(*(_expected_ids(r) for r in reqs + heavy))
            await reader.until(lambda: {t.text_id for t, _ in reader.texts()} >= expected, 30, "all texts")
            await reader.drain()
            texts = reader.texts()
    finally:
        await raw.stop()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    assert survivor.wait(timeout=30) == 0, (tmp_path / "gen1.log").read_text()[-3000:]

    by_id: dict[str, list[DecodedText]] = defaultdict(list)
    for t, _ in texts:
        by_id[t.text_id].append(t)
    assert set(by_id) == expected  # nothing lost, nothing unexpected
    duplicates = {tid: ts for tid, ts in by_id.items() if len(ts) > 1}
    for ts in duplicates.values():  # a re-delivered request re-yields the very same texts
        assert len({(t.request_id, t.prompt_id, t.sample_index, t.text) for t in ts}) == 1
    per_source = Counter(s for _, s in texts)
    assert per_source[sources[0]] > 0 and per_source[sources[1]] > 0
    n_dup = sum(len(ts) - 1 for ts in duplicates.values())
    print(f"texts {len(texts)} (distinct {len(by_id)}), re-delivered duplicates {n_dup} over "
          f"{len(duplicates)} text ids; per replica {dict(per_source)}")


async def _run_service(svc: GeneratorService | EmbedderService) -> asyncio.Task[None]:
    task = asyncio.create_task(svc.run())
    deadline = time.monotonic() + 30
    while svc._consumer is None or not svc._consumer.assignment():
        assert time.monotonic() < deadline and not task.done(), "service never got its partitions"
        await asyncio.sleep(0.05)
    return task


async def test_samples_and_exemplar_continuations(kafka_bootstrap, redis_url, unique):
    cfg = _cfg(unique, kafka_bootstrap, redis_url)
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), PARTITIONS, 1)
    svc = GeneratorService(ServiceContext(cfg, kafka_bootstrap, redis_url, Metrics(), topics))
    task = await _run_service(svc)
    exemplar_text = "Honestly nothing beats sailing a small boat out of the harbor onto the open sea today."
    plain = GenerationRequest(experiment_id=cfg.experiment_id, role="base", n_per_prompt=3,
                              prompts=[PromptRef(prompt_id=f"q{i}", text=f"On {i}.") for i in range(4)])
    targeted = GenerationRequest(
        experiment_id=cfg.experiment_id, role="intervention", n_per_prompt=3, reason="uncertainty",
        prompts=[PromptRef(prompt_id="q9", text="A note on sailing.")],
        exemplars=[Exemplar(text_id="ex-1", prompt_id="q9", text=exemplar_text, prefix_tokens=5),
                   Exemplar(text_id="ex-2", prompt_id="q8", text="Cats purr on desks.", prefix_tokens=3)])
    prod = Producer(cfg.bus, kafka_bootstrap, topics, "test")
    await prod.start()
    try:
        for r in (plain, targeted):
            await prod.send(r)
        await prod.flush()
        async with Reader(cfg, kafka_bootstrap, DecodedText.topic) as reader:
            await reader.until(lambda: len(reader.texts()) >= 4 * 3 + 3 * 3, 30, "texts")
            await reader.drain()
            texts = [t for t, _ in reader.texts()]
    finally:
        await prod.stop()
        svc.stop()
        await task
    assert len(texts) == len({t.text_id for t in texts}) == 21
    samples: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for t in texts:
        samples[(t.request_id, t.prompt_id, t.meta.get("exemplar_text_id", ""))].append(t.sample_index)
    assert all(sorted(v) == [0, 1, 2] for v in samples.values()) and len(samples) == 7
    cont = [t for t in texts if t.request_id == targeted.request_id and "exemplar_text_id" in t.meta]
    assert {t.meta["exemplar_text_id"] for t in cont} == {"ex-1", "ex-2"} and len(cont) == 6
    prompts = {ex: {t.prompt for t in cont if t.meta["exemplar_text_id"] == ex} for ex in ("ex-1", "ex-2")}
    assert prompts == {"ex-1": {"Honestly nothing beats sailing a"}, "ex-2": {"Cats purr on"}}  # the prefixes
    assert all(t.meta.get("exemplar_text_id") is None for t in texts if t.request_id == plain.request_id)


async def _poll_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_backpressure_pauses_on_embedder_lag_and_resumes_when_drained(kafka_bootstrap, redis_url,
                                                                            unique):
    cfg = _cfg(unique, kafka_bootstrap, redis_url, generator={"max_embedder_lag": 50, "lag_check_s": 0.2},
               bus={"max_poll_records": 4})
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), PARTITIONS, 1)
    gen_metrics = Metrics()
    gen = GeneratorService(ServiceContext(cfg, kafka_bootstrap, redis_url, gen_metrics, topics))
    gen_task = await _run_service(gen)
    prod = Producer(cfg.bus, kafka_bootstrap, topics, "test")
    await prod.start()
    reqs = _requests(cfg, 60)  # 4 texts each: 240 texts, far above the limit of 50 unembedded texts

    def processed() -> float:
        return gen_metrics.value("records_processed_total", service="generator", topic="generation-requests")

    def paused() -> float:
        return gen_metrics.value("generator_paused", service="generator")

    emb: EmbedderService | None = None
    emb_task: asyncio.Task[None] | None = None
    try:
        for r in reqs[:40]:
            await prod.send(r)
        await prod.flush()
        await _poll_until(lambda: paused() == 1, 30, "the generator to pause")
        assert gen_metrics.value("generator_observed_embedder_lag", service="generator") > 50
        # paused: requests sent now stay unconsumed until the lag is worked off
        at_pause = processed()
        for r in reqs[40:]:
            await prod.send(r)
        await prod.flush()
        # no fixed wait: poll until the paused generator has checked the lag three more times (it
        # has had every chance to consume), then it must still be paused with nothing processed
        sent_at = time.monotonic()
        await _poll_until(lambda: gen._last_lag_check > sent_at + 3 * cfg.generator.lag_check_s, 30,
                          "three lag checks after the requests were sent")
        assert paused() == 1 and processed() == at_pause
        emb = EmbedderService(ServiceContext(cfg, kafka_bootstrap, redis_url, Metrics(), topics))
        emb_task = asyncio.create_task(emb.run())
        await _poll_until(lambda: paused() == 0, 60, "the generator to resume")
        await _poll_until(lambda: processed() == len(reqs), 60, "every request to be served")
        await _poll_until(lambda: paused() == 0, 60, "the generator to end unpaused")
        emb.stop()
        await emb_task
    finally:
        await prod.stop()
        gen.stop()
        await gen_task
        if emb is not None and emb_task is not None and not emb_task.done():
            emb.stop()
            await emb_task
