"""Running a service in a test without its consume loop: a context whose Kafka is never reached
(real Redis), a validator that collects what it would produce, and setup/teardown around a block."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

from services.core.bus import Topics
from services.core.config import Config
from services.core.events import Event
from services.core.metrics import Metrics
from services.core.runtime import Service, ServiceContext
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
