"""HTTP endpoint for operators: ``/metrics`` (Prometheus) and ``/healthz`` (503 when a service
is stopped or stalled: alive but making no progress while it has lag)."""

from __future__ import annotations

from collections.abc import Callable

import orjson
from aiohttp import web

from services.core.metrics import Health, Metrics


async def start_http(metrics: Metrics, healths: Callable[[], list[Health]], port: int,
                     host: str = "0.0.0.0") -> web.AppRunner:
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
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
