"""Pipeline throughput against the raw embedding model, measured side by side in one run.

    .venv/bin/python bench/pipeline.py [--texts 3000] [--model bundled:all-MiniLM-L6-v2]

1. Start the embedded broker and cache, and the generator, embedder and clusterer services in one
   process, exactly as `autointerv run` does (sim model pair, cold cache namespace).
2. Publish paired generation requests for N texts at once and time until the clusterer has
   ingested every one of them (generation -> Kafka -> embedding with the Redis cache -> Kafka ->
   online clustering).
3. Encode the very same texts with plain ``SentenceTransformer.encode`` (same model, batch size
   and thread count) and time it, in the main thread and in a worker thread; the faster counts.
4. Repeat (``--repeats``), alternating: each pipeline run is compared with the mean of the raw runs
   either side of it (the machine may be shared, and its load moves); the median ratio is printed,
   with the load average before and after each run.  ``--profile FILE`` cProfiles the last
   pipeline run's event-loop thread.

On CPU the embedding model is the bottleneck and everything else is overhead, so the ratio of
the two rates says how much the streaming system costs.  Last line: ``pipeline_vs_raw_encode=<r>``.
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
from collections.abc import Callable
from dataclasses import dataclass
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
    busy = EncodeTimer(embedder.encoder)  # diagnostics only: the service's own encoder, timed
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
    busy.restore()
    await prod.stop()
    for s in services:
        s.stop()
    await asyncio.gather(*tasks)
    texts = await read_texts(cfg, bootstrap, topics, expected)
    return PipelineRun(expected / elapsed, texts, elapsed, busy.seconds, busy.texts)


@dataclass
class PipelineRun:
    rate: float
    texts: list[str]
    elapsed: float
    encode_s: float  # seconds inside the encoder's encode calls (worker thread)
    encoded: int  # texts those calls encoded


class EncodeTimer:
    """Times the embedder's encode calls (where the pipeline's CPU should go) to split the gap to
    raw encode into "the encoder idles" (busy share < 1) and "encoding is slower inside the
    pipeline" (CPU contention: in-pipeline encode rate < raw rate)."""

    def __init__(self, encoder: object) -> None:
        self.encoder = encoder
        self.inner = encoder.encode_normalised  # type: ignore[attr-defined]
        self.seconds = 0.0
        self.texts = 0
        encoder.encode_normalised = self._timed  # type: ignore[attr-defined]

    def _timed(self, texts: list[str]) -> object:
        t = time.perf_counter()
        try:
            return self.inner(texts)
        finally:
            self.seconds += time.perf_counter() - t
            self.texts += len(texts)

    def restore(self) -> None:
        self.encoder.encode_normalised = self.inner  # type: ignore[attr-defined]


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

    def best_rate(self, texts: list[str]) -> tuple[float, float, float]:
        """(the faster, main thread, worker thread): torch's thread pool behaves differently under
        load from a worker thread, where the service calls it; the faster one counts."""
        from concurrent.futures import ThreadPoolExecutor

        main = self.rate(texts)
        with ThreadPoolExecutor(1) as pool:
            worker = pool.submit(self.rate, texts).result()
        return max(main, worker), main, worker


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def profiled(fn: Callable[[], PipelineRun], path: str | None) -> PipelineRun:
    """Run ``fn`` under cProfile when ``path`` is given (the event loop's thread: JSON, pydantic, the
    clusterer, the Kafka client; the encoder's worker thread is not in it) and print the top."""
    if not path:
        return fn()
    import cProfile
    import pstats

    prof = cProfile.Profile()
    out = prof.runcall(fn)
    prof.dump_stats(path)
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    print(f"event-loop thread: {total:.1f} s of CPU in Python-visible calls over {out.elapsed:.1f} s "
          f"(profile in {path}); top by own time:")
    stats.sort_stats("tottime").print_stats(18)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=3000)
    ap.add_argument("--model", default="bundled:all-MiniLM-L6-v2")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3,
                    help="pipeline and raw runs, alternated: on a shared machine the load moves between them")
    ap.add_argument("--profile", default=None, help="cProfile the last pipeline run's event loop to this file")
    args = ap.parse_args()
    setup_logging("WARNING")
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = RawEncoder(build_config(args, "raw", Path(tmp)))
        with infrastructure(os.environ.get("KAFKA_BOOTSTRAP"), os.environ.get("REDIS_URL"), Path(tmp)) as ep:
            prev: float | None = None
            for i in range(args.repeats):
                cfg = build_config(args, uuid.uuid4().hex[:8], Path(tmp))  # cold cache namespace, fresh topics
                before = load()
                last = i == args.repeats - 1
                pipe = profiled(lambda cfg=cfg: asyncio.run(run_pipeline(cfg, ep.bootstrap, ep.redis_url, args.texts)),
                                args.profile if last else None)
                raw_rate, raw_1, raw_2 = raw.best_rate(pipe.texts)
                ref = raw_rate if prev is None else (prev + raw_rate) / 2  # raw runs either side of it
                prev = raw_rate
                ratios.append(pipe.rate / ref)
                print(f"run {i + 1}: {len(pipe.texts)} texts; pipeline {pipe.rate:6.1f} texts/s; raw encode "
                      f"{raw_rate:6.1f} texts/s (main thread {raw_1:.1f}, worker {raw_2:.1f}); ratio {ratios[-1]:.3f}; "
                      f"encoder busy {pipe.encode_s / pipe.elapsed:.0%} of the run, encoding "
                      f"{pipe.encoded / max(pipe.encode_s, 1e-9):.1f} texts/s inside the pipeline; "
                      f"{before} -> {load()}", flush=True)
    print(f"model: {args.model}  batch: {args.batch_size}  cpu cores: {os.cpu_count()}  "
          f"ratios: {', '.join(f'{r:.3f}' for r in ratios)}")
    print(f"pipeline_vs_raw_encode={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
