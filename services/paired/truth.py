"""Ground truth for paired findings: which planted *style* a hypothesis describes, if any.

A style (``PlantedBehaviour`` with ``kind: style``) says in ``meta`` which side shows it
(``direction``) and which features of the bank measure it (``features``).  A hypothesis matches it
when it claims the same side and either scores one of those features or is a phrase that the
style's own templates or keywords contain.  Checkable by rule, so recall on the sim needs no judge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from services.core.config import PlantedBehaviour
from services.paired.hypotheses import PairedHypothesis


def matches_style(h: PairedHypothesis, style: PlantedBehaviour) -> bool:
    if style.kind != "style" or h.direction != style.meta.get("direction", "intervention"):
        return False
    kind = h.scorer.get("type")
    if kind == "feature":
        return h.scorer.get("name") in set(style.meta.get("features", []))
    if kind == "regex":
        pattern = re.compile(str(h.scorer["pattern"]), re.IGNORECASE)
        return any(pattern.search(t) for t in [*style.templates, *style.keywords])
    return False


def styles_found(hypotheses: Iterable[PairedHypothesis], styles: Sequence[PlantedBehaviour]) -> dict[str, list[str]]:
    """Style name -> ids of the hypotheses matching it (only styles with a match appear)."""
    found: dict[str, list[str]] = {}
    for h in hypotheses:
        for s in styles:
            if matches_style(h, s):
                found.setdefault(s.name, []).append(h.hypothesis_id)
    return found
