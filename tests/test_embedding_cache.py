"""The Redis embedding cache and embed_with_cache, against a real Redis/Valkey and the real MiniLM.

The encoder is wrapped in a counting double that delegates to the real model (to check what was
encoded); Redis is never mocked.  Outage tests start their own embedded Valkey so they can stop it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from redis.asyncio import Redis

from services.core.config import CacheConfig, EmbedderConfig
from services.core.infra import EmbeddedCache
from services.embedder.cache import EmbeddingCache, connect, embed_with_cache
from services.embedder.encoder import SentenceTransformerEncoder, normalise_text

TEXTS = [f"Sentence number {i} talks about {topic}." for i, topic in
         enumerate(["cats", "stock markets", "the weather", "quantum physics", "cooking pasta",
                     "football", "medieval history", "gardening", "jazz music", "space travel"])]


class CountingEncoder:
    """Delegates to a real encoder and records every batch it was asked to encode."""

    def __init__(self, inner: SentenceTransformerEncoder, model_key: str | None = None) -> None:
        self.inner = inner
        self.model_key = model_key or inner.model_key
        self.dim = inner.dim
        self.max_chars = inner.max_chars
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.encode(texts)

    def encode_normalised(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.inner.encode_normalised(texts)

    @property
    def encoded(self) -> int:
        return sum(len(c) for c in self.calls)


@pytest.fixture(scope="module")
def st_encoder() -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(EmbedderConfig())


@pytest.fixture()
def counting(st_encoder: SentenceTransformerEncoder) -> CountingEncoder:
    return CountingEncoder(st_encoder)


@pytest.fixture()
async def redis(redis_url: str, unique: str) -> AsyncIterator[Redis]:
    client = connect(redis_url)
    yield client
    keys = [k async for k in client.scan_iter(match=f"t{unique}:*", count=1000)]
    if keys:
        await client.unlink(*keys)
    await client.aclose()


@pytest.fixture()
def cache(redis: Redis, unique: str) -> EmbeddingCache:
    return EmbeddingCache(redis, CacheConfig(namespace=f"t{unique}"))


def f16(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").astype(np.float32)


# --------------------------------------------------------------------------- hits and identity


async def test_second_pass_is_all_hits_without_encoding(cache: EmbeddingCache,
                                                        counting: CountingEncoder) -> None:
    first, hit1 = await embed_with_cache(cache, counting, TEXTS)
    assert not hit1.any() and counting.encoded == len(TEXTS)
    second, hit2 = await embed_with_cache(cache, counting, TEXTS)
    assert hit2.all() and counting.encoded == len(TEXTS)  # the encoder was not called again
    np.testing.assert_array_equal(first, second)  # misses go through float16 too: identical vectors
    np.testing.assert_allclose(first, counting.inner.encode(TEXTS), atol=2e-3)  # float16 step ~5e-4
    assert cache.hits == len(TEXTS) and cache.misses == len(TEXTS)
    assert cache.bytes_written == cache.bytes_read == len(TEXTS) * 384 * 2


async def test_partial_hits_encode_only_misses(cache: EmbeddingCache, counting: CountingEncoder) -> None:
    await embed_with_cache(cache, counting, TEXTS[:5])
    counting.calls.clear()
    _, hits = await embed_with_cache(cache, counting, TEXTS)
    assert hits.tolist() == [True] * 5 + [False] * 5
    assert counting.calls == [TEXTS[5:]]


async def test_other_model_key_never_sees_these_vectors(cache: EmbeddingCache,
                                                        st_encoder: SentenceTransformerEncoder) -> None:
    a = CountingEncoder(st_encoder)
    b = CountingEncoder(st_encoder, model_key=st_encoder.model_key.replace("seq=256", "seq=128"))
    await embed_with_cache(cache, a, TEXTS)
    assert await cache.get_many(b.model_key, TEXTS) == [None] * len(TEXTS)
    _, hits = await embed_with_cache(cache, b, TEXTS)
    assert not hits.any() and b.encoded == len(TEXTS)
    assert cache.key(a.model_key, TEXTS[0]) != cache.key(b.model_key, TEXTS[0])


async def test_duplicates_in_a_batch_are_encoded_once(cache: EmbeddingCache,
                                                      counting: CountingEncoder) -> None:
    texts = ["alpha beta", "gamma", "alpha beta", "  alpha   beta ", "gamma", "alpha\u00a0beta"]
    vecs, hits = await embed_with_cache(cache, counting, texts)
    assert counting.calls == [["alpha beta", "gamma"]]
    assert not hits.any()
    for i in (2, 3, 5):
        np.testing.assert_array_equal(vecs[i], vecs[0])
    np.testing.assert_array_equal(vecs[4], vecs[1])


async def test_no_cache_still_embeds_and_dedupes(counting: CountingEncoder) -> None:
    vecs, hits = await embed_with_cache(None, counting, ["a b", "a b", "c"])
    assert vecs.shape == (3, 384) and not hits.any() and counting.encoded == 2
    empty, none_hit = await embed_with_cache(None, counting, [])
    assert empty.shape == (0, 384) and none_hit.shape == (0,)


# --------------------------------------------------------------------------- key scheme, values, TTL


async def test_key_scheme_and_value_layout(cache: EmbeddingCache, redis: Redis, unique: str) -> None:
    mk, text = "model@rev|pool=mean", "hello world"
    mh = hashlib.blake2b(f"{mk}|float16".encode()).hexdigest()[:16]
    th = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    assert cache.key(mk, text) == f"t{unique}:emb:v1:{mh}:{th}"
    vec = np.linspace(-1, 1, 384, dtype=np.float32)
    await cache.put_many(mk, [text], vec[None])
    raw = await redis.get(cache.key(mk, text))
    assert raw == vec.astype("<f2").tobytes()
    assert 0 < await redis.ttl(cache.key(mk, text)) <= cache.cfg.ttl_s


async def test_hits_refresh_the_ttl(redis: Redis, unique: str) -> None:
    cache = EmbeddingCache(redis, CacheConfig(namespace=f"t{unique}", ttl_s=5000))
    vec = np.ones((1, 8), np.float32)
    await cache.put_many("m", ["t"], vec)
    key = cache.key("m", "t")
    await redis.expire(key, 10)
    assert (await cache.get_many("m", ["t", "absent"]))[1] is None
    assert await redis.ttl(key) > 4000
    assert await redis.ttl(cache.key("m", "absent")) == -2  # a miss creates nothing


async def test_no_ttl_when_disabled(redis: Redis, unique: str) -> None:
    cache = EmbeddingCache(redis, CacheConfig(namespace=f"t{unique}", ttl_s=None))
    await cache.put_many("m", ["t"], np.ones((1, 8), np.float32))
    assert await redis.ttl(cache.key("m", "t")) == -1
    got = await cache.get_many("m", ["t"])
    assert got[0] is not None and await redis.ttl(cache.key("m", "t")) == -1


async def test_float32_values_are_exact_and_separate(redis: Redis, unique: str) -> None:
    c32 = EmbeddingCache(redis, CacheConfig(namespace=f"t{unique}", vector_dtype="float32"))
    c16 = EmbeddingCache(redis, CacheConfig(namespace=f"t{unique}"))
    vec = np.random.default_rng(0).standard_normal((1, 384)).astype(np.float32)
    await c32.put_many("m", ["t"], vec)
    got = await c32.get_many("m", ["t"])
    np.testing.assert_array_equal(got[0], vec[0])
    assert await c16.get_many("m", ["t"]) == [None]  # the dtype is part of the model hash


async def test_corrupt_value_is_a_miss_and_is_rewritten(cache: EmbeddingCache, counting: CountingEncoder,
                                                        redis: Redis) -> None:
    key = cache.key(counting.model_key, normalise_text(TEXTS[0], counting.max_chars))
    await redis.set(key, b"abc")
    vecs, hits = await embed_with_cache(cache, counting, TEXTS[:1])
    assert not hits.any() and cache.errors == 1 and counting.encoded == 1
    assert len(await redis.get(key)) == 384 * 2
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)


async def test_put_many_rejects_mismatched_lengths(cache: EmbeddingCache) -> None:
    with pytest.raises(ValueError, match="2 texts but 1 vectors"):
        await cache.put_many("m", ["a", "b"], np.ones((1, 4), np.float32))


# --------------------------------------------------------------------------- pathological inputs


async def test_pathological_texts(cache: EmbeddingCache, counting: CountingEncoder) -> None:
    huge = "word " * 200_000 + "tail"  # 1 MB: truncated by rule, then embedded
    texts = [huge, "lone \ud800 surrogate", "emoji 😀👩\u200d💻", "ctrl\x00\x07\x1b[0m chars", "tab\there"]
    vecs, hits = await embed_with_cache(cache, counting, texts)
    assert np.isfinite(vecs).all() and not hits.any()
    assert max(len(t) for c in counting.calls for t in c) <= counting.max_chars
    truncated = normalise_text(huge, counting.max_chars)
    again, hits2 = await embed_with_cache(cache, counting, [truncated, *texts])
    assert hits2.all()  # the huge text and its truncation share one key
    np.testing.assert_array_equal(again[1:], vecs)


# --------------------------------------------------------------------------- throughput path


async def test_get_many_2000_keys(cache: EmbeddingCache) -> None:
    texts = [f"text {i}" for i in range(2000)]
    vecs = np.random.default_rng(1).standard_normal((2000, 384)).astype(np.float32)
    await cache.put_many("m", texts, vecs)
    got = await cache.get_many("m", [*texts, "missing"])
    assert got[-1] is None
    np.testing.assert_array_equal(np.stack(got[:-1]), f16(vecs))
    assert cache.hits == 2000 and cache.misses == 1


# --------------------------------------------------------------------------- outages and eviction


@pytest.fixture()
def valkey(tmp_path: Path) -> Iterator[EmbeddedCache]:
    server = EmbeddedCache(tmp_path / "valkey").start()
    yield server
    server.stop()


class ManualClock:
    """Time that moves only when the test says so: backoff decisions become deterministic."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_redis_outage_degrades_then_recovers(valkey: EmbeddedCache, counting: CountingEncoder,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    cache = EmbeddingCache.from_url(valkey.url, CacheConfig(namespace="outage"), clock=clock,
                                    backoff_initial_s=1.0, backoff_max_s=4.0)
    expected = f16(counting.inner.encode(TEXTS))
    await embed_with_cache(cache, counting, TEXTS[:5])
    valkey.stop()
    caplog.set_level(logging.INFO, logger="autointerv.embedder.cache")
    for step in range(6):  # keeps producing correct vectors, computed, while Redis is gone
        vecs, hits = await embed_with_cache(cache, counting, TEXTS)
        assert not hits.any() and cache.degraded
        np.testing.assert_allclose(vecs, expected, atol=1e-6)
        clock.now += 0.5 * (step + 1)  # t = 0.5, 1.5, 3, 5, 7.5, 10.5
    # Each batch is a get and a put.  Redis is tried at t=0 (retry at 1), t=1.5 (backoff doubles:
    # retry at 3.5) and t=5 (retry at 9); the other 9 of the 12 calls are skipped without a try.
    assert cache.errors == 3
    assert cache.skipped == 9
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()

    valkey.start()  # the same port and data dir: the client reconnects by itself
    try:
        other = [f"after the restart {i}" for i in range(3)]
        await embed_with_cache(cache, counting, other)  # t=10.5, past the retry time of 9
        assert not cache.degraded
        _, hits = await embed_with_cache(cache, counting, other)
        assert hits.all()
        assert any("recovered" in r.getMessage() for r in caplog.records)
    finally:
        await cache.aclose()


async def test_noeviction_oom_degrades_without_raising(valkey: EmbeddedCache) -> None:
    admin = Redis.from_url(valkey.url)
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", "2mb")
    cache = EmbeddingCache.from_url(valkey.url, CacheConfig(namespace="oom"), backoff_initial_s=0.01)
    vecs = np.zeros((500, 384), np.float32)
    for b in range(20):  # ~7.7 MB of values into 2 MB
        await cache.put_many("m", [f"{b}-{i}" for i in range(500)], vecs)
    assert cache.degraded and cache.errors >= 1
    assert await cache.get_many("m", ["x"]) == [None]  # lookups still answer (misses), no exception
    await admin.aclose()
    await cache.aclose()


async def test_volatile_lru_evicts_old_vectors(valkey: EmbeddedCache) -> None:
    admin = Redis.from_url(valkey.url)
    await admin.config_set("maxmemory", "4mb")  # the embedded Valkey runs volatile-lru
    cache = EmbeddingCache.from_url(valkey.url, CacheConfig(namespace="lru"))
    vecs = np.zeros((500, 384), np.float32)
    for b in range(20):  # ~7.7 MB of values (plus key overhead) into 4 MB
        await cache.put_many("m", [f"{b}-{i}" for i in range(500)], vecs)
    assert not cache.degraded and cache.errors == 0  # every key has a TTL, so all are evictable
    assert (await admin.info("stats"))["evicted_keys"] > 0
    kept = [k async for k in admin.scan_iter(match="lru:emb:*", count=1000)]
    assert 0 < len(kept) < 20 * 500
    assert -1 not in [await admin.ttl(k) for k in kept[:50]]  # every key expires (-2: evicted since)
    await admin.aclose()
    await cache.aclose()
