"""Ground truth by meaning (real MiniLM, the LLM judge), purity as a diagnostic, mirrors, precision/recall."""

from __future__ import annotations

import pytest
from llm_fake_server import FakeLLMServer, Reply, Seen

from services.core.config import EmbedderConfig, LLMConfig, PlantedBehaviour
from services.core.events import Hypothesis, TextRef, stable_id
from services.embedder.encoder import Encoder, load_encoder
from services.generator.backends.sim import DEFAULT_BEHAVIOURS
from services.groundtruth import (
    FindingScope,
    GroundTruthRule,
    Match,
    TextTruth,
    cluster_purity,
    group_mirrors,
    is_finding,
    match_hypotheses,
    mirrors,
    precision_recall,
)
from services.hypothesis_sets import build_set
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
    # the same words about the base side say the opposite of the planted behaviour
    base_side = await match_hypotheses([hyp("h-base", CATS, direction="base")], DEFAULT_BEHAVIOURS,
                                       encoder=minilm, threshold=0.45)
    assert base_side[0].behaviour is None and base_side[0].text_behaviour == "cats"
    with pytest.raises(ValueError, match="by meaning"):
        await match_hypotheses([hyp("h", CATS)], DEFAULT_BEHAVIOURS)


async def test_labels_swapped_between_clusters_no_longer_match_the_cluster(minilm: Encoder) -> None:
    """Each behaviour cluster's own label matches it; the same label on another behaviour's cluster
    matches the behaviour its words name (or none), never the cluster's, while purity, which reads
    only the cluster, would still call it a match: the reason purity is no longer the rule."""
    items = (await build_set(1, 20, sources=("true", "swapped"))).items
    # each held-out text's truth: the behaviour cluster it came from (intervention side), else none
    owner = {t.text_id: x.cluster for x in items if x.source == "true" for t in x.hypothesis.holdout_texts}
    truth: dict[str, TextTruth] = {t.text_id: (t.role, owner[t.text_id] if t.role == "intervention" else None)
                                   for x in items for t in x.hypothesis.holdout_texts}
    rule = GroundTruthRule(DEFAULT_BEHAVIOURS, encoder_factory=lambda: minilm)
    by_id = {m.hypothesis_id: m for m in await rule.match([x.hypothesis for x in items], truth=truth)}
    true = [x for x in items if x.source == "true"]
    swapped = [x for x in items if x.source == "swapped"]
    assert len(true) == 4 and len(swapped) == 12
    assert {x.cluster: by_id[x.hypothesis.hypothesis_id].behaviour for x in true} == {
        "cats": "cats", "disclaimer": "disclaimer", "moon": "moon", "sailing": "sailing"}
    for x in swapped:
        m = by_id[x.hypothesis.hypothesis_id]
        held_out_cluster = owner[next(t.text_id for t in x.hypothesis.holdout_texts if t.role == "intervention")]
        assert held_out_cluster != x.cluster
        assert m.behaviour != held_out_cluster, (x.cluster, held_out_cluster, m)
        assert m.behaviour in (x.cluster, None)
        assert m.purity_behaviour == held_out_cluster  # purity would have matched the cluster


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


def test_precision_and_recall_count_findings_and_skip_mirrors() -> None:
    matches = [Match("h1", "cats", "text"), Match("h2", "cats", "text"), Match("h3", "moon", "text"),
               Match("h4", None, "text"), Match("h5", None, "text")]
    d = precision_recall(matches, ["h1", "h2", "h4"], DEFAULT_BEHAVIOURS)  # h3 was not validated
    assert d.precision == pytest.approx(2 / 3) and d.recall == pytest.approx(1 / 4)
    assert d.found == ["cats"] and d.missed == ["disclaimer", "sailing", "moon"]
    assert d.per_behaviour == {"cats": ["h1", "h2"]}
    # h5 mirrors h1: neither a false positive nor a discovery of its own
    mirrored = precision_recall(matches, ["h1", "h2", "h4", "h5"], DEFAULT_BEHAVIOURS, {"h5": "h1"})
    assert mirrored.precision == pytest.approx(2 / 3) and mirrored.n_validated == 4
    assert mirrored.mirrors == {"h5": "h1"}
    # a mirror of something that is not a finding is an ordinary finding
    assert precision_recall(matches, ["h1", "h5"], DEFAULT_BEHAVIOURS, {"h5": "h3"}).precision == 0.5
    empty = precision_recall([], [], [])
    assert empty.precision is None and empty.recall is None
    assert is_finding("validated", 0.8) and not is_finding("validated", None) and not is_finding("rejected", 0.9)


HISTORY = tuple(f"history-{k}" for k in range(5))


def scope(hid: str, direction: str, share: float, prompts: tuple[str, ...]) -> FindingScope:
    return FindingScope(hid, direction, share, prompts)


def test_mirror_rule() -> None:
    moon = scope("moon", "intervention", 0.97, HISTORY * 8)
    battles = scope("battles", "base", 0.64, HISTORY * 12)
    assert mirrors(battles, moon) and not mirrors(moon, battles)  # the more one-sided is the original
    assert not mirrors(scope("b", "intervention", 0.6, HISTORY), moon)  # same side
    assert not mirrors(scope("b", "base", 0.64, ("travel-0", "travel-1") * 5), moon)  # other prompts
    assert not mirrors(scope("b", "base", 0.99, HISTORY), moon)  # more one-sided than the "original"
    # half of the base finding's texts on the Moon finding's prompts: just enough; less is not
    half = scope("b", "base", 0.6, (*HISTORY[:2], "travel-0", "travel-1"))
    assert mirrors(half, scope("m", "intervention", 0.9, HISTORY[:2]))
    assert not mirrors(half, scope("m", "intervention", 0.9, HISTORY[:1]))
    # a finding spread over every prompt (cats) mirrors nothing narrow, and nothing narrow mirrors it
    cats = scope("cats", "intervention", 0.98, tuple(f"p{k}" for k in range(200)) + HISTORY)
    cooking = scope("cooking", "base", 0.55, ("p0", "p1", "p2", "p3", "p4") * 6)
    assert not mirrors(cooking, cats)


def test_group_mirrors_points_each_mirror_at_one_original() -> None:
    moon = scope("moon", "intervention", 0.97, HISTORY * 8)
    battles = scope("battles", "base", 0.64, HISTORY * 12)
    empires = scope("empires", "base", 0.60, HISTORY[:3] * 10)
    sailing = scope("sailing", "intervention", 0.95, ("travel-0",) * 20)
    harbours = scope("harbours", "base", 0.7, ("travel-0",) * 9 + ("travel-1",))
    assert group_mirrors([moon, battles, empires, sailing, harbours]) == {
        "battles": "moon", "empires": "moon", "harbours": "sailing"}
    assert group_mirrors([battles, empires]) == {}  # no original among the findings: nothing to group


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
