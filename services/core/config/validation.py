"""The validator's section: the error rate, the online-FDR rule and the cascade of tiers.

Each tier kind has its own settings model (only the LLM-backed kinds have an ``llm`` field, only
the generative tier a ``generative_texts``); ``validator.tiers[]`` is a pydantic discriminated
union of them by ``kind``, extended by plug-in tiers through the registry
(services/core/registry.py TIERS; services/core/config/plugins.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import Discriminator, Field, SerializeAsAny, Tag, WrapValidator, field_validator

from services.core.config.base import Strict
from services.core.config.plugins import PLUGIN_TAG, plugin_member, tagger
from services.core.config.stages import LLMConfig
from services.core.registry import TIERS


class BaseTierConfig(Strict):
    """What every tier's settings share.  A tier class names its own subclass as ``config_model``;
    a plug-in tier's model subclasses this one."""

    name: str
    # no "probe" (a classifier on the embeddings that ignores the hypothesis' words): it validated
    # any label on a separable cluster, and its out-of-fold AUC p-values validated 14% of exact
    # nulls at alpha 0.05 (tests/test_validator_null.py): a finding must be a tested description
    kind: str
    max_texts: int = Field(default=60, ge=4)  # held-out texts scored, per side at most
    escalate_band: float = Field(default=0.0, ge=0)  # extra width of the "undecided" band


class KeywordTierConfig(BaseTierConfig):
    """Share of the hypothesis' content words each text contains (free, transparent)."""

    kind: Literal["keyword"] = "keyword"


class EmbeddingTierConfig(BaseTierConfig):
    """Cosine similarity between the hypothesis and each text in the embedder's space."""

    kind: Literal["embedding"] = "embedding"


class LLMTierConfig(BaseTierConfig):
    """An LLM rates how likely each text is from the described side."""

    kind: Literal["llm"] = "llm"
    llm: LLMConfig


class GenerativeTierConfig(BaseTierConfig):
    """The hypothesis tells texts the two models write when prompted by it (services/validator/generative.py)."""

    kind: Literal["generative"] = "generative"
    llm: LLMConfig
    generative_texts: int = Field(default=20, ge=5, le=100)  # generative tier: texts the LLM writes per side


# tier kind -> its settings; the registry (services/core/registry.py TIERS) names the classes
BUILTIN_TIER_CONFIGS: Mapping[str, type[BaseTierConfig]] = MappingProxyType({
    "keyword": KeywordTierConfig, "embedding": EmbeddingTierConfig, "llm": LLMTierConfig,
    "generative": GenerativeTierConfig,
})

# One cascade tier: a discriminated union by ``kind``.
TierConfig = Annotated[
    Annotated[KeywordTierConfig, Tag("keyword")] | Annotated[EmbeddingTierConfig, Tag("embedding")]
    | Annotated[LLMTierConfig, Tag("llm")] | Annotated[GenerativeTierConfig, Tag("generative")]
    | Annotated[SerializeAsAny[BaseTierConfig], Tag(PLUGIN_TAG)],
    Discriminator(tagger("kind", None, BUILTIN_TIER_CONFIGS), custom_error_type="tier_kind_missing",
                  custom_error_message="a tier needs a kind: keyword, embedding, llm, generative or a plug-in's"),
    WrapValidator(plugin_member(TIERS, "kind", None, BUILTIN_TIER_CONFIGS)),
]


class ValidatorConfig(Strict):
    alpha: float = Field(default=0.05, gt=0, lt=1)  # the stated error rate
    fdr: Literal["lord", "bh"] = "lord"
    min_auc: float = Field(default=0.6, ge=0.5, lt=1)  # effect the claim must clear, not just p
    tiers: list[TierConfig] = Field(default_factory=lambda: [
        KeywordTierConfig(name="keyword"),
        EmbeddingTierConfig(name="embedding"),
    ])

    @field_validator("tiers")
    @classmethod
    def _tiers_nonempty(cls, v: list[BaseTierConfig]) -> list[BaseTierConfig]:
        if not v:
            raise ValueError("at least one validation tier is required")
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        return v
