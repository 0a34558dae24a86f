"""Faults of the infrastructure, told apart from bad records, and how long they are tolerated.

A record whose handler raises is the record's fault: it is dead-lettered.  A broker or Redis that
does not answer is nobody's record's fault: the runtime rewinds the batch and retries, logs the
outage when it starts and then at a bounded rate, and stops the service with
:class:`InfrastructureLost` (a message saying what and for how long) once it outlasts
``bus.broker_loss_s`` / ``cache.outage_s``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import redis.exceptions

from services.core.bus import BROKER_ERRORS
from services.core.clock import Clock


class InfrastructureError(RuntimeError):
    """A dependency (broker, cache, model server) is not answering: retry the batch later, never
    dead-letter its records.  Services may raise it for dependencies of their own."""


class InfrastructureLost(RuntimeError):
    """The infrastructure stayed unreachable past its outage limit; the service stops."""


class DeadLetterError(Exception):
    """Raise from ``handle`` to dead-letter one record with a reason, without failing the batch."""


REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                                                 redis.exceptions.BusyLoadingError)
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (*BROKER_ERRORS, *REDIS_ERRORS, InfrastructureError)
FAILURE_LOG_EVERY_S = 10.0  # an outage is logged when it starts and then at most this often


async def bounded(work: Any, timeout_s: float) -> bool:
    """Await ``work`` for at most ``timeout_s``; True when it finished.  Unlike ``wait_for`` it does
    not wait for a cancelled client call to unwind: aiokafka's ``stop()`` retries the dead
    broker while cancelled, and shutdown must stay bounded (``bus.shutdown_timeout_s``)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception not retrieved"
        return False
    if task.cancelled():  # the client cancelled its own work (aiokafka does, on a dead broker)
        return False
    exc = task.exception()
    if exc is not None:
        raise exc
    return True


@dataclass
class Outage:
    """An infrastructure failure in progress: when it started and when it was last logged.  Only a
    success of the same piece of work (``source``) ends it: an idle poll that touched nothing
    proves nothing about a broker that stopped answering the lag probe."""

    kind: str  # "broker" or "cache"
    source: str  # "poll", "tick" or "probe"
    since: float
    failures: int = 0
    last_logged: float = float("-inf")


class OutageTracker:
    """One service's view of its infrastructure: the outage in progress, if any, and the verdict."""

    def __init__(self, who: str, limits: dict[str, float], where: dict[str, str], clock: Clock,
                 log: logging.Logger, on_failure: Any) -> None:
        self.who = who
        self.limits = limits  # kind -> seconds tolerated
        self.where = where  # kind -> what is unreachable, in words
        self.clock = clock
        self.log = log
        self.on_failure = on_failure  # kind -> None (metrics)
        self.current: Outage | None = None
        self.lost: str | None = None  # the verdict, once an outage outlasted its limit

    @property
    def failures(self) -> int:
        return self.current.failures if self.current is not None else 0

    def backoff_s(self) -> float:
        return min(5.0, 0.2 * 2 ** min(self.failures, 5))

    def failed(self, exc: BaseException, source: str, started: float | None = None) -> None:
        """Count one failure of work begun at ``started`` (default: now); raise InfrastructureLost
        once the outage, counted from the first failing attempt's start, outlasts its limit."""
        kind = "cache" if isinstance(exc, REDIS_ERRORS) else "broker"
        now = self.clock.monotonic()
        if self.current is None or self.current.kind != kind:
            self.current = Outage(kind, source, now if started is None else started)
        out = self.current
        out.failures += 1
        self.on_failure(kind)
        limit = self.limits[kind]
        if now - out.since >= limit:
            self.lost = (f"{self.who}: {self.where[kind]} unreachable for {now - out.since:.0f}s "
                         f"({out.failures} failures, last: {type(exc).__name__}: {str(exc)[:200]}); stopping. "
                         "Committed work is safe; uncommitted input will be re-delivered on restart.")
            self.log.error("infrastructure lost", extra={"kind": kind, "detail": self.lost})
            raise InfrastructureLost(self.lost) from exc
        if now - out.last_logged >= FAILURE_LOG_EVERY_S:
            out.last_logged = now
            self.log.warning("infrastructure not answering; retrying", extra={
                "kind": kind, "for_s": round(now - out.since, 1), "failures": out.failures,
                "limit_s": limit, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})

    def recovered(self, source: str, broker_alive: bool = False) -> None:
        """The work ``source`` succeeded; ``broker_alive``: it went through the broker, so a broker
        outage noticed elsewhere (the probe) is over too."""
        out = self.current
        if out is not None and (out.source == source or (broker_alive and out.kind == "broker")):
            self.log.warning("infrastructure answers again", extra={
                "kind": out.kind, "after_s": round(self.clock.monotonic() - out.since, 1), "failures": out.failures})
            self.current = None
