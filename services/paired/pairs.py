"""Pairs: the two models' answers to one prompt (and sample index), the unit of paired contrasts.

A pair is split as a whole, once, from a hash of its id: label pairs may be shown to proposers,
held-out pairs only validate.  Splitting texts instead would let a proposer see one answer of a
pair whose partner then validates it.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from services.core.events import EmbeddedText, stable_id


@dataclass(frozen=True)
class Pair:
    """One prompt's answer from each model; vectors are optional (the embedding direction needs them)."""

    pair_id: str
    prompt_id: str
    prompt: str
    base: str
    intervention: str
    base_vector: np.ndarray | None = None
    intervention_vector: np.ndarray | None = None

    def text(self, role: str) -> str:
        return self.intervention if role == "intervention" else self.base

    def swapped(self) -> Pair:
        """The same pair with the roles exchanged (the pair-swap null flips a fair coin per pair)."""
        return replace(self, base=self.intervention, intervention=self.base,
                       base_vector=self.intervention_vector, intervention_vector=self.base_vector)


def is_label_pair(pair_id: str, label_fraction: float) -> bool:
    """Decided once per pair from its id (the clusterer's ``is_label_split`` rule, applied to the
    pair id so both answers of a pair always fall on the same side)."""
    try:
        u = int(pair_id[:8], 16) / 16**8
    except ValueError:  # non-hex ids: hash them first
        u = int(hashlib.blake2b(pair_id.encode(), digest_size=4).hexdigest(), 16) / 16**8
    return u < label_fraction


def split_pairs(pairs: Sequence[Pair], label_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(label pairs, held-out pairs), each in input order."""
    label, held = [], []
    for p in pairs:
        (label if is_label_pair(p.pair_id, label_fraction) else held).append(p)
    return label, held


def swap_null(pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """Roles exchanged in a random half of the pairs: an exact null for any data, because under it
    each pair's two answers are exchangeable whatever the models are."""
    flips = np.random.default_rng(seed).random(len(pairs)) < 0.5
    return [p.swapped() if f else p for p, f in zip(pairs, flips, strict=True)]


def pairs_from_replay(path: str | Path, base_model: str, intervention_model: str) -> list[Pair]:
    """Pairs from a replay file (``model,text,prompt`` rows): the k-th answer of each model to a
    prompt pair up; prompts where a model has fewer answers keep only the complete pairs."""
    from services.generator.backends.replay import read_replay_table, replay_prompt_id

    df = read_replay_table(path)
    if "prompt" not in df.columns:
        raise ValueError(f"{path}: pairing needs a prompt column")
    by: dict[str, dict[str, list[str]]] = defaultdict(lambda: {base_model: [], intervention_model: []})
    for model, prompt, text in zip(df["model"], df["prompt"], df["text"], strict=True):
        if model in (base_model, intervention_model):
            by[prompt][model].append(text)
    out = []
    for prompt, answers in by.items():
        for k, (b, i) in enumerate(zip(answers[base_model], answers[intervention_model], strict=False)):
            pid = replay_prompt_id(prompt)
            out.append(Pair(stable_id("pair", pid, k), pid, prompt, b, i))
    return out


def pairs_from_sim(seed: int, *, identical: bool = False, per_prompt: int = 2) -> list[Pair]:
    """The simulated pair's answers to every sim prompt, ``per_prompt`` samples each (modes and
    styles planted, ``sim.styles: true``, unless ``identical``): the sim as paired data, no broker."""
    import asyncio

    from services.core.config import GeneratorConfig, PromptsConfig, SimConfig, SimModelConfig
    from services.generator.backends.base import DecodingParams, GenerationTask
    from services.generator.backends.sim import SimBackend, sim_prompts

    mc, gc = SimModelConfig(sim=SimConfig(identical=identical, styles=True)), GeneratorConfig(seed=seed)
    prompts = sim_prompts(PromptsConfig())
    tasks = [GenerationTask(p.prompt_id, p.text, per_prompt, DecodingParams(), seed=seed) for p in prompts]

    async def both() -> tuple[list, list]:
        b = await SimBackend(mc, gc, "base").generate(tasks)
        i = await SimBackend(mc, gc, "intervention").generate(tasks)
        return b.texts, i.texts

    base, inter = asyncio.run(both())
    text = {p.prompt_id: p.text for p in prompts}
    return [Pair(stable_id("sim-pair", seed, b.prompt_id, b.sample_index), b.prompt_id, text[b.prompt_id], b.text,
                 i.text) for b, i in zip(base, inter, strict=True)]


def pairs_from_embedded(texts: Iterable[EmbeddedText], prompts: dict[str, str] | None = None) -> list[Pair]:
    """Complete pairs among embedded texts (events with the same non-empty ``pair_id``, one per
    role), in order of completion; texts without a partner are left out."""
    waiting: dict[str, EmbeddedText] = {}
    out = []
    for ev in texts:
        if not ev.pair_id:
            continue
        other = waiting.pop(ev.pair_id, None)
        if other is None or other.role == ev.role:
            waiting[ev.pair_id] = ev
            continue
        b, i = (other, ev) if other.role == "base" else (ev, other)
        out.append(Pair(ev.pair_id, ev.prompt_id, (prompts or {}).get(ev.prompt_id, ""), b.text, i.text,
                        b.vector(), i.vector()))
    return out


def with_vectors(pairs: Sequence[Pair], base_vectors: np.ndarray, intervention_vectors: np.ndarray) -> list[Pair]:
    """The pairs with vectors attached (row k belongs to pair k)."""
    if len(base_vectors) != len(pairs) or len(intervention_vectors) != len(pairs):
        raise ValueError("one vector per pair and role is needed")
    return [replace(p, base_vector=np.asarray(b, dtype=np.float32), intervention_vector=np.asarray(i, dtype=np.float32))
            for p, b, i in zip(pairs, base_vectors, intervention_vectors, strict=True)]


def have_vectors(pairs: Sequence[Pair]) -> bool:
    return bool(pairs) and all(p.base_vector is not None and p.intervention_vector is not None for p in pairs)
