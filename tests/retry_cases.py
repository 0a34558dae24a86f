"""Retry-After cases that every HTTP client under the shared retry policy must pass.

``tests/test_llm_clients.py`` (the LLM client) and ``tests/test_generation_backends.py`` (the
OpenAI-compatible generation backend) each play every case against a local server: one failing
answer with these headers, then success, and check the one wait the client slept.  Both clients
are built with a jitter window of ``JITTER_S``, far below every Retry-After here, so a client
that ignored the header (or added the backoff to it) fails the exact cases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.llm.retry import RETRY_AFTER_CAP_S

JITTER_S = 0.01  # backoff_base_s and backoff_max_s of the clients under test


def http_date(offset_s: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + offset_s))


@dataclass(frozen=True)
class RetryAfterCase:
    id: str
    status: int
    headers: Callable[[], dict[str, str]]  # built when the test runs: HTTP dates are relative to now
    low: float  # bounds of the wait before the second attempt
    high: float


RETRY_AFTER_CASES = [
    RetryAfterCase("seconds", 429, lambda: {"Retry-After": "3"}, 3.0, 3.0),
    RetryAfterCase("fractional", 429, lambda: {"Retry-After": "1.5"}, 1.5, 1.5),
    RetryAfterCase("zero", 429, lambda: {"Retry-After": "0"}, 0.0, 0.0),
    RetryAfterCase("milliseconds", 429, lambda: {"retry-after-ms": "250"}, 0.25, 0.25),
    # the date has whole seconds, and the request takes a moment: 55 s leaves room for a slow machine
    RetryAfterCase("http-date", 429, lambda: {"Retry-After": http_date(60)}, 55.0, 60.0),
    RetryAfterCase("http-date-past", 429, lambda: {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0, 0.0),
    RetryAfterCase("above-cap", 429, lambda: {"Retry-After": "86400"}, RETRY_AFTER_CAP_S, RETRY_AFTER_CAP_S),
    RetryAfterCase("on-503", 503, lambda: {"Retry-After": "2"}, 2.0, 2.0),
    RetryAfterCase("on-408", 408, lambda: {"Retry-After": "4"}, 4.0, 4.0),
    RetryAfterCase("unreadable", 429, lambda: {"Retry-After": "soon"}, 0.0, JITTER_S),
    RetryAfterCase("absent", 500, dict, 0.0, JITTER_S),
]
