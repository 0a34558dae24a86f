"""Build an ``LLMClient`` (and its budget) from config, so services never wire providers by hand."""

from __future__ import annotations

from typing import Any

from services.core.config import Config, LLMConfig
from services.llm.budget import Budget, InProcessBudget, RedisBudget
from services.llm.cache import ResponseCache
from services.llm.client import LLMClient
from services.llm.contract import CallRecorder
from services.llm.providers import PROVIDERS

DEFAULT_CACHE_TTL_S = 30 * 24 * 3600  # like CacheConfig.ttl_s: a month, then re-ask


def make_llm_client(cfg: LLMConfig, *, redis: Any = None, namespace: str = "ai", budget: Budget | None = None,
                    recorder: CallRecorder | None = None,
                    cache_ttl_s: int | None = DEFAULT_CACHE_TTL_S) -> LLMClient:
    """A client for ``cfg.provider``; ``redis`` (a ``redis.asyncio.Redis``) enables the response cache.

    Raises ``MissingAPIKey`` for Anthropic/Gemini when no key is in the environment.
    """
    provider = PROVIDERS[cfg.provider](cfg)
    cache = ResponseCache(redis, namespace, ttl_s=cache_ttl_s) if redis is not None else None
    return LLMClient(provider, cfg, cache=cache, budget=budget, recorder=recorder)


def make_budget(limit_usd: float, *, redis: Any = None, namespace: str = "ai",
                experiment_id: str = "default", ttl_s: int | None = None) -> Budget:
    """A Redis budget shared by all replicas of the experiment, or an in-process one without Redis."""
    if redis is None:
        return InProcessBudget(limit_usd)
    return RedisBudget(redis, namespace, experiment_id, limit_usd, ttl_s=ttl_s)


def experiment_llm_client(cfg: Config, llm: LLMConfig, redis: Any) -> LLMClient:
    """The client every service of an experiment uses: the shared Redis response cache and the
    experiment's one budget (``experiment.budget_usd``), so replicas and tiers never overspend."""
    budget = make_budget(cfg.experiment.budget_usd, redis=redis, namespace=cfg.cache.namespace,
                         experiment_id=cfg.experiment_id, ttl_s=cfg.cache.state_ttl_s)
    return make_llm_client(llm, redis=redis, namespace=cfg.cache.namespace, budget=budget)
