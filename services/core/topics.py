"""Topic names: one definition of the logical names and of their physical form (``<prefix>.<name>``).

Every service, the sink, ``autointerv status`` and the AsyncAPI generator use this module, so a
topic is renamed in one place.  Escalation topics (``escalations.<tier>``) are the only dynamic
ones: tier k > 0 of the validator cascade reads the hypotheses tier k-1 could not decide.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.core.events import EVENT_TYPES

LOGICAL_TOPICS: tuple[str, ...] = tuple(e.topic for e in EVENT_TYPES)
ESCALATION_PREFIX = "escalations."  # + tier name: input topic of validator tiers after the first


def escalation_topic(tier_name: str) -> str:
    return ESCALATION_PREFIX + tier_name


@dataclass(frozen=True)
class Topics:
    """Maps logical topic names to physical ones (``<prefix>.<logical>``) and back."""

    prefix: str

    def name(self, logical: str) -> str:
        return f"{self.prefix}.{logical}"

    def logical(self, physical: str) -> str:
        """The logical name of a physical topic of this prefix (other names come back unchanged)."""
        return physical[len(self.prefix) + 1:] if physical.startswith(self.prefix + ".") else physical

    def all(self, extra: Iterable[str] = ()) -> list[str]:
        return [self.name(t) for t in (*LOGICAL_TOPICS, *extra)]
