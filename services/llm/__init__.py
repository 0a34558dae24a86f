"""LLM clients for labelling, validation scoring, generative validation and ground-truth judging."""

from services.llm.client import (
    BadResponse,
    Budget,
    BudgetExceeded,
    BudgetUnavailable,
    CallRecorder,
    InProcessBudget,
    LLMClient,
    LLMError,
    LLMResponse,
    MissingAPIKey,
    RateLimited,
    RedisBudget,
    RequestRejected,
    ResponseCache,
    ServerError,
    Timeout,
)
from services.llm.factory import make_budget, make_llm_client
from services.llm.parsing import ParseError, parse_json_array, parse_json_object, parse_score

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
    "ServerError",
    "Timeout",
    "make_budget",
    "make_llm_client",
    "parse_json_array",
    "parse_json_object",
    "parse_score",
]
