"""One rule for a hypothesis' final decision (services/core/decision.py), and the sink, the
controller and the benchmark observer all following it, whatever the order validations arrive in
and however often each comes."""

from __future__ import annotations

import random
from dataclasses import asdict

import orjson
from service_helpers import offline_context, running

from bench.experiments import _Observer, sim_config
from services.controller.service import ControllerService, ControllerState
from services.core.decision import final_validation, rank, supersedes
from services.core.events import Event, Hypothesis, Validation
from services.core.memory_bus import Record
from services.core.runtime import Incoming
from services.core.topics import Topics
from services.sink.results import results_rows
from services.sink.run_state import RunState


def _v(hid: str, vid: str, tier: int, decision: str, at: float) -> Validation:
    return Validation(experiment_id="e", validation_id=vid, hypothesis_id=hid, tier=["keyword", "embedding"][tier],
                      tier_index=tier, decision=decision, auc=0.8, p_value=0.01 * (tier + 1), alpha_level=0.05,
                      n_pos=20, n_neg=20, created_at=at)


STREAM = [
    _v("h1", "a", 0, "escalated", 1.0), _v("h1", "b", 1, "validated", 2.0),  # the cascade's usual path
    _v("h2", "c", 0, "rejected", 1.0),  # decided by the first tier
    _v("h3", "d", 0, "escalated", 1.0),  # still with the next tier: pending
    # re-tested by tier 1 after a restart: its later word counts
    _v("h4", "e", 0, "escalated", 1.0), _v("h4", "f", 1, "validated", 2.0), _v("h4", "g", 1, "rejected", 5.0),
    # a later tier outranks an earlier one, whatever the clocks say
    _v("h5", "h", 0, "validated", 3.0), _v("h5", "i", 1, "rejected", 0.5),
]
EXPECTED = {"h1": ("b", "validated"), "h2": ("c", "rejected"), "h3": ("d", "pending"),
            "h4": ("g", "rejected"), "h5": ("i", "rejected")}
DECIDED = {h: d for h, (_, d) in EXPECTED.items() if d != "pending"}


def _orders() -> list[list[Validation]]:
    """Arrival orders: as produced, reversed, shuffled, each with every record delivered twice."""
    out = [STREAM + STREAM, list(reversed(STREAM)) * 2]
    for seed in range(20):
        s = STREAM * 2
        random.Random(seed).shuffle(s)
        out.append(s)
    return out


def _by_hypothesis(vals: list[Validation]) -> dict[str, list[Validation]]:
    out: dict[str, list[Validation]] = {}
    for v in vals:
        out.setdefault(v.hypothesis_id, []).append(v)
    return out


def test_final_validation_is_the_rule_and_ignores_order_and_duplicates() -> None:
    for vals in _orders():
        got = {h: (v.validation_id if v else None, d) for h, (v, d) in
               ((h, final_validation(vs)) for h, vs in _by_hypothesis(vals).items())}
        assert got == EXPECTED
    assert final_validation([]) == (None, "pending")


def test_folding_with_supersedes_agrees_with_the_whole_log() -> None:
    for vals in _orders():
        current: dict[str, Validation] = {}
        for v in vals:
            if supersedes(v, rank(current[v.hypothesis_id]) if v.hypothesis_id in current else None):
                current[v.hypothesis_id] = v
        assert {h: v.decision for h, v in current.items()} == DECIDED
    b = STREAM[1]
    assert not supersedes(b, rank(b))  # a re-delivery changes nothing
    assert not supersedes(STREAM[0], None)  # an escalation never decides
    assert supersedes(b, list(rank(STREAM[0])))  # a rank read back from JSON compares the same


def test_the_sink_follows_the_rule() -> None:
    for vals in _orders()[:4]:
        hyps = {}
        for v in vals:
            hyps.setdefault(v.hypothesis_id, _hypothesis(v.hypothesis_id))
        rows = results_rows(RunState(hypotheses=hyps, validations=vals), alpha=0.05)
        assert {r["hypothesis_id"]: r["decision"] for r in rows} == {h: d for h, (_, d) in EXPECTED.items()}
        assert {r["hypothesis_id"]: r["tier"] for r in rows}["h5"] == "embedding"


def test_the_benchmark_observer_follows_the_rule() -> None:
    cfg = sim_config(seed=0)
    topic = Topics(cfg.bus.topic_prefix).name("validations")
    for vals in _orders():
        obs = _Observer(cfg, [], lambda *_: None, keep_vectors=False)
        for i, v in enumerate(vals):
            obs(Record(topic, 0, i, None, v.to_bytes(), [], 0, i))
        assert {h: v.decision for h, v in obs.final.items()} == DECIDED


async def test_the_controller_follows_the_rule_across_a_restart(redis_url: str, unique: str) -> None:
    cfg = sim_config(seed=0, cache={"namespace": f"fd{unique}"})
    for vals in _orders()[:4]:
        async with running(_Controller(offline_context(cfg, redis_url))) as ctl:
            half = len(vals) // 2
            await ctl.handle([Incoming(v, None) for v in vals[:half]])
            ctl.st = ControllerState(**orjson.loads(orjson.dumps(asdict(ctl.st))))  # saved and restored
            await ctl.handle([Incoming(v, None) for v in vals[half:]])
            assert ctl.st.decisions == DECIDED


class _Controller(ControllerService):
    async def emit(self, event: Event, topic: str | None = None) -> None:  # no broker: plans go nowhere
        pass


def _hypothesis(hid: str) -> Hypothesis:
    return Hypothesis(experiment_id="e", hypothesis_id=hid, candidate_id="c-" + hid, cluster_id=0,
                      direction="intervention", text=f"claim {hid}", labeler="test")
