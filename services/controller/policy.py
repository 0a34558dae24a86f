"""Where to spend the generation budget: uniform, or active (probe, rank, target).

Active sampling follows the seed plan (strategies 1 and 3) with the statistics kept honest:
generation is always *paired* (every planned prompt goes to both models with the same n), so the
clusterer's "no difference" null stays exactly P(intervention | cluster) = 1/2 however adaptively
prompts are chosen.

1. Probe: the initial budget is spread uniformly over every prompt (at least ``probe_samples``
   per prompt and role).
2. Rank: per prompt, the bias-corrected squared distance between the two models' mean
   embeddings, d = ||mu_b - mu_i||^2 - T with T = tr(S_b)/n_b + tr(S_i)/n_i (unbiased for the
   true squared distance), divided by its noise term T: unbiased is not enough, because the
   spread of d is largest where samples are fewest, so ranking by d lets lightly sampled prompts
   win by chance.  d / T stays near 0 on prompts where the models agree and grows with the
   samples where they differ.
3. Target: each round gives ``1 - exploration_share`` of its texts to the top-ranked prompts with
   d / T >= ``min_signal_to_noise`` (equal shares, so a strong behaviour does not starve a weak
   one) and to prompts named by uncertainty events (unresolved shares, drift, boundaries, small
   clusters, partly as continuations of exemplar texts), and the rest uniformly at random.
4. Stop: when the budget is spent, or (``stop_when_stable``) when a round's uncertainty events
   leave nothing unresolved and the clustering is stable (NMI to the previous snapshot >= 0.9).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from services.core.config import ControllerConfig
from services.core.events import ClusterSnapshot, Exemplar, PromptRef, UncertaintyEvent


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


@dataclass
class _PromptStats:
    n: np.ndarray  # per role: count
    sums: np.ndarray  # per role: vector sum (2, dim)
    sq: np.ndarray  # per role: sum of squared norms


class SamplingPolicy:
    def __init__(self, cfg: ControllerConfig, prompts: list[PromptRef], seed: int = 0) -> None:
        if not prompts:
            raise ValueError("the prompt source produced no prompts")
        self.cfg = cfg
        self.prompts = prompts
        self.by_id = {p.prompt_id: p for p in prompts}
        self.rng = random.Random(seed)
        self.stats: dict[str, _PromptStats] = {}
        self.uncertain: dict[str, float] = defaultdict(float)  # prompt id -> accumulated score
        self.exemplars: list[Exemplar] = []
        self.round = 0
        self.texts_planned = 0  # both roles
        self.last_nmi: float | None = None
        self.unresolved_in_round = 0

    # ------------------------------------------------------------------ observations

    def observe_embedding(self, prompt_id: str, role: str, vec: np.ndarray) -> None:
        st = self.stats.get(prompt_id)
        if st is None:
            st = self.stats[prompt_id] = _PromptStats(np.zeros(2), np.zeros((2, vec.shape[0])), np.zeros(2))
        r = 0 if role == "base" else 1
        st.n[r] += 1
        st.sums[r] += vec
        st.sq[r] += float(vec @ vec)

    def observe_uncertainty(self, ev: UncertaintyEvent) -> None:
        if ev.kind in ("unresolved_share", "drift"):
            self.unresolved_in_round += 1
        for ex in ev.exemplars:
            if ex.prompt_id in self.by_id:
                self.uncertain[ex.prompt_id] += ev.score / max(len(ev.exemplars), 1)
            if ex.text and len(self.exemplars) < 256:
                self.exemplars.append(Exemplar(text_id=ex.text_id, prompt_id=ex.prompt_id, text=ex.text))

    def observe_snapshot(self, snap: ClusterSnapshot) -> None:
        self.last_nmi = snap.quality.nmi_previous

    # ------------------------------------------------------------------ planning

    def _divergence_terms(self) -> dict[str, tuple[float, float]]:
        """Per prompt: (bias-corrected divergence, its noise term tr(S_b)/n_b + tr(S_i)/n_i)."""
        out = {}
        for pid, st in self.stats.items():
            if st.n.min() < 1:
                continue
            mu = st.sums / st.n[:, None]
            tr = np.where(st.n > 1, (st.sq / st.n - (mu * mu).sum(1)) * st.n / np.maximum(st.n - 1, 1), 1.0)
            noise = float((tr / st.n).sum())
            out[pid] = (float(((mu[0] - mu[1]) ** 2).sum()) - noise, noise)
        return out

    def divergence(self) -> dict[str, float]:
        return {p: d for p, (d, _) in self._divergence_terms().items()}

    def signal_to_noise(self) -> dict[str, float]:
        """Divergence over its noise term: near 0 for a prompt on which the two models agree, at any
        sample size, and growing with the samples when they differ.  Ranking by the raw estimate
        instead let lightly sampled prompts win by chance: in the sim (bench/active_sampling.py)
        30-35 of the top 40 prompts were such chance winners for the first rounds."""
        return {p: d / max(noise, 1e-12) for p, (d, noise) in self._divergence_terms().items()}

    @property
    def budget_left(self) -> int:
        return max(0, self.cfg.max_texts - self.texts_planned)

    def initial_plans(self) -> list[Plan]:
        per_role = min(self.cfg.initial_texts, self.cfg.max_texts) // 2
        if self.cfg.strategy == "active":
            n = max(self.cfg.probe_samples, per_role // len(self.prompts))
            plans = self._chunk(self.prompts, n, "divergence_probe" if self.cfg.strategy == "active" else "seed",
                                f"probe every prompt with {n} samples per model")
        else:
            plans = self._uniform(per_role, "seed", "initial uniform sample")
        return self._commit(plans)

    def next_plans(self) -> tuple[list[Plan], str]:
        """Plans for the next round and the reason, in words; no plans means stop."""
        if self.budget_left < 2:
            return [], f"budget spent ({self.texts_planned} texts)"
        if (self.cfg.strategy == "active" and self.cfg.stop_when_stable and self.round >= 2
                and self.unresolved_in_round == 0 and self.last_nmi is not None and self.last_nmi >= 0.9):
            return [], "every cluster resolved and the clustering is stable"
        self.round += 1
        per_role = min(self.cfg.round_texts, self.budget_left) // 2
        if self.cfg.strategy == "uniform":
            return self._commit(self._uniform(per_role, "seed", f"uniform round {self.round}")), \
                f"uniform round {self.round}: {per_role} texts per model"
        plans, reason = self._active_round(per_role)
        self.unresolved_in_round = 0
        return self._commit(plans), reason

    def _active_round(self, per_role: int) -> tuple[list[Plan], str]:
        explore = round(per_role * self.cfg.exploration_share)
        exploit = per_role - explore
        snr = self.signal_to_noise()
        ranked = sorted(((s, p) for p, s in snr.items() if s >= self.cfg.min_signal_to_noise), reverse=True)
        top = ranked[: max(1, len(self.prompts) // 5)]
        weights: dict[str, float] = defaultdict(float)
        for _, p in top:  # equal shares: a strong behaviour must not starve a weaker one
            weights[p] += 0.75 / len(top)
        total_unc = sum(self.uncertain.values()) or 1.0
        for p, s in self.uncertain.items():
            weights[p] += 0.25 * s / total_unc
        plans: list[Plan] = []
        n_ex = min(len(self.exemplars), exploit // 8)
        if n_ex:
            picked = self.rng.sample(self.exemplars, n_ex)
            plans.append(Plan("uncertainty", exemplars=picked, n_per_prompt=1,
                              note=f"continue {n_ex} exemplar texts from uncertain clusters"))
            exploit -= n_ex
        if weights:
            alloc = self._allocate(weights, exploit)
            groups: dict[int, list[PromptRef]] = defaultdict(list)
            for pid, n in alloc.items():
                groups[n].append(self.by_id[pid])
            for n, ps in sorted(groups.items()):
                plans += self._chunk(ps, n, "uncertainty", f"targeted: {len(ps)} prompts x {n}")
        else:
            explore += exploit
        plans += self._uniform(explore, "seed", "exploration")
        self.uncertain.clear()
        self.exemplars.clear()
        names = ", ".join(p[:8] for _, p in top[:3])
        reason = (f"active round {self.round}: {per_role - explore} targeted texts per model on "
                  f"{len(weights)} prompts (top divergence: {names or 'none yet'}), {n_ex} exemplar "
                  f"continuations, {explore} exploration")
        return plans, reason

    @staticmethod
    def _allocate(weights: dict[str, float], total: int) -> dict[str, int]:
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
        picks = [self.prompts[self.rng.randrange(len(self.prompts))] for _ in range(n_texts)]
        counts: dict[str, int] = defaultdict(int)
        for p in picks:
            counts[p.prompt_id] += 1
        groups: dict[int, list[PromptRef]] = defaultdict(list)
        for pid, n in counts.items():
            groups[n].append(self.by_id[pid])
        plans: list[Plan] = []
        for n, ps in sorted(groups.items()):
            plans += self._chunk(ps, n, reason, note)
        return plans

    def _chunk(self, prompts: list[PromptRef], n: int, reason: str, note: str) -> list[Plan]:
        k = self.cfg.prompts_per_request
        return [Plan(reason, prompts=prompts[i:i + k], n_per_prompt=n, note=note) for i in range(0, len(prompts), k)]

    def _commit(self, plans: list[Plan]) -> list[Plan]:
        """Trim plans to the budget and count them as spent."""
        out = []
        for plan in plans:
            cost = 2 * plan.texts_per_role
            if cost > self.budget_left:
                break
            self.texts_planned += cost
            out.append(plan)
        return out
