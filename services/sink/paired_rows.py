"""The columns a paired hypothesis adds to its results row (``RowKind`` for ``kind: paired``).

Its deciding validation's ``effect`` holds the paired test (services/validator/paired_tier.py);
from it the row gets P(claimed side's answer scores higher than its partner's) with its interval,
the same for the intervention, the rates of answers showing it on each side, the pairs tested, and
its ``text`` becomes the finding in words with direction and size ("the intervention's answers end
with a question to the reader more often: in 31% of pairs against 6% for the base model").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pyarrow as pa

from services.core.decision import final_validation
from services.core.events import Hypothesis, Validation
from services.paired.hypotheses import PairedFinding
from services.paired.service import hypothesis_from_event
from services.sink.results import RowKind
from services.sink.run_state import RunState
from services.validator.paired_tier import paired_result_of

COLUMNS = (
    pa.field("effect", pa.float64()), pa.field("effect_lo", pa.float64()), pa.field("effect_hi", pa.float64()),
    pa.field("p_intervention_higher", pa.float64()), pa.field("p_intervention_higher_lo", pa.float64()),
    pa.field("p_intervention_higher_hi", pa.float64()), pa.field("rate_claimed", pa.float64()),
    pa.field("rate_other", pa.float64()), pa.field("n_pairs", pa.int64()), pa.field("claim", pa.string()),
    pa.field("scorer", pa.string()),
)


def paired_fields(h: Hypothesis, vals: Sequence[Validation], state: RunState) -> Mapping[str, Any]:
    """The paired columns of one row (None where no tier has tested it yet)."""
    out: dict[str, Any] = {c.name: None for c in COLUMNS}
    out["claim"] = h.text
    out["scorer"] = orjson.dumps(h.scorer, option=orjson.OPT_SORT_KEYS).decode()
    v = final_validation(vals)[0] or (vals[-1] if vals else None)
    e = v.effect if v is not None else {}
    if v is None or "effect" not in e:
        return out
    out.update(effect=e["effect"], effect_lo=e.get("ci_low"), effect_hi=e.get("ci_high"),
               p_intervention_higher=e.get("p_intervention_higher"),
               p_intervention_higher_lo=e.get("p_intervention_higher_lo"),
               p_intervention_higher_hi=e.get("p_intervention_higher_hi"),
               rate_claimed=e.get("rate_claimed"), rate_other=e.get("rate_other"), n_pairs=int(e.get("n", 0)))
    result = paired_result_of(e, "sign", v.p_value)
    if result is not None and result.n > 0:
        out["text"] = PairedFinding(hypothesis_from_event(h), v.decision, result, v.alpha_level).text
    return out


PAIRED_ROWS = RowKind(COLUMNS, paired_fields)
