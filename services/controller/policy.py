"""Where to spend the generation budget: uniform, or active (probe, find modes, sample them).

Generation is always *paired* (every planned prompt goes to both models with the same n), so the
clusterer's "no difference" null stays exactly P(intervention | cluster) = 1/2 however adaptively
prompts are chosen: adaptivity changes where evidence is gathered, never what it means.

1. Probe: ``initial_texts`` spread evenly over the prompts, at least ``probe_samples`` per prompt
   and model (a random subset of prompts when the set is larger than that budget).
2. Score texts, not prompts: :class:`ContrastIndex` marks *hot* texts (texts that sit among texts
   of their own model only, against a pair-swap null) and links them into *modes*, roughly one per
   behaviour.  One or two samples per prompt suffice; ranking prompts by the divergence of the two
   models' mean embeddings needed ~10 (the design before, measured in docs/architecture.md).
3. Target: each round gives ``1 - exploration_share`` of its texts to targeted prompts, and the rest
   to prompts drawn uniformly at random.  Of the targeted texts, an eighth at most continue
   exemplar texts and a quarter go to prompts named by the clusterer's uncertainty events; the
   rest are shared among the open modes (not saturated, not covered by a validated hypothesis),
   and within a mode each pick goes to a prompt by Thompson sampling on the Beta posterior of "a
   generation pair of this prompt yields a text of this mode".  Modes are served in parallel, so
   a common behaviour does not starve a rare one; a prompt whose early hit was chance, or a
   behaviour that shows on every prompt alike, stops attracting picks as its posterior falls.
4. Stop: when the budget is spent, or (``stop_when_stable``, once ``min_budget_fraction`` of it is
   spent) when a round's uncertainty events leave nothing unresolved, no sizeable mode is left
   unexplained, and the clustering is stable (NMI to the previous snapshot >= 0.9).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from services.controller.contrast import ContrastIndex, ContrastView
from services.core.config import ControllerConfig, ExperimentConfig
from services.core.events import ClusterSnapshot, Exemplar, GenerationRequest, PromptRef, UncertaintyEvent, stable_id

K = TypeVar("K")


@dataclass
class Plan:
    """One paired request: the same prompts for both models."""

    reason: str
    prompts: list[PromptRef] = field(default_factory=list)
    exemplars: list[Exemplar] = field(default_factory=list)
    n_per_prompt: int = 1
    note: str = ""

    @property
    def texts_per_role(self) -> int:
        return (len(self.prompts) + len(self.exemplars)) * self.n_per_prompt


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """A plan as JSON-able data (the controller saves a round's plans before emitting them)."""
    return {"reason": plan.reason, "prompts": [p.model_dump() for p in plan.prompts],
            "exemplars": [e.model_dump() for e in plan.exemplars], "n_per_prompt": plan.n_per_prompt,
            "note": plan.note}


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    return Plan(data["reason"], prompts=[PromptRef.model_validate(p) for p in data["prompts"]],
                exemplars=[Exemplar.model_validate(e) for e in data["exemplars"]],
                n_per_prompt=int(data["n_per_prompt"]), note=data.get("note", ""))


def rerun_seed_key(experiment: ExperimentConfig) -> str:
    """Generation seeds derive from the experiment's seed and *name*, never its timestamped id."""
    return stable_id(experiment.seed, experiment.name)


def paired_requests(experiment_id: str, rnd: int, plans: list[Plan], seed_key: str = "") -> list[GenerationRequest]:
    """Each plan as two requests, one per model, with the same prompts and a shared pair id.

    Ids include the (timestamped) experiment id, so experiments never share one; the sampling seed
    comes from ``seed_key`` (experiment seed and name) instead, so a rerun of the same config
    samples the same texts and finds their embeddings in the cache."""
    return [GenerationRequest(
        experiment_id=experiment_id, request_id=stable_id(experiment_id, rnd, i, role),
        pair_id=stable_id(experiment_id, rnd, i), role=role, reason=plan.reason, round=rnd,  # type: ignore[arg-type]
        prompts=plan.prompts, exemplars=plan.exemplars, n_per_prompt=plan.n_per_prompt, note=plan.note,
        decoding={"seed": int(stable_id(seed_key, rnd, i, role)[:8], 16) if seed_key else None})  # type: ignore[arg-type]
        for i, plan in enumerate(plans) for role in ("base", "intervention")]


class SamplingPolicy:
    """Plans paired generation rounds.

    ``inventory`` (prompt id -> pairs available) bounds what may be asked when texts are replayed
    from a file: prompts whose texts are used up are never planned again, a plan never asks for more
    samples than both roles still have, exemplar continuations are off (a file holds no
    continuations), and the policy stops with ``stopped_because = "data_exhausted"`` when nothing is
    left.  ``None`` means a live model on both sides (unbounded).

    >>> from services.core.config import ControllerConfig
    >>> prompts = [PromptRef(prompt_id=f"p{i}", text=f"prompt {i}") for i in range(3)]
    >>> policy = SamplingPolicy(ControllerConfig(initial_texts=12, max_texts=20), prompts,
    ...                         inventory={"p0": 1, "p1": 1, "p2": 1})
    >>> [([q.prompt_id for q in p.prompts], p.n_per_prompt) for p in policy.initial_plans()]  # one pair each
    [(['p0', 'p1', 'p2'], 1)]
    >>> plans, reason = policy.next_plans()
    >>> plans, policy.stopped_because
    ([], 'data_exhausted')
    """

    def __init__(self, cfg: ControllerConfig, prompts: list[PromptRef], seed: int = 0,
                 inventory: Mapping[str, int] | None = None) -> None:
        if not prompts:
            raise ValueError("the prompt source produced no prompts")
        self.cfg = cfg
        self.available: dict[str, int] | None = (
            {p.prompt_id: int(inventory.get(p.prompt_id, 0)) for p in prompts} if inventory is not None else None)
        if self.available is not None:
            prompts = [p for p in prompts if self.available[p.prompt_id] > 0] or prompts[:1]
        self.prompts = prompts
        self.by_id = {p.prompt_id: p for p in prompts}
        self.stopped_because = ""  # budget | stable | data_exhausted, once next_plans returned no plans
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.contrast = ContrastIndex(cfg.contrast, seed=seed)
        self.last_view: ContrastView | None = None
        self.uncertain: dict[str, float] = defaultdict(float)  # prompt id -> accumulated score
        self.exemplars: list[Exemplar] = []
        self.round = 0
        self.texts_planned = 0  # both roles
        self.last_nmi: float | None = None
        self.unresolved_in_round = 0

    # ------------------------------------------------------------------ observations

    def observe_embedding(self, prompt_id: str, role: str, vec: np.ndarray, text_id: str = "",
                          pair_id: str = "") -> None:
        if self.cfg.strategy == "active":
            self.contrast.add(text_id or f"{prompt_id}:{role}:{len(self.contrast)}", pair_id, prompt_id, role, vec)

    def observe_explained(self, text_ids: list[str]) -> None:
        """Texts of a cluster whose hypothesis was validated: that difference is found, so the
        prompts producing more of it stop earning targeted samples."""
        self.contrast.explain(text_ids)

    def observe_uncertainty(self, ev: UncertaintyEvent) -> None:
        if ev.kind in ("unresolved_share", "drift"):
            self.unresolved_in_round += 1
        for ex in ev.exemplars:
            if ex.prompt_id in self.by_id:
                self.uncertain[ex.prompt_id] += ev.score / max(len(ev.exemplars), 1)
            # once each: the same text named by two events would be continued twice, with one id
            if (self.available is None and ex.text and len(self.exemplars) < 256
                    and all(e.text_id != ex.text_id for e in self.exemplars)):
                self.exemplars.append(Exemplar(text_id=ex.text_id, prompt_id=ex.prompt_id, text=ex.text))

    def observe_snapshot(self, snap: ClusterSnapshot) -> None:
        self.last_nmi = snap.quality.nmi_previous

    # ------------------------------------------------------------------ planning

    @property
    def budget_left(self) -> int:
        return max(0, self.cfg.max_texts - self.texts_planned)

    @property
    def data_left(self) -> int | None:
        """Texts (both roles) the replayed data can still give; None when unbounded."""
        return None if self.available is None else 2 * sum(self.available.values())

    def initial_plans(self) -> list[Plan]:
        per_role = min(self.cfg.initial_texts, self.cfg.max_texts) // 2
        if self.cfg.strategy == "active":
            n = max(self.cfg.probe_samples, per_role // len(self.prompts))
            probed = self.prompts
            if n * len(probed) > per_role:  # more prompts than the probe can afford: a random subset
                probed = self.rng.sample(self.prompts, max(1, per_role // n))
            plans = self._chunk(probed, n, "divergence_probe",
                                f"probe {len(probed)} prompts with {n} samples per model")
        else:
            plans = self._uniform(per_role, "seed", "initial uniform sample")
        return self._commit(plans)

    def next_plans(self) -> tuple[list[Plan], str]:
        """Plans for the next round and the reason, in words; no plans means stop (and
        ``stopped_because`` says which rule stopped it)."""
        if self.budget_left < 2:
            self.stopped_because = "budget"
            return [], f"budget spent ({self.texts_planned} texts)"
        if self.data_left is not None and self.data_left < 2:
            self.stopped_because = "data_exhausted"
            return [], f"data exhausted: every prompt's texts are used ({self.texts_planned} texts planned)"
        if (self.cfg.strategy == "active" and self.cfg.stop_when_stable and self.round >= 2
                and self.texts_planned >= self.cfg.min_budget_fraction * self.cfg.max_texts
                and self.unresolved_in_round == 0 and self.last_nmi is not None and self.last_nmi >= 0.9
                and not self.unexplained_modes()):
            self.stopped_because = "stable"
            return [], "every cluster resolved, no unexplained difference left, and the clustering is stable"
        self.round += 1
        per_role = min(self.cfg.round_texts, self.budget_left) // 2
        if self.cfg.strategy == "uniform":
            return self._commit(self._uniform(per_role, "seed", f"uniform round {self.round}")), \
                f"uniform round {self.round}: {per_role} texts per model"
        plans, reason = self._active_round(per_role)
        self.unresolved_in_round = 0
        return self._commit(plans), reason

    def unexplained_modes(self) -> int:
        """Modes of at least ``contrast.open_mode_texts`` hot texts that no validated hypothesis
        covers and that are not saturated: differences seen but not yet explained.  The clusterer
        can look resolved and stable while a rare behaviour's texts still sit inside larger
        clusters (a live demo run stopped with the moon texts unreported this way)."""
        self.last_view = view = self.contrast.refresh()
        return view.open_modes(self.cfg.contrast.saturation_texts, self.cfg.contrast.open_mode_texts)

    def _active_round(self, per_role: int) -> tuple[list[Plan], str]:
        explore = round(per_role * self.cfg.exploration_share)
        exploit = per_role - explore
        plans: list[Plan] = []
        n_ex = min(len(self.exemplars), exploit // 8)
        if n_ex:
            picked = self.rng.sample(self.exemplars, n_ex)
            plans.append(Plan("uncertainty", exemplars=picked, n_per_prompt=1,
                              note=f"continue {n_ex} exemplar texts from uncertain clusters"))
            exploit -= n_ex
        n_unc = exploit // 4 if self.uncertain else 0
        alloc: dict[str, int] = defaultdict(int)
        for pid, n in (self._allocate(dict(self.uncertain), n_unc) if n_unc else {}).items():
            alloc[pid] += n
        self.last_view = view = self.contrast.refresh()
        targeted = self._by_mode(view, exploit - n_unc)
        for pid, n in targeted.items():
            alloc[pid] += n
        explore += exploit - n_unc - sum(targeted.values())  # what picks could not place (rounding)
        plans += self._plans_by_count(alloc, "uncertainty", "targeted: {prompts} prompts x {n}")
        plans += self._uniform(explore, "seed", "exploration")
        self.uncertain.clear()
        self.exemplars.clear()
        top = sorted(targeted.items(), key=lambda kv: -kv[1])[:3]
        spent = view.hot & (view.need(self.cfg.contrast.saturation_texts) == 0)
        saturated = int(np.unique(view.mode[spent]).size)
        reason = (f"active round {self.round}: {sum(targeted.values())} texts per model on {len(targeted)} prompts "
                  f"by mode ({int(view.hot.sum())} hot texts in {view.n_modes} modes, {saturated} "
                  f"saturated or explained; most: {', '.join(f'{p[:8]} x{n}' for p, n in top) or 'none'}), {n_unc} on "
                  f"uncertain clusters' prompts, {n_ex} exemplar continuations, {explore} exploration")
        return plans, reason

    def _by_mode(self, view: ContrastView, n_texts: int) -> dict[str, int]:
        """Samples per prompt, mode by mode: every open mode (>= ``min_mode_texts`` hot texts, not
        saturated or covered) gets a share of the picks in proportion to its need times the best
        hit rate among its prompts, and within a mode each pick goes to the prompt with the highest
        draw from the Beta posterior of "a generation pair of this prompt yields a text of this
        mode".  Modes are served in parallel: a best-arm rule over prompts would spend on the
        commonest difference first and reach a rare one only once that one is done."""
        c = self.cfg.contrast
        picks = n_texts // c.samples_per_pick
        if picks <= 0:
            return {}
        need = view.need(c.saturation_texts)
        open_ = view.open_mask(c.saturation_texts, c.min_mode_texts)
        if not open_.any():
            return self._thompson(view, n_texts)
        pairs: dict[str, int] = defaultdict(int)
        for pid in view.prompt_ids:
            pairs[pid] += 1
        hits: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for i in np.flatnonzero(open_):
            if view.prompt_ids[i] in self.by_id and self.is_open(view.prompt_ids[i]):  # not exemplars, not used up
                hits[int(view.mode[i])][view.prompt_ids[i]] += 1
        if not hits:
            return self._thompson(view, n_texts)
        weights: dict[int, float] = {}
        posts: dict[int, tuple[list[str], np.ndarray, np.ndarray]] = {}
        for m, per_prompt in hits.items():
            pids = list(per_prompt)
            h = np.array([per_prompt[p] for p in pids], dtype=np.float64)
            n = np.array([max(1, pairs[p] // 2) for p in pids], dtype=np.float64)
            a, b = h + 1.0, np.maximum(n - h, 0.0) + c.prior_strength
            posts[m] = (pids, a, b)
            weights[m] = float(need[view.mode == m].mean()) * float((a / (a + b)).max())
        out: dict[str, int] = defaultdict(int)
        for m, k in self._allocate(weights, picks).items():
            pids, a, b = posts[m]
            draws = self.np_rng.beta(a, b, size=(k, len(pids)))
            for i, cnt in enumerate(np.bincount(draws.argmax(axis=1), minlength=len(pids))):
                if cnt:
                    out[pids[i]] += int(cnt) * c.samples_per_pick
        return dict(out)

    def _thompson(self, view: ContrastView, n_texts: int) -> dict[str, int]:
        """Samples per prompt when no mode is open (none yet, or diffuse differences): each draw of
        ``samples_per_pick`` goes to the prompt with the highest draw from its Beta posterior of
        "a generation pair yields a hot text in an unsaturated mode"."""
        c = self.cfg.contrast
        picks = n_texts // c.samples_per_pick
        if picks <= 0:
            return {}
        evidence = view.prompt_evidence(c.saturation_texts)
        hits = np.array([evidence.get(p.prompt_id, (0.0, 0))[0] for p in self.prompts], dtype=np.float64)
        pairs = np.array([evidence.get(p.prompt_id, (0, 0))[1] for p in self.prompts], dtype=np.float64)
        # a pair can bring two hot texts (its need sums over both), so hits per pair are capped at 1:
        # a "rate" above 1 would give the Beta a non-positive b
        hits = np.minimum(hits, pairs)
        mean = (hits.sum() + 1.0) / (pairs.sum() + 2.0)  # the pooled rate: the prior's mean, in (0, 1)
        a = mean * c.prior_strength + hits
        b = (1.0 - mean) * c.prior_strength + (pairs - hits)
        closed = np.array([not self.is_open(p.prompt_id) for p in self.prompts])
        counts = np.zeros(len(self.prompts), dtype=np.int64)
        for start in range(0, picks, 64):  # bounded memory for large prompt sets
            draws = self.np_rng.beta(a, b, size=(min(64, picks - start), len(self.prompts)))
            draws[:, closed] = -1.0
            counts += np.bincount(draws.argmax(axis=1), minlength=len(self.prompts))
        return {self.prompts[i].prompt_id: int(counts[i]) * c.samples_per_pick
                for i in np.flatnonzero(counts)}

    @staticmethod
    def _allocate(weights: Mapping[K, float], total: int) -> dict[K, int]:
        """``total`` split in proportion to ``weights`` (largest remainders get the rounding)."""
        s = sum(weights.values())
        raw = {p: total * w / s for p, w in weights.items()}
        alloc = {p: int(v) for p, v in raw.items()}
        rest = total - sum(alloc.values())
        for p, _ in sorted(raw.items(), key=lambda kv: kv[1] - int(kv[1]), reverse=True)[:rest]:
            alloc[p] += 1
        return {p: n for p, n in alloc.items() if n > 0}

    def _uniform(self, n_texts: int, reason: str, note: str) -> list[Plan]:
        if n_texts <= 0:
            return []
        counts: dict[str, int] = defaultdict(int)
        open_prompts = self.prompts if self.available is None else [
            p for p in self.prompts if self.available[p.prompt_id] > 0]
        for _ in range(n_texts):
            if not open_prompts:
                break
            pick = open_prompts[self.rng.randrange(len(open_prompts))].prompt_id
            counts[pick] += 1
            if self.available is not None and counts[pick] >= self.available[pick]:
                open_prompts = [p for p in open_prompts if p.prompt_id != pick]
        return self._plans_by_count(counts, reason, note)

    def _plans_by_count(self, counts: Mapping[str, int], reason: str, note: str) -> list[Plan]:
        """Plans for ``counts`` (prompt id -> samples per model): prompts with the same count share
        requests.  ``note`` may name ``{prompts}`` and ``{n}``."""
        groups: dict[int, list[PromptRef]] = defaultdict(list)
        for pid, n in counts.items():
            groups[n].append(self.by_id[pid])
        plans: list[Plan] = []
        for n, ps in sorted(groups.items()):
            plans += self._chunk(ps, n, reason, note.format(prompts=len(ps), n=n))
        return plans

    def _chunk(self, prompts: list[PromptRef], n: int, reason: str, note: str) -> list[Plan]:
        k = self.cfg.prompts_per_request
        return [Plan(reason, prompts=prompts[i:i + k], n_per_prompt=n, note=note) for i in range(0, len(prompts), k)]

    def _commit(self, plans: list[Plan]) -> list[Plan]:
        """Trim plans to the budget (and to the replayed data left) and count them as spent."""
        out = []
        for plan in (q for p in plans for q in self._within_inventory(p)):
            cost = 2 * plan.texts_per_role
            if cost > self.budget_left:
                break
            self.texts_planned += cost
            if self.available is not None:
                for p in plan.prompts:
                    self.available[p.prompt_id] -= plan.n_per_prompt
            out.append(plan)
        return out

    def _within_inventory(self, plan: Plan) -> list[Plan]:
        """The plan cut to what the replayed data still holds: a prompt with fewer pairs left than
        the plan asks for is asked for what it has, in a plan of its own; used-up prompts drop out."""
        if self.available is None:
            return [plan]
        by_n: dict[int, list[PromptRef]] = defaultdict(list)
        for p in plan.prompts:
            n = min(plan.n_per_prompt, self.available.get(p.prompt_id, 0))
            if n > 0:
                by_n[n].append(p)
        return [Plan(plan.reason, prompts=ps, n_per_prompt=n, note=plan.note) for n, ps in sorted(by_n.items(),
                                                                                                  reverse=True)]

    def is_open(self, prompt_id: str) -> bool:
        """False once a replayed prompt's texts are used up."""
        return self.available is None or self.available.get(prompt_id, 0) > 0
