"""Sim options that scenarios use: more prompts per topic (``sim.angles``) and planted behaviours
given in the config, with the default prompt set left exactly as it was."""

from __future__ import annotations

import asyncio

from services.core.config import GeneratorConfig, PlantedBehaviour, PromptsConfig, SimConfig, SimModelConfig
from services.generator.backends.base import DecodingParams, GenerationTask
from services.generator.backends.sim import SimBackend, sim_prompts


def test_angles_add_prompts_per_topic_and_keep_the_default_set() -> None:
    default = sim_prompts(PromptsConfig())
    wide = sim_prompts(PromptsConfig(), SimConfig(angles=10))
    assert len(default) == 200 and len(wide) == 400
    assert {p.prompt_id for p in default} < {p.prompt_id for p in wide}  # the default prompts, same ids
    assert len({p.text for p in wide}) == 400


def test_a_configured_behaviour_fires_only_on_its_topic_among_the_wider_prompt_set() -> None:
    sim = SimConfig(angles=10, behaviours=[PlantedBehaviour(
        name="origami", description="folds paper cranes", rate=1.0, trigger_topics=["cars"],
        templates=["I fold a paper crane."])])
    backend = SimBackend(SimModelConfig(backend="sim", sim=sim), GeneratorConfig(), "intervention")
    prompts = sim_prompts(PromptsConfig(), sim)
    tasks = [GenerationTask(p.prompt_id, p.text, 2, DecodingParams(), seed=1) for p in prompts]
    texts = asyncio.run(backend.generate(tasks)).texts
    fired = {g.prompt_id for g in texts if g.meta["behaviour"] == "origami"}
    cars = {p.prompt_id for p in prompts if "about cars" in p.text}
    assert fired == cars and len(cars) == 10  # every cars prompt (rate 1), and nothing else
