"""Detection at the clusterer level: texts until each planted behaviour becomes a candidate, and how
often a null stream yields any candidate at all, for clusterer variants.

Two constructions, both embedded with the bundled MiniLM (vectors cached outside the repository):

* ``sim``: the simulated pair's default behaviours (cats 5% of the intervention's texts on every
  prompt; disclaimer, sailing, moon on one or two topics), pairs drawn uniformly over its prompts.
* ``real``: real texts that no one on the project wrote: HELM news summaries (two summarisers) and
  HC3 answers (a person and ChatGPT), from ``../shared/data``.  Each prompt's two texts form a pair
  and get their roles by a coin, so nothing differs between the roles; then the intervention's text
  of a pair is replaced, in 10% of pairs, by a summary of a football article (326 texts from 163
  articles) and in another 5% by an answer to a medical question (HC3's medical consultations, person
  and ChatGPT: 200-odd texts, many wordings).  Those prompts are kept out of the ordinary pool, so the
  base never writes about them.

Each construction has its pair-swap null (the two roles of every pair swapped by a coin, an exact
null for any data): any candidate there is a false discovery.  A planted behaviour counts as found
when a candidate's over-represented label and held-out texts are mostly that behaviour.

A variant ending in ``+regions`` adds what the clusterer does not do (yet): every 256 texts the
controller's contrast index (services/controller/contrast.py) is refreshed, and each mode of at
least 5 hot texts not already covered becomes a prospective region (a later text is inside when it
is as similar to one of the mode's texts as a typical mode member is to its nearest other member);
regions are tested on later texts only, at half of alpha, the clusters at the other half.

    PYTHONPATH=$PWD .venv/bin/python bench/detection.py [--data sim,real] [--seeds 8] [--variants base,...]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.clusterer.state import ClusterState
from services.core.config import ClustererConfig, EmbedderConfig, GeneratorConfig, SimModelConfig
from services.core.events import CandidateCluster, stable_id
from services.generator.backends.base import DecodingParams, GenerationTask
from services.generator.backends.sim import SimBackend, _prompt_table

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the repository (or beside the worktrees' parent); AUTOINTERV_DATA overrides
DATA = next((p for p in [Path(os.environ.get("AUTOINTERV_DATA", "/nonexistent")), *(
    d / "shared" / "data" for d in ROOT.parents)] if p.is_dir()), ROOT.parent / "shared" / "data")
CACHE = Path(tempfile.gettempdir()) / "autointerv-detection-cache"

# the clusterer settings before this benchmark (k_initial 20, candidates from 30 texts, one alpha
# sequence); every other variant changes them as its name says; "default" is ClustererConfig()
OLD = {"k_initial": 20, "min_cluster_texts": 30, "parting_alpha_share": 0.0}
VARIANTS: dict[str, dict[str, object]] = {
    "base": OLD,
    "check256": {**OLD, "check_every": 256},
    "min12": {**OLD, "min_cluster_texts": 12},
    "min20": {**OLD, "min_cluster_texts": 20},
    "k40": {**OLD, "k_initial": 40},
    "parting50": {**OLD, "parting_alpha_share": 0.5},
    "k40+min12": {**OLD, "k_initial": 40, "min_cluster_texts": 12},
    "k40+parting50": {**OLD, "k_initial": 40, "parting_alpha_share": 0.5},
    "parting50+min12": {**OLD, "parting_alpha_share": 0.5, "min_cluster_texts": 12},
    "splits8": {**OLD, "max_splits_per_check": 8, "split_every": 125},
    "default": {},
    "k60": {"k_initial": 60},
    "min8": {"min_cluster_texts": 8},
}


@dataclass
class Stream:
    """Texts in ingest order (a pair's two texts adjacent), with each text's planted behaviour."""

    text_ids: list[str]
    prompt_ids: list[str]
    roles: list[str]
    texts: list[str]
    X: np.ndarray
    truth: list[str | None]

    @property
    def planted(self) -> list[str]:
        return sorted({t for t, r in zip(self.truth, self.roles, strict=True) if t and r == "intervention"})


# ----------------------------------------------------------------------------- embedding


def embed(texts: list[str]) -> np.ndarray:
    """MiniLM vectors (float16 storage, as the pipeline's cache), cached by the texts' hash."""
    key = hashlib.blake2b("\x1f".join(texts).encode(), digest_size=12).hexdigest()
    path = CACHE / f"{key}.npy"
    if path.exists():
        return np.load(path).astype(np.float32)
    from services.embedder.encoder import load_encoder

    enc = load_encoder(EmbedderConfig())
    t0 = time.perf_counter()
    X = np.concatenate([enc.encode(texts[s:s + 256]) for s in range(0, len(texts), 256)])
    print(f"  embedded {len(texts)} texts in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, X.astype(np.float16))
    return X.astype(np.float16).astype(np.float32)


# ----------------------------------------------------------------------------- constructions


@dataclass
class Pair:
    prompt_id: str
    texts: tuple[str, str]  # (base, intervention)
    truth: tuple[str | None, str | None]
    rows: tuple[int, int]  # rows of the embedded pool


def sim_pairs(per_prompt: int, seed: int = 0) -> tuple[list[Pair], np.ndarray]:
    """per_prompt samples per sim prompt and role (the default behaviours), embedded."""
    model = SimModelConfig()
    gen = GeneratorConfig(seed=seed)
    tasks = [GenerationTask(p.prompt_id, p.text, per_prompt, DecodingParams(), seed=0) for p in _prompt_table(40)]
    out = {}
    for role in ("base", "intervention"):
        out[role] = asyncio.run(SimBackend(model, gen, role).generate(tasks)).texts
    texts = [g.text for g in out["base"]] + [g.text for g in out["intervention"]]
    X = embed(texts)
    n = len(out["base"])
    pairs = [Pair(b.prompt_id, (b.text, i.text), (None, i.meta.get("behaviour")), (k, n + k))
             for k, (b, i) in enumerate(zip(out["base"], out["intervention"], strict=True))]
    return pairs, X


MEDICINE = ("doctor", "treatment", "pain", "symptom", "infection", "disease", "diagnos", "medic", "surgery",
            "pills", "blood", "cancer", "pregnan", "fever", "tablet", "health", "patient", "hospital", "drug",
            "vaccine", "virus", "therapy", "skin", "injur", "sick", "heart", "diabet", "allerg", "chemo", "mental")
CONSULTATION = re.compile(r"[a-z?)][A-Z][a-z]|[a-z?][A-Z] |\?[a-z]")
GREETING = re.compile(r"\s*(hi|hello|dear|thanks|thank you|welcome)\b", re.I)
FOOTBALL = ("football", "premier league", "striker", "midfielder", "goalkeeper", "champions league", "fa cup",
            "manchester united", "chelsea", "arsenal", "liverpool", "barcelona", "real madrid")


def real_pool() -> tuple[list[tuple[str, list[int]]], list[int], list[int], list[str], np.ndarray]:
    """(ordinary prompts with their two text rows, medicine rows, football rows, all texts, X).

    Medicine: HC3's medical consultations (a title and a message run together, or answered with a
    greeting); football: HELM articles with two football words.  Other HC3 questions with a
    medical word and articles with one football word are left out altogether, so that the ordinary
    pool touches neither subject."""
    rows = []
    for name in ("helm_summaries_cohere_vs_tnlg.jsonl", "hc3_human_vs_chatgpt.jsonl"):
        path = DATA / name
        if not path.exists():
            raise SystemExit(f"{path} is missing: the real-text construction needs ../shared/data")
        rows += [(name, orjson.loads(line)) for line in path.open("rb")]
    by_prompt: dict[str, list[int]] = {}
    for i, (_, r) in enumerate(rows):
        by_prompt.setdefault(r["prompt"], []).append(i)
    texts = [r["text"] for _, r in rows]
    X = embed(texts)
    ordinary, medicine, football = [], [], []
    for prompt, idx in by_prompt.items():
        if len(idx) != 2:
            continue
        low, hc3 = prompt.lower(), rows[idx[0]][0].startswith("hc3")
        n_foot = 0 if hc3 else sum(k in low for k in FOOTBALL)
        medical = hc3 and any(k in low for k in MEDICINE)
        if hc3 and (CONSULTATION.search(prompt[:200]) or prompt.startswith(("Q.", "Suggest"))
                    or (medical and any(GREETING.match(texts[i]) for i in idx))):
            medicine += idx  # the medical-consultation questions (title and message run together)
        elif n_foot >= 2:
            football += idx
        elif n_foot == 0 and not medical:
            ordinary.append((prompt, idx))
    return ordinary, medicine, football, texts, X


def real_stream(pool: tuple, seed: int, swap: bool, rates: tuple[float, float] = (0.10, 0.05)) -> Stream:
    ordinary, medicine, football, texts, X = pool
    rng = np.random.default_rng(seed)
    planted = {"football": list(rng.permutation(football)), "medicine": list(rng.permutation(medicine))}
    pairs = []
    for k in rng.permutation(len(ordinary)).tolist():
        prompt, idx = ordinary[k]
        b, i = idx if rng.random() < 0.5 else idx[::-1]
        truth = None
        u = rng.random()
        for name, rate in zip(planted, rates, strict=True):
            if u < rate and planted[name]:
                i, truth = planted[name].pop(), name
                break
            u -= rate
        pairs.append(Pair(stable_id(prompt)[:12], (texts[b], texts[i]), (None, truth), (b, i)))
    return _stream(pairs, X, rng, swap)


def sim_maker(pairs: list[Pair], X: np.ndarray, n_texts: int) -> Callable[[int, bool], Stream]:
    return lambda seed, swap: sim_stream(pairs, X, seed, n_texts // 2, swap)


def real_maker(pool: tuple) -> Callable[[int, bool], Stream]:
    return lambda seed, swap: real_stream(pool, seed, swap)


def sim_stream(pairs: list[Pair], X: np.ndarray, seed: int, n_pairs: int, swap: bool) -> Stream:
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(pairs))[:n_pairs]
    return _stream([pairs[k] for k in pick.tolist()], X, rng, swap)


def _stream(pairs: list[Pair], X: np.ndarray, rng: np.random.Generator, swap: bool) -> Stream:
    ids, prompts, roles, texts, rows, truth = [], [], [], [], [], []
    for n, p in enumerate(pairs):
        order = [0, 1] if rng.random() < 0.5 else [1, 0]  # which text comes first: a coin
        flip = swap and rng.random() < 0.5  # pair-swap null: which text is whose, a coin
        for side in order:
            role = ("base", "intervention")[side ^ int(flip)]
            ids.append(f"{int(rng.integers(0, 2**31)):08x}{n:08x}{side}")
            prompts.append(p.prompt_id)
            roles.append(role)
            texts.append(p.texts[side])
            rows.append(p.rows[side])
            truth.append(p.truth[side])
    return Stream(ids, prompts, roles, texts, X[rows], truth)


# ----------------------------------------------------------------------------- measuring


def matched(cand: CandidateCluster, truth: dict[str, str | None]) -> str | None:
    """The planted behaviour most of the candidate's over-represented texts show (None if none)."""
    over = [t.text_id for t in cand.label_texts + cand.holdout_texts if t.role == cand.direction]
    if not over or cand.direction != "intervention":
        return None
    name, n = Counter(truth.get(t) for t in over).most_common(1)[0]
    return name if name is not None and n >= 0.5 * len(over) else None


def run(stream: Stream, cfg: ClustererConfig, chunk: int = 32) -> tuple[dict[str, int], int, int]:
    """({behaviour: texts ingested when first found}, candidates, candidates matching nothing)."""
    st = ClusterState(cfg, "detect")
    truth = dict(zip(stream.text_ids, stream.truth, strict=True))
    found: dict[str, int] = {}
    n_cand = n_other = 0
    for s in range(0, len(stream.text_ids), chunk):
        e = min(len(stream.text_ids), s + chunk)
        res = st.ingest_arrays(stream.text_ids[s:e], stream.prompt_ids[s:e], stream.roles[s:e],
                               stream.texts[s:e], stream.X[s:e])
        if e == len(stream.text_ids):
            res.candidates += st.checkpoint().candidates
        for cand in res.candidates:
            n_cand += 1
            name = matched(cand, truth)
            if name is None:
                n_other += 1
            else:
                found.setdefault(name, _position(st))
    return found, n_cand, n_other


@dataclass
class Region:
    """A ball around a one-sided mode of hot texts, tested on the texts that arrive after it."""

    anchors: np.ndarray  # the mode's hot texts when the region was made (fixed)
    cos_min: float  # a later text is inside when some anchor is at least this similar
    number: int
    counts: np.ndarray  # (base, intervention) of later texts inside
    members: list[str]
    done: bool = False


def run_regions(stream: Stream, cfg: ClustererConfig, share: float = 0.5, min_mode: int = 5,
                every: int = 256, alpha: float = 0.05,
                regions: list[Region] | None = None) -> tuple[dict[str, int], int, int]:
    """The clusterer at alpha * (1 - share) plus prospective regions at alpha * share: every
    ``every`` texts the contrast index's modes of at least ``min_mode`` hot texts that no region
    covers yet become regions; each region counts only the texts that arrive after it."""
    from services.controller.contrast import ContrastIndex
    from services.core.config import ContrastConfig
    from services.stats.share_tests import Spending, share_log_e

    st = ClusterState(cfg, "detect", alpha=alpha * (1 - share))
    index = ContrastIndex(ContrastConfig(), seed=0)
    spend = Spending(alpha * share)
    regions = [] if regions is None else regions
    truth = dict(zip(stream.text_ids, stream.truth, strict=True))
    found: dict[str, int] = {}
    n_cand = n_other = 0
    pair_of = {t: t[8:16] for t in stream.text_ids}
    role_of = dict(zip(stream.text_ids, stream.roles, strict=True))
    for s in range(0, len(stream.text_ids), 32):
        e = min(len(stream.text_ids), s + 32)
        Xs = stream.X[s:e]
        for r in regions:  # count first: a region never sees the texts that defined it
            inside = (Xs @ r.anchors.T).max(axis=1) >= r.cos_min
            for j in np.flatnonzero(inside).tolist():
                r.counts[int(stream.roles[s + j] == "intervention")] += 1
                r.members.append(stream.text_ids[s + j])
        res = st.ingest_arrays(stream.text_ids[s:e], stream.prompt_ids[s:e], stream.roles[s:e],
                               stream.texts[s:e], Xs)
        for i in range(s, e):
            index.add(stream.text_ids[i], pair_of[stream.text_ids[i]], stream.prompt_ids[i], stream.roles[i],
                      stream.X[i])
        for cand in res.candidates:
            n_cand += 1
            name = matched(cand, truth)
            n_other += name is None
            if name is not None:
                found.setdefault(name, e)
        for r in regions:
            if r.done or r.counts.sum() < cfg.min_cluster_texts:
                continue
            if share_log_e(r.counts[None])[0] >= -math.log(spend.level(r.number)):
                r.done = True
                n_cand += 1
                names = Counter(truth[t] for t in r.members if role_of[t] == "intervention")
                top, k = names.most_common(1)[0] if names else (None, 0)
                if top is not None and r.counts[1] > r.counts[0] and k >= 0.5 * sum(names.values()):
                    found.setdefault(top, e)
                else:
                    n_other += 1
        if e % every == 0 and e >= 512:
            view = index.refresh()
            for m in sorted(set(view.mode[view.hot].tolist())):
                rows = np.flatnonzero(view.mode == m)
                if len(rows) < min_mode:
                    continue
                anchors = index.X[rows]
                sim = anchors @ anchors.T
                np.fill_diagonal(sim, -1.0)
                cos_min = float(np.median(sim.max(axis=1)))  # a typical member's nearest member
                if any(((anchors @ r.anchors.T).max(axis=1) >= r.cos_min).mean() > 0.5 for r in regions):
                    continue  # mostly inside a region already
                regions.append(Region(anchors, cos_min, spend.add(0), np.zeros(2, np.int64), []))
    return found, n_cand, n_other


def _position(st: ClusterState) -> int:
    return int(st.role_totals.sum())


def summarise(label: str, runs: list[tuple[dict[str, int], int, int]], planted: list[str], n_texts: int) -> str:
    parts = [f"{label:<22}"]
    for name in planted:
        hits = sorted(r[0][name] for r in runs if name in r[0])
        med = statistics.median_high([r[0].get(name, math.inf) for r in runs])
        shown = "never" if math.isinf(med) else f"{med:,.0f}"
        parts.append(f"{name} {len(hits)}/{len(runs)} median {shown}")
    parts.append(f"other cands {sum(r[2] for r in runs)}")
    return "  ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="sim,real")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--null-seeds", type=int, default=20)
    ap.add_argument("--variants", default="base,default,min12+regions,default+regions",
                    help=f"any of {', '.join(VARIANTS)}, each optionally with +regions")
    ap.add_argument("--sim-texts", type=int, default=8000, help="texts per sim stream")
    a = ap.parse_args()
    variants = a.variants.split(",")
    lines: list[str] = []
    for data in a.data.split(","):
        make = sim_maker(*sim_pairs(per_prompt=30), a.sim_texts) if data == "sim" else real_maker(real_pool())
        for v in variants:
            over = dict(VARIANTS[v.removesuffix("+regions")])
            runner = run_regions if v.endswith("+regions") else run
            cfg = ClustererConfig(**over)
            t0 = time.perf_counter()
            streams = [make(seed, False) for seed in range(a.seeds)]
            runs = [runner(s, cfg) for s in streams]
            nulls = [runner(make(1000 + seed, True), cfg) for seed in range(a.null_seeds)]
            fwer = sum(1 for r in nulls if r[1]) / max(1, len(nulls))
            n = len(streams[0].text_ids)
            line = (f"{data:<5}{summarise(v, runs, streams[0].planted, n)}  null runs with a candidate "
                    f"{sum(1 for r in nulls if r[1])}/{len(nulls)} ({fwer:.2f})  [{n} texts, "
                    f"{time.perf_counter() - t0:.0f} s]")
            print(line, flush=True)
            lines.append(line)


if __name__ == "__main__":
    main()
