"""The experiment's spend cap (``Budget``) and a caller's own tally of what its calls cost (``Spend``).

The client reserves a call's worst-case cost *before* sending it and settles the reservation to
the real cost afterwards, so the cap holds however many calls run at once.  ``RedisBudget`` makes
check-and-hold one Lua script, so every replica of every service shares one cap atomically.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from services.llm.errors import BudgetExceeded, BudgetUnavailable


@dataclass
class Spend:
    """What a group of calls cost, counted the way the budget saw them (a caller's tally).

    ``calls`` are completions sent to the provider, each once however many retries it took;
    ``cost_usd`` is what they were charged (failures are free except timeouts and cancellations,
    which keep their reservation because the provider may have billed them).  Cache hits and
    calls the budget refused before sending are counted apart, in ``cached`` and ``refused``.
    """

    calls: int = 0
    cost_usd: float = 0.0
    cached: int = 0
    refused: int = 0


class Budget(ABC):
    """Spend cap for one experiment: reserve the worst case before a call, settle after it."""

    def __init__(self, limit_usd: float) -> None:
        self.limit_usd = limit_usd

    @abstractmethod
    async def reserve(self, usd: float) -> None:
        """Hold ``usd`` or raise ``BudgetExceeded`` if spent + held + usd would pass the limit."""

    @abstractmethod
    async def settle(self, reserved_usd: float, actual_usd: float) -> None:
        """Release a reservation and record what the call really cost."""

    @abstractmethod
    async def spent(self) -> float:
        """Settled spend so far (excludes reservations of calls in flight)."""

    @abstractmethod
    async def reserved(self) -> float:
        """Worst-case cost of the calls in flight."""

    async def remaining(self) -> float:
        return max(0.0, self.limit_usd - await self.spent() - await self.reserved())

    def _exceeded(self, committed: float, usd: float) -> BudgetExceeded:
        return BudgetExceeded(f"LLM budget of ${self.limit_usd:.4f} would be exceeded: "
                              f"${committed:.6f} committed + ${usd:.6f} for this call")

    @property
    def _limit_with_slack(self) -> float:
        return self.limit_usd * (1 + 1e-9) + 1e-12  # float noise, not policy

    def _fits(self, committed: float, usd: float) -> bool:
        return committed + usd <= self._limit_with_slack


class InProcessBudget(Budget):
    """Budget for a single process without Redis.  No await between check and update: atomic."""

    def __init__(self, limit_usd: float) -> None:
        super().__init__(limit_usd)
        self._spent = 0.0
        self._reserved = 0.0

    async def reserve(self, usd: float) -> None:
        committed = self._spent + self._reserved
        if not self._fits(committed, usd):
            raise self._exceeded(committed, usd)
        self._reserved += usd

    async def settle(self, reserved_usd: float, actual_usd: float) -> None:
        self._reserved = max(0.0, self._reserved - reserved_usd)
        self._spent += actual_usd

    async def spent(self) -> float:
        return self._spent

    async def reserved(self) -> float:
        return self._reserved


_RESERVE_LUA = """
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local held = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local usd = tonumber(ARGV[1])
if spent + held + usd > tonumber(ARGV[2]) then
  return {0, tostring(spent + held)}
end
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', ARGV[1])
return {1, tostring(spent + held + usd)}
"""

_SETTLE_LUA = """
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', '-' .. ARGV[1])
return redis.call('HINCRBYFLOAT', KEYS[1], 'spent', ARGV[2])
"""


class RedisBudget(Budget):
    """Budget shared by every replica of every service of one experiment.

    State is the hash ``<ns>:budget:<experiment>`` with fields ``spent`` and ``reserved``; the
    check-and-hold is one Lua script, so concurrent replicas can never jointly overshoot.  A
    replica that dies mid-call leaves its reservation held, which errs on the side of spending less.
    """

    def __init__(self, redis: Any, namespace: str, experiment_id: str, limit_usd: float,
                 ttl_s: int | None = None) -> None:
        super().__init__(limit_usd)
        self.key = f"{namespace}:budget:{experiment_id}"
        self.ttl_s = ttl_s  # per-experiment state expires (cache.state_ttl_s), refreshed on each reserve
        self._redis = redis
        self._reserve = redis.register_script(_RESERVE_LUA)
        self._settle = redis.register_script(_SETTLE_LUA)

    async def _call(self, coro: Awaitable[Any]) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise BudgetUnavailable(f"budget {self.key} unreachable: {type(exc).__name__}") from exc

    async def reserve(self, usd: float) -> None:
        limit = self._limit_with_slack
        ok, committed = await self._call(self._reserve(keys=[self.key], args=[repr(usd), repr(limit)]))
        if self.ttl_s:
            await self._call(self._redis.expire(self.key, self.ttl_s))
        if not int(ok):
            raise self._exceeded(float(committed), usd)

    async def settle(self, reserved_usd: float, actual_usd: float) -> None:
        await self._call(self._settle(keys=[self.key], args=[repr(reserved_usd), repr(actual_usd)]))

    async def _field(self, name: str) -> float:
        value = await self._call(self._redis.hget(self.key, name))
        return max(0.0, float(value)) if value is not None else 0.0

    async def spent(self) -> float:
        return await self._field("spent")

    async def reserved(self) -> float:
        return await self._field("reserved")
