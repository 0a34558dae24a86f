"""Finalisation: from a run directory to texts.parquet, clusters.*, results.jsonl,
hypotheses.parquet, summary.json and report.html.

It reads nothing but the run directory (event logs, part files, config.yaml), so a report can be
rebuilt from a copied run directory without the broker, and it is safe to repeat.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pyarrow as pa

from services.core.config import Config, ConfigError, load_config
from services.core.events import CandidateCluster, Hypothesis, TextRef
from services.core.topics import Topics
from services.groundtruth import GroundTruthRule, finding_scope, group_mirrors, precision_recall
from services.sink.paired_rows import PAIRED_ROWS
from services.sink.report import write_report
from services.sink.results import RowKind, is_finding_row, result_schema, results_rows
from services.sink.run_state import RunState, TextStats, load_state, scan_embeddings, scan_texts
from services.sink.run_writer import embedding_parts, text_parts
from services.sink.storage import update_latest_link, write_json, write_jsonl, write_table
from services.sink.summary import build_summary, cluster_rows

log = logging.getLogger("autointerv.sink")

# Hypothesis kind -> the columns it adds to its results row (services/sink/results.py, RowKind)
ROW_KINDS: Mapping[str, RowKind] = MappingProxyType({"paired": PAIRED_ROWS})


@dataclass
class FinalRun:
    """What finalisation produced, handed to the report renderer."""

    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    state: RunState
    texts: TextStats


def candidate_texts(cand: CandidateCluster) -> list[TextRef]:
    """The cluster's texts we know of: held-out first (never shown to the labeler), then labelled."""
    seen: set[str] = set()
    out = []
    for t in [*cand.holdout_texts, *cand.label_texts]:
        if t.text_id not in seen:
            seen.add(t.text_id)
            out.append(t)
    return out


# --------------------------------------------------------------------------- ground truth


def _with_candidate_texts(h: Hypothesis, cand: CandidateCluster | None) -> Hypothesis:
    """``h`` with its cluster's texts as the sink received them in the candidate (purity reads them)."""
    if cand is None:
        return h
    return h.model_copy(update={"label_text_ids": [t.text_id for t in cand.label_texts],
                                "holdout_texts": cand.holdout_texts})


def ground_truth_summary(rows: list[dict[str, Any]], state: RunState, texts: TextStats,
                         rule: GroundTruthRule) -> dict[str, Any] | None:
    """Match every hypothesis by meaning (the one rule, services/groundtruth.py), group mirror
    findings, fill the rows' ground-truth columns, and return the summary's precision/recall.

    Blocking: it encodes (or calls the judge) in its own event loop; the sink runs finalisation
    in a worker thread."""
    if not rule.behaviours:
        return None
    truth = {t: (i.role, i.behaviour) for t, i in texts.lookup.items()}
    hyps = [_with_candidate_texts(state.hypotheses[r["hypothesis_id"]], state.candidates.get(r["candidate_id"]))
            for r in rows if r["hypothesis_id"] in state.hypotheses]
    matches = {m.hypothesis_id: m for m in asyncio.run(rule.match(hyps, truth=truth))}
    findings = [r for r in rows if is_finding_row(r)]
    scopes = [finding_scope(state.hypotheses[r["hypothesis_id"]], state.candidates[r["candidate_id"]])
              for r in findings if r["hypothesis_id"] in state.hypotheses and r["candidate_id"] in state.candidates]
    mirror_of = group_mirrors(scopes)
    for r in rows:
        m = matches.get(r["hypothesis_id"])
        if m is not None:
            r.update(matched_behaviour=m.behaviour, match_score=m.score, purity_behaviour=m.purity_behaviour,
                     purity=m.purity)
        r["mirror_of"] = mirror_of.get(r["hypothesis_id"])
    planted = [b.name for b in rule.behaviours]
    disc = precision_recall(matches.values(), [r["hypothesis_id"] for r in findings], planted, mirror_of)
    out = disc.to_json(planted, rule.name)
    out["planted_kinds"] = {b.name: b.kind for b in rule.behaviours}
    # each kind's findings on their own: what the mode path and the paired path found
    out["by_kind"] = {
        kind: {k: v for k, v in precision_recall(matches.values(), [r["hypothesis_id"] for r in findings
                                                                      if r.get("kind") == kind],
                                                 planted, mirror_of).to_json(planted, rule.name).items()
               if k in ("matched", "missed", "n_validated", "n_validated_matching", "precision", "recall")}
        for kind in ("mode", "paired")}
    return out


# --------------------------------------------------------------------------- finalisation


def _run_config(run_dir: Path, config: Config | None) -> Config | None:
    """``config``, else the run directory's config.yaml (None when it cannot be read)."""
    if config is not None or not (run_dir / "config.yaml").exists():
        return config
    try:
        return load_config(run_dir / "config.yaml", environ={})
    except ConfigError as exc:
        log.warning("the run's config cannot be read", extra={"error": str(exc)[:200]})
        return None


def _rule(config: Config | None, ground_truth: bool | GroundTruthRule) -> GroundTruthRule | None:
    """The ground-truth rule: given, else from the run's config (None: none planted or not wanted)."""
    if isinstance(ground_truth, GroundTruthRule) or not ground_truth:
        return ground_truth or None
    if config is None:
        return None
    return GroundTruthRule.from_config(config) if config.ground_truth.enabled else None


def finalize_run(run_dir: Path, alpha: float, experiment_id: str | None = None,
                 topic_prefix: str | None = None, render: bool = True,
                 ground_truth: bool | GroundTruthRule = True, config: Config | None = None,
                 stopped_because: str | None = None) -> FinalRun:
    """Write texts.parquet, clusters.*, results.jsonl, hypotheses.parquet, summary.json, report.html.

    Reads only the run directory (event logs, part files, config.yaml for the planted behaviours
    and the topic prefix unless ``config`` is given) and is safe to repeat.  ``ground_truth``: False
    skips it; a :class:`GroundTruthRule` replaces the configured one."""
    run_dir = Path(run_dir).resolve()  # "runs/latest" must not name itself
    experiment_id = experiment_id or run_dir.name
    text_parts(run_dir).merge(run_dir / "texts.parquet")
    embedding_parts(run_dir).merge(run_dir / "embeddings.parquet")
    state = load_state(run_dir)
    # only the over-represented side's texts: the other side's are padded from everywhere (contrast)
    cand_ids = {cid: [t.text_id for t in candidate_texts(c) if t.role == c.direction]
                for cid, c in state.candidates.items()}
    wanted = {t for ids in cand_ids.values() for t in ids}
    texts = scan_texts(run_dir / "texts.parquet", wanted)
    rows = results_rows(state, alpha, ROW_KINDS)
    cfg = _run_config(run_dir, config)
    rule = _rule(cfg, ground_truth)
    gt = ground_truth_summary(rows, state, texts, rule) if rule is not None else None
    prefix = topic_prefix or (cfg.bus.topic_prefix if cfg is not None else None)
    summary = build_summary(experiment_id, state, texts, scan_embeddings(run_dir / "embeddings.parquet"),
                            rows, gt, alpha, Topics(prefix) if prefix else None, stopped_because)
    snap = state.latest_snapshot
    write_json(run_dir / "clusters.json", snap.model_dump(mode="json") if snap else None)
    crows = cluster_rows(snap)
    write_table(run_dir / "clusters.parquet", pa.Table.from_pylist(crows) if crows
                else pa.table({"cluster_id": pa.array([], pa.int64())}))
    write_jsonl(run_dir / "results.jsonl", rows)
    write_table(run_dir / "hypotheses.parquet",
                pa.Table.from_pylist(rows, schema=result_schema(ROW_KINDS.values())))
    write_json(run_dir / "summary.json", summary)
    final = FinalRun(run_dir, summary, rows, state, texts)
    if render:
        write_report(run_dir)  # reads the files just written
    update_latest_link(run_dir.parent, run_dir.name)
    return final
