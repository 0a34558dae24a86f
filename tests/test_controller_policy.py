"""The controller's active sampling spends more of the budget where the models differ than uniform
sampling does, on the sim pair (real sim generation and a real encoder; no broker needed here: this
tests the policy, the pipeline tests cover the service around it)."""

from __future__ import annotations

import asyncio

import numpy as np

from services.controller.policy import Plan, SamplingPolicy
from services.core.config import ControllerConfig, EmbedderConfig, GeneratorConfig, ModelConfig, PromptsConfig
from services.embedder.hashing import HashingEncoder
from services.generator.backends.base import DecodingParams, GenerationTask
from services.generator.backends.sim import SimBackend, sim_prompts


def _run(strategy: str, seed: int) -> tuple[int, int]:
    """Texts generated for the intervention, and how many show a planted behaviour."""
    cfg = ControllerConfig(strategy=strategy, initial_texts=2000, round_texts=1000, max_texts=6000,
                           min_budget_fraction=1.0)
    policy = SamplingPolicy(cfg, sim_prompts(PromptsConfig()), seed=seed)
    backends = {r: SimBackend(ModelConfig(), GeneratorConfig(seed=seed), r) for r in ("base", "intervention")}
    enc = HashingEncoder(EmbedderConfig())
    total = planted = 0

    def generate(plans: list[Plan], rnd: int) -> None:
        nonlocal total, planted
        for i, plan in enumerate(plans):
            tasks = [GenerationTask(p.prompt_id, p.text, plan.n_per_prompt, DecodingParams(), seed=rnd * 1000 + i)
                     for p in plan.prompts]
            for role, backend in backends.items():
                out = asyncio.run(backend.generate(tasks)).texts
                vecs = enc.encode([g.text for g in out])
                for g, v in zip(out, vecs, strict=True):
                    pair = f"{rnd}:{i}:{g.prompt_id}:{g.sample_index}"  # the two roles' texts share it
                    policy.observe_embedding(g.prompt_id, role, np.asarray(v), f"{pair}:{role}", pair)
                    if role == "intervention":
                        total += 1
                        planted += g.meta["behaviour"] is not None

    generate(policy.initial_plans(), 0)
    for rnd in range(1, 20):
        plans, _ = policy.next_plans()
        if not plans:
            break
        generate(plans, rnd)
    return total, planted


def test_active_sampling_targets_the_planted_behaviours():
    for seed in (0, 1):
        n_a, hit_a = _run("active", seed)
        n_u, hit_u = _run("uniform", seed)
        assert n_a == n_u  # same budget
        # uniform sampling sees the base rates (~10% of intervention texts carry a behaviour);
        # active sampling must put clearly more of the same budget where the models differ
        assert hit_a / n_a > 1.5 * hit_u / n_u, (seed, hit_a / n_a, hit_u / n_u)
