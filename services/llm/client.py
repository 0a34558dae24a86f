"""One async LLM client for every pipeline stage: bounded, rate limited, retried, cached, budgeted.

The research code made a new client per request, retried every exception with fixed sleeps and
turned failures into placeholder scores.  Here one ``LLMClient`` (one pooled HTTP client) serves
a whole service; transient failures (429, 5xx, timeouts, connection errors) are retried with
full-jitter exponential backoff that honours ``Retry-After``; anything else fails at once with a
typed ``LLMError``.  A response cache in Redis makes re-runs free, and a shared ``Budget`` stops
calls *before* they are made once the experiment's spend cap would be crossed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any, Protocol, TypeVar

import orjson
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from services.core.config import LLMConfig

log = logging.getLogger("autointerv.llm")

T = TypeVar("T")

MAX_RETRY_AFTER_S = 300.0  # a server asking for longer than this is treated as down, not throttling
REASK_SUFFIX = "\n\nYour previous answer could not be read. Reply exactly in the format requested above."


# --------------------------------------------------------------------------- results and errors


@dataclass(frozen=True)
class LLMResponse:
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float  # 0 for cache hits: nothing was spent
    cached: bool
    model: str
    latency_s: float


class LLMError(Exception):
    """A call that produced no usable response.  Messages never contain API keys."""

    outcome = "error"  # label for the recorder

    def __init__(self, message: str, *, provider: str = "", model: str = "", status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.model = model
        self.status = status
        self.retry_after = retry_after
        self.attempts = 0


class RateLimited(LLMError):
    outcome = "rate_limited"


class ServerError(LLMError):
    """5xx or a connection failure: the request may succeed if repeated."""

    outcome = "server_error"


class Timeout(LLMError):
    outcome = "timeout"


class BadResponse(LLMError):
    """A 2xx answer that is not JSON or lacks the fields the protocol promises."""

    outcome = "bad_response"


class RequestRejected(LLMError):
    """A 4xx other than 429 (bad key, unknown model, too long a prompt): repeating will not help."""

    outcome = "rejected"


class BudgetExceeded(LLMError):
    outcome = "budget_exceeded"


class BudgetUnavailable(LLMError):
    """The shared budget could not be checked (Redis down): fail closed rather than overspend."""

    outcome = "budget_unavailable"


class MissingAPIKey(LLMError):
    outcome = "missing_key"


class ParseError(LLMError, ValueError):
    """An answer lacked the requested form (no number, two numbers, bad JSON); see ``parsing``."""

    outcome = "parse_error"


RETRYABLE: tuple[type[LLMError], ...] = (RateLimited, ServerError, Timeout)


# --------------------------------------------------------------------------- provider contract


@dataclass(frozen=True)
class LLMRequest:
    prompt: str
    system: str | None
    temperature: float
    max_output_tokens: int


@dataclass(frozen=True)
class Completion:
    """What one provider attempt returns, before cost and caching are applied."""

    text: str
    input_tokens: int
    output_tokens: int
    model: str


class Provider(ABC):
    """Speaks one vendor's protocol.  ``send`` makes exactly one attempt and raises ``LLMError``."""

    name: str
    model: str

    @abstractmethod
    async def send(self, request: LLMRequest) -> Completion: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class CallRecorder(Protocol):
    """Metrics hook (e.g. prometheus counters owned by the caller); called once per outcome."""

    def on_call(self, provider: str, model: str, outcome: str, input_tokens: int, output_tokens: int,
                cost: float, latency: float) -> None: ...


def estimate_tokens(text: str) -> int:
    """Rough token count (4 characters per token, rounded up) for budget reservations."""
    return math.ceil(len(text) / 4)


def request_tokens(request: LLMRequest) -> int:
    """Estimated input tokens of a request: its prompt and system text."""
    return estimate_tokens(request.prompt + (request.system or ""))


# --------------------------------------------------------------------------- rate limit


class TokenBucket:
    """Allows ``rate`` acquisitions per second on average with bursts up to ``capacity``.

    Hand-written (20 lines) because the usual library, aiolimiter, is not a dependency; clock and
    sleep are injectable so the refill arithmetic is testable without wall-clock timing.
    """

    def __init__(self, rate: float, capacity: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rate = rate
        self.capacity = capacity if capacity is not None else max(1.0, rate)
        self._tokens = self.capacity
        self._clock, self._sleep = clock, sleep
        self._updated = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:  # FIFO: waiters are served in arrival order
            while True:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await self._sleep((1.0 - self._tokens) / self.rate)


# --------------------------------------------------------------------------- budget


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


# --------------------------------------------------------------------------- cache


class ResponseCache:
    """LLM responses in Redis under ``<ns>:llm:v1:<blake2b>``; any Redis failure means a miss.

    After a failure the cache is skipped for ``retry_after_s`` (a small circuit breaker), so a dead
    Redis costs one timeout per interval instead of one per LLM call.
    """

    def __init__(self, redis: Any, namespace: str = "ai", ttl_s: int | None = None, *,
                 op_timeout_s: float = 2.0, retry_after_s: float = 30.0) -> None:
        self._redis = redis
        self._prefix = f"{namespace}:llm:v1:"
        self._ttl_s = ttl_s
        self._op_timeout_s = op_timeout_s  # a hung Redis must not stall LLM calls
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._warned = False

    def key(self, provider: str, model: str, request: LLMRequest) -> str:
        material = orjson.dumps([provider, model, request.system, request.prompt, request.temperature,
                                 request.max_output_tokens])
        return self._prefix + blake2b(material, digest_size=16).hexdigest()

    def _degrade(self, op: str, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._retry_after_s
        if not self._warned:
            self._warned = True
            log.warning("LLM response cache unavailable (%s failed: %s); continuing without it",
                        op, type(exc).__name__)

    async def _run(self, op: str, make: Callable[[], Awaitable[Any]]) -> Any:
        if time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self._op_timeout_s):
                return await make()
        except Exception as exc:  # any Redis/network/timeout failure degrades to "no cache"
            self._degrade(op, exc)
            return None

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self._run("get", lambda: self._redis.get(key))
        if raw is None:
            return None
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None

    async def put(self, key: str, value: dict[str, Any]) -> None:
        await self._run("set", lambda: self._redis.set(key, orjson.dumps(value), ex=self._ttl_s))

    async def evict(self, key: str) -> None:
        await self._run("delete", lambda: self._redis.delete(key))


# --------------------------------------------------------------------------- retry policy


class _Backoff(wait_base):
    """Full-jitter exponential backoff, replaced by the server's Retry-After when it sent one."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self._jitter = wait_random_exponential(multiplier=base_s, max=max_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(max(0.0, float(retry_after)), MAX_RETRY_AFTER_S)
        return float(self._jitter(retry_state))


# --------------------------------------------------------------------------- the client


class LLMClient:
    """Async LLM client; create one per service and share it across tasks."""

    def __init__(self, provider: Provider, cfg: LLMConfig, *, cache: ResponseCache | None = None,
                 budget: Budget | None = None, recorder: CallRecorder | None = None,
                 limiter: TokenBucket | None = None) -> None:
        self.provider = provider
        self.cfg = cfg
        self.cache = cache
        self.budget = budget
        self.recorder = recorder
        self._backoff = _Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self._limiter = limiter or TokenBucket(cfg.requests_per_s)

    def __repr__(self) -> str:
        return f"LLMClient(provider={self.provider.name!r}, model={self.cfg.model!r})"

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.provider.aclose()

    # ---- public calls

    async def complete(self, prompt: str, *, system: str | None = None,
                       max_output_tokens: int | None = None, temperature: float | None = None,
                       purpose: str = "", cache: bool = True) -> LLMResponse:
        """One completion.  ``cache=False`` skips the cache read (e.g. to sample again at T > 0)."""
        return await self._complete(self._request(prompt, system, max_output_tokens, temperature),
                                    purpose=purpose, read_cache=cache)

    async def complete_many(self, prompts: Sequence[str], **kw: Any) -> list[LLMResponse | LLMError]:
        """Concurrent completions (bounded by ``max_concurrency``), in input order; failures in place."""
        async def one(p: str) -> LLMResponse | LLMError:
            try:
                return await self.complete(p, **kw)
            except LLMError as exc:
                return exc
        return await self._gather([one(p) for p in prompts])

    async def complete_parsed(self, prompt: str, parser: Callable[[str], T], *, retries_on_parse: int = 1,
                              **kw: Any) -> T:
        """``parser(answer)``; on ``ParseError`` re-ask (with a format reminder), finally raise it."""
        value, _ = await self.complete_parsed_with_response(prompt, parser, retries_on_parse=retries_on_parse,
                                                            **kw)
        return value

    async def complete_parsed_with_response(
        self, prompt: str, parser: Callable[[str], T], *, retries_on_parse: int = 1,
        system: str | None = None, max_output_tokens: int | None = None, temperature: float | None = None,
        purpose: str = "", cache: bool = True,
    ) -> tuple[T, LLMResponse]:
        """Like ``complete_parsed`` but also returns the response that parsed (cost, cached flag).

        The re-ask appends ``REASK_SUFFIX`` so it differs from the first prompt even at T=0 (and
        in the cache); an unreadable answer is evicted from the cache so no later run reuses it.
        """
        last: ParseError | None = None
        resp: LLMResponse | None = None
        for attempt in range(retries_on_parse + 1):
            request = self._request(prompt if attempt == 0 else prompt + REASK_SUFFIX, system,
                                    max_output_tokens, temperature)
            resp = await self._complete(request, purpose=purpose, read_cache=cache)
            try:
                return parser(resp.text), resp
            except ParseError as exc:
                last = exc
                if self.cache is not None:
                    await self.cache.evict(self.cache.key(self.provider.name, self.cfg.model, request))
        assert last is not None and resp is not None
        self._record("parse_error", resp.input_tokens, resp.output_tokens, 0.0, resp.latency_s)
        raise ParseError(f"unparsable after {retries_on_parse + 1} answers: {last}",
                         provider=self.provider.name, model=self.cfg.model) from last

    async def complete_many_parsed(self, prompts: Sequence[str], parser: Callable[[str], T],
                                   **kw: Any) -> list[T | LLMError]:
        """``complete_parsed`` for many prompts concurrently; failures (incl. ``ParseError``) in place."""
        async def one(p: str) -> T | LLMError:
            try:
                return await self.complete_parsed(p, parser, **kw)
            except LLMError as exc:
                return exc
        return await self._gather([one(p) for p in prompts])

    # ---- internals

    @staticmethod
    async def _gather(coros: list[Awaitable[T]]) -> list[T]:
        async with asyncio.TaskGroup() as tg:  # a bug (not an LLMError) cancels the rest
            tasks = [tg.create_task(c) for c in coros]  # type: ignore[arg-type]
        return [t.result() for t in tasks]

    def _request(self, prompt: str, system: str | None, max_output_tokens: int | None,
                 temperature: float | None) -> LLMRequest:
        return LLMRequest(prompt=prompt, system=system,
                          temperature=self.cfg.temperature if temperature is None else temperature,
                          max_output_tokens=max_output_tokens or self.cfg.max_output_tokens)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.cfg.usd_per_1k_input + output_tokens * self.cfg.usd_per_1k_output) / 1000

    def worst_case_cost(self, request: LLMRequest) -> float:
        return self.cost(request_tokens(request), request.max_output_tokens)

    def _record(self, outcome: str, input_tokens: int = 0, output_tokens: int = 0, cost: float = 0.0,
                latency: float = 0.0) -> None:
        if self.recorder is None:
            return
        try:
            self.recorder.on_call(self.provider.name, self.cfg.model, outcome, input_tokens, output_tokens,
                                  cost, latency)
        except Exception:  # metrics must never break a call
            log.exception("LLM call recorder failed")

    async def _cached(self, key: str, started: float) -> LLMResponse | None:
        assert self.cache is not None
        hit = await self.cache.get(key)
        if hit is None:
            return None
        try:
            resp = LLMResponse(text=str(hit["text"]), input_tokens=int(hit["input_tokens"]),
                               output_tokens=int(hit["output_tokens"]), cost_usd=0.0, cached=True,
                               model=str(hit["model"]), latency_s=time.monotonic() - started)
        except (KeyError, TypeError, ValueError):
            return None  # an entry from an incompatible writer: treat as a miss
        self._record("cached", resp.input_tokens, resp.output_tokens, 0.0, resp.latency_s)
        return resp

    async def _complete(self, request: LLMRequest, *, purpose: str, read_cache: bool) -> LLMResponse:
        started = time.monotonic()
        cache = self.cache
        key = cache.key(self.provider.name, self.cfg.model, request) if cache else None
        if cache and key and read_cache and (hit := await self._cached(key, started)):
            return hit
        reserved = await self._reserve(request)
        completion = await self._send_settled(request, purpose, reserved, started)
        cost = self.cost(completion.input_tokens, completion.output_tokens)
        resp = LLMResponse(text=completion.text, input_tokens=completion.input_tokens,
                           output_tokens=completion.output_tokens, cost_usd=cost, cached=False,
                           model=completion.model, latency_s=time.monotonic() - started)
        if cache and key:
            await cache.put(key, {"text": resp.text, "input_tokens": resp.input_tokens,
                                  "output_tokens": resp.output_tokens, "model": resp.model})
        self._record("ok", resp.input_tokens, resp.output_tokens, resp.cost_usd, resp.latency_s)
        return resp

    async def _reserve(self, request: LLMRequest) -> float:
        """Hold the call's worst-case cost in the budget; raise before anything is sent."""
        reserved = self.worst_case_cost(request)
        if self.budget is not None:
            try:
                await self.budget.reserve(reserved)
            except LLMError as exc:
                self._record(exc.outcome)
                raise
        return reserved

    async def _send_settled(self, request: LLMRequest, purpose: str, reserved: float,
                            started: float) -> Completion:
        """Send with retries, then settle the reservation to what the call really cost.

        Failures cost nothing except timeouts, which the provider may have processed and billed;
        a cancelled call is charged its reservation for the same reason.
        """
        charged = reserved
        try:
            completion = await self._send_with_retries(request, purpose)
            charged = self.cost(completion.input_tokens, completion.output_tokens)
            return completion
        except LLMError as exc:
            charged = reserved if isinstance(exc, Timeout) else 0.0
            self._record(exc.outcome, latency=time.monotonic() - started)
            raise
        finally:
            if self.budget is not None:
                await self.budget.settle(reserved, charged)

    async def _attempt(self, request: LLMRequest) -> Completion:
        await self._limiter.acquire()
        try:
            async with asyncio.timeout(self.cfg.timeout_s):  # total bound; httpx's are per phase
                return await self.provider.send(request)
        except TimeoutError:
            raise Timeout(f"no answer within {self.cfg.timeout_s:g}s", provider=self.provider.name,
                          model=self.cfg.model) from None

    def _before_sleep(self, purpose: str) -> Callable[[RetryCallState], None]:
        def hook(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.info("LLM %s/%s %s attempt %d failed (%s); retrying in %.2fs", self.provider.name,
                     self.cfg.model, purpose or "call", state.attempt_number, exc, wait)
            self._record("retry")
        return hook

    async def _send_with_retries(self, request: LLMRequest, purpose: str) -> Completion:
        attempts = 0
        retrying = AsyncRetrying(stop=stop_after_attempt(self.cfg.max_retries + 1),
                                 retry=retry_if_exception_type(RETRYABLE), wait=self._backoff,
                                 before_sleep=self._before_sleep(purpose), reraise=True)
        try:
            async with self._sem:  # held through backoff sleeps: a throttled client should slow down
                async for attempt in retrying:
                    with attempt:
                        attempts += 1
                        return await self._attempt(request)
        except LLMError as exc:
            exc.attempts = attempts
            raise
        raise AssertionError("unreachable: tenacity either returns or re-raises")
