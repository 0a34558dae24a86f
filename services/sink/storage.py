"""Files of a run directory that survive crashes and re-deliveries: atomic writes, deduped JSONL
logs and bounded Parquet parts.

Delivery is at-least-once, so every stream is deduped by event id:

* a :class:`JsonlLog` keeps the set of ids it holds; reopening it reloads that set, so a restart
  that replays records appends nothing twice;
* texts and the per-text embedding index can run to millions of rows, so :class:`ParquetParts`
  buffers them and appends numbered part files (bounded memory); duplicates go when the parts are
  merged into one file at finalisation, the only place counts are taken from.

Every whole-file write goes to a temporary name first and is renamed into place, so a reader (or a
crash) never sees half a file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from services.core.events import Event
from services.core.jsonl import iter_log_objects

log = logging.getLogger("autointerv.sink")
E = TypeVar("E", bound=Event)


# --------------------------------------------------------------------------- whole files


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


def write_table(path: Path, table: pa.Table) -> None:
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


def read_events(path: Path, etype: type[E]) -> Iterator[E]:
    """Events of one log, first occurrence of each id only (a torn last line is skipped)."""
    seen: set[str] = set()
    for obj in iter_log_objects(path):
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
        write_table(path, pa.Table.from_pylist(list(self._buffer.values()), schema=self.schema))
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
            write_table(into, self.schema.empty_table())
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
