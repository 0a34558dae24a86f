"""The paired service: pairs embedded texts, proposes from label pairs only at a round barrier
(once the round's texts are in), emits Hypothesis(kind="paired") events a validator can decide from
alone, and answers every barrier with a PairedRound naming them."""

from __future__ import annotations

import random

import numpy as np
from paired_helpers import make_pairs, neutral_answer
from service_helpers import offline_context, running

from services.core.config import Config
from services.core.events import ControlEvent, EmbeddedText, Event, Hypothesis, PairedRound, stable_id
from services.core.runtime import ServiceContext
from services.paired.decision import decide_paired
from services.paired.pairs import is_label_pair
from services.paired.scorers import make_scorer
from services.paired.service import PairedService, hypothesis_from_event, score_paired_hypothesis
from services.stats.fdr import LordPlusPlus


class CapturingPaired(PairedService):
    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.out: list[Event] = []

    async def emit(self, event: Event, topic: str | None = None) -> None:
        self.out.append(event)


def embedded(exp: str, n: int, seed: int = 0) -> list[EmbeddedText]:
    pairs = make_pairs(n, neutral_answer, lambda r: neutral_answer(r) + (" Wow!" if r.random() < 0.6 else ""), seed)
    rng = np.random.default_rng(seed)
    out = []
    for p in pairs:
        for role, text in (("base", p.base), ("intervention", p.intervention)):
            out.append(EmbeddedText(experiment_id=exp, text_id=stable_id(p.pair_id, role), pair_id=p.pair_id, role=role,
                                    prompt_id=p.prompt_id, text=text, embedding_model="test", dim=8,
                                    vector_b64=EmbeddedText.encode_vector(rng.normal(size=8))))
    random.Random(seed).shuffle(out)
    return out


async def test_service_proposes_from_label_pairs_and_its_events_validate(redis_url: str, unique: str) -> None:
    cfg = Config()
    cfg.experiment.id = f"paired-{unique}"
    cfg.paired.min_label_pairs = 40
    async with running(CapturingPaired(offline_context(cfg, redis_url))) as svc:
        texts = embedded(cfg.experiment.id, 400)
        svc.close_round(ControlEvent(experiment_id=cfg.experiment.id, kind="round_closed", round=0,
                                     expected_texts=len(texts)))
        for ev in texts[:-1]:
            svc.add(ev)
        await svc.tick()
        assert not svc.out  # the barrier waits for the round's last text
        for ev in texts[-1:] + texts[:50]:  # re-deliveries are ignored
            svc.add(ev)
        await svc.tick()
        first = [e for e in svc.out if isinstance(e, Hypothesis)]
        answer = svc.out[-1]
        assert isinstance(answer, PairedRound) and answer.round == 0
        assert answer.hypothesis_ids == [h.hypothesis_id for h in first] and first and answer.label_pairs > 0
        svc.close_round(ControlEvent(experiment_id=cfg.experiment.id, kind="round_closed", round=1,
                                     expected_texts=len(texts)))
        await svc.tick()  # nothing new: no second proposal round, only the answer
        assert len(svc.out) == len(first) + 2 and svc.out[-1] == PairedRound(
            experiment_id=cfg.experiment.id, round=1, held_out_pairs=answer.held_out_pairs,
            created_at=svc.out[-1].created_at)
        more = embedded(cfg.experiment.id, 100, seed=1)  # generation stops after 100 more pairs
        svc.close_round(ControlEvent(experiment_id=cfg.experiment.id, kind="stopping", round=1,
                                     expected_texts=len(texts) + len(more)))
        for ev in more:
            svc.add(ev)
        await svc.tick()
        last = [e for e in svc.out[len(first) + 2:] if isinstance(e, Hypothesis)]
        final = svc.out[-1]
        assert isinstance(final, PairedRound) and final.final
        assert final.hypothesis_ids == [h.hypothesis_id for h in last]
        assert final.label_pairs > answer.label_pairs  # the last proposals read every label pair
        await svc.tick()  # answered once
        assert svc.out[-1] is final
    label_ids = {stable_id(e.pair_id, e.role) for e in texts if is_label_pair(e.pair_id, cfg.paired.label_fraction)}
    for h in first:
        assert h.kind == "paired" and h.scorer and h.cluster_id == -1
        held = {t.text_id for t in h.holdout_texts}
        assert held and held.isdisjoint(h.label_text_ids) and set(h.label_text_ids) <= label_ids
        assert all(t.pair_id for t in h.holdout_texts)
        assert Hypothesis.from_bytes(h.to_bytes()) == h
    exclaim = [h for h in first if h.scorer.get("name") in ("exclamations", "ends_with_exclamation")
               or "wow" in h.scorer.get("pattern", "")]
    assert exclaim and all(h.direction == "intervention" for h in exclaim)
    for h in first:
        back = hypothesis_from_event(h)
        assert back.hypothesis_id == h.hypothesis_id and back.text == h.text
        assert back.binary == make_scorer(h.scorer).binary
    scores = await score_paired_hypothesis(exclaim[0])
    assert len(scores.pair_ids) == min(cfg.paired.holdout_pairs, 400 - len(label_ids) // 2)
    assert decide_paired(scores, exclaim[0].direction, LordPlusPlus(0.05), cfg.paired).decision == "validated"
