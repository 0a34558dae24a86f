"""One retry policy for every outgoing HTTP client: the LLM providers and the OpenAI-compatible
generation backend.

- **What is retried:** 408, 429 and 5xx answers (``retryable_status``), timeouts and connection
  failures.  Each caller maps those to its own exception type and passes it as ``retry_on``;
  anything else (other 4xx, malformed answers) fails at once.
- **How long to wait:** the server's ``Retry-After`` (seconds, an HTTP date, or OpenAI's
  ``retry-after-ms``) when it sent one, on any retryable status, capped at
  ``retry_after_cap_s``.  The server knows when it will have capacity; a 1000 s backoff window
  must not override ``Retry-After: 0``.  Otherwise the AWS "full jitter" backoff: uniform on
  ``[0, min(backoff_max_s, backoff_base_s * 2**(retry - 1))]``, so throttled replicas spread out.
- **How often:** at most ``max_retries`` retries, ``max_retries + 1`` attempts in all.

tenacity runs the loop (stop, wait, per-retry hook, injectable sleep); this module only states
the policy, so the two callers cannot drift apart again.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

# A server asking for longer than this is treated as throttling for this long: the caller's own
# attempt limit then decides whether it is down.  Two minutes bound the stall of one request.
RETRY_AFTER_CAP_S = 120.0

RetryHook = Callable[[RetryCallState], None]


def retryable_status(status: int) -> bool:
    """408 (request timeout), 429 (rate limited) and every 5xx may succeed if repeated."""
    return status in (408, 429) or status >= 500


def parse_retry_after(headers: Mapping[str, str], *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds from ``retry-after-ms``, ``Retry-After: <seconds>`` or ``Retry-After: <HTTP date>``.

    None when absent or unreadable; a date in the past reads as 0.  ``headers`` must look names up
    case-insensitively (httpx's and aiohttp's header mappings do)."""
    if (ms := headers.get("retry-after-ms")) is not None and (value := _finite(ms)) is not None:
        return max(0.0, value / 1000)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    if (value := _finite(raw)) is not None:
        return max(0.0, value)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates come back naive; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now())


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class _RetryAfterOrJitter(wait_base):
    """tenacity wait: the failure's ``retry_after`` (capped) if it has one, else full jitter."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._cap = policy.retry_after_cap_s
        self._jitter = wait_random_exponential(multiplier=policy.backoff_base_s, max=policy.backoff_max_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(max(0.0, float(retry_after)), self._cap)
        return float(self._jitter(retry_state))


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt limit and waits of one client; see the module docstring for the rule."""

    max_retries: int
    backoff_base_s: float
    backoff_max_s: float
    retry_after_cap_s: float = RETRY_AFTER_CAP_S

    def wait(self) -> wait_base:
        """The tenacity wait strategy: reads ``retry_after`` from the exception that failed."""
        return _RetryAfterOrJitter(self)

    def retrying(self, retry_on: type[BaseException] | tuple[type[BaseException], ...], *,
                 before_sleep: RetryHook | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> AsyncRetrying:
        """An ``async for attempt in ...: with attempt:`` loop that re-raises the last failure."""
        return AsyncRetrying(stop=stop_after_attempt(self.max_retries + 1),
                             retry=retry_if_exception_type(retry_on), wait=self.wait(),
                             before_sleep=before_sleep, sleep=sleep, reraise=True)
