"""Run-directory writing: deduped event logs, bounded Parquet parts, and the end-of-run files.

Delivery is at-least-once, so every stream is deduped by event id:

* JSONL logs (snapshots, candidates, hypotheses, validations, ...) keep the set of ids they hold;
  reopening a run directory reloads it, so a restart that replays records appends nothing twice.
* Texts (and the per-text embedding index) can run to millions of rows, so they are buffered and
  appended as numbered Parquet part files (bounded memory); duplicates are removed when the parts
  are merged into one file at finalisation, which is the only place counts are taken from.

Finalisation (:func:`finalize_run`) reads nothing but the run directory, so a report can be rebuilt
from a copied run directory without the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.core.bus import LOGICAL_TOPICS
from services.core.config import Config, ConfigError, load_config
from services.core.events import (
    CandidateCluster,
    ClusterSnapshot,
    ControlEvent,
    DeadLetter,
    DecodedText,
    EmbeddedText,
    Event,
    GenerationReport,
    Hypothesis,
    TextRef,
    UncertaintyEvent,
    Validation,
)
from services.groundtruth import GroundTruthRule, finding_scope, group_mirrors, is_finding, precision_recall
from services.sink.run_view import load_map_sample
from services.stats.fdr import benjamini_hochberg
from services.stats.sequential import newcombe_diff_interval

log = logging.getLogger("autointerv.sink")
E = TypeVar("E", bound=Event)

LOG_FILES: Mapping[type[Event], str] = MappingProxyType({
    GenerationReport: "generation_reports.jsonl",
    ControlEvent: "control.jsonl",
    ClusterSnapshot: "snapshots.jsonl",
    UncertaintyEvent: "uncertainty.jsonl",
    CandidateCluster: "candidates.jsonl",
    Hypothesis: "hypotheses.jsonl",
    Validation: "validations.jsonl",
    DeadLetter: "dead_letters.jsonl",
})

_ARROW_TYPES: Mapping[Any, pa.DataType] = MappingProxyType({str: pa.string(), int: pa.int64(),
                                                             float: pa.float64(), bool: pa.bool_()})


def _model_schema(model: type[Event], first: str) -> pa.Schema:
    """Every field of an event model as a column (``first`` leading); non-scalar fields hold JSON.

    Derived from the model so a field added to the topic contract reaches the Parquet file too."""
    names = [first, *(n for n in model.model_fields if n != first)]
    return pa.schema([(n, _ARROW_TYPES.get(model.model_fields[n].annotation, pa.string())) for n in names])


TEXT_SCHEMA = _model_schema(DecodedText, "text_id")  # meta (and any other non-scalar field): JSON string

EMBEDDING_SCHEMA = pa.schema([
    ("text_id", pa.string()), ("role", pa.string()), ("prompt_id", pa.string()),
    ("embedding_model", pa.string()), ("dim", pa.int64()), ("cache_hit", pa.bool_()),
    ("reason", pa.string()), ("round", pa.int64()),
])

RESULT_SCHEMA = pa.schema([
    ("rank", pa.int64()), ("hypothesis_id", pa.string()), ("candidate_id", pa.string()),
    ("cluster_id", pa.int64()), ("direction", pa.string()), ("text", pa.string()), ("kind", pa.string()),
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


# --------------------------------------------------------------------------- small file helpers


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
                                           default=str))


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    opt = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY
    atomic_write_bytes(path, b"".join(orjson.dumps(r, option=opt, default=str) for r in rows))


def _write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def update_latest_link(runs_root: Path, run_id: str) -> None:
    """Point ``runs/latest`` at the run (atomic replace); write ``runs/LATEST`` where links fail."""
    link = runs_root / "latest"
    tmp = runs_root / f".latest.{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(run_id, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        atomic_write_bytes(runs_root / "LATEST", run_id.encode() + b"\n")


# --------------------------------------------------------------------------- deduped JSONL log


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Parsed lines of a JSONL file; a torn last line (crash mid-write) is skipped."""
    if not path.exists():
        return
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("skipping a torn line", extra={"path": str(path)})


def read_events(path: Path, etype: type[E]) -> Iterator[E]:
    """Events of one log, first occurrence of each id only."""
    seen: set[str] = set()
    for obj in iter_jsonl(path):
        ev = etype.model_validate(obj)
        eid = ev.event_id()
        if eid not in seen:
            seen.add(eid)
            yield ev


class JsonlLog:
    """Append-only JSONL of one event stream, deduped by event id across restarts."""

    def __init__(self, path: Path, etype: type[Event]) -> None:
        self.path = path
        self.etype = etype
        self.ids: set[str] = set()
        self._repair_tail()
        for ev in read_events(path, etype):
            self.ids.add(ev.event_id())
        self._fh = path.open("ab")

    def _repair_tail(self) -> None:
        """Cut a torn last line so appends start on a clean line."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as fh:
                fh.truncate(cut)
            log.warning("truncated a torn last line", extra={"path": str(self.path)})

    def append(self, event: Event) -> bool:
        """Write the event unless its id is already in the log; True when written."""
        eid = event.event_id()
        if eid in self.ids:
            return False
        self._fh.write(event.to_bytes() + b"\n")
        self.ids.add(eid)
        return True

    def flush(self) -> None:
        if not self._fh.closed:
            self._fh.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._fh.close()


# --------------------------------------------------------------------------- Parquet parts


class ParquetParts:
    """Rows buffered in memory and appended as numbered part files; merged and deduped at the end."""

    def __init__(self, directory: Path, schema: pa.Schema, key: str) -> None:
        self.dir = directory
        self.schema = schema
        self.key = key
        self.dir.mkdir(parents=True, exist_ok=True)
        self._buffer: dict[str, dict[str, Any]] = {}
        existing = self.part_files()
        self._next = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self.last_flush = time.monotonic()

    def part_files(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))

    def add(self, row: dict[str, Any]) -> None:
        self._buffer.setdefault(row[self.key], row)

    def __len__(self) -> int:
        return len(self._buffer)

    def flush(self) -> Path | None:
        self.last_flush = time.monotonic()
        if not self._buffer:
            return None
        path = self.dir / f"part-{self._next:05d}.parquet"
        _write_table(path, pa.Table.from_pylist(list(self._buffer.values()), schema=self.schema))
        self._next += 1
        self._buffer.clear()
        return path

    def merge(self, into: Path) -> int:
        """Merge ``into`` (if present) and the current parts into ``into``, first row per key wins.

        Two passes keep memory to the key column plus one file at a time; parts are deleted only
        after the merged file is in place, so a crash in between merely repeats the merge."""
        parts = self.part_files()
        files = ([into] if into.exists() else []) + parts
        if not files:
            _write_table(into, self.schema.empty_table())
            return 0
        if not parts:
            return pq.ParquetFile(into).metadata.num_rows
        keep = _first_occurrence([pq.read_table(f, columns=[self.key]).column(self.key) for f in files])
        tmp = into.with_name(f".{into.name}.tmp")
        offset = 0
        with pq.ParquetWriter(tmp, self.schema) as out:
            for f in files:
                table = _conform(pq.read_table(f), self.schema)
                mask = keep[offset:offset + table.num_rows]
                offset += table.num_rows
                out.write_table(table.filter(pa.array(mask)))
        os.replace(tmp, into)
        for p in parts:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return int(keep.sum())


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table in ``schema``: columns missing from an older file become nulls, extra ones are dropped."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names
            else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _first_occurrence(columns: Sequence[pa.ChunkedArray]) -> np.ndarray:
    """Boolean mask over the concatenated columns: True at the first row of each key."""
    keys = pa.chunked_array([c for col in columns for c in col.chunks], type=pa.string())
    n = len(keys)
    table = pa.table({"k": keys, "i": pa.array(np.arange(n, dtype=np.int64))})
    first = table.group_by("k", use_threads=False).aggregate([("i", "min")]).column("i_min")
    keep = np.zeros(n, dtype=bool)
    keep[first.to_numpy()] = True
    return keep


# --------------------------------------------------------------------------- vector reservoir


class VectorReservoir:
    """A uniform random sample of embedded texts for the 2-D map (Vitter's Algorithm R).

    Hand-written because it is ten lines and must persist across restarts (n_seen travels in the
    Parquet metadata); re-delivered records already in the sample are ignored."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.n_seen = 0
        self.dim: int | None = None
        self.ids: list[str] = []
        self.roles: list[str] = []
        self.vectors: list[np.ndarray] = []
        self._index: dict[str, int] = {}
        self._rng = np.random.default_rng(seed)
        self.dirty = False

    def offer(self, text_id: str, role: str, vector: np.ndarray | Callable[[], np.ndarray],
              dim: int | None = None) -> None:
        """Consider one text; ``vector`` may be a callable, decoded only when the text is kept."""
        if text_id in self._index or self.size <= 0:
            return
        if dim is None:
            vector = _materialise(vector)
            dim = int(vector.shape[0])
        if self.dim is None:
            self.dim = dim
        if dim != self.dim:
            return  # another embedding model: not comparable on one map
        self.n_seen += 1
        if len(self.ids) < self.size:
            self._index[text_id] = len(self.ids)
            self.ids.append(text_id)
            self.roles.append(role)
            self.vectors.append(_materialise(vector))
        else:
            j = int(self._rng.integers(0, self.n_seen))
            if j >= self.size:
                return
            del self._index[self.ids[j]]
            self._index[text_id] = j
            self.ids[j], self.roles[j], self.vectors[j] = text_id, role, _materialise(vector)
        self.dirty = True

    def save(self, path: Path) -> None:
        dim = self.dim or 0
        flat = np.concatenate(self.vectors) if self.vectors else np.zeros(0, dtype=np.float32)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), max(dim, 1))
        table = pa.table({"text_id": pa.array(self.ids, pa.string()),
                          "role": pa.array(self.roles, pa.string()), "vector": vec})
        table = table.replace_schema_metadata({"n_seen": str(self.n_seen), "dim": str(dim)})
        _write_table(path, table)
        self.dirty = False

    @classmethod
    def load(cls, path: Path, size: int, seed: int = 0) -> VectorReservoir:
        res = cls(size, seed)
        if not path.exists():
            return res
        ids, roles, vectors, meta = load_map_sample(path)
        res.n_seen = int(meta.get("n_seen", len(ids)))
        res.dim = vectors.shape[1] if len(ids) else None
        for tid, role, vec in zip(ids[:size], roles[:size], vectors[:size], strict=True):
            res._index[tid] = len(res.ids)
            res.ids.append(tid)
            res.roles.append(role)
            res.vectors.append(vec)
        return res


def _materialise(vector: np.ndarray | Callable[[], np.ndarray]) -> np.ndarray:
    return np.asarray(vector() if callable(vector) else vector, dtype=np.float32)


# --------------------------------------------------------------------------- the writer


def text_row(ev: DecodedText) -> dict[str, Any]:
    row = ev.model_dump(mode="json")
    out = {}
    for f in TEXT_SCHEMA:
        value = row.get(f.name)
        if pa.types.is_string(f.type) and value is not None and not isinstance(value, str):
            value = orjson.dumps(value, default=str).decode()
        out[f.name] = value
    return out


def embedding_row(ev: EmbeddedText) -> dict[str, Any]:
    return {"text_id": ev.text_id, "role": ev.role, "prompt_id": ev.prompt_id,
            "embedding_model": ev.embedding_model, "dim": ev.dim, "cache_hit": ev.cache_hit,
            "reason": ev.reason, "round": ev.round}


class RunWriter:
    """Everything the sink writes while running, for one run directory."""

    def __init__(self, run_dir: Path, reservoir_size: int = 3000, seed: int = 0,
                 flush_rows: int = 2000, flush_s: float = 5.0) -> None:
        self.run_dir = run_dir
        self.reservoir_size = reservoir_size
        self.seed = seed
        self.flush_rows = flush_rows
        self.flush_s = flush_s
        self.logs: dict[type[Event], JsonlLog] = {}
        self.texts: ParquetParts | None = None
        self.embeddings: ParquetParts | None = None
        self.reservoir = VectorReservoir(reservoir_size, seed)

    def open(self, config_yaml: str | None = None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config_yaml is not None:
            atomic_write_bytes(self.run_dir / "config.yaml", config_yaml.encode())
        self.logs = {et: JsonlLog(self.run_dir / name, et) for et, name in LOG_FILES.items()}
        self.texts = ParquetParts(self.run_dir / "texts", TEXT_SCHEMA, "text_id")
        self.embeddings = ParquetParts(self.run_dir / "embeddings", EMBEDDING_SCHEMA, "text_id")
        self.reservoir = VectorReservoir.load(self.run_dir / "map_sample.parquet", self.reservoir_size,
                                              self.seed)

    def add(self, event: Event) -> bool:
        """Record one event; False when it is a known duplicate (logs only: parts dedupe at merge)."""
        assert self.texts is not None and self.embeddings is not None, "call open() first"
        if isinstance(event, DecodedText):
            self.texts.add(text_row(event))
            return True
        if isinstance(event, EmbeddedText):
            self.embeddings.add(embedding_row(event))
            self.reservoir.offer(event.text_id, event.role, event.vector, event.dim)
            return True
        return self.logs[type(event)].append(event)

    def unflushed_rows(self) -> int:
        return (len(self.texts) if self.texts else 0) + (len(self.embeddings) if self.embeddings else 0)

    def parts_due(self) -> bool:
        if self.texts is None or self.embeddings is None:
            return False
        if max(len(self.texts), len(self.embeddings)) >= self.flush_rows:
            return True
        oldest = min(self.texts.last_flush, self.embeddings.last_flush)
        return self.unflushed_rows() > 0 and time.monotonic() - oldest >= self.flush_s

    def flush_logs(self) -> None:
        for lg in self.logs.values():
            lg.flush()

    def flush_parts(self) -> None:
        for parts in (self.texts, self.embeddings):
            if parts is not None:
                parts.flush()

    def save_reservoir(self) -> None:
        if self.reservoir.dirty:
            self.reservoir.save(self.run_dir / "map_sample.parquet")

    def flush_all(self) -> None:
        """Persist everything held in memory (logs, parts, reservoir)."""
        self.flush_logs()
        self.flush_parts()
        self.save_reservoir()

    def close(self) -> None:
        for lg in self.logs.values():
            lg.close()


# --------------------------------------------------------------------------- reading a run back


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
    for obj in iter_jsonl(run_dir / LOG_FILES[ClusterSnapshot]):
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


# --------------------------------------------------------------------------- results


def final_validation(validations: Sequence[Validation]) -> tuple[Validation | None, str]:
    """The deciding validation of one hypothesis and its decision.

    The final decision is the last tier's (highest tier_index) validation that did not escalate;
    with only escalations so far the hypothesis is "pending" and the latest escalation is returned."""
    if not validations:
        return None, "pending"
    order = sorted(validations, key=lambda v: (v.tier_index, v.created_at))
    decided = [v for v in order if v.decision != "escalated"]
    if decided:
        return decided[-1], decided[-1].decision
    return order[-1], "pending"


OptFloat3 = tuple[float | None, float | None, float | None]


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


def results_rows(state: RunState, alpha: float) -> list[dict[str, Any]]:
    """One row per hypothesis with its final decision, effect sizes and a BH q-value."""
    by_h: dict[str, list[Validation]] = {}
    for v in state.validations:
        by_h.setdefault(v.hypothesis_id, []).append(v)
    hyps = dict(state.hypotheses)
    for v in state.validations:  # a hypothesis seen only through its validations
        if v.hypothesis is not None:
            hyps.setdefault(v.hypothesis_id, v.hypothesis)
    rows = [_result_row(h, by_h.get(hid, []), state) for hid, h in hyps.items()]
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


def _result_row(h: Hypothesis, vals: list[Validation], state: RunState) -> dict[str, Any]:
    """A hypothesis with its final decision; the share fields are its cluster's evidence, shown
    beside it, from the candidate the sink itself received (None when that never arrived)."""
    v, decision = final_validation(vals)
    cand = state.candidates.get(h.candidate_id)
    diff = share_difference(cand, state.totals_by_seq)
    ordered = sorted(vals, key=lambda x: (x.tier_index, x.created_at))
    return {
        "rank": 0, "hypothesis_id": h.hypothesis_id, "candidate_id": h.candidate_id,
        "cluster_id": h.cluster_id, "direction": h.direction, "text": h.text, "kind": h.kind,
        "labeler": h.labeler, "keywords": list(h.keywords), "decision": decision,
        "tier_path": ">".join(f"{x.tier}:{x.decision}" for x in ordered),
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


def is_finding_row(row: Mapping[str, Any]) -> bool:
    """A row whose hypothesis was validated on held-out texts (services/groundtruth.py)."""
    return is_finding(row.get("decision"), row.get("auc"))


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
    return disc.to_json(planted, rule.name)


# --------------------------------------------------------------------------- finalisation


def _logical(topic: str, prefix: str | None) -> str:
    if prefix and topic.startswith(prefix + "."):
        return topic[len(prefix) + 1:]
    for name in LOGICAL_TOPICS:
        if topic == name or topic.endswith("." + name):
            return name
    return topic


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


def _summary(experiment_id: str, state: RunState, texts: TextStats, emb: tuple[int, int],
             rows: list[dict[str, Any]], gt: dict[str, Any] | None, alpha: float,
             topic_prefix: str | None, stopped_because: str | None = None) -> dict[str, Any]:
    snap = state.latest_snapshot
    validated = [r for r in rows if is_finding_row(r)]  # findings: validated on held-out texts
    decided = [r["decided_at"] for r in validated if r["decided_at"] is not None]
    first_valid = min(decided) if decided else None
    stamps = [x for x in (state.last_event_at, texts.last_at) if x is not None]
    last = max(stamps) if stamps else None
    dl = Counter(_logical(d.source_topic, topic_prefix) for d in state.dead_letters)
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


@dataclass
class FinalRun:
    """What finalisation produced, handed to the report renderer."""

    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    state: RunState
    texts: TextStats


def _rule(run_dir: Path, config: Config | None, ground_truth: bool | GroundTruthRule) -> GroundTruthRule | None:
    """The ground-truth rule: given, else from ``config`` or the run directory's config.yaml."""
    if isinstance(ground_truth, GroundTruthRule) or not ground_truth:
        return ground_truth or None
    if config is None:
        try:
            config = load_config(run_dir / "config.yaml", environ={})
        except ConfigError as exc:
            log.warning("no ground truth: the run's config cannot be read", extra={"error": str(exc)[:200]})
            return None
    return GroundTruthRule.from_config(config) if config.ground_truth.enabled else None


def finalize_run(run_dir: Path, alpha: float, experiment_id: str | None = None,
                 topic_prefix: str | None = None, render: bool = True,
                 ground_truth: bool | GroundTruthRule = True, config: Config | None = None,
                 stopped_because: str | None = None) -> FinalRun:
    """Write texts.parquet, clusters.*, results.jsonl, hypotheses.parquet, summary.json, report.html.

    Reads only the run directory (event logs, part files, config.yaml for the planted behaviours
    unless ``config`` is given) and is safe to repeat.  ``ground_truth``: False skips it; a
    :class:`GroundTruthRule` replaces the configured one."""
    run_dir = Path(run_dir).resolve()  # "runs/latest" must not name itself
    experiment_id = experiment_id or run_dir.name
    ParquetParts(run_dir / "texts", TEXT_SCHEMA, "text_id").merge(run_dir / "texts.parquet")
    ParquetParts(run_dir / "embeddings", EMBEDDING_SCHEMA, "text_id").merge(run_dir / "embeddings.parquet")
    state = load_state(run_dir)
    # only the over-represented side's texts: the other side's are padded from everywhere (contrast)
    cand_ids = {cid: [t.text_id for t in candidate_texts(c) if t.role == c.direction]
                for cid, c in state.candidates.items()}
    wanted = {t for ids in cand_ids.values() for t in ids}
    texts = scan_texts(run_dir / "texts.parquet", wanted)
    rows = results_rows(state, alpha)
    rule = _rule(run_dir, config, ground_truth)
    gt = ground_truth_summary(rows, state, texts, rule) if rule is not None else None
    summary = _summary(experiment_id, state, texts, scan_embeddings(run_dir / "embeddings.parquet"),
                       rows, gt, alpha, topic_prefix, stopped_because)
    snap = state.latest_snapshot
    write_json(run_dir / "clusters.json", snap.model_dump(mode="json") if snap else None)
    crows = cluster_rows(snap)
    _write_table(run_dir / "clusters.parquet", pa.Table.from_pylist(crows) if crows
                 else pa.table({"cluster_id": pa.array([], pa.int64())}))
    write_jsonl(run_dir / "results.jsonl", rows)
    _write_table(run_dir / "hypotheses.parquet", pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))
    write_json(run_dir / "summary.json", summary)
    final = FinalRun(run_dir, summary, rows, state, texts)
    if render:
        from services.sink.report import write_report  # reads the files just written

        write_report(run_dir)
    update_latest_link(run_dir.parent, run_dir.name)
    return final
