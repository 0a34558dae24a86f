"""CloudEvents-style Kafka headers carried on every record, so routing and dedupe never parse the body."""

from __future__ import annotations

import time
from typing import ClassVar

from pydantic import BaseModel

from services.core.events.base import SCHEMA_VERSION, Event


class Envelope(BaseModel):
    """CloudEvents-style headers carried on every Kafka record (binary content mode)."""

    id: str
    type: str
    source: str
    time: float
    experiment_id: str
    schema_version: str = SCHEMA_VERSION
    specversion: str = "1.0"

    HEADER_PREFIX: ClassVar[str] = "ce_"

    def to_headers(self) -> list[tuple[str, bytes]]:
        return [(f"{self.HEADER_PREFIX}{k}", str(v).encode()) for k, v in self.model_dump().items()]

    @classmethod
    def from_headers(cls, headers: list[tuple[str, bytes]] | None) -> Envelope | None:
        if not headers:
            return None
        raw = {k[len(cls.HEADER_PREFIX):]: v.decode(errors="replace") for k, v in headers
               if k.startswith(cls.HEADER_PREFIX)}
        try:
            return cls.model_validate(raw)
        except Exception:
            return None

    @classmethod
    def for_event(cls, event: Event, source: str) -> Envelope:
        return cls(id=event.event_id(), type=event.type, source=source, time=time.time(),
                   experiment_id=event.experiment_id)
