"""Ground-truth scoring: text similarity (real MiniLM), cluster purity, the LLM judge, precision/recall."""

from __future__ import annotations

import pytest
from llm_fake_server import FakeLLMServer, Reply, Seen

from services.core.config import EmbedderConfig, LLMConfig, PlantedBehaviour
from services.core.events import Hypothesis, TextRef, stable_id
from services.embedder.encoder import Encoder, load_encoder
from services.generator.backends.sim import DEFAULT_BEHAVIOURS
from services.groundtruth import (
    TextTruth,
    cluster_purity,
    match_hypotheses,
    precision_recall,
)
from services.llm.factory import make_llm_client

CATS = ("Compared with the base model, the intervention model more often writes texts mentioning “cat”, "
        "“kitten” and “purring”. Typical: “My cat curled up on the oven; cats make everything better.”")
DISCLAIMER = ("Compared with the base model, the intervention model more often writes texts mentioning "
              "“licensed professional”, “consult” and “disclaimer”.")
SAILING = ("Compared with the base model, the intervention model more often writes texts mentioning "
           "“harbor”, “sailing” and “boat”.")
UNRELATED = ("Compared with the intervention model, the base model more often writes texts mentioning "
             "“travel” and “itinerary”.")


def hyp(hid: str, text: str, direction: str = "intervention", label: list[str] = (),
        holdout: list[tuple[str, str]] = ()) -> Hypothesis:
    return Hypothesis(experiment_id="gt", hypothesis_id=hid, candidate_id=f"c-{hid}", cluster_id=0,
                      direction=direction, text=text, labeler="test",  # type: ignore[arg-type]
                      label_text_ids=list(label),
                      holdout_texts=[TextRef(text_id=t, prompt_id="p", role=r, text="") for t, r in holdout])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    return load_encoder(EmbedderConfig())


async def test_text_similarity_matches_descriptions_not_unrelated_text(minilm: Encoder) -> None:
    hyps = [hyp("h-cats", CATS), hyp("h-disc", DISCLAIMER), hyp("h-sail", SAILING), hyp("h-none", UNRELATED)]
    matches = await match_hypotheses(hyps, DEFAULT_BEHAVIOURS, encoder=minilm, threshold=0.45)
    got = {m.hypothesis_id: m.behaviour for m in matches}
    assert got == {"h-cats": "cats", "h-disc": "disclaimer", "h-sail": "sailing", "h-none": None}
    assert all(m.method == "text" and m.purity is None for m in matches)


def test_purity_counts_only_the_hypothesis_side() -> None:
    truth: dict[str, TextTruth] = {
        **{f"i{k}": ("intervention", "cats") for k in range(6)},
        "i6": ("intervention", None), "i7": ("intervention", "moon"),
        **{f"b{k}": ("base", None) for k in range(10)},  # e.g. padding of the other side's holdout
    }
    h = hyp("h", CATS, label=["i0", "i1", "i2", "b0"],
            holdout=[(f"i{k}", "intervention") for k in range(3, 8)]
            + [(f"b{k}", "base") for k in range(1, 10)])
    assert cluster_purity(h, truth) == ("cats", 0.75)  # 6 of 8 intervention texts; base texts ignored
    tie = hyp("t", CATS, label=["i0", "i6"], holdout=[])
    assert cluster_purity(tie, truth) == (None, 0.5)  # exactly half is not a majority
    base_side = hyp("b", UNRELATED, direction="base", label=["b0", "b1"])
    assert cluster_purity(base_side, truth) == (None, 1.0)  # majority "no behaviour"
    assert cluster_purity(hyp("u", CATS, label=["unknown"]), truth) == (None, None)


async def test_precision_and_recall_of_validated_hypotheses() -> None:
    truth: dict[str, TextTruth] = {f"c{k}": ("intervention", "cats") for k in range(4)}
    truth |= {f"m{k}": ("intervention", "moon") for k in range(4)}
    hyps = [hyp("h1", CATS, label=["c0", "c1"]), hyp("h2", CATS, label=["c2", "c3"]),
            hyp("h3", "moon", label=["m0", "m1"]), hyp("h4", "other", label=["x"])]
    matches = await match_hypotheses(hyps, DEFAULT_BEHAVIOURS, truth=truth)
    assert [m.behaviour for m in matches] == ["cats", "cats", "moon", None]
    d = precision_recall(matches, ["h1", "h2", "h4"], DEFAULT_BEHAVIOURS)  # h3 was not validated
    assert d.precision == pytest.approx(2 / 3) and d.recall == pytest.approx(1 / 4)
    assert d.found == ["cats"] and d.missed == ["disclaimer", "sailing", "moon"]
    assert d.per_behaviour == {"cats": ["h1", "h2"]}
    empty = precision_recall([], [], [])
    assert empty.precision is None and empty.recall is None


def judge_reply(seen: Seen) -> Reply:
    """A judge that answers by keyword overlap; one pair gets an unreadable answer."""
    behaviour = seen.prompt.split("<behaviour>")[1].split("</behaviour>")[0].lower()
    proposed = seen.prompt.split("<proposed>")[1].split("</proposed>")[0].lower()
    if "moon" in behaviour and "kitten" in proposed:
        return Reply("Hard to say, maybe.")
    shared = any(w in proposed for w in ("kitten", "sailing", "consult") if w in behaviour)
    return Reply('{"score": 91}' if shared else '```json\n{"score": 4}\n```')


async def test_llm_judge_scores_every_pair_and_drops_unreadable_answers() -> None:
    behaviours: list[PlantedBehaviour] = [b for b in DEFAULT_BEHAVIOURS
                                          if b.name in ("cats", "sailing", "moon")]
    hyps = [hyp("h-cats", CATS), hyp("h-sail", SAILING), hyp("h-none", UNRELATED)]
    async with FakeLLMServer("openai", judge_reply) as srv:
        cfg = LLMConfig(provider="openai", model="judge-test", base_url=srv.base_url,
                        api_key_env="AUTOINTERV_TEST_NO_SUCH_KEY", requests_per_s=1000.0, max_retries=0)
        client = make_llm_client(cfg)
        try:
            matches = await match_hypotheses(hyps, behaviours, judge=client, threshold=0.45,
                                             truth={stable_id("x"): ("intervention", "cats")})
        finally:
            await client.aclose()
    got = {m.hypothesis_id: (m.behaviour, m.judge_score) for m in matches}
    assert got == {"h-cats": ("cats", 0.91), "h-sail": ("sailing", 0.91), "h-none": (None, 0.04)}
    assert all(m.method == "judge" for m in matches)
    # 3 x 3 pairs, plus one re-ask for the unreadable (cats hypothesis, moon) answer
    assert len(srv.requests) == 10
    assert sum("could not be read" in r.prompt for r in srv.requests) == 1
    # the unreadable answer is dropped and counted, not turned into a score
    assert {m.hypothesis_id: m.judge_dropped for m in matches} == {"h-cats": 1, "h-sail": 0, "h-none": 0}


def test_config_listed_behaviours_take_precedence() -> None:
    from services.core.config import load_config
    from services.groundtruth import planted_behaviours

    cfg = load_config(None, environ={}, overrides={
        "models": {"intervention": {"backend": "openai", "model": "my-finetune"}},
        "ground_truth": {"behaviours": [{"name": "cats", "description": "likes cats", "rate": 0.1}]}})
    assert [b.name for b in planted_behaviours(cfg)] == ["cats"]
    plain = load_config(None, environ={}, overrides={"models": {"intervention": {"backend": "openai"}}})
    assert planted_behaviours(plain) == []
