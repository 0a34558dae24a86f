"""Hypothesizer service: divergent-cluster candidates in, hypotheses out.

For each candidate it writes contrastive labels from the *label split* of the cluster's texts
only (the held-out split travels along untouched, for validators), several per cluster when
``labels_per_cluster > 1`` (each later label is asked for a pattern not covered yet; the offline
labeler proposes ``offline_labels``, each from the distinctive terms not used yet).  Only
described hypotheses are emitted: the cluster's share statement is evidence the sink shows beside
the findings of that cluster (computed from the candidate), never a hypothesis of its own, because
a finding is a description proven on held-out texts.  The offline labeler needs no key; the LLM
labeler is used when configured and falls back to the offline one when the budget or the API refuses.
Hypothesis ids derive from (candidate, labeler, index), so a re-delivered candidate produces the
same ids and downstream consumers dedupe.
"""

from __future__ import annotations

import math
from typing import ClassVar

from services.core.events import CandidateCluster, Hypothesis, stable_id
from services.core.runtime import Incoming, Service
from services.hypothesizer.offline import describe, distinctive_terms, label_keywords, typical_example


def other_role(role: str) -> str:
    return "base" if role == "intervention" else "intervention"


class HypothesizerService(Service):
    name: ClassVar[str] = "hypothesizer"
    consumes = (CandidateCluster,)
    produces = (Hypothesis,)

    async def setup(self) -> None:
        self.llm = None
        hc = self.cfg.hypothesizer
        if hc.labeler == "llm" and hc.llm is not None:  # the config guarantees the section exists
            from services.llm.factory import experiment_llm_client

            self.redis = self.ctx.redis()
            self.llm = experiment_llm_client(self.cfg, hc.llm, self.redis)
        self.m_hyp = self.metrics.counter("hypotheses_total", "Hypotheses proposed", ["labeler", "kind"])

    async def handle(self, batch: list[Incoming]) -> None:
        for item in batch:
            cand = item.event
            assert isinstance(cand, CandidateCluster)
            for hyp in await self.hypotheses_for(cand):
                await self.emit(hyp)
                self.m_hyp.labels(hyp.labeler, hyp.kind).inc()

    async def hypotheses_for(self, cand: CandidateCluster) -> list[Hypothesis]:
        target = [t.text for t in cand.label_texts if t.role == cand.direction]
        contrast = [t.text for t in cand.label_texts if t.role != cand.direction]
        terms = distinctive_terms(target, contrast)
        out: list[Hypothesis] = []
        used: set[str] = set()
        hc = self.cfg.hypothesizer
        n = hc.labels_per_cluster if self.llm is not None else hc.offline_labels
        previous: list[str] = []
        for i in range(n):
            keywords = label_keywords(terms, exclude=used)
            if not keywords and i > 0:
                break
            used |= set(keywords)
            text, labeler = await self._label(cand, target, contrast, keywords, previous)
            previous.append(text)
            out.append(self._hypothesis(cand, i, text, labeler, keywords, "contrastive"))
        return out

    async def _label(self, cand: CandidateCluster, target: list[str], contrast: list[str],
                     keywords: list[str], previous: list[str]) -> tuple[str, str]:
        if self.llm is not None:
            from services.llm.errors import BadResponse, LLMError
            from services.llm.prompts import contrastive_label_prompt

            k = self.cfg.hypothesizer.texts_per_side
            try:
                resp = await self.llm.complete(contrastive_label_prompt(target[:k], contrast[:k], previous),
                                               purpose="label")
                if not resp.text.strip():  # an empty label states nothing a validator could test
                    raise BadResponse("the LLM labeler answered with an empty label")
                return resp.text.strip(), f"llm:{self.cfg.hypothesizer.llm.provider}:{resp.model}"
            except LLMError as exc:
                self.log.warning("LLM labeler failed; using the offline labeler",
                                 extra={"candidate": cand.candidate_id, "error": type(exc).__name__})
        example = typical_example(target, keywords)
        return describe(cand.direction, other_role(cand.direction), keywords, example), "offline:log-odds"

    def _hypothesis(self, cand: CandidateCluster, index: int, text: str, labeler: str, keywords: list[str],
                    kind: str) -> Hypothesis:
        n = cand.count_base + cand.count_intervention
        return Hypothesis(
            experiment_id=cand.experiment_id,
            hypothesis_id=stable_id(cand.candidate_id, kind, labeler.split(":")[0], index),
            candidate_id=cand.candidate_id, cluster_id=cand.cluster_id, direction=cand.direction, text=text,
            kind=kind, labeler=labeler, keywords=keywords,
            label_text_ids=[t.text_id for t in cand.label_texts], holdout_texts=cand.holdout_texts,
            cluster_evidence={
                "count_base": cand.count_base, "count_intervention": cand.count_intervention,
                "share_intervention": cand.share_intervention, "share_ci_low": cand.share_ci[0],
                "share_ci_high": cand.share_ci[1], "share_diff": cand.share_intervention - 0.5,
                "e_value": cand.e_value, "log_e_value": math.log(max(cand.e_value, 1e-300)),
                "alpha_spent": cand.alpha_spent, "n": n,
            },
        )

    async def teardown(self) -> None:
        if self.llm is not None:
            await self.llm.aclose()
            await self.redis.aclose()
