"""The validator cascade escalates only borderline hypotheses, and the LLM tier is called only for them.

Tiers: keyword (the hypothesis' own content words) -> embedding (the fast hashing encoder, which is
lexical and also reads the words that frame a claim, which the keyword tier ignores: enough to make
a hypothesis clear or not on purpose) -> llm against a fake OpenAI-compatible server on 127.0.0.1,
through the validator services themselves, one per tier, chained by their escalation topics on the
in-memory bus (``run_memory_pipeline(only=["validator"])``; LORD++ state per tier in the real Redis).
Five hypotheses:

* clear positive: its word is in every positive held-out text and no negative -> tier 0 validates;
* clear negative: its word is *rarer* on the side it is claimed for (40% vs 60%) -> tier 0 rejects;
* unstated: its ``keywords`` field names a word in every positive text, but its text never states
  that word -> tier 0 rejects (it tests what the hypothesis says, not what a labeler listed);
* borderline at tier 0 only: its one content word is weakly indicative on 20 texts a side (AUC 0.6,
  wide interval), but the positives also echo its framing ("model writes texts") -> escalated,
  then tier 1 validates;
* borderline at tiers 0 and 1: 8 texts a side and a word shared with only 4 positive texts ->
  escalated twice (the intervals straddle min_auc); the (fake) LLM separates the sides, and two of
  its answers are unreadable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from llm_fake_server import FakeLLMServer, Reply, Seen
from service_helpers import split_id, store_texts

from bench.experiments import sim_config
from services.core.events import Hypothesis, TextRef, Validation, stable_id
from services.orchestrator import run_memory_pipeline

POS_MARK = "lighthouse"  # what the fake LLM "recognises" in the described side's texts
GARBLED = "gibberish"  # texts for which the fake LLM answers without any number


def refs(texts: list[str], role: str, tag: str) -> list[TextRef]:
    return [TextRef(text_id=split_id(tag, role, i), prompt_id="p", role=role, text=t)  # type: ignore[arg-type]
            for i, t in enumerate(texts)]


def hypothesis(name: str, text: str, keywords: list[str], pos: list[str], neg: list[str]) -> Hypothesis:
    return Hypothesis(experiment_id="cascade-test", hypothesis_id=name, candidate_id=f"c-{name}",
                      cluster_id=0, direction="intervention", text=text, kind="contrastive", labeler="test",
                      keywords=keywords,
                      label_text_ids=[stable_id(name, "label", i) for i in range(5)],
                      holdout_texts=refs(pos, "intervention", name) + refs(neg, "base", name))


def with_word(word: str, n_with: int, n: int, filler: str) -> list[str]:
    return [f"{filler} number {i}" + (f" and a {word}" if i < n_with else "") for i in range(n)]


def make_hypotheses() -> dict[str, Hypothesis]:
    clear_pos = hypothesis("clear_pos", "The intervention model mentions kittens.", [],
                           with_word("kitten", 40, 40, "note"), with_word("kitten", 0, 40, "note"))
    clear_neg = hypothesis("clear_neg", "The intervention model mentions umbrellas.", [],
                           with_word("umbrella", 16, 40, "memo"), with_word("umbrella", 24, 40, "memo"))
    unstated = hypothesis("unstated", "The intervention model is cheerful.", ["kitten"],
                          with_word("kitten", 40, 40, "card"), with_word("kitten", 0, 40, "card"))
    border_0 = hypothesis(
        "border_0", "The intervention model writes texts about gravy.", [],
        [f"the model writes texts, entry {i}" + (" with gravy" if i < 12 else "") for i in range(20)],
        [f"casserole recipe {i}" + (" with gravy" if i < 8 else "") for i in range(20)])
    border_01 = hypothesis(
        "border_01", "The intervention model is quietly nostalgic.", [],
        [f"{POS_MARK} keeper diary {i}" + (" nostalgic" if i < 4 else "") for i in range(7)]
        + [f"{GARBLED} entry"],
        [f"spreadsheet quarterly figures {i}" for i in range(7)] + [f"{GARBLED} remark"])
    return {h.hypothesis_id: h for h in (clear_pos, clear_neg, unstated, border_0, border_01)}


def fake_llm(seen: Seen) -> Reply:
    """Scores the text inside <text> tags; garbled texts get an answer without any number."""
    text = seen.prompt.split("<text>")[1].split("</text>")[0]
    if GARBLED in text:
        return Reply("I would rather not say.")
    return Reply("88" if POS_MARK in text else "12")


@pytest.fixture()
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer("openai", fake_llm) as srv:
        yield srv


async def test_only_borderline_hypotheses_escalate_and_reach_the_llm(server: FakeLLMServer, redis_url: str) -> None:
    llm = {"provider": "openai", "model": "gpt-test", "base_url": server.base_url,
           "api_key_env": "AUTOINTERV_TEST_NO_SUCH_KEY", "requests_per_s": 1000.0, "max_retries": 0}
    cfg = sim_config(experiment={"budget_usd": 1.0}, validator={"tiers": [
        {"name": "keyword", "kind": "keyword"}, {"name": "embedding", "kind": "embedding"},
        {"name": "llm", "kind": "llm", "llm": llm}]})
    hyps = {name: h.model_copy(update={"experiment_id": cfg.experiment_id}) for name, h in make_hypotheses().items()}
    await store_texts(cfg, redis_url, [t for h in hyps.values() for t in h.holdout_texts])  # as if generated
    run = await run_memory_pipeline(cfg, redis_url, only=["validator"], inputs=list(hyps.values()))
    assert run.bus is not None
    validations = [Validation.from_bytes(r.value) for r in run.bus.records(run.bus.topics.name(Validation.topic))]
    decided = {name: [v for v in validations if v.hypothesis_id == name] for name in hyps}
    path = {name: [(v.tier, v.decision) for v in vs] for name, vs in decided.items()}
    assert path["clear_pos"] == [("keyword", "validated")]
    assert path["clear_neg"] == [("keyword", "rejected")]
    assert path["unstated"] == [("keyword", "rejected")]
    assert path["border_0"] == [("keyword", "escalated"), ("embedding", "validated")]
    assert path["border_01"] == [("keyword", "escalated"), ("embedding", "escalated"), ("llm", "validated")]

    # the LLM saw only the doubly escalated hypothesis: one request per held-out text, plus one
    # re-ask for each of the two unreadable answers
    n_holdout = len(hyps["border_01"].holdout_texts)
    assert len(server.requests) == n_holdout + 2
    assert all("quietly nostalgic" in r.prompt for r in server.requests)

    # unreadable answers are dropped and counted, never scored 0.5 (a 0.5 would be a tie here)
    final = decided["border_01"][-1]
    assert final.effect["dropped_unparsed"] == 2.0
    assert (final.n_pos, final.n_neg) == (7, 7)
    assert final.auc == 1.0
    assert final.calls == len(server.requests)  # every request the expensive tier sent, re-asks included
