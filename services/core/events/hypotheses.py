"""Hypotheses and their validations (the hypothesizer's and the validator tiers' output)."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import Field

from services.core.events.base import Event, Role
from services.core.events.clustering import TextRef


class Hypothesis(Event):
    topic: ClassVar[str] = "hypotheses"
    type: ClassVar[str] = "autointerv.hypothesis.proposed"

    hypothesis_id: str
    candidate_id: str
    cluster_id: int
    direction: Role  # the side the description is about
    text: str  # the claim, in words
    # paired: a style contrast between the two answers to one prompt (services/paired), checked by
    # ``scorer`` on held-out pairs; candidate_id is "paired:<experiment>" and cluster_id -1
    kind: Literal["contrastive", "templated", "paired"] = "contrastive"
    labeler: str  # "offline:log-odds", "llm:openai:gpt-4o-mini", ...
    keywords: list[str] = Field(default_factory=list)
    label_text_ids: list[str] = Field(default_factory=list)  # what the labeler saw
    holdout_texts: list[TextRef] = Field(default_factory=list)  # for validators only
    cluster_evidence: dict[str, float] = Field(default_factory=dict)  # share diff, CI, e-value
    siblings: int = 1  # hypotheses proposed for the same candidate (the controller waits for all of them)
    scorer: dict[str, Any] = Field(default_factory=dict)  # paired: make_scorer spec (services/paired/scorers.py)
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return self.hypothesis_id

    @property
    def text_ids(self) -> list[str]:
        """Every text of the cluster behind it: what the labeler saw, then the held-out ones."""
        return self.label_text_ids + [t.text_id for t in self.holdout_texts]


class Validation(Event):
    topic: ClassVar[str] = "validations"
    type: ClassVar[str] = "autointerv.hypothesis.validated"

    validation_id: str
    hypothesis_id: str
    tier: str
    tier_index: int
    decision: Literal["validated", "rejected", "escalated"]
    auc: float | None = None  # None for templated share hypotheses (decided by the share test)
    auc_ci: tuple[float, float] | None = None
    p_value: float
    alpha_level: float  # the level the online FDR rule gave this test
    n_pos: int
    n_neg: int
    effect: dict[str, float] = Field(default_factory=dict)  # e.g. share difference and its CI
    calls: int = 0  # scorer calls this tier made (LLM calls for LLM tiers)
    cost_usd: float = 0.0
    hypothesis: Hypothesis | None = None  # carried for sinks and the next tier
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return self.validation_id
