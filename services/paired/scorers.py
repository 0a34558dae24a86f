"""Scorers: how a paired hypothesis is checked on held-out pairs, rebuilt from a small JSON spec.

Specs (``make_scorer(spec)``):

* ``{"type": "feature", "name": "words"}``: a feature of the bank (services/paired/features.py);
* ``{"type": "regex", "pattern": "\\bhowever\\b", "measure": "presence" | "rate"}``: keywords and
  phrases (``keyword_spec`` builds one from terms), case-insensitive;
* ``{"type": "direction", "weights": <base64 float16>, "dim": 384, "embedding_model": ...}``: the
  projection of an answer's vector on a direction (the one spec that cannot be small);
* ``{"type": "llm_judge", "axis": "more formal"}``: an LLM compares the two answers of a pair in
  both orders (A/B then B/A), which cancels a judge's preference for a position.

Every scorer returns one score per answer (``PairScores``); the paired test compares them pair by
pair.  Offline scorers are synchronous (``score``); ``ascore`` is the one entry point for all.
"""

from __future__ import annotations

import asyncio
import base64
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from services.paired.features import FeatureCache, TextView, feature
from services.paired.pairs import Pair, have_vectors

if TYPE_CHECKING:
    from services.embedder.encoder import Encoder
    from services.llm.client import LLMClient


@dataclass(frozen=True)
class PairScores:
    """Scores of the held-out pairs a scorer could read (``pair_ids``), one per role and pair."""

    pair_ids: list[str]
    base: np.ndarray
    intervention: np.ndarray
    calls: int = 0  # LLM calls made
    cost_usd: float = 0.0
    dropped: int = 0  # pairs left out because an answer could not be read
    notes: dict[str, float] = field(default_factory=dict)  # the validator's (untrusted texts dropped)


class PairScorer(ABC):
    spec: dict[str, Any]
    binary: bool = False

    @abstractmethod
    def score(self, pairs: Sequence[Pair]) -> PairScores: ...

    async def ascore(self, pairs: Sequence[Pair]) -> PairScores:
        return self.score(pairs)


def _texts(pairs: Sequence[Pair], role: str) -> list[str]:
    return [p.text(role) for p in pairs]


class FeatureScorer(PairScorer):
    def __init__(self, name: str, cache: FeatureCache | None = None) -> None:
        self.feature = feature(name)
        self.spec = {"type": "feature", "name": name}
        self.binary = self.feature.binary
        self.cache = cache

    def score(self, pairs: Sequence[Pair]) -> PairScores:
        prompts = [p.prompt for p in pairs]
        if self.cache is not None and self.feature.name in self.cache.index:
            b = self.cache.column(self.feature.name, _texts(pairs, "base"), prompts)
            i = self.cache.column(self.feature.name, _texts(pairs, "intervention"), prompts)
        else:
            b = np.array([self.feature(p.base, p.prompt) for p in pairs], dtype=float)
            i = np.array([self.feature(p.intervention, p.prompt) for p in pairs], dtype=float)
        return PairScores([p.pair_id for p in pairs], b, i)


def keyword_spec(terms: Sequence[str], measure: str = "presence") -> dict[str, Any]:
    """A regex spec matching any of ``terms`` as whole words (spaces match any whitespace)."""
    alts = [re.escape(t.strip()).replace(r"\ ", r"\s+") for t in terms if t.strip()]
    if not alts:
        raise ValueError("keyword_spec needs at least one non-empty term")
    return {"type": "regex", "pattern": r"(?<![\w'])(?:" + "|".join(alts) + r")(?![\w'])", "measure": measure}


class RegexScorer(PairScorer):
    def __init__(self, pattern: str, measure: str = "presence") -> None:
        if measure not in ("presence", "rate"):
            raise ValueError(f"regex measure must be 'presence' or 'rate', got {measure!r}")
        self.pattern = re.compile(pattern, re.IGNORECASE)
        self.measure = measure
        self.spec = {"type": "regex", "pattern": pattern, "measure": measure}
        self.binary = measure == "presence"

    def one(self, text: str) -> float:
        view = TextView(text)
        return view.has(self.pattern) if self.binary else view.per_100_words(self.pattern)

    def score(self, pairs: Sequence[Pair]) -> PairScores:
        b = np.array([self.one(p.base) for p in pairs], dtype=float)
        i = np.array([self.one(p.intervention) for p in pairs], dtype=float)
        return PairScores([p.pair_id for p in pairs], b, i)


def encode_weights(w: np.ndarray) -> str:
    return base64.b64encode(np.asarray(w, dtype="<f2").tobytes()).decode()


def decode_weights(b64: str, dim: int) -> np.ndarray:
    w = np.frombuffer(base64.b64decode(b64), dtype="<f2").astype(np.float32)
    if w.size != dim:
        raise ValueError(f"direction spec: {w.size} weights for dim {dim}")
    return w


def direction_spec(weights: np.ndarray, embedding_model: str = "") -> dict[str, Any]:
    return {"type": "direction", "weights": encode_weights(weights), "dim": int(np.size(weights)),
            "embedding_model": embedding_model}


class DirectionScorer(PairScorer):
    """Projection on a direction; pairs carry vectors, or an encoder makes them."""

    def __init__(self, spec: dict[str, Any], encoder: Encoder | None = None) -> None:
        self.spec = dict(spec)
        self.weights = decode_weights(spec["weights"], int(spec["dim"]))
        self.encoder = encoder

    def score(self, pairs: Sequence[Pair]) -> PairScores:
        if have_vectors(pairs):
            b = np.stack([p.base_vector for p in pairs])  # type: ignore[arg-type]
            i = np.stack([p.intervention_vector for p in pairs])  # type: ignore[arg-type]
        elif self.encoder is not None:
            b, i = self.encoder.encode(_texts(pairs, "base")), self.encoder.encode(_texts(pairs, "intervention"))
        elif not pairs:
            b = i = np.zeros((0, self.weights.size), dtype=np.float32)
        else:
            raise ValueError("a direction scorer needs pair vectors or an encoder")
        return PairScores([p.pair_id for p in pairs], b @ self.weights, i @ self.weights)


class LLMJudgeScorer(PairScorer):
    """Per pair two calls: (A = base, B = intervention) and the reverse.  Each answer gets a point
    per call that picks it and half a point for "same"; a pair either order could not read is
    dropped (never scored as a tie), so an unreadable judge cannot drift towards "no difference"."""

    def __init__(self, axis: str, client: LLMClient, max_pairs: int | None = None) -> None:
        self.axis = axis
        self.client = client
        self.max_pairs = max_pairs
        self.spec = {"type": "llm_judge", "axis": axis}

    def score(self, pairs: Sequence[Pair]) -> PairScores:
        raise TypeError("the LLM judge is asynchronous: use `await scorer.ascore(pairs)`")

    async def ascore(self, pairs: Sequence[Pair]) -> PairScores:
        from services.llm.client import LLMError
        from services.paired.llm import judge_prompt, parse_choice

        chosen = list(pairs)[: self.max_pairs] if self.max_pairs else list(pairs)

        async def one(p: Pair, intervention_first: bool) -> tuple[str | None, float]:
            a, b = (p.intervention, p.base) if intervention_first else (p.base, p.intervention)
            try:
                choice, resp = await self.client.complete_parsed_with_response(
                    judge_prompt(self.axis, p.prompt, a, b), parse_choice, purpose="paired-judge")
            except LLMError:
                return None, 0.0
            if choice == "same":
                return "same", resp.cost_usd
            picked_intervention = (choice == "A") == intervention_first
            return ("intervention" if picked_intervention else "base"), resp.cost_usd

        results = await asyncio.gather(*(one(p, first) for p in chosen for first in (False, True)))
        ids, b_scores, i_scores, dropped = [], [], [], 0
        for k, p in enumerate(chosen):
            picks = [results[2 * k][0], results[2 * k + 1][0]]
            if None in picks:
                dropped += 1
                continue
            i_pts = sum(1.0 if c == "intervention" else 0.5 if c == "same" else 0.0 for c in picks) / 2.0
            ids.append(p.pair_id)
            i_scores.append(i_pts)
            b_scores.append(1.0 - i_pts)
        return PairScores(ids, np.asarray(b_scores, dtype=float), np.asarray(i_scores, dtype=float),
                          calls=len(results), cost_usd=float(sum(c for _, c in results)), dropped=dropped)


def make_scorer(spec: dict[str, Any], *, cache: FeatureCache | None = None, encoder: Encoder | None = None,
                llm: LLMClient | None = None, max_pairs: int | None = None) -> PairScorer:
    """The scorer a spec describes; the LLM judge needs ``llm``."""
    kind = spec.get("type")
    if kind == "feature":
        return FeatureScorer(str(spec["name"]), cache)
    if kind == "regex":
        return RegexScorer(str(spec["pattern"]), str(spec.get("measure", "presence")))
    if kind == "direction":
        return DirectionScorer(spec, encoder)
    if kind == "llm_judge":
        if llm is None:
            raise ValueError("an llm_judge scorer needs an LLM client")
        return LLMJudgeScorer(str(spec["axis"]), llm, max_pairs)
    raise ValueError(f"unknown scorer type {kind!r} (feature, regex, direction, llm_judge)")
