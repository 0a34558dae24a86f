"""Runs services in one process: the whole pipeline (``autointerv run``), one service
(``autointerv service NAME``), or the whole pipeline on the in-memory bus in burst mode
(statistics tests and benchmarks).  The same service classes run one per container in
deployments; nothing here is needed there except :func:`run_single`.

There is one way to wire the pipeline, :func:`build_services`; the bus is the only thing that
differs between a Kafka run and an in-memory run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.core.bus import Bus, KafkaBus
from services.core.clock import Clock, SystemClock, VirtualClock
from services.core.config import Config
from services.core.events import Event
from services.core.http import serve_endpoints
from services.core.infra import Endpoints, infrastructure
from services.core.memory_bus import MemoryBus, Observer
from services.core.metrics import Metrics
from services.core.progress import PlainProgress
from services.core.progress import snapshot as progress_snapshot
from services.core.registry import SERVICES, UnknownExtension
from services.core.resources import Resources
from services.core.runtime import InfrastructureLost, Service, ServiceContext
from services.core.topics import Topics
from services.core.topology import Topology

log = logging.getLogger("autointerv.run")
STEP_GRACE_S = 10.0  # on top of bus.shutdown_timeout_s: the step a service is in when told to stop


def pipeline_classes() -> list[type[Service]]:
    """The pipeline's services, in declaration order (the topology orders them)."""
    from services.clusterer import ClustererService
    from services.controller import ControllerService
    from services.embedder import EmbedderService
    from services.generator import GeneratorService
    from services.hypothesizer import HypothesizerService
    from services.paired.service import PairedService
    from services.sink import SinkService
    from services.validator import ValidatorService

    return [ControllerService, GeneratorService, EmbedderService, ClustererService, HypothesizerService,
            PairedService, ValidatorService, SinkService]


def build_services(ctx: ServiceContext, exclude: Iterable[str] = (),
                   replace: Mapping[str, type[Service]] | None = None) -> dict[str, Service]:
    """Every pipeline service instance for one experiment, keyed by display name, in start order.
    ``exclude`` names service kinds to leave out (the sink in statistics runs); ``replace`` swaps a
    kind's class for a subclass (a benchmark's oracle controller)."""
    skip = set(exclude)
    swap = dict(replace or {})
    classes = [swap.get(cls.name, cls) for cls in pipeline_classes() if cls.name not in skip]
    services = [svc for cls in classes for svc in cls.instances(ctx)]
    topo = Topology.of(services)
    by_name = {s.display_name: s for s in services}
    return {name: by_name[name] for name in topo.start_order}


def make_context(cfg: Config, bus: Bus, redis_url: str, *, clock: Clock | None = None,
                 metrics: Metrics | None = None, resources: Resources | None = None) -> ServiceContext:
    return ServiceContext(cfg, getattr(bus, "bootstrap", bus.address), redis_url, metrics or Metrics(),
                          bus.topics, bus=bus, clock=clock or SystemClock(), resources=resources or Resources())


def declared_topology(cfg: Config) -> Topology:
    """The topology the config's pipeline declares (services are built, never started)."""
    from services.core.memory_bus import MemoryBus

    ctx = make_context(cfg, MemoryBus(cfg.bus, Topics(cfg.bus.topic_prefix)), "redis://unused")
    return Topology.of(build_services(ctx).values())


def expected_groups(cfg: Config) -> list[str]:
    """Consumer groups the pipeline's services use for this experiment (see Service.group_id)."""
    return declared_topology(cfg).groups()


def topic_names(cfg: Config) -> list[str]:
    """Physical names of every topic the pipeline reads or writes."""
    topics = Topics(cfg.bus.topic_prefix)
    return [topics.name(t) for t in declared_topology(cfg).topics()]


@dataclass
class RunOutcome:
    run_dir: Path | None
    finished: bool
    reason: str
    wall_s: float
    progress: dict[str, object] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)


def _install_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)


def _run_dir(services: dict[str, Service]) -> Path | None:
    sink = services.get("sink")
    return Path(sink.run_dir) if sink is not None else None  # type: ignore[attr-defined]


async def run_pipeline_async(cfg: Config, ep: Endpoints, console: Console | None = None) -> RunOutcome:
    """The whole pipeline on Kafka: every service's loop as a task, until the controller says the
    experiment is finished, a service stops, or a signal arrives."""
    bus = KafkaBus(cfg.bus, ep.bootstrap, Topics(cfg.bus.topic_prefix))
    ctx = make_context(cfg, bus, ep.redis_url)
    services = build_services(ctx)
    await bus.ensure_topics(ctx.topics.name(t) for t in Topology.of(services.values()).topics())
    served = await serve_endpoints(cfg, ep.redis_url, ctx.metrics, lambda: [s.health for s in services.values()],
                                   service="pipeline")
    stop_requested = asyncio.Event()
    _install_signals(stop_requested.set)
    tasks = {name: asyncio.create_task(svc.run(), name=name) for name, svc in services.items()}
    controller = services["controller"]
    t0 = time.time()
    reason = "finished"
    show = console is not None and cfg.observability.progress and console.is_terminal
    live = Live(_progress_table(controller, ctx.metrics, t0), console=console, refresh_per_second=2,
                transient=True) if show else contextlib.nullcontext()
    # without a terminal (CI, nohup, a log file): a plain line every few seconds instead
    plain = (PlainProgress(cfg.controller.max_texts) if console is not None and cfg.observability.progress
             and not console.is_terminal else None)
    cause: str | None = None
    try:
        with live:
            while True:
                crashed = [n for n, t in tasks.items() if t.done()]
                if crashed:
                    exc = tasks[crashed[0]].exception()
                    reason = f"service {crashed[0]} stopped: {exc}"
                    cause = "infrastructure_lost" if isinstance(exc, InfrastructureLost) else "service_failed"
                    break
                if controller.finished():
                    break
                if stop_requested.is_set():
                    reason = "interrupted (signal); work in flight was committed"
                    cause = "signal"
                    break
                if show:
                    live.update(_progress_table(controller, ctx.metrics, t0))
                elif plain is not None:
                    plain.maybe_print(progress_snapshot(controller.progress(), ctx.metrics), sys.stdout)
                await asyncio.sleep(0.25)
    finally:
        _tell_sink(services, cause)  # before the stop: the sink finalizes in its teardown
        await _stop_all(services, tasks)
        await _finalize_all(services)
        await bus.close()
        if plain is not None:
            plain.maybe_print(progress_snapshot(controller.progress(), ctx.metrics), sys.stdout, force=True)
        if served is not None:
            await served.close()
    return RunOutcome(_run_dir(services), reason == "finished", reason, time.time() - t0, controller.progress(),
                      services)


async def _stop_all(services: dict[str, Service], tasks: dict[str, asyncio.Task[None]]) -> None:
    """Stop in topology stop order (producers first) so downstream services drain what is in flight."""
    for name in Topology.of(services.values()).stop_order:
        services[name].stop()
    any_cfg = next(iter(services.values())).cfg
    # each service's own drain is bounded (bus.shutdown_timeout_s); this bounds the step in flight too
    _, late = await asyncio.wait(tasks.values(), timeout=any_cfg.bus.shutdown_timeout_s + STEP_GRACE_S)
    for task in late:
        log.error("service did not stop in time; cancelled", extra={"service": task.get_name()})
        task.cancel()
    results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    for name, res in zip(tasks, results, strict=True):
        if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
            log.error("service ended with an error", extra={"service": name, "error": repr(res)})


def _tell_sink(services: dict[str, Service], cause: str | None) -> None:
    """Why the run ended when the controller did not announce it (summary.json's stopped_because)."""
    sink = services.get("sink")
    if sink is not None and cause is not None:
        sink.stop_cause = cause  # type: ignore[attr-defined]


async def _finalize_all(services: dict[str, Service]) -> None:
    for name, svc in services.items():
        try:
            await svc.finalize()
        except Exception:
            log.exception("finalize failed", extra={"service": name})


def _progress_table(controller: Service, metrics: Metrics, t0: float) -> Table:
    p = controller.progress()
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


# --------------------------------------------------------------------------- in memory (burst mode)


@dataclass
class MemoryRun(RunOutcome):
    bus: MemoryBus | None = None
    clock: VirtualClock | None = None


class MemoryPipeline:
    """The pipeline on the in-memory bus, in burst mode (see services.core.memory_bus):
    deterministic for a given config, seconds instead of minutes.  Redis is real.

    ``async with MemoryPipeline(cfg, redis_url) as p: await p.run(until)`` starts the services in
    start order, and stops, drains and finalizes them in stop order on exit; ``run`` may be called
    again (a fault test stops Redis between two calls).  ``observers`` see every published record
    in order; ``exclude`` leaves service kinds out (the sink, when a statistics run needs no run
    directory) and ``only`` keeps just these kinds (a test of the validator cascade); ``replace``
    swaps service classes (see build_services); ``inputs`` are published before the first step."""

    def __init__(self, cfg: Config, redis_url: str, *, observers: Sequence[Observer] = (),
                 exclude: Iterable[str] = (), only: Iterable[str] | None = None, inputs: Sequence[Event] = (),
                 replace: Mapping[str, type[Service]] | None = None, resources: Resources | None = None) -> None:
        self.bus = MemoryBus(cfg.bus, Topics(cfg.bus.topic_prefix))
        self.bus.observers.extend(observers)
        self.clock = VirtualClock()
        self.ctx = make_context(cfg, self.bus, redis_url, clock=self.clock, resources=resources)
        kinds = set(only) if only is not None else None
        self.services = {n: s for n, s in build_services(self.ctx, exclude=exclude, replace=replace).items()
                         if kinds is None or s.name in kinds}
        self.topology = Topology.of(self.services.values())
        self.inputs = list(inputs)
        self._started: list[Service] = []
        self.t0 = time.perf_counter()

    async def __aenter__(self) -> MemoryPipeline:
        await self.bus.ensure_topics(self.ctx.topics.name(t) for t in self.topology.topics())
        for svc in self.services.values():  # start order: readers before writers
            await svc.start()
            self._started.append(svc)
        feeder = self.bus.producer("autointerv/inputs")
        for ev in self.inputs:
            await feeder.send(ev)
        return self

    async def run(self, until: Callable[[], bool] | None = None, max_idle_s: float = 600.0) -> str:
        """Step every service until ``until()``, a service is finished, or nothing moves for
        ``max_idle_s`` virtual seconds (10 without a controller)."""
        order = [self.services[n] for n in self.topology.stop_order]
        idle_limit = max_idle_s if "controller" in self.services else min(max_idle_s, 10.0)
        return await self.bus.run_until_idle(order, self.clock, until=until, max_idle_s=idle_limit)

    async def __aexit__(self, *exc: object) -> None:
        for svc in reversed(self._started):  # stop order
            svc.stop()
            await svc.close()
        await _finalize_all(self.services)

    def outcome(self, reason: str) -> MemoryRun:
        controller = self.services.get("controller")
        progress = controller.progress() if controller is not None else {}
        ok = reason.startswith("finished") or reason == "until" or (controller is None and reason.startswith("idle"))
        return MemoryRun(_run_dir(self.services), ok, reason, time.perf_counter() - self.t0, progress,
                         self.services, bus=self.bus, clock=self.clock)


async def run_memory_pipeline(cfg: Config, redis_url: str, *, until: Callable[[], bool] | None = None,
                              max_idle_s: float = 600.0, **kwargs: Any) -> MemoryRun:
    """One whole run of :class:`MemoryPipeline` (keyword arguments as there)."""
    pipeline = MemoryPipeline(cfg, redis_url, **kwargs)
    async with pipeline:
        reason = await pipeline.run(until, max_idle_s)
    return pipeline.outcome(reason)


# --------------------------------------------------------------------------- single service


def service_factory(name: str) -> type[Service]:
    """The service class ``name`` stands for: a built-in, an ``autointerv.services`` entry point, or
    a ``module:obj`` reference (``autointerv service --app``); SystemExit saying why otherwise."""
    if ":" not in name and SERVICES.target(name) is None:
        raise SystemExit(f"unknown service {name!r}; known: {', '.join(SERVICES.names())} "
                         "(or --app module:obj for one that is not packaged)")
    try:
        cls = SERVICES.load(name)
    except UnknownExtension as exc:
        raise SystemExit(str(exc)) from None
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise SystemExit(f"service {name!r} is {cls!r}, not a Service class (services.sdk.consumer makes one "
                         "from a function)")
    return cls


async def run_single_async(cfg: Config, ep: Endpoints, name: str, tier: str | None = None) -> None:
    bus = KafkaBus(cfg.bus, ep.bootstrap, Topics(cfg.bus.topic_prefix))
    ctx = make_context(cfg, bus, ep.redis_url)
    factory = service_factory(name)
    if name == "validator":
        names = [t.name for t in cfg.validator.tiers]
        if tier and tier not in names:
            raise SystemExit(f"unknown tier {tier!r}; configured: {', '.join(names)}")
        svc: Service = factory(ctx, tier_index=names.index(tier) if tier else 0)  # type: ignore[call-arg]
    else:
        svc = factory(ctx)
    # the pipeline's topics, and a plug-in's own (an alerts topic no built-in service declares)
    await bus.ensure_topics(dict.fromkeys([*topic_names(cfg), *(ctx.topics.name(t) for t in
                                                              [*svc.inputs(), *svc.outputs()])]))
    svc.exit_when_finished = True  # a process started for this run ends with it (ControlEvent "finished")
    served = await serve_endpoints(cfg, ep.redis_url, ctx.metrics, lambda: [svc.health], service=svc.display_name)
    _install_signals(svc.stop)
    try:
        await svc.run()
    finally:
        await svc.finalize()
        await bus.close()
        if served is not None:
            await served.close()


def run_single(cfg: Config, name: str, tier: str | None = None) -> None:
    with infrastructure(cfg.bus.bootstrap, cfg.cache.url, Path(cfg.experiment.data_dir)) as ep:
        asyncio.run(run_single_async(cfg, ep, name, tier))
