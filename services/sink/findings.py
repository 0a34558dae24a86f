"""Results rows grouped into findings: what the report and the terminal table count and show.

A *finding* is a described hypothesis validated on held-out texts its labeler never saw.  Two
kinds sit side by side: ``mode`` (a cluster one model fills and the other does not) and ``paired``
(a difference in how both models answer the same prompts; results rows with ``kind: paired``).
Everything else is evidence shown beside a finding, never a finding of its own:

* the templated share statement about the same candidate cluster ("the intervention model is far
  more likely to write texts like cluster 31") restates the clusterer's share test;
* a *mirror* (a row whose ``mirror_of`` names another finding's hypothesis id) is the same
  difference seen from the other side (same prompts, opposite role), so it sits under the
  finding it mirrors.

Pure functions of the rows, so the HTML report and the terminal table cannot disagree on counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from services.sink.formatting import finite

EVIDENCE_KINDS = frozenset({"templated"})  # statements that restate the cluster's share test
FindingKind = Literal["mode", "paired"]
# the names a paired row's numbers may carry (the producer is another module; either spelling works)
PAIRED_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "effect": ("effect", "paired_effect", "p_higher"),
    "lo": ("effect_lo", "effect_ci_low", "effect_low", "ci_low"),
    "hi": ("effect_hi", "effect_ci_high", "effect_high", "ci_high"),
    "rate": ("rate_claimed", "rate_side"),  # then rate_<direction>
    "rate_other": ("rate_other", "rate_partner"),  # then rate_<the other role>
    "n": ("n_pairs", "n"),
})


@dataclass
class Finding:
    number: int  # 1-based, in display order (mode findings first, then paired)
    kind: FindingKind
    row: dict[str, Any]  # the described hypothesis's results row
    evidence: list[dict[str, Any]] = field(default_factory=list)  # share statements, same candidate
    mirrors: list[dict[str, Any]] = field(default_factory=list)  # the difference seen from the other side

    @property
    def hypothesis_id(self) -> str:
        return str(self.row.get("hypothesis_id", ""))


@dataclass
class Grouped:
    findings: list[Finding]
    not_validated: list[dict[str, Any]]  # described hypotheses rejected or still pending
    # validated share statements of clusters that have no validated description: the cluster
    # differs, but no description of how was proven on held-out texts
    undescribed: list[dict[str, Any]]
    share_statements: list[dict[str, Any]]  # every templated row, whatever its decision

    def of_kind(self, kind: FindingKind) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]


def clean_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A results row with NaN (pandas' missing value) turned into None, so ``is None`` tests work."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in row.items()}


def finding_kind(row: Mapping[str, Any]) -> FindingKind | None:
    """'paired' or 'mode' for a described hypothesis; None for an evidence statement.  Rows carry
    ``kind`` (mode or paired) and ``hypothesis_kind`` (contrastive, templated, paired); older rows
    only ``kind`` with the finer value."""
    kind = str(row.get("kind") or "")
    if kind in EVIDENCE_KINDS or str(row.get("hypothesis_kind") or "") in EVIDENCE_KINDS:
        return None
    return "paired" if kind == "paired" else "mode"


def _order(row: Mapping[str, Any]) -> tuple[float, float]:
    rank = finite(row.get("rank"))
    p = finite(row.get("p_value"))
    return (rank if rank is not None else float("inf"), p if p is not None else 1.0)


def group_rows(rows: Iterable[Mapping[str, Any]]) -> Grouped:
    """Findings (each with its evidence and mirrors), then everything that is not one."""
    clean = sorted((clean_row(r) for r in rows), key=_order)
    share = [r for r in clean if finding_kind(r) is None]
    described = [r for r in clean if finding_kind(r) is not None]
    validated = [r for r in described if r.get("decision") == "validated"]
    by_id = {str(r.get("hypothesis_id")): r for r in validated}
    mirror_ids = {str(r.get("hypothesis_id")) for r in validated
                  if r.get("mirror_of") and str(r["mirror_of"]) in by_id
                  and str(r["mirror_of"]) != str(r.get("hypothesis_id"))}
    heads = [r for r in validated if str(r.get("hypothesis_id")) not in mirror_ids]
    attached: dict[str, list[dict[str, Any]]] = {}
    for r in validated:
        hid = str(r.get("hypothesis_id"))
        if hid in mirror_ids:
            root = _root(hid, by_id, mirror_ids)
            if root in mirror_ids:  # a cycle of mirrors: no head to sit under, so it is one itself
                heads.append(r)
            else:
                attached.setdefault(root, []).append(r)
    heads.sort(key=lambda r: (finding_kind(r) == "paired", _order(r)))
    findings = [Finding(i, finding_kind(r) or "mode", r, mirrors=attached.get(str(r.get("hypothesis_id")), []))
                for i, r in enumerate(heads, 1)]
    by_cand: dict[str, list[Finding]] = {}  # a mirror's share statement sits under its head too
    for f in findings:
        for r in (f.row, *f.mirrors):
            if r.get("candidate_id") and finding_kind(r) == "mode":
                by_cand.setdefault(str(r["candidate_id"]), []).append(f)
    undescribed = []
    for r in share:
        owners = by_cand.get(str(r.get("candidate_id")), [])
        for f in owners:
            f.evidence.append(r)
        if not owners and r.get("decision") == "validated":
            undescribed.append(r)
    not_validated = [r for r in described if r.get("decision") != "validated"]
    return Grouped(findings, not_validated, undescribed, share)


def _root(hid: str, by_id: Mapping[str, Mapping[str, Any]], mirror_ids: set[str]) -> str:
    """Follow mirror_of links to the finding at the head of the chain (cycles stop where they close)."""
    seen = {hid}
    while hid in mirror_ids:
        nxt = str(by_id[hid].get("mirror_of"))
        if nxt in seen:
            break
        seen.add(nxt)
        hid = nxt
    return hid


def paired_value(row: Mapping[str, Any], key: str) -> float | None:
    """A paired row's number (effect, lo, hi, rate, rate_other, n), flat or inside an ``effect`` dict."""
    nested = row.get("effect") if isinstance(row.get("effect"), Mapping) else {}
    names = list(PAIRED_FIELDS[key])
    side = str(row.get("direction") or "intervention")
    if key in ("rate", "rate_other"):
        other = "base" if side == "intervention" else "intervention"
        names.append(f"rate_{side if key == 'rate' else other}")
    for name in names:
        for src in (row, nested):
            v = finite(src.get(name)) if not isinstance(src.get(name), Mapping) else None
            if v is not None:
                return v
    return None
