"""The LLM paths of the hypothesizer and the validator, end to end against a fake OpenAI server.

Services are built from config and called directly (``setup`` then ``hypotheses_for`` / ``handle``
with ``emit`` captured), with real Redis behind the response cache and the shared ``RedisBudget``.
The API key is a unique value in an environment variable; the server sees it in the Authorization
header, and it must never reach an emitted event or a log record, even when the server echoes it
back in an error body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from llm_fake_server import FakeLLMServer, Reply, Seen, Status
from service_helpers import CapturingValidator, offline_context, running, split_id, store_texts

from services.core.config import Config, ConfigError, load_config
from services.core.events import CandidateCluster, Event, Hypothesis, TextRef, Validation
from services.core.runtime import Incoming
from services.hypothesizer.service import HypothesizerService

KEY_ENV = "AUTOINTERV_TEST_LLM_SERVICES_KEY"
MARK = "lighthouse"
FIRST_LABEL = "Model 1 keeps describing lighthouses, beacons and lamps on stormy coasts."
SECOND_LABEL = "Model 1 writes in a wistful first-person voice about tides."
SEA_WORDS = ["lighthouse", "keeper", "lamp", "beacon", "storm", "harbour", "tide", "cliffs"]
LAND_WORDS = ["spreadsheet", "budget", "meeting", "invoice", "quarterly", "report", "agenda", "memo"]
N_SIDE = 20  # texts per side; enough for the offline labeler to find two sets of keywords (z >= 1.96)


def texts(words: list[str]) -> list[str]:
    """Six of the eight words per text, rotating, so every word is frequent on its side."""
    return [" ".join(words[(i + j) % len(words)] for j in range(6)) for i in range(N_SIDE)]


SEA, LAND = texts(SEA_WORDS), texts(LAND_WORDS)


@pytest.fixture()
def api_key(monkeypatch: pytest.MonkeyPatch, unique: str) -> str:
    key = f"sk-test-{unique}-do-not-leak"
    monkeypatch.setenv(KEY_ENV, key)
    return key


def llm_section(srv: FakeLLMServer, **over: Any) -> dict[str, Any]:
    return {"provider": "openai", "model": "gpt-test", "base_url": srv.base_url, "api_key_env": KEY_ENV,
            "requests_per_s": 1000.0, "max_retries": 1, "backoff_base_s": 0.001, "backoff_max_s": 0.01,
            **over}


def config(unique: str, exp: str, budget_usd: float = 1.0, **sections: Any) -> Config:
    over: dict[str, Any] = {"experiment": {"id": f"{exp}-{unique}", "budget_usd": budget_usd},
                            "cache": {"namespace": f"t{unique}"}, **sections}
    return load_config(None, environ={}, overrides=over)


def refs(texts: list[str], role: str, tag: str) -> list[TextRef]:
    return [TextRef(text_id=split_id(tag, role, i, label=tag == "label"), prompt_id=f"p{i}", role=role,  # type: ignore[arg-type]
                    text=f"{t} {tag} {i}")
            for i, t in enumerate(texts)]


def candidate(exp: str) -> CandidateCluster:
    return CandidateCluster(
        experiment_id=exp, candidate_id=f"cand-{exp}", cluster_id=3, snapshot_seq=1, direction="intervention",
        count_base=20, count_intervention=60, share_intervention=0.75, share_ci=(0.6, 0.9), e_value=500.0,
        alpha_spent=0.01, label_texts=refs(SEA, "intervention", "label") + refs(LAND, "base", "label"),
        holdout_texts=refs(SEA, "intervention", "hold") + refs(LAND, "base", "hold"))


def assert_no_key(key: str, events: list[Event], records: list[logging.LogRecord]) -> None:
    for e in events:
        assert key not in e.to_bytes().decode()
    for r in records:
        assert key not in r.getMessage() and key not in repr(r.__dict__)


def labeller(seen: Seen) -> Reply:
    return Reply(SECOND_LABEL if "already been described" in seen.prompt else FIRST_LABEL)


# --------------------------------------------------------------------------- hypothesizer


async def test_llm_labels_become_hypotheses_and_the_second_prompt_diversifies(
        redis_url: str, unique: str, api_key: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeLLMServer("openai", labeller) as srv:
        cfg = config(unique, "hyp", hypothesizer={"labeler": "llm", "labels_per_cluster": 2,
                                                  "llm": llm_section(srv)})
        svc = HypothesizerService(offline_context(cfg, redis_url))
        async with running(svc):
            hyps = await svc.hypotheses_for(candidate(cfg.experiment_id))
    assert [h.text for h in hyps] == [FIRST_LABEL, SECOND_LABEL]  # described hypotheses only, no share template
    assert all(h.labeler == "llm:openai:gpt-test" and h.kind == "contrastive" for h in hyps)
    first, second = srv.requests
    assert "already been described" not in first.prompt and FIRST_LABEL not in first.prompt
    assert "already been described" in second.prompt and f"- {FIRST_LABEL}" in second.prompt
    assert all("hold" not in r.prompt for r in srv.requests)  # the labeler never sees held-out texts
    assert all(r.headers["authorization"] == f"Bearer {api_key}" for r in srv.requests)
    assert_no_key(api_key, list(hyps), caplog.records)


async def test_exhausted_budget_sends_nothing_and_falls_back_to_offline(
        redis_url: str, unique: str, api_key: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeLLMServer("openai", labeller) as srv:
        pricey = llm_section(srv, usd_per_1k_input=1000.0, usd_per_1k_output=1000.0)
        cfg = config(unique, "broke", budget_usd=1e-6,
                     hypothesizer={"labeler": "llm", "labels_per_cluster": 2, "llm": pricey})
        svc = HypothesizerService(offline_context(cfg, redis_url))
        async with running(svc):
            hyps = await svc.hypotheses_for(candidate(cfg.experiment_id))
            spent = await svc.llm.budget.spent()
    assert srv.requests == []  # the budget refused before anything was sent
    contrastive = [h for h in hyps if h.kind == "contrastive"]
    assert len(contrastive) == 2 and all(h.labeler == "offline:log-odds" for h in contrastive)
    assert all(k in contrastive[0].text for k in contrastive[0].keywords)  # the offline label's words
    assert spent == 0.0
    assert any("offline labeler" in r.getMessage() for r in caplog.records)
    assert_no_key(api_key, list(hyps), caplog.records)


async def test_an_empty_llm_label_falls_back_to_offline(redis_url: str, unique: str, api_key: str) -> None:
    async with FakeLLMServer("openai", [Reply("  \n ")]) as srv:
        cfg = config(unique, "empty", hypothesizer={"labeler": "llm", "llm": llm_section(srv)})
        svc = HypothesizerService(offline_context(cfg, redis_url))
        async with running(svc):
            hyps = await svc.hypotheses_for(candidate(cfg.experiment_id))
    assert len(srv.requests) == 1
    [h] = [h for h in hyps if h.kind == "contrastive"]
    assert h.labeler == "offline:log-odds" and h.text.strip()


def test_llm_labeler_without_an_llm_section_fails_at_start_up(unique: str) -> None:
    with pytest.raises(ConfigError, match=r"hypothesizer"):  # rejected by the config, before any service
        config(unique, "nollm", hypothesizer={"labeler": "llm"})


# --------------------------------------------------------------------------- validator


@pytest.fixture()
async def rater(api_key: str) -> AsyncIterator[FakeLLMServer]:
    """Rates sea texts 90, others 10; the very first request fails once, with the key echoed."""
    def script(seen: Seen) -> Reply | Status:
        if len(srv.requests) == 1:
            return Status(500, body=f'{{"error": {{"message": "upstream rejected key {api_key}"}}}}')
        text = seen.prompt.split("<text>")[1]
        return Reply("90" if any(w in text for w in SEA_WORDS) else "10")

    async with FakeLLMServer("openai", script) as srv:
        yield srv


async def validate(cfg: Config, redis_url: str, h: Hypothesis, times: int = 1) -> list[Event]:
    await store_texts(cfg, redis_url, h.holdout_texts)  # as the generator recorded them
    svc = CapturingValidator(offline_context(cfg, redis_url))
    async with running(svc):
        for _ in range(times):
            await svc.handle([Incoming(event=h, record=None)])  # type: ignore[arg-type]
    return svc.out


async def test_validator_llm_tier_scores_caches_and_never_leaks_the_key(
        redis_url: str, unique: str, api_key: str, rater: FakeLLMServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tiers = {"tiers": [{"name": "llm", "kind": "llm", "llm": llm_section(rater)}]}
    h = Hypothesis(experiment_id="x", hypothesis_id=f"h-{unique}", candidate_id="c", cluster_id=3,
                   direction="intervention", text="Model 1 keeps describing lighthouses.", labeler="test",
                   keywords=[MARK], label_text_ids=[], holdout_texts=candidate("x").holdout_texts)
    n_texts = len(h.holdout_texts)

    first = await validate(config(unique, "val", validator=tiers), redis_url, h, times=2)
    assert len(rater.requests) == n_texts + 1  # one per held-out text, plus the retried 500
    assert all(r.headers["authorization"] == f"Bearer {api_key}" for r in rater.requests)
    v, repeat = first
    assert isinstance(v, Validation) and repeat == v  # the repeat gets the stored decision
    assert (v.n_pos, v.n_neg, v.auc) == (len(SEA), len(LAND), 1.0)
    assert v.calls == n_texts and v.cost_usd > 0

    # another experiment (fresh decisions, same cache namespace): every score from the cache
    [cached] = await validate(config(unique, "val2", validator=tiers), redis_url, h)
    assert len(rater.requests) == n_texts + 1
    assert isinstance(cached, Validation)
    assert (cached.n_pos, cached.n_neg, cached.auc) == (v.n_pos, v.n_neg, v.auc)
    assert cached.calls == 0 and cached.cost_usd == 0.0

    # the 500 body (with the key) was quoted in the retry log line, scrubbed
    assert any("retrying" in r.getMessage() and "upstream rejected key ***" in r.getMessage()
               for r in caplog.records)
    assert_no_key(api_key, [*first, cached], caplog.records)
