"""HTTP endpoint for operators: ``/metrics`` (Prometheus) and ``/healthz`` (503 when a service
is stopped or stalled: alive but making no progress while it has lag).

It binds 127.0.0.1 unless ``observability.metrics_host`` says otherwise: metrics name experiments,
topics and hosts, which is nobody else's business.  When the configured port is taken (a second
process on the host) it serves on a free port instead of failing, logs where, and
:func:`serve_endpoints` publishes the address in the experiment's endpoint registry.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from services.core.config import Config
from services.core.endpoints import Endpoint, local_endpoint, publish_endpoint, withdraw_endpoint
from services.core.metrics import Health, Metrics

log = logging.getLogger("autointerv.http")

REGISTRY_TIMEOUT_S = 3.0  # the registry is a convenience: never hold a service up for it


def _app(metrics: Metrics, healths: Callable[[], list[Health]]) -> web.Application:
    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    async def health_view(_: web.Request) -> web.Response:
        report = {}
        ok_all = True
        for h in healths():
            ok, detail = h.status()
            ok_all &= ok
            report[h.service] = {"ok": ok, "detail": detail, "lag": h.lag}
        body = orjson.dumps({"ok": ok_all, "services": report})
        return web.Response(body=body, status=200 if ok_all else 503, content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", health_view)
    app.router.add_get("/readyz", health_view)
    return app


async def start_http(metrics: Metrics, healths: Callable[[], list[Health]], port: int,
                     host: str = "127.0.0.1") -> web.AppRunner:
    """Serve on ``host:port``, or on a free port of ``host`` when ``port`` is taken (see
    :func:`bound_port`)."""
    runner = web.AppRunner(_app(metrics, healths), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            await runner.cleanup()
            raise
        await web.TCPSite(runner, host, 0).start()
        log.warning("metrics port taken; serving on a free port instead",
                    extra={"wanted": port, "port": bound_port(runner), "host": host})
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


@dataclass
class ServedEndpoint:
    """A running HTTP endpoint and its registry entry; :meth:`close` withdraws and stops both."""

    runner: web.AppRunner
    endpoint: Endpoint
    redis: Any
    cfg: Config

    async def close(self) -> None:
        try:
            await asyncio.wait_for(withdraw_endpoint(self.redis, self.cfg, self.endpoint), REGISTRY_TIMEOUT_S)
        except Exception as exc:  # an unreachable Redis leaves the entry to its TTL
            log.info("endpoint not withdrawn", extra={"error": repr(exc)})
        finally:
            await self.redis.aclose()
            await self.runner.cleanup()


async def serve_endpoints(cfg: Config, redis_url: str, metrics: Metrics, healths: Callable[[], list[Health]],
                          service: str) -> ServedEndpoint | None:
    """Start ``/metrics`` and ``/healthz`` for this process (None when ``metrics_port`` is None),
    label its metrics with the experiment, and publish the address in the endpoint registry."""
    obs = cfg.observability
    if obs.metrics_port is None:
        return None
    import redis.asyncio as aioredis

    metrics.label_experiment(cfg.experiment_id)
    runner = await start_http(metrics, healths, obs.metrics_port, obs.metrics_host)
    ep = local_endpoint(cfg.experiment_id, service, obs.metrics_host, bound_port(runner))
    log.info("serving metrics", extra={"url": ep.metrics_url, "service": service})
    client = aioredis.Redis.from_url(redis_url, socket_timeout=REGISTRY_TIMEOUT_S,
                                     socket_connect_timeout=REGISTRY_TIMEOUT_S)
    try:
        await asyncio.wait_for(publish_endpoint(client, cfg, ep), REGISTRY_TIMEOUT_S)
    except Exception as exc:  # serving matters more than being listed
        log.warning("endpoint not published", extra={"url": ep.metrics_url, "error": repr(exc)})
    return ServedEndpoint(runner, ep, client, cfg)
