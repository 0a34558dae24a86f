"""Running a service in a test without its consume loop: a context whose Kafka is never reached
(real Redis), a validator that collects what it would produce, and setup/teardown around a block;
texts recorded in the text store the way the generator records them, with ids on a chosen side of
the clusterer's label/held-out split."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import redis.asyncio as aioredis

from services.clusterer.arrivals import is_label_split
from services.core.bus import Topics, make_consumer
from services.core.config import Config
from services.core.events import Event, TextRef, stable_id
from services.core.metrics import Metrics
from services.core.runtime import Service, ServiceContext
from services.core.text_store import TextStore
from services.validator.service import ValidatorService

S = TypeVar("S", bound=Service)


def offline_context(cfg: Config, redis_url: str) -> ServiceContext:
    """A service context with a real Redis and a broker address that is never connected to."""
    return ServiceContext(cfg, "127.0.0.1:1", redis_url, Metrics(), Topics("t"))


class CapturingValidator(ValidatorService):
    """The validator service with ``emit`` collecting events instead of producing to Kafka."""

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx, 0)
        self.out: list[Event] = []

    async def emit(self, event: Event, topic: str | None = None) -> None:
        self.out.append(event)


@asynccontextmanager
async def running(svc: S) -> AsyncIterator[S]:
    """``setup()`` then the block; ``teardown()`` and the producer's stop even when setup fails."""
    try:
        await svc.setup()
        yield svc
    finally:
        await svc.teardown()
        await svc.producer.stop()


async def read_records(cfg: Config, bootstrap: str, logical: str, want: int, timeout_s: float = 30) -> list[Any]:
    """Up to ``want`` records of one logical topic from the start, read by a fresh consumer group
    (waits at most ``timeout_s``: the caller asserts on how many came)."""
    cons = make_consumer(cfg.bus, bootstrap, [Topics(cfg.bus.topic_prefix).name(logical)],
                         f"reader-{time.time_ns()}", "reader")
    await cons.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < want and time.monotonic() < deadline:
            got = await cons.getmany(timeout_ms=300)
            out += [r for recs in got.values() for r in recs]
    finally:
        await cons.stop()
    return out


def split_id(*parts: object, label: bool = False, label_fraction: float = 0.3) -> str:
    """A stable id from ``parts`` on the label (or held-out) side of the clusterer's split."""
    for k in itertools.count():
        tid = stable_id(*parts, k)
        if is_label_split(tid, label_fraction) == label:
            return tid
    raise AssertionError("unreachable")


async def store_texts(cfg: Config, redis_url: str, refs: Iterable[TextRef]) -> None:
    """Record texts in ``cfg``'s experiment's text store, as the generator does for what it generates."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        await TextStore(client, cfg, cfg.experiment_id).record(refs)
    finally:
        await client.aclose()
