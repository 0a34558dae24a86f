"""Protocol adapters: OpenAI-compatible chat, Anthropic messages, Gemini (google-genai SDK).

Each adapter makes exactly one attempt per ``send`` and maps every failure to an ``LLMError``
subclass; which of them are retried, and how long to wait, is ``retry.py``'s shared policy, applied
by ``LLMClient`` alone (the Gemini SDK's own retries are switched off).  API keys come only from
the environment (``NAME`` or a file named by ``NAME_FILE``), are held in a ``Secret`` whose repr
is masked, and are scrubbed from any server text we quote.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson
import pydantic

from services.core.config import LLMConfig
from services.llm.contract import Completion, LLMRequest, Provider, estimate_tokens, request_tokens
from services.llm.errors import (
    BadResponse,
    LLMError,
    MissingAPIKey,
    RateLimited,
    RequestRejected,
    ServerError,
    Timeout,
)
from services.llm.retry import parse_retry_after, retryable_status

log = logging.getLogger("autointerv.llm")

DEFAULT_KEY_ENVS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
}
DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": None,  # the SDK's own default endpoint
}
ANTHROPIC_VERSION = "2023-06-01"
_BODY_SNIPPET = 300


class Secret:
    """An API key that never shows itself in reprs, logs or tracebacks by accident."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: str) -> str:
        return text.replace(self._value, "***") if self._value else text

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def key_envs(cfg: LLMConfig) -> tuple[str, ...]:
    """Environment variables that may hold the key: the configured one, or the provider's defaults."""
    return (cfg.api_key_env,) if cfg.api_key_env else DEFAULT_KEY_ENVS[cfg.provider]


def resolve_api_key(cfg: LLMConfig, environ: Mapping[str, str] | None = None) -> Secret | None:
    """The key from ``cfg.api_key_env`` (or the provider's defaults), or from ``<NAME>_FILE``."""
    env = os.environ if environ is None else environ
    for name in key_envs(cfg):
        if env.get(name, "").strip():
            return Secret(env[name].strip())
        path = env.get(f"{name}_FILE", "").strip()
        if path:
            try:
                value = Path(path).read_text().strip()
            except OSError as exc:
                raise MissingAPIKey(f"cannot read the key file named by ${name}_FILE: "
                                    f"{type(exc).__name__}", provider=cfg.provider) from None
            if value:
                return Secret(value)
    return None


def _require_key(cfg: LLMConfig) -> Secret:
    key = resolve_api_key(cfg)
    if key is None:
        raise MissingAPIKey(f"{cfg.provider} needs an API key: set {' or '.join(key_envs(cfg))} "
                            f"(or the matching *_FILE variable)", provider=cfg.provider)
    return key


class _Base(Provider):
    """Shared plumbing: one pooled ``httpx.AsyncClient`` and status-code-to-error mapping."""

    def __init__(self, cfg: LLMConfig, key: Secret | None) -> None:
        self.name = cfg.provider
        self.model = cfg.model
        self.cfg = cfg
        self._key = key
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout_s),
            limits=httpx.Limits(max_connections=cfg.max_concurrency,
                                max_keepalive_connections=cfg.max_concurrency),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.cfg.base_url!r})"

    async def aclose(self) -> None:
        await self.http.aclose()

    def _scrub(self, text: str) -> str:
        text = text[:_BODY_SNIPPET]
        return self._key.scrub(text) if self._key else text

    def _error(self, cls: type[LLMError], message: str, status: int | None = None,
               retry_after: float | None = None) -> LLMError:
        return cls(self._scrub(message), provider=self.name, model=self.model, status=status,
                   retry_after=retry_after)

    def _status_error(self, status: int, body: str, headers: Mapping[str, str]) -> LLMError:
        """429 -> RateLimited, 408/5xx -> ServerError (both retried), other 4xx -> RequestRejected."""
        message = f"HTTP {status} from {self.name}: {body}"
        if not retryable_status(status):
            return self._error(RequestRejected, message, status)
        cls = RateLimited if status == 429 else ServerError
        return self._error(cls, message, status, parse_retry_after(headers))

    def _transport_error(self, exc: Exception) -> LLMError:
        if isinstance(exc, httpx.TimeoutException):
            return self._error(Timeout, f"{self.name} timed out ({type(exc).__name__})")
        return self._error(ServerError, f"connection to {self.name} failed ({type(exc).__name__}: {exc})")

    async def _post_json(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        try:
            resp = await self.http.post(url, content=orjson.dumps(body),
                                        headers={"content-type": "application/json", **headers})
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None
        if resp.status_code >= 300:
            raise self._status_error(resp.status_code, resp.text, resp.headers)
        try:
            data = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise self._error(BadResponse, f"{self.name} sent non-JSON: {resp.text!r}") from None
        if not isinstance(data, dict):
            raise self._error(BadResponse, f"{self.name} sent a JSON {type(data).__name__}, not an object")
        return data

    def _bad(self, what: str, data: Any) -> LLMError:
        return self._error(BadResponse, f"{self.name} response {what}: {orjson.dumps(data).decode()!r}")


class OpenAIProvider(_Base):
    """POST {base_url}/chat/completions: hosted OpenAI, vLLM serve, Ollama, llama.cpp server."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__(cfg, resolve_api_key(cfg))  # local servers need no key
        self.url = (cfg.base_url or DEFAULT_BASE_URLS["openai"]).rstrip("/") + "/chat/completions"

    async def send(self, request: LLMRequest) -> Completion:
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages.append({"role": "user", "content": request.prompt})
        body = {"model": self.model, "messages": messages, "temperature": request.temperature,
                "max_tokens": request.max_output_tokens}
        headers = {"authorization": f"Bearer {self._key.reveal()}"} if self._key else {}
        data = await self._post_json(self.url, body, headers)
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise self._bad("lacks choices[0].message.content", data) from None
        if not isinstance(text, str):
            raise self._bad("has no text content", data)
        usage = data.get("usage") or {}
        # Some local servers omit usage; estimate rather than fail, the cost is then approximate.
        in_tok = usage.get("prompt_tokens")
        out_tok = usage.get("completion_tokens")
        return Completion(
            text=text,
            input_tokens=int(in_tok) if in_tok is not None else request_tokens(request),
            output_tokens=int(out_tok) if out_tok is not None else estimate_tokens(text),
            model=str(data.get("model") or self.model),
        )


class AnthropicProvider(_Base):
    """POST {base_url}/v1/messages with ``x-api-key`` and ``anthropic-version``."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__(cfg, _require_key(cfg))
        self.url = (cfg.base_url or DEFAULT_BASE_URLS["anthropic"]).rstrip("/") + "/v1/messages"

    async def send(self, request: LLMRequest) -> Completion:
        body: dict[str, Any] = {"model": self.model, "max_tokens": request.max_output_tokens,
                                "temperature": request.temperature,
                                "messages": [{"role": "user", "content": request.prompt}]}
        if request.system:
            body["system"] = request.system
        assert self._key is not None
        headers = {"x-api-key": self._key.reveal(), "anthropic-version": ANTHROPIC_VERSION}
        data = await self._post_json(self.url, body, headers)
        try:
            blocks = data["content"]
            text = "".join(b["text"] for b in blocks if b.get("type") == "text")
            in_tok, out_tok = int(data["usage"]["input_tokens"]), int(data["usage"]["output_tokens"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise self._bad("lacks content[].text or usage", data) from None
        if not any(b.get("type") == "text" for b in blocks):
            raise self._bad("has no text block", data)
        return Completion(text=text, input_tokens=in_tok, output_tokens=out_tok,
                          model=str(data.get("model") or self.model))


class GeminiProvider(_Base):
    """Gemini through the official ``google-genai`` SDK, on our pooled httpx client.

    ``HttpRetryOptions(attempts=1)`` turns the SDK's tenacity retries off and, because retry
    options are set, also its hidden sleep-and-retry on connection errors; passing our own
    ``httpx_async_client`` keeps one connection pool and bypasses its aiohttp transport.
    """

    def __init__(self, cfg: LLMConfig) -> None:
        from google import genai  # imported here: the SDK is heavy and only Gemini users need it
        from google.genai import types

        super().__init__(cfg, _require_key(cfg))
        assert self._key is not None
        self._types = types
        self._sdk = genai.Client(
            api_key=self._key.reveal(),
            vertexai=False,
            http_options=types.HttpOptions(
                base_url=cfg.base_url,
                timeout=max(1, round(cfg.timeout_s * 1000)),  # the SDK takes milliseconds
                retry_options=types.HttpRetryOptions(attempts=1),
                httpx_async_client=self.http,
            ),
        )

    async def aclose(self) -> None:
        self._sdk.close()  # the SDK's own (unused) sync client; ours is closed below
        await super().aclose()

    async def send(self, request: LLMRequest) -> Completion:
        from google.genai import errors as genai_errors

        config = self._types.GenerateContentConfig(
            system_instruction=request.system, temperature=request.temperature,
            max_output_tokens=request.max_output_tokens,
            # no tools are sent; disabling function calling also skips its per-call INFO log line
            automatic_function_calling=self._types.AutomaticFunctionCallingConfig(disable=True))
        try:
            resp = await self._sdk.aio.models.generate_content(model=self.model, contents=request.prompt,
                                                               config=config)
        except genai_errors.APIError as exc:
            headers = exc.response.headers if isinstance(exc.response, httpx.Response) else {}
            raise self._status_error(int(exc.code or 0), str(exc.details), headers) from None
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None
        except (ValueError, pydantic.ValidationError) as exc:  # the SDK's JSON decode / model parse
            raise self._error(BadResponse, f"gemini sent an unreadable body ({type(exc).__name__})") from None
        return self._completion(resp)

    def _completion(self, resp: Any) -> Completion:
        usage = resp.usage_metadata
        text = resp.text
        if text is None or usage is None or usage.prompt_token_count is None:
            raise self._bad("lacks candidates[0].content text or usageMetadata",
                            resp.model_dump(mode="json", exclude_none=True, exclude={"sdk_http_response"}))
        output = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)  # both billed
        return Completion(text=text, input_tokens=int(usage.prompt_token_count), output_tokens=int(output),
                          model=str(resp.model_version or self.model))


PROVIDERS: dict[str, type[_Base]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "gemini": GeminiProvider,
}
