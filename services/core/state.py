"""Per-experiment Redis state: one TTL for all of it (``cache.state_ttl_s``) and one way to delete it.

Services keep their state under ``<namespace>:<kind>:<experiment id>[:<more>]`` (the controller's
rounds, the clusterer's snapshot, each validator tier's LORD++ wealth and decisions, the shared LLM
budget, the endpoint registry, the generator's text store: services/core/text_store.py).  Every
write refreshes the key's TTL, so a running experiment never loses state, and a finished or
abandoned one is gone ``state_ttl_s`` after its last write instead of piling up for ever.
``autointerv clean EXPERIMENT`` deletes it at once.

Embedding vectors and LLM responses are *not* per-experiment: they are shared, content-addressed
caches with their own TTL (``cache.ttl_s``) and survive a clean, so a rerun still hits them.
"""

from __future__ import annotations

import re
from typing import Any

from services.core.config import Config

# Key kinds that hold one experiment's state.  A service that adds per-experiment keys adds its kind
# here, so `clean` finds them; shared caches (vectors, LLM responses) must never be listed.
STATE_KINDS: tuple[str, ...] = ("controller", "clusterer", "lord", "decided", "budget", "endpoints", "texts")


def state_ttl(cfg: Config) -> int | None:
    return cfg.cache.state_ttl_s


async def expire_state(redis: Any, cfg: Config, *keys: str) -> None:
    """Refresh the TTL of state keys just written (one round trip; a no-op when TTLs are off)."""
    ttl = state_ttl(cfg)
    if ttl and keys:
        pipe = redis.pipeline(transaction=False)
        for k in keys:
            pipe.expire(k, ttl)
        await pipe.execute()


def expire_in_pipeline(pipe: Any, cfg: Config, *keys: str) -> None:
    """Queue the TTL refresh in a pipeline the caller executes (atomic with its writes)."""
    ttl = state_ttl(cfg)
    if ttl:
        for k in keys:
            pipe.expire(k, ttl)


def state_key_pattern(namespace: str, experiment_id: str) -> re.Pattern[str]:
    """Exactly the keys of one experiment: ``ns:<kind>:<id>`` or ``ns:<kind>:<id>:...``.  A glob
    alone is not enough: ``ai:*:keyword`` would also match tier "keyword" of another experiment."""
    kinds = "|".join(map(re.escape, STATE_KINDS))
    return re.compile(rf"^{re.escape(namespace)}:(?:{kinds}):{re.escape(experiment_id)}(?::.*)?$")


def _glob_escape(s: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", s)


async def experiment_keys(redis: Any, namespace: str, experiment_id: str) -> list[str]:
    """Every state key of one experiment, found with SCAN (never KEYS: it blocks the server)."""
    wanted = state_key_pattern(namespace, experiment_id)
    exp = _glob_escape(experiment_id)
    found: set[str] = set()
    for glob in (f"{_glob_escape(namespace)}:*:{exp}", f"{_glob_escape(namespace)}:*:{exp}:*"):
        async for raw in redis.scan_iter(match=glob, count=1000):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            if wanted.match(key):
                found.add(key)
    return sorted(found)


async def clean_experiment(redis: Any, namespace: str, experiment_id: str) -> list[str]:
    """Delete one experiment's state; return the keys deleted."""
    keys = await experiment_keys(redis, namespace, experiment_id)
    for i in range(0, len(keys), 500):
        await redis.delete(*keys[i:i + 500])
    return keys
