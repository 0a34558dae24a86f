"""LLM clients for labelling, validation scoring, generative validation and ground-truth judging."""

from services.llm.budget import Budget, InProcessBudget, RedisBudget, Spend
from services.llm.cache import ResponseCache
from services.llm.client import LLMClient
from services.llm.contract import CallRecorder, LLMResponse
from services.llm.errors import (
    BadResponse,
    BudgetExceeded,
    BudgetUnavailable,
    LLMError,
    MissingAPIKey,
    ParseError,
    RateLimited,
    RequestRejected,
    ServerError,
    Timeout,
)
from services.llm.factory import make_budget, make_llm_client
from services.llm.parsing import parse_json_array, parse_json_object, parse_score
from services.llm.retry import RetryPolicy, parse_retry_after

__all__ = [
    "BadResponse",
    "Budget",
    "BudgetExceeded",
    "BudgetUnavailable",
    "CallRecorder",
    "InProcessBudget",
    "LLMClient",
    "LLMError",
    "LLMResponse",
    "MissingAPIKey",
    "ParseError",
    "RateLimited",
    "RedisBudget",
    "RequestRejected",
    "ResponseCache",
    "RetryPolicy",
    "ServerError",
    "Spend",
    "Timeout",
    "make_budget",
    "make_llm_client",
    "parse_json_array",
    "parse_json_object",
    "parse_retry_after",
    "parse_score",
]
