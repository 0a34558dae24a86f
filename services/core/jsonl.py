"""Reading JSONL: strictly, with errors that name the file and line (prompt sources, replay), or
leniently (the sink's append-only event logs and the report that reads them)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("autointerv.jsonl")


def iter_jsonl_objects(path: Path, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; a bad line raises ``error`` naming file and line.

    Line by line (not ``pd.read_json``) precisely so that errors can say where."""
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise error(f"{path}:{lineno}: invalid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def iter_log_objects(path: Path) -> Iterator[dict[str, Any]]:
    """Objects of an append-only JSONL log (the sink's event logs); a missing file is empty.

    Lenient where :func:`iter_jsonl_objects` is strict: a log may end in a line torn by a crash
    mid-write, and a report must still render, so unreadable lines and non-objects are skipped
    (with a warning naming the file)."""
    if not path.exists():
        return
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("skipping a torn line", extra={"path": str(path)})
                continue
            if isinstance(obj, dict):
                yield obj
