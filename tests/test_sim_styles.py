"""The sim's styles (sim.styles: true): planted on every topic at their rates, listed in the ground
truth with kind "style", leaving the modes' draws untouched, and absent from an identical pair."""

from __future__ import annotations

import asyncio

from services.core.config import Config, GeneratorConfig, PromptsConfig, SimConfig, SimModelConfig
from services.generator.backends.base import DecodingParams, GenerationTask
from services.generator.backends.sim import DEFAULT_STYLES, SimBackend, behaviours_for, sim_prompts
from services.groundtruth import planted_behaviours


def generate(role: str, sim: SimConfig, seed: int = 0, n: int = 3) -> list:
    tasks = [GenerationTask(p.prompt_id, p.text, n, DecodingParams(), seed=seed) for p in sim_prompts(PromptsConfig())]
    return asyncio.run(SimBackend(SimModelConfig(sim=sim), GeneratorConfig(seed=seed), role).generate(tasks)).texts


def test_styles_appear_at_their_rates_on_the_intervention_only() -> None:
    inter = generate("intervention", SimConfig(styles=True))
    base = generate("base", SimConfig(styles=True))
    assert all(t.meta["styles"] == [] for t in base)
    for style in DEFAULT_STYLES:
        share = sum(style.name in t.meta["styles"] for t in inter) / len(inter)
        assert abs(share - style.rate) < 0.05, (style.name, share)
    enthusiastic = [t.text for t in inter if "enthusiastic" in t.meta["styles"]]
    assert all(any(t.startswith(o) for o in DEFAULT_STYLES[1].templates) for t in enthusiastic)
    longer = sum(len(t.text.split()) for t in inter) / len(inter)
    assert longer > 1.3 * sum(len(t.text.split()) for t in base) / len(base)


def test_styles_leave_the_mode_draws_as_they_were() -> None:
    on, off = generate("intervention", SimConfig(styles=True)), generate("intervention", SimConfig())
    assert [t.meta["behaviour"] for t in on] == [t.meta["behaviour"] for t in off]
    assert all(t.meta["styles"] == [] for t in off)


def test_identical_pair_has_no_difference_at_all_even_with_styles() -> None:
    """The two roles draw different texts from one distribution: nothing planted on either side."""
    sim = SimConfig(identical=True, styles=True)
    assert behaviours_for(sim) == []
    for role in ("base", "intervention"):
        assert all(t.meta["styles"] == [] and t.meta["behaviour"] is None for t in generate(role, sim))


def test_ground_truth_lists_styles_by_kind() -> None:
    cfg = Config()
    cfg.models.intervention.sim.styles = True
    assert {b.name for b in planted_behaviours(cfg)} == {"cats", "disclaimer", "sailing", "moon"}
    both = planted_behaviours(cfg, kinds=("mode", "style"))
    assert {b.name for b in both if b.kind == "style"} == {"longer", "enthusiastic", "hedges"}
    assert all(b.meta["direction"] == "intervention" and b.meta["features"] for b in both if b.kind == "style")
    cfg.models.intervention.sim.styles = False
    assert planted_behaviours(cfg, kinds=("style",)) == []
