"""Embedder service: decoded texts in, embedded texts out, through a Redis vector cache.

Per polled batch: each text is normalised once (enormous ones truncated by rule), and those that
cannot be embedded (not a string, empty) are dead-lettered with the reason; the normalised texts
are deduplicated within the batch, looked up in the cache with one pipelined round trip, and only
the misses are encoded, in a worker thread so the event loop keeps fetching (aiokafka prefetches
the next batch meanwhile) and producing.  Replicas share a consumer group; a text cached by one
replica is a hit for every other.  If Redis is unreachable the cache degrades to pass-through and
reconnects with backoff; no event is dropped.
"""

from __future__ import annotations

from typing import ClassVar

from redis.asyncio import Redis

from services.core.config import Config
from services.core.events import DecodedText, EmbeddedText
from services.core.runtime import Incoming, Service, ServiceContext
from services.embedder.cache import EmbeddingCache, connect, embed_normalised
from services.embedder.encoder import NotEmbeddable, embeddable_text


def make_cache(cfg: Config, redis) -> EmbeddingCache | None:
    if not cfg.cache.enabled:
        return None
    return EmbeddingCache(redis, cfg.cache)


class EmbedderService(Service):
    name: ClassVar[str] = "embedder"
    consumes = (DecodedText,)
    produces = (EmbeddedText,)

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.redis: Redis | None = None

    async def setup(self) -> None:
        self.encoder = await self.ctx.resources.encoder(self.cfg.embedder)
        self.redis = connect(self.ctx.redis_url)  # fail fast: a dead Redis degrades the cache, never stalls
        self.cache = make_cache(self.cfg, self.redis)
        m = self.metrics
        self.m_hits = m.counter("embedder_cache_hits_total", "Vectors served without encoding (cache hits "
                                "and repeats within a batch)", ["service"])
        self.m_misses = m.counter("embedder_cache_misses_total", "Vectors computed by the model", ["service"])
        self.m_texts = m.counter("embedder_texts_total", "Texts embedded (hits + misses)", ["service"])
        self.m_degraded = m.gauge("embedder_cache_degraded", "1 while Redis is unreachable", ["service"])
        self.m_bytes = m.counter("embedder_cache_bytes_total", "Bytes read/written", ["service", "direction"])
        self.dtype = self.cfg.cache.vector_dtype
        self._bytes_seen = (0, 0)

    async def handle(self, batch: list[Incoming]) -> None:
        good: list[DecodedText] = []
        clean: list[str] = []  # good's texts, normalised: the one pass the whole batch gets
        for item in batch:
            ev = item.event
            assert isinstance(ev, DecodedText)
            try:
                clean.append(embeddable_text(ev.text, self.encoder.max_chars))
            except NotEmbeddable as exc:
                await self.dead_letter(item.record, f"text not embeddable: {exc}")
                continue
            good.append(ev)
        if not good:
            return
        vectors, hits = await embed_normalised(self.cache, self.encoder, clean)
        for ev, vec, hit in zip(good, vectors, hits, strict=True):
            await self.emit(EmbeddedText(
                experiment_id=ev.experiment_id, text_id=ev.text_id, request_id=ev.request_id,
                pair_id=ev.pair_id, role=ev.role, prompt_id=ev.prompt_id, text=ev.text, reason=ev.reason,
                round=ev.round, embedding_model=self.encoder.model_key, dim=int(vec.shape[0]), dtype=self.dtype,
                vector_b64=EmbeddedText.encode_vector(vec, self.dtype), cache_hit=bool(hit), meta=ev.meta,
            ))
        # misses = vectors the model computed: identical texts in one batch are encoded once
        n_computed = len({text for text, hit in zip(clean, hits, strict=True) if not hit})
        self.m_hits.labels(self.name).inc(len(good) - n_computed)
        self.m_misses.labels(self.name).inc(n_computed)
        self.m_texts.labels(self.name).inc(len(good))
        if self.cache is not None:
            self.m_degraded.labels(self.name).set(1 if self.cache.degraded else 0)
            read, written = self.cache.bytes_read, self.cache.bytes_written
            self.m_bytes.labels(self.name, "read").inc(read - self._bytes_seen[0])
            self.m_bytes.labels(self.name, "written").inc(written - self._bytes_seen[1])
            self._bytes_seen = (read, written)

    async def teardown(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
