"""Start-up checks of the servers a run depends on, reported as warnings that say what to change.

The one that matters for weeks-long runs is Redis's eviction policy.  Vectors and LLM responses
carry a TTL (``cache.ttl_s``) and are meant to be evicted under memory pressure; experiment state
(clusterer snapshots, LORD++ wealth, decisions) must survive until the experiment ends.
``volatile-lru``/``volatile-lfu`` with a ``maxmemory`` do exactly that: least-used TTL keys go
first, and state written every few seconds is the most recently used.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("autointerv.checks")

GOOD_POLICIES = ("volatile-lru", "volatile-lfu")
FIX = "set `maxmemory <bytes>` and `maxmemory-policy volatile-lru` (see docs/operations.md)"


def eviction_problems(policy: str, maxmemory: int) -> list[str]:
    """What is wrong with this eviction setup for autointerv, in words (empty when nothing is)."""
    if policy == "noeviction":
        if maxmemory == 0:
            return [f"Redis never evicts (maxmemory-policy noeviction, no maxmemory): cached vectors and "
                    f"LLM responses only leave at their TTL, so memory grows with every new text until "
                    f"the host runs out; {FIX}"]
        return [f"Redis refuses writes when full (maxmemory-policy noeviction): at maxmemory the cache "
                f"stops storing vectors and experiment state cannot be saved; {FIX}"]
    if policy.startswith("allkeys-"):
        return [f"Redis may evict any key (maxmemory-policy {policy}): under memory pressure it can drop "
                f"an experiment's clusterer snapshot, controller rounds or validator decisions mid-run, "
                f"not just cached vectors; {FIX}"]
    if policy == "volatile-random":
        return [f"Redis evicts TTL keys at random (maxmemory-policy volatile-random): vectors a rerun is "
                f"about to reuse go as readily as stale ones; {FIX}"]
    if policy in (*GOOD_POLICIES, "volatile-ttl") and maxmemory == 0:
        return [f"Redis has no maxmemory, so {policy} never applies: memory grows until keys expire "
                f"(cache.ttl_s) or the host runs out; {FIX}"]
    return []


async def redis_eviction_problems(redis: Any) -> list[str]:
    """Read the policy from INFO (works where CONFIG GET is forbidden, as on managed Redis)."""
    info = await redis.info("memory")
    policy = str(info.get("maxmemory_policy", "unknown"))
    maxmemory = int(info.get("maxmemory", 0) or 0)
    return eviction_problems(policy, maxmemory)


async def warn_about_redis(redis_url: str) -> list[str]:
    """Log (and return) the eviction warnings for the Redis at ``redis_url``; an unreachable Redis
    is reported by the services that use it, not here."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        problems = await redis_eviction_problems(client)
    except Exception as exc:
        log.info("eviction policy not checked", extra={"error": repr(exc)})
        return []
    finally:
        await client.aclose()
    for p in problems:
        log.warning(p)
    return problems
