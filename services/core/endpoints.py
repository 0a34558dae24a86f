"""Where each process of an experiment serves ``/metrics`` and ``/healthz``: a Redis hash per
experiment (``<ns>:endpoints:<experiment id>``, one field per process) with the state TTL.

Many processes on one host cannot all have port 9464, and a process that falls back to a free port
is useless unless someone can find it: ``autointerv status`` lists this registry, ``autointerv top
--experiment ID`` scrapes every listed endpoint, and ``--experiment latest`` resolves the
experiment whose process started last.  A process removes its own entry when it stops; one that
died keeps its entry until the TTL, and ``status`` shows it as unreachable.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from services.core.config import Config
from services.core.state import expire_state


@dataclass(frozen=True)
class Endpoint:
    experiment_id: str
    service: str
    pid: int
    host: str  # machine name
    url: str  # base URL: <url>/metrics, <url>/healthz
    started_at: float

    @property
    def field(self) -> str:
        return f"{self.service}@{self.host}:{self.pid}"

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/metrics"

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))


def endpoints_key(namespace: str, experiment_id: str) -> str:
    return f"{namespace}:endpoints:{experiment_id}"


def local_endpoint(experiment_id: str, service: str, bind_host: str, port: int) -> Endpoint:
    """The endpoint of this process: an address others can reach (the host name when bound to all)."""
    host = socket.gethostname()
    reach = host if _binds_every_interface(bind_host) else bind_host
    if ":" in reach:  # a literal IPv6 address
        reach = f"[{reach}]"
    return Endpoint(experiment_id, service, os.getpid(), host, f"http://{reach}:{port}", time.time())


def _binds_every_interface(bind_host: str) -> bool:
    """True for the wildcard addresses (IPv4's or IPv6's unspecified address, or an empty host)."""
    if not bind_host:
        return True
    try:
        return ipaddress.ip_address(bind_host).is_unspecified
    except ValueError:  # a host name
        return False


async def publish_endpoint(redis: Any, cfg: Config, ep: Endpoint) -> None:
    key = endpoints_key(cfg.cache.namespace, ep.experiment_id)
    await redis.hset(key, ep.field, ep.to_json())
    await expire_state(redis, cfg, key)


async def withdraw_endpoint(redis: Any, cfg: Config, ep: Endpoint) -> None:
    await redis.hdel(endpoints_key(cfg.cache.namespace, ep.experiment_id), ep.field)


async def list_endpoints(redis: Any, namespace: str, experiment_id: str) -> list[Endpoint]:
    raw = await redis.hgetall(endpoints_key(namespace, experiment_id))
    eps = [Endpoint(**orjson.loads(v)) for v in raw.values()]
    return sorted(eps, key=lambda e: (e.started_at, e.service))


async def newest_registered_experiment(redis: Any, namespace: str) -> tuple[str, float] | None:
    """(experiment id, start time) of the most recently started registered process, if any."""
    best: tuple[str, float] | None = None
    prefix = endpoints_key(namespace, "")
    async for raw_key in redis.scan_iter(match=prefix + "*", count=1000):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        for ep in await list_endpoints(redis, namespace, key[len(prefix):]):
            if best is None or ep.started_at > best[1]:
                best = (ep.experiment_id, ep.started_at)
    return best
