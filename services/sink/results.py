"""Results rows: one per hypothesis with its final decision (:mod:`services.core.decision`),
the held-out test behind it, its cluster's share evidence beside it, and a Benjamini-Hochberg
q-value across every decided hypothesis.

Every number comes from events the sink itself received (the candidate, the snapshot totals, the
validations), never from what one message says about another.  Another kind of hypothesis adds
its own columns with a :class:`RowKind` keyed by ``Hypothesis.kind``; its fields follow the common
ones, and :func:`result_schema` gives hypotheses.parquet its columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pyarrow as pa

from services.core.decision import final_validation
from services.core.events import CandidateCluster, Hypothesis, Validation
from services.groundtruth import is_finding
from services.sink.run_state import RunState
from services.stats.fdr import benjamini_hochberg
from services.stats.sequential import newcombe_diff_interval

RESULT_SCHEMA = pa.schema([
    ("rank", pa.int64()), ("hypothesis_id", pa.string()), ("candidate_id", pa.string()),
    ("cluster_id", pa.int64()), ("direction", pa.string()), ("text", pa.string()), ("kind", pa.string()),
    ("hypothesis_kind", pa.string()),
    ("labeler", pa.string()), ("keywords", pa.list_(pa.string())),
    ("decision", pa.string()), ("tier", pa.string()), ("tier_index", pa.int64()), ("tier_path", pa.string()),
    ("auc", pa.float64()), ("auc_lo", pa.float64()), ("auc_hi", pa.float64()),
    ("p_value", pa.float64()), ("alpha_level", pa.float64()), ("q_value", pa.float64()),
    ("bh_rejected", pa.bool_()), ("n_pos", pa.int64()), ("n_neg", pa.int64()),
    ("share_intervention", pa.float64()), ("share_lo", pa.float64()), ("share_hi", pa.float64()),
    ("share_diff", pa.float64()), ("share_diff_lo", pa.float64()), ("share_diff_hi", pa.float64()),
    ("e_value", pa.float64()), ("alpha_spent", pa.float64()),
    ("calls", pa.int64()), ("cost_usd", pa.float64()),
    ("proposed_at", pa.float64()), ("decided_at", pa.float64()), ("matched_behaviour", pa.string()),
    ("match_score", pa.float64()), ("purity_behaviour", pa.string()), ("purity", pa.float64()),
    ("mirror_of", pa.string()),
])

DECISION_ORDER: Mapping[str, int] = MappingProxyType({"validated": 0, "pending": 1, "rejected": 2})

OptFloat3 = tuple[float | None, float | None, float | None]
RowFields = Callable[[Hypothesis, Sequence[Validation], RunState], Mapping[str, Any]]


@dataclass(frozen=True)
class RowKind:
    """The columns one kind of hypothesis adds to its results row, and how to fill them from the
    hypothesis, its validations (tier order) and the run's events."""

    columns: tuple[pa.Field, ...]
    fields: RowFields


NO_KINDS: Mapping[str, RowKind] = MappingProxyType({})


def result_schema(kinds: Iterable[RowKind] = ()) -> pa.Schema:
    """RESULT_SCHEMA with every kind's columns appended (first definition of a name wins)."""
    fields = list(RESULT_SCHEMA)
    names = set(RESULT_SCHEMA.names)
    for kind in kinds:
        for f in kind.columns:
            if f.name not in names:
                names.add(f.name)
                fields.append(f)
    return pa.schema(fields)


def share_difference(cand: CandidateCluster | None, totals: Mapping[int, tuple[int, int]]) -> OptFloat3:
    """P(cluster | intervention) - P(cluster | base) with a 95% Newcombe interval.

    Computed from the candidate the sink received and the snapshot totals it was drawn from, never
    from numbers carried in a hypothesis or validation message."""
    if cand is None or not totals:
        return None, None, None
    seqs = [s for s in totals if s <= cand.snapshot_seq] or list(totals)
    n_base, n_int = totals[max(seqs)]
    if n_base <= 0 or n_int <= 0:
        return None, None, None
    k_int, k_base = min(cand.count_intervention, n_int), min(cand.count_base, n_base)
    lo, hi = newcombe_diff_interval(k_int, n_int, k_base, n_base)
    return k_int / n_int - k_base / n_base, lo, hi


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def results_rows(state: RunState, alpha: float, kinds: Mapping[str, RowKind] = NO_KINDS) -> list[dict[str, Any]]:
    """One row per hypothesis with its final decision, effect sizes and a BH q-value."""
    by_h: dict[str, list[Validation]] = {}
    for v in state.validations:
        by_h.setdefault(v.hypothesis_id, []).append(v)
    hyps = dict(state.hypotheses)
    for v in state.validations:  # a hypothesis seen only through its validations
        if v.hypothesis is not None:
            hyps.setdefault(v.hypothesis_id, v.hypothesis)
    rows = []
    for hid, h in hyps.items():
        vals = sorted(by_h.get(hid, []), key=lambda x: (x.tier_index, x.created_at))  # tier order
        row = _result_row(h, vals, state)
        if h.kind in kinds:
            row.update(kinds[h.kind].fields(h, vals, state))
        rows.append(row)
    final = [i for i, r in enumerate(rows) if r["decision"] != "pending" and r["p_value"] is not None]
    if final:
        rejected, q = benjamini_hochberg([rows[i]["p_value"] for i in final], alpha)
        for i, rej, qv in zip(final, rejected, q, strict=True):
            rows[i]["q_value"], rows[i]["bh_rejected"] = float(qv), bool(rej)
    rows.sort(key=lambda r: (DECISION_ORDER[r["decision"]],
                             1.0 if r["p_value"] is None else r["p_value"], r["proposed_at"] or 0.0))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _validation_fields(v: Validation | None, decision: str) -> dict[str, Any]:
    keys = ("tier", "tier_index", "auc", "auc_lo", "auc_hi", "p_value", "alpha_level", "n_pos", "n_neg",
            "decided_at")
    if v is None:
        return dict.fromkeys(keys)
    return {
        "tier": v.tier, "tier_index": v.tier_index, "auc": _none_if_nan(v.auc),
        "auc_lo": _none_if_nan(v.auc_ci[0]) if v.auc_ci else None,
        "auc_hi": _none_if_nan(v.auc_ci[1]) if v.auc_ci else None,
        "p_value": _none_if_nan(v.p_value), "alpha_level": v.alpha_level, "n_pos": v.n_pos, "n_neg": v.n_neg,
        "decided_at": v.created_at if decision != "pending" else None,
    }


def _result_row(h: Hypothesis, vals: Sequence[Validation], state: RunState) -> dict[str, Any]:
    """A hypothesis with its final decision; the share fields are its cluster's evidence, shown
    beside it, from the candidate the sink itself received (None when that never arrived)."""
    v, decision = final_validation(vals)
    cand = state.candidates.get(h.candidate_id)
    diff = share_difference(cand, state.totals_by_seq)
    return {
        "rank": 0, "hypothesis_id": h.hypothesis_id, "candidate_id": h.candidate_id,
        "cluster_id": h.cluster_id, "direction": h.direction, "text": h.text,
        "kind": finding_kind_of(h), "hypothesis_kind": h.kind,
        "labeler": h.labeler, "keywords": list(h.keywords), "decision": decision,
        "tier_path": ">".join(f"{x.tier}:{x.decision}" for x in vals),
        **_validation_fields(v, decision),
        "q_value": None, "bh_rejected": None,
        "share_intervention": cand.share_intervention if cand else None,
        "share_lo": cand.share_ci[0] if cand else None, "share_hi": cand.share_ci[1] if cand else None,
        "share_diff": diff[0], "share_diff_lo": diff[1], "share_diff_hi": diff[2],
        "e_value": cand.e_value if cand else None, "alpha_spent": cand.alpha_spent if cand else None,
        "calls": sum(x.calls for x in vals), "cost_usd": sum(x.cost_usd for x in vals),
        "proposed_at": h.created_at, "matched_behaviour": None, "match_score": None,
        "purity_behaviour": None, "purity": None, "mirror_of": None,
    }


def finding_kind_of(h: Hypothesis) -> str:
    """A row's ``kind``: ``paired`` (how both models answer the same prompts) or ``mode`` (a
    cluster one model fills); ``hypothesis_kind`` keeps the finer kind (contrastive, templated)."""
    return "paired" if h.kind == "paired" else "mode"


def is_finding_row(row: Mapping[str, Any]) -> bool:
    """A row whose hypothesis was validated on held-out texts (services/groundtruth.py)."""
    return is_finding(row.get("decision"), row.get("auc"))
