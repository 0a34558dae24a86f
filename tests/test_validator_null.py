"""Null hypotheses reach the validator: each tier's real decision code, several hundred times.

A null test that waits for the pipeline's own hypotheses tests nothing: on a null run the clusterer
almost never makes a candidate, so no hypothesis reaches a validator.  Here hypotheses with known
truth come from the simulated pair directly (services/hypothesis_sets.py: sim texts, clusters from
the sim's ground truth, labels from the real offline labeler on a label split, scored on held-out
texts): labels swapped between behaviour clusters, labels scored on pair-swapped texts, and labels
scored on "null twins" from a run of two identical models.  Each goes through a real tier
(keyword, embedding with the hashing encoder: these nulls hold whatever the embedding) and
``ValidatorService.decide``:

* exact nulls (pair-swapped, null twins: role and text independent) per hypothesis at level alpha
  (a LORD++ rule that gives its one test the whole alpha) and ``min_auc`` 0.5, the weakest effect
  requirement, so the p-value alone protects: the rate of false validations must be at most
  alpha = 0.05, with enough nulls (>= 589) that a rate of 0.1 fails with probability >= 99%
  (tests/error_rates.py);
* every null, swapped labels included, as shipped (one LORD++ stream at alpha / n_tiers,
  min_auc 0.6): the same bound.  Swapped labels are false descriptions but not exact nulls for
  a tier that reads words: a label's generic words ("honestly", "think") can really be more
  frequent in one behaviour's texts than in the base texts;
* swapped labels alone, as shipped: at most alpha with 99% confidence (84 of them: this catches
  gross failures only).  The keyword tier validates none (0/84; 4/84 at min_auc 0.5).  The
  embedding tier validates 33 of 84 (a known defect, marked xfail strict): its score, the cosine
  between the claim and a text, differs between two sides that differ in anything, so a wrong
  label on a real difference clears min_auc about half the time (with MiniLM, bench/cascade.py:
  17% of swapped labels and 56% of near misses);
* the planted counterpart: the true hypotheses (each behaviour cluster's own label on its held-out
  texts) validate at a high rate, so a validator that rejects everything fails too.

The probe tier (a classifier on the embeddings, blind to the words) was removed after this test:
its out-of-fold AUC validated 89 of 616 exact nulls (14%) at level 0.05, and it validates any label
on a separable cluster; the config now rejects it.  The LLM and generative tiers need LLMs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from error_rates import CONFIDENCE, check_rate, max_false, trials_for
from scipy.stats import binom

from services.core.bus import Topics
from services.core.config import Config, ConfigError, EmbedderConfig, load_config
from services.core.metrics import Metrics
from services.core.runtime import ServiceContext
from services.embedder.hashing import HashingEncoder
from services.hypothesis_sets import HypothesisSet, Labelled, MemoEncoder, build_set
from services.stats.fdr import LordPlusPlus
from services.validator.service import ValidatorService, build_tier
from services.validator.tiers import split_holdout

ALPHA = 0.05  # the shipped validator.alpha
REPLICAS = 7  # 88 exact nulls a replica (>= 589 in all) and 12 swapped labels
NULLS = ("swapped", "pair_swapped", "null_twin")
EXACT_NULLS = ("pair_swapped", "null_twin")
TIERS = ("keyword", "embedding")


@pytest.fixture(scope="module")
def hypothesis_set() -> HypothesisSet:
    import asyncio

    return asyncio.run(build_set(REPLICAS, 20, sources=("true", *NULLS)))


@pytest.fixture(scope="module")
def encoder() -> Iterator[MemoEncoder]:
    yield MemoEncoder(HashingEncoder(EmbedderConfig(backend="hashing")))


def tier_config(kind: str, min_auc: float) -> Config:
    return load_config(None, environ={}, overrides={
        "embedder": {"backend": "hashing"},
        "validator": {"alpha": ALPHA, "min_auc": min_auc, "tiers": [{"name": kind, "kind": kind}]}})


async def decisions(cfg: Config, encoder: MemoEncoder, items: list[Labelled], *, per_hypothesis: bool
                    ) -> list[str]:
    """Each hypothesis' decision by the validator service's own ``decide`` on its tier's scores."""
    ctx = ServiceContext(cfg, "in-process:0", "redis://in-process:0", Metrics(), Topics("null"))
    svc = ValidatorService(ctx, 0)

    async def given() -> MemoEncoder:
        return encoder

    tier = await build_tier(cfg, cfg.validator.tiers[0], encoder=given, cache=lambda: None,
                            llm_client=lambda llm: None)  # type: ignore[arg-type,return-value]
    stream = svc.new_lord()
    out = []
    try:
        for x in items:
            pos, neg = split_holdout(x.hypothesis, svc.tier_cfg.max_texts)
            scores = await tier.score(x.hypothesis, pos, neg)
            # per hypothesis: a LORD++ rule whose single test gets the whole alpha
            lord = LordPlusPlus(ALPHA, w0=ALPHA, horizon=1) if per_hypothesis else stream
            out.append(svc.decide(x.hypothesis, scores, lord).decision)
    finally:
        await tier.aclose()
        await svc.producer.stop()
    return out


def test_the_bound_tells_alpha_from_twice_alpha() -> None:
    n = trials_for(ALPHA)
    assert n == 589 and max_false(n, ALPHA) == 42
    assert binom.sf(max_false(n, ALPHA), n, ALPHA) <= 1 - CONFIDENCE  # honest system: fails <= 1%
    assert binom.cdf(max_false(n, ALPHA), n, 2 * ALPHA) <= 1 - CONFIDENCE  # at 2 alpha: passes <= 1%


def test_a_tier_blind_to_the_words_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"validator\.tiers\.0\.kind"):
        tier_config("probe", min_auc=0.6)


def test_the_set_has_enough_nulls_of_every_kind(hypothesis_set: HypothesisSet) -> None:
    counts = Counter(x.source for x in hypothesis_set.items)
    assert counts == {"true": 4 * REPLICAS, "swapped": 12 * REPLICAS, "pair_swapped": 44 * REPLICAS,
                      "null_twin": 44 * REPLICAS}
    assert len(hypothesis_set.of(*EXACT_NULLS)) >= trials_for(ALPHA)
    for x in hypothesis_set.items:  # the labeler never saw a text it is validated on
        assert {t.text_id for t in x.hypothesis.holdout_texts}.isdisjoint(x.hypothesis.label_text_ids)
        pos, neg = split_holdout(x.hypothesis, 60)
        assert min(len(pos), len(neg)) >= 10, (x.source, x.cluster)


@pytest.mark.parametrize("kind", TIERS)
async def test_null_hypotheses_are_validated_at_most_at_alpha(kind: str, hypothesis_set: HypothesisSet,
                                                              encoder: MemoEncoder) -> None:
    exact = hypothesis_set.of(*EXACT_NULLS)
    strict = await decisions(tier_config(kind, min_auc=0.5), encoder, exact, per_hypothesis=True)
    by_source = Counter(x.source for x, d in zip(exact, strict, strict=True) if d == "validated")
    check_rate(sum(by_source.values()), len(exact), ALPHA, f"{kind} tier, exact nulls at level alpha "
               f"per hypothesis (false validations by source: {dict(by_source)})")
    nulls = hypothesis_set.of(*NULLS)
    shipped = await decisions(tier_config(kind, min_auc=0.6), encoder, nulls, per_hypothesis=False)
    by_source = Counter(x.source for x, d in zip(nulls, shipped, strict=True) if d == "validated")
    check_rate(sum(by_source.values()), len(nulls), ALPHA, f"{kind} tier as shipped ({dict(by_source)})")


@pytest.mark.parametrize("kind", [
    "keyword",
    pytest.param("embedding", marks=pytest.mark.xfail(strict=True, reason=(
        "known defect: the embedding tier validates wrong labels on clusters that really differ "
        "(33 of 84 swapped labels); an XPASS means it was fixed: drop this mark"))),
])
async def test_swapped_labels_are_not_validated_at_the_shipped_min_auc(kind: str, hypothesis_set: HypothesisSet,
                                                           encoder: MemoEncoder) -> None:
    swapped = hypothesis_set.of("swapped")
    got = await decisions(tier_config(kind, min_auc=0.6), encoder, swapped, per_hypothesis=True)
    assert got.count("validated") <= max_false(len(swapped), ALPHA), f"{got.count('validated')}/{len(swapped)}"


@pytest.mark.parametrize("kind", TIERS)
async def test_true_hypotheses_are_validated(kind: str, hypothesis_set: HypothesisSet,
                                             encoder: MemoEncoder) -> None:
    """The planted counterpart: a tier that rejects everything fails here."""
    true = hypothesis_set.of("true")
    got = await decisions(tier_config(kind, min_auc=0.6), encoder, true, per_hypothesis=False)
    missed = [x.cluster for x, d in zip(true, got, strict=True) if d != "validated"]
    assert len(missed) <= 0.1 * len(true), f"{kind}: not validated: {Counter(missed)}"
