"""Control: the controller's announcements to the experiment, and dead letters."""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import Field

from services.core.events.base import Event


class ControlEvent(Event):
    """The controller's announcements to the whole experiment: a sampling round is closed (every
    text it produced is on the bus: the clusterer takes a barrier snapshot once they have all
    arrived), or the experiment is finished (why, and the counts): services finalize, the sink
    writes the report, and processes started for this one run exit."""

    topic: ClassVar[str] = "control"
    type: ClassVar[str] = "autointerv.experiment.control"

    kind: Literal["round_closed", "finished"]
    round: int
    expected_texts: int = 0  # texts produced in rounds <= round (round_closed)
    force: bool = False  # round_closed after a timeout: snapshot now, whatever has arrived
    stopped_because: str = ""  # finished: budget | data_exhausted | stable | wall_time | lost_texts | signal
    detail: str = ""  # finished: the reason in words
    counts: dict[str, int] = Field(default_factory=dict)  # finished: planned, produced, failed, lost, ...
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return f"{self.experiment_id}:{self.kind}:{self.round}:{int(self.force)}"


class DeadLetter(Event):
    topic: ClassVar[str] = "dead-letters"
    type: ClassVar[str] = "autointerv.deadletter"

    source_topic: str
    source_partition: int
    source_offset: int
    service: str
    reason: str
    original_b64: str  # the original bytes, untouched
    original_headers: dict[str, str] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        # the service is part of the identity: two services (groups) may each dead-letter the same
        # record, and the sink dedupes by this id, so without it one of the two was dropped
        return f"{self.service}:{self.source_topic}:{self.source_partition}:{self.source_offset}"
