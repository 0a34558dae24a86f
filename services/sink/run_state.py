"""A run directory read back for finalisation: its event logs (deduped) and counts over the merged
texts and embedding index, streamed so a run of millions of texts fits in memory."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.core.events import (
    CandidateCluster,
    ClusterSnapshot,
    ControlEvent,
    DeadLetter,
    GenerationReport,
    Hypothesis,
    UncertaintyEvent,
    Validation,
)
from services.core.jsonl import iter_log_objects
from services.sink.run_writer import LOG_FILES
from services.sink.storage import read_events


@dataclass
class TextInfo:
    role: str
    text: str
    behaviour: str | None


@dataclass
class TextStats:
    total: int = 0
    by_role: Counter[str] = field(default_factory=Counter)
    by_model: Counter[str] = field(default_factory=Counter)
    first_at: float | None = None
    last_at: float | None = None
    has_ground_truth: bool = False  # some text carries meta["behaviour"]
    planted: set[str] = field(default_factory=set)  # non-null behaviours present
    lookup: dict[str, TextInfo] = field(default_factory=dict)  # for the wanted ids only


def _behaviour(meta_json: str | None) -> tuple[bool, str | None]:
    if not meta_json or '"behaviour"' not in meta_json:
        return False, None
    meta = orjson.loads(meta_json)
    if not isinstance(meta, dict) or "behaviour" not in meta:
        return False, None
    b = meta["behaviour"]
    return True, None if b is None else str(b)


def scan_texts(path: Path, wanted: set[str]) -> TextStats:
    """Counts over the merged texts file, streamed in batches; text and behaviour of wanted ids."""
    stats = TextStats()
    if not path.exists():
        return stats
    wanted_arr = pa.array(sorted(wanted), pa.string())
    cols = ["text_id", "role", "model_id", "generated_at", "text", "meta"]
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536, columns=cols):
        if batch.num_rows == 0:
            continue
        stats.total += batch.num_rows
        for col, counter in (("role", stats.by_role), ("model_id", stats.by_model)):
            for item in pc.value_counts(batch.column(col)).to_pylist():
                counter[str(item["values"])] += int(item["counts"])
        lo, hi = pc.min_max(batch.column("generated_at")).values()
        if lo.is_valid:
            stats.first_at = lo.as_py() if stats.first_at is None else min(stats.first_at, lo.as_py())
            stats.last_at = hi.as_py() if stats.last_at is None else max(stats.last_at, hi.as_py())
        metas = batch.column("meta")
        flagged = pc.match_substring(metas, '"behaviour"')
        for m in pc.filter(metas, flagged).to_pylist():
            has, b = _behaviour(m)
            stats.has_ground_truth |= has
            if b is not None:
                stats.planted.add(b)
        sel = batch.filter(pc.is_in(batch.column("text_id"), value_set=wanted_arr))
        cols_ = (sel.column(c).to_pylist() for c in ("text_id", "role", "text", "meta"))
        for tid, role, text, meta in zip(*cols_, strict=True):
            stats.lookup.setdefault(tid, TextInfo(role, text, _behaviour(meta)[1]))
    return stats


def scan_embeddings(path: Path) -> tuple[int, int]:
    """(embedded texts, cache hits) of the merged embedding index."""
    if not path.exists():
        return 0, 0
    col = pq.read_table(path, columns=["cache_hit"]).column("cache_hit")
    return len(col), int(pc.sum(col).as_py() or 0)


@dataclass
class RunState:
    """The event logs of a run directory, deduped."""

    n_snapshots: int = 0
    latest_snapshot: ClusterSnapshot | None = None
    totals_by_seq: dict[int, tuple[int, int]] = field(default_factory=dict)  # seq -> (n_base, n_interv)
    n_uncertainty: int = 0
    candidates: dict[str, CandidateCluster] = field(default_factory=dict)
    hypotheses: dict[str, Hypothesis] = field(default_factory=dict)
    validations: list[Validation] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    finished: ControlEvent | None = None  # the controller's end-of-experiment announcement
    generation_failures: int = 0  # prompts x samples the generators could not produce
    last_event_at: float | None = None


def load_state(run_dir: Path) -> RunState:
    st = RunState()
    latest: dict[str, Any] | None = None
    for obj in iter_log_objects(run_dir / LOG_FILES[ClusterSnapshot]):
        seq = int(obj["seq"])
        if seq in st.totals_by_seq:
            continue
        st.totals_by_seq[seq] = (int(obj["n_base"]), int(obj["n_intervention"]))
        if latest is None or seq > int(latest["seq"]):
            latest = obj
    st.n_snapshots = len(st.totals_by_seq)
    st.latest_snapshot = ClusterSnapshot.model_validate(latest) if latest is not None else None
    st.n_uncertainty = sum(1 for _ in read_events(run_dir / LOG_FILES[UncertaintyEvent], UncertaintyEvent))
    st.candidates = {c.candidate_id: c for c in read_events(run_dir / LOG_FILES[CandidateCluster],
                                                             CandidateCluster)}
    st.hypotheses = {h.hypothesis_id: h for h in read_events(run_dir / LOG_FILES[Hypothesis], Hypothesis)}
    st.validations = list(read_events(run_dir / LOG_FILES[Validation], Validation))
    st.dead_letters = list(read_events(run_dir / LOG_FILES[DeadLetter], DeadLetter))
    st.finished = next((c for c in read_events(run_dir / LOG_FILES[ControlEvent], ControlEvent)
                        if c.kind == "finished"), None)
    st.generation_failures = sum(len(r.failures) for r in read_events(run_dir / LOG_FILES[GenerationReport],
                                                                        GenerationReport))
    times = [v.created_at for v in st.validations] + [h.created_at for h in st.hypotheses.values()]
    times += [c.created_at for c in st.candidates.values()]
    if st.latest_snapshot is not None:
        times.append(st.latest_snapshot.created_at)
    st.last_event_at = max(times) if times else None
    return st
