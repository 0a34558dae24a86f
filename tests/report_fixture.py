"""A small, fully known run directory for the report tests (no broker: the sink's RunWriter writes it).

30 prompts, each answered once by both models (pairs).  The intervention writes about cats on
prompts 0-14.  Three clusters at snapshot 1 (0: base texts, 1: ordinary intervention texts, 2:
cats); at snapshot 2 cluster 2 is split into 3 and 4: 3 has 5 own texts and 7 inherited, 4 has none
of its own yet and 8 inherited (the case a share panel used to show as 0.50, CI [0, 1]).

Hypotheses: h1 and h4 describe cluster 2 (both validated: two findings on one cluster), t1 is its
share statement; h2 (rejected) and t2 (validated) are about cluster 0, so cluster 0 differs without
a proven description.  :func:`add_rows` appends a paired finding and a mirror of h1 to
results.jsonl, as the paired and ground-truth helpers will.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from services.core.config import PlantedBehaviour
from services.core.events import (
    CandidateCluster,
    ClusterQuality,
    ClusterSnapshot,
    ClusterStats,
    DecodedText,
    EmbeddedText,
    Event,
    Hypothesis,
    TextRef,
    Validation,
)
from services.groundtruth import GroundTruthRule
from services.sink.finalize import finalize_run
from services.sink.run_writer import RunWriter

EXP = "report-fixture"
N = 30
E_VALUE = 381740047990.18  # printed as 3.8e11, never as 381740047990.18
CENTRES = np.eye(8, dtype=np.float32)[:5]  # 0 base, 1 ordinary intervention, 2 cats (3, 4: its halves)
PAIRED_TEXT = "The intervention's answers end with an exclamation mark more often"
MIRROR_TEXT = "The base model more often writes about battles"
CATS = PlantedBehaviour(name="cats", description="mentions cats", rate=0.5, keywords=["cat", "cats", "kitten"])


def _texts() -> tuple[list[DecodedText], dict[str, int]]:
    """The texts and the cluster (0..4 at the final snapshot) each one is near."""
    out, where = [], {}
    for i in range(N):
        for role in ("base", "intervention"):
            cats = role == "intervention" and i < 15
            body = (f"My cat number {i} purrs all day; cats make everything better." if cats
                    else f"A {role} answer number {i} about the weather and the trains.")
            t = DecodedText(experiment_id=EXP, text_id=f"{role[0]}{i}", request_id="r", pair_id=f"pair{i}",
                            role=role, model_id=f"sim-{role}", prompt_id=f"p{i}", prompt=f"Write about topic {i}.",
                            text=body, generated_at=1000.0 + i, meta={"behaviour": "cats" if cats else None})
            out.append(t)
            where[t.text_id] = (3 if i % 2 else 4) if cats else (1 if role == "intervention" else 0)
    return out, where


def _ref(t: DecodedText) -> TextRef:
    return TextRef(text_id=t.text_id, prompt_id=t.prompt_id, role=t.role, text="")


def _stats(cid: int, own: tuple[int, int], total: tuple[int, int], parent: int | None = None) -> ClusterStats:
    n = sum(own)
    return ClusterStats(cluster_id=cid, count_base=total[0], count_intervention=total[1], own_base=own[0],
                        own_intervention=own[1], share_intervention=own[1] / n if n else 0.5,
                        share_ci=(0.6, 1.0) if n and own[1] == n else (0.0, 1.0), e_value=E_VALUE if cid == 3 else 2.0,
                        parent_id=parent)


def _snapshot(seq: int, clusters: list[ClusterStats], lineage: dict[int, int]) -> ClusterSnapshot:
    cents = CENTRES[[c.cluster_id for c in clusters]]
    return ClusterSnapshot(experiment_id=EXP, seq=seq, n_seen=2 * N, n_base=N, n_intervention=N, engine="minibatch",
                           clusters=clusters, quality=ClusterQuality(silhouette=0.4, n_clusters=len(clusters)),
                           lineage=lineage, centroid_ids=[c.cluster_id for c in clusters],
                           centroids_b64=EmbeddedText.encode_vector(cents.ravel()),
                           centroid_dim=cents.shape[1], created_at=1030.0 + seq)


def _validation(h: Hypothesis, tier: str, idx: int, decision: str, p: float, auc: float | None) -> Validation:
    return Validation(experiment_id=EXP, validation_id=f"v-{h.hypothesis_id}-{tier}", hypothesis_id=h.hypothesis_id,
                      tier=tier, tier_index=idx, decision=decision, auc=auc,
                      auc_ci=None if auc is None else (auc - 0.1, min(1.0, auc + 0.05)), p_value=p,
                      alpha_level=0.01, n_pos=7, n_neg=7, hypothesis=h, created_at=1040.0 + idx)


def events() -> list[Event]:
    texts, where = _texts()
    rng = np.random.default_rng(0)
    embs = [EmbeddedText(experiment_id=EXP, text_id=t.text_id, role=t.role, prompt_id=t.prompt_id, text=t.text,
                         embedding_model="test", dim=8,
                         vector_b64=EmbeddedText.encode_vector(CENTRES[where[t.text_id]] + 0.05 * rng.normal(size=8)))
            for t in texts]
    snaps = [
        _snapshot(1, [_stats(0, (N, 0), (N, 0)), _stats(1, (0, 15), (0, 15)), _stats(2, (0, 15), (0, 15))], {}),
        _snapshot(2, [_stats(0, (N, 0), (N, 0)), _stats(1, (0, 15), (0, 15)), _stats(3, (0, 5), (0, 12), 2),
                      _stats(4, (0, 0), (0, 8), 2)], {3: 2, 4: 2}),
    ]
    cats = [t for t in texts if where[t.text_id] in (3, 4)]
    base = [t for t in texts if t.role == "base"]
    c1 = CandidateCluster(experiment_id=EXP, candidate_id="c1", cluster_id=2, snapshot_seq=1, direction="intervention",
                          count_base=0, count_intervention=15, share_intervention=1.0, share_ci=(0.8, 1.0),
                          e_value=E_VALUE, alpha_spent=0.01, created_at=1031.0,
                          label_texts=[_ref(t) for t in cats[:4] + base[20:24]],
                          holdout_texts=[_ref(t) for t in cats[4:] + base[24:]])
    c2 = CandidateCluster(experiment_id=EXP, candidate_id="c2", cluster_id=0, snapshot_seq=1, direction="base",
                          count_base=N, count_intervention=0, share_intervention=0.0, share_ci=(0.0, 0.1),
                          e_value=50.0, alpha_spent=0.005, created_at=1031.0, label_texts=[_ref(t) for t in base[:5]],
                          holdout_texts=[_ref(t) for t in base[5:12]])

    def hyp(hid: str, cand: CandidateCluster, text: str, kind: str = "contrastive",
            keywords: tuple[str, ...] = ()) -> Hypothesis:
        return Hypothesis(experiment_id=EXP, hypothesis_id=hid, candidate_id=cand.candidate_id,
                          cluster_id=cand.cluster_id, direction=cand.direction, text=text, kind=kind,
                          labeler="offline:log-odds" if kind != "templated" else "template:share",
                          keywords=list(keywords), holdout_texts=cand.holdout_texts,
                          cluster_evidence={"e_value": cand.e_value}, created_at=1032.0)

    h1 = hyp("h1", c1, "Mentions cats & kittens <often>", keywords=("cats", "purrs"))
    h4 = hyp("h4", c1, "Writes about pets", keywords=("number",))
    t1 = hyp("t1", c1, "The intervention model is far more likely to write texts like cluster 2", "templated")
    h2 = hyp("h2", c2, "Talks about trains", keywords=("trains",))
    t2 = hyp("t2", c2, "The base model is far more likely to write texts like cluster 0", "templated")
    vals = [_validation(h1, "keyword", 0, "escalated", 0.02, 0.7), _validation(h1, "embedding", 1, "validated",
                                                                              1.2e-7, 0.95),
            _validation(h4, "keyword", 0, "validated", 3e-4, 0.8),
            _validation(t1, "share-test", 0, "validated", 2.6e-12, None),
            _validation(h2, "keyword", 0, "rejected", 0.4, 0.52), _validation(t2, "share-test", 0, "validated", 0.02,
                                                                               None)]
    return [*texts, *embs, *snaps, c1, c2, h1, h4, t1, h2, t2, *vals]


def add_rows(run_dir: Path) -> None:
    """Append a paired finding and a mirror of h1 to results.jsonl (fields of the coming producers)."""
    rows = [
        {"rank": 90, "hypothesis_id": "p1", "candidate_id": None, "cluster_id": None, "kind": "paired",
         "direction": "intervention", "text": PAIRED_TEXT, "decision": "validated", "p_value": 1.0e-6,
         "tier": "feature", "effect": 0.71, "effect_lo": 0.62, "effect_hi": 0.79, "rate_claimed": 0.31,
         "rate_other": 0.06, "n_pairs": 120, "labeler": "offline:features", "keywords": []},
        {"rank": 91, "hypothesis_id": "m1", "candidate_id": "c9", "cluster_id": 0, "kind": "contrastive",
         "direction": "base", "text": MIRROR_TEXT, "decision": "validated", "p_value": 1e-4, "mirror_of": "h1",
         "labeler": "offline:log-odds", "keywords": []},
    ]
    with (run_dir / "results.jsonl").open("ab") as fh:
        for r in rows:
            fh.write(orjson.dumps(r) + b"\n")


def build_run(root: Path, with_extra_rows: bool = True) -> Path:
    """Write and finalise the fixture run; returns its directory (report.html rendered)."""
    run_dir = root / EXP
    w = RunWriter(run_dir)
    w.open("experiment: {}\n")
    for ev in events():
        w.add(ev)
    w.flush_all()
    w.close()
    finalize_run(run_dir, alpha=0.05, ground_truth=GroundTruthRule([CATS]))  # by meaning, the bundled MiniLM
    if with_extra_rows:
        from services.sink.report import write_report

        add_rows(run_dir)
        write_report(run_dir)
    return run_dir
