"""Offline proposers and the embedding direction (services/paired/proposers.py, direction.py).

Each proposer must find a difference planted in synthetic pairs, in the right direction, and
propose nothing the label split does not support when the two sides are alike."""

from __future__ import annotations

import random

import numpy as np
from paired_helpers import make_pairs, neutral_answer

from services.core.config import PairedConfig
from services.paired.direction import describe_direction_ends, find_embedding_direction, how_distinguishable
from services.paired.hypotheses import PairedHypothesis
from services.paired.pairs import Pair, swap_null, with_vectors
from services.paired.proposers import (
    drop_redundant,
    find_features_that_differ,
    find_phrases_that_distinguish,
    screen,
)

CFG = PairedConfig()


def formal(rng: random.Random) -> str:
    return neutral_answer(rng) + " However, results vary. Therefore, indeed, check twice."


def by_feature(hyps: list[PairedHypothesis]) -> dict[str, PairedHypothesis]:
    return {h.scorer["name"]: h for h in hyps if h.scorer["type"] == "feature"}


def test_features_that_differ_follow_the_label_split() -> None:
    pairs = make_pairs(120, neutral_answer, formal)
    hyps = by_feature(find_features_that_differ(pairs))
    assert hyps["formal_connectors"].direction == "intervention"
    assert hyps["formal_connectors"].text == ("the intervention's answers use formal connectors "
                                              "(however, therefore, additionally) more often")
    assert hyps["formal_connectors"].label_evidence["p_value"] < 1e-10
    swapped = by_feature(find_features_that_differ([p.swapped() for p in pairs]))
    assert swapped["formal_connectors"].direction == "base"
    assert "less often" in swapped["formal_connectors"].text


def test_screen_keeps_supported_claims_and_drops_the_rest() -> None:
    pairs = make_pairs(120, neutral_answer, formal)
    kept = screen(find_features_that_differ(pairs), pairs, CFG)
    names = [h.scorer["name"] for h in kept]
    assert "formal_connectors" in names and "exclamations" not in names
    assert all(h.label_evidence["p_value"] <= CFG.propose_max_p for h in kept)
    assert [h.label_evidence["p_value"] for h in kept] == sorted(h.label_evidence["p_value"] for h in kept)
    alike = make_pairs(120, neutral_answer, neutral_answer, seed=1)
    assert len(screen(find_features_that_differ(alike), alike, CFG)) <= 1


def test_phrases_by_log_odds_both_ways() -> None:
    def base(rng: random.Random) -> str:
        return "Basically, " + neutral_answer(rng)

    hyps = find_phrases_that_distinguish(make_pairs(100, base, formal), CFG)
    more = {h.scorer["pattern"] for h in hyps if h.direction == "intervention"}
    less = {h.scorer["pattern"] for h in hyps if h.direction == "base"}
    assert any("indeed" in p for p in more) and any("basically" in p for p in less)
    assert all(h.binary and h.proposer == "offline:log-odds" for h in hyps)
    alike = make_pairs(100, neutral_answer, neutral_answer, seed=2)
    assert find_phrases_that_distinguish(alike, CFG) == []


def test_redundant_hypotheses_spend_one_test() -> None:
    def longer(rng: random.Random) -> str:
        return neutral_answer(rng, sentences=rng.randint(4, 8))

    pairs = make_pairs(100, lambda rng: neutral_answer(rng, sentences=rng.randint(1, 4)), longer)
    hyps = screen(find_features_that_differ(pairs), pairs, CFG)
    names = {h.scorer["name"] for h in hyps}
    assert {"words", "sentences"} <= names
    kept = {h.scorer["name"] for h in drop_redundant(hyps + hyps[:1], pairs, CFG)}
    assert len(kept & {"words", "sentences"}) == 1
    assert len(drop_redundant(hyps + hyps[:1], pairs, CFG)) == len(kept)  # a repeated id counts once


def _vector_pairs(n: int, shift: float, seed: int) -> tuple[list[Pair], np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=32)
    truth /= np.linalg.norm(truth)
    b = rng.normal(size=(n, 32))
    i = b * 0.2 + rng.normal(size=(n, 32)) + shift * truth
    pairs = make_pairs(n, neutral_answer, neutral_answer, seed=seed)
    return with_vectors(pairs, b, i), truth


def test_embedding_direction_is_found_and_distinguishes() -> None:
    pairs, truth = _vector_pairs(300, 1.5, seed=3)
    d = find_embedding_direction(pairs[:100])
    assert d is not None and float(d.weights @ truth) > 0.6
    t = how_distinguishable(d, pairs[100:], swaps=499)
    assert t.auc > 0.65 and t.pair_accuracy > 0.75 and t.p_value <= 1 / 500 + 1e-9


def test_direction_p_value_is_valid_under_the_pair_swap_null() -> None:
    small = []
    for seed in range(60):
        pairs, _ = _vector_pairs(80, 0.0, seed=100 + seed)
        d = find_embedding_direction(pairs[:40])
        assert d is not None
        small.append(how_distinguishable(d, swap_null(pairs[40:], seed), swaps=199, seed=seed).p_value <= 0.1)
    assert np.mean(small) <= 0.2  # P(p <= 0.1) = 0.1 under the null; 60 draws stay below 0.2 w.p. ~0.99


def test_direction_ends_are_described_by_features() -> None:
    rng = np.random.default_rng(5)
    pairs = make_pairs(120, neutral_answer,
                       lambda r: neutral_answer(r) + (" Wow!" if r.random() < 0.5 else ""))
    v = lambda t: rng.normal(size=16) + (3.0 if "!" in t else 0.0) * np.eye(16)[0]  # noqa: E731
    pairs = with_vectors(pairs, np.stack([v(p.base) for p in pairs]), np.stack([v(p.intervention) for p in pairs]))
    d = find_embedding_direction(pairs)
    assert d is not None
    hyps = describe_direction_ends(d, pairs, CFG)
    feats = {h.scorer.get("name"): h.direction for h in hyps if h.scorer["type"] == "feature"}
    assert feats.get("exclamations") == "intervention" or feats.get("ends_with_exclamation") == "intervention"
    assert all(h.proposer == "offline:direction-ends" for h in hyps)


def test_no_direction_without_vectors() -> None:
    assert find_embedding_direction(make_pairs(50, neutral_answer, neutral_answer)) is None


def test_driver_encodes_pairs_for_the_direction_when_given_an_encoder() -> None:
    from services.core.config import Config, EmbedderConfig
    from services.embedder.hashing import HashingEncoder
    from services.paired.discover import discover_paired

    pairs = make_pairs(200, neutral_answer, formal)
    run = discover_paired(pairs, Config(), encoder=HashingEncoder(EmbedderConfig(backend="hashing")),
                          feature_bank=False)
    assert run.direction is not None and run.direction.p_value < 0.01 and run.direction.auc > 0.7
    assert discover_paired(pairs, Config(), feature_bank=False).direction is None
