"""summary.json and the clusters table of a finalised run: counts, why it stopped, timings, costs."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from services.core.events import ClusterSnapshot
from services.core.topics import Topics
from services.sink.results import is_finding_row
from services.sink.run_state import RunState, TextStats


def cluster_rows(snap: ClusterSnapshot | None) -> list[dict[str, Any]]:
    if snap is None:
        return []
    rows = []
    for c in snap.clusters:
        d = c.model_dump(mode="json")
        d["share_lo"], d["share_hi"] = d.pop("share_ci")
        d["centroid_x"], d["centroid_y"] = d.pop("centroid_2d")
        d["size"] = c.count_base + c.count_intervention
        d["snapshot_seq"] = snap.seq
        rows.append(d)
    return rows


def build_summary(experiment_id: str, state: RunState, texts: TextStats, emb: tuple[int, int],
                  rows: list[dict[str, Any]], gt: dict[str, Any] | None, alpha: float,
                  topics: Topics | None, stopped_because: str | None = None) -> dict[str, Any]:
    """The run's summary.json; dead letters are counted per logical topic (``topics``: the run's
    topic names; None leaves the physical names)."""
    snap = state.latest_snapshot
    validated = [r for r in rows if is_finding_row(r)]  # findings: validated on held-out texts
    decided = [r["decided_at"] for r in validated if r["decided_at"] is not None]
    first_valid = min(decided) if decided else None
    stamps = [x for x in (state.last_event_at, texts.last_at) if x is not None]
    last = max(stamps) if stamps else None
    dl = Counter(topics.logical(d.source_topic) if topics else d.source_topic for d in state.dead_letters)
    fin = state.finished
    return {
        "experiment_id": experiment_id,
        "finalized_at": time.time(),
        # why the run ended; "signal" (or another cause the process names) when the controller never
        # announced the end: then the run is incomplete and the counts are partial
        "stopped_because": fin.stopped_because if fin is not None else (stopped_because or "incomplete"),
        "stop_reason": fin.detail if fin is not None else "",
        "complete": fin is not None,
        "generation": {**(fin.counts if fin is not None else {}), "failures_reported": state.generation_failures},
        "alpha": alpha,
        "texts": {"total": texts.total, "by_role": dict(texts.by_role), "by_model": dict(texts.by_model)},
        "embeddings": {"total": emb[0], "cache_hits": emb[1],
                       "cache_hit_rate": emb[1] / emb[0] if emb[0] else None},
        "clusters": {
            "snapshots": state.n_snapshots,
            "latest_seq": snap.seq if snap else None, "k": len(snap.clusters) if snap else 0,
            "engine": snap.engine if snap else None, "n_seen": snap.n_seen if snap else 0,
            "quality": snap.quality.model_dump(mode="json") if snap else None,
        },
        "uncertainty_events": state.n_uncertainty,
        "candidates": len(state.candidates),
        "hypotheses": len(rows),
        "decisions": dict(Counter(r["decision"] for r in rows)),
        "validated": [r["text"] for r in validated],
        # findings by kind: mode (a cluster one model fills) and paired (how both answer the same prompts)
        "validated_by_kind": {k: sum(1 for r in validated if r.get("kind") == k) for k in ("mode", "paired")},
        "bh_discoveries": sum(1 for r in rows if r["bh_rejected"]),
        "dead_letters": {"total": sum(dl.values()), "by_topic": dict(dl)},
        "timings": {
            "first_text_at": texts.first_at, "last_event_at": last,
            "wall_s": (last - texts.first_at) if last and texts.first_at else None,
            "time_to_first_validated_s": (first_valid - texts.first_at)
            if first_valid is not None and texts.first_at is not None else None,
        },
        "validator_calls": sum(v.calls for v in state.validations),
        "cost_usd": sum(v.cost_usd for v in state.validations),
        "ground_truth": gt,
    }
