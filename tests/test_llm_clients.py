"""LLM clients against scripted local servers for each wire protocol, plus a real Redis.

Every protocol test counts the server's requests, so the number of attempts is asserted exactly.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from llm_fake_server import FakeLLMServer, Hang, Raw, Reply, Seen, Status
from retry_cases import JITTER_S, RETRY_AFTER_CASES, RetryAfterCase
from tenacity import RetryCallState

from services.core.config import LLMConfig
from services.core.infra import free_port
from services.llm import (
    BadResponse,
    BudgetExceeded,
    InProcessBudget,
    LLMClient,
    LLMError,
    LLMResponse,
    MissingAPIKey,
    ParseError,
    RateLimited,
    RedisBudget,
    RequestRejected,
    ServerError,
    Timeout,
    make_budget,
    make_llm_client,
    parse_json_array,
    parse_json_object,
    parse_score,
)
from services.llm.budget import Spend
from services.llm.client import REASK_SUFFIX
from services.llm.contract import MESSAGE_OVERHEAD_TOKENS
from services.llm.prompts import (
    contrastive_label_prompt,
    generative_prompt,
    ground_truth_prompt,
    score_text_prompt,
)
from services.llm.providers import PROVIDERS, resolve_api_key
from services.llm.ratelimit import TokenBucket
from services.llm.retry import RETRY_AFTER_CAP_S, RetryPolicy, parse_retry_after

PROTOCOLS = ["openai", "anthropic", "gemini"]
MODELS = {"openai": "gpt-test", "anthropic": "claude-test", "gemini": "gemini-test"}
KEY_ENV = "AUTOINTERV_TEST_LLM_KEY"
SECRET = "sk-test-SECRET-5f1e2d3c4b5a"
KEY_HEADER = {"openai": ("authorization", f"Bearer {SECRET}"), "anthropic": ("x-api-key", SECRET),
              "gemini": ("x-goog-api-key", SECRET)}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_call(self, provider: str, model: str, outcome: str, input_tokens: int, output_tokens: int,
                cost: float, latency: float) -> None:
        self.calls.append((provider, model, outcome, input_tokens, output_tokens, cost))

    def outcomes(self) -> list[str]:
        return [c[2] for c in self.calls]


def make_cfg(protocol: str, base_url: str, **overrides: Any) -> LLMConfig:
    fields: dict[str, Any] = dict(provider=protocol, model=MODELS[protocol], base_url=base_url,
                                  api_key_env=KEY_ENV, max_retries=2, backoff_base_s=0.001,
                                  backoff_max_s=0.005, timeout_s=5.0, requests_per_s=1000.0,
                                  usd_per_1k_input=0.5, usd_per_1k_output=1.5, max_output_tokens=64)
    fields.update(overrides)
    return LLMConfig(**fields)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


@pytest.fixture()
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


Harness = Callable[..., Any]


@pytest.fixture()
async def harness() -> AsyncIterator[Harness]:
    """``await harness(protocol, script, **cfg_overrides)`` -> (server, client); both closed after."""
    opened: list[tuple[FakeLLMServer, LLMClient]] = []

    async def start(protocol: str, script: Any = (Reply(),), *, hold: int | None = None,
                    expected: int | None = None, redis: Any = None, namespace: str = "ai",
                    budget: Any = None, recorder: Any = None,
                    **overrides: Any) -> tuple[FakeLLMServer, LLMClient]:
        server = await FakeLLMServer(protocol, script, hold_until_in_flight=hold,
                                     expected_requests=expected).__aenter__()  # type: ignore[arg-type]
        client = make_llm_client(make_cfg(protocol, server.base_url, **overrides), redis=redis,
                                 namespace=namespace, budget=budget, recorder=recorder)
        opened.append((server, client))
        return server, client

    yield start
    for server, client in opened:
        await client.aclose()
        await server.__aexit__(None, None, None)


def assert_no_secret(caplog: pytest.LogCaptureFixture, *objects: object) -> None:
    """The key appears in no log record, no rendered traceback (whole chain) and no repr."""
    for record in caplog.records:
        assert SECRET not in logging.Formatter().format(record)
    for obj in objects:
        assert SECRET not in str(obj) and SECRET not in repr(obj)
        if isinstance(obj, BaseException):
            assert SECRET not in "".join(traceback.format_exception(obj))


# --------------------------------------------------------------------------- protocol behaviour


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_success_sends_protocol_and_prices_usage(protocol: str, harness: Harness) -> None:
    rec = Recorder()
    server, client = await harness(protocol, [Reply("Answer.", input_tokens=40, output_tokens=10)],
                                   recorder=rec, temperature=0.3)
    resp = await client.complete("What differs?", system="Be terse.", max_output_tokens=32)
    assert resp.text == "Answer." and not resp.cached
    assert (resp.input_tokens, resp.output_tokens) == (40, 10)
    assert resp.cost_usd == pytest.approx((40 * 0.5 + 10 * 1.5) / 1000)
    assert len(server.requests) == 1
    seen = server.requests[0]
    assert (seen.prompt, seen.system) == ("What differs?", "Be terse.")
    header, value = KEY_HEADER[protocol]
    assert seen.headers[header] == value
    if protocol == "openai":
        assert seen.path == "/v1/chat/completions"
        assert (seen.body["model"], seen.body["max_tokens"], seen.body["temperature"]) == \
            ("gpt-test", 32, 0.3)
    elif protocol == "anthropic":
        assert seen.path == "/v1/messages" and seen.headers["anthropic-version"] == "2023-06-01"
        assert (seen.body["model"], seen.body["max_tokens"], seen.body["temperature"]) == \
            ("claude-test", 32, 0.3)
    else:
        assert seen.path.endswith("/models/gemini-test:generateContent")
        gen = seen.body["generationConfig"]
        assert (gen["maxOutputTokens"], gen["temperature"]) == (32, 0.3)
    assert rec.outcomes() == ["ok"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_429_with_retry_after_then_success(protocol: str, harness: Harness) -> None:
    rec = Recorder()
    # A base of 1000 s would make the test hang if Retry-After: 0 were not honoured.
    server, client = await harness(protocol, [Status(429, headers={"Retry-After": "0"}), Reply("fine")],
                                   recorder=rec, backoff_base_s=1000.0, backoff_max_s=1000.0)
    resp = await client.complete("hello")
    assert resp.text == "fine"
    assert len(server.requests) == 2
    assert rec.outcomes() == ["retry", "ok"]


@pytest.mark.parametrize("case", RETRY_AFTER_CASES, ids=lambda c: c.id)
async def test_retry_after_cases_of_the_shared_policy(case: RetryAfterCase) -> None:
    """The same cases as the generation backend's test: one failure, one wait, then the answer."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)  # recorded, not slept: the test checks the wait, not the clock

    async with FakeLLMServer("openai", [Status(case.status, headers=case.headers()), Reply("fine")]) as server:
        cfg = make_cfg("openai", server.base_url, backoff_base_s=JITTER_S, backoff_max_s=JITTER_S)
        async with LLMClient(PROVIDERS["openai"](cfg), cfg, sleep=sleep) as client:
            assert (await client.complete("hello")).text == "fine"
        assert len(server.requests) == 2
    [wait] = waits
    assert case.low <= wait <= case.high


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_repeated_500_raises_server_error_after_retries(protocol: str, harness: Harness) -> None:
    rec = Recorder()
    server, client = await harness(protocol, [Status(500)], recorder=rec, max_retries=3)
    with pytest.raises(ServerError) as info:
        await client.complete("hello")
    assert len(server.requests) == 4 and info.value.attempts == 4 and info.value.status == 500
    assert rec.outcomes() == ["retry"] * 3 + ["server_error"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_slow_server_times_out_after_retries(protocol: str, harness: Harness) -> None:
    server, client = await harness(protocol, [Hang(5.0)], timeout_s=0.2, max_retries=1)
    with pytest.raises(Timeout) as info:
        await client.complete("hello")
    assert len(server.requests) == 2 and info.value.attempts == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("body", [b"<html>not json</html>", b'{"unexpected": true}', b"[1, 2]"],
                         ids=["not-json", "missing-fields", "not-object"])
async def test_malformed_output_is_bad_response_without_retry(protocol: str, body: bytes,
                                                              harness: Harness) -> None:
    rec = Recorder()
    server, client = await harness(protocol, [Raw(body)], recorder=rec)
    with pytest.raises(BadResponse):
        await client.complete("hello")
    assert len(server.requests) == 1
    assert rec.outcomes() == ["bad_response"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_other_4xx_fails_at_once_and_never_shows_the_key(protocol: str, harness: Harness,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f'{{"error": {{"message": "invalid key {SECRET}"}}}}'
    server, client = await harness(protocol, [Status(401, body=echo)])
    with pytest.raises(RequestRejected) as info:
        await client.complete("hello")
    assert len(server.requests) == 1 and info.value.status == 401
    assert "***" in str(info.value)  # the echoed key was scrubbed, the rest kept
    assert_no_secret(caplog, info.value, client, client.provider)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_error_paths_never_leak_the_key(protocol: str, harness: Harness,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []
    for script, overrides in (([Status(500)], {}), ([Status(429, headers={"Retry-After": "0"})], {}),
                              ([Hang(5.0)], {"timeout_s": 0.2, "max_retries": 0}), ([Raw(b"{")], {})):
        _, client = await harness(protocol, script, **overrides)
        with pytest.raises(LLMError) as info:
            await client.complete("hello")
        errors.append(info.value)
    assert [type(e) for e in errors] == [ServerError, RateLimited, Timeout, BadResponse]
    assert any(r.name == "autointerv.llm" for r in caplog.records)  # retries were logged...
    assert_no_secret(caplog, *errors)  # ...without the key


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unparsable_score_reasks_once_then_raises(protocol: str, harness: Harness) -> None:
    rec = Recorder()
    server, client = await harness(protocol, [Reply("I would rather not say.")], recorder=rec)
    with pytest.raises(ParseError):
        await client.complete_parsed(score_text_prompt("uses more emoji", "hi :)"), parse_score)
    assert len(server.requests) == 2
    assert server.requests[1].prompt.endswith(REASK_SUFFIX)
    assert rec.outcomes() == ["ok", "ok", "parse_error"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_reask_recovers_a_score(protocol: str, harness: Harness) -> None:
    server, client = await harness(protocol, [Reply("maybe 60 or 70"), Reply("Score: 70/100", 9, 2)])
    value, resp = await client.complete_parsed_with_response("rate it", parse_score)
    assert value == pytest.approx(0.70) and (resp.input_tokens, resp.output_tokens) == (9, 2)
    assert len(server.requests) == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_budget_exhaustion_blocks_before_any_request(protocol: str, harness: Harness) -> None:
    rec = Recorder()
    budget = InProcessBudget(limit_usd=0.01)
    # worst case: 64 output tokens at $1.5/1k = $0.096 > $0.01
    server, client = await harness(protocol, [Reply()], budget=budget, recorder=rec)
    with pytest.raises(BudgetExceeded):
        await client.complete("hello")
    assert len(server.requests) == 0
    assert rec.outcomes() == ["budget_exceeded"]
    assert await budget.spent() == 0 and await budget.reserved() == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_identical_call_is_served_from_redis(protocol: str, harness: Harness, redis_client: Any,
                                                   unique: str) -> None:
    rec = Recorder()
    server, client = await harness(protocol, [Reply("cached answer", 20, 4)], redis=redis_client,
                                   namespace=unique, recorder=rec)
    first = await client.complete("same prompt", system="sys")
    second = await client.complete("same prompt", system="sys")
    assert not first.cached and first.cost_usd > 0
    assert second.cached and second.cost_usd == 0.0
    assert (second.text, second.input_tokens, second.output_tokens) == ("cached answer", 20, 4)
    assert len(server.requests) == 1
    assert rec.outcomes() == ["ok", "cached"]
    keys = [k.decode() async for k in redis_client.scan_iter(f"{unique}:llm:v1:*")]
    assert len(keys) == 1
    # a different temperature is a different call
    await client.complete("same prompt", system="sys", temperature=0.9)
    assert len(server.requests) == 2


# --------------------------------------------------------------------------- client-level behaviour


async def test_cache_is_shared_between_clients_and_bypassable(harness: Harness, redis_client: Any,
                                                              unique: str) -> None:
    server, a = await harness("openai", [Reply("x")], redis=redis_client, namespace=unique)
    b = make_llm_client(make_cfg("openai", server.base_url), redis=redis_client, namespace=unique)
    try:
        await a.complete("p")
        assert (await b.complete("p")).cached
        assert not (await b.complete("p", cache=False)).cached  # e.g. sampling again at T > 0
    finally:
        await b.aclose()
    assert len(server.requests) == 2


async def test_unparsable_answer_is_evicted_from_cache(harness: Harness, redis_client: Any,
                                                       unique: str) -> None:
    server, client = await harness("openai", [Reply("no idea")], redis=redis_client, namespace=unique)
    with pytest.raises(ParseError):
        await client.complete_parsed("rate it", parse_score)
    assert [k async for k in redis_client.scan_iter(f"{unique}:llm:v1:*")] == []
    with pytest.raises(ParseError):
        await client.complete_parsed("rate it", parse_score)
    assert len(server.requests) == 4  # nothing unreadable was served from the cache


async def test_cache_degrades_to_no_cache_when_redis_is_down(harness: Harness,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="autointerv.llm")
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        server, client = await harness("openai", [Reply("still works")], redis=dead, namespace="x")
        for _ in range(3):
            resp = await client.complete("p")
            assert resp.text == "still works" and not resp.cached
    finally:
        await dead.aclose()
    assert len(server.requests) == 3
    warnings = [r for r in caplog.records if "cache unavailable" in r.getMessage()]
    assert len(warnings) == 1


async def test_budget_settles_to_real_cost(harness: Harness) -> None:
    budget = InProcessBudget(limit_usd=1.0)
    _, client = await harness("openai", [Reply("a", input_tokens=100, output_tokens=20)], budget=budget)
    resp = await client.complete("hello")
    assert resp.cost_usd == pytest.approx((100 * 0.5 + 20 * 1.5) / 1000)
    assert await budget.spent() == pytest.approx(resp.cost_usd)
    assert await budget.reserved() == pytest.approx(0.0, abs=1e-12)
    assert await budget.remaining() == pytest.approx(1.0 - resp.cost_usd)


async def test_failed_calls_cost_nothing_but_timeouts_keep_their_reservation(harness: Harness) -> None:
    budget = InProcessBudget(limit_usd=1.0)
    _, rejected = await harness("openai", [Status(400)], budget=budget)
    with pytest.raises(RequestRejected):
        await rejected.complete("hello")
    assert await budget.spent() == 0.0
    _, slow = await harness("openai", [Hang(5.0)], budget=budget, timeout_s=0.2, max_retries=0)
    with pytest.raises(Timeout):
        await slow.complete("hello")
    # the hold: 5 bytes of prompt + the chat overhead in, 64 out
    assert await budget.spent() == pytest.approx(((5 + MESSAGE_OVERHEAD_TOKENS) * 0.5 + 64 * 1.5) / 1000)
    assert await budget.reserved() == pytest.approx(0.0, abs=1e-12)


async def test_redis_budget_is_shared_by_replicas(harness: Harness, redis_client: Any, unique: str) -> None:
    # Worst case of one call: 5 + 32 input tokens, 64 output -> $0.1145; the limit admits one.
    # The first replica's usage ($0.25 + $0.15 = $0.40, more than an honest server could bill for
    # "hello") leaves too little for the second.
    limit = 0.45
    replica_a = make_budget(limit, redis=redis_client, namespace=unique, experiment_id="exp")
    replica_b = make_budget(limit, redis=redis_client, namespace=unique, experiment_id="exp")
    assert isinstance(replica_a, RedisBudget)
    server, a = await harness("openai", [Reply("a", input_tokens=500, output_tokens=100)], budget=replica_a)
    b = make_llm_client(make_cfg("openai", server.base_url), budget=replica_b)
    try:
        await a.complete("hello")
        with pytest.raises(BudgetExceeded):
            await b.complete("hello")
    finally:
        await b.aclose()
    assert len(server.requests) == 1
    assert await replica_b.spent() == pytest.approx(0.40)
    assert await replica_b.remaining() == pytest.approx(0.05)
    assert await redis_client.exists(f"{unique}:budget:exp")


async def test_concurrent_replicas_never_exceed_the_budget_and_tally_what_it_charged(
        redis_client: Any, unique: str) -> None:
    """Three replicas with one Redis budget fire 36 calls at once, then call one at a time until
    refused.  The server parks requests until 8 are in flight, so holds overlap.  Whatever the
    interleaving, the spend stays within the limit, every call is either sent or refused, and the
    replicas' tallies add up to what the budget charged."""
    limit, n_calls, replicas = 1.0, 36, 3
    # each call holds (5 + 32) * 0.5 / 1000 + 64 * 1.5 / 1000 = $0.1145 and really costs
    # (37 * 0.5 + 60 * 1.5) / 1000 = $0.1085: the limit admits 8 holds at once and 9 calls in all
    # (8 * 0.1085 + 0.1145 <= 1 < 9 * 0.1085 + 0.1145)
    async with FakeLLMServer("openai", [Reply("ok", input_tokens=5 + MESSAGE_OVERHEAD_TOKENS, output_tokens=60)],
                             hold_until_in_flight=8, expected_requests=8) as server:
        clients = [make_llm_client(make_cfg("openai", server.base_url, max_concurrency=16),
                                   budget=make_budget(limit, redis=redis_client, namespace=unique,
                                                      experiment_id="exp")) for _ in range(replicas)]
        spends = [Spend() for _ in range(replicas)]

        async def call(i: int) -> bool:
            try:
                await clients[i % replicas].complete("hello", spend=spends[i % replicas])
                return True
            except BudgetExceeded:
                return False

        try:
            sent = list(await asyncio.gather(*(call(i) for i in range(n_calls))))
            sent.append(await call(len(sent)))  # the rest of the budget, one call at a time,
            while sent[-1]:  # until one is refused
                sent.append(await call(len(sent)))
        finally:
            for c in clients:
                await c.aclose()
        assert server.max_in_flight == 8  # eight holds overlapped; a ninth never fitted beside them
    budget = make_budget(limit, redis=redis_client, namespace=unique, experiment_id="exp")
    spent = await budget.spent()
    assert spent == pytest.approx(9 * (37 * 0.5 + 60 * 1.5) / 1000) and spent <= limit
    assert await budget.reserved() == pytest.approx(0.0, abs=1e-9)
    assert sum(sent) == len(server.requests) == sum(s.calls for s in spends) == 9
    assert sum(s.refused for s in spends) == len(sent) - 9
    assert sum(s.cost_usd for s in spends) == pytest.approx(spent)


async def test_redis_budget_reservations_are_atomic(redis_client: Any, unique: str) -> None:
    replicas = [RedisBudget(redis_client, unique, experiment_id="exp", limit_usd=1.0) for _ in range(4)]

    async def try_reserve(i: int) -> bool:
        try:
            await replicas[i % 4].reserve(0.1)
            return True
        except BudgetExceeded:
            return False

    granted = await asyncio.gather(*(try_reserve(i) for i in range(25)))
    assert sum(granted) == 10
    for _ in range(10):
        await replicas[0].settle(0.1, 0.05)
    assert await replicas[1].spent() == pytest.approx(0.5)
    assert await replicas[2].reserved() == pytest.approx(0.0, abs=1e-9)
    assert await replicas[3].remaining() == pytest.approx(0.5)


async def test_zero_budget_still_allows_free_local_models(harness: Harness) -> None:
    budget = InProcessBudget(limit_usd=0.0)  # experiment.budget_usd = 0: no *paid* calls
    server, client = await harness("openai", [Reply("free")], budget=budget, usd_per_1k_input=0.0,
                                   usd_per_1k_output=0.0)
    assert (await client.complete("hi")).text == "free"
    assert len(server.requests) == 1


async def test_complete_many_is_bounded_and_keeps_order(harness: Harness) -> None:
    def script(seen: Seen) -> Reply | Status:
        return Status(400) if seen.prompt == "p3" else Reply(f"answer to {seen.prompt}")

    server, client = await harness("openai", script, hold=2, expected=6, max_concurrency=2)
    results = await client.complete_many([f"p{i}" for i in range(6)])
    assert isinstance(results[3], RequestRejected)
    assert [r.text for i, r in enumerate(results) if i != 3 and isinstance(r, LLMResponse)] == \
        [f"answer to p{i}" for i in (0, 1, 2, 4, 5)]
    assert len(server.requests) == 6
    assert server.max_in_flight == 2  # the server parks requests until 2 are in flight; never 3


async def test_complete_many_parsed(harness: Harness) -> None:
    def script(seen: Seen) -> Reply:
        return Reply("unsure") if "bad" in seen.prompt else Reply(f"Score: {len(seen.prompt) * 10}")

    server, client = await harness("anthropic", script)
    results = await client.complete_many_parsed(["a", "bbbbb", "bad"], parse_score)
    assert results[:2] == [pytest.approx(0.1), pytest.approx(0.5)]
    assert isinstance(results[2], ParseError)
    assert len(server.requests) == 4  # one re-ask for the unparsable one


async def test_recorder_failure_does_not_break_calls(harness: Harness) -> None:
    class Broken:
        def on_call(self, *args: Any) -> None:
            raise RuntimeError("metrics backend down")

    _, client = await harness("openai", [Reply("fine")], recorder=Broken())
    assert (await client.complete("hi")).text == "fine"


# --------------------------------------------------------------------------- keys


def test_key_from_file_env_and_masked_repr(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    monkeypatch.setenv(f"{KEY_ENV}_FILE", str(key_file))
    key = resolve_api_key(make_cfg("anthropic", "http://127.0.0.1:1"))
    assert key is not None and key.reveal() == SECRET
    assert SECRET not in repr(key) and SECRET not in str(key)


def test_default_key_envs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GEMINI_API_KEY", "GEMINI_API_KEY_FILE", "GOOGLE_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOOGLE_API_KEY", "g-key")
    key = resolve_api_key(LLMConfig(provider="gemini", model="m"))
    assert key is not None and key.reveal() == "g-key"


def test_hosted_providers_require_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(MissingAPIKey) as info:
        make_llm_client(make_cfg("anthropic", "http://127.0.0.1:1"))
    assert KEY_ENV in str(info.value)


async def test_openai_compatible_server_needs_no_key(monkeypatch: pytest.MonkeyPatch,
                                                     harness: Harness) -> None:
    monkeypatch.delenv(KEY_ENV)
    server, client = await harness("openai", [Reply("local")])
    assert (await client.complete("hi")).text == "local"
    assert "authorization" not in server.requests[0].headers


# --------------------------------------------------------------------------- retry and rate-limit units


def test_backoff_honours_retry_after_and_full_jitter_window() -> None:
    backoff = RetryPolicy(max_retries=4, backoff_base_s=1.0, backoff_max_s=8.0).wait()

    def state(attempt: int, exc: BaseException) -> RetryCallState:
        s = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        s.attempt_number = attempt
        s.set_exception((type(exc), exc, None))
        return s

    assert backoff(state(1, RateLimited("x", retry_after=2.5))) == 2.5
    assert backoff(state(1, RateLimited("x", retry_after=10_000))) == RETRY_AFTER_CAP_S  # capped
    waits = [backoff(state(3, ServerError("x"))) for _ in range(200)]
    assert all(0.0 <= w <= 4.0 for w in waits)  # window at attempt 3: base * 2**2
    assert max(waits) > 1.0  # full jitter spreads over the window (P(all 200 <= 1) = 0.25**200)
    assert all(0.0 <= backoff(state(10, ServerError("x"))) <= 8.0 for _ in range(50))


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))
    assert 100 < (parse_retry_after({"retry-after": future}) or 0) <= 120
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


async def test_token_bucket_refill_arithmetic() -> None:
    now = [0.0]
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(rate=4.0, capacity=2.0, clock=lambda: now[0], sleep=fake_sleep)
    await bucket.acquire()
    await bucket.acquire()
    assert sleeps == []  # the burst capacity is free
    await bucket.acquire()
    assert sleeps == [pytest.approx(0.25)]  # one token refills in 1/rate s
    now[0] += 10.0
    for _ in range(2):
        await bucket.acquire()
    assert len(sleeps) == 1  # refilled to capacity, not beyond
    await bucket.acquire()
    assert len(sleeps) == 2


# --------------------------------------------------------------------------- parsing and prompts


@pytest.mark.parametrize(("text", "expected"), [
    ("73", 0.73), ("Score: 73", 0.73), ("73/100", 0.73), ("73 out of 100", 0.73), ("**Score:** 8", 0.08),
    ('{"score": 55}', 0.55), ('```json\n{"score": 41.5}\n```', 0.415), ("I'd say 90.", 0.90),
    ("Score: 20. Final answer: 20", 0.20), ("0", 0.0), ("100", 1.0),
])
def test_parse_score_accepts(text: str, expected: float) -> None:
    assert parse_score(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "no idea", "between 60 and 70", "150", "-3",
                                  "Score: 40, or 80/100? 30/100"])
def test_parse_score_rejects(text: str) -> None:
    with pytest.raises(ParseError):
        parse_score(text)


def test_parse_error_is_an_llm_error() -> None:
    # callers that catch LLMError (e.g. around complete_parsed) also catch parse failures
    assert issubclass(ParseError, LLMError) and issubclass(ParseError, ValueError)


def test_parse_json_helpers() -> None:
    assert parse_json_array('Here you go:\n```json\n["a", "b c"]\n```') == ["a", "b c"]
    assert parse_json_array('["x"]') == ["x"]
    assert parse_json_object('Sure. {"score": 3, "why": "x"} Hope it helps') == {"score": 3, "why": "x"}
    for bad, fn in (("[1, 2]", parse_json_array), ("nothing", parse_json_array), ("[]", parse_json_object),
                    ('{"a": ', parse_json_object)):
        with pytest.raises(ParseError):
            fn(bad)


def test_prompts_carry_their_inputs() -> None:
    first = contrastive_label_prompt(["A one", "A two"], ["B one"], [])
    assert all(t in first for t in ("A one", "A two", "B one", "100 words"))
    assert "already been described" not in first
    diverse = contrastive_label_prompt(["A"], ["B"], ["talks about cats", "uses lists"])
    assert "already been described" in diverse and "- talks about cats" in diverse
    assert "x" * 800 not in contrastive_label_prompt(["x" * 5000], ["y"], [])  # long texts are clipped
    score = score_text_prompt("mentions the weather", "It is sunny.")
    assert "mentions the weather" in score and "It is sunny." in score and "0 to 100" in score
    gen1, gen2 = generative_prompt("is rude", 1, 5), generative_prompt("is rude", 2, 5)
    assert "JSON array of exactly 5" in gen1 and "does NOT" in gen2 and "does NOT" not in gen1
    with pytest.raises(ValueError):
        generative_prompt("is rude", 3, 5)  # type: ignore[arg-type]
    gt = ground_truth_prompt("praises cats", "likes felines")
    assert "praises cats" in gt and "likes felines" in gt and '{"score"' in gt
