"""The three recipes of docs/extending.md, each through its runnable example in examples/: a
generation backend and a validator tier named in the config by import path (no packaging), and a
consumer service run by ``autointerv service --app module:obj`` on the real broker.  The contract
battery runs on all three (tests/test_contract.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_helpers import read_records

from services.core.bus import Producer, Topics, ensure_topics
from services.core.config import ConfigError, dump_config, load_config
from services.core.events import ControlEvent, Hypothesis, TextRef, Validation
from services.generator.backends import make_backend
from services.generator.backends.base import DecodingParams, GenerationTask
from services.orchestrator import service_factory
from services.validator.service import build_tier

ROOT = Path(__file__).resolve().parents[1]
ECHO = "examples.echo_backend:EchoBackend"
PHRASES = "examples.phrase_tier:PhraseTier"


async def test_recipe_backend_a_config_names_it_and_the_generator_builds_it() -> None:
    cfg = load_config(None, environ={}, overrides={"models": {"intervention": {"backend": ECHO, "repeat": 2,
                                                                               "suffix": "!"}}})
    backend = make_backend(cfg.models.intervention, cfg.generator, "intervention")
    assert type(backend).__name__ == "EchoBackend" and backend.model_id == "echo-intervention"
    out = await backend.generate([GenerationTask("p", "Hi.", n=2, decoding=DecodingParams(), seed=0)])
    assert [g.text for g in out.texts] == ["Hi. Hi.! [0]", "Hi. Hi.! [1]"]
    with pytest.raises(ConfigError, match=r"models\.intervention\.repeat: Input should be greater"):
        load_config(None, environ={}, overrides={"models": {"intervention": {"backend": ECHO, "repeat": 0}}})


async def test_recipe_tier_a_config_names_it_and_the_validator_builds_it() -> None:
    cfg = load_config(None, environ={}, overrides={"validator": {"tiers": [
        {"name": "keyword", "kind": "keyword"}, {"name": "phrases", "kind": PHRASES, "min_word_length": 5}]}})
    tier = await build_tier(cfg, cfg.validator.tiers[1], encoder=None, cache=lambda: None,  # type: ignore[arg-type]
                            llm_client=None)  # type: ignore[arg-type]
    assert type(tier).__name__ == "PhraseTier" and tier.cfg.min_word_length == 5
    h = Hypothesis(experiment_id="e", hypothesis_id="h", candidate_id="c", cluster_id=0, direction="intervention",
                   text="mentions lunar travel", labeler="test")
    pos = [TextRef(text_id="a", prompt_id="p", role="intervention", text="Lunar dust, lunar light.")]
    neg = [TextRef(text_id="b", prompt_id="p", role="base", text="Rain on the hills.")]
    scores = await tier.score(h, pos, neg)
    assert scores.pos[0] > 0 and scores.neg == [0.0]  # "lunar" counts, "travel" (6 letters) too, in neither
    with pytest.raises(ConfigError, match=r"validator\.tiers\.1\.min_word_lenght: Extra inputs"):
        load_config(None, environ={}, overrides={"validator": {"tiers": [
            {"name": "keyword", "kind": "keyword"}, {"name": "phrases", "kind": PHRASES, "min_word_lenght": 5}]}})


def test_examples_run_as_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    from examples import echo_backend, phrase_tier

    asyncio.run(echo_backend._demo())
    asyncio.run(phrase_tier._demo())
    out = capsys.readouterr().out
    assert "Tell me about cats. Indeed! [0]" in out and "TierScores(pos=[" in out


def test_app_references_resolve_and_bad_ones_say_why() -> None:
    assert service_factory("examples.plugin_example:ValidatedCounter").name == "validated-counter"
    with pytest.raises(SystemExit, match=r"cannot import 'examples\.nothing_here'"):
        service_factory("examples.nothing_here:X")
    with pytest.raises(SystemExit, match="not a Service class"):
        service_factory("examples.plugin_example:ValidatedAlert")


async def test_recipe_service_runs_unpackaged_with_app(kafka_bootstrap: str, redis_url: str, unique: str,
                                                      tmp_path: Path) -> None:
    cfg = load_config(None, environ={"KAFKA_BOOTSTRAP": kafka_bootstrap, "REDIS_URL": redis_url}, overrides={
        "experiment": {"id": f"app-{unique}"}, "bus": {"topic_prefix": f"app-{unique}", "partitions": 2},
        "cache": {"namespace": f"app-{unique}"}, "observability": {"metrics_port": None}})
    topics = Topics(cfg.bus.topic_prefix)
    await ensure_topics(kafka_bootstrap, topics.all(), 2, 1)
    cfg_file = tmp_path / "app.yaml"
    cfg_file.write_text(dump_config(cfg))
    log = tmp_path / "app.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "service", "--app", "examples.plugin_example:ValidatedCounter",
         "--config", str(cfg_file)], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=log.open("ab"), stderr=subprocess.STDOUT)
    try:
        prod = Producer(cfg.bus, kafka_bootstrap, topics, "test")
        await prod.start()
        for i, decision in enumerate(["validated", "rejected", "validated"]):
            await prod.send(Validation(experiment_id=cfg.experiment_id, validation_id=f"v{i}", hypothesis_id=f"h{i}",
                                       tier="keyword", tier_index=0, decision=decision, p_value=0.01,
                                       alpha_level=0.05, n_pos=10, n_neg=10))
        await prod.send(ControlEvent(experiment_id=cfg.experiment_id, kind="finished", round=1,
                                     stopped_because="budget"))
        await prod.flush()
        await prod.stop()
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert proc.poll() == 0, log.read_text()[-3000:]  # it exits by itself once the run finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    alerts = await read_records(cfg, kafka_bootstrap, "alerts", want=3, timeout_s=10)
    from examples.plugin_example import ValidatedAlert

    assert sorted(ValidatedAlert.from_bytes(r.value).validation_id for r in alerts) == ["v0", "v2"]
