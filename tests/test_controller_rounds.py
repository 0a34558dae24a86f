"""The controller's rounds end by themselves: data used up, texts lost, experiment finished.

Every run is the shipped pipeline on the in-memory bus (burst mode, a real Redis), so a run that
would hang on the broker hangs here too (``max_idle_s`` turns it into a failure instead)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import orjson
import pytest

from bench.experiments import sim_config
from services.core.events import ControlEvent, DecodedText, GenerationReport
from services.generator.service import GeneratorService
from services.orchestrator import MemoryPipeline, run_memory_pipeline

TOPICS = ["tea", "trains", "chess", "rain", "bread", "maps", "owls", "jazz"]


def _replay_file(path: Path, prompts: int, per_prompt: dict[str, int]) -> Path:
    """A replay file in the research code's format: model, prompt, text (several answers allowed)."""
    rng = random.Random(0)
    rows = []
    for i in range(prompts):
        prompt = f"Question {i}: what do you think about {TOPICS[i % len(TOPICS)]}?"
        for model, n in per_prompt.items():
            for j in range(n):
                words = " ".join(rng.choice(TOPICS) for _ in range(12))
                rows.append({"model": model, "prompt": prompt, "text": f"{model} answer {j}: {words}."})
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _replay_cfg(path: Path, strategy: str, **controller: object):
    both = {"base": {"backend": "replay", "path": str(path), "replay_model_name": "human"},
            "intervention": {"backend": "replay", "path": str(path), "replay_model_name": "bot"}}
    return sim_config(strategy=strategy, models=both, controller={"initial_texts": 60, "round_texts": 40,
                                                                   "max_texts": 100_000, **controller})


@pytest.mark.parametrize("strategy", ["active", "uniform"])
async def test_one_answer_per_prompt_file_ends_by_itself_with_data_exhausted(tmp_path, redis_url, strategy):
    path = _replay_file(tmp_path / "pairs.jsonl", 90, {"human": 1, "bot": 1})
    cfg = _replay_cfg(path, strategy)
    assert cfg.prompts.source == "replay" and cfg.prompts.path == str(path)  # the default for two replays
    run = await run_memory_pipeline(cfg, redis_url, exclude=("sink",), max_idle_s=120)
    assert run.finished, run.reason
    p = run.progress
    assert p["stopped_because"] == "data_exhausted", p
    assert p["produced"] == 180 and p["failed"] == 0  # every text read once, none asked for that was not there
    assert run.bus is not None
    reports = [GenerationReport.from_bytes(r.value) for r in run.bus.records(run.bus.topics.name("generation-reports"))]
    assert sum(r.texts for r in reports) == 180 and not any(r.failures for r in reports)


async def test_several_answers_per_prompt_are_all_read_and_pairs_stay_paired(tmp_path, redis_url):
    path = _replay_file(tmp_path / "pairs.jsonl", 30, {"human": 3, "bot": 2})  # one side has more
    run = await run_memory_pipeline(_replay_cfg(path, "active"), redis_url, exclude=("sink",), max_idle_s=120)
    assert run.finished and run.progress["stopped_because"] == "data_exhausted", run.reason
    assert run.progress["produced"] == 2 * 30 * 2  # pairs only: two per prompt, the third human answer unused
    assert run.bus is not None
    texts = [DecodedText.from_bytes(r.value) for r in run.bus.records(run.bus.topics.name("texts"))]
    by_role = {role: sum(t.role == role for t in texts) for role in ("base", "intervention")}
    assert by_role == {"base": 60, "intervention": 60}


async def test_a_live_model_answers_the_replayed_prompts(tmp_path, redis_url):
    path = _replay_file(tmp_path / "pairs.jsonl", 40, {"human": 2})
    models = {"base": {"backend": "replay", "path": str(path), "replay_model_name": "human"},
              "intervention": {"backend": "sim"}}
    cfg = sim_config(models=models, prompts={"source": "replay", "path": str(path)},
                     controller={"initial_texts": 60, "round_texts": 40, "max_texts": 100_000})
    run = await run_memory_pipeline(cfg, redis_url, exclude=("sink",), max_idle_s=120)
    assert run.finished and run.progress["stopped_because"] == "data_exhausted", run.reason
    assert run.bus is not None
    texts = [DecodedText.from_bytes(r.value) for r in run.bus.records(run.bus.topics.name("texts"))]
    replayed = {t.prompt for t in texts if t.role == "base"}
    answered = {t.prompt for t in texts if t.role == "intervention"}
    assert len(texts) == 160 and replayed == answered and len(replayed) == 40


class LossyGenerator(GeneratorService):
    """Reports every text it produced but loses one in ten on the way (texts lost in transit)."""

    async def emit(self, event, topic=None) -> None:
        if isinstance(event, DecodedText) and int(event.text_id[:2], 16) % 10 == 0:
            return
        await super().emit(event, topic)


async def test_texts_lost_in_transit_close_the_round_by_force_and_stop_the_run(redis_url):
    cfg = sim_config(max_texts=4000, controller={"initial_texts": 400, "round_texts": 400, "round_timeout_s": 30,
                                                 "max_lost_share": 0.05})
    run = await run_memory_pipeline(cfg, redis_url, exclude=("sink",), replace={"generator": LossyGenerator},
                                    max_idle_s=300)
    assert run.finished, run.reason
    p = run.progress
    assert p["stopped_because"] == "lost_texts", p
    assert 0.05 * p["produced"] < p["lost"] < 0.2 * p["produced"]  # about one in ten, counted, not waited for
    assert p["planned"] < cfg.controller.max_texts  # it stopped instead of spending the budget blind


async def test_a_one_service_process_exits_once_the_experiment_finished_and_its_input_is_read(redis_url):
    cfg = sim_config()
    finished = ControlEvent(experiment_id=cfg.experiment_id, kind="finished", round=3, stopped_because="budget")
    async with MemoryPipeline(cfg, redis_url, only=["hypothesizer"], inputs=[finished]) as p:
        svc = p.services["hypothesizer"]
        svc.exit_when_finished = True
        for _ in range(20):
            await svc.step(wait=False)
            if svc.stopping:
                break
            await asyncio.sleep(0)
        assert svc.experiment_finished is not None and svc.experiment_finished.stopped_because == "budget"
        assert svc.stopping
