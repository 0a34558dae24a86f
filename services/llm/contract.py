"""What passes between the client and a provider adapter: requests, completions, responses.

A ``Provider`` speaks one vendor's wire protocol and makes exactly one attempt per ``send``; the
client around it adds retries, the cache, the budget and pricing, and hands back an
``LLMResponse``.  Token estimates live here because both sides need them: providers when a
server omits usage, the client when it reserves the worst-case cost before a call.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

# Tokens a chat template adds around the system and user messages (OpenAI documents 3 per message
# plus 3 to prime the reply); generous, because it only matters for tiny prompts.
MESSAGE_OVERHEAD_TOKENS = 32


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


@dataclass(frozen=True)
class LLMResponse:
    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float  # 0 for cache hits: nothing was spent
    cached: bool
    model: str
    latency_s: float


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


def max_input_tokens(request: LLMRequest) -> int:
    """An upper bound on the input tokens a provider can bill for ``request``, for budget holds.

    Byte-level BPE (OpenAI, Anthropic) and byte-fallback SentencePiece (Gemini) tokenizers never
    make more tokens than the text has UTF-8 bytes; the 4-characters-per-token estimate can be
    short by 4x (code, non-Latin scripts), and a hold that short lets the budget be overshot.
    """
    return len(request.prompt.encode()) + len((request.system or "").encode()) + MESSAGE_OVERHEAD_TOKENS
