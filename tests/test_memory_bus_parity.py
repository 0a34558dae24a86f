"""The in-memory bus is held to the real broker: one seed through both gives the same experiment.

Statistics tests and benchmarks run the shipped services on ``MemoryBus`` in burst mode
(services/core/memory_bus.py).  That is only worth something if it behaves like Kafka, so here
one config runs through the embedded Tansu broker (every service's real loop as a task, real
timing) and through the memory bus, and what the experiment *decided* must agree exactly:

* the generation requests of every round (so the controller saw the same evidence each time);
* the candidates (cluster, direction, counts, the label and held-out texts);
* the hypotheses (ids and words) and every final decision with its p-value.

Why these can agree although the two runs differ in timing and batch boundaries: with one
partition per topic the order of events on each topic is the same; the clusterer checks its share
tests at fixed positions of its input stream, not at batch ends; and the controller plans a round
only after its barrier (every text of the round clustered, every hypothesis decided).  What may
legitimately differ is compared nowhere: wall-clock timestamps, the cadence of the periodic
snapshots (time-based), the ``snapshot_seq`` a candidate cites, and consumer-side batch sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.experiments import sim_config
from services.core.decision import final_validation
from services.core.events import CandidateCluster, GenerationRequest, Hypothesis, Validation
from services.core.infra import Endpoints
from services.orchestrator import run_memory_pipeline, run_pipeline_async
from services.sink.storage import read_events

pytestmark = pytest.mark.slow


def _config(tmp_run_dir: Path, unique: str, prefix: str) -> Any:
    cfg = sim_config(seed=3, max_texts=2400,
                     experiment={"id": f"parity-{unique}", "run_dir": str(tmp_run_dir / prefix)},
                     bus={"partitions": 1, "topic_prefix": f"{prefix}-{unique}"},
                     cache={"namespace": f"{prefix}-{unique}"},
                     controller={"initial_texts": 800, "round_texts": 400, "stop_when_stable": False})
    return cfg


def _digest(requests: list[GenerationRequest], candidates: list[CandidateCluster], hypotheses: list[Hypothesis],
            validations: list[Validation]) -> dict[str, Any]:
    by_h: dict[str, list[Validation]] = {}
    for v in validations:
        by_h.setdefault(v.hypothesis_id, []).append(v)
    final = {}
    for hid, vals in by_h.items():
        v, decision = final_validation(vals)  # the rule the sink and the controller use
        if v is not None and decision != "pending":
            final[hid] = (v.tier, decision, round(v.p_value, 12))
    return {
        "requests": sorted((r.round, r.request_id, tuple(p.prompt_id for p in r.prompts), r.n_per_prompt,
                            tuple(e.text_id for e in r.exemplars)) for r in requests),
        "candidates": sorted((c.candidate_id, c.cluster_id, c.direction, c.count_base, c.count_intervention,
                              tuple(t.text_id for t in c.label_texts), tuple(t.text_id for t in c.holdout_texts))
                             for c in candidates),
        "hypotheses": sorted((h.hypothesis_id, h.text, tuple(h.keywords)) for h in hypotheses),
        "final": final,
    }


async def test_memory_bus_and_tansu_make_the_same_experiment(kafka_bootstrap: str, redis_url: str, unique: str,
                                                             tmp_run_dir: Path) -> None:
    kafka_cfg = _config(tmp_run_dir, unique, "kafka")
    outcome = await run_pipeline_async(kafka_cfg, Endpoints(kafka_bootstrap, redis_url, False, False))
    assert outcome.finished, outcome.reason
    run_dir = outcome.run_dir
    assert run_dir is not None
    kafka = _digest([], list(read_events(run_dir / "candidates.jsonl", CandidateCluster)),
                    list(read_events(run_dir / "hypotheses.jsonl", Hypothesis)),
                    list(read_events(run_dir / "validations.jsonl", Validation)))
    requests = await _read_topic(kafka_bootstrap, kafka_cfg.bus.topic_prefix + ".generation-requests")
    kafka["requests"] = _digest([GenerationRequest.from_bytes(v) for v in requests], [], [], [])["requests"]

    mem_cfg = _config(tmp_run_dir, unique, "memory")
    run = await run_memory_pipeline(mem_cfg, redis_url)
    assert run.finished, run.reason
    assert run.bus is not None
    bus = run.bus

    def events(etype: Any) -> list[Any]:
        return [etype.from_bytes(r.value) for r in bus.records(bus.topics.name(etype.topic))]

    memory = _digest(events(GenerationRequest), events(CandidateCluster), events(Hypothesis), events(Validation))
    assert memory["requests"] and memory["candidates"] and memory["final"]  # the run did find something
    assert kafka["requests"] == memory["requests"]
    assert kafka["candidates"] == memory["candidates"]
    assert kafka["hypotheses"] == memory["hypotheses"]
    assert kafka["final"] == memory["final"]


async def _read_topic(bootstrap: str, topic: str) -> list[bytes]:
    """Every record of a topic, from the beginning (outside any group)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from services.core.bus import end_offsets

    ends = await end_offsets(bootstrap, [topic])
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[bytes] = []
    try:
        parts = [tp for tp, end in ends.items() if end > 0]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        want = sum(ends.values())
        while len(out) < want:
            got = await consumer.getmany(timeout_ms=1000)
            if not got:
                break
            out += [r.value for recs in got.values() for r in recs]
    finally:
        await consumer.stop()
    assert all(isinstance(tp, TopicPartition) for tp in ends)
    return out
