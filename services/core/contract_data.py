"""What the contract battery (services/core/contract.py) feeds a service and compares: recorded
input records, poison records, and published records reduced to what must agree between runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from services.core.config import Config
from services.core.context import ServiceContext
from services.core.events import DeadLetter, Envelope
from services.core.memory_bus import MemoryBus, Record
from services.core.metrics import Metrics
from services.core.runtime import Service
from services.core.topics import Topics

VOLATILE_FIELDS = frozenset({"created_at", "generated_at", "seconds"})  # wall-clock stamps and timings
IDLE_S = 30.0  # virtual seconds without any progress that end a run (timers fire several times)
DEAD_LETTER_FILE = "dead_letters."  # the sink's copy of the dead-letter topic
POISON_EVERY = 5  # one poison pair after every this many inputs of a topic


class ContractViolation(AssertionError):
    """A service broke a promise of the runtime contract; the message says which and how."""


@dataclass(frozen=True)
class Input:
    """One record of a service's input topic, as published (logical topic name)."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Output:
    """One published record, reduced to what must agree between runs."""

    topic: str
    event_id: str
    digest: bytes  # the payload without VOLATILE_FIELDS, keys sorted


@dataclass
class Run:
    outputs: list[Output] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    files: Counter[Output] = field(default_factory=Counter)  # what a sink wrote (see run_files)

    def emitted(self) -> Counter[Output]:
        """What the service published, dead letters aside."""
        return Counter(o for o in self.outputs if o.topic != DeadLetter.topic)

    def results(self) -> Counter[Output]:
        """What the service published (dead letters aside) and wrote."""
        return self.emitted() + self.files


def run_files(directory: Path) -> Counter[Output]:
    """The rows a sink wrote under ``directory``: every line of its ``*.jsonl`` logs and every row of
    its ``*.parquet`` tables (reports, summaries and configs carry wall-clock times and are left out;
    so are its dead letters, as on the bus)."""
    import pyarrow.parquet as pq

    out: Counter[Output] = Counter()
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.name.startswith(DEAD_LETTER_FILE):
            continue
        rows: list[Any] = []
        if path.suffix == ".jsonl":
            rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
        elif path.suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        for row in rows:
            digest = orjson.dumps(_without_stamps(row), option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)
            out[Output(rel, "", digest)] += 1
    return out


Timed = Mapping[str, frozenset[str] | None]  # logical topic -> fields set by a clock (None: all of it)


def output_of(topics: Topics, rec: Record, timed: Timed | None = None) -> Output | None:
    """The record reduced to what must agree; None for a topic published on a clock."""
    logical = topics.logical(rec.topic)
    skip = VOLATILE_FIELDS
    if timed and logical in timed:
        fields = timed[logical]
        if fields is None:
            return None
        skip = skip | fields
    env = Envelope.from_headers(rec.headers)
    event_id = env.id if env is not None else f"offset:{rec.partition}:{rec.offset}"
    try:
        payload = _without_stamps(orjson.loads(rec.value), skip)
    except orjson.JSONDecodeError as exc:
        raise ContractViolation(f"published a {topics.logical(rec.topic)} record that is not JSON ({exc}): "
                                f"{rec.value[:300]!r}") from None
    return Output(logical, event_id, orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))


def _without_stamps(value: Any, skip: frozenset[str] = VOLATILE_FIELDS) -> Any:
    """``value`` without the ``skip`` fields at any depth (a validation carries its hypothesis)."""
    if isinstance(value, dict):
        return {k: _without_stamps(v, skip) for k, v in value.items() if k not in skip}
    if isinstance(value, list):
        return [_without_stamps(v, skip) for v in value]
    return value


def poison_pair(topic: str, experiment_id: str, n: int) -> list[Input]:
    """Two bad records for ``topic``: bytes that are not JSON, and JSON that breaks the schema."""
    headers = (("ce_experiment_id", experiment_id.encode()), ("ce_id", f"poison-{n}".encode()))
    return [Input(topic, b"\xff\x00 not an event " + str(n).encode(), None, headers),
            Input(topic, orjson.dumps({"experiment_id": experiment_id, "poison": n}), None, headers)]


def with_poison(inputs: Sequence[Input], experiment_id: str) -> tuple[list[Input], int]:
    """``inputs`` with a poison pair after every POISON_EVERY-th record of each topic (at least one
    per topic); the number of poison records."""
    out: list[Input] = []
    seen: Counter[str] = Counter()
    n = 0
    for rec in inputs:
        out.append(rec)
        seen[rec.topic] += 1
        if seen[rec.topic] % POISON_EVERY == 1:
            out.extend(poison_pair(rec.topic, experiment_id, n))
            n += 2
    return out, n




def inputs_for(records: Sequence[Record], topics: Topics, wanted: Sequence[str]) -> list[Input]:
    """The recorded records of the logical topics ``wanted``, in publish order."""
    keep = set(wanted)
    return [Input(topics.logical(r.topic), r.value, r.key, tuple(r.headers)) for r in records
            if topics.logical(r.topic) in keep]


def input_topics(make: Callable[[ServiceContext], list[Service]], cfg: Config) -> list[str]:
    """Logical input topics of the instances ``make`` builds (built, never started)."""
    topics = Topics(cfg.bus.topic_prefix)
    ctx = ServiceContext(cfg, "memory", "redis://unused", Metrics(), topics, bus=MemoryBus(cfg.bus, topics))
    return sorted({t for s in make(ctx) for t in s.inputs()})


async def record_pipeline(cfg: Config, redis_url: str, **kwargs: Any) -> list[Record]:
    """Every record one run of the shipped pipeline publishes on the memory bus (the sink left
    out): inputs for the battery that are what the services really see."""
    from services.orchestrator import run_memory_pipeline  # the orchestrator builds on core, not the reverse

    seen: list[Record] = []
    run = await run_memory_pipeline(cfg, redis_url, observers=[seen.append], exclude=("sink",), **kwargs)
    if not run.finished:
        raise RuntimeError(f"the recording run did not finish: {run.reason}")
    return seen
