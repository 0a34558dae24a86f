"""The generative validation tier on two tiny local LMs and a fake OpenAI-compatible server.

Base and intervention are offline tiny random Llama models (``build_tiny_random_lm``).  For the
meaningful check the intervention model is the base model fine-tuned a few steps on sentences
containing "lighthouse", so it prefers that token: a hypothesis "the intervention model talks
about lighthouses", whose side-1 texts (written by the fake LLM) contain the word and side-2 texts
do not, must get a high AUC, and the same claim made about the base model a low one.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import torch
from llm_fake_server import FakeLLMServer, Reply, Seen
from service_helpers import CapturingValidator, offline_context, running
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.core.config import (
    BUILTIN_BACKEND_CONFIGS,
    Config,
    ConfigError,
    GenerativeTierConfig,
    LLMConfig,
    load_config,
)
from services.core.events import Hypothesis, Validation
from services.core.runtime import Incoming
from services.generator.backends.transformers_backend import build_tiny_random_lm
from services.llm import Budget, InProcessBudget
from services.llm.client import REASK_SUFFIX
from services.llm.factory import make_llm_client
from services.stats.auc import auc_test
from services.validator.generative import GenerativeTier, build_generative_tier

N = 20  # texts per side asked of the LLM
WORD = "lighthouse"  # one WordPiece token in the tiny models' vocabulary
SUBJECTS = ["keeper", "sailor", "painter", "child", "tourist", "fisherman", "poet", "guard", "pilot", "baker"]
PLACES = ["harbour", "cliff"]
SIDE1 = [f"The {s} walked to the {WORD} by the {p}." for s in SUBJECTS for p in PLACES]
SIDE2 = [f"The {s} walked to the old house by the {p}." for s in SUBJECTS for p in PLACES]
PRICES = {"usd_per_1k_input": 1.0, "usd_per_1k_output": 2.0}
CALL_COST = (12 * 1.0 + 3 * 2.0) / 1000  # the fake server's default usage: 12 input, 3 output tokens


def fine_tune_on_word(base: Path, out: Path, word: str, steps: int = 10) -> Path:
    """The base model after a few Adam steps on sentences containing ``word`` in other contexts.

    The training contexts share no word with SIDE1/SIDE2 except ``word``, so what separates the
    two sides in the test is the learnt preference for ``word``, not the test sentences' wording."""
    torch.manual_seed(0)
    rng = random.Random(0)
    context = ["river", "stone", "morning", "quiet", "signal", "window", "garden", "winter"]
    texts = [" ".join([*rng.sample(context, 3), word, *rng.sample(context, 2)]) for _ in range(32)]
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-lms")
    base = build_tiny_random_lm(root / "base", seed=0)
    return {"base": base, "other": build_tiny_random_lm(root / "other", seed=1),
            "tuned": fine_tune_on_word(base, root / "tuned", WORD)}


def side_of(seen: Seen) -> int:
    """Which side a generative prompt asks for (see ``services.llm.prompts.generative_prompt``)."""
    if "typical of model 1" in seen.prompt:
        return 1
    assert "typical of model 2" in seen.prompt, seen.prompt
    return 2


def json_texts(texts: list[Any]) -> Reply:
    return Reply(orjson.dumps(texts).decode())


def fake_llm(seen: Seen) -> Reply:
    return json_texts(SIDE1 if side_of(seen) == 1 else SIDE2)


@pytest.fixture()
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer("openai", fake_llm) as srv:
        yield srv


def llm_section(srv: FakeLLMServer) -> dict[str, Any]:
    return {"provider": "openai", "model": "gpt-test", "base_url": srv.base_url,
            "api_key_env": "AUTOINTERV_TEST_NO_SUCH_KEY", "requests_per_s": 1000.0, "max_retries": 0,
            **PRICES}


def config(models: dict[str, Path], srv: FakeLLMServer, unique: str, *, base: str = "base",
           intervention: str = "tuned", **sections: Any) -> Config:
    def model(name: str) -> dict[str, Any]:
        return {"backend": "transformers", "model": str(models[name]), "device": "cpu"}

    over: dict[str, Any] = {
        "experiment": {"id": f"gen-{unique}", "budget_usd": 10.0},
        "cache": {"namespace": f"t{unique}"},
        "models": {"base": model(base), "intervention": model(intervention)},
        "validator": {"tiers": [{"name": "gen", "kind": "generative", "generative_texts": N,
                                 "llm": llm_section(srv)}]},
    }
    over.update(sections)
    return load_config(None, environ={}, overrides=over)


def hypothesis(direction: str = "intervention", hid: str = "h1") -> Hypothesis:
    return Hypothesis(experiment_id="gen-test", hypothesis_id=hid, candidate_id="c1", cluster_id=0,
                      direction=direction, text=f"The {direction} model often mentions a {WORD}.",  # type: ignore[arg-type]
                      kind="contrastive", labeler="test", keywords=[WORD], label_text_ids=[], holdout_texts=[])


async def make_tier(cfg: Config, redis: aioredis.Redis | None = None, budget: Budget | None = None) -> GenerativeTier:
    def client(llm: LLMConfig):
        return make_llm_client(llm, redis=redis, namespace=cfg.cache.namespace, budget=budget)

    return await build_generative_tier(cfg, cfg.validator.tiers[0], client)


def reference_ratios(tier: GenerativeTier, texts: list[str]) -> list[float]:
    """(logp_intervention - logp_base) / tokens, computed here from the backends' own outputs."""
    lp_i = tier.intervention.sequence_logprobs(texts)
    lp_b = tier.base.sequence_logprobs(texts)
    n = [len(tier.base.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return [(i - b) / k for i, b, k in zip(lp_i, lp_b, n, strict=True)]


async def test_scores_every_parsed_text_counts_calls_and_uses_the_cache(
        tiny_models: dict[str, Path], redis_url: str, unique: str) -> None:
    side1 = [*SIDE1[:18], SIDE1[0], "   "]  # a duplicate and a blank: 18 usable of the 20 asked for

    def script(seen: Seen) -> Reply:
        return json_texts(side1 if side_of(seen) == 1 else SIDE2)

    redis = aioredis.Redis.from_url(redis_url)
    async with FakeLLMServer("openai", script) as srv:
        tier = await make_tier(config(tiny_models, srv, unique, intervention="other"), redis)
        try:
            s = await tier.score(hypothesis(), [], [])
            again = await tier.score(hypothesis(), [], [])
        finally:
            await tier.aclose()
            await redis.aclose()
        assert len(srv.requests) == 2  # one per side; the repeat came from the Redis cache
    assert sorted(side_of(r) for r in srv.requests) == [1, 2]
    assert all(f"Write {N} short" in r.prompt and r.body["max_tokens"] >= N * 50 for r in srv.requests)
    assert (len(s.pos), len(s.neg)) == (18, N)
    assert s.dropped == 2 and s.notes["generation_failures"] == 0.0
    assert s.calls == 2 and s.cost_usd == pytest.approx(2 * CALL_COST)
    # the score is the per-token likelihood ratio; tolerance: float32 batching noise only
    assert s.pos == pytest.approx(reference_ratios(tier, SIDE1[:18]), abs=1e-4)
    assert s.neg == pytest.approx(reference_ratios(tier, SIDE2), abs=1e-4)
    assert (again.pos, again.neg) == (s.pos, s.neg)
    assert again.calls == 0 and again.cost_usd == 0.0


@pytest.mark.parametrize("bad", ["Sure! Here are some texts: a lighthouse, a harbour.", "[1, 2, 3]"],
                         ids=["prose", "non-strings"])
async def test_malformed_arrays_are_counted_not_replaced(tiny_models: dict[str, Path], unique: str,
                                                         bad: str) -> None:
    def script(seen: Seen) -> Reply:
        return json_texts(SIDE1) if side_of(seen) == 1 else Reply(bad)

    async with FakeLLMServer("openai", script) as srv:
        tier = await make_tier(config(tiny_models, srv, unique))
        try:
            s = await tier.score(hypothesis(), [], [])
        finally:
            await tier.aclose()
        assert [side_of(r) for r in srv.requests].count(2) == 2  # the answer, then one re-ask
    assert len(s.pos) == N and s.neg == []  # no placeholder texts or scores for the failed side
    assert s.dropped == N and s.notes["generation_failures"] == 1.0
    # every request is a call and was paid for: side 1, side 2's unreadable answer and its re-ask
    assert s.calls == len(srv.requests) == 3 and s.cost_usd == pytest.approx(3 * CALL_COST)
    assert s.notes["budget_refused"] == 0.0


async def test_a_reask_that_recovers_counts_both_answers(tiny_models: dict[str, Path], unique: str) -> None:
    def script(seen: Seen) -> Reply:
        if side_of(seen) == 2 and not seen.prompt.endswith(REASK_SUFFIX):
            return Reply("Sure! Here are some texts about houses.")
        return fake_llm(seen)

    async with FakeLLMServer("openai", script) as srv:
        tier = await make_tier(config(tiny_models, srv, unique))
        try:
            s = await tier.score(hypothesis(), [], [])
        finally:
            await tier.aclose()
        assert len(srv.requests) == 3
    assert (len(s.pos), len(s.neg)) == (N, N) and s.notes["generation_failures"] == 0.0
    assert s.calls == 3 and s.cost_usd == pytest.approx(3 * CALL_COST)


async def test_budget_refusals_are_counted_apart_not_as_calls(tiny_models: dict[str, Path],
                                                              server: FakeLLMServer, unique: str) -> None:
    budget = InProcessBudget(limit_usd=0.01)  # below one side's worst case: both sides are refused
    tier = await make_tier(config(tiny_models, server, unique), budget=budget)
    try:
        s = await tier.score(hypothesis(), [], [])
    finally:
        await tier.aclose()
    assert server.requests == [] and await budget.spent() == 0.0
    assert s.calls == 0 and s.cost_usd == 0.0
    assert s.notes["budget_refused"] == 2.0 and s.notes["generation_failures"] == 2.0
    assert (s.pos, s.neg, s.dropped) == ([], [], 2 * N)


async def test_intervention_preferring_a_word_validates_the_claim_about_it(
        tiny_models: dict[str, Path], server: FakeLLMServer, unique: str) -> None:
    tier = await make_tier(config(tiny_models, server, unique))
    try:
        right = await tier.score(hypothesis("intervention"), [], [])
        wrong = await tier.score(hypothesis("base", "h2"), [], [])
    finally:
        await tier.aclose()
    # Deterministic (fixed seeds, CPU): measured AUC 1.0 for the true claim.  0.9 / 0.1 leave room
    # for float differences across torch builds while still failing for a tier that ignores the
    # models (AUC ~0.5) or gets the sign wrong (AUC ~0 and ~1 swapped).
    fit = auc_test(right.pos, right.neg)
    assert fit.auc >= 0.9 and fit.p_value < 1e-3
    assert auc_test(wrong.pos, wrong.neg).auc <= 0.1


def service(cfg: Config, redis_url: str) -> CapturingValidator:
    return CapturingValidator(offline_context(cfg, redis_url))


async def test_validator_service_builds_the_tier_and_validates(tiny_models: dict[str, Path],
                                                               server: FakeLLMServer, redis_url: str,
                                                               unique: str) -> None:
    svc = service(config(tiny_models, server, unique), redis_url)
    async with running(svc):
        assert isinstance(svc.tier, GenerativeTier)
        await svc.handle([Incoming(event=hypothesis(), record=None)])  # type: ignore[arg-type]
    [v] = svc.out
    assert isinstance(v, Validation)
    assert v.decision == "validated" and (v.n_pos, v.n_neg) == (N, N) and v.calls == 2
    assert v.cost_usd == pytest.approx(2 * CALL_COST)


@pytest.mark.parametrize(("base", "intervention", "named"), [
    ("sim", "sim", ["models.base.backend", "models.intervention.backend"]),
    ("transformers", "openai", ["models.intervention.backend"]),
])
async def test_models_that_are_not_local_fail_at_start_up(tiny_models: dict[str, Path], server: FakeLLMServer,
                                                          redis_url: str, unique: str, base: str,
                                                          intervention: str, named: list[str]) -> None:
    cfg = config(tiny_models, server, unique)
    cfg.models.base = BUILTIN_BACKEND_CONFIGS[base](model=cfg.models.base.model)
    cfg.models.intervention = BUILTIN_BACKEND_CONFIGS[intervention](model=cfg.models.intervention.model)
    svc = service(cfg, redis_url)
    with pytest.raises(ConfigError) as err:
        async with running(svc):
            pass
    assert all(field in str(err.value) for field in named)
    assert ("models.base.backend" in str(err.value)) == ("models.base.backend" in named)
    assert "gen" in str(err.value) and server.requests == []


def test_tier_config_bounds_the_number_of_texts() -> None:
    llm = LLMConfig()
    assert GenerativeTierConfig(name="g", llm=llm).generative_texts == N  # the default
    with pytest.raises(ValueError, match="generative_texts"):
        GenerativeTierConfig(name="g", llm=llm, generative_texts=2)  # under MIN_PER_SIDE
