"""Ground-truth mode: score findings against the behaviours planted in the intervention model.

One definition, used by the sink (summary.json, results) and the benchmarks' observer (bench/experiments.py):

* **finding**: a hypothesis whose final decision is "validated" by a held-out test (an AUC on
  texts its labeler never saw; ``is_finding``).  A share statement is evidence, never a finding.
* **match**: a finding matches planted behaviour B only if its *text says B*: cosine similarity
  between the hypothesis and B's description plus keywords, in the bundled all-MiniLM-L6-v2, of at
  least ``ground_truth.match_threshold``; or, when ``ground_truth.judge`` is configured, the LLM
  judge's score / 100 of at least the same threshold.  Behaviours are planted in the intervention
  model, so only hypotheses about the intervention side can match.  Cluster **purity** (the
  majority behaviour among the cluster's texts on the hypothesis' side, sim only) is reported
  beside it as a diagnostic: it says what the cluster *is*, not what the words claim, so a label
  moved to another cluster keeps its match and a right cluster with wrong words gets none.
* **mirror**: a finding on the other side of the same prompts (the base "more often writes about
  battles" when the intervention's history notes go to the Moon landing) is true but derived; it is
  grouped under the finding it mirrors (``group_mirrors``) and counts neither as a false positive
  nor as a discovery of its own.

Both kinds of finding are scored (``mode``: a cluster's description; ``paired``: a difference in
how both models answer the same prompts, services/paired) against every planted behaviour, modes and
styles (``ALL_KINDS``).  A paired finding also matches a style *by rule* when the style names, in
its ``meta``, the side and the bank features that measure it, or when its phrase is in the style's
own templates (services/paired/truth.py): checkable without a judge, so the sim's styles are.

Discovery precision = findings matching a behaviour / findings that are not mirrors; recall =
planted behaviours matched by at least one finding / planted behaviours.

The threshold on the bundled MiniLM (measured with ``services.hypothesis_sets``, 20 replicas,
offline labels): labels of true behaviour clusters score 0.381 at the lowest, 0.462 at the 5th
percentile and 0.550 at the median against their own behaviour, and at most 0.330 against the
others; 582 labels of topic clusters whose words name no behaviour score at most 0.495 (99th
percentile 0.405); hand-written near misses at most 0.486 ("Mars rovers and rockets" against the
Moon landing); plain paraphrases of a behaviour 0.64-0.84.  At the default 0.45 about 4% of the
offline labeler's true labels (the noisiest cats labels) do not match, and about 0.3% of wrong
labels do; the judge is the sharper rule when an LLM is available.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from services.core.config import (
    Config,
    EmbedderConfig,
    GroundTruthConfig,
    LLMConfig,
    PlantedBehaviour,
    SimModelConfig,
)
from services.core.events import CandidateCluster, Hypothesis
from services.embedder.encoder import Encoder
from services.llm.client import LLMClient
from services.llm.errors import LLMError, ParseError
from services.llm.parsing import parse_json_object
from services.llm.prompts import ground_truth_prompt

log = logging.getLogger("autointerv.groundtruth")

Method = Literal["text", "judge", "rule"]
ALL_KINDS = ("mode", "style")  # what ground truth scores: every planted behaviour, both paths
TextTruth = tuple[str, str | None]  # (role, planted behaviour or None) of one text
MAJORITY = 0.5  # purity: more than this share of the side's texts must carry the behaviour
PLANTED_SIDE = "intervention"  # planted behaviours are the intervention model's
MIRROR_MIN_OVERLAP = 0.5  # group_mirrors: share of each side's texts on the other's prompts


@dataclass(frozen=True)
class Match:
    """Which behaviour one hypothesis describes: the verdict of the rule and the diagnostics."""

    hypothesis_id: str
    behaviour: str | None  # the verdict of ``method``
    method: Method
    text_behaviour: str | None = None  # best behaviour by cosine, if above the threshold
    text_score: float = 0.0  # best cosine
    purity_behaviour: str | None = None  # diagnostic only
    purity: float | None = None  # share of the majority label (None: no texts with known truth)
    judge_behaviour: str | None = None
    judge_score: float | None = None  # best judge score / 100 (None: no judge or no readable answer)
    judge_dropped: int = 0  # judge answers for this hypothesis that could not be read (not scored)

    @property
    def score(self) -> float | None:
        """The score the verdict was taken on."""
        return self.judge_score if self.method == "judge" else self.text_score


@dataclass(frozen=True)
class Discovery:
    precision: float | None  # None when no finding counts (none, or mirrors only)
    recall: float | None  # None when nothing was planted
    found: list[str]
    missed: list[str]
    n_validated: int  # findings, mirrors included
    n_validated_matching: int
    per_behaviour: dict[str, list[str]] = field(default_factory=dict)  # behaviour -> hypothesis ids
    mirrors: dict[str, str] = field(default_factory=dict)  # mirror finding -> the finding it mirrors

    def to_json(self, planted: Sequence[str], rule: str) -> dict[str, object]:
        return {"rule": rule, "planted": list(planted), "matched": self.per_behaviour, "missed": self.missed,
                "n_validated": self.n_validated, "n_validated_matching": self.n_validated_matching,
                "n_mirrors": len(self.mirrors), "mirrors": self.mirrors,
                "precision": self.precision, "recall": self.recall}


def is_finding(decision: str | None, auc: float | None) -> bool:
    """Validated by a held-out test: an AUC on held-out texts backs the decision."""
    return decision == "validated" and auc is not None


def behaviour_text(b: PlantedBehaviour) -> str:
    """What a hypothesis is compared with: the description plus the keywords."""
    return b.description + (" (" + ", ".join(b.keywords) + ")" if b.keywords else "")


def planted_behaviours(cfg: Config, kinds: Collection[str] = ("mode",)) -> list[PlantedBehaviour]:
    """Behaviours of these kinds listed in ``ground_truth.behaviours``, else the sim intervention
    model's.  The default is the mode path's truth (clusters); pass ``("mode", "style")`` for all."""
    if cfg.ground_truth.behaviours:
        return [b for b in cfg.ground_truth.behaviours if b.kind in kinds]
    if not isinstance(cfg.models.intervention, SimModelConfig):
        return []
    from services.generator.backends.sim import behaviours_for

    return [b for b in behaviours_for(cfg.models.intervention.sim) if b.kind in kinds]


def cluster_purity(h: Hypothesis, truth: Mapping[str, TextTruth]) -> tuple[str | None, float | None]:
    """(majority behaviour if it is planted and > MAJORITY, share of the majority label); diagnostic."""
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


def style_by_rule(h: Hypothesis, behaviours: Sequence[PlantedBehaviour]) -> str | None:
    """The planted style a paired hypothesis measures by rule (services/paired/truth.py), if any."""
    if h.kind != "paired" or not h.scorer:
        return None
    from services.paired.hypotheses import PairedHypothesis
    from services.paired.truth import matches_style

    ph = PairedHypothesis(h.text, h.direction, dict(h.scorer), h.labeler)
    return next((b.name for b in behaviours if b.kind == "style" and b.meta and matches_style(ph, b)), None)


def _with_rule(m: Match, h: Hypothesis, behaviours: Sequence[PlantedBehaviour]) -> Match:
    """A style the rule finds wins over the meaning verdict (the rule checks what the scorer measures)."""
    ruled = style_by_rule(h, behaviours)
    return m if ruled is None else replace(m, behaviour=ruled, method="rule")


def match_by_text(hypotheses: Sequence[Hypothesis], behaviours: Sequence[PlantedBehaviour], encoder: Encoder,
                  threshold: float = 0.45, truth: Mapping[str, TextTruth] | None = None) -> list[Match]:
    """The encoder's verdict alone, synchronously (benchmarks score findings as they stream by)."""
    names = [b.name for b in behaviours]
    sims = text_scores(hypotheses, behaviours, encoder)
    out = []
    for i, h in enumerate(hypotheses):
        tb, ts = _best(sims[i], names, threshold)
        pb, purity = cluster_purity(h, truth) if truth is not None else (None, None)
        verdict = tb if h.direction == PLANTED_SIDE else None
        out.append(_with_rule(Match(h.hypothesis_id, verdict, "text", tb, ts or 0.0, pb, purity), h, behaviours))
    return out


async def match_hypotheses(hypotheses: Sequence[Hypothesis], behaviours: Sequence[PlantedBehaviour], *,
                           encoder: Encoder | None = None, threshold: float = 0.45,
                           truth: Mapping[str, TextTruth] | None = None,
                           judge: LLMClient | None = None) -> list[Match]:
    """One :class:`Match` per hypothesis: the judge's verdict when given, else the text score's.

    Only a hypothesis about the planted side can match; purity is filled in when ``truth`` is given."""
    if encoder is None and judge is None:
        raise ValueError("ground truth matches by meaning: give an encoder or a judge")
    if judge is None:
        assert encoder is not None
        return match_by_text(hypotheses, behaviours, encoder, threshold, truth)
    names = [b.name for b in behaviours]
    method: Method = "judge" if judge is not None else "text"
    sims = text_scores(hypotheses, behaviours, encoder) if encoder is not None else None
    judged = (await judge_scores(hypotheses, behaviours, judge))[0] if judge is not None else None
    out = []
    for i, h in enumerate(hypotheses):
        tb, ts = _best(sims[i], names, threshold) if sims is not None else (None, None)
        jb, js = _best(judged[i], names, threshold) if judged is not None else (None, None)
        pb, purity = cluster_purity(h, truth) if truth is not None else (None, None)
        verdict = (jb if method == "judge" else tb) if h.direction == PLANTED_SIDE else None
        dropped = int(np.isnan(judged[i]).sum()) if judged is not None else 0
        out.append(_with_rule(Match(h.hypothesis_id, verdict, method, tb, ts or 0.0, pb, purity, jb, js, dropped),
                              h, behaviours))
    return out


@dataclass
class GroundTruthRule:
    """The configured rule (threshold, judge) with its encoder, loaded once when first needed."""

    behaviours: list[PlantedBehaviour]
    threshold: float = 0.45
    judge: LLMConfig | None = None
    budget_usd: float = 0.0
    encoder_factory: Callable[[], Encoder] | None = None  # default: the bundled MiniLM
    _encoder: Encoder | None = None

    @classmethod
    def from_config(cls, cfg: Config, encoder_factory: Callable[[], Encoder] | None = None) -> GroundTruthRule:
        gt: GroundTruthConfig = cfg.ground_truth
        return cls(planted_behaviours(cfg, ALL_KINDS), gt.match_threshold, gt.judge, cfg.experiment.budget_usd,
                   encoder_factory)

    @property
    def name(self) -> str:
        if self.judge is not None:
            return f"judge {self.judge.provider}:{self.judge.model} score >= {self.threshold}"
        return f"cosine to the behaviour (all-MiniLM-L6-v2) >= {self.threshold}"

    def encoder(self) -> Encoder:
        if self._encoder is None:
            if self.encoder_factory is not None:
                self._encoder = self.encoder_factory()
            else:
                from services.embedder.encoder import load_encoder

                self._encoder = load_encoder(EmbedderConfig())  # the threshold is set for this model
        return self._encoder

    async def match(self, hypotheses: Sequence[Hypothesis], truth: Mapping[str, TextTruth] | None = None
                    ) -> list[Match]:
        if not hypotheses or not self.behaviours:
            return [Match(h.hypothesis_id, None, "text") for h in hypotheses]
        if self.judge is None:
            return await match_hypotheses(hypotheses, self.behaviours, encoder=self.encoder(),
                                          threshold=self.threshold, truth=truth)
        from services.llm.factory import make_budget, make_llm_client

        client = make_llm_client(self.judge, budget=make_budget(self.budget_usd))
        try:
            return await match_hypotheses(hypotheses, self.behaviours, judge=client, threshold=self.threshold,
                                          truth=truth)
        finally:
            await client.aclose()


# --------------------------------------------------------------------------- mirror findings


@dataclass(frozen=True)
class FindingScope:
    """Where a finding lives: its side, how one-sided its cluster is, and its side's prompts."""

    hypothesis_id: str
    direction: str
    share: float  # share of ``direction`` among the cluster's texts (the candidate's counts)
    prompts: tuple[str, ...]  # prompt id of each of the cluster's texts on ``direction``'s side


def finding_scope(h: Hypothesis, cand: CandidateCluster) -> FindingScope:
    """The scope of ``h`` from the candidate it was labelled from (label and held-out texts)."""
    n = cand.count_base + cand.count_intervention
    mine = cand.count_intervention if h.direction == "intervention" else cand.count_base
    prompts = tuple(t.prompt_id for t in [*cand.label_texts, *cand.holdout_texts] if t.role == h.direction)
    return FindingScope(h.hypothesis_id, h.direction, mine / n if n else 0.5, prompts)


def _coverage(a: FindingScope, b: FindingScope) -> float:
    """Share of ``a``'s texts written for prompts on which ``b`` has texts."""
    if not a.prompts:
        return 0.0
    theirs = set(b.prompts)
    return sum(p in theirs for p in a.prompts) / len(a.prompts)


def mirrors(m: FindingScope, o: FindingScope, min_overlap: float = MIRROR_MIN_OVERLAP) -> bool:
    """``m`` mirrors ``o``: opposite sides, the same prompts, and ``o`` is the more one-sided.

    Same prompts: at least ``min_overlap`` of each one's texts come from prompts the other has
    texts on (both ways, so a finding spread over every prompt mirrors nothing narrow).  The more
    one-sided cluster (``o.share > m.share``) is the original: the mode one model writes and the
    other leaves nearly empty; the mirror is what the first model's texts on those prompts no
    longer say as often."""
    return (m.direction != o.direction and o.share > m.share
            and min(_coverage(m, o), _coverage(o, m)) >= min_overlap)


def group_mirrors(scopes: Sequence[FindingScope], min_overlap: float = MIRROR_MIN_OVERLAP) -> dict[str, str]:
    """mirror id -> id of the finding it mirrors (best overlap; ties to the more one-sided, then id).

    A finding that mirrors another is never an original itself, so groups are one level deep."""
    originals = [o for o in scopes if not any(mirrors(o, x, min_overlap) for x in scopes)]
    out: dict[str, str] = {}
    for m in scopes:
        cands = [o for o in originals if mirrors(m, o, min_overlap)]
        if cands:
            best = max(cands, key=lambda o: (min(_coverage(m, o), _coverage(o, m)), o.share, o.hypothesis_id))
            out[m.hypothesis_id] = best.hypothesis_id
    return out


def precision_recall(matches: Iterable[Match], finding_ids: Iterable[str],
                     behaviours: Sequence[PlantedBehaviour] | Sequence[str],
                     mirror_of: Mapping[str, str] | None = None) -> Discovery:
    """Discovery precision and recall of the findings (see the module docstring); mirrors count for neither."""
    planted = [b if isinstance(b, str) else b.name for b in behaviours]
    by_id = {m.hypothesis_id: m for m in matches}
    findings = list(dict.fromkeys(finding_ids))
    mirror_of = {k: v for k, v in (mirror_of or {}).items() if k in findings and v in findings}
    counted = [i for i in findings if i not in mirror_of]
    per: dict[str, list[str]] = {}
    for hid in counted:
        m = by_id.get(hid)
        if m is not None and m.behaviour is not None:
            per.setdefault(m.behaviour, []).append(hid)
    n_match = sum(len(v) for v in per.values())
    return Discovery(
        precision=n_match / len(counted) if counted else None,
        recall=sum(b in per for b in planted) / len(planted) if planted else None,
        found=[b for b in planted if b in per], missed=[b for b in planted if b not in per],
        n_validated=len(findings), n_validated_matching=n_match, per_behaviour=per, mirrors=mirror_of)
