"""Paired-contrast service: embedded texts in, ``Hypothesis(kind="paired")`` events out.

It pairs texts by ``pair_id`` (one per role) and splits each pair once by a hash of its id.  At
each of the controller's round barriers (``round_closed``, answered once the round's texts have
arrived) it runs the offline proposers (and the LLM proposer when ``paired.llm`` is set) on the
label pairs seen so far, when a round is due (see ``PairedService.due``), and answers with a
``PairedRound`` naming what it proposed: the controller settles the round only after that answer
and those decisions, so the last round's hypotheses are decided before the run ends.  Each
hypothesis not proposed before is emitted with its scorer spec, the label text ids the proposers saw
(the most recent ``2 * holdout_pairs`` label pairs: a sample, so messages stay small) and the most recent held-out
pairs (``TextRef`` with ``pair_id``) for a validator, which rebuilds the scorer with
``make_scorer(h.scorer)`` and decides with ``decide_paired`` (see ``score_paired_hypothesis``).

Runs in the pipeline when ``paired.enabled`` (the default).  State (pairs, proposed ids) lives in memory: a restart
proposes again from the pairs it sees next, and hypothesis ids are stable, so a validator's
"decided once" store keeps every decision single.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, ClassVar

from services.core.events import ControlEvent, EmbeddedText, Hypothesis, PairedRound, TextRef
from services.core.runtime import Incoming, Service, ServiceContext
from services.paired.discover import propose_paired
from services.paired.features import FeatureCache, feature
from services.paired.hypotheses import PairedHypothesis
from services.paired.pairs import Pair, is_label_pair
from services.paired.scorers import PairScores, make_scorer

if TYPE_CHECKING:
    from services.embedder.encoder import Encoder
    from services.llm.client import LLMClient


def refs_of(pairs: list[Pair], ids: dict[str, tuple[str, str]], with_text: bool = True) -> list[TextRef]:
    """Both texts of each pair as TextRefs (``ids``: pair id -> (base text id, intervention text id))."""
    out = []
    for p in pairs:
        b_id, i_id = ids[p.pair_id]
        out.append(TextRef(text_id=b_id, prompt_id=p.prompt_id, role="base", text=p.base if with_text else "",
                           pair_id=p.pair_id))
        out.append(TextRef(text_id=i_id, prompt_id=p.prompt_id, role="intervention",
                           text=p.intervention if with_text else "", pair_id=p.pair_id))
    return out


def pairs_of_refs(refs: list[TextRef]) -> list[Pair]:
    """Complete pairs among TextRefs (same ``pair_id``, one per role), in order of completion."""
    waiting: dict[str, TextRef] = {}
    out = []
    for r in refs:
        other = waiting.pop(r.pair_id, None) if r.pair_id else None
        if other is None or other.role == r.role:
            if r.pair_id:
                waiting[r.pair_id] = r
            continue
        b, i = (other, r) if other.role == "base" else (r, other)
        out.append(Pair(r.pair_id, r.prompt_id, "", b.text, i.text))
    return out


def hypothesis_event(h: PairedHypothesis, experiment_id: str, label_text_ids: list[str],
                     holdout: list[TextRef]) -> Hypothesis:
    return Hypothesis(experiment_id=experiment_id, hypothesis_id=h.hypothesis_id,
                      candidate_id=f"paired:{experiment_id}", cluster_id=-1, direction=h.direction, text=h.text,
                      kind="paired", labeler=h.proposer, label_text_ids=label_text_ids, holdout_texts=holdout,
                      cluster_evidence=dict(h.label_evidence), scorer=dict(h.scorer))


def hypothesis_from_event(h: Hypothesis) -> PairedHypothesis:
    """The PairedHypothesis behind an event (what ``PairedFinding`` needs to word a finding):
    ``binary`` and ``unit`` follow from the scorer spec."""
    kind = h.scorer.get("type")
    binary, unit = False, ""
    if kind == "feature":
        f = feature(str(h.scorer["name"]))
        binary, unit = f.binary, f.unit
    elif kind == "regex":
        binary = h.scorer.get("measure", "presence") == "presence"
    return PairedHypothesis(h.text, h.direction, dict(h.scorer), h.labeler, binary, unit, dict(h.cluster_evidence))


async def score_paired_hypothesis(h: Hypothesis, *, cache: FeatureCache | None = None,
                                  encoder: Encoder | None = None, llm: LLMClient | None = None,
                                  max_pairs: int | None = None) -> PairScores:
    """Held-out scores of a paired Hypothesis event, for ``decide_paired(scores, h.direction, ...)``.

    Prompt-reading features see an empty prompt here (TextRefs carry no prompt)."""
    scorer = make_scorer(h.scorer, cache=cache, encoder=encoder, llm=llm, max_pairs=max_pairs)
    return await scorer.ascore(pairs_of_refs(h.holdout_texts))


class PairedService(Service):
    """Proposes paired hypotheses at the controller's round barriers (see the module docstring)."""

    name: ClassVar[str] = "paired"
    consumes = (EmbeddedText, ControlEvent)
    produces = (Hypothesis, PairedRound)
    tick_interval_s: ClassVar[float] = 1.0

    @classmethod
    def instances(cls, ctx: ServiceContext) -> list[Service]:
        """None when ``paired.enabled`` is off: the pipeline then finds modes only."""
        return [cls(ctx)] if ctx.cfg.paired.enabled else []

    async def setup(self) -> None:
        pc = self.cfg.paired
        self.cache = FeatureCache()
        self.waiting: dict[str, EmbeddedText] = {}
        self.label: deque[Pair] = deque(maxlen=pc.max_pairs)
        self.held: deque[Pair] = deque(maxlen=pc.max_pairs)
        self.text_ids: dict[str, tuple[str, str]] = {}
        self.seen: set[str] = set()  # text ids read (the barrier counts them)
        self.proposed: set[str] = set()
        self.new_label = 0
        self.label_at_last = 0
        self.rounds = 0
        self.barrier: ControlEvent | None = None  # the latest round_closed not yet answered
        self.barrier_since = 0.0
        self.answered = -1  # last round answered
        self.stopped: ControlEvent | None = None  # generation stopped: one last proposal round
        self.stopped_since = 0.0
        self.final_sent = False
        self.llm: LLMClient | None = None
        self.redis = None
        if pc.llm is not None:
            from services.llm.factory import experiment_llm_client

            self.redis = self.ctx.redis()
            self.llm = experiment_llm_client(self.cfg, pc.llm, self.redis)
        self.m_hyp = self.metrics.counter("paired_hypotheses_total", "Paired hypotheses proposed", ["proposer"])

    async def handle(self, batch: list[Incoming]) -> None:
        for item in batch:
            ev = item.event
            if isinstance(ev, ControlEvent):
                self.close_round(ev)
            else:
                assert isinstance(ev, EmbeddedText)
                self.add(ev)
        await self.tick()

    def close_round(self, ev: ControlEvent) -> None:
        """Remember the latest closed round (and ``stopping``); each is answered once its texts
        have arrived."""
        if ev.kind == "stopping" and self.stopped is None:
            self.stopped, self.stopped_since = ev, self.clock.time()
            return
        if ev.kind != "round_closed" or ev.round <= self.answered:
            return
        if self.barrier is None or (ev.round, ev.force) > (self.barrier.round, self.barrier.force):
            if self.barrier is None or ev.round != self.barrier.round:
                self.barrier_since = self.clock.time()
            self.barrier = ev

    def add(self, ev: EmbeddedText) -> None:
        """Pair the text with its partner when both roles are in; re-deliveries are ignored."""
        self.seen.add(ev.text_id)
        if not ev.pair_id or ev.pair_id in self.text_ids:
            return
        other = self.waiting.pop(ev.pair_id, None)
        if other is None or other.role == ev.role:
            self.waiting[ev.pair_id] = ev
            return
        b, i = (other, ev) if other.role == "base" else (ev, other)
        pair = Pair(ev.pair_id, ev.prompt_id, str(ev.meta.get("prompt", "")), b.text, i.text, b.vector(), i.vector())
        self.text_ids[ev.pair_id] = (b.text_id, i.text_id)
        if is_label_pair(ev.pair_id, self.cfg.paired.label_fraction):
            self.label.append(pair)
            self.new_label += 1
        else:
            self.held.append(pair)

    def due(self) -> bool:
        """A proposal round is due once there are min_label_pairs label pairs, then whenever the
        label split has grown by ``propose_every`` pairs or doubled, whichever comes first (small
        runs propose often, large ones rarely: each round reads every label pair)."""
        pc = self.cfg.paired
        if len(self.label) < pc.min_label_pairs or self.new_label == 0:
            return False
        return self.rounds == 0 or self.new_label >= min(pc.propose_every, max(1, self.label_at_last))

    def _arrived(self, ev: ControlEvent, since: float) -> bool:
        waited = self.clock.time() - since
        return ev.force or len(self.seen) >= ev.expected_texts or waited >= self.cfg.controller.round_timeout_s

    async def tick(self) -> None:
        """Answer the pending round barrier once its texts are here (or it was forced, or waited
        out ``controller.round_timeout_s``): propose if due, then say so with a PairedRound.  After
        ``stopping``, the last answer: a proposal round on every label pair if any came since the
        last one (the end of a replay file or budget is when the label split is largest)."""
        b = self.barrier
        if b is not None and self._arrived(b, self.barrier_since):
            self.barrier, self.answered = None, b.round
            await self._answer(b.round, self.due(), final=False)
        s = self.stopped
        if s is not None and not self.final_sent and self.barrier is None and self._arrived(s, self.stopped_since):
            self.final_sent = True
            ready = len(self.label) >= self.cfg.paired.min_label_pairs and self.new_label > 0
            await self._answer(s.round, ready, final=True)

    async def _answer(self, round_: int, proposing: bool, final: bool) -> None:
        events = await self.propose_round() if proposing else []
        for event in events:
            await self.emit(event)
        await self.emit(PairedRound(experiment_id=self.ctx.experiment_id, round=round_, final=final,
                                    hypothesis_ids=[e.hypothesis_id for e in events],
                                    label_pairs=len(self.label) if proposing else 0, held_out_pairs=len(self.held)))

    async def propose_round(self) -> list[Hypothesis]:
        """New hypotheses from every label pair so far (never a held-out one)."""
        self.new_label, self.rounds, self.label_at_last = 0, self.rounds + 1, len(self.label)
        label = list(self.label)
        hypotheses, _, _ = await propose_paired(label, self.cfg, cache=self.cache, llm=self.llm, seed=self.rounds)
        label_ids = [t for p in label[-2 * self.cfg.paired.holdout_pairs:] for t in self.text_ids[p.pair_id]]
        holdout = refs_of(list(self.held)[-self.cfg.paired.holdout_pairs:], self.text_ids)
        out = []
        for h in hypotheses:
            if h.hypothesis_id in self.proposed:
                continue
            self.proposed.add(h.hypothesis_id)
            self.m_hyp.labels(h.proposer).inc()
            out.append(hypothesis_event(h, self.ctx.experiment_id, label_ids, holdout))
        return out

    async def teardown(self) -> None:
        if self.llm is not None:
            await self.llm.aclose()
        if self.redis is not None:
            await self.redis.aclose()
