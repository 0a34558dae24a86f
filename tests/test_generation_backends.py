"""Real generation backends: a tiny random HF model on CPU, an OpenAI-compatible client against a
local aiohttp server speaking the protocol, and vLLM's missing-package error."""

from __future__ import annotations

import asyncio
import importlib.util
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from retry_cases import JITTER_S, RETRY_AFTER_CASES, RetryAfterCase

from services.core.config import GeneratorConfig, OpenAIModelConfig, TransformersModelConfig, VLLMModelConfig
from services.generator.backends.base import DecodingParams, GenerationTask
from services.generator.backends.openai_backend import OpenAIBackend, split_tokens
from services.generator.backends.transformers_backend import TransformersBackend, build_tiny_random_lm
from services.llm.retry import parse_retry_after

GREEDY = DecodingParams(temperature=0.0, max_new_tokens=6)
SAMPLE = DecodingParams(temperature=1.0, max_new_tokens=6, no_repeat_ngram_size=2)


def task(pid: str, prompt: str, n: int = 1, d: DecodingParams = SAMPLE, seed: int = 0) -> GenerationTask:
    return GenerationTask(prompt_id=pid, prompt=prompt, n=n, decoding=d, seed=seed)


# --------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_random_lm(tmp_path_factory.mktemp("tinylm"), layers=2, hidden=64, seed=0)


def hf(path: Path, batch_size: int = 4, **model_kw: Any) -> TransformersBackend:
    cfg = TransformersModelConfig(model=str(path), device="cpu", **model_kw)
    return TransformersBackend(cfg, GeneratorConfig(batch_size=batch_size), "base")


async def test_hf_counts_ids_and_sample_indices(tiny_lm: Path) -> None:
    b = hf(tiny_lm, batch_size=4)  # 3 + 2 + 4 rows -> several micro-batches
    res = await b.generate([task("a", "the cat sat on", 3), task("b", "hello", 2), task("c", "", 4)])
    assert not res.failures
    per_prompt: dict[str, list[int]] = {}
    for g in res.texts:
        per_prompt.setdefault(g.prompt_id, []).append(g.sample_index)
        assert isinstance(g.text, str) and 0 <= g.n_tokens <= SAMPLE.max_new_tokens
    assert {k: sorted(v) for k, v in per_prompt.items()} == {"a": [0, 1, 2], "b": [0, 1], "c": [0, 1, 2, 3]}


async def test_hf_left_padding_matches_unbatched_greedy(tiny_lm: Path) -> None:
    b = hf(tiny_lm, batch_size=8)
    short, long_ = "a dog", "a very much longer prompt that forces several pad tokens on the short one"
    alone = (await b.generate([task("s", short, d=GREEDY)])).texts
    batched = (await b.generate([task("s", short, d=GREEDY), task("l", long_, d=GREEDY)])).texts
    by_id = {g.prompt_id: g.text for g in batched}
    assert alone[0].text == by_id["s"]
    # the model does depend on its context, so a padding mistake would show up above
    assert by_id["s"] != by_id["l"]


async def test_hf_bos_decoding_and_eos_fallback(tiny_lm: Path) -> None:
    b = hf(tiny_lm)
    tok = b.tokenizer
    assert b.encode_prompt("") == [tok.bos_token_id]
    res = await b.generate([task("bos", "", 2)])
    assert len(res.texts) == 2 and not res.failures
    tok.bos_token = None  # a tokenizer without bos starts from eos
    assert b.encode_prompt("") == [tok.eos_token_id]


async def test_hf_max_new_tokens_and_stop_at_eos(tiny_lm: Path) -> None:
    b = hf(tiny_lm)
    d = DecodingParams(temperature=0.0, max_new_tokens=8)
    first = (await b.generate([task("p", "stop here please", d=d)])).texts[0]
    assert first.n_tokens == 8  # a random model essentially never emits eos by itself
    # make the 4th greedy token an eos token: generation must stop there, text excludes it
    model, tok = b._model, b.tokenizer
    assert model is not None
    ids = b.encode_prompt("stop here please")
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                             pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    k = next(i for i in range(1, len(out)) if out[i] not in out[:i])
    model.generation_config.eos_token_id = [tok.eos_token_id, out[k]]
    stopped = (await b.generate([task("p", "stop here please", d=d)])).texts[0]
    assert stopped.n_tokens == k
    assert stopped.text == tok.decode(out[:k], skip_special_tokens=True)


async def test_hf_seeds_reproducible_and_batch_independent(tiny_lm: Path) -> None:
    d = DecodingParams(temperature=1.0, max_new_tokens=6)
    target = task("t", "once upon a time", 3, d, seed=7)
    run1 = (await hf(tiny_lm, batch_size=2).generate([target])).texts
    # other prompts around it and another micro-batch size: sample i still depends on (seed, i) only
    noisy = [task("x", "something else entirely here", 2, d, seed=1), target, task("y", "", 1, d, seed=2)]
    run2 = [g for g in (await hf(tiny_lm, batch_size=5).generate(noisy)).texts if g.prompt_id == "t"]
    key = lambda g: g.sample_index  # noqa: E731
    assert [g.text for g in sorted(run1, key=key)] == [g.text for g in sorted(run2, key=key)]
    assert len({g.text for g in run1}) > 1  # samples of one task differ from each other
    other_seed = (await hf(tiny_lm).generate([task("t", "once upon a time", 3, d, seed=8)])).texts
    assert {g.text for g in other_seed} != {g.text for g in run1}


async def test_hf_chat_template(tiny_lm: Path) -> None:
    b = hf(tiny_lm, chat_template=True)
    tok = b.tokenizer
    tok.chat_template = "{% for m in messages %}[CLS] user : {{ m['content'] }} assistant :{% endfor %}"
    expected = tok("[CLS] user : hi there assistant :", add_special_tokens=False)["input_ids"]
    assert b.encode_prompt("hi there") == expected
    assert b.encode_prompt("") == [tok.bos_token_id]  # BOS decoding bypasses the template
    res = await b.generate([task("c", "hi there", 2)])
    assert len(res.texts) == 2 and not res.failures


async def test_hf_sequence_logprobs(tiny_lm: Path) -> None:
    import torch

    b = hf(tiny_lm, batch_size=3)
    texts = ["hello world", "", "a much longer sentence to force padding in the batch", "cat"]
    batched = b.sequence_logprobs(texts)
    single = [b.sequence_logprobs([t])[0] for t in texts]
    assert batched == pytest.approx(single, abs=1e-3)  # padding must not change a text's score
    assert batched[1] == 0.0 and all(v < 0 for i, v in enumerate(batched) if i != 1)
    # "cat" by hand: log p(cat | bos)
    tok, model = b.tokenizer, b._model
    assert model is not None
    cat = tok("cat", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([[tok.bos_token_id, *cat]])).logits[0]
    manual = sum(torch.log_softmax(logits[i], -1)[cat[i]].item() for i in range(len(cat)))
    assert batched[3] == pytest.approx(manual, abs=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes installed")
def test_hf_quantization_without_bitsandbytes_names_extra(tiny_lm: Path) -> None:
    with pytest.raises(RuntimeError, match=r"autointerv\[gpu\]"):
        hf(tiny_lm, quantization="4bit")


# --------------------------------------------------------------------------- vllm


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm installed")
def test_vllm_missing_names_extra() -> None:
    from services.generator.backends import make_backend

    cfg = VLLMModelConfig(model="some/model")
    with pytest.raises(RuntimeError, match=r"pip install 'autointerv\[vllm\]'"):
        make_backend(cfg, GeneratorConfig(), "base")


# --------------------------------------------------------------------------- openai-compatible


@dataclass
class FakeServer:
    """Plays a script of behaviours, one per request (the last one repeats)."""

    script: list[tuple[Any, ...]]
    url: str = ""
    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append((request.path, body, dict(request.headers)))
        step = self.script[min(len(self.requests) - 1, len(self.script) - 1)]
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await self._respond(step, request.path, body)
        finally:
            self.inflight -= 1

    async def _respond(self, step: tuple[Any, ...], path: str, body: dict[str, Any]) -> web.StreamResponse:
        kind = step[0]
        if kind == "ok":  # ("ok", n_choices or None for body["n"], delay_s)
            n = step[1] if len(step) > 1 and step[1] is not None else body["n"]
            if len(step) > 2:
                await asyncio.sleep(step[2])
            return web.json_response(completion(path, n, body))
        if kind == "status":  # ("status", code, headers)
            return web.Response(status=step[1], headers=step[2] if len(step) > 2 else None, text="nope")
        if kind == "sleep":
            await asyncio.sleep(step[1])
            return web.json_response(completion(path, body["n"], body))
        if kind == "raw":
            return web.Response(body=step[1], content_type="application/json")
        raise AssertionError(kind)


def completion(path: str, n: int, body: dict[str, Any]) -> dict[str, Any]:
    chat = path.endswith("/chat/completions")
    choices = []
    for i in range(n):
        text = f"text{i}"
        c: dict[str, Any] = {"index": i, "finish_reason": "length"}
        if chat:
            c["message"] = {"role": "assistant", "content": text}
            if body.get("logprobs"):
                c["logprobs"] = {"content": [{"token": "t", "logprob": -0.5},
                                             {"token": "u", "logprob": -1.0}]}
        else:
            c["text"] = text
            if body.get("logprobs") is not None:
                c["logprobs"] = {"token_logprobs": [-0.25, -0.25, -0.5]}
        choices.append(c)
    return {"id": "cmpl-1", "choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": 4 * n}}


@pytest.fixture()
async def server_factory() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(*script: tuple[Any, ...]) -> FakeServer:
        srv = FakeServer(list(script))
        app = web.Application()
        app.router.add_post("/v1/completions", srv.handle)
        app.router.add_post("/v1/chat/completions", srv.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        srv.url = f"http://{host}:{port}/v1"
        return srv

    yield start
    for r in runners:
        await r.cleanup()


@dataclass
class SleepRecorder:
    delays: list[float] = field(default_factory=list)

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)  # no real waiting: the test checks the delay, not the clock


def oai(srv: FakeServer, sleeper: SleepRecorder | None = None, **kw: Any) -> OpenAIBackend:
    logprobs = kw.pop("logprobs", False)
    cfg = OpenAIModelConfig(model="served-model", base_url=srv.url, **kw)
    return OpenAIBackend(cfg, GeneratorConfig(), "intervention", logprobs=logprobs,
                         backoff_base_s=0.01, sleep=sleeper or SleepRecorder())


async def test_openai_completions_success(server_factory: Callable[..., Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOINTERV_TEST_KEY", "sk-test-123")
    srv = await server_factory(("ok",))
    b = oai(srv, api_key_env="AUTOINTERV_TEST_KEY")
    d = DecodingParams(temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=12)
    res = await b.generate([task("p1", "Once", 3, d, seed=11)])
    await b.aclose()
    assert not res.failures and len(srv.requests) == 1
    path, body, headers = srv.requests[0]
    assert path == "/v1/completions"
    assert body == {"model": "served-model", "prompt": "Once", "n": 3, "max_tokens": 12, "temperature": 0.7,
                    "top_p": 0.9, "top_k": 40, "seed": 11}
    assert headers["Authorization"] == "Bearer sk-test-123"
    assert sorted((g.sample_index, g.text) for g in res.texts) == [(0, "text0"), (1, "text1"), (2, "text2")]
    assert sum(g.n_tokens for g in res.texts) == 12  # usage total shared among the 3 choices
    assert b.stats == {"ok": 1, "retried_429": 0, "retried_5xx": 0, "retried_timeout": 0,
                       "retried_connect": 0, "failed": 0}


async def test_openai_chat_mode_no_key(server_factory: Callable[..., Any]) -> None:
    srv = await server_factory(("ok",))
    b = oai(srv, api_mode="chat", api_key_env=None)
    res = await b.generate([task("p", "Hi", 1, GREEDY)])
    await b.aclose()
    path, body, headers = srv.requests[0]
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "Hi"}] and "prompt" not in body
    assert "top_k" not in body  # only sent when set
    assert "Authorization" not in headers
    assert [(g.text, g.n_tokens) for g in res.texts] == [("text0", 4)]  # single choice: exact usage


async def test_openai_429_then_success_honours_retry_after(server_factory: Callable[..., Any]) -> None:
    srv = await server_factory(("status", 429, {"Retry-After": "3"}), ("ok",))
    sleeper = SleepRecorder()
    b = oai(srv, sleeper)
    res = await b.generate([task("p", "x", 2)])
    await b.aclose()
    assert len(res.texts) == 2 and not res.failures
    assert len(srv.requests) == 2
    assert b.stats["retried_429"] == 1 and b.stats["ok"] == 1 and b.stats["failed"] == 0
    assert sleeper.delays and sleeper.delays[0] >= 3.0  # waited at least what the server asked


@pytest.mark.parametrize("case", RETRY_AFTER_CASES, ids=lambda c: c.id)
async def test_openai_retry_after_cases_of_the_shared_policy(server_factory: Callable[..., Any],
                                                             case: RetryAfterCase) -> None:
    """The same cases as the LLM client's test: one failure, one wait, then the texts."""
    srv = await server_factory(("status", case.status, case.headers()), ("ok",))
    sleeper = SleepRecorder()
    cfg = OpenAIModelConfig(model="served-model", base_url=srv.url)
    b = OpenAIBackend(cfg, GeneratorConfig(), "intervention", backoff_base_s=JITTER_S, backoff_cap_s=JITTER_S,
                      sleep=sleeper)
    res = await b.generate([task("p", "x", 2)])
    await b.aclose()
    assert len(res.texts) == 2 and not res.failures and len(srv.requests) == 2
    [wait] = sleeper.delays
    assert case.low <= wait <= case.high
    kind = "429" if case.status == 429 else "5xx"
    assert b.stats[f"retried_{kind}"] == 1 and b.stats["ok"] == 1


async def test_openai_5xx_until_failure(server_factory: Callable[..., Any]) -> None:
    srv = await server_factory(("status", 503))
    sleeper = SleepRecorder()
    b = oai(srv, sleeper, max_retries=2)
    res = await b.generate([task("p", "x", 2)])
    await b.aclose()
    assert not res.texts and len(res.failures) == 1 and res.failures[0].prompt_id == "p"
    assert len(srv.requests) == 3  # first try + 2 retries
    assert b.stats["retried_5xx"] == 2 and b.stats["failed"] == 1 and b.stats["ok"] == 0
    # full jitter: each delay lies in [0, base * 2^attempt]
    assert all(0 <= dl <= 0.01 * 2 ** i for i, dl in enumerate(sleeper.delays))


async def test_openai_timeout_is_retried_then_fails(server_factory: Callable[..., Any]) -> None:
    srv = await server_factory(("sleep", 5.0))
    b = oai(srv, max_retries=1, timeout_s=0.2)
    res = await b.generate([task("p", "x")])
    await b.aclose()
    assert len(res.failures) == 1 and "timed out" in str(res.failures[0])
    assert len(srv.requests) == 2
    assert b.stats["retried_timeout"] == 1 and b.stats["failed"] == 1


@pytest.mark.parametrize("raw", [b"{not json", b'{"choices": []}', b'{"choices": [{"index": 0}]}', b"[1]"])
async def test_openai_malformed_response_fails_at_once(server_factory: Callable[..., Any],
                                                       raw: bytes) -> None:
    srv = await server_factory(("raw", raw))
    b = oai(srv, max_retries=3)
    res = await b.generate([task("p", "x"), task("q", "y")])
    await b.aclose()
    assert not res.texts and {f.prompt_id for f in res.failures} == {"p", "q"}
    assert len(srv.requests) == 2  # one each, no retries
    assert b.stats["failed"] == 2 and b.stats["ok"] == 0


async def test_openai_other_4xx_fails_at_once(server_factory: Callable[..., Any]) -> None:
    srv = await server_factory(("status", 400))
    b = oai(srv, max_retries=3)
    res = await b.generate([task("p", "x")])
    await b.aclose()
    assert len(srv.requests) == 1 and "HTTP 400" in str(res.failures[0])
    assert b.stats == {"ok": 0, "retried_429": 0, "retried_5xx": 0, "retried_timeout": 0,
                       "retried_connect": 0, "failed": 1}


async def test_openai_server_ignoring_n_is_asked_again(server_factory: Callable[..., Any]) -> None:
    srv = await server_factory(("ok", 1))  # like Ollama: one choice whatever n says
    b = oai(srv)
    res = await b.generate([task("p", "x", 3, seed=5)])
    await b.aclose()
    assert sorted(g.sample_index for g in res.texts) == [0, 1, 2]
    assert [body["n"] for _, body, _ in srv.requests] == [3, 2, 1]
    seeds = [body["seed"] for _, body, _ in srv.requests]
    assert seeds[0] == 5 and len(set(seeds)) == 3  # fresh seeds, or the server repeats itself


async def test_openai_concurrency_is_bounded(server_factory: Callable[..., Any]) -> None:
    srv = await server_factory(("ok", None, 0.05))
    b = oai(srv, max_concurrency=2)
    res = await b.generate([task(f"p{i}", "x") for i in range(6)])
    await b.aclose()
    assert len(res.texts) == 6 and len(srv.requests) == 6
    assert srv.max_inflight <= 2


async def test_openai_logprobs(server_factory: Callable[..., Any]) -> None:
    srv = await server_factory(("ok",))
    b = oai(srv, logprobs=True)
    res = await b.generate([task("p", "x", 2)])
    await b.aclose()
    assert srv.requests[0][1]["logprobs"] == 0
    assert all(g.n_tokens == 3 and g.meta["sum_logprob"] == pytest.approx(-1.0) for g in res.texts)


def test_retry_after_and_token_split_helpers() -> None:
    assert parse_retry_after({"retry-after": "2.5"}) == 2.5
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert parse_retry_after({}) is None and parse_retry_after({"retry-after": "soon"}) is None
    shares = split_tokens(10, ["a", "bbb", "cccccc"])
    assert sum(shares) == 10 and shares == sorted(shares)
    assert Counter(split_tokens(7, ["x"])) == Counter([7])


def test_seeded_sampler_draws_from_the_warped_distribution() -> None:
    import torch

    from services.generator.backends.transformers_backend import sampling_processors

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = 4000
    scores = probs.log().repeat(rows, 1)
    procs = sampling_processors(DecodingParams(temperature=1.0), seeds=range(rows))
    picks = procs(torch.zeros((rows, 1), dtype=torch.long), scores).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / rows
    # binomial sd <= sqrt(0.25 / 4000) = 0.0079; 0.03 is ~4 sd, fixed seeds make it deterministic
    assert torch.allclose(freq, probs, atol=0.03)
    top2 = sampling_processors(DecodingParams(temperature=1.0, top_k=2), seeds=range(200))
    picks = top2(torch.zeros((200, 1), dtype=torch.long), probs.log().repeat(200, 1)).argmax(-1)
    assert set(picks.tolist()) == {2, 3}  # top-k runs before the draw
