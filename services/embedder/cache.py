"""Content-addressed embedding cache in Redis, and ``embed_with_cache`` which the embedder calls.

Key scheme (documented in docs/embedding-cache.md)::

    <namespace>:emb:v1:<model_hash>:<text_hash>
    model_hash = blake2b(f"{model_key}|{vector_dtype}").hexdigest()[:16]
    text_hash  = blake2b(normalised_text.encode("utf-8"), digest_size=16).hexdigest()

The value is the raw little-endian float16 (or float32) vector; its width follows from the length.
The dtype is part of the model hash so a change of ``cache.vector_dtype`` can never misread bytes.

Every key is written with a TTL (``cache.ttl_s``), refreshed on each hit, so ``volatile-lru`` (the
embedded Valkey's policy) or ``allkeys-lru`` can evict old vectors under ``maxmemory``.  Redis being
down, erroring or out of memory (``noeviction``) never reaches the caller: the cache goes
*degraded*, answers every lookup with a miss, skips writes, logs one warning, and retries with
exponential backoff until a round trip succeeds again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from services.core.config import CacheConfig
from services.embedder.encoder import Encoder, normalise_text

log = logging.getLogger("autointerv.embedder.cache")

KEY_VERSION = "v1"
_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
# Errors that mean "the cache is unavailable", never a bug in our code.
_CACHE_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
# MGET that also re-arms each hit's TTL. Lua `false` becomes a nil reply (a table hole would not).
_GETEX_LUA = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('GETEX', key, 'EX', ARGV[1]) end
return out
"""


def model_hash(model_key: str, vector_dtype: str) -> str:
    return hashlib.blake2b(f"{model_key}|{vector_dtype}".encode()).hexdigest()[:16]


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def connect(url: str, *, connect_timeout_s: float = 2.0, timeout_s: float = 5.0) -> Redis:
    """A client that fails fast: one immediate retry (a stale pooled socket after a server restart),
    no multi-second retry ladder; the cache's own backoff handles longer outages."""
    return Redis.from_url(url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s,
                          retry=Retry(NoBackoff(), 1))


class EmbeddingCache:
    """Batched get/put of vectors keyed by (model_key, normalised text); never raises Redis errors.

    Texts passed in must already be normalised (``embed_with_cache`` does it): the key hashes
    exactly the given string.
    """

    def __init__(self, redis: Redis, cfg: CacheConfig | None = None, *, refresh_ttl: bool = True,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.cfg = cfg or CacheConfig()
        self.dtype = _DTYPES[self.cfg.vector_dtype]
        self.refresh_ttl = refresh_ttl and self.cfg.ttl_s is not None
        self._backoff_initial = backoff_initial_s
        self._backoff_max = backoff_max_s
        self._backoff = backoff_initial_s
        self._clock = clock
        self._retry_at = 0.0
        self.hits = 0
        self.misses = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.errors = 0
        self.skipped = 0  # batches not sent to Redis because the cache was degraded
        self.degraded = False
        self._getex_script = redis.register_script(_GETEX_LUA)

    @classmethod
    def from_url(cls, url: str, cfg: CacheConfig | None = None, **kwargs: Any) -> EmbeddingCache:
        return cls(connect(url), cfg, **kwargs)

    async def aclose(self) -> None:
        await self.redis.aclose()

    def stats(self) -> dict[str, int | bool]:
        return {"hits": self.hits, "misses": self.misses, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "errors": self.errors, "skipped": self.skipped,
                "degraded": self.degraded}

    def key(self, model_key: str, text: str) -> str:
        return self._key(model_hash(model_key, self.cfg.vector_dtype), text)

    def _key(self, mhash: str, text: str) -> str:
        return f"{self.cfg.namespace}:emb:{KEY_VERSION}:{mhash}:{text_hash(text)}"

    def _keys(self, model_key: str, texts: Sequence[str]) -> list[str]:
        mhash = model_hash(model_key, self.cfg.vector_dtype)
        return [self._key(mhash, t) for t in texts]

    # ------------------------------------------------------------------ degradation

    def _available(self) -> bool:
        """False while degraded and the next retry time has not come."""
        if self.degraded and self._clock() < self._retry_at:
            self.skipped += 1
            return False
        return True

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.degraded:
            self.degraded = True
            self._backoff = self._backoff_initial
            log.warning("embedding cache unavailable, continuing without it (retrying with backoff): %s",
                        _describe(exc))
        else:
            self._backoff = min(self._backoff * 2, self._backoff_max)
        self._retry_at = self._clock() + self._backoff

    def _succeeded(self) -> None:
        if self.degraded:
            self.degraded = False
            self._backoff = self._backoff_initial
            log.info("embedding cache recovered")

    # ------------------------------------------------------------------ get / put

    async def get_many(self, model_key: str, texts: Sequence[str]) -> list[np.ndarray | None]:
        """Cached float32 vectors (None for misses) in one round trip; all None if degraded."""
        if not texts:
            return []
        if not self._available():
            self.misses += len(texts)
            return [None] * len(texts)
        keys = self._keys(model_key, texts)
        try:
            raw = await self._fetch(keys)
        except _CACHE_ERRORS as exc:
            self._failed(exc)
            self.misses += len(texts)
            return [None] * len(texts)
        self._succeeded()
        return self._decode_all(raw)

    async def _fetch(self, keys: list[str]) -> list[bytes | None]:
        if self.refresh_ttl:
            try:
                # One command: a Lua loop of GETEX reads and re-arms the TTL of hits (measured
                # ~2.5x faster than a pipeline of GETEX, whose cost is redis-py's per-command work).
                return list(await self._getex_script(keys=keys, args=[self.cfg.ttl_s]))
            except ResponseError as exc:  # scripting disabled/unsupported: plain MGET from now on
                log.warning("TTL refresh on hit disabled (%s); reading with MGET", _describe(exc))
                self.refresh_ttl = False
        return list(await self.redis.mget(keys))

    def _decode_all(self, raw: list[bytes | None]) -> list[np.ndarray | None]:
        """float32 vectors for valid values; a missing or corrupt value reads as a miss."""
        size = self.dtype.itemsize
        good = [(i, v) for i, v in enumerate(raw) if v and len(v) % size == 0]
        self.errors += sum(v is not None for v in raw) - len(good)  # corrupt: overwritten later
        self.hits += len(good)
        self.misses += len(raw) - len(good)
        self.bytes_read += sum(len(v) for _, v in good)
        out: list[np.ndarray | None] = [None] * len(raw)
        if len({len(v) for _, v in good}) == 1:  # the usual case: one numpy call for the batch
            block = np.frombuffer(b"".join(v for _, v in good), dtype=self.dtype)
            rows = block.reshape(len(good), -1).astype(np.float32)
            for j, (i, _) in enumerate(good):
                out[i] = rows[j]
        else:
            for i, v in good:
                out[i] = np.frombuffer(v, dtype=self.dtype).astype(np.float32)
        return out

    def encode_vector(self, vector: np.ndarray) -> bytes:
        return np.ascontiguousarray(vector, dtype=self.dtype).tobytes()

    async def put_many(self, model_key: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors (SET with EX=ttl) in one pipelined round trip; skipped while degraded."""
        if len(texts) != len(vectors):
            raise ValueError(f"{len(texts)} texts but {len(vectors)} vectors")
        if not texts or not self._available():
            return
        pipe = self.redis.pipeline(transaction=False)
        size = 0
        for k, v in zip(self._keys(model_key, texts), vectors, strict=True):
            b = self.encode_vector(v)
            size += len(b)
            pipe.set(k, b, ex=self.cfg.ttl_s)
        try:
            await pipe.execute()
        except _CACHE_ERRORS as exc:  # incl. OOM under maxmemory-policy noeviction
            self._failed(exc)
            return
        self._succeeded()
        self.bytes_written += size

    def round_trip(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as a cache hit would return them (through the storage dtype)."""
        return np.asarray(vectors).astype(self.dtype).astype(np.float32)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


async def embed_with_cache(cache: EmbeddingCache | None, encoder: Encoder,
                           texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Vectors for raw ``texts`` (input order, float32) and a bool mask of which came from the cache.

    Each text is normalised once here; see ``embed_normalised`` for the rest.
    """
    return await embed_normalised(cache, encoder, [normalise_text(t, encoder.max_chars) for t in texts])


async def embed_normalised(cache: EmbeddingCache | None, encoder: Encoder,
                           normalised: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``embed_with_cache`` for texts already normalised with ``normalise_text(t, encoder.max_chars)``.

    Identical texts are embedded once, only cache misses encoded (in a worker thread: encode is
    CPU-bound and must not block the event loop), and the new vectors written back.  With a cache,
    computed vectors are passed through the storage dtype so a text gets the same vector whether it
    was a hit or a miss (reruns on a warm cache reproduce a cold run).
    """
    unique = list(dict.fromkeys(normalised))
    slot = {t: i for i, t in enumerate(unique)}
    found: list[np.ndarray | None] = (await cache.get_many(encoder.model_key, unique)
                                      if cache is not None else [None] * len(unique))
    vectors = np.empty((len(unique), encoder.dim), dtype=np.float32)
    for i, v in enumerate(found):
        if v is not None and v.shape != (encoder.dim,):  # a foreign/corrupt value: recompute it
            found[i] = None
        elif v is not None:
            vectors[i] = v
    miss = [i for i, v in enumerate(found) if v is None]
    if miss:
        miss_texts = [unique[i] for i in miss]
        computed = await asyncio.to_thread(encoder.encode_normalised, miss_texts)
        if cache is not None:
            await cache.put_many(encoder.model_key, miss_texts, computed)
            computed = cache.round_trip(computed)
        vectors[miss] = computed
    hit_unique = np.array([v is not None for v in found], dtype=bool)
    order = np.fromiter((slot[t] for t in normalised), dtype=np.intp, count=len(normalised))
    return vectors[order], hit_unique[order]
