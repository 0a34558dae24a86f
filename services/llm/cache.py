"""The LLM response cache in Redis: identical requests are answered once, re-runs are free.

The key hashes everything that shapes an answer (provider, model, system, prompt, temperature,
output limit).  The cache is an optimisation, never a dependency: any Redis failure reads as a
miss, and a small circuit breaker skips Redis for a while after one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from hashlib import blake2b
from typing import Any

import orjson

from services.llm.contract import LLMRequest

log = logging.getLogger("autointerv.llm")


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
