"""Validation tiers: each turns (hypothesis, held-out texts) into one score per text.

The service feeds the scores of the over-represented side's held-out texts (positives) and of the
other side's (negatives) to an AUC test.  Tiers differ in cost and strength:

- ``keyword``: the share of the hypothesis' keywords a text contains.  Free, transparent.
- ``embedding``: cosine similarity between the hypothesis and the text in the embedder's space.
- ``probe``: out-of-fold logistic-regression probability on the texts' embeddings; it ignores the
  words of the hypothesis and shows how separable the two sides are at all (a ceiling).
- ``llm``: an LLM rates 0-100 how likely the text is from the described side.  Texts whose answer
  cannot be parsed are dropped and counted, never scored 0.5.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from services.core.config import TierConfig
from services.core.events import Hypothesis, TextRef


@dataclass
class TierScores:
    pos: list[float]
    neg: list[float]
    calls: int = 0  # LLM calls sent (a call's retries are part of it): re-asks and failures too, not hits or refusals
    cost_usd: float = 0.0  # what those calls were charged in the experiment's budget
    dropped: int = 0
    notes: dict[str, float] = field(default_factory=dict)


def split_holdout(h: Hypothesis, max_per_side: int) -> tuple[list[TextRef], list[TextRef]]:
    pos = [t for t in h.holdout_texts if t.role == h.direction][:max_per_side]
    neg = [t for t in h.holdout_texts if t.role != h.direction][:max_per_side]
    return pos, neg


class Tier(ABC):
    def __init__(self, cfg: TierConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores: ...

    async def aclose(self) -> None:
        pass


class KeywordTier(Tier):
    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores:
        patterns = [re.compile(r"\b" + re.escape(k.lower()) + r"\w*", re.IGNORECASE) for k in h.keywords]

        def s(text: str) -> float:
            return sum(1 for p in patterns if p.search(text)) / len(patterns) if patterns else 0.0

        return TierScores([s(t.text) for t in pos], [s(t.text) for t in neg])


class EmbeddingTier(Tier):
    """Cosine similarity to the hypothesis; texts' vectors come from the shared embedding cache."""

    def __init__(self, cfg: TierConfig, encoder, cache) -> None:
        super().__init__(cfg)
        self.encoder = encoder
        self.cache = cache

    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores:
        from services.embedder.cache import embed_with_cache

        texts = [h.text] + [t.text for t in pos] + [t.text for t in neg]
        vecs, _ = await embed_with_cache(self.cache, self.encoder, texts)
        sims = vecs[1:] @ vecs[0]
        return TierScores(sims[: len(pos)].tolist(), sims[len(pos):].tolist())


class ProbeTier(Tier):
    """Separability ceiling: cross-validated logistic regression on the embeddings."""

    def __init__(self, cfg: TierConfig, encoder, cache, folds: int = 5) -> None:
        super().__init__(cfg)
        self.encoder = encoder
        self.cache = cache
        self.folds = folds

    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        from services.embedder.cache import embed_with_cache

        if min(len(pos), len(neg)) < self.folds:
            return TierScores([], [])
        vecs, _ = await embed_with_cache(self.cache, self.encoder, [t.text for t in pos + neg])
        y = np.array([1] * len(pos) + [0] * len(neg))
        cv = StratifiedKFold(n_splits=self.folds, shuffle=True, random_state=0)
        proba = await asyncio.to_thread(cross_val_predict, LogisticRegression(C=1.0, max_iter=1000), vecs, y,
                                        cv=cv, method="predict_proba")
        p1 = proba[:, 1]
        return TierScores(p1[: len(pos)].tolist(), p1[len(pos):].tolist())


class LLMTier(Tier):
    """0-100 ratings from an LLM; one cached call per (hypothesis, text)."""

    def __init__(self, cfg: TierConfig, client) -> None:
        super().__init__(cfg)
        self.client = client

    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores:
        from services.llm.budget import Spend
        from services.llm.errors import LLMError
        from services.llm.parsing import parse_score
        from services.llm.prompts import score_text_prompt

        spend = Spend()  # every request sent for this hypothesis, re-asks and failures included

        async def one(t: TextRef) -> float | None:
            try:
                return float(await self.client.complete_parsed(
                    score_text_prompt(h.text, t.text), parse_score, purpose=f"validate:{self.cfg.name}",
                    spend=spend))
            except LLMError:
                return None

        scores = await asyncio.gather(*(one(t) for t in pos + neg))
        out = TierScores([s for s in scores[: len(pos)] if s is not None],
                         [s for s in scores[len(pos):] if s is not None])
        out.calls, out.cost_usd = spend.calls, spend.cost_usd
        out.dropped = sum(1 for s in scores if s is None)
        out.notes = {"budget_refused": float(spend.refused)}
        return out

    async def aclose(self) -> None:
        await self.client.aclose()
