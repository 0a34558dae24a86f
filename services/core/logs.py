"""Structured logging: one JSON object per line (orjson), with the record's ``extra`` fields.

Secrets never reach the log: API keys are only read from the environment by the LLM clients and
are never passed as log fields; as a second line of defence any field whose name looks like a
credential is masked, and so is the password of any URL anywhere in the line (the Redis URL of the
embedded Valkey carries one), in fields, the message and tracebacks alike.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

from services.core.config import URL_PASSWORD

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_SECRET_HINTS = ("key", "token", "secret", "password", "authorization")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%H:%M:%S", time.localtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = "***" if any(h in k.lower() for h in _SECRET_HINTS) else v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return URL_PASSWORD.sub(r"\1***@", orjson.dumps(out, default=str).decode())


class RepeatFilter(logging.Filter):
    """Lets a message template through at most once per ``every_s`` and says how many repeats it
    held back.  Client libraries log every failed reconnect: with the broker gone, aiokafka alone
    wrote 120 KB/s of the same three lines."""

    def __init__(self, prefixes: tuple[str, ...], every_s: float = 10.0) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.every_s = every_s
        self._last: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, record.msg)
        last, held = self._last.get(key, (float("-inf"), 0))
        if record.created - last < self.every_s:
            self._last[key] = (last, held + 1)
            return False
        self._last[key] = (record.created, 0)
        if held:
            record.repeats_suppressed = held
        return True


def setup_logging(level: str = "INFO", stream=None, file: str | None = None,
                  file_level: str = "INFO") -> None:
    """JSON logs to stderr at ``level`` and, optionally, to ``file`` at ``file_level``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(level)
    handlers: list[logging.Handler] = [handler]
    if file:
        from pathlib import Path

        Path(file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(file)
        fh.setFormatter(JsonFormatter())
        fh.setLevel(file_level)
        handlers.append(fh)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(logging.WARNING)
    levels = [logging.getLevelName(level)] + ([logging.getLevelName(file_level)] if file else [])
    logging.getLogger("autointerv").setLevel(min(levels))
    noisy = ("aiokafka", "kafka", "faust", "mode", "sentence_transformers", "transformers", "httpx")
    for h in handlers:  # on the handlers (one each): a logger's own filters skip its children's records
        h.addFilter(RepeatFilter(noisy))
    for name in noisy:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:  # transformers prints "Loading weights" progress bars on every model load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
