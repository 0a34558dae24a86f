"""Paired contrasts through the shipped pipeline (every service on the in-memory bus, real Redis).

* Real decoded texts (a slice of ../shared/data/hc3_human_vs_chatgpt.jsonl) replayed, with " !"
  appended to a random 30% of the intervention's answers: a paired finding about it is validated,
  claiming the intervention side.
* The pair-swap null of the same slice (the two answers of each prompt exchanged at random between
  the models, an exact null for any data): nothing is validated, of either kind.
* The simulated pair with its styles planted: each style is found as a validated paired finding
  (matched by rule: the finding's scorer measures what the style changes, on the planted side).

Skipped with a message when ../shared/data is absent (the sim test always runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import orjson
import pytest
from paired_helpers import DATA, REAL_SETS

from bench.experiments import arun, sim_config
from services.core.config import Config
from services.core.events import PairedRound
from services.generator.backends.sim import DEFAULT_STYLES
from services.groundtruth import is_finding, style_by_rule

pytestmark = pytest.mark.slow

NULL_ID = os.environ.get("PAIRED_NULL_ID", "hc3-swap-null")  # another id: another split of the same null
SLICE = 240  # prompts: 480 texts, small enough for two shared cores
# (not "space before punctuation": " !" adds one, but HC3's human answers have many more, "word .")
EXCLAIM = {"exclamations", "ends_with_exclamation"}


def hc3_slice(n: int) -> list[dict[str, str]]:
    """The first ``n`` prompts that both models answered: one row per (prompt, model)."""
    file, base, inter = REAL_SETS["hc3"]
    path = DATA / file
    if not path.is_file():
        pytest.skip(f"real data {path} is absent (../shared/data is not mounted here)")
    by_prompt: dict[str, dict[str, str]] = {}
    for line in path.read_bytes().splitlines():
        row = orjson.loads(line)
        if row["model"] in (base, inter):
            by_prompt.setdefault(row["prompt"], {}).setdefault(row["model"], row["text"])
    both = [(p, m) for p, m in by_prompt.items() if base in m and inter in m][:n]
    assert len(both) == n, "the HC3 file has fewer complete prompts than the slice needs"
    return [{"model": model, "prompt": p, "text": m[model]} for p, m in both for model in (base, inter)]


def plant_exclamations(rows: list[dict[str, str]], share: float, seed: int) -> list[dict[str, str]]:
    """" !" appended to a random ``share`` of the intervention's answers."""
    rng = np.random.default_rng(seed)
    inter = REAL_SETS["hc3"][2]
    return [{**r, "text": r["text"] + " !"} if r["model"] == inter and rng.random() < share else r for r in rows]


def swap_roles(rows: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """The pair-swap null: each prompt's two answers exchange models with probability 1/2."""
    rng = np.random.default_rng(seed)
    _, base, inter = REAL_SETS["hc3"]
    out = []
    for k in range(0, len(rows), 2):
        a, b = rows[k], rows[k + 1]
        if rng.random() < 0.5:
            a, b = {**a, "model": inter}, {**b, "model": base}
        out += [a, b]
    return out


def replay_config(path: Path, experiment_id: str, **paired: object) -> Config:
    """``experiment_id`` is fixed: pair ids, and so the label/held-out split, derive from it, so
    the run is the same every time (a fresh key namespace per run keeps runs apart in Redis)."""
    _, base, inter = REAL_SETS["hc3"]
    models = {"base": {"backend": "replay", "path": str(path), "replay_model_name": base},
              "intervention": {"backend": "replay", "path": str(path), "replay_model_name": inter}}
    return sim_config(models=models, experiment={"id": experiment_id},
                      controller={"initial_texts": 200, "round_texts": 100, "max_texts": 100_000},
                      paired={"min_label_pairs": 30, **paired})


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def validated(res):
    return [h for h in res.hypotheses if (v := res.final.get(h.hypothesis_id)) and is_finding(v.decision, v.auc)]


async def test_exclamations_planted_in_real_answers_are_a_validated_paired_finding(tmp_path, redis_url):
    rows = plant_exclamations(hc3_slice(SLICE), 0.3, seed=0)
    res = await arun(replay_config(write_rows(tmp_path / "hc3.jsonl", rows), "hc3-exclaim"), redis_url=redis_url)
    assert res.reason.startswith("finished"), res.reason
    assert res.run.progress["stopped_because"] == "data_exhausted"
    paired = [h for h in validated(res) if h.kind == "paired"]
    exclaim = [h for h in paired if h.scorer.get("name") in EXCLAIM or "!" in str(h.scorer.get("pattern", ""))]
    assert exclaim, [h.text for h in paired]
    assert all(h.direction == "intervention" for h in exclaim), [(h.direction, h.text) for h in exclaim]
    v = res.final[exclaim[0].hypothesis_id]
    assert v.effect["p_intervention_higher_lo"] > 0.5 and v.auc_ci[0] > 0.5  # P(intervention higher), CI


async def test_pair_swap_null_of_the_same_slice_validates_nothing(tmp_path, redis_url):
    rows = swap_roles(plant_exclamations(hc3_slice(SLICE), 0.3, seed=0), seed=1)
    # every proposal the label split allows goes to the validator (no screening): a validator that
    # validated what it is given would fail here, not only a proposer that proposed nothing
    res = await arun(replay_config(write_rows(tmp_path / "null.jsonl", rows), NULL_ID, propose_max_p=1.0),
                     redis_url=redis_url)
    assert res.reason.startswith("finished"), res.reason
    bus = res.run.bus
    answers = [PairedRound.from_bytes(r.value) for r in bus.records(bus.topics.name(PairedRound.topic))]
    assert max(a.label_pairs for a in answers) >= 60  # the proposers did read the label pairs
    tested = [h for h in res.hypotheses if h.kind == "paired" and h.hypothesis_id in res.final]
    assert len(tested) >= 5, len(tested)
    assert validated(res) == [], [h.text for h in validated(res)]


async def test_sim_styles_are_found_as_paired_findings(redis_url):
    sim = {"backend": "sim", "sim": {"styles": True}}
    cfg = sim_config(seed=1, max_texts=3000, models={"base": sim, "intervention": sim},
                     experiment={"id": "sim-styles-pipeline"})
    res = await arun(cfg, redis_url=redis_url)
    found = {style_by_rule(h, DEFAULT_STYLES) for h in validated(res) if h.kind == "paired"}
    assert {s.name for s in DEFAULT_STYLES} <= found, found
