"""The LLM proposer and the pairwise judge, against a local fake OpenAI-compatible server.

The fake "LLM" reads the prompt it is sent, so these tests check what the code shows the model
and how it maps answers back: which side is the intervention when names and order are random,
and that asking in both orders cancels a judge that always prefers one position."""

from __future__ import annotations

import random
import re

import pytest
from llm_fake_server import FakeLLMServer, Reply, Seen
from paired_helpers import make_pairs, neutral_answer

from services.core.config import Config, LLMConfig, PairedConfig
from services.llm.client import ParseError
from services.llm.factory import make_llm_client
from services.paired.decision import decide_paired
from services.paired.discover import discover_paired_async
from services.paired.hypotheses import PairedHypothesis
from services.paired.llm import Axis, ask_llm_for_axes, axis_hypothesis, deduplicate, parse_axes, parse_choice
from services.paired.scorers import make_scorer
from services.stats.fdr import LordPlusPlus

NO_KEY_ENV = "AUTOINTERV_TEST_PAIRED_NO_KEY"  # unset: a local OpenAI-compatible server needs no key


def llm_cfg(srv: FakeLLMServer) -> LLMConfig:
    return LLMConfig(provider="openai", model="fake", base_url=srv.base_url, api_key_env=NO_KEY_ENV,
                     max_retries=0, requests_per_s=1000.0, max_concurrency=16, timeout_s=5.0)


def excited(rng: random.Random) -> str:
    return neutral_answer(rng) + " Wow!"


# --------------------------------------------------------------------------- parsers


def test_parse_axes_reads_json_fences_and_lines() -> None:
    assert parse_axes('[{"axis": "is more formal", "side": 2}]') == [Axis("is more formal", 2)]
    assert parse_axes('Sure:\n```json\n[{"axis": "uses lists.", "model": "Model 1"}]\n```') == [Axis("uses lists", 1)]
    assert parse_axes('{"axes": [{"axis": "is warmer", "group": 1}]}') == [Axis("is warmer", 1)]
    assert parse_axes("- Model 2: is longer\n- model 1 - asks questions") == [Axis("is longer", 2),
                                                                          Axis("asks questions", 1)]
    with pytest.raises(ParseError):
        parse_axes("They differ in many ways.")
    with pytest.raises(ParseError):
        parse_axes('[{"axis": "is longer", "side": 3}]')


@pytest.mark.parametrize(("reply", "choice"), [("A", "A"), (" b.", "B"), ("SAME", "same"), ("Answer A", "A"),
                                               ('{"choice": "B"}', "B"), ("neither", "same")])
def test_parse_choice_accepts_plain_answers(reply: str, choice: str) -> None:
    assert parse_choice(reply) == choice


@pytest.mark.parametrize("reply", ["A or B", "", "I prefer the first", "C"])
def test_parse_choice_refuses_to_guess(reply: str) -> None:
    with pytest.raises(ParseError):
        parse_choice(reply)


def test_deduplicate_keeps_the_first_wording() -> None:
    hyps = [axis_hypothesis(a, "intervention", "llm") for a in
            ("is more formal", "is more formal in tone", "uses more bulleted lists", "is more formal")]
    kept = deduplicate(hyps, 0.5)
    assert [h.scorer["axis"] for h in kept] == ["is more formal", "uses more bulleted lists"]


# --------------------------------------------------------------------------- proposer


def _side_with_exclamations(prompt: str) -> int:
    """The side whose answers end with "Wow!" in a proposer prompt."""
    for side, body in re.findall(r'<answer side="(\d)">(.*?)</answer>', prompt, re.DOTALL):
        if body.endswith("Wow!"):
            return int(side)
    raise AssertionError("no planted answer shown")


async def test_proposer_maps_random_names_and_order_back_to_the_intervention() -> None:
    def script(seen: Seen) -> Reply:
        side = _side_with_exclamations(seen.prompt)
        return Reply(f'[{{"axis": "ends with an exclamation", "side": {side}}}, '
                     f'{{"axis": "is calmer", "side": {3 - side}}}]')

    pairs = make_pairs(40, neutral_answer, excited)
    cfg = PairedConfig(llm_rounds=6, llm_examples=4)
    async with FakeLLMServer("openai", script) as srv:
        async with make_llm_client(llm_cfg(srv)) as client:
            hyps = await ask_llm_for_axes(pairs, client, cfg, seed=3)
        prompts = [r.prompt for r in srv.requests]
    assert len(prompts) == 6
    assert len({p.count('side="1"') and p.index('side="1"') < p.index('side="2"') for p in prompts}) == 2  # both orders
    by_axis = {h.scorer["axis"]: h.direction for h in hyps}
    assert by_axis == {"ends with an exclamation": "intervention", "is calmer": "base"}  # deduplicated over rounds
    assert all(h.proposer == "llm:openai:fake" for h in hyps)


# --------------------------------------------------------------------------- judge


async def _judge(script, pairs, axis="ends with an exclamation"):
    async with FakeLLMServer("openai", script) as srv:
        async with make_llm_client(llm_cfg(srv)) as client:
            scores = await make_scorer({"type": "llm_judge", "axis": axis}, llm=client).ascore(pairs)
        return scores, len(srv.requests)


def _answer(prompt: str, tag: str) -> str:
    return re.search(rf'<answer id="{tag}">(.*?)</answer>', prompt, re.DOTALL).group(1)  # type: ignore[union-attr]


async def test_judge_asks_both_orders_and_finds_the_difference() -> None:
    def script(seen: Seen) -> Reply:
        a, b = _answer(seen.prompt, "A"), _answer(seen.prompt, "B")
        return Reply("A" if a.endswith("!") and not b.endswith("!") else "B" if b.endswith("!") else "SAME")

    pairs = make_pairs(30, neutral_answer, excited)
    scores, calls = await _judge(script, pairs)
    assert calls == 60 and scores.calls == 60 and scores.dropped == 0
    assert (scores.intervention == 1.0).all() and (scores.base == 0.0).all()
    d = decide_paired(scores, "intervention", LordPlusPlus(0.05), PairedConfig())
    assert d.decision == "validated"


async def test_a_judge_that_always_picks_a_position_finds_nothing() -> None:
    pairs = make_pairs(30, neutral_answer, excited)
    scores, _ = await _judge(lambda seen: Reply("A"), pairs)
    assert (scores.intervention == 0.5).all() and (scores.base == 0.5).all()
    d = decide_paired(scores, "intervention", LordPlusPlus(0.05), PairedConfig())
    assert d.decision == "rejected" and d.result.n_higher == 0


async def test_unreadable_judge_answers_drop_the_pair_not_score_it() -> None:
    def script(seen: Seen) -> Reply:
        return Reply("no idea" if "Prompt number 3?" in seen.prompt else "A")

    scores, _ = await _judge(script, make_pairs(5, neutral_answer, excited))
    assert scores.dropped == 1 and len(scores.pair_ids) == 4


# --------------------------------------------------------------------------- driver with an LLM


async def test_discover_with_an_llm_validates_its_axis() -> None:
    def script(seen: Seen) -> Reply:
        if "<example" in seen.prompt:
            return Reply(f'[{{"axis": "ends with an exclamation", "side": {_side_with_exclamations(seen.prompt)}}}]')
        a, b = _answer(seen.prompt, "A"), _answer(seen.prompt, "B")
        return Reply("A" if a.endswith("!") and not b.endswith("!") else "B" if b.endswith("!") else "SAME")

    pairs = make_pairs(120, neutral_answer, excited)
    cfg = Config()
    cfg.paired.llm_judge_pairs = 40
    async with FakeLLMServer("openai", script) as srv, make_llm_client(llm_cfg(srv)) as client:
        run = await discover_paired_async(pairs, cfg, llm=client, feature_bank=False)
    llm = [f for f in run.findings if f.hypothesis.scorer["type"] == "llm_judge"]
    assert llm and llm[0].decision == "validated" and llm[0].hypothesis.direction == "intervention"
    assert llm[0].calls == 80 and "a judge reading both orders agreed in 100% of pairs" in llm[0].text
    offline = {f.hypothesis.scorer.get("name") for f in run.validated}
    assert offline & {"exclamations", "ends_with_exclamation", "enthusiastic_opener"}
    assert isinstance(llm[0].hypothesis, PairedHypothesis)
