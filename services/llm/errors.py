"""The typed failures of an LLM call: one class per outcome, so callers and metrics can tell them apart.

Every failure is an ``LLMError`` whose ``outcome`` labels it for the call recorder.  Which of
them are worth repeating is the retry policy's business (``RETRYABLE``, used by the client).
Messages never contain API keys: providers scrub any server text they quote.
"""

from __future__ import annotations


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
    """5xx, 408 or a connection failure: the request may succeed if repeated."""

    outcome = "server_error"


class Timeout(LLMError):
    outcome = "timeout"


class BadResponse(LLMError):
    """A 2xx answer that is not JSON or lacks the fields the protocol promises."""

    outcome = "bad_response"


class RequestRejected(LLMError):
    """A 4xx other than 408/429 (bad key, unknown model, too long a prompt): repeating will not help."""

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
