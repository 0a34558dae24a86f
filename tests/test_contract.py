"""The contract battery (services/core/contract.py) on every shipped service and every plug-in
example, fed what one run of the real pipeline published; and the battery catches services that
break the contract (each check on a service built to break it)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from bench.experiments import sim_config
from services.core.config import Config
from services.core.contract import (
    CHECKS,
    ContractViolation,
    Input,
    check_service,
    input_topics,
    inputs_for,
    record_pipeline,
)
from services.core.events import DecodedText, Event, stable_id
from services.core.memory_bus import Record
from services.core.resources import Resources
from services.core.runtime import Incoming, Service, ServiceContext
from services.core.topics import Topics
from services.orchestrator import pipeline_classes
from services.sdk import consumer

# Snapshots come on a clock.  Uncertainty events (advice to the sampler, never evidence) are not
# compared either: after a restart from a mid-stream snapshot one of 23 came out at another stream
# position (seed 1, measured 2026-11-29), a state gap of the uncertainty tracker left open; the
# candidates, which findings come from, must match exactly.
CLUSTERER_TIMED = {"cluster-snapshots": None, "uncertainty": None, "candidates": frozenset({"snapshot_seq"})}


@dataclass
class Recording:
    cfg: Config
    records: list[Record]
    resources: Resources = field(default_factory=Resources)

    def inputs(self, make: Callable[[ServiceContext], list[Service]], cfg: Config | None = None,
               texts: int | None = None) -> list[Input]:
        """The recorded records of what ``make``'s instances read; at most ``texts`` of each topic."""
        cfg = cfg or self.cfg
        got = inputs_for(self.records, Topics(cfg.bus.topic_prefix), input_topics(make, cfg))
        if texts is None:
            return got
        seen: dict[str, int] = {}
        out = []
        for rec in got:
            seen[rec.topic] = seen.get(rec.topic, 0) + 1
            if rec.topic == "control" or seen[rec.topic] <= texts:
                out.append(rec)
        return out


@pytest.fixture(scope="module")
def recording(redis_url: str) -> Recording:
    """One small planted sim run (1,200 texts: candidates, hypotheses, validations, an escalation)."""
    cfg = sim_config(seed=1, max_texts=1200, ground_truth={"enabled": False},
                     controller={"initial_texts": 400, "round_texts": 400},
                     clusterer={"warmup": 100, "k_initial": 8, "check_every": 32})
    return Recording(cfg, asyncio.run(record_pipeline(cfg, redis_url)))


@dataclass(frozen=True)
class Case:
    make: Callable[[Recording], tuple[Any, Config, list[Input]]]  # (class or factory, config, inputs)
    skip: tuple[str, ...] = ()
    timed: dict[str, frozenset[str] | None] | None = None
    files: bool = False
    batch_sizes: tuple[int, ...] = (1, 7)


def shipped(name: str, texts: int | None = None) -> Callable[[Recording], tuple[Any, Config, list[Input]]]:
    def make(rec: Recording) -> tuple[Any, Config, list[Input]]:
        cls = {c.name: c for c in pipeline_classes()}[name]
        return cls, rec.cfg, rec.inputs(cls.instances, texts=texts)

    return make


def echo_generator(rec: Recording) -> tuple[Any, Config, list[Input]]:
    from examples.echo_backend import EchoSettings
    from services.generator import GeneratorService

    echo = EchoSettings(backend="examples.echo_backend:EchoBackend", suffix=" (echo)")
    cfg = rec.cfg.model_copy(update={"models": rec.cfg.models.model_copy(update={"intervention": echo})})
    return GeneratorService, cfg, rec.inputs(GeneratorService.instances, cfg)


def phrase_validator(rec: Recording) -> tuple[Any, Config, list[Input]]:
    from examples.phrase_tier import PhraseSettings
    from services.validator import ValidatorService

    tier = PhraseSettings(name="phrases", kind="examples.phrase_tier:PhraseTier", min_word_length=3)
    cfg = rec.cfg.model_copy(update={"validator": rec.cfg.validator.model_copy(update={"tiers": [tier]})})
    return ValidatorService, cfg, rec.inputs(ValidatorService.instances, cfg)


def validated_counter(rec: Recording) -> tuple[Any, Config, list[Input]]:
    from examples.plugin_example import ValidatedCounter

    return ValidatedCounter, rec.cfg, rec.inputs(ValidatedCounter.instances)


CASES: dict[str, Case] = {
    # the controller's saved state is not all of it: its sampling RNG and the contrast index
    # restart fresh ("the contrast index restarts empty", ControllerService._restore), so a restarted
    # controller plans other prompts; see test_the_controller_state_does_not_round_trip
    "controller": Case(shipped("controller"), skip=("state",)),
    "generator": Case(shipped("generator")),
    "embedder": Case(shipped("embedder", texts=300)),
    # snapshots come on a clock (snapshot_every_s), and candidates and uncertainty events name the
    # latest one: those fields depend on timing; the candidates themselves must not
    "clusterer": Case(shipped("clusterer"), timed=CLUSTERER_TIMED, batch_sizes=(5, 33)),
    "hypothesizer": Case(shipped("hypothesizer")),
    "validator": Case(shipped("validator")),
    # its pairs and proposed ids live in memory (services/paired/service.py): a restarted paired
    # service proposes again only from the pairs it sees next, so its state check is skipped
    "paired": Case(shipped("paired"), skip=("state",)),
    "sink": Case(shipped("sink", texts=300), files=True, batch_sizes=(7,)),
    "example:echo_backend": Case(echo_generator),
    "example:phrase_tier": Case(phrase_validator),
    "example:plugin_example": Case(validated_counter),
}


def test_every_shipped_service_has_a_case() -> None:
    assert {c.name for c in pipeline_classes()} <= set(CASES)


@pytest.mark.parametrize("name", list(CASES))
async def test_service_keeps_the_contract(name: str, recording: Recording, redis_url: str) -> None:
    case = CASES[name]
    cls, cfg, inputs = case.make(recording)
    ran = await check_service(cls, cfg, inputs, redis_url, checks=[c for c in CHECKS if c not in case.skip],
                              resources=recording.resources, timed=case.timed, files=case.files,
                              batch_sizes=case.batch_sizes)
    assert set(ran) == set(CHECKS) - set(case.skip), ran


@pytest.mark.xfail(strict=True, raises=ContractViolation,
                   reason="known: the controller does not persist its RNG or contrast index (see CASES)")
async def test_the_controller_state_does_not_round_trip(recording: Recording, redis_url: str) -> None:
    cls, cfg, inputs = CASES["controller"].make(recording)
    await check_service(cls, cfg, inputs, redis_url, checks=["state"], resources=recording.resources)


# --------------------------------------------------------------------------- the battery can fail


def texts(cfg: Config, n: int) -> list[Input]:
    out = []
    for i in range(n):
        ev = DecodedText(experiment_id=cfg.experiment_id, text_id=f"t{i}", request_id="r", role="base",
                         model_id="m", prompt_id=f"p{i % 3}", text=f"text {i}")
        out.append(Input(ev.topic, ev.to_bytes(), ev.partition_key().encode(),
                         (("ce_experiment_id", cfg.experiment_id.encode()), ("ce_id", ev.event_id().encode()))))
    return out


class Tally(Event):
    topic: ClassVar[str] = "tallies"
    type: ClassVar[str] = "test.tally"
    tally_id: str
    count: int

    def event_id(self) -> str:
        return self.tally_id


@consumer("fresh-ids", DecodedText, produces=(Tally,))
async def FreshIds(svc, event: DecodedText) -> Tally:
    """Breaks redelivery: a new id every time it sees a text."""
    return Tally(experiment_id=event.experiment_id, tally_id=f"{event.text_id}-{uuid.uuid4().hex}", count=1)


@consumer("per-batch", DecodedText, produces=(Tally,))
async def PerText(svc, event: DecodedText) -> Tally:
    """Keeps the contract: one tally per text, by the text's id."""
    return Tally(experiment_id=event.experiment_id, tally_id=event.text_id, count=1)


class BatchCounter(Service):
    """Breaks batch independence and state: one tally per *batch*, counting in memory."""

    name: ClassVar[str] = "batch-counter"
    consumes = (DecodedText,)
    produces = (Tally,)

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.seen = 0

    async def handle(self, batch: list[Incoming]) -> None:
        texts_in = [b.event for b in batch if isinstance(b.event, DecodedText)]
        if texts_in:
            self.seen += len(texts_in)
            await self.emit(Tally(experiment_id=texts_in[0].experiment_id,
                                  tally_id=stable_id(*(t.text_id for t in texts_in)), count=self.seen))


class SwallowsPoison(Service):
    """Breaks poison isolation: an undecodable record is skipped silently, never dead-lettered."""

    name: ClassVar[str] = "swallows-poison"
    consumes = (DecodedText,)
    produces = (Tally,)

    def decode(self, record: Any) -> Event:
        try:
            return super().decode(record)
        except ValueError:
            return DecodedText(experiment_id=self.ctx.experiment_id, text_id="ignored", request_id="r",
                               role="base", model_id="m", prompt_id="p", text="")

    async def handle(self, batch: list[Incoming]) -> None:
        for item in batch:
            ev = item.event
            if isinstance(ev, DecodedText) and ev.text_id != "ignored":
                await self.emit(Tally(experiment_id=ev.experiment_id, tally_id=ev.text_id, count=1))


@pytest.mark.parametrize(("cls", "check", "message"), [
    (FreshIds, "redelivery", "redelivered inputs emitted something new"),
    (BatchCounter, "batch_cuts", "record\\(s\\) per poll"),
    (BatchCounter, "state", "restarted after"),
    (SwallowsPoison, "poison", "poison records"),
])
async def test_the_battery_catches_a_broken_service(cls, check: str, message: str, redis_url: str,
                                                      unique: str) -> None:
    cfg = sim_config(experiment={"id": f"contract-{unique}"})
    inputs = texts(cfg, 40)
    with pytest.raises(ContractViolation, match=message):
        await check_service(cls, cfg, inputs, redis_url, checks=[check])
    ran = await check_service(PerText, cfg, inputs, redis_url, checks=[check])  # the same check passes
    assert set(ran) == {check}


async def test_inputs_that_exercise_nothing_are_refused(redis_url: str, unique: str) -> None:
    cfg = sim_config(experiment={"id": f"contract-{unique}"})
    with pytest.raises(ContractViolation, match="emitted nothing"):  # a bad record only: dead-lettered
        await check_service(PerText, cfg, [Input("texts", b"{}")], redis_url, checks=["redelivery"])
