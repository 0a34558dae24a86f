"""The sink reports paired findings beside mode findings, from the events the pipeline produces.

A paired hypothesis (exclamations, planted in 30% of the intervention's answers) is decided by the
validator's paired tier on held-out pairs; the run directory is finalised like any run's.  Its
results row says kind ``paired`` (the cluster ones ``mode``, the finer kind kept in
``hypothesis_kind``), its text says direction and size in words, summary.json counts validated
findings by kind, and ground truth matches the planted style by rule, with precision and recall
per kind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from report_fixture import CATS, EXP, events

from services.core.config import Config, PlantedBehaviour
from services.core.events import Hypothesis, TextRef
from services.groundtruth import GroundTruthRule
from services.paired.hypotheses import PairedHypothesis
from services.paired.service import hypothesis_event
from services.sink.finalize import finalize_run
from services.sink.run_writer import RunWriter
from services.stats.fdr import LordPlusPlus
from services.validator.paired_tier import decide_paired_hypothesis

EXCLAIM = PlantedBehaviour(name="exclaims", kind="style", description="ends answers with an exclamation mark",
                           rate=0.3, meta={"direction": "intervention", "features": ["ends_with_exclamation"]})
PAIRS = 120


def holdout(seed: int = 0) -> list[TextRef]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(PAIRS):
        base = f"Answer {k} about the weather and the trains."
        inter = base + (" !" if rng.random() < 0.3 else "")
        out += [TextRef(text_id=f"pb{k}", prompt_id=f"pp{k}", role="base", text=base, pair_id=f"pair-{k}"),
                TextRef(text_id=f"pi{k}", prompt_id=f"pp{k}", role="intervention", text=inter, pair_id=f"pair-{k}")]
    return out


async def paired_events() -> list:
    from services.paired.scorers import make_scorer
    from services.paired.service import pairs_of_refs

    cfg = Config()
    ph = PairedHypothesis(text="the intervention's answers end with an exclamation mark more often",
                          direction="intervention", scorer={"type": "feature", "name": "ends_with_exclamation"},
                          proposer="features", binary=True)
    h: Hypothesis = hypothesis_event(ph, EXP, [], holdout()).model_copy(update={"created_at": 1033.0})
    scores = make_scorer(h.scorer).score(pairs_of_refs(h.holdout_texts))
    v = decide_paired_hypothesis(h, scores, LordPlusPlus(0.05), cfg, cfg.validator.tiers[0], 0, is_last=False)
    return [h, v]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    import asyncio

    run_dir = Path(tmp_path_factory.mktemp("paired-sink")) / EXP
    w = RunWriter(run_dir)
    w.open("experiment: {}\n")
    extra = asyncio.run(paired_events())
    for ev in [*events(), *extra]:
        w.add(ev)
    w.flush_all()
    w.close()
    return finalize_run(run_dir, alpha=0.05, ground_truth=GroundTruthRule([CATS, EXCLAIM]))


def test_paired_row_has_its_kind_test_and_words(run) -> None:
    rows = [orjson.loads(x) for x in (run.run_dir / "results.jsonl").read_bytes().splitlines()]
    paired = [r for r in rows if r["kind"] == "paired"]
    assert len(paired) == 1
    r = paired[0]
    assert r["decision"] == "validated" and r["hypothesis_kind"] == "paired" and r["direction"] == "intervention"
    assert 0.5 < r["effect_lo"] <= r["effect"] <= r["effect_hi"] and r["n_pairs"] == PAIRS
    assert r["p_intervention_higher"] == r["effect"] and r["rate_other"] == 0.0 and 0.15 < r["rate_claimed"] < 0.45
    pct = round(100 * r["rate_claimed"])
    assert r["text"] == f"{r['claim']}: in {pct}% of pairs against 0% for the base model"
    assert {x["kind"] for x in rows if x["kind"] != "paired"} == {"mode"}
    assert {x["hypothesis_kind"] for x in rows if x["kind"] == "mode"} == {"contrastive", "templated"}


def test_summary_counts_findings_by_kind_and_scores_both_kinds(run) -> None:
    s = run.summary
    assert s["validated_by_kind"] == {"mode": 2, "paired": 1}  # h1 and h4 (share statements are evidence)
    gt = s["ground_truth"]
    assert gt["planted_kinds"] == {"cats": "mode", "exclaims": "style"}
    paired_id = next(r["hypothesis_id"] for r in run.rows if r["kind"] == "paired")
    assert gt["by_kind"]["paired"]["matched"] == {"exclaims": [paired_id]}
    assert gt["by_kind"]["paired"]["precision"] == 1.0 and "exclaims" not in gt["by_kind"]["mode"]["matched"]
    assert gt["recall"] == 1.0 and gt["missed"] == []


def test_report_has_a_paired_section_with_the_finding(run) -> None:
    html = (run.run_dir / "report.html").read_text()
    section = html.split("<h2>Paired findings</h2>")[1].split("<h2>")[0]
    assert "exclamation mark" in section and "data-kind='paired'" in section
