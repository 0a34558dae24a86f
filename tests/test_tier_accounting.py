"""What the LLM validation tier reports as ``calls`` and ``cost_usd``: every completion it sent
(once however many retries it took), the unreadable answers before a re-ask and the failed calls
included, priced as the budget charged them; calls the budget refused are counted apart
(``budget_refused``) and are not calls.

The generative tier follows the same rule (tests/test_generative_tier.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from llm_fake_server import FakeLLMServer, Reply, Seen, Status

from services.core.config import LLMConfig, LLMTierConfig
from services.core.events import Hypothesis, TextRef
from services.llm import InProcessBudget, make_llm_client
from services.llm.client import REASK_SUFFIX
from services.validator.tiers import LLMTier

CALL_COST = (12 * 0.5 + 3 * 1.5) / 1000  # the fake server's default usage at the prices below


def llm_cfg(srv: FakeLLMServer) -> LLMConfig:
    return LLMConfig(provider="openai", model="gpt-test", base_url=srv.base_url,
                     api_key_env="AUTOINTERV_TEST_NO_SUCH_KEY", requests_per_s=1000.0, max_retries=1,
                     backoff_base_s=0.001, backoff_max_s=0.001, usd_per_1k_input=0.5, usd_per_1k_output=1.5)


def refs(role: str, texts: list[str]) -> list[TextRef]:
    return [TextRef(text_id=f"{role}{i}", prompt_id="p", role=role, text=t)  # type: ignore[arg-type]
            for i, t in enumerate(texts)]


H = Hypothesis(experiment_id="x", hypothesis_id="h", candidate_id="c", cluster_id=0, direction="intervention",
               text="Mentions the sea.", labeler="test")
POS = refs("intervention", ["sea breeze", "sea spray", "sea shanty reask"])
NEG = refs("base", ["desert sand", "mountain air", "garbled forever"])


def make_rater() -> Callable[[Seen], Reply | Status]:
    """Numbers for plain texts; 'reask' texts are readable only when re-asked; 'garbled' never;
    the 'mountain' text fails once with a 500 and then succeeds on the client's retry."""
    failed: set[str] = set()

    def rater(seen: Seen) -> Reply | Status:
        text = seen.prompt.split("<text>")[1].split("</text>")[0]
        if "mountain" in text and text not in failed:
            failed.add(text)
            return Status(500)
        if "garbled" in text or ("reask" in text and not seen.prompt.endswith(REASK_SUFFIX)):
            return Reply("I would rather not say.")
        return Reply("85" if "sea" in text else "15")
    return rater


async def test_llm_tier_counts_every_call_it_sent() -> None:
    async with FakeLLMServer("openai", make_rater()) as srv:
        tier = LLMTier(LLMTierConfig(name="llm", llm=llm_cfg(srv)), make_llm_client(llm_cfg(srv)))
        try:
            s = await tier.score(H, POS, NEG)
        finally:
            await tier.aclose()
        # six texts, one re-ask that recovered a score, one that did not, one retried 500
        assert len(srv.requests) == 9
    assert s.calls == 8 and s.cost_usd == pytest.approx(8 * CALL_COST)  # the 500 was an attempt, unbilled
    assert (len(s.pos), len(s.neg), s.dropped) == (3, 2, 1)
    assert s.notes["budget_refused"] == 0.0


async def test_llm_tier_failed_calls_are_calls() -> None:
    async with FakeLLMServer("openai", [Status(400)]) as srv:
        tier = LLMTier(LLMTierConfig(name="llm", llm=llm_cfg(srv)), make_llm_client(llm_cfg(srv)))
        try:
            s = await tier.score(H, POS, NEG)
        finally:
            await tier.aclose()
        assert len(srv.requests) == 6
    assert s.calls == 6 and s.cost_usd == 0.0  # a rejected request is sent but costs nothing
    assert s.dropped == 6 and s.notes["budget_refused"] == 0.0


async def test_llm_tier_budget_refusals_are_not_calls() -> None:
    async with FakeLLMServer("openai", make_rater()) as srv:
        budget = InProcessBudget(limit_usd=0.01)  # below one call's worst case: every call is refused
        tier = LLMTier(LLMTierConfig(name="llm", llm=llm_cfg(srv)),
                       make_llm_client(llm_cfg(srv), budget=budget))
        try:
            s = await tier.score(H, POS, NEG)
        finally:
            await tier.aclose()
        assert srv.requests == []
    assert s.calls == 0 and s.cost_usd == 0.0
    assert s.notes["budget_refused"] == 6.0 and s.dropped == 6
    assert await budget.spent() == 0.0
