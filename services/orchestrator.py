"""Runs services in one process: the whole pipeline (``autointerv run``) or one service
(``autointerv service NAME``).  The same service classes run one per container in deployments;
nothing here is needed there except :func:`run_single`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.core.bus import ESCALATION_PREFIX, Topics, ensure_topics
from services.core.config import Config
from services.core.http import start_http
from services.core.infra import Endpoints, infrastructure
from services.core.metrics import Metrics
from services.core.runtime import Service, ServiceContext, generator_group_suffix, group_name, plugin_registry

log = logging.getLogger("autointerv.run")


def expected_groups(cfg: Config) -> list[str]:
    """Consumer groups the pipeline's services use for this experiment (see Service.group_id)."""
    names = (["generator" + generator_group_suffix(cfg.generator.roles)]
             + ["embedder", "clusterer", "hypothesizer", "controller", "sink"]
             + [f"validator.{t.name}" for t in cfg.validator.tiers])
    return [group_name(cfg.bus.topic_prefix, cfg.experiment_id, n) for n in names]


def topic_names(cfg: Config) -> list[str]:
    topics = Topics(cfg.bus.topic_prefix)
    return topics.all(ESCALATION_PREFIX + t.name for t in cfg.validator.tiers[1:])


async def prepare(cfg: Config, ep: Endpoints) -> tuple[ServiceContext, Metrics]:
    await ensure_topics(ep.bootstrap, topic_names(cfg), cfg.bus.partitions, cfg.bus.replication_factor)
    metrics = Metrics()
    return ServiceContext(cfg, ep.bootstrap, ep.redis_url, metrics, Topics(cfg.bus.topic_prefix)), metrics


def build_services(ctx: ServiceContext) -> dict[str, Service]:
    """All pipeline services for one experiment, keyed by a display name."""
    from services.clusterer import ClustererService
    from services.controller import ControllerService
    from services.embedder import EmbedderService
    from services.generator import GeneratorService
    from services.hypothesizer import HypothesizerService
    from services.sink import SinkService
    from services.validator import ValidatorService

    services: dict[str, Service] = {
        "sink": SinkService(ctx),
        "clusterer": ClustererService(ctx),
        "embedder": EmbedderService(ctx),
        "generator": GeneratorService(ctx),
        "hypothesizer": HypothesizerService(ctx),
    }
    for i, tier in enumerate(ctx.cfg.validator.tiers):
        services[f"validator:{tier.name}"] = ValidatorService(ctx, tier_index=i)
    services["controller"] = ControllerService(ctx)
    return services


@dataclass
class RunOutcome:
    run_dir: Path
    finished: bool
    reason: str
    wall_s: float
    progress: dict[str, object] = field(default_factory=dict)


def _install_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)


async def run_pipeline_async(cfg: Config, ep: Endpoints, console: Console | None = None) -> RunOutcome:
    ctx, metrics = await prepare(cfg, ep)
    services = build_services(ctx)
    runner = None
    if cfg.observability.metrics_port is not None:
        try:
            runner = await start_http(metrics, lambda: [s.health for s in services.values()],
                                      cfg.observability.metrics_port)
        except OSError as exc:
            log.warning("metrics endpoint not started", extra={"port": cfg.observability.metrics_port,
                                                               "error": str(exc)})
    stop_requested = asyncio.Event()
    _install_signals(stop_requested.set)
    tasks = {name: asyncio.create_task(svc.run(), name=name) for name, svc in services.items()}
    controller = services["controller"]
    t0 = time.time()
    reason = "finished"
    show = console is not None and cfg.observability.progress
    live = Live(_progress_table(controller, metrics, t0), console=console, refresh_per_second=2,
                transient=True) if show else contextlib.nullcontext()
    try:
        with live:
            while True:
                crashed = [n for n, t in tasks.items() if t.done()]
                if crashed:
                    exc = tasks[crashed[0]].exception()
                    reason = f"service {crashed[0]} stopped: {exc!r}"
                    break
                if controller.finished():
                    break
                if stop_requested.is_set():
                    reason = "interrupted (signal); work in flight was committed"
                    break
                if show:
                    live.update(_progress_table(controller, metrics, t0))
                await asyncio.sleep(0.25)
    finally:
        await _stop_all(services, tasks)
        sink = services["sink"]
        await sink.finalize()
        if runner is not None:
            await runner.cleanup()
    progress = controller.progress() if hasattr(controller, "progress") else {}
    return RunOutcome(Path(sink.run_dir), reason == "finished", reason, time.time() - t0, progress)


async def _stop_all(services: dict[str, Service], tasks: dict[str, asyncio.Task[None]]) -> None:
    """Stop producers first so downstream services can drain what is already in flight."""
    order = ["controller", "generator", "embedder", "clusterer", "hypothesizer"]
    order += [n for n in services if n.startswith("validator:")] + ["sink"]
    for name in order:
        services[name].stop()
    results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    for name, res in zip(tasks, results, strict=True):
        if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
            log.error("service ended with an error", extra={"service": name, "error": repr(res)})


def _progress_table(controller: Service, metrics: Metrics, t0: float) -> Table:
    p = controller.progress() if hasattr(controller, "progress") else {}
    t = Table(title=f"autointerv — {time.time() - t0:5.0f}s", show_header=True, header_style="bold")
    for col in ("round", "texts planned", "generated", "embedded", "clustered", "candidates", "hypotheses",
                "validated", "dead letters"):
        t.add_column(col, justify="right")
    gen = metrics.total("generator_texts_total")
    emb = metrics.total("records_processed_total", service="embedder", topic="texts")
    dl = metrics.total("dead_letters_total")
    t.add_row(str(p.get("round", "")), str(p.get("planned", "")), f"{gen:.0f}", f"{emb:.0f}",
              str(p.get("clustered", "")), str(p.get("candidates", "")), str(p.get("hypotheses", "")),
              str(p.get("validated", "")), f"{dl:.0f}")
    return t


def run_pipeline(cfg: Config, console: Console | None = None) -> RunOutcome:
    with infrastructure(cfg.bus.bootstrap, cfg.cache.url, Path(cfg.experiment.data_dir)) as ep:
        return asyncio.run(run_pipeline_async(cfg, ep, console))


# --------------------------------------------------------------------------- single service


def service_factory(name: str) -> Callable[[ServiceContext], Service]:
    builtin = {
        "generator": "services.generator:GeneratorService",
        "embedder": "services.embedder:EmbedderService",
        "clusterer": "services.clusterer:ClustererService",
        "hypothesizer": "services.hypothesizer:HypothesizerService",
        "validator": "services.validator:ValidatorService",
        "controller": "services.controller:ControllerService",
        "sink": "services.sink:SinkService",
    }
    plugins = plugin_registry()
    if name in plugins:
        return plugins[name].load()
    if name in builtin:
        from importlib import import_module

        module, _, cls = builtin[name].partition(":")
        return getattr(import_module(module), cls)
    known = sorted(set(builtin) | set(plugins))
    raise SystemExit(f"unknown service {name!r}; known: {', '.join(known)}")


async def run_single_async(cfg: Config, ep: Endpoints, name: str, tier: str | None = None) -> None:
    ctx, metrics = await prepare(cfg, ep)
    factory = service_factory(name)
    if name == "validator":
        names = [t.name for t in cfg.validator.tiers]
        index = names.index(tier) if tier else 0
        if tier and tier not in names:
            raise SystemExit(f"unknown tier {tier!r}; configured: {', '.join(names)}")
        svc = factory(ctx, tier_index=index)
    else:
        svc = factory(ctx)
    runner = None
    if cfg.observability.metrics_port is not None:
        runner = await start_http(metrics, lambda: [svc.health], cfg.observability.metrics_port)
    _install_signals(svc.stop)
    try:
        await svc.run()
    finally:
        if hasattr(svc, "finalize"):
            await svc.finalize()
        if runner is not None:
            await runner.cleanup()


def run_single(cfg: Config, name: str, tier: str | None = None) -> None:
    with infrastructure(cfg.bus.bootstrap, cfg.cache.url, Path(cfg.experiment.data_dir)) as ep:
        asyncio.run(run_single_async(cfg, ep, name, tier))
