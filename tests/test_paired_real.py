"""The paired path's statistics on real texts (../shared/data) and on the simulated pair.

* A pair-swap null (roles exchanged at random within each pair) is an exact null for any data:
  over many swap seeds, the share of runs that validate anything must stay within the stated
  error rate, bounded by a Clopper-Pearson interval.  Until its first rejection LORD++ tests at
  a fixed sequence of levels summing to at most w0 = alpha/2, so P(any validation) <= alpha/2 by a
  union bound whatever the dependence between tests; the runs check the levels are exactly those.
* A style planted in real answers (" !" appended to 30% of one side) is validated, in its direction.
* On the real pairs themselves, the differences Guo et al. (2023) describe are found.

A validator that validates everything fails the null tests; one that rejects everything fails the
planted ones.  Skipped with a message when ../shared/data is absent.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from paired_helpers import plant_exclamations, real_pairs, sim_pairs
from scipy.stats import binomtest

from services.core.config import Config
from services.generator.backends.sim import DEFAULT_STYLES
from services.paired.discover import PairedRun, discover_paired
from services.paired.features import FeatureCache
from services.paired.pairs import Pair, split_pairs, swap_null
from services.paired.truth import styles_found
from services.stats.fdr import LordPlusPlus

pytestmark = pytest.mark.slow

EXCLAMATION_SCORERS = {"exclamations", "ends_with_exclamation", "space_before_punctuation"}


def config(alpha: float = 0.05, **paired: object) -> Config:
    cfg = Config()
    cfg.validator.alpha = alpha
    for k, v in paired.items():
        setattr(cfg.paired, k, v)
    return cfg


def clopper_pearson_upper(k: int, n: int) -> float:
    return float(binomtest(k, n).proportion_ci(0.95, "exact").high)


def assert_levels_fixed_until_first_validation(run: PairedRun, alpha: float) -> None:
    """Before a rejection LORD++'s levels do not depend on any p-value: the fresh sequence."""
    fresh = LordPlusPlus(alpha)
    spent = 0.0
    for f in run.findings:
        if f.level == 0.0:  # too few untied pairs: no test spent
            continue
        assert f.level == pytest.approx(fresh.record(1.0)[1], rel=1e-12)
        spent += f.level
        if f.decision == "validated":
            break
    assert spent <= alpha / 2 + 1e-12


@pytest.fixture(scope="module")
def hc3() -> list[Pair]:
    return real_pairs("hc3")


@pytest.fixture(scope="module")
def hc3_cache() -> FeatureCache:
    return FeatureCache()


# --------------------------------------------------------------------------- nulls

NULL_SEEDS = 200  # at alpha 0.05 the bound passes with <= 3 runs with findings (3/200: upper 0.043)


def test_pair_swap_null_of_real_texts_validates_within_alpha(hc3: list[Pair], hc3_cache: FeatureCache) -> None:
    cfg = config(0.05)
    runs = [discover_paired(swap_null(hc3, seed), cfg, cache=hc3_cache, feature_bank=False)
            for seed in range(NULL_SEEDS)]
    with_findings = [seed for seed, r in enumerate(runs) if r.validated]
    assert clopper_pearson_upper(len(with_findings), NULL_SEEDS) <= 0.05, with_findings
    for r in runs:
        assert_levels_fixed_until_first_validation(r, 0.05)
    assert sum(len(r.findings) for r in runs) >= 20  # tests did run: the bound is not vacuous


LAX_SEEDS = 60  # at alpha 0.2: <= 5 runs with findings (5/60: upper 0.18)


def test_pair_swap_null_with_every_proposal_tested(hc3: list[Pair], hc3_cache: FeatureCache) -> None:
    """No screening on the label split: ~35 tests per run stress the LORD++ stream itself."""
    cfg = config(0.2, propose_max_p=1.0, min_effect=0.501)
    runs = [discover_paired(swap_null(hc3, 1000 + s), cfg, cache=hc3_cache, feature_bank=False)
            for s in range(LAX_SEEDS)]
    assert min(len(r.findings) for r in runs) >= 20
    with_findings = [s for s, r in enumerate(runs) if r.validated]
    assert clopper_pearson_upper(len(with_findings), LAX_SEEDS) <= 0.2, with_findings
    for r in runs:
        assert_levels_fixed_until_first_validation(r, 0.2)


def test_sim_identical_pair_validates_nothing() -> None:
    """Every proposal tested (no screening), so the bound is not vacuous; per run P(any) is at most
    the levels' sum (< 0.012 at alpha 0.05 for <= 40 tests): >= 3 runs of 20 happen w.p. < 0.002."""
    cfg = config(0.05, propose_max_p=1.0, min_effect=0.501)
    runs = [discover_paired(sim_pairs(seed, identical=True), cfg, feature_bank=False) for seed in range(20)]
    assert sum(len(r.findings) for r in runs) >= 100
    assert sum(bool(r.validated) for r in runs) <= 2


# --------------------------------------------------------------------------- planted


@pytest.mark.parametrize("side", ["intervention", "base"])
def test_exclamations_planted_in_real_answers_are_validated_in_their_direction(hc3: list[Pair], side: str) -> None:
    null = swap_null(hc3[:300], seed=5)  # a slice whose two sides differ by chance only
    planted = plant_exclamations(null if side == "intervention" else [p.swapped() for p in null], 0.3, seed=6)
    if side == "base":
        planted = [p.swapped() for p in planted]
    run = discover_paired(planted, config(0.05), feature_bank=False)
    names = {f.hypothesis.scorer.get("name"): f for f in run.validated}
    hit = [names[n] for n in EXCLAMATION_SCORERS if n in names]
    assert hit, [f.text for f in run.findings]
    assert all(f.hypothesis.direction == side for f in hit)
    others = [f.text for f in run.validated
              if f.hypothesis.scorer.get("name") not in EXCLAMATION_SCORERS and "!" not in str(f.hypothesis.scorer)]
    assert not others, others
    assert run.identity_accuracy > 0.6


def test_held_out_pairs_never_change_what_is_tested(hc3: list[Pair]) -> None:
    cfg = config(0.05)
    label, held = split_pairs(hc3, cfg.paired.label_fraction)
    shuffled_held = [replace(p, intervention=q.intervention) for p, q in zip(held, held[1:] + held[:1], strict=True)]
    a = discover_paired(label + held, cfg, feature_bank=False)
    b = discover_paired(label + shuffled_held, cfg, feature_bank=False)
    assert [f.hypothesis.hypothesis_id for f in a.findings] == [f.hypothesis.hypothesis_id for f in b.findings]


def test_sim_styles_are_all_found_in_their_direction() -> None:
    run = discover_paired(sim_pairs(0), config(0.05), feature_bank=False)
    found = styles_found([f.hypothesis for f in run.validated], DEFAULT_STYLES)
    assert set(found) == {s.name for s in DEFAULT_STYLES}, [f.text for f in run.validated]
    assert run.identity_accuracy >= 0.85


# --------------------------------------------------------------------------- the real pairs themselves


def test_hc3_differences_match_the_literature(hc3: list[Pair], hc3_cache: FeatureCache) -> None:
    run = discover_paired(hc3, config(0.05), cache=hc3_cache)
    claims = {(f.hypothesis.scorer.get("name"), f.hypothesis.direction) for f in run.validated}
    # Guo et al. 2023: ChatGPT (intervention) longer, more formal and organised; people first-person
    assert claims & {("words", "intervention"), ("sentences", "intervention")}
    assert ("first_person_singular", "base") in claims
    assert ("formal_connectors", "intervention") in claims
    assert len(run.validated) >= 3 and run.identity_accuracy >= 0.8


def test_helm_summarisers_differ_in_a_few_validated_ways() -> None:
    run = discover_paired(real_pairs("helm"), config(0.05))
    assert len(run.validated) >= 3
    assert 0.6 <= run.identity_accuracy <= (run.feature_bank_accuracy or 1.0) + 0.05
