"""Time as a dependency: services read the clock from their context, never ``time`` directly.

Against a real broker the clock is the system's.  The in-memory bus drives the same services in
burst mode with a :class:`VirtualClock` that moves only when the driver says so, so a run's
timers (ticks, snapshot cadence, idle timeouts) are a function of the event stream, not of how
fast the machine is: benchmark runs are reproducible and a 20-second idle timeout costs nothing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (for timestamps a user reads)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals)."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class VirtualClock:
    """A clock that advances only through :meth:`advance`; ``sleep`` advances it and yields.

    >>> c = VirtualClock(start=100.0)
    >>> c.advance(2.5)
    >>> c.monotonic(), c.time() - c.epoch
    (102.5, 2.5)
    """

    def __init__(self, start: float = 0.0, epoch: float = 1_700_000_000.0) -> None:
        self._now = start
        self._start = start
        self.epoch = epoch

    def time(self) -> float:
        return self.epoch + (self._now - self._start)

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
