"""Pipeline throughput against the raw embedding model, measured side by side in one run.

    .venv/bin/python bench/pipeline.py [--texts 3000] [--model bundled:all-MiniLM-L6-v2]

1. Start the embedded broker and cache, and the generator, embedder and clusterer services in one
   process, exactly as `autointerv run` does (sim model pair, cold cache namespace).
2. Publish paired generation requests for N texts at once and time until the clusterer has
   ingested every one of them (generation -> Kafka -> embedding with the Redis cache -> Kafka ->
   online clustering).
3. Encode the very same texts with plain ``SentenceTransformer.encode`` (same model, batch size
   and thread count) and time it.

On CPU the embedding model is the bottleneck and everything else is overhead, so the ratio of
the two rates says how much the streaming system costs.  Last line: ``pipeline_vs_raw_encode=<r>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.bus import Producer, Topics, ensure_topics, make_consumer
from services.core.config import Config, load_config
from services.core.events import DecodedText, GenerationRequest, stable_id
from services.core.infra import infrastructure
from services.core.logs import setup_logging
from services.core.metrics import Metrics
from services.core.runtime import ServiceContext
from services.generator.backends.sim import sim_prompts


def build_config(args: argparse.Namespace, token: str, data_dir: Path) -> Config:
    return load_config(None, environ={}, overrides={
        "experiment": {"id": f"bench-{token}", "data_dir": str(data_dir)},
        "bus": {"topic_prefix": f"bench-{token}", "partitions": 4},
        "cache": {"namespace": f"bench-{token}"},
        "observability": {"metrics_port": None, "progress": False},
        "embedder": {"model": args.model, "batch_size": args.batch_size},
        "clusterer": {"warmup": 400, "k_initial": 20, "k_max": 60},
    })


def requests_for(cfg: Config, n_texts: int) -> list[GenerationRequest]:
    prompts = sim_prompts(cfg.prompts)
    per_role = n_texts // 2
    n_per_prompt = max(1, per_role // len(prompts))
    chosen = prompts[: max(1, per_role // n_per_prompt)]
    out = []
    for i in range(0, len(chosen), 16):
        for role in ("base", "intervention"):
            out.append(GenerationRequest(experiment_id=cfg.experiment_id, role=role, prompts=chosen[i:i + 16],
                                         n_per_prompt=n_per_prompt, pair_id=stable_id("bench", i),
                                         request_id=stable_id("bench", i, role)))
    return out


async def run_pipeline(cfg: Config, bootstrap: str, redis_url: str, n_texts: int) -> tuple[float, list[str]]:
    from services.clusterer import ClustererService
    from services.embedder import EmbedderService
    from services.generator import GeneratorService

    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(bootstrap, topics.all(), cfg.bus.partitions, 1)
    metrics = Metrics()
    ctx = ServiceContext(cfg, bootstrap, redis_url, metrics, topics)
    services = [GeneratorService(ctx), EmbedderService(ctx), ClustererService(ctx)]
    tasks = [asyncio.create_task(s.run()) for s in services]
    embedder = services[1]
    while not hasattr(embedder, "encoder") or not embedder._consumer or not embedder._consumer.assignment():
        await asyncio.sleep(0.1)  # model loaded and partitions assigned: the clock starts now
    reqs = requests_for(cfg, n_texts)
    expected = sum(len(r.prompts) * r.n_per_prompt for r in reqs)
    prod = Producer(cfg.bus, bootstrap, topics, "bench")
    await prod.start()
    t0 = time.perf_counter()
    for r in reqs:
        await prod.send(r)
    await prod.flush()
    clusterer = services[2]
    while int(clusterer.state.role_totals.sum()) < expected:  # cheap: collecting the registry is not
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - t0
    await prod.stop()
    for s in services:
        s.stop()
    await asyncio.gather(*tasks)
    texts = await read_texts(cfg, bootstrap, topics, expected)
    return expected / elapsed, texts


async def read_texts(cfg: Config, bootstrap: str, topics: Topics, n: int) -> list[str]:
    cons = make_consumer(cfg.bus, bootstrap, [topics.name(DecodedText.topic)], f"reader-{uuid.uuid4().hex}", "r")
    await cons.start()
    out: list[str] = []
    try:
        while len(out) < n:
            got = await cons.getmany(timeout_ms=500)
            out += [DecodedText.from_bytes(r.value).text for recs in got.values() for r in recs]
    finally:
        await cons.stop()
    return out


class RawEncoder:
    """Plain sentence-transformers, loaded once, as a user would call it."""

    def __init__(self, cfg: Config) -> None:
        from sentence_transformers import SentenceTransformer

        from services.embedder.encoder import resolve_model

        path, _ = resolve_model(cfg.embedder.model)
        self.batch_size = cfg.embedder.batch_size
        self.model = SentenceTransformer(str(path), device=cfg.embedder.device)
        self.model.encode(["warm-up"] * 64, batch_size=self.batch_size)

    def rate(self, texts: list[str]) -> float:
        t0 = time.perf_counter()
        self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False)
        return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--model", default="bundled:all-MiniLM-L6-v2")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    setup_logging("WARNING")
    token = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(args, token, Path(tmp))
        raw = RawEncoder(cfg)
        with infrastructure(os.environ.get("KAFKA_BOOTSTRAP"), os.environ.get("REDIS_URL"), Path(tmp)) as ep:
            pipe_rate, texts = asyncio.run(run_pipeline(cfg, ep.bootstrap, ep.redis_url, args.texts))
        # timed on exactly the pipeline's texts, from the main thread and from a worker thread (where the
        # service calls it; torch's thread pool behaves differently under load); the faster one counts
        from concurrent.futures import ThreadPoolExecutor

        raw_1 = raw.rate(texts)
        with ThreadPoolExecutor(1) as pool:
            raw_2 = pool.submit(raw.rate, texts).result()
    raw_rate = max(raw_1, raw_2)
    print(f"texts: {len(texts)}  model: {cfg.embedder.model}  batch: {cfg.embedder.batch_size}  "
          f"cpu cores: {os.cpu_count()}")
    print(f"pipeline (generate -> kafka -> embed+cache -> kafka -> cluster): {pipe_rate:8.1f} texts/s")
    print(f"raw SentenceTransformer.encode on the same texts:              {raw_rate:8.1f} texts/s "
          f"(the faster of main thread {raw_1:.1f}, worker thread {raw_2:.1f})")
    print(f"pipeline_vs_raw_encode={pipe_rate / raw_rate:.3f}")


if __name__ == "__main__":
    main()
