"""Ground-truth mode: score hypotheses against the behaviours planted in the intervention model.

Three independent ways to say which planted behaviour (if any) a hypothesis describes:

* **text**: cosine similarity, in an encoder's space, between the hypothesis text and the
  behaviour's description plus its keywords; a match needs ``ground_truth.match_threshold``.
* **purity**: the majority behaviour among the candidate cluster's own texts on the hypothesis'
  side (label texts and that side's held-out texts; the other side's held-out set may be padded
  with unrelated texts, so it is not counted).  Needs each text's ``meta["behaviour"]``, which
  only the simulated pair has.  It says what the cluster *is*, not what the words claim.
* **judge**: an LLM rates 1-100 how well the hypothesis captures the behaviour
  (``ground_truth_prompt``); used instead of the text score when ``ground_truth.judge`` is set.
  An unreadable answer is dropped and counted, never scored.

Discovery precision = validated hypotheses that match some planted behaviour / validated
hypotheses; recall = planted behaviours matched by at least one validated hypothesis / planted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from services.core.config import Config, PlantedBehaviour
from services.core.events import Hypothesis
from services.embedder.encoder import Encoder
from services.llm.client import LLMClient
from services.llm.errors import LLMError, ParseError
from services.llm.parsing import parse_json_object
from services.llm.prompts import ground_truth_prompt

log = logging.getLogger("autointerv.groundtruth")

Method = Literal["text", "purity", "judge"]
TextTruth = tuple[str, str | None]  # (role, planted behaviour or None) of one text
MAJORITY = 0.5  # purity: more than this share of the side's texts must carry the behaviour


@dataclass(frozen=True)
class Match:
    """Which behaviour one hypothesis describes, by each method that could be applied."""

    hypothesis_id: str
    behaviour: str | None  # the verdict of ``method``
    method: Method
    text_behaviour: str | None = None  # best behaviour by cosine, if above the threshold
    text_score: float = 0.0  # best cosine
    purity_behaviour: str | None = None
    purity: float | None = None  # share of the majority label (None: no texts with known truth)
    judge_behaviour: str | None = None
    judge_score: float | None = None  # best judge score / 100 (None: no judge or no readable answer)
    judge_dropped: int = 0  # judge answers for this hypothesis that could not be read (not scored)


@dataclass(frozen=True)
class Discovery:
    precision: float | None  # None when nothing was validated
    recall: float | None  # None when nothing was planted
    found: list[str]
    missed: list[str]
    n_validated: int
    n_validated_matching: int
    per_behaviour: dict[str, list[str]] = field(default_factory=dict)  # behaviour -> hypothesis ids


def behaviour_text(b: PlantedBehaviour) -> str:
    """What a hypothesis is compared with: the description plus the keywords."""
    return b.description + (" (" + ", ".join(b.keywords) + ")" if b.keywords else "")


def planted_behaviours(cfg: Config, kinds: Collection[str] = ("mode",)) -> list[PlantedBehaviour]:
    """Behaviours of these kinds listed in ``ground_truth.behaviours``, else the sim intervention
    model's.  The default is the mode path's truth (clusters); pass ``("mode", "style")`` for all."""
    if cfg.ground_truth.behaviours:
        return [b for b in cfg.ground_truth.behaviours if b.kind in kinds]
    if cfg.models.intervention.backend != "sim":
        return []
    from services.generator.backends.sim import behaviours_for

    return [b for b in behaviours_for(cfg.models.intervention.sim) if b.kind in kinds]


def cluster_purity(h: Hypothesis, truth: Mapping[str, TextTruth]) -> tuple[str | None, float | None]:
    """(majority behaviour if it is planted and > MAJORITY, share of the majority label)."""
    ids = list(dict.fromkeys([*h.label_text_ids, *(t.text_id for t in h.holdout_texts)]))
    labels = [truth[i][1] for i in ids if i in truth and truth[i][0] == h.direction]
    if not labels:
        return None, None
    top, n = Counter(labels).most_common(1)[0]
    share = n / len(labels)
    return (top if top is not None and share > MAJORITY else None), share


def text_scores(hypotheses: Sequence[Hypothesis], behaviours: Sequence[PlantedBehaviour],
                encoder: Encoder) -> np.ndarray:
    """Cosine matrix (hypotheses x behaviours)."""
    if not hypotheses or not behaviours:
        return np.zeros((len(hypotheses), len(behaviours)))
    vecs = encoder.encode([h.text for h in hypotheses] + [behaviour_text(b) for b in behaviours])
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    return vecs[: len(hypotheses)] @ vecs[len(hypotheses):].T


async def judge_scores(hypotheses: Sequence[Hypothesis], behaviours: Sequence[PlantedBehaviour],
                       client: LLMClient) -> tuple[np.ndarray, int]:
    """Judge matrix (score / 100, NaN where the answer was unreadable or the call failed), dropped count."""

    async def one(h: Hypothesis, b: PlantedBehaviour) -> float:
        try:
            obj = await client.complete_parsed(ground_truth_prompt(behaviour_text(b), h.text),
                                               parse_json_object, purpose="ground-truth")
            score = obj.get("score")
            if isinstance(score, bool) or not isinstance(score, int | float) or not 1 <= score <= 100:
                raise ParseError(f"judge score {score!r} is not a number in 1..100")
            return float(score) / 100.0
        except LLMError as exc:
            log.warning("ground-truth judge answer dropped: %s", type(exc).__name__)
            return float("nan")

    pairs = [(h, b) for h in hypotheses for b in behaviours]
    flat = await asyncio.gather(*(one(h, b) for h, b in pairs))
    out = np.asarray(flat, dtype=float).reshape(len(hypotheses), len(behaviours))
    return out, int(np.isnan(out).sum())


def _best(row: np.ndarray, names: list[str], threshold: float) -> tuple[str | None, float | None]:
    if row.size == 0 or np.all(np.isnan(row)):
        return None, None
    j = int(np.nanargmax(row))
    return (names[j] if row[j] >= threshold else None), float(row[j])


async def match_hypotheses(hypotheses: Sequence[Hypothesis], behaviours: Sequence[PlantedBehaviour], *,
                           encoder: Encoder | None = None, threshold: float = 0.45,
                           truth: Mapping[str, TextTruth] | None = None, judge: LLMClient | None = None,
                           method: Method | None = None) -> list[Match]:
    """One :class:`Match` per hypothesis.

    ``method`` picks the verdict; by default the judge when given, else the text score when an
    encoder is given, else purity.  The other methods that can run are filled in for comparison.
    """
    names = [b.name for b in behaviours]
    method = method or ("judge" if judge is not None else "text" if encoder is not None else "purity")
    sims = text_scores(hypotheses, behaviours, encoder) if encoder is not None else None
    judged = (await judge_scores(hypotheses, behaviours, judge))[0] if judge is not None else None
    out = []
    for i, h in enumerate(hypotheses):
        tb, ts = _best(sims[i], names, threshold) if sims is not None else (None, None)
        jb, js = _best(judged[i], names, threshold) if judged is not None else (None, None)
        pb, purity = cluster_purity(h, truth) if truth is not None else (None, None)
        verdict = {"text": tb, "judge": jb, "purity": pb}[method]
        dropped = int(np.isnan(judged[i]).sum()) if judged is not None else 0
        out.append(Match(h.hypothesis_id, verdict, method, tb, ts or 0.0, pb, purity, jb, js, dropped))
    return out


def precision_recall(matches: Iterable[Match], validated_ids: Iterable[str],
                     behaviours: Sequence[PlantedBehaviour] | Sequence[str]) -> Discovery:
    """Discovery precision and recall of the validated hypotheses (see the module docstring)."""
    planted = [b if isinstance(b, str) else b.name for b in behaviours]
    by_id = {m.hypothesis_id: m for m in matches}
    validated = [i for i in dict.fromkeys(validated_ids)]
    per: dict[str, list[str]] = {}
    for hid in validated:
        m = by_id.get(hid)
        if m is not None and m.behaviour is not None:
            per.setdefault(m.behaviour, []).append(hid)
    n_match = sum(len(v) for v in per.values())
    found = [b for b in planted if b in per]
    return Discovery(
        precision=n_match / len(validated) if validated else None,
        recall=len(found) / len(planted) if planted else None,
        found=found, missed=[b for b in planted if b not in per], n_validated=len(validated),
        n_validated_matching=n_match, per_behaviour=per)
