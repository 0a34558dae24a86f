"""The paired-contrast discovery path, start to end, on a list of pairs (no broker needed).

1. Split pairs once by a hash of their id: label pairs (proposers) and held-out pairs (tests).
2. Propose from label pairs only: features of the bank, log-odds phrases, the embedding
   direction's two ends (when pairs carry vectors), LLM axes (when an LLM client is given); keep
   what the label split supports, drop repeats, order by label evidence.  The list is final
   before any held-out pair is scored.
3. Test each hypothesis on held-out pairs with ``decide_paired`` in that order, through ONE
   LORD++ stream at ``validator.alpha``.  Until the first rejection its levels are a fixed
   sequence that sums to at most w0 = alpha/2, so under the global null P(any validation) <= alpha/2
   by a union bound, however the tests depend on each other.
4. Report the embedding direction's held-out AUC with its pair-swap p-value (are the two models
   distinguishable at all? evidence beside the findings, not a finding) and the pair identity
   accuracy of the validated findings.

A streaming service runs the same proposers, scorers and ``decide_paired``; only this loop differs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from services.core.config import Config
from services.paired.decision import decide_paired
from services.paired.direction import (
    Direction,
    DirectionTest,
    describe_direction_ends,
    direction_ends,
    find_embedding_direction,
    how_distinguishable,
)
from services.paired.features import FeatureCache
from services.paired.hypotheses import PairedFinding, PairedHypothesis
from services.paired.identity import identity_accuracy_of
from services.paired.pairs import Pair, have_vectors, split_pairs, with_vectors
from services.paired.proposers import drop_redundant, find_features_that_differ, find_phrases_that_distinguish, screen
from services.paired.scorers import FeatureScorer, make_scorer
from services.stats.fdr import LordPlusPlus

if TYPE_CHECKING:
    from services.embedder.encoder import Encoder
    from services.llm.client import LLMClient

Embed = Callable[[list[str]], np.ndarray]


@dataclass
class PairedRun:
    findings: list[PairedFinding]  # every tested hypothesis, in test order
    n_pairs: int
    n_label: int
    n_held: int
    n_proposed: int  # before screening and deduplication
    alpha: float
    direction: DirectionTest | None = None
    identity_accuracy: float = 0.5  # of the validated findings' offline scorers
    feature_bank_accuracy: float | None = None  # every bank feature: what simple features allow
    lord: dict[str, Any] = field(default_factory=dict)

    @property
    def validated(self) -> list[PairedFinding]:
        return [f for f in self.findings if f.decision == "validated"]

    def summary(self) -> dict[str, Any]:
        return {
            "pairs": self.n_pairs, "label_pairs": self.n_label, "held_out_pairs": self.n_held,
            "proposed": self.n_proposed, "tested": len(self.findings), "validated": len(self.validated),
            "alpha": self.alpha, "identity_accuracy": self.identity_accuracy,
            "feature_bank_accuracy": self.feature_bank_accuracy,
            "direction": None if self.direction is None else vars(self.direction),
            "findings": [f.to_dict() for f in self.findings],
        }


async def propose_paired(label_pairs: Sequence[Pair], cfg: Config, *, cache: FeatureCache,
                         llm: LLMClient | None = None, embed: Embed | None = None,
                         seed: int = 0) -> tuple[list[PairedHypothesis], int, Direction | None]:
    """(hypotheses in test order, how many were proposed before screening, the direction if fit)."""
    pc = cfg.paired
    offline = find_features_that_differ(label_pairs, cache) + find_phrases_that_distinguish(label_pairs, pc, cache)
    direction = None
    if pc.direction and have_vectors(label_pairs):
        direction = find_embedding_direction(label_pairs, pc.direction_c, cfg.embedder.model)
        if direction is not None:
            offline += describe_direction_ends(direction, label_pairs, pc, cache)
    kept = drop_redundant(screen(offline, label_pairs, pc, cache), label_pairs, pc, cache)
    n_proposed = len(offline)
    if llm is not None:
        from services.paired.llm import ask_llm_for_axes, ask_llm_to_name_ends, deduplicate

        axes = await ask_llm_for_axes(label_pairs, llm, pc, seed=seed, embed=embed)
        if direction is not None:
            top, bottom = direction_ends(direction, label_pairs, pc.direction_end_texts)
            axes += await ask_llm_to_name_ends([t for t, _ in top], [t for t, _ in bottom], llm)
        n_proposed += len(axes)
        kept += deduplicate(axes, pc.dedupe_similarity, embed)
    return kept[: pc.max_hypotheses], n_proposed, direction


async def discover_paired_async(pairs: Sequence[Pair], cfg: Config, *, llm: LLMClient | None = None,
                                encoder: Encoder | None = None, embed: Embed | None = None,
                                cache: FeatureCache | None = None, seed: int = 0,
                                feature_bank: bool = True) -> PairedRun:
    """Propose on label pairs, decide every proposal on held-out pairs, measure identity accuracy.

    ``cache`` keeps feature rows between calls on the same texts (pair-swap nulls); ``embed``
    deduplicates LLM axes by meaning (default: the encoder's vectors, else word overlap); with an
    ``encoder`` and pairs without vectors, the pairs are encoded for the direction;
    ``feature_bank=False`` skips the all-features reference accuracy.
    """
    pc = cfg.paired
    cache = cache if cache is not None else FeatureCache()
    if encoder is not None:
        embed = embed or encoder.encode
        if pc.direction and pairs and not have_vectors(pairs):
            pairs = with_vectors(pairs, encoder.encode([p.base for p in pairs]),
                                 encoder.encode([p.intervention for p in pairs]))
    label, held = split_pairs(pairs, pc.label_fraction)
    hypotheses, n_proposed, direction = await propose_paired(label, cfg, cache=cache, llm=llm, embed=embed, seed=seed)
    lord = LordPlusPlus(cfg.validator.alpha)
    findings = []
    for h in hypotheses:  # the order is fixed: nothing above read a held-out pair
        scorer = make_scorer(h.scorer, cache=cache, encoder=encoder, llm=llm, max_pairs=pc.llm_judge_pairs)
        scores = await scorer.ascore(held)
        d = decide_paired(scores, h.direction, lord, pc)
        findings.append(PairedFinding(h, d.decision, d.result, d.level, d.reason, scores.calls, scores.cost_usd))
    run = PairedRun(findings, len(pairs), len(label), len(held), n_proposed, cfg.validator.alpha, lord=lord.to_dict())
    if direction is not None and have_vectors(held):
        run.direction = how_distinguishable(direction, held, pc.direction_swaps, seed)
    offline = [make_scorer(f.hypothesis.scorer, cache=cache, encoder=encoder) for f in run.validated
               if f.hypothesis.scorer.get("type") != "llm_judge"]
    run.identity_accuracy = identity_accuracy_of(offline, label, held)
    if feature_bank:
        run.feature_bank_accuracy = identity_accuracy_of([FeatureScorer(f.name, cache) for f in cache.features],
                                                         label, held)
    return run


def discover_paired(pairs: Sequence[Pair], cfg: Config, **kw: Any) -> PairedRun:
    """`discover_paired_async` for callers without an event loop."""
    return asyncio.run(discover_paired_async(pairs, cfg, **kw))
