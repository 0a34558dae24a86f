"""The final decision of a hypothesis: one rule for the sink, the controller and the benchmarks.

Each tier of the validator cascade either decides a hypothesis (``validated`` / ``rejected``) or
escalates it to the next tier (the last tier never escalates).  What counts is the decision of the
highest tier that decided.  Validations reach their readers at least once and not in a guaranteed
order: a restarted validator tests a hypothesis again (a new validation id), a re-delivered record
comes twice, the sink re-reads its log, and every tier has its own consumer group.  So "final" is
the maximum of a total order over a hypothesis' validations, which no arrival order and no
duplicate can change:

1. a decision ranks above an escalation;
2. then the higher ``tier_index`` (a later tier saw the hypothesis after the earlier ones let it go);
3. then the later ``created_at`` (a tier that re-tested it after a restart: its latest word);
4. then the larger ``validation_id`` (only so that the order is total).

With nothing but escalations so far the hypothesis is ``pending``.  Readers that follow the stream
(the controller, the benchmark observer) fold each validation in with :func:`supersedes`; their
answer changes only when a higher-ranked validation arrives, which the cascade produces only on a
re-run, and once the stream is read they agree with :func:`final_validation` over the whole log.

>>> from services.core.events import Validation
>>> def v(vid, tier, decision, at):
...     return Validation(experiment_id="e", validation_id=vid, hypothesis_id="h", tier="t", tier_index=tier,
...                       decision=decision, p_value=0.01, alpha_level=0.05, n_pos=5, n_neg=5, created_at=at)
>>> escalated, validated = v("a", 0, "escalated", 1.0), v("b", 1, "validated", 2.0)
>>> final_validation([validated, escalated])[1], final_validation([escalated])[1]
('validated', 'pending')
>>> supersedes(validated, None), supersedes(escalated, rank(validated)), supersedes(validated, rank(validated))
(True, False, False)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from services.core.events import Validation

FinalDecision = Literal["validated", "rejected", "pending"]
Rank = tuple[bool, int, float, str]  # JSON-able as a list (the controller saves it with its state)


def decides(v: Validation) -> bool:
    """The validation decides its hypothesis (the tier did not pass it on)."""
    return v.decision != "escalated"


def rank(v: Validation) -> Rank:
    """The validation's place in the total order that defines "final" (the higher, the more final)."""
    return decides(v), v.tier_index, v.created_at, v.validation_id


def supersedes(new: Validation, current: Sequence[Any] | None) -> bool:
    """``new`` becomes the deciding validation of its hypothesis in place of the one ranked
    ``current`` (a :func:`rank`, or the list JSON made of it; None: none decided yet).  Escalations
    never decide; a re-delivery changes nothing."""
    return decides(new) and (current is None or rank(new) > tuple(current))


def final_validation(validations: Iterable[Validation]) -> tuple[Validation | None, FinalDecision]:
    """The deciding validation of one hypothesis and its decision, whatever the arrival order.

    With only escalations the hypothesis is ``pending`` and the highest-ranked escalation (the
    latest tier it reached) is returned; with none at all, ``(None, "pending")``."""
    best = max(validations, key=rank, default=None)
    if best is None or not decides(best):
        return best, "pending"
    return best, best.decision  # type: ignore[return-value]  # decides(): validated | rejected
