"""The embedder service against the real broker and Redis: two replicas share one stream and one
cache (each distinct text encoded once across both), a Redis restart mid-stream loses nothing,
pathological texts are dead-lettered or truncated, and two models never share cache entries."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from service_helpers import offline_context, running

from services.core.bus import Producer, Topics, ensure_topics
from services.core.config import Config, load_config
from services.core.events import DeadLetter, DecodedText, EmbeddedText, Envelope, Event
from services.core.infra import EmbeddedCache, free_port
from services.core.metrics import Metrics
from services.core.runtime import Incoming, ServiceContext
from services.embedder import EmbedderService
from services.embedder import cache as cache_module
from services.embedder import encoder as encoder_module
from services.embedder import hashing as hashing_module
from services.embedder.cache import connect
from services.embedder.encoder import normalise_text
from services.embedder.hashing import HashingEncoder

PARTITIONS = 4
MINILM = "bundled:all-MiniLM-L6-v2"
WORDS = ["garlic", "compost", "budget", "sleep", "passport", "compiler", "treaty", "melody", "striker",
         "bedtime", "storm", "brakes", "lens", "gambit", "squats", "comet", "espresso", "summit"]


def _cfg(unique: str, bootstrap: str, redis_url: str, *, exp: str = "", backend: str = "hashing",
         namespace: str | None = None) -> Config:
    return load_config(None, environ={"KAFKA_BOOTSTRAP": bootstrap, "REDIS_URL": redis_url}, overrides={
        "experiment": {"id": f"exp-{unique}{exp}"},
        "bus": {"topic_prefix": f"e-{unique}{exp}", "partitions": PARTITIONS},
        "cache": {"namespace": namespace or f"ns-{unique}"}, "observability": {"metrics_port": None},
        "embedder": {"backend": backend, "model": MINILM}})


def _distinct_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Note {i}: the {rng.choice(WORDS)} matters more than the {rng.choice(WORDS)}." for i in range(n)]


def _decoded(cfg: Config, text_id: str, text: str) -> DecodedText:
    return DecodedText(experiment_id=cfg.experiment_id, text_id=text_id, request_id="r", role="base",
                       model_id="sim-base", prompt_id="p", text=text)


class Reader:
    """Reads a topic from the start, without a group (no join wait), keeping every record seen."""

    def __init__(self, cfg: Config, bootstrap: str, logical: str) -> None:
        self.topic = Topics(cfg.bus.topic_prefix).name(logical)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                         auto_offset_reset="earliest", fetch_max_wait_ms=100,
                                         fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20)
        self.records: list[ConsumerRecord] = []

    async def __aenter__(self) -> Reader:
        await self.consumer.start()
        self.consumer.assign([TopicPartition(self.topic, p) for p in range(PARTITIONS)])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

    async def poll(self) -> int:
        got = await self.consumer.getmany(timeout_ms=200)
        new = [r for recs in got.values() for r in recs]
        self.records += new
        return len(new)

    async def until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await self.poll()

    async def drain(self) -> None:
        while await self.poll():
            pass

    def embedded(self) -> list[tuple[EmbeddedText, str]]:
        """(event, ce_source) per record."""
        out = []
        for r in self.records:
            env = Envelope.from_headers(r.headers)
            out.append((EmbeddedText.from_bytes(r.value), env.source if env else ""))
        return out

    def ids(self) -> set[str]:
        return {e.text_id for e, _ in self.embedded()}


async def _start(*services: EmbedderService) -> list[asyncio.Task[None]]:
    """Run services until they share every partition between them (no rebalance mid-stream)."""
    tasks = [asyncio.create_task(s.run()) for s in services]
    deadline = time.monotonic() + 60
    while True:
        texts = services[0].ctx.topics.name(DecodedText.topic)  # (each also reads the control topic)
        parts = [sum(tp.topic == texts for tp in s._consumer.assignment()) if s._consumer else 0 for s in services]
        if all(parts) and sum(parts) == PARTITIONS:
            return tasks
        assert time.monotonic() < deadline and not any(t.done() for t in tasks), f"assignment {parts}"
        await asyncio.sleep(0.05)


async def _stop(services: list[EmbedderService], tasks: list[asyncio.Task[None]]) -> None:
    for s in services:
        s.stop()
    await asyncio.gather(*tasks)


async def _produce(prod: Producer, events: list[DecodedText]) -> None:
    for e in events:
        await prod.send(e)
    await prod.flush()


def _misses(m: Metrics) -> float:
    return m.value("embedder_cache_misses_total", service="embedder")


def _hits(m: Metrics) -> float:
    return m.value("embedder_cache_hits_total", service="embedder")


async def _setup(cfg: Config, bootstrap: str) -> tuple[Topics, Producer]:
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(bootstrap, topics.all(), PARTITIONS, 1)
    prod = Producer(cfg.bus, bootstrap, topics, "test")
    await prod.start()
    return topics, prod


@pytest.fixture(autouse=True)
async def _clean_cache(redis_url: str, unique: str) -> AsyncIterator[None]:
    """Remove the test's vectors from the shared Redis afterwards."""
    yield
    client = connect(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"ns-{unique}:*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- replicas


@pytest.mark.parametrize(("backend", "n_distinct", "copies"), [
    ("hashing", 200, 2),
    pytest.param("torch", 25, 1, marks=pytest.mark.slow),  # the real bundled MiniLM, 50 texts
])
async def test_two_replicas_embed_each_distinct_text_once(kafka_bootstrap, redis_url, unique, backend,
                                                           n_distinct, copies):
    cfg = _cfg(unique, kafka_bootstrap, redis_url, backend=backend)
    topics, prod = await _setup(cfg, kafka_bootstrap)
    metrics = [Metrics(), Metrics()]
    replicas = [EmbedderService(ServiceContext(cfg, kafka_bootstrap, redis_url, m, topics, instance=f"r{i}"))
                for i, m in enumerate(metrics)]
    tasks = await _start(*replicas)
    distinct = _distinct_texts(n_distinct)
    first = [_decoded(cfg, f"a{i}", t) for i, t in enumerate(distinct)]
    # repeats arrive after every first occurrence is out, each on whichever replica owns its id's
    # partition; a third of them differ only in whitespace (the same text after normalisation)
    rng = random.Random(1)
    repeats = [_decoded(cfg, f"b{j}", f"  {t}\n" if j % 3 == 0 else t)
               for j, t in enumerate(rng.sample(distinct * copies, len(distinct) * copies))]
    try:
        async with Reader(cfg, kafka_bootstrap, EmbeddedText.topic) as reader:
            await _produce(prod, first)
            await reader.until(lambda: len(reader.ids()) >= len(first), 60, "first occurrences")
            await _produce(prod, repeats)
            await reader.until(lambda: len(reader.ids()) >= len(first) + len(repeats), 60, "repeats")
            await reader.drain()
            out = reader.embedded()
    finally:
        await prod.stop()
        await _stop(replicas, tasks)

    by_id = {e.text_id: (e, src) for e, src in out}
    assert set(by_id) == {e.text_id for e in first + repeats}  # every text embedded (dupes removed)
    # no text encoded twice across the two replicas: misses add up to the distinct texts
    assert sum(_misses(m) for m in metrics) == n_distinct
    assert all(_misses(m) > 0 for m in metrics)  # both replicas did encode
    assert all(by_id[e.text_id][0].cache_hit for e in repeats)
    assert all(not by_id[e.text_id][0].cache_hit for e in first)
    # a repeat served by one replica of a text first encoded by the other replica is still a hit
    first_src = {normalise_text(by_id[e.text_id][0].text, 4000): by_id[e.text_id][1] for e in first}
    crossed = {src for e in repeats for ev, src in [by_id[e.text_id]]
               if src != first_src[normalise_text(ev.text, 4000)]}
    assert crossed == {"autointerv/embedder/r0", "autointerv/embedder/r1"}
    # one vector per distinct text, whichever replica or path (hit/miss) produced it
    vecs: dict[str, list[np.ndarray]] = defaultdict(list)
    for ev, _ in by_id.values():
        vecs[normalise_text(ev.text, 4000)].append(ev.vector())
    assert len(vecs) == n_distinct
    assert all(np.array_equal(v[0], w) for v in vecs.values() for w in v[1:])


async def test_duplicates_within_one_batch_are_encoded_once(kafka_bootstrap, redis_url, unique):
    """Misses count vectors computed: identical texts in one polled batch are one computation."""
    cfg = _cfg(unique, kafka_bootstrap, redis_url)
    topics, prod = await _setup(cfg, kafka_bootstrap)
    distinct = _distinct_texts(30, seed=2)
    events = [_decoded(cfg, f"d{i}", distinct[i % 30]) for i in range(120)]
    await _produce(prod, events)  # all queued before the service starts: few, large batches
    await prod.stop()
    metrics = Metrics()
    svc = EmbedderService(ServiceContext(cfg, kafka_bootstrap, redis_url, metrics, topics))
    tasks = await _start(svc)
    try:
        async with Reader(cfg, kafka_bootstrap, EmbeddedText.topic) as reader:
            await reader.until(lambda: len(reader.ids()) >= 120, 60, "all texts")
    finally:
        await _stop([svc], tasks)
    assert _misses(metrics) == 30 and _hits(metrics) == 90
    assert metrics.value("embedder_texts_total", service="embedder") == 120


class CapturingEmbedder(EmbedderService):
    """The embedder with ``emit`` and ``dead_letter`` collecting instead of producing to Kafka."""

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.out: list[Event] = []
        self.dead: list[str] = []

    async def emit(self, event: Event, topic: str | None = None) -> None:
        self.out.append(event)

    async def dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        self.dead.append(reason)


async def test_each_text_is_normalised_once_per_batch(redis_url, unique, monkeypatch):
    """The dead-letter check, the cache key, the model input and the miss count share one pass."""
    normalised: list[str] = []
    real = encoder_module.normalise_text

    def counting(text: str, max_chars: int) -> str:
        normalised.append(text)
        return real(text, max_chars)

    for module in (encoder_module, cache_module, hashing_module):  # every module that calls it by name
        monkeypatch.setattr(module, "normalise_text", counting)
    cfg = _cfg(unique, "127.0.0.1:1", redis_url)
    texts = ["  Messy\ttext\x07 one ", "text two", "text two", "\x00 \x01 "]  # a repeat, an empty one
    svc = CapturingEmbedder(offline_context(cfg, redis_url))
    async with running(svc):
        await svc.handle([Incoming(event=_decoded(cfg, f"t{i}", t), record=None)
                          for i, t in enumerate(texts)])
    assert sorted(normalised) == sorted(texts)  # each text once, none twice
    assert [e.text_id for e in svc.out] == ["t0", "t1", "t2"]
    assert svc.dead == ["text not embeddable: text is empty after normalisation"]
    monkeypatch.undo()
    expected = HashingEncoder(cfg.embedder).encode(texts[:3])  # normalises raw texts itself
    got = np.stack([e.vector() for e in svc.out if isinstance(e, EmbeddedText)])
    np.testing.assert_allclose(got, expected, atol=2e-3)  # float16 on the wire


# --------------------------------------------------------------------------- failures


async def test_redis_restart_mid_stream_loses_nothing(kafka_bootstrap, unique, tmp_path: Path):
    port = free_port()
    cache = EmbeddedCache(tmp_path / "valkey", port=port).start()
    cfg = _cfg(unique, kafka_bootstrap, cache.url)
    topics, prod = await _setup(cfg, kafka_bootstrap)
    metrics = Metrics()
    svc = EmbedderService(ServiceContext(cfg, kafka_bootstrap, cache.url, metrics, topics))
    tasks = await _start(svc)
    texts = iter(_distinct_texts(5000, seed=3))
    sent: list[str] = []

    async def send(n: int) -> None:
        batch = [_decoded(cfg, f"t{len(sent) + i}", next(texts)) for i in range(n)]
        await _produce(prod, batch)
        sent.extend(e.text_id for e in batch)

    def degraded() -> float:
        return metrics.value("embedder_cache_degraded", service="embedder")

    async def keep_sending_until(check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 60
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await send(5)
            await asyncio.sleep(0.2)

    try:
        async with Reader(cfg, kafka_bootstrap, EmbeddedText.topic) as reader:
            await send(50)
            await reader.until(lambda: len(reader.ids()) >= 50, 60, "texts before the outage")
            assert degraded() == 0
            cache.stop()
            await keep_sending_until(lambda: degraded() == 1, "the cache to go degraded")
            await send(50)  # more texts while Redis is down
            cache = EmbeddedCache(tmp_path / "valkey", port=port).start()
            await keep_sending_until(lambda: degraded() == 0, "the cache to recover")
            await reader.until(lambda: reader.ids() >= set(sent), 60, "every text")
            await reader.drain()
            out = reader.embedded()
        # after recovery the cache is written again: the last texts' vectors are in Redis
        client = connect(cache.url)
        try:
            keys = [k async for k in client.scan_iter(match=f"{cfg.cache.namespace}:emb:*", count=1000)]
        finally:
            await client.aclose()
    finally:
        await prod.stop()
        await _stop([svc], tasks)
        cache.stop()
    assert {e.text_id for e, _ in out} == set(sent)
    assert all(e.dim == 384 for e, _ in out)
    assert 50 <= len(keys) < len(sent)  # texts seen while degraded were embedded but not cached
    print(f"sent {len(sent)} texts; {metrics.value('embedder_cache_misses_total', service='embedder'):.0f} "
          f"misses; {len(keys)} vectors cached")


async def test_pathological_texts_dead_lettered_or_truncated(kafka_bootstrap, redis_url, unique):
    cfg = _cfg(unique, kafka_bootstrap, redis_url)
    topics, prod = await _setup(cfg, kafka_bootstrap)
    huge = "enormous " * 120_000  # ~1 MB
    good = [_decoded(cfg, "normal", "A perfectly ordinary sentence."), _decoded(cfg, "huge", huge)]
    bad = [_decoded(cfg, "empty", ""), _decoded(cfg, "blank", " \x00\t\x7f\n ")]
    not_a_string = {**_decoded(cfg, "number", "x").model_dump(mode="json"), "text": 12345}
    metrics = Metrics()
    svc = EmbedderService(ServiceContext(cfg, kafka_bootstrap, redis_url, metrics, topics))
    tasks = await _start(svc)

    def handled() -> float:  # input records the embedder has finished with, either way
        return (metrics.value("records_processed_total", service="embedder", topic="texts")
                + metrics.value("dead_letters_total", service="embedder", topic="texts"))

    try:
        for e in good + bad:
            await prod.send(e)
        await prod.send_raw(topics.name(DecodedText.topic), orjson.dumps(not_a_string), key=b"number")
        await prod.flush()
        async with Reader(cfg, kafka_bootstrap, EmbeddedText.topic) as emb, \
                Reader(cfg, kafka_bootstrap, DeadLetter.topic) as dead:
            await emb.until(lambda: len(emb.records) >= 2, 60, "embedded texts")
            await dead.until(lambda: len(dead.records) >= 3, 60, "dead letters")
            # every input handled (no fixed wait): anything it produced is on the broker to drain
            await emb.until(lambda: handled() >= len(good + bad) + 1, 60, "the embedder to finish its input")
            await emb.drain()
            await dead.drain()
            out = {e.text_id: e for e, _ in emb.embedded()}
            letters = [DeadLetter.from_bytes(r.value) for r in dead.records]
    finally:
        await prod.stop()
        await _stop([svc], tasks)
    assert set(out) == {"normal", "huge"}
    reasons = {orjson.loads(base64.b64decode(d.original_b64))["text_id"]: d.reason for d in letters}
    assert set(reasons) == {"empty", "blank", "number"}
    assert "empty after normalisation" in reasons["empty"] and "empty after normalisation" in reasons["blank"]
    assert "undecodable" in reasons["number"] and "text" in reasons["number"]
    assert all(d.service == "embedder" and d.source_topic == topics.name(DecodedText.topic) for d in letters)
    # the 1 MB text is embedded as its first max_chars characters (by rule), not rejected
    truncated = normalise_text(huge, cfg.embedder.max_chars)
    assert len(truncated) <= cfg.embedder.max_chars
    expected = HashingEncoder(cfg.embedder).encode([truncated])[0]
    assert np.allclose(out["huge"].vector(), expected, atol=2e-3)  # float16 storage


# --------------------------------------------------------------------------- model identity


@pytest.mark.slow
async def test_two_models_never_share_cache_entries(kafka_bootstrap, redis_url, unique):
    """Hashing and MiniLM both give 384-d vectors, so a shared entry would be silently wrong."""
    namespace = f"ns-{unique}"
    texts = _distinct_texts(30, seed=4)

    async def embed(exp: str, backend: str, passes: int) -> tuple[Metrics, list[EmbeddedText]]:
        cfg = _cfg(unique, kafka_bootstrap, redis_url, exp=exp, backend=backend, namespace=namespace)
        topics, prod = await _setup(cfg, kafka_bootstrap)
        metrics = Metrics()
        svc = EmbedderService(ServiceContext(cfg, kafka_bootstrap, redis_url, metrics, topics))
        tasks = await _start(svc)
        try:
            async with Reader(cfg, kafka_bootstrap, EmbeddedText.topic) as reader:
                for p in range(passes):  # later passes: new ids, same texts, after the first is out
                    await _produce(prod, [_decoded(cfg, f"{p}-{i}", t) for i, t in enumerate(texts)])
                    await reader.until(lambda n=(p + 1) * len(texts): len(reader.ids()) >= n, 60, "texts")
                return metrics, [e for e, _ in reader.embedded()]
        finally:
            await prod.stop()
            await _stop([svc], tasks)

    m_hash, out_hash = await embed("-a", "hashing", 1)
    m_lm, out_lm = await embed("-b", "torch", 2)
    m_hash2, out_hash2 = await embed("-c", "hashing", 1)
    assert (_misses(m_hash), _hits(m_hash)) == (30, 0)
    assert (_misses(m_lm), _hits(m_lm)) == (30, 30)  # MiniLM never reads hashing's vectors; its own, yes
    assert (_misses(m_hash2), _hits(m_hash2)) == (0, 30)  # and hashing's survive MiniLM's writes
    assert {e.embedding_model for e in out_lm} != {e.embedding_model for e in out_hash}
    assert all(e.dim == 384 for e in out_hash + out_lm)
    by_text = {e.text: e.vector() for e in out_hash}
    assert all(np.array_equal(by_text[e.text], e.vector()) for e in out_hash2)
    cos = [float(by_text[e.text] @ e.vector()) for e in out_lm]
    assert max(cos) < 0.9  # different models' vectors (identical ones would be 1.0)
    client = connect(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{namespace}:emb:*", count=1000)]
    finally:
        await client.aclose()
    assert len(keys) == 60 and len({k.split(b":")[3] for k in keys}) == 2  # 30 texts x 2 model hashes
