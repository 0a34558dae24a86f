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

    # stopping: generation has stopped (why: stopped_because); the round's texts are all produced,
    # and services that propose from everything seen (paired contrasts) take their last turn
    kind: Literal["round_closed", "stopping", "finished"]
    round: int
    expected_texts: int = 0  # texts produced in rounds <= round (round_closed)
    force: bool = False  # round_closed after a timeout: snapshot now, whatever has arrived
    stopped_because: str = ""  # finished: budget | data_exhausted | stable | wall_time | lost_texts | signal
    detail: str = ""  # finished: the reason in words
    counts: dict[str, int] = Field(default_factory=dict)  # finished: planned, produced, failed, lost, ...
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return f"{self.experiment_id}:{self.kind}:{self.round}:{int(self.force)}"


class PairedRound(Event):
    """The paired-contrast service's answer to a closed sampling round: it has read the round's
    texts and proposed (``hypothesis_ids``, possibly none) from every label pair so far.  The
    controller settles a round only after this answer and the decisions of those hypotheses, and
    ends the run only after the final answer (to ``stopping``), so a run never ends with paired
    hypotheses still to come."""

    topic: ClassVar[str] = "paired-rounds"
    type: ClassVar[str] = "autointerv.paired.round"

    round: int
    final: bool = False  # the answer to ``stopping``: the last proposals, from every label pair
    hypothesis_ids: list[str] = Field(default_factory=list)
    label_pairs: int = 0  # label pairs the proposers saw (0: no proposal this round)
    held_out_pairs: int = 0
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return f"{self.experiment_id}:paired-round:{self.round}:{int(self.final)}"


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
