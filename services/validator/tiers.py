"""Validation tiers: each turns (hypothesis, held-out texts) into one score per text.

The service feeds the scores of the over-represented side's held-out texts (positives) and of the
other side's (negatives) to an AUC test.  Tiers differ in cost and strength:

- ``keyword``: the share of the hypothesis' own content words a text contains (its text minus stop
  words and the words that frame a claim: "model", "compared", "often", ...).  Free, transparent.
  It reads the words the hypothesis states, never ``Hypothesis.keywords`` (which an LLM labeler
  may not state at all), so it validates only what the text says.
- ``embedding``: cosine similarity between the hypothesis and the text in the embedder's space.

Every tier reads the hypothesis' claim (``claim_of``: without the example text the offline labeler
appends), so what is validated is what the hypothesis says, not the words of a sample text.
- ``llm``: an LLM rates 0-100 how likely the text is from the described side.  Texts whose answer
  cannot be parsed are dropped and counted, never scored 0.5.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from services.core.config import (
    BaseTierConfig,
    EmbeddingTierConfig,
    KeywordTierConfig,
    LLMTierConfig,
)
from services.core.events import Hypothesis, TextRef
from services.hypothesizer.offline import TOKEN_PATTERN, claim_of

if TYPE_CHECKING:
    from services.core.config import Config, LLMConfig

# words that frame a claim (who is compared with whom, how often) rather than say what the texts hold
FRAME_WORDS = frozenset({
    "model", "models", "base", "intervention", "compared", "comparison", "often", "frequently", "usually",
    "tends", "tend", "likely", "writes", "write", "writing", "written", "wrote", "texts", "text", "mention",
    "mentions", "mentioning", "typical", "typically", "uses", "use", "using", "talks", "talk", "discusses",
    "discuss", "contains", "contain", "output", "outputs", "response", "responses", "answer", "answers",
    "side", "sides",
})


@dataclass
class TierScores:
    pos: list[float]
    neg: list[float]
    calls: int = 0  # LLM calls sent (a call's retries are part of it): re-asks and failures too, not hits or refusals
    cost_usd: float = 0.0  # what those calls were charged in the experiment's budget
    dropped: int = 0
    notes: dict[str, float] = field(default_factory=dict)


def split_refs(refs: list[TextRef], direction: str, max_per_side: int) -> tuple[list[TextRef], list[TextRef]]:
    """(texts of the described side, texts of the other side), at most ``max_per_side`` each."""
    pos = [t for t in refs if t.role == direction][:max_per_side]
    neg = [t for t in refs if t.role != direction][:max_per_side]
    return pos, neg


def split_holdout(h: Hypothesis, max_per_side: int) -> tuple[list[TextRef], list[TextRef]]:
    """The message's own held-out texts split by side: for offline hypothesis sets built from
    trusted data (benchmarks, null tests).  The service judges only ``trusted_holdout``'s texts."""
    return split_refs(h.holdout_texts, h.direction, max_per_side)


@dataclass(frozen=True)
class TierDeps:
    """What a tier may need from the process that builds it; callers (the validator service, the
    cascade benchmark, the null test) differ only in where these come from."""

    encoder: Callable[[], Awaitable[Any]]  # the process's one embedding model (loaded on first call)
    cache: Callable[[], Any]  # the embedding cache, or None
    llm_client: Callable[[LLMConfig], Any]  # an LLM client spending the experiment's one budget


class Tier(ABC):
    """One validation tier.  A tier class names its settings model (``config_model``, validated at
    start-up under ``validator.tiers[]``) and builds itself from it with :meth:`build`; it is found
    by its ``kind`` through services/core/registry.py TIERS (docs/extending.md: a plug-in tier)."""

    config_model: ClassVar[type[BaseTierConfig]] = BaseTierConfig
    # False for a tier that never reads held-out texts (the generative tier writes its own): the
    # service then neither looks them up nor requires any
    reads_holdout: ClassVar[bool] = True

    def __init__(self, cfg: BaseTierConfig) -> None:
        self.cfg = cfg

    @classmethod
    async def build(cls, cfg: Config, tier_cfg: Any, deps: TierDeps) -> Tier:
        """A ready tier for ``tier_cfg`` (an instance of ``config_model``); the default needs nothing."""
        return cls(tier_cfg)

    @abstractmethod
    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores: ...

    async def aclose(self) -> None:
        pass


def hypothesis_words(text: str) -> list[str]:
    """The content words a hypothesis claims, in order, each once, lower-cased and lightly stemmed
    (a plural "s" dropped, so "cats" also finds "cat"); stop words and FRAME_WORDS removed.  An
    example text the offline labeler appends is an illustration, not the claim: its words (the
    opener, the topic) made swapped labels validate on other clusters (27 of 84 at min_auc 0.6)."""
    out: list[str] = []
    for w in re.findall(TOKEN_PATTERN, claim_of(text).lower()):
        if w in ENGLISH_STOP_WORDS or w in FRAME_WORDS:
            continue
        stem = w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
        if stem not in out:
            out.append(stem)
    return out


class KeywordTier(Tier):
    """Share of the hypothesis' content words (prefix match) found in each text."""

    config_model = KeywordTierConfig

    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores:
        patterns = [re.compile(r"\b" + re.escape(w) + r"\w*", re.IGNORECASE) for w in hypothesis_words(h.text)]

        def s(text: str) -> float:
            return sum(1 for p in patterns if p.search(text)) / len(patterns) if patterns else 0.0

        return TierScores([s(t.text) for t in pos], [s(t.text) for t in neg])


class EmbeddingTier(Tier):
    """Cosine similarity to the hypothesis; texts' vectors come from the shared embedding cache."""

    config_model = EmbeddingTierConfig

    def __init__(self, cfg: BaseTierConfig, encoder, cache) -> None:
        super().__init__(cfg)
        self.encoder = encoder
        self.cache = cache

    @classmethod
    async def build(cls, cfg: Config, tier_cfg: EmbeddingTierConfig, deps: TierDeps) -> Tier:
        return cls(tier_cfg, await deps.encoder(), deps.cache())

    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores:
        from services.embedder.cache import embed_with_cache

        texts = [claim_of(h.text)] + [t.text for t in pos] + [t.text for t in neg]
        vecs, _ = await embed_with_cache(self.cache, self.encoder, texts)
        sims = vecs[1:] @ vecs[0]
        return TierScores(sims[: len(pos)].tolist(), sims[len(pos):].tolist())


class LLMTier(Tier):
    """0-100 ratings from an LLM; one cached call per (hypothesis, text)."""

    config_model = LLMTierConfig

    def __init__(self, cfg: LLMTierConfig, client) -> None:
        super().__init__(cfg)
        self.client = client

    @classmethod
    async def build(cls, cfg: Config, tier_cfg: LLMTierConfig, deps: TierDeps) -> Tier:
        return cls(tier_cfg, deps.llm_client(tier_cfg.llm))

    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores:
        from services.llm.budget import Spend
        from services.llm.errors import LLMError
        from services.llm.parsing import parse_score
        from services.llm.prompts import score_text_prompt

        spend = Spend()  # every request sent for this hypothesis, re-asks and failures included

        async def one(t: TextRef) -> float | None:
            try:
                return float(await self.client.complete_parsed(
                    score_text_prompt(claim_of(h.text), t.text), parse_score, purpose=f"validate:{self.cfg.name}",
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
