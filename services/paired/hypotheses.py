"""Paired hypotheses and findings: a claim in words, the side it says scores higher, and a scorer spec.

A hypothesis is JSON-able (``to_dict``/``from_dict``) so it can travel in a Hypothesis event and be
rebuilt by a validator with ``make_scorer(h.scorer)``.  A finding is a hypothesis plus its held-out
test; its ``text`` says direction and size in words, always as "the intervention's answers ...".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import orjson

from services.core.events import Role, stable_id
from services.stats.paired import PairedResult

Decision = Literal["validated", "rejected", "escalated"]
SUBJECT = "the intervention's answers"


def claim(phrase: str) -> str:
    """The claim sentence for a phrase completing "the intervention's answers ...\""""
    return f"{SUBJECT} {phrase}"


@dataclass(frozen=True)
class PairedHypothesis:
    """``direction``: the side whose answer scores higher on the scorer (what ``text`` claims).

    ``binary`` scorers give 0/1 per answer, so a finding quotes two rates; ``unit`` names what a
    continuous scorer counts.  ``label_evidence`` is what the proposer saw on the label split only.
    """

    text: str
    direction: Role
    scorer: dict[str, Any]
    proposer: str
    binary: bool = False
    unit: str = ""
    label_evidence: dict[str, float] = field(default_factory=dict)

    @property
    def hypothesis_id(self) -> str:
        return stable_id("paired", orjson.dumps(self.scorer, option=orjson.OPT_SORT_KEYS).decode(), self.direction)

    def to_dict(self) -> dict[str, Any]:
        return {"hypothesis_id": self.hypothesis_id, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairedHypothesis:
        fields = {k: d[k] for k in ("text", "direction", "scorer", "proposer")}
        return cls(**fields, binary=bool(d.get("binary", False)), unit=str(d.get("unit", "")),
                   label_evidence={k: float(v) for k, v in d.get("label_evidence", {}).items()})


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def size_in_words(h: PairedHypothesis, r: PairedResult) -> str:
    """How large the difference is on held-out pairs, with the intervention's numbers first."""
    if r.n == 0:
        return "no held-out pairs"
    ours = h.direction == "intervention"
    if h.scorer.get("type") == "llm_judge":
        return (f"a judge reading both orders agreed in {_pct(r.n_higher / r.n)} of pairs and saw the "
                f"opposite in {_pct(r.n_lower / r.n)}")
    if h.binary:
        ri, rb = (r.rate_claimed, r.rate_other) if ours else (r.rate_other, r.rate_claimed)
        return f"in {_pct(ri)} of pairs against {_pct(rb)} for the base model"
    stat = "median" if r.median_claimed != r.median_other else "mean"
    c, o = (r.median_claimed, r.median_other) if stat == "median" else (r.mean_claimed, r.mean_other)
    mi, mb = (c, o) if ours else (o, c)
    unit = f" {h.unit}" if h.unit else ""
    return (f"in {_pct(r.n_higher / r.n)} of pairs, against {_pct(r.n_lower / r.n)} the other way "
            f"({stat} {_num(mi)} against {_num(mb)}{unit})")


@dataclass(frozen=True)
class PairedFinding:
    """A hypothesis tested on held-out pairs: the decision, its level and every statistic."""

    hypothesis: PairedHypothesis
    decision: Decision
    result: PairedResult
    level: float
    reason: str = ""
    calls: int = 0
    cost_usd: float = 0.0

    @property
    def text(self) -> str:
        return f"{self.hypothesis.text}: {size_in_words(self.hypothesis, self.result)}"

    @property
    def p_intervention_higher(self) -> float:
        """P(the intervention's answer scores higher than its partner), ties counted half."""
        e = self.result.effect
        return e if self.hypothesis.direction == "intervention" else 1.0 - e

    @property
    def ci_intervention_higher(self) -> tuple[float, float]:
        """The interval of ``p_intervention_higher``."""
        r = self.result
        return (r.ci_low, r.ci_high) if self.hypothesis.direction == "intervention" else (1 - r.ci_high, 1 - r.ci_low)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "decision": self.decision, "level": self.level, "reason": self.reason,
                "p_intervention_higher": self.p_intervention_higher,
                "ci_intervention_higher": list(self.ci_intervention_higher), "calls": self.calls,
                "cost_usd": self.cost_usd, "hypothesis": self.hypothesis.to_dict(), "result": asdict(self.result)}
