"""The embedding stage on its own: raw model vs service, cold vs warm cache, cache reads, backends.

    .venv/bin/python bench/embedding.py [--texts 3000] [--model bundled:all-MiniLM-L6-v2] [--no-onnx]

All on the same N distinct short sim texts, in one run (embedded Tansu broker and Valkey unless
KAFKA_BOOTSTRAP / REDIS_URL are set):

1. raw ``SentenceTransformer.encode`` texts/s, timed before and after everything else (this shared
   2-core machine drifts; the mean is used) against the embedder service through the broker:
   DecodedText produced to ``texts``, timed until every EmbeddedText is on ``embeddings``
   (target: service / raw >= 0.9).  Raw encode is timed both as a user calls it (main thread) and
   as the service calls it (``asyncio.to_thread``): on this shared 2-core machine the two differed
   by up to 3x while other jobs loaded it (worker thread faster: 79 vs 24 texts/s at load 7.7) and
   by ~10% when it was quiet, so a service/raw ratio above 1 says "noise", not "faster than the model";
2. the same stage again with a fresh experiment (new topics, new consumer group) but the same
   cache namespace: warm vs cold wall time (target >= 20x);
3. ``EmbeddingCache.get_many`` on 10,000 keys in batches of 1,000 from the loopback Redis, with the
   TTL-refreshing Lua read (the default) and plain MGET (target >= 50,000 vectors/s);
4. each alternative encoder backend in services/embedder/encoder.py (``onnx``): texts/s against
   torch and mean cosine similarity to torch's vectors, or why it is unavailable.

Last line: ``warm_vs_cold=<ratio>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, TopicPartition

from services.core.bus import Producer, Topics, ensure_topics
from services.core.config import CacheConfig, Config, EmbedderConfig, load_config
from services.core.events import DecodedText, EmbeddedText
from services.core.infra import infrastructure
from services.core.logs import setup_logging
from services.core.metrics import Metrics
from services.core.runtime import ServiceContext
from services.embedder.cache import EmbeddingCache, connect
from services.generator.backends.base import DecodingParams, GenerationTask
from services.generator.backends.sim import SimBackend, sim_prompts

PARTITIONS = 4
CACHE_KEYS = 10_000
CACHE_BATCH = 1_000


def sim_texts(n: int) -> list[str]:
    """``n`` distinct sim texts (both roles, all prompts, as many samples as it takes)."""
    cfg = load_config(None, environ={})
    prompts = sim_prompts(cfg.prompts)
    out: dict[str, None] = {}
    samples = max(1, n // (2 * len(prompts)) + 1)
    for seed in range(100):
        for role in ("base", "intervention"):
            backend = SimBackend(getattr(cfg.models, role), cfg.generator, role)
            tasks = [GenerationTask(p.prompt_id, p.text, samples, DecodingParams(), seed) for p in prompts]
            for g in asyncio.run(backend.generate(tasks)).texts:
                out[g.text] = None
        if len(out) >= n:
            return list(out)[:n]
    raise RuntimeError(f"the sim gave only {len(out)} distinct texts")


class RawEncoder:
    """Plain sentence-transformers as a user would call it (same model, batch size, threads)."""

    def __init__(self, model: str, batch_size: int) -> None:
        from sentence_transformers import SentenceTransformer

        from services.embedder.encoder import resolve_model

        path, _ = resolve_model(model)
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(path), device="cpu")
        self.model.encode(["warm-up"] * 64, batch_size=batch_size)

    def timed_in_thread(self, texts: list[str]) -> float:
        """The same call from a worker thread, as the embedder service makes it."""
        return asyncio.run(asyncio.to_thread(self.timed, texts))[0]

    def timed(self, texts: list[str]) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        vecs = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 show_progress_bar=False, convert_to_numpy=True)
        return len(texts) / (time.perf_counter() - t0), np.asarray(vecs, dtype=np.float32)


def stage_config(args: argparse.Namespace, run: str, namespace: str) -> Config:
    return load_config(None, environ={}, overrides={
        "experiment": {"id": f"bench-emb-{run}"},
        "bus": {"topic_prefix": f"bench-emb-{run}", "partitions": PARTITIONS},
        "cache": {"namespace": namespace},
        "observability": {"metrics_port": None, "progress": False},
        "embedder": {"model": args.model, "batch_size": args.batch_size},
    })


@dataclass
class StageResult:
    seconds: float
    hits: int

    def rate(self, n: int) -> float:
        return n / self.seconds


async def run_stage(cfg: Config, bootstrap: str, redis_url: str, texts: list[str]) -> StageResult:
    """The embedder service alone: time from the first DecodedText sent to the last EmbeddedText read."""
    from services.embedder import EmbedderService

    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(bootstrap, topics.all(), PARTITIONS, 1)
    svc = EmbedderService(ServiceContext(cfg, bootstrap, redis_url, Metrics(), topics))
    task = asyncio.create_task(svc.run())
    while svc._consumer is None or not svc._consumer.assignment():  # model loaded, partitions assigned
        if task.done():
            await task
        await asyncio.sleep(0.05)
    events = [DecodedText(experiment_id=cfg.experiment_id, text_id=f"t{i}", request_id="bench", role="base",
                          model_id="sim-base", prompt_id="p", text=t) for i, t in enumerate(texts)]
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                              auto_offset_reset="earliest", fetch_max_wait_ms=cfg.bus.fetch_max_wait_ms)
    await reader.start()
    reader.assign([TopicPartition(topics.name(EmbeddedText.topic), p) for p in range(PARTITIONS)])
    prod = Producer(cfg.bus, bootstrap, topics, "bench")
    await prod.start()
    try:
        t0 = time.perf_counter()
        for e in events:
            await prod.send(e)
        await prod.flush()
        seen = 0
        while seen < len(events):  # counted, not decoded: the reader should cost little
            got = await reader.getmany(timeout_ms=100)
            seen += sum(len(r) for r in got.values())
        elapsed = time.perf_counter() - t0
    finally:
        await prod.stop()
        await reader.stop()
        svc.stop()
        await task
    return StageResult(elapsed, int(svc.metrics.value("embedder_cache_hits_total", service="embedder")))


async def cache_read_rates(redis_url: str, namespace: str, dim: int, repeats: int = 3) -> dict[str, float]:
    """Vectors/s of get_many over CACHE_KEYS keys in CACHE_BATCH batches (median of ``repeats``)."""
    model_key = "bench-cache-read"
    texts = [f"cache read benchmark text number {i}" for i in range(CACHE_KEYS)]
    rng = np.random.default_rng(0)
    rates: dict[str, float] = {}
    for label, refresh in (("lua_getex (TTL refresh, default)", True), ("mget (no refresh)", False)):
        cache = EmbeddingCache.from_url(redis_url, CacheConfig(namespace=namespace), refresh_ttl=refresh)
        try:
            if not rates:
                for i in range(0, CACHE_KEYS, CACHE_BATCH):
                    vecs = rng.standard_normal((CACHE_BATCH, dim)).astype(np.float32)
                    await cache.put_many(model_key, texts[i:i + CACHE_BATCH], vecs)
            timings = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                found = 0
                for i in range(0, CACHE_KEYS, CACHE_BATCH):
                    got = await cache.get_many(model_key, texts[i:i + CACHE_BATCH])
                    found += sum(v is not None for v in got)
                timings.append(time.perf_counter() - t0)
                if found != CACHE_KEYS:
                    raise RuntimeError(f"cache read found {found} of {CACHE_KEYS} vectors")
            rates[label] = CACHE_KEYS / statistics.median(timings)
        finally:
            await cache.aclose()
    return rates


def alternative_backends(args: argparse.Namespace, texts: list[str], torch_vecs: np.ndarray,
                         torch_rate: float) -> list[str]:
    """One line per alternative backend: speed against torch and agreement with its vectors."""
    from typing import get_args

    from services.embedder.encoder import SentenceTransformerEncoder

    known = get_args(EmbedderConfig.model_fields["backend"].annotation)
    backends = [b for b in known if b not in ("torch", "hashing")]  # hashing is not a model backend
    lines = []
    for backend in backends:
        if args.no_onnx and backend == "onnx":
            lines.append(f"{backend}: skipped (--no-onnx)")
            continue
        try:
            enc = SentenceTransformerEncoder(EmbedderConfig(model=args.model, backend=backend,
                                                            batch_size=args.batch_size))
        except (RuntimeError, ImportError, ValueError) as exc:
            lines.append(f"{backend}: NOT AVAILABLE here ({exc})")
            continue
        enc.encode(["warm-up"] * 64)
        t0 = time.perf_counter()
        vecs = enc.encode(texts)
        rate = len(texts) / (time.perf_counter() - t0)
        cos = np.sum(vecs * torch_vecs, axis=1)
        lines.append(f"{backend}: {rate:8.1f} texts/s = {rate / torch_rate:.2f}x torch; cosine to torch "
                     f"mean {cos.mean():.6f}, min {cos.min():.6f}")
    if not backends:
        lines.append("no alternative encoder backend exists in services/embedder/encoder.py")
    return lines


async def run_service_stages(args: argparse.Namespace, texts: list[str], bootstrap: str,
                             redis_url: str) -> tuple[StageResult, StageResult, dict[str, float]]:
    namespace = f"bench-emb-{uuid.uuid4().hex[:8]}"
    cold = await run_stage(stage_config(args, f"cold-{namespace}", namespace), bootstrap, redis_url, texts)
    warm = await run_stage(stage_config(args, f"warm-{namespace}", namespace), bootstrap, redis_url, texts)
    reads = await cache_read_rates(redis_url, namespace, dim=384)
    client = connect(redis_url)  # leave nothing behind on an external Redis
    try:
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.unlink(*keys[i:i + 1000])
    finally:
        await client.aclose()
    return cold, warm, reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--model", default="bundled:all-MiniLM-L6-v2")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-onnx", action="store_true", help="skip the onnx backend (its export takes a while)")
    args = ap.parse_args()
    setup_logging("WARNING")
    texts = sim_texts(args.texts)
    raw = RawEncoder(args.model, args.batch_size)
    raw_1, _ = raw.timed(texts)
    thread_1 = raw.timed_in_thread(texts)
    with tempfile.TemporaryDirectory() as tmp, \
            infrastructure(os.environ.get("KAFKA_BOOTSTRAP"), os.environ.get("REDIS_URL"), Path(tmp)) as ep:
        cold, warm, reads = asyncio.run(run_service_stages(args, texts, ep.bootstrap, ep.redis_url))
    thread_2 = raw.timed_in_thread(texts)
    raw_2, torch_vecs = raw.timed(texts)
    raw_rate, thread_rate = (raw_1 + raw_2) / 2, (thread_1 + thread_2) / 2
    alt = alternative_backends(args, texts, torch_vecs, raw_rate)
    n = len(texts)
    mean_chars = sum(map(len, texts)) / n
    print(f"texts: {n} distinct sim texts (mean {mean_chars:.0f} chars)  model: {args.model}  "
          f"batch: {args.batch_size}  cpu cores: {os.cpu_count()}  torch threads: {_torch_threads()}")
    print(f"raw SentenceTransformer.encode:     {raw_rate:8.1f} texts/s "
          f"(before {raw_1:.1f}, after {raw_2:.1f})")
    print(f"  the same from a worker thread:    {thread_rate:8.1f} texts/s "
          f"(before {thread_1:.1f}, after {thread_2:.1f})")
    print(f"embedder service via broker, cold:  {cold.rate(n):8.1f} texts/s ({cold.seconds:.2f} s, "
          f"{cold.hits} cache hits)")
    print(f"service_vs_raw={cold.rate(n) / raw_rate:.3f}  (target >= 0.9)  "
          f"service_vs_raw_in_thread={cold.rate(n) / thread_rate:.3f}")
    print(f"embedder service via broker, warm:  {warm.rate(n):8.1f} texts/s ({warm.seconds:.2f} s, "
          f"{warm.hits} cache hits)")
    parser = "hiredis" if _has_hiredis() else "pure-Python (hiredis not installed)"
    for label, rate in reads.items():
        print(f"cache get_many {CACHE_KEYS} keys / {CACHE_BATCH} per call, {label}: {rate:10.0f} vectors/s "
              f"(target >= 50000; RESP parser: {parser})")
    for line in alt:
        print(f"alternative backend {line}")
    print(f"warm_vs_cold={cold.seconds / warm.seconds:.1f}")


def _has_hiredis() -> bool:
    import importlib.util

    return importlib.util.find_spec("hiredis") is not None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
