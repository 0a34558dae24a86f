"""Scorers rebuilt from specs, the decision for one paired hypothesis, wording, identity accuracy."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest
from paired_helpers import make_pairs, neutral_answer

from services.core.config import PairedConfig
from services.paired.decision import decide_paired
from services.paired.hypotheses import PairedFinding, PairedHypothesis, size_in_words
from services.paired.identity import identity_accuracy_of, pair_identity_accuracy
from services.paired.pairs import Pair, is_label_pair, split_pairs, swap_null, with_vectors
from services.paired.scorers import (
    DirectionScorer,
    FeatureScorer,
    PairScores,
    RegexScorer,
    direction_spec,
    keyword_spec,
    make_scorer,
)
from services.stats.fdr import LordPlusPlus
from services.stats.paired import paired_test

CFG = PairedConfig()


def pairs_with(intervention_suffix: str, share: float, n: int = 200, seed: int = 0) -> list[Pair]:
    def inter(rng: random.Random) -> str:
        return neutral_answer(rng) + (intervention_suffix if rng.random() < share else "")
    return make_pairs(n, neutral_answer, inter, seed=seed)


# --------------------------------------------------------------------------- pairs and split


def test_split_is_by_pair_and_stable() -> None:
    pairs = pairs_with("", 0.0, n=400)
    label, held = split_pairs(pairs, 0.3)
    assert len(label) + len(held) == 400 and 0.2 < len(label) / 400 < 0.4
    assert {p.pair_id for p in label}.isdisjoint(p.pair_id for p in held)
    swapped_label, _ = split_pairs(swap_null(pairs, 1), 0.3)
    assert [p.pair_id for p in swapped_label] == [p.pair_id for p in label]  # roles never move a pair
    assert is_label_pair("00000000aa", 0.3) and not is_label_pair("ffffffffaa", 0.3)
    assert is_label_pair("not-hex", 0.3) == is_label_pair("not-hex", 0.3)


def test_swap_null_exchanges_roles_in_about_half_the_pairs() -> None:
    pairs = pairs_with(" !", 1.0, n=400)
    swapped = swap_null(pairs, 7)
    flipped = sum(s.base == p.intervention for p, s in zip(pairs, swapped, strict=True))
    assert 150 < flipped < 250
    assert swap_null(pairs, 7) == swapped


# --------------------------------------------------------------------------- scorers


def test_every_spec_rebuilds_its_scorer() -> None:
    pairs = pairs_with(" Indeed!", 0.5, n=30)
    for scorer in (FeatureScorer("exclamations"), RegexScorer(keyword_spec(["indeed"])["pattern"])):
        rebuilt = make_scorer(orjson.loads(orjson.dumps(scorer.spec)))
        a, b = scorer.score(pairs), rebuilt.score(pairs)
        assert np.array_equal(a.intervention, b.intervention) and np.array_equal(a.base, b.base)
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer({"type": "vibes"})
    with pytest.raises(ValueError, match="LLM client"):
        make_scorer({"type": "llm_judge", "axis": "is warmer"})


def test_keyword_scorer_matches_whole_words_case_insensitively() -> None:
    s = make_scorer(keyword_spec(["it is important"]))
    assert s.binary
    assert s.score(make_pairs(1, lambda r: "importantly so", lambda r: "It  is Important to go"))\
        .intervention.tolist() == [1.0]
    assert s.score(make_pairs(1, lambda r: "it is importantly", lambda r: "")).base.tolist() == [0.0]
    rate = make_scorer({**keyword_spec(["go"]), "measure": "rate"})
    assert rate.score(make_pairs(1, lambda r: "go go stop stop", lambda r: "")).base.tolist() == [50.0]


def test_direction_spec_round_trips_and_projects() -> None:
    w = np.random.default_rng(0).normal(size=8).astype(np.float32)
    spec = orjson.loads(orjson.dumps(direction_spec(w, "model-x")))
    scorer = make_scorer(spec)
    assert isinstance(scorer, DirectionScorer)
    assert np.allclose(scorer.weights, w, atol=1e-2)
    pairs = with_vectors(make_pairs(3, neutral_answer, neutral_answer), np.zeros((3, 8)), np.tile(w, (3, 1)))
    s = scorer.score(pairs)
    assert np.all(s.intervention > s.base)
    with pytest.raises(ValueError, match="vectors or an encoder"):
        scorer.score(make_pairs(2, neutral_answer, neutral_answer))


# --------------------------------------------------------------------------- decision


def _scores(inter: np.ndarray, base: np.ndarray) -> PairScores:
    return PairScores([str(k) for k in range(len(inter))], np.asarray(base, float), np.asarray(inter, float))


def test_a_strong_difference_is_validated_in_its_direction_only() -> None:
    rng = np.random.default_rng(1)
    base = (rng.random(300) < 0.05).astype(float)
    inter = (rng.random(300) < 0.4).astype(float)
    d = decide_paired(_scores(inter, base), "intervention", LordPlusPlus(0.05), CFG)
    assert d.decision == "validated" and d.result.ci_low >= CFG.min_effect and d.level > 0
    wrong = decide_paired(_scores(inter, base), "base", LordPlusPlus(0.05), CFG)
    assert wrong.decision == "rejected"


def test_a_real_but_small_difference_is_rejected_by_the_minimum_effect() -> None:
    rng = np.random.default_rng(2)
    base = (rng.random(20000) < 0.10).astype(float)
    inter = (rng.random(20000) < 0.13).astype(float)  # effect ~0.515: significant, below 0.55
    d = decide_paired(_scores(inter, base), "intervention", LordPlusPlus(0.05), CFG)
    assert d.result.p_value < 1e-6 and d.decision == "rejected" and d.result.ci_high < CFG.min_effect


def test_an_interval_straddling_the_minimum_escalates_unless_last() -> None:
    inter = np.r_[np.ones(52), np.zeros(348)]
    base = np.r_[np.zeros(52), np.ones(8), np.zeros(340)]  # 52 wins, 8 losses: effect 0.555, interval +-0.02
    scores = _scores(inter, base)
    r = paired_test(scores.intervention, scores.base)
    assert r.ci_low < CFG.min_effect < r.ci_high
    assert decide_paired(scores, "intervention", LordPlusPlus(0.05), CFG, is_last=False).decision == "escalated"
    assert decide_paired(scores, "intervention", LordPlusPlus(0.05), CFG, is_last=True).decision == "validated"
    below = _scores(np.r_[np.ones(44), np.zeros(356)], base)  # effect 0.545: last tier rejects
    assert decide_paired(below, "intervention", LordPlusPlus(0.05), CFG, is_last=True).decision == "rejected"


def test_the_e_process_decides_when_configured() -> None:
    cfg = PairedConfig(test="e-process")
    strong = _scores(np.r_[np.ones(120), np.zeros(180)], np.r_[np.zeros(120), np.ones(10), np.zeros(170)])
    d = decide_paired(strong, "intervention", LordPlusPlus(0.05), cfg)
    assert d.decision == "validated" and d.result.p_value == pytest.approx(np.exp(-d.result.log_e))
    assert d.result.p_value >= d.result.sign_p  # anytime validity costs power at a fixed n
    weak = _scores(np.r_[np.ones(12), np.zeros(288)], np.r_[np.zeros(12), np.ones(6), np.zeros(282)])
    assert decide_paired(weak, "intervention", LordPlusPlus(0.05), cfg).decision == "rejected"


def test_too_few_untied_pairs_spend_no_test() -> None:
    lord = LordPlusPlus(0.05)
    d = decide_paired(_scores(np.r_[np.ones(3), np.zeros(50)], np.zeros(53)), "intervention", lord, CFG)
    assert d.decision == "rejected" and lord.n_tests == 0 and "no test spent" in d.reason
    assert decide_paired(_scores(np.ones(3), np.zeros(3)), "intervention", lord, CFG, is_last=False).decision \
        == "escalated"


def test_lord_levels_are_the_ones_the_decision_uses() -> None:
    lord, fresh = LordPlusPlus(0.05), LordPlusPlus(0.05)
    zeros = _scores(np.zeros(100), np.zeros(100))
    noise = _scores(np.r_[np.ones(20), np.zeros(80)], np.r_[np.zeros(20), np.ones(20), np.zeros(60)])
    for _ in range(5):
        d = decide_paired(noise, "intervention", lord, CFG)
        assert d.decision == "rejected" and d.level == pytest.approx(fresh.record(1.0)[1])
    assert decide_paired(zeros, "intervention", lord, CFG).level == 0.0


# --------------------------------------------------------------------------- wording


def test_findings_say_direction_and_size_in_words() -> None:
    h = PairedHypothesis("the intervention's answers end with a question to the reader more often", "intervention",
                         {"type": "feature", "name": "ends_with_question"}, "offline:features", binary=True)
    r = paired_test(np.r_[np.ones(31), np.zeros(69)], np.r_[np.ones(6), np.zeros(94)])
    f = PairedFinding(h, "validated", r, 0.01)
    assert f.text == ("the intervention's answers end with a question to the reader more often: "
                      "in 31% of pairs against 6% for the base model")
    less = PairedHypothesis("the intervention's answers end with a question to the reader less often", "base",
                            h.scorer, "offline:features", binary=True)
    r_less = paired_test(np.r_[np.ones(31), np.zeros(69)], np.r_[np.ones(6), np.zeros(94)])  # base claimed
    assert size_in_words(less, r_less) == "in 6% of pairs against 31% for the base model"
    f_less = PairedFinding(less, "validated", r_less, 0.01)
    assert f_less.p_intervention_higher == pytest.approx(1 - r_less.effect)
    assert f_less.ci_intervention_higher == pytest.approx((1 - r_less.ci_high, 1 - r_less.ci_low))
    longer = PairedHypothesis("the intervention's answers are longer", "intervention",
                              {"type": "feature", "name": "words"}, "offline:features", unit="words")
    text = size_in_words(longer, paired_test(np.full(10, 120.0), np.r_[np.full(8, 80.0), np.full(2, 200.0)]))
    assert text == "in 80% of pairs, against 20% the other way (median 120 against 80 words)"


def test_hypotheses_serialise() -> None:
    h = PairedHypothesis("t", "base", keyword_spec(["x"]), "offline:log-odds", True, "", {"p_value": 0.1})
    back = PairedHypothesis.from_dict(orjson.loads(orjson.dumps(h.to_dict())))
    assert back == h and back.hypothesis_id == h.hypothesis_id
    assert PairedHypothesis("t", "intervention", h.scorer, "x").hypothesis_id != h.hypothesis_id


# --------------------------------------------------------------------------- pair identity accuracy


def test_identity_accuracy_measures_what_findings_tell_apart() -> None:
    pairs = pairs_with(" Indeed!", 0.8, n=300)
    label, held = pairs[:100], pairs[100:]
    good = identity_accuracy_of([FeatureScorer("exclamations")], label, held)
    assert 0.85 < good <= 0.95  # 80% carry the mark; the other 20% tie (half credit)
    assert identity_accuracy_of([], label, held) == 0.5
    useless = identity_accuracy_of([FeatureScorer("emoji")], label, held)
    assert useless == 0.5
    noise = np.random.default_rng(4).normal(size=(300, 3))
    assert abs(pair_identity_accuracy(noise[:100], noise[100:]) - 0.5) < 0.1
