"""The clusterer's pair buffer: texts wait for their pair partner and are released pair by pair.

Under "no difference" the two texts of a pair are exchangeable, so the share test sees a fair coin
per pair *provided* the order in which a pair's texts are ingested does not depend on the role;
the order is therefore drawn from the pair id.  A text whose partner has not come after
``wait_texts`` further arrivals is released alone (its partner failed).

Planning is separate from committing (:meth:`PairBuffer.plan`, then :meth:`PairBuffer.commit`
once the released texts were ingested): a batch that fails to ingest leaves the buffer exactly as
it was, so the runtime's record-by-record retry pairs the same texts again.  Mutating first lost
the partners already waiting (all of one role, which biases the share test).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from services.core.events import EmbeddedText

log = logging.getLogger("autointerv.clusterer")

Waiting = dict[str, tuple[EmbeddedText, int]]  # pair id -> (text, arrival number)


@dataclass
class PairPlan:
    """What one batch releases and the buffer it leaves behind (nothing applied yet)."""

    ready: list[EmbeddedText]
    waiting: Waiting
    arrivals: int


class PairBuffer:
    """Unpaired texts by pair id, plus the arrival counter that times their expiry."""

    def __init__(self, wait_texts: int) -> None:
        self.wait_texts = wait_texts
        self.waiting: Waiting = {}
        self.arrivals = 0

    def __len__(self) -> int:
        return len(self.waiting)

    def plan(self, items: list[EmbeddedText], has_seen: Callable[[str], bool]) -> PairPlan:
        """Pairs completed by ``items`` (each in an order fixed by its pair id), unpaired sources,
        re-deliveries and expired texts, in release order; the buffer itself is not touched.

        Expiry is checked after every new arrival and re-deliveries never count as arrivals, so
        the release order is a function of the arrival order alone, not of how it was batched."""
        waiting = dict(self.waiting)  # insertion order == arrival order (entries are never moved)
        arrivals = self.arrivals
        ready: list[EmbeddedText] = []
        released: set[str] = set()
        for ev in items:
            if not ev.pair_id or ev.text_id in released or has_seen(ev.text_id):
                ready.append(ev)  # unpaired source, or a re-delivery the state will dedupe
                continue
            held = waiting.get(ev.pair_id)
            if held is not None and held[0].text_id == ev.text_id:
                continue  # re-delivered while it waits
            arrivals += 1
            if held is None:
                waiting[ev.pair_id] = (ev, arrivals)
            else:
                del waiting[ev.pair_id]
                pair = [held[0], ev]
                ready += pair[::-1] if int(ev.pair_id[:8] or "0", 16) & 1 else pair
                released.update((held[0].text_id, ev.text_id))
            while waiting:  # the oldest waiting text first
                pid, (old, at) = next(iter(waiting.items()))
                if arrivals - at <= self.wait_texts:
                    break
                del waiting[pid]
                ready.append(old)
                released.add(old.text_id)
        return PairPlan(ready, waiting, arrivals)

    def commit(self, plan: PairPlan) -> None:
        self.waiting, self.arrivals = plan.waiting, plan.arrivals

    def drop_orphans(self, max_round: int) -> int:
        """Drop texts of rounds <= ``max_round`` still waiting: at that round's barrier every text
        it produced has arrived, so their partners were never produced.  Returns how many."""
        orphans = [pid for pid, (ev, _) in self.waiting.items() if ev.round <= max_round]
        for pid in orphans:
            del self.waiting[pid]
        return len(orphans)

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        return {"arrivals": self.arrivals,
                "items": [(e.model_dump(mode="json"), at) for e, at in self.waiting.values()]}

    @classmethod
    def from_json(cls, saved: dict[str, Any], wait_texts: int) -> PairBuffer:
        """A saved buffer; an item that no longer validates (a bad vector saved by an older
        version) is dropped with a warning instead of failing every restart."""
        buf = cls(wait_texts)
        buf.arrivals = int(saved["arrivals"])
        for raw, at in saved["items"]:
            try:
                ev = EmbeddedText.model_validate(raw)
            except ValidationError as exc:
                log.warning("dropped an invalid text from the saved pair buffer: %s", str(exc)[:300])
                continue
            buf.waiting[ev.pair_id] = (ev, int(at))
        return buf
