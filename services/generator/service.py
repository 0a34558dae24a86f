"""Generator service: generation requests in, decoded texts out.

Replicas in one consumer group share requests (one per GPU via CUDA_VISIBLE_DEVICES).  A replica
serves the roles in ``generator.roles``; replicas serving different roles use different groups, so
each request reaches exactly one replica that can serve it.  Text ids are derived from
(request, role, prompt, sample), so a re-delivered request yields the same ids and downstream
consumers dedupe it.  Every text is recorded in the experiment's text store
(services/core/text_store.py) before it is emitted, so validators can check held-out texts against
what a model really wrote.  Backpressure: while the embedder group's lag on ``texts`` exceeds
``generator.max_embedder_lag`` the consumer pauses its partitions, and resumes below half of it.
"""

from __future__ import annotations

import time
from typing import ClassVar

from services.core.events import (
    DecodedText,
    GenerationFailure,
    GenerationReport,
    GenerationRequest,
    TextRef,
    stable_id,
)
from services.core.runtime import Incoming, Service, ServiceContext, generator_group_suffix, group_name
from services.core.text_store import TextStore
from services.generator.backends import make_backend
from services.generator.backends.base import DecodingParams, GenerationBackend, GenerationTask


class GeneratorService(Service):
    name: ClassVar[str] = "generator"
    consumes = (GenerationRequest,)
    produces = (DecodedText, GenerationReport)

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.backends: dict[str, GenerationBackend] = {}
        self.redis = None

    async def setup(self) -> None:
        self.redis = self.ctx.redis()
        self.store = TextStore(self.redis, self.cfg, self.ctx.experiment_id)
        self.roles = sorted(set(self.cfg.generator.roles))
        self.backends = {
            role: make_backend(getattr(self.cfg.models, role), self.cfg.generator, role) for role in self.roles
        }
        m = self.metrics
        self.m_texts = m.counter("generator_texts_total", "Texts decoded", ["backend", "role"])
        self.m_tokens = m.counter("generator_tokens_total", "Tokens decoded", ["backend", "role"])
        self.m_failures = m.counter("generator_failures_total", "Prompts that failed for good", ["backend", "role"])
        self.m_seconds = m.histogram("generator_batch_seconds", "Backend time per request", ["backend", "role"])
        self.m_fill = m.histogram("generator_batch_fill", "Prompts x samples per backend call",
                                  ["backend", "role"], buckets=(1, 4, 8, 16, 32, 64, 128, 256, 512))
        self.m_paused = m.gauge("generator_paused", "1 while paused by backpressure", ["service"])
        self.m_embed_lag = m.gauge("generator_observed_embedder_lag", "Embedder lag seen by backpressure",
                                   ["service"])
        self.paused = False
        self._last_lag_check = float("-inf")

    def group_id(self) -> str:
        return super().group_id() + generator_group_suffix(self.cfg.generator.roles)

    async def handle(self, batch: list[Incoming]) -> None:
        for item in batch:
            req = item.event
            assert isinstance(req, GenerationRequest)
            if req.role in self.backends:
                await self._serve(req)

    def _tasks(self, req: GenerationRequest) -> list[GenerationTask]:
        g = self.cfg.generator
        d = req.decoding
        params = DecodingParams(
            temperature=g.temperature if d.temperature is None else d.temperature,
            top_p=g.top_p if d.top_p is None else d.top_p,
            top_k=g.top_k if d.top_k is None else d.top_k,
            max_new_tokens=g.max_new_tokens if d.max_new_tokens is None else d.max_new_tokens,
            no_repeat_ngram_size=g.no_repeat_ngram_size,
            seed=g.seed if d.seed is None else d.seed,
        )
        seed = d.seed if d.seed is not None else int(stable_id(req.request_id)[:8], 16)  # see paired_requests
        tasks = [GenerationTask(p.prompt_id, p.text, req.n_per_prompt, params, seed) for p in req.prompts]
        for ex in req.exemplars:  # continue from the exemplar's first words
            prefix = " ".join(ex.text.split()[: ex.prefix_tokens])
            tasks.append(GenerationTask(ex.prompt_id, prefix, req.n_per_prompt, params, seed,
                                        meta={"exemplar_text_id": ex.text_id}))
        return tasks

    async def _serve(self, req: GenerationRequest) -> None:
        """Serve every task of one request, then report what it produced (the controller's round
        gate counts these reports).  Failures are logged once per request, aggregated."""
        backend = self.backends[req.role]
        t0 = time.perf_counter()
        produced = 0
        failures: list[GenerationFailure] = []
        for tasks in _unique_prompt_batches(self._tasks(req)):
            n, failed = await self._serve_tasks(req, backend, tasks)
            produced += n
            failures += failed
        if failures:
            exhausted = sum(f.exhausted for f in failures)
            log = self.log.warning if exhausted == len(failures) else self.log.error
            log("prompts not served", extra={
                "request_id": req.request_id, "role": req.role, "failed": len(failures), "exhausted": exhausted,
                "first": failures[0].reason[:300]})
        await self.emit(GenerationReport(
            experiment_id=req.experiment_id, request_id=req.request_id, pair_id=req.pair_id, role=req.role,
            round=req.round, texts=produced, failures=failures, backend=backend.name,
            seconds=time.perf_counter() - t0))

    async def _serve_tasks(self, req: GenerationRequest, backend: GenerationBackend,
                           tasks: list[GenerationTask]) -> tuple[int, list[GenerationFailure]]:
        labels = (backend.name, req.role)
        t0 = time.perf_counter()
        result = await backend.generate(tasks)
        self.m_seconds.labels(*labels).observe(time.perf_counter() - t0)
        self.m_fill.labels(*labels).observe(sum(t.n for t in tasks))
        by_prompt = {t.prompt_id: t for t in tasks}
        events = []
        for g in result.texts:
            task = by_prompt[g.prompt_id]
            meta = {**task.meta, **g.meta}
            origin = meta.get("exemplar_text_id", "")
            events.append(DecodedText(
                experiment_id=req.experiment_id,
                text_id=stable_id(req.request_id, req.role, g.prompt_id, origin, g.sample_index),
                request_id=req.request_id, role=req.role,
                pair_id=stable_id(req.pair_id, g.prompt_id, origin, g.sample_index) if req.pair_id else "",
                model_id=backend.model_id, prompt_id=g.prompt_id, prompt=task.prompt, text=g.text,
                sample_index=g.sample_index, n_tokens=g.n_tokens, reason=req.reason, round=req.round,
                backend=backend.name, meta=meta,
            ))
            self.m_tokens.labels(*labels).inc(g.n_tokens)
        # recorded before emitted: a text on the bus is always in the store (a Redis error rewinds
        # the request like any stateful write; re-serving it rewrites the same ids)
        await self.store.record(TextRef(text_id=e.text_id, prompt_id=e.prompt_id, role=e.role, text=e.text,
                                        pair_id=e.pair_id) for e in events)
        for e in events:
            await self.emit(e)
        self.m_texts.labels(*labels).inc(len(result.texts))
        self.m_failures.labels(*labels).inc(len(result.failures))
        return len(result.texts), [GenerationFailure(prompt_id=f.prompt_id or "", reason=str(f), exhausted=f.exhausted)
                                   for f in result.failures]

    async def tick(self) -> None:
        await self._backpressure()

    async def _backpressure(self) -> None:
        now = self.clock.monotonic()
        if not self.consuming or now - self._last_lag_check < self.cfg.generator.lag_check_s:
            return
        self._last_lag_check = now
        group = group_name(self.ctx.topics.prefix, self.ctx.experiment_id, "embedder")
        try:
            lags = await self.bus.group_lag(group, [self.ctx.topics.name(DecodedText.topic)])
        except Exception as exc:
            self.log.debug("lag query failed", extra={"error": str(exc)})
            return
        lag = sum(p.lag for p in lags)
        self.m_embed_lag.labels(self.name).set(lag)
        limit = self.cfg.generator.max_embedder_lag
        if not self.paused and lag > limit:
            self.pause_input()
            self.paused = True
            self.log.info("paused: embedder lag above limit", extra={"lag": lag, "limit": limit})
        elif self.paused and lag <= limit // 2:
            self.resume_input()
            self.paused = False
            self.log.info("resumed: embedder lag below half the limit", extra={"lag": lag})
        self.health.paused = self.paused
        self.m_paused.labels(self.name).set(1 if self.paused else 0)

    async def teardown(self) -> None:
        for b in self.backends.values():
            await b.aclose()
        if self.redis is not None:
            await self.redis.aclose()


def _unique_prompt_batches(tasks: list[GenerationTask]) -> list[list[GenerationTask]]:
    """Split tasks so no backend call sees one prompt id twice (results are keyed by prompt id)."""
    batches: list[list[GenerationTask]] = []
    for task in tasks:
        for batch in batches:
            if all(t.prompt_id != task.prompt_id for t in batch):
                batch.append(task)
                break
        else:
            batches.append([task])
    return batches
