"""Any OpenAI-compatible server (``vllm serve``, Ollama, llama.cpp, hosted APIs) as a generator.

One long-lived ``httpx.AsyncClient`` per backend, bounded concurrency, per-request timeouts and
the LLM clients' retry policy (``services/llm/retry.py``): 408, 429 and 5xx answers, timeouts and
connection errors are retried, waiting ``Retry-After`` when the server sent it and full-jitter
exponential backoff otherwise.  Other 4xx and malformed answers fail the task at once.  A task that fails for
good becomes a :class:`GenerationError`: there are no placeholder texts.  Outcomes are counted in
``stats`` for the metrics exporter.  The API key is read from the env var named in the config and
never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from tenacity import RetryCallState

from services.core.config import GeneratorConfig, OpenAIModelConfig
from services.core.events import stable_id
from services.llm.retry import RETRY_AFTER_CAP_S, RetryPolicy, parse_retry_after, retryable_status

from .base import BatchResult, Generated, GenerationBackend, GenerationError, GenerationTask

log = logging.getLogger("autointerv.generator.openai")

# retried_5xx also counts 408: both are server-side failures of one request, not throttling
STAT_KEYS = ("ok", "retried_429", "retried_5xx", "retried_timeout", "retried_connect", "failed")


class _Retriable(Exception):
    """A failure the shared policy retries; ``kind`` names its ``retried_*`` counter."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.retry_after = retry_after


def split_tokens(total: int, texts: list[str]) -> list[int]:
    """Share a response-level token count among its choices by text length (sum preserved).

    Servers report ``usage.completion_tokens`` for all ``n`` choices together."""
    weights = [max(1, len(t)) for t in texts]
    shares = [total * w // sum(weights) for w in weights]
    shares[-1] += total - sum(shares)
    return shares


class OpenAIBackend(GenerationBackend):
    name = "openai"
    config_model = OpenAIModelConfig

    def __init__(self, model_cfg: OpenAIModelConfig, gen_cfg: GeneratorConfig, role: str, *,
                 logprobs: bool = False, backoff_base_s: float = 0.5, backoff_cap_s: float = 30.0,
                 retry_after_cap_s: float = RETRY_AFTER_CAP_S,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.cfg = model_cfg
        self.gen_cfg = gen_cfg
        self.role = role
        self.model_id = model_cfg.model
        self.logprobs = logprobs
        self.supports_logprobs = logprobs
        self.retry = RetryPolicy(model_cfg.max_retries, backoff_base_s, backoff_cap_s, retry_after_cap_s)
        self._sleep = sleep
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._client: httpx.AsyncClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._warned_ngram = False

    # ----------------------------------------------------------------- plumbing

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _ensure_client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        """Created on first use so that they bind to the loop that runs the service."""
        if self._client is None or self._sem is None:
            limits = httpx.Limits(max_connections=self.cfg.max_concurrency,
                                  max_keepalive_connections=self.cfg.max_concurrency)
            self._client = httpx.AsyncClient(base_url=self.cfg.base_url.rstrip("/") + "/",
                                             timeout=httpx.Timeout(self.cfg.timeout_s), limits=limits,
                                             headers=self._headers())
            self._sem = asyncio.Semaphore(self.cfg.max_concurrency)
        return self._client, self._sem

    async def _attempt(self, path: str, body: bytes) -> dict[str, Any]:
        client, sem = self._ensure_client()
        try:
            async with sem:
                resp = await client.post(path, content=body)
        except httpx.TimeoutException as exc:
            raise _Retriable("timeout", f"timed out after {self.cfg.timeout_s}s") from exc
        except httpx.TransportError as exc:
            raise _Retriable("connect", f"{type(exc).__name__}: {exc}") from exc
        if retryable_status(resp.status_code):
            kind = "429" if resp.status_code == 429 else "5xx"
            raise _Retriable(kind, f"HTTP {resp.status_code}", parse_retry_after(resp.headers))
        if resp.status_code >= 400:
            raise GenerationError(f"HTTP {resp.status_code} from {path}: {resp.text[:300]}")
        try:
            data = orjson.loads(resp.content)
        except orjson.JSONDecodeError as exc:
            raise GenerationError(f"malformed JSON from {path}: {resp.text[:200]!r}") from exc
        if not isinstance(data, dict):
            raise GenerationError(f"unexpected JSON from {path}: not an object")
        return data

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST under the shared retry policy; a request that fails for good is a GenerationError."""
        body = orjson.dumps(payload)
        retrying = self.retry.retrying(_Retriable, before_sleep=self._count_retry(path), sleep=self._sleep)
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(path, body)
        except _Retriable as exc:
            raise GenerationError(f"gave up after {self.cfg.max_retries + 1} attempts, last: {exc}") from exc
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _count_retry(self, path: str) -> Callable[[RetryCallState], None]:
        def hook(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            assert isinstance(exc, _Retriable)
            self.stats[f"retried_{exc.kind}"] += 1
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning("%s%s: %s, retry %d/%d in %.2fs", self.cfg.base_url, path, exc, state.attempt_number,
                        self.cfg.max_retries, delay)
        return hook

    # ----------------------------------------------------------------- requests

    def _payload(self, task: GenerationTask, n: int, seed: int) -> tuple[str, dict[str, Any]]:
        d = task.decoding
        payload: dict[str, Any] = {"model": self.cfg.model, "n": n, "max_tokens": d.max_new_tokens,
                                   "temperature": d.temperature, "top_p": d.top_p, "seed": seed}
        if d.top_k > 0:  # not in the OpenAI spec; vLLM, llama.cpp and Ollama accept it
            payload["top_k"] = d.top_k
        if d.no_repeat_ngram_size and not self._warned_ngram:
            self._warned_ngram = True
            log.warning("no_repeat_ngram_size has no OpenAI-API equivalent; ignored")
        if self.cfg.api_mode == "chat":
            payload["messages"] = [{"role": "user", "content": task.prompt}]
            if self.logprobs:
                payload["logprobs"] = True
            return "chat/completions", payload
        payload["prompt"] = task.prompt
        if self.logprobs:
            payload["logprobs"] = 0  # log-probs of the sampled tokens only
        return "completions", payload

    def _parse(self, data: dict[str, Any], path: str) -> list[tuple[str, int, dict[str, Any]]]:
        """(text, n_tokens, meta) per choice; GenerationError when malformed."""
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            raise GenerationError(f"response from {path} has no choices")
        texts: list[str] = []
        token_lps: list[list[float] | None] = []
        for c in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
            text = self._choice_text(c)
            if not isinstance(text, str):
                raise GenerationError(f"response from {path} has a choice without text: {str(c)[:200]}")
            texts.append(text)
            token_lps.append(self._choice_logprobs(c))
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        completion = usage.get("completion_tokens")
        estimated = isinstance(completion, int) and len(texts) > 1
        shares = (split_tokens(completion, texts) if isinstance(completion, int)
                  else [0] * len(texts))
        out = []
        for text, lps, share in zip(texts, token_lps, shares, strict=True):
            meta: dict[str, Any] = {}
            n_tok = share
            if lps is not None:
                n_tok = len(lps)
                meta["sum_logprob"] = float(sum(lps))
            elif estimated:
                meta["n_tokens_estimated"] = True
            out.append((text, n_tok, meta))
        return out

    def _choice_text(self, c: Any) -> Any:
        if not isinstance(c, dict):
            return None
        if self.cfg.api_mode == "chat":
            msg = c.get("message")
            return msg.get("content") if isinstance(msg, dict) else None
        return c.get("text")

    def _choice_logprobs(self, c: dict[str, Any]) -> list[float] | None:
        lp = c.get("logprobs")
        if not self.logprobs or not isinstance(lp, dict):
            return None
        if self.cfg.api_mode == "chat":
            content = lp.get("content")
            return [float(t["logprob"]) for t in content] if isinstance(content, list) else None
        values = lp.get("token_logprobs")
        return [float(v) for v in values if v is not None] if isinstance(values, list) else None

    async def _run_task(self, task: GenerationTask) -> list[Generated]:
        """All ``task.n`` samples, asking again for the rest when a server ignores ``n``."""
        got: list[Generated] = []
        for round_ in range(task.n):
            want = task.n - len(got)
            seed = task.seed if round_ == 0 else int(stable_id("round-seed", task.seed, round_)[:7], 16)
            path, payload = self._payload(task, want, seed)
            data = await self._post(path, payload)
            parsed = self._parse(data, path)
            self.stats["ok"] += 1  # a request that yielded usable choices
            for text, n_tok, meta in parsed[:want]:
                got.append(Generated(task.prompt_id, len(got), text, n_tok, {**task.meta, **meta}))
            if len(got) == task.n:
                break
        return got

    async def generate(self, tasks: list[GenerationTask]) -> BatchResult:
        results = await asyncio.gather(*(self._run_task(t) for t in tasks), return_exceptions=True)
        out = BatchResult()
        for task, res in zip(tasks, results, strict=True):
            if isinstance(res, GenerationError):
                self.stats["failed"] += 1
                out.failures.append(GenerationError(f"{self.model_id or self.cfg.base_url}: prompt "
                                                    f"{task.prompt_id}: {res}", prompt_id=task.prompt_id))
            elif isinstance(res, BaseException):
                raise res  # a bug or a cancellation, not a server outcome
            else:
                out.texts.extend(res)
        return out

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
            self._sem = None
