"""What the sink writes while a run goes on, for one run directory: one deduped JSONL log per
event stream, Parquet parts for texts and the embedding index, and the map's sample.

The file names and schemas here are the run directory's contract: finalisation
(:mod:`services.sink.finalize`) and the report (:mod:`services.sink.run_view`) read them back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import pyarrow as pa

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
    UncertaintyEvent,
    Validation,
)
from services.sink.map_sample import MAP_SAMPLE_FILE, VectorReservoir
from services.sink.storage import JsonlLog, ParquetParts, atomic_write_bytes

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


def text_parts(run_dir: Path) -> ParquetParts:
    return ParquetParts(run_dir / "texts", TEXT_SCHEMA, "text_id")


def embedding_parts(run_dir: Path) -> ParquetParts:
    return ParquetParts(run_dir / "embeddings", EMBEDDING_SCHEMA, "text_id")


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
        self.texts = text_parts(self.run_dir)
        self.embeddings = embedding_parts(self.run_dir)
        self.reservoir = VectorReservoir.load(self.run_dir / MAP_SAMPLE_FILE, self.reservoir_size, self.seed)

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
            self.reservoir.save(self.run_dir / MAP_SAMPLE_FILE)

    def flush_all(self) -> None:
        """Persist everything held in memory (logs, parts, reservoir)."""
        self.flush_logs()
        self.flush_parts()
        self.save_reservoir()

    def close(self) -> None:
        for lg in self.logs.values():
            lg.close()
