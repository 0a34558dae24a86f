"""Which experiment an operator's command attaches to: ``--experiment ID``, or ``latest``.

``latest`` is the newest of two records: ``<run_dir>/latest`` (the sink points it at the run it
opens, so it names the last run started from this directory) and the endpoint registry in Redis
(every process publishes its experiment there when it starts, wherever its run directory is).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from services.core.config import Config, ConfigError


def latest_from_run_dir(run_dir: Path) -> tuple[str, float] | None:
    """(experiment id, when the link was set) from ``runs/latest`` (or ``runs/LATEST`` where links fail)."""
    link = run_dir / "latest"
    if link.is_symlink():
        return Path(os.readlink(link)).name, link.lstat().st_mtime
    marker = run_dir / "LATEST"
    if marker.is_file():
        name = marker.read_text().strip()
        return (name, marker.stat().st_mtime) if name else None
    return None


async def _registry_latest(redis_url: str, namespace: str) -> tuple[str, float] | None:
    import redis.asyncio as aioredis

    from services.core.endpoints import newest_registered_experiment

    client = aioredis.Redis.from_url(redis_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        return await newest_registered_experiment(client, namespace)
    finally:
        await client.aclose()


def resolve_experiment(cfg: Config, value: str) -> str:
    """``value`` itself, or for ``latest`` the newest experiment either record knows of."""
    if value != "latest":
        return value
    found = [f for f in (latest_from_run_dir(Path(cfg.experiment.run_dir)),) if f]
    if cfg.cache.url:
        try:
            reg = asyncio.run(asyncio.wait_for(_registry_latest(cfg.cache.url, cfg.cache.namespace), 5))
        except Exception:  # Redis down: the run directory may still know
            reg = None
        if reg:
            found.append(reg)
    if not found:
        raise ConfigError(f"--experiment latest: no {cfg.experiment.run_dir}/latest and no endpoint registered "
                          "in Redis (set REDIS_URL, or give the experiment id)")
    return max(found, key=lambda f: f[1])[0]
