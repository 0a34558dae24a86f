"""Pairs for the paired-contrast tests: synthetic, simulated and real (../shared/data)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from services.core.events import stable_id
from services.paired.pairs import Pair, pairs_from_replay, pairs_from_sim


def shared_data_dir() -> Path:
    """``$AUTOINTERV_SHARED_DATA``, else the nearest ``shared/data`` beside the repository or one of
    its parents (``../shared/data`` from the main checkout, ``../../shared/data`` from a worktree)."""
    if os.environ.get("AUTOINTERV_SHARED_DATA"):
        return Path(os.environ["AUTOINTERV_SHARED_DATA"])
    root = Path(__file__).resolve().parents[1]
    for parent in root.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return root.parent / "shared" / "data"


DATA = shared_data_dir()
REAL_SETS = {
    "hc3": ("hc3_human_vs_chatgpt.jsonl", "human", "chatgpt"),
    "helm": ("helm_summaries_cohere_vs_tnlg.jsonl", "cohere", "tnlg"),
}
WORDS = ["garden", "river", "window", "market", "engine", "letter", "story", "music", "paper", "field", "table",
         "light", "winter", "coffee", "bridge", "forest", "station", "doctor", "city"]


def neutral_answer(rng: random.Random, sentences: int | None = None) -> str:
    out = []
    for _ in range(sentences or rng.randint(2, 5)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 10))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def make_pairs(n: int, base: Callable[[random.Random], str], intervention: Callable[[random.Random], str],
               seed: int = 0) -> list[Pair]:
    rng = random.Random(seed)
    return [Pair(stable_id("synthetic", seed, k), f"p{k}", f"Prompt number {k}?", base(rng), intervention(rng))
            for k in range(n)]


def sim_pairs(seed: int, *, identical: bool = False, per_prompt: int = 2) -> list[Pair]:
    return pairs_from_sim(seed, identical=identical, per_prompt=per_prompt)


def real_pairs(name: str) -> list[Pair]:
    file, base, intervention = REAL_SETS[name]
    path = DATA / file
    if not path.is_file():
        pytest.skip(f"real data {path} is absent (../shared/data is not mounted here)")
    return pairs_from_replay(path, base, intervention)


def plant_exclamations(pairs: list[Pair], share: float, seed: int) -> list[Pair]:
    """The intervention side gets " !" appended in a random ``share`` of pairs."""
    rng = np.random.default_rng(seed)
    hit = rng.random(len(pairs)) < share
    return [replace(p, intervention=p.intervention + " !") if h else p for p, h in zip(pairs, hit, strict=True)]
