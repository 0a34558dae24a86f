"""A contract battery for services, in the spirit of River's ``check_estimator``.

``await check_service(cls, cfg, inputs, redis_url)`` runs a service class (a built-in, a plug-in,
a ``services.sdk.consumer``) on the in-memory bus (services/core/memory_bus.py, the same runtime
loop as on Kafka) with real Redis, feeding it ``inputs`` (records of its input topics, e.g. what
one run of the real pipeline published there: :func:`record_pipeline`), and checks what every
service promises (services/core/runtime.py):

- ``redelivery``: the consumer group's committed offsets are lost and every record is delivered
  again to a fresh instance (the state it saved in Redis survives, as after a crash): it emits
  nothing that the first delivery did not (the same event ids with the same content, or nothing);
- ``poison``: undecodable records and records that decode but break the schema, mixed in with
  the inputs, each end up in the dead letters once (with the record's topic and offset), and the
  rest of the output is what the clean run emitted;
- ``state``: stopped half-way (state saved, as on SIGTERM) and restarted from Redis, the service
  ends with the output of the uninterrupted run: its state round-trips through bytes;
- ``batch_cuts``: delivered one record per poll, or seven, the output is that of the default polls.

Outputs are compared by (topic, event id, content), ignoring wall-clock stamps and timings
(``created_at``, ``generated_at``, ``seconds``).  A failed check raises :class:`ContractViolation` saying what differed.
"""

from __future__ import annotations

import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from services.core.clock import VirtualClock
from services.core.config import Config
from services.core.context import ServiceContext
from services.core.contract_data import (
    DEAD_LETTER_FILE,
    POISON_EVERY,
    VOLATILE_FIELDS,
    ContractViolation,
    Input,
    Output,
    Run,
    Timed,
    input_topics,
    inputs_for,
    output_of,
    poison_pair,
    record_pipeline,
    run_files,
    with_poison,
)
from services.core.events import DeadLetter
from services.core.memory_bus import MemoryBus
from services.core.metrics import Metrics
from services.core.resources import Resources
from services.core.runtime import Service
from services.core.topics import Topics

__all__ = ["CHECKS", "DEAD_LETTER_FILE", "IDLE_S", "POISON_EVERY", "VOLATILE_FIELDS", "ContractViolation",
           "Harness", "Input", "Output", "Run", "ServiceCheck", "Timed", "check_service", "input_topics",
           "inputs_for", "output_of", "poison_pair", "record_pipeline", "run_files", "with_poison"]

CHECKS = ("redelivery", "poison", "state", "batch_cuts")
IDLE_S = 30.0  # virtual seconds without any progress that end a run (timers fire several times)


class Harness:
    """One service's instances on a fresh memory bus and a fresh Redis namespace; can be stopped,
    have its committed offsets lost, and be started again on the same bus and state."""

    def __init__(self, make: Callable[[ServiceContext], list[Service]], cfg: Config, redis_url: str, *,
                 resources: Resources, max_poll_records: int | None = None, timed: Timed | None = None,
                 files: bool = False) -> None:
        run = uuid.uuid4().hex[:8]
        bus_cfg = cfg.bus.model_copy(update={"max_poll_records": max_poll_records or cfg.bus.max_poll_records})
        self.cfg = cfg.model_copy(update={
            "bus": bus_cfg,
            "cache": cfg.cache.model_copy(update={"namespace": f"{cfg.cache.namespace}-contract-{run}"}),
            "experiment": cfg.experiment.model_copy(update={"run_dir": tempfile.mkdtemp(prefix="contract-")}),
        })
        self.make = make
        self.timed = timed
        self.files = files
        self.topics = Topics(cfg.bus.topic_prefix)
        self.bus = MemoryBus(bus_cfg, self.topics)
        self.clock = VirtualClock()
        self.ctx = ServiceContext(self.cfg, "memory", redis_url, Metrics(), self.topics, bus=self.bus,
                                  clock=self.clock, resources=resources)
        self.services: list[Service] = []
        self.fed: set[int] = set()  # bus sequence numbers of the records fed in (not outputs)

    def feed(self, inputs: Sequence[Input]) -> None:
        for rec in inputs:
            self.fed.add(self.bus.append(self.topics.name(rec.topic), rec.value, rec.key, list(rec.headers)).seq)

    async def start(self) -> None:
        self.services = self.make(self.ctx)
        topics = {t for s in self.services for t in [*s.inputs(), *s.outputs()]}
        await self.bus.ensure_topics(self.topics.name(t) for t in sorted(topics))
        for svc in self.services:
            await svc.start()

    async def run(self) -> str:
        return await self.bus.run_until_idle(self.services, self.clock, max_idle_s=IDLE_S)

    async def stop(self) -> None:
        for svc in reversed(self.services):
            svc.stop()
            await svc.close()
        for svc in self.services:
            await svc.finalize()

    def lose_commits(self) -> None:
        for svc in self.services:
            self.bus.group(svc.group_id()).committed.clear()

    def mark(self) -> int:
        return len(self.emitted().outputs)

    def readers(self, topic: str) -> int:
        """Instances that consume the logical ``topic`` (each dead-letters a bad record of it)."""
        return sum(1 for s in self.services if topic in s.inputs())

    def _output_topics(self) -> list[str]:
        return sorted({t for s in self.services for t in s.outputs()})

    def emitted(self, skip: int = 0) -> Run:
        """Records published on the services' output topics, in publish order, after the first ``skip``."""
        recs = sorted((r for t in self._output_topics() for r in self.bus.records(self.topics.name(t))
                       if r.seq not in self.fed), key=lambda r: r.seq)[skip:]
        run = Run([o for r in recs if (o := output_of(self.topics, r, self.timed)) is not None])
        if self.files:
            run.files = run_files(Path(self.cfg.experiment.run_dir))
        run.dead_letters = [DeadLetter.from_bytes(r.value) for r in recs
                            if self.topics.logical(r.topic) == DeadLetter.topic]
        return run


def _diff(what: str, want: Counter[Output], got: Counter[Output]) -> str:
    missing = sorted({(o.topic, o.event_id) for o in want - got})
    extra = sorted({(o.topic, o.event_id) for o in got - want})
    return (f"{what}: {sum(want.values())} records expected, {sum(got.values())} emitted; "
            f"missing or changed {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"new {extra[:5]}{' ...' if len(extra) > 5 else ''}")


def _changed(before: Counter[Output], new: Counter[Output]) -> str:
    """For an event re-emitted with other content: the first such pair, to see what changed."""
    old = {(o.topic, o.event_id): o for o in before}
    for o in new:
        was = old.get((o.topic, o.event_id))
        if was is not None and was != o:
            return f"; {o.topic} {o.event_id} changed: " + "; ".join(
                f"{path}: {a!r} -> {b!r}" for path, a, b in _differences(orjson.loads(was.digest),
                                                                         orjson.loads(o.digest))[:5])
    return ""


def _differences(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path or ".", a, b)]


@dataclass
class ServiceCheck:
    """The battery for one service class: see the module docstring."""

    make: Callable[[ServiceContext], list[Service]]
    cfg: Config
    inputs: list[Input]
    redis_url: str
    resources: Resources = field(default_factory=Resources)
    timed: Timed | None = None
    files: bool = False
    ran: dict[str, str] = field(default_factory=dict)

    def harness(self, max_poll_records: int | None = None) -> Harness:
        return Harness(self.make, self.cfg, self.redis_url, resources=self.resources,
                       max_poll_records=max_poll_records, timed=self.timed, files=self.files)

    async def once(self, inputs: Sequence[Input], max_poll_records: int | None = None) -> Run:
        h = self.harness(max_poll_records)
        h.feed(inputs)
        await h.start()
        try:
            await h.run()
        finally:
            await h.stop()
        return h.emitted()

    async def baseline_and_redelivery(self) -> Run:
        h = self.harness()
        h.feed(self.inputs)
        await h.start()
        await h.run()
        await h.stop()
        base = h.emitted()
        mark = h.mark()
        h.lose_commits()
        await h.start()
        try:
            await h.run()
        finally:
            await h.stop()
        after = h.emitted(skip=mark)
        again = after.emitted()
        new = Counter(set(again) - set(base.emitted()))  # the same event again is not new
        if new:
            raise ContractViolation(_diff("redelivered inputs emitted something new", Counter(), new)
                                    + _changed(base.results(), new))
        if after.files != base.files:  # written rows: redelivered ones must be deduplicated
            raise ContractViolation(_diff("rows written after redelivery", base.files, after.files))
        self.ran["redelivery"] = f"{sum(again.values())} records re-emitted, all as before"
        return base

    async def poison(self, base: Run) -> None:
        mixed, n_poison = with_poison(self.inputs, self.cfg.experiment_id)
        h = self.harness()
        h.feed(mixed)
        await h.start()
        try:
            await h.run()
        finally:
            await h.stop()
        got = h.emitted()
        expected = sum(h.readers(i.topic) for i in mixed if i.headers and i.headers[-1][1].startswith(b"poison-"))
        bad = [d for d in got.dead_letters if d.original_headers.get("ce_id", "").startswith("poison-")]
        where = {(d.service, d.source_topic, d.source_partition, d.source_offset) for d in bad}
        if len(bad) != expected or len(where) != expected:
            raise ContractViolation(f"{n_poison} poison records ({expected} deliveries), {len(bad)} dead letters "
                                    f"for them: {[(d.source_topic, d.source_offset, d.reason[:60]) for d in bad][:6]}")
        if got.results() != base.results():
            raise ContractViolation(_diff("with poison records mixed in", base.results(), got.results())
                                    + _changed(base.results(), got.results()))
        self.ran["poison"] = f"{n_poison} poison records isolated; the rest as in the clean run"

    async def state(self, base: Run) -> None:
        half = len(self.inputs) // 2
        h = self.harness()
        h.feed(self.inputs[:half])
        await h.start()
        await h.run()
        await h.stop()  # drain: state saved, offsets committed
        h.feed(self.inputs[half:])
        await h.start()
        try:
            await h.run()
        finally:
            await h.stop()
        done = h.emitted()  # events in flight at the stop may be published twice: compared as sets
        if set(done.emitted()) != set(base.emitted()) or done.files != base.files:
            got = Counter(set(done.emitted())) + done.files
            want = Counter(set(base.emitted())) + base.files
            raise ContractViolation(_diff(f"restarted after {half} of {len(self.inputs)} inputs", want, got)
                                    + _changed(want, got))
        self.ran["state"] = f"restart after {half} inputs: same output"

    async def batch_cuts(self, base: Run, sizes: Sequence[int]) -> None:
        for size in sizes:
            got = await self.once(self.inputs, max_poll_records=size)
            if got.results() != base.results():
                raise ContractViolation(_diff(f"{size} record(s) per poll", base.results(), got.results())
                                        + _changed(base.results(), got.results()))
        self.ran["batch_cuts"] = f"{', '.join(map(str, sizes))} record(s) per poll: same output"


async def check_service(cls: type[Service] | Callable[[ServiceContext], list[Service]], cfg: Config,
                        inputs: Sequence[Input], redis_url: str, *, checks: Sequence[str] = CHECKS,
                        resources: Resources | None = None, timed: Timed | None = None,
                        files: bool = False, batch_sizes: Sequence[int] = (1, 7)) -> dict[str, str]:
    """Run the battery (``checks``, a subset of :data:`CHECKS`) on ``cls`` (a Service class, whose
    ``instances`` are run together, or a function of the context returning instances); what each
    check found, by name.  Raises ContractViolation on the first broken promise.

    ``timed`` names outputs that a clock sets, not the input stream (a topic, or some fields of its
    events): the clusterer's snapshots come every ``snapshot_every_s``, so what they hold depends
    on how much had arrived by then, and its uncertainty events name the latest snapshot.  They are
    left out of every comparison; everything else must agree.  ``files``: the service's result is
    also what it writes under ``experiment.run_dir`` (the sink: :func:`run_files`).  ``batch_sizes``:
    the records per poll that ``batch_cuts`` tries (the default poll is ``bus.max_poll_records``)."""
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; known: {', '.join(CHECKS)}")
    make = cls.instances if isinstance(cls, type) else cls
    if not inputs:
        raise ValueError("check_service needs inputs: records of the service's input topics")
    battery = ServiceCheck(make, cfg, list(inputs), redis_url, resources or Resources(), timed, files)
    base = await battery.baseline_and_redelivery() if "redelivery" in checks else await battery.once(battery.inputs)
    if not base.results():
        raise ContractViolation("the clean run emitted nothing: the inputs do not exercise the service")
    if "poison" in checks:
        await battery.poison(base)
    if "state" in checks:
        await battery.state(base)
    if "batch_cuts" in checks:
        await battery.batch_cuts(base, batch_sizes)
    return battery.ran


