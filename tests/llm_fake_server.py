"""A scriptable local HTTP server speaking the OpenAI, Anthropic or Gemini wire protocol.

Only for checking our API clients' protocol handling (retries, errors, parsing) against exact
request counts; it runs on 127.0.0.1 in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

Protocol = Literal["openai", "anthropic", "gemini"]


@dataclass(frozen=True)
class Reply:
    """A well-formed answer in the server's protocol."""

    text: str = "ok"
    input_tokens: int = 12
    output_tokens: int = 3


@dataclass(frozen=True)
class Status:
    """An HTTP error status with an optional body and headers (e.g. Retry-After)."""

    status: int
    body: str = '{"error": {"message": "scripted failure"}}'
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Raw:
    """An arbitrary 200 body (malformed output tests)."""

    body: bytes
    status: int = 200


@dataclass(frozen=True)
class Hang:
    """Sleep ``seconds`` (or until the server closes) before answering: a timeout test."""

    seconds: float = 5.0


Action = Reply | Status | Raw | Hang


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any]
    prompt: str
    system: str | None


Script = Callable[[Seen], Action] | Sequence[Action]


def _extract(protocol: Protocol, body: dict[str, Any]) -> tuple[str, str | None]:
    """(user prompt, system prompt) from a request body."""
    if protocol == "openai":
        msgs = body.get("messages", [])
        system = next((m["content"] for m in msgs if m.get("role") == "system"), None)
        return next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), ""), system
    if protocol == "anthropic":
        return body["messages"][-1]["content"], body.get("system")
    parts = body["contents"][-1]["parts"]
    sys_parts = (body.get("systemInstruction") or {}).get("parts") or []
    return "".join(p.get("text", "") for p in parts), (sys_parts[0]["text"] if sys_parts else None)


def _reply_body(protocol: Protocol, reply: Reply, model: str) -> dict[str, Any]:
    if protocol == "openai":
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply.text}}],
                "usage": {"prompt_tokens": reply.input_tokens, "completion_tokens": reply.output_tokens,
                          "total_tokens": reply.input_tokens + reply.output_tokens}}
    if protocol == "anthropic":
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": reply.text}], "stop_reason": "end_turn",
                "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens}}
    return {"candidates": [{"index": 0, "finishReason": "STOP",
                            "content": {"role": "model", "parts": [{"text": reply.text}]}}],
            "usageMetadata": {"promptTokenCount": reply.input_tokens,
                              "candidatesTokenCount": reply.output_tokens,
                              "totalTokenCount": reply.input_tokens + reply.output_tokens},
            "modelVersion": model}


class FakeLLMServer:
    """``async with FakeLLMServer("openai", [Status(429), Reply("hi")]) as srv: srv.base_url``.

    A sequence script is consumed in order and its last action repeats; a callable script maps
    each request to an action.  ``hold_until_in_flight=n`` parks every request until n are in
    flight at once (or ``expected_requests`` have arrived, or 2 s pass), so a concurrency bound
    can be observed without timing.
    """

    def __init__(self, protocol: Protocol, script: Script = (Reply(),), *,
                 hold_until_in_flight: int | None = None, expected_requests: int | None = None) -> None:
        self.protocol = protocol
        self._script = script
        self._hold = hold_until_in_flight
        self._expected = expected_requests
        self.requests: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._changed: asyncio.Condition | None = None
        self._closing: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        root = f"http://127.0.0.1:{self.port}"
        return root + "/v1" if self.protocol == "openai" else root

    def _next_action(self, seen: Seen) -> Action:
        if callable(self._script):
            return self._script(seen)
        index = min(len(self.requests) - 1, len(self._script) - 1)
        return self._script[index]

    async def _wait_for_peers(self) -> None:
        assert self._changed is not None and self._hold is not None
        async with self._changed:
            self._changed.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(self._released), 2.0)

    def _released(self) -> bool:
        assert self._hold is not None
        return self.in_flight >= self._hold or len(self.requests) >= (self._expected or 1 << 30)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        prompt, system = _extract(self.protocol, body)
        headers = {k.lower(): v for k, v in request.headers.items()}
        seen = Seen(path=request.path, headers=headers, body=body, prompt=prompt, system=system)
        self.requests.append(seen)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self._hold:
                await self._wait_for_peers()
            return await self._respond(self._next_action(seen), body, request.path)
        finally:
            self.in_flight -= 1

    async def _respond(self, action: Action, body: dict[str, Any], path: str) -> web.StreamResponse:
        if isinstance(action, Hang):
            assert self._closing is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), action.seconds)
            action = Reply()
        if isinstance(action, Status):
            return web.Response(status=action.status, text=action.body, headers=action.headers,
                                content_type="application/json")
        if isinstance(action, Raw):
            return web.Response(status=action.status, body=action.body, content_type="application/json")
        model = body.get("model") or path.rsplit("/", 1)[-1].split(":")[0]
        return web.Response(body=orjson.dumps(_reply_body(self.protocol, action, model)),
                            content_type="application/json")

    async def __aenter__(self) -> FakeLLMServer:
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._closing is not None and self._runner is not None
        self._closing.set()
        await self._runner.cleanup()
