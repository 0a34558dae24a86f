"""One async LLM client for every pipeline stage: bounded, rate limited, retried, cached, budgeted.

The research code made a new client per request, retried every exception with fixed sleeps and
turned failures into placeholder scores.  Here one ``LLMClient`` (one pooled HTTP client) serves
a whole service; transient failures are retried under the shared ``RetryPolicy`` (``retry.py``);
anything else fails at once with a typed ``LLMError`` (``errors.py``).  A response cache in Redis
(``cache.py``) makes re-runs free, and a shared ``Budget`` (``budget.py``) stops calls *before*
they are made once the experiment's spend cap would be crossed.  Callers that report what their
calls cost pass a ``Spend`` and get every call counted, re-asks and failures included.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from tenacity import RetryCallState

from services.core.config import LLMConfig
from services.llm.budget import Budget, Spend
from services.llm.cache import ResponseCache
from services.llm.contract import CallRecorder, Completion, LLMRequest, LLMResponse, Provider, max_input_tokens
from services.llm.errors import RETRYABLE, LLMError, ParseError, Timeout
from services.llm.ratelimit import TokenBucket
from services.llm.retry import RetryPolicy

log = logging.getLogger("autointerv.llm")

T = TypeVar("T")

REASK_SUFFIX = "\n\nYour previous answer could not be read. Reply exactly in the format requested above."


class LLMClient:
    """Async LLM client; create one per service and share it across tasks."""

    def __init__(self, provider: Provider, cfg: LLMConfig, *, cache: ResponseCache | None = None,
                 budget: Budget | None = None, recorder: CallRecorder | None = None,
                 limiter: TokenBucket | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.provider = provider
        self.cfg = cfg
        self.cache = cache
        self.budget = budget
        self.recorder = recorder
        self.retry = RetryPolicy(cfg.max_retries, cfg.backoff_base_s, cfg.backoff_max_s)
        self._sleep = sleep  # between retries; injectable so tests can read the waits
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
                       purpose: str = "", cache: bool = True, spend: Spend | None = None) -> LLMResponse:
        """One completion.  ``cache=False`` skips the cache read (e.g. to sample again at T > 0)."""
        return await self._complete(self._request(prompt, system, max_output_tokens, temperature),
                                    purpose=purpose, read_cache=cache, spend=spend)

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
        purpose: str = "", cache: bool = True, spend: Spend | None = None,
    ) -> tuple[T, LLMResponse]:
        """Like ``complete_parsed`` but also returns the response that parsed (cached flag, tokens).

        That response is the *last* call's; ``spend`` counts every call, the unreadable answers
        before a re-ask included.  The re-ask appends ``REASK_SUFFIX`` so it differs from the first
        prompt even at T=0 (and in the cache); an unreadable answer is evicted from the cache so no
        later run reuses it.
        """
        last: ParseError | None = None
        resp: LLMResponse | None = None
        for attempt in range(retries_on_parse + 1):
            request = self._request(prompt if attempt == 0 else prompt + REASK_SUFFIX, system,
                                    max_output_tokens, temperature)
            resp = await self._complete(request, purpose=purpose, read_cache=cache, spend=spend)
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

    # ---- pricing

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.cfg.usd_per_1k_input + output_tokens * self.cfg.usd_per_1k_output) / 1000

    def worst_case_cost(self, request: LLMRequest) -> float:
        """The most ``request`` can cost: what the budget holds while it is in flight."""
        return self.cost(max_input_tokens(request), request.max_output_tokens)

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

    async def _complete(self, request: LLMRequest, *, purpose: str, read_cache: bool,
                        spend: Spend | None) -> LLMResponse:
        spend = spend if spend is not None else Spend()
        started = time.monotonic()
        cache = self.cache
        key = cache.key(self.provider.name, self.cfg.model, request) if cache else None
        if cache and key and read_cache and (hit := await self._cached(key, started)):
            spend.cached += 1
            return hit
        reserved = await self._reserve(request, spend)
        completion = await self._send_settled(request, purpose, reserved, started, spend)
        cost = self.cost(completion.input_tokens, completion.output_tokens)
        resp = LLMResponse(text=completion.text, input_tokens=completion.input_tokens,
                           output_tokens=completion.output_tokens, cost_usd=cost, cached=False,
                           model=completion.model, latency_s=time.monotonic() - started)
        if cache and key:
            await cache.put(key, {"text": resp.text, "input_tokens": resp.input_tokens,
                                  "output_tokens": resp.output_tokens, "model": resp.model})
        self._record("ok", resp.input_tokens, resp.output_tokens, resp.cost_usd, resp.latency_s)
        return resp

    async def _reserve(self, request: LLMRequest, spend: Spend) -> float:
        """Hold the call's worst-case cost in the budget; raise before anything is sent."""
        reserved = self.worst_case_cost(request)
        if self.budget is not None:
            try:
                await self.budget.reserve(reserved)
            except LLMError as exc:
                spend.refused += 1
                self._record(exc.outcome)
                raise
        return reserved

    async def _send_settled(self, request: LLMRequest, purpose: str, reserved: float,
                            started: float, spend: Spend) -> Completion:
        """Send with retries, then settle the reservation to what the call really cost.

        Failures cost nothing except timeouts, which the provider may have processed and billed;
        a cancelled call is charged its reservation for the same reason.  ``spend`` gets the call
        and exactly the amount the budget was charged.
        """
        charged = reserved
        try:
            completion = await self._send_with_retries(request, purpose)
            charged = self.cost(completion.input_tokens, completion.output_tokens)
            if charged > reserved:  # the provider billed past the worst case: the cap may be overshot
                log.warning("LLM %s/%s reported usage costing $%.6f, above the $%.6f held for it",
                            self.provider.name, self.cfg.model, charged, reserved)
            return completion
        except LLMError as exc:
            charged = reserved if isinstance(exc, Timeout) else 0.0
            self._record(exc.outcome, latency=time.monotonic() - started)
            raise
        finally:
            spend.calls += 1
            spend.cost_usd += charged
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
        retrying = self.retry.retrying(RETRYABLE, before_sleep=self._before_sleep(purpose), sleep=self._sleep)
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
