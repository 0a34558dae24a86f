"""Discovery benchmark: the shipped pipeline on the sim, on each real set, and on pair-swap nulls.

Every run is ``bench.experiments.arun``: ``build_services`` on the in-memory bus with a real Redis,
the same services ``autointerv run`` starts (no second wiring).  Sets:

* ``sim``: the simulated pair with its four modes and three styles planted;
* each real set in ../shared/data (replayed: both models' decoded texts, every pair read once);
* the pair-swap null of each real set, 3 seeds: each prompt's two answers exchange models with
  probability 1/2, an exact null for any data; nothing may be validated.

Per set it prints the validated findings (kind, the side they claim, effect: the held-out AUC and
the intervention's share of the cluster for a mode finding, P(the intervention's answer scores
higher than its partner's) with its 95% CI for a paired one), the null runs' validated counts,
texts used, wall time, and the **pair identity accuracy**: the run's validated findings alone as
scorers (paired: their scorer; mode: the keyword tier's score of the finding's words), weighted by
a logistic model fit on the run's label pairs, the share of its held-out pairs whose intervention
answer is picked (services/paired/identity.py).
For HC3 the paired findings' directions are checked against Guo et al. (2023): ChatGPT longer, more
formal and hedged; people shorter, first-person, colloquial.  Last line:
``discovery_recall=<planted sim behaviours validated / planted>``.

    PYTHONPATH=. nice -n 10 python bench/discovery.py [--sets sim,hc3,helm] [--null-seeds 3]
        [--sim-texts 6000] [--embedder hashing|minilm] [--max-pairs N]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout: python bench/discovery.py

from bench.experiments import ExperimentResult, arun, sim_config
from services.core.events import EmbeddedText, Hypothesis
from services.core.resources import Resources
from services.paired.identity import identity_accuracy_of
from services.paired.pairs import Pair, pairs_from_embedded, split_pairs
from services.paired.scorers import PairScorer, PairScores, make_scorer
from services.validator.tiers import hypothesis_words

# name -> (file in the shared data directory, base model, intervention model)
REAL_SETS = {
    "hc3": ("hc3_human_vs_chatgpt.jsonl", "human", "chatgpt"),
    "helm": ("helm_summaries_cohere_vs_tnlg.jsonl", "cohere", "tnlg"),
}
# Guo et al. 2023 on HC3: the side each bank feature should favour (intervention = ChatGPT)
GUO_HC3 = {
    "words": "intervention", "sentences": "intervention", "lines": "intervention", "formal_connectors": "intervention",
    "hedges": "intervention", "summary_phrase": "intervention", "stresses_importance": "intervention",
    "numbered_items": "intervention", "first_person_singular": "base", "contractions": "base",
    "colloquial_words": "base", "exclamations": "base", "lowercase_i": "base", "ellipses": "base",
    "all_caps_words": "base", "link": "base", "glued_sentences": "base", "space_before_punctuation": "base",
    "questions": "base", "emoji": "base", "parentheses": "base",
}


def shared_data_dir() -> Path:
    """The nearest ``shared/data`` beside the repository or one of its parents (worktrees too)."""
    root = Path(__file__).resolve().parents[1]
    return next((p / "shared" / "data" for p in root.parents if (p / "shared" / "data").is_dir()),
                root.parent / "shared" / "data")


# --------------------------------------------------------------------------- data


def read_pairs_rows(path: Path, base: str, inter: str, max_pairs: int | None) -> list[tuple[dict, dict]]:
    """(base row, intervention row) per prompt and answer index, in file order."""
    by: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {base: [], inter: []})
    for line in path.read_bytes().splitlines():
        if line.strip():
            r = orjson.loads(line)
            if r.get("model") in (base, inter):
                by[r["prompt"]][r["model"]].append(r)
    out = [(b, i) for answers in by.values() for b, i in zip(answers[base], answers[inter], strict=False)]
    return out[:max_pairs] if max_pairs else out


def swapped(pairs: list[tuple[dict, dict]], base: str, inter: str, seed: int) -> list[tuple[dict, dict]]:
    """The pair-swap null: within each pair the two answers exchange models with probability 1/2."""
    flips = np.random.default_rng(seed).random(len(pairs)) < 0.5
    return [({**i, "model": base}, {**b, "model": inter}) if f else (b, i)
            for (b, i), f in zip(pairs, flips, strict=True)]


def write_replay(path: Path, pairs: list[tuple[dict, dict]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for pair in pairs for r in pair))
    return path


# --------------------------------------------------------------------------- identity accuracy


class WordsScorer(PairScorer):
    """A mode finding as a scorer: the share of its content words an answer contains (the keyword tier)."""

    def __init__(self, text: str) -> None:
        self.patterns = [re.compile(r"\b" + re.escape(w) + r"\w*", re.IGNORECASE) for w in hypothesis_words(text)]
        self.spec = {"type": "words", "text": text}

    def _s(self, text: str) -> float:
        return sum(1 for p in self.patterns if p.search(text)) / len(self.patterns) if self.patterns else 0.0

    def score(self, pairs: Sequence[Pair]) -> PairScores:
        return PairScores([p.pair_id for p in pairs], np.array([self._s(p.base) for p in pairs]),
                          np.array([self._s(p.intervention) for p in pairs]))


def finding_scorers(findings: list[Hypothesis]) -> list[PairScorer]:
    out: list[PairScorer] = []
    for h in findings:
        if h.kind == "paired" and h.scorer.get("type") != "llm_judge":
            out.append(make_scorer(h.scorer))
        elif h.kind != "paired":
            out.append(WordsScorer(h.text))
    return out


def run_pairs(res: ExperimentResult) -> list[Pair]:
    bus = res.run.bus
    assert bus is not None
    return pairs_from_embedded(EmbeddedText.from_bytes(r.value) for r in bus.records(bus.topics.name("embeddings")))


def identity_accuracy(res: ExperimentResult) -> float:
    label, held = split_pairs(run_pairs(res), res.cfg.paired.label_fraction)
    return identity_accuracy_of(finding_scorers(res.validated), label, held)


# --------------------------------------------------------------------------- runs


@dataclass
class SetResult:
    name: str
    res: ExperimentResult
    wall_s: float
    identity: float
    nulls: list[int] = field(default_factory=list)  # validated per null seed
    null_texts: list[int] = field(default_factory=list)


def common(embedder: str) -> dict[str, Any]:
    if embedder == "minilm":
        return {"embedder": {"backend": "torch", "model": "bundled:all-MiniLM-L6-v2"}}
    return {}


async def one_run(cfg, resources: Resources) -> tuple[ExperimentResult, float]:
    t0 = time.perf_counter()
    res = await arun(cfg, resources=resources, keep_vectors=False)
    return res, time.perf_counter() - t0


def replay_cfg(path: Path, base: str, inter: str, seed: int, embedder: str):
    models = {"base": {"backend": "replay", "path": str(path), "replay_model_name": base},
              "intervention": {"backend": "replay", "path": str(path), "replay_model_name": inter}}
    return sim_config(seed=seed, models=models, controller={"max_texts": 10**9}, **common(embedder))


async def run_sim(texts: int, embedder: str, resources: Resources) -> SetResult:
    sim = {"backend": "sim", "sim": {"styles": True}}
    cfg = sim_config(seed=0, max_texts=texts, models={"base": sim, "intervention": sim}, **common(embedder))
    res, wall = await one_run(cfg, resources)
    return SetResult("sim", res, wall, identity_accuracy(res))


async def run_real(name: str, data: Path, null_seeds: int, max_pairs: int | None, embedder: str,
                   resources: Resources, tmp: Path) -> SetResult | None:
    file, base, inter = REAL_SETS[name]
    if not (data / file).is_file():
        print(f"[{name}] skipped: {data / file} is absent", flush=True)
        return None
    pairs = read_pairs_rows(data / file, base, inter, max_pairs)
    res, wall = await one_run(replay_cfg(write_replay(tmp / f"{name}.jsonl", pairs), base, inter, 0, embedder),
                              resources)
    out = SetResult(name, res, wall, identity_accuracy(res))
    for seed in range(null_seeds):
        path = write_replay(tmp / f"{name}-null{seed}.jsonl", swapped(pairs, base, inter, seed))
        null, _ = await one_run(replay_cfg(path, base, inter, seed, embedder), resources)
        out.nulls.append(len(null.validated))
        out.null_texts.append(null.texts)
    return out


# --------------------------------------------------------------------------- report


def effect_of(res: ExperimentResult, h: Hypothesis) -> str:
    v = res.final[h.hypothesis_id]
    if h.kind == "paired":
        e = v.effect
        return (f"P(int>base) {e['p_intervention_higher']:.2f} "
                f"[{e['p_intervention_higher_lo']:.2f},{e['p_intervention_higher_hi']:.2f}]")
    share = v.effect.get("share_intervention")
    return f"AUC {v.auc:.2f}" + ("" if share is None else f", cluster share(int) {share:.2f}")


def guo_check(h: Hypothesis) -> str:
    want = GUO_HC3.get(str(h.scorer.get("name"))) if h.kind == "paired" and h.scorer.get("type") == "feature" else None
    return "" if want is None else (" [Guo et al.: agrees]" if want == h.direction else " [Guo et al.: OPPOSITE]")


def print_set(s: SetResult) -> dict[str, Any]:
    res = s.res
    found = res.validated
    paired = [h for h in found if h.kind == "paired"]
    mode = [h for h in found if h.kind != "paired"]
    print(f"\n=== {s.name}: {len(found)} validated ({len(mode)} mode, {len(paired)} paired), texts {res.texts}, "
          f"wall {s.wall_s:.0f}s, stopped: {res.run.progress.get('stopped_because')}, "
          f"pair identity accuracy {s.identity:.3f}", flush=True)
    for h in paired + mode:
        side = "int " if h.direction == "intervention" else "base"
        check = guo_check(h) if s.name == "hc3" else ""
        kind = "paired" if h.kind == "paired" else "mode  "
        print(f"  [{kind}] {side} {effect_of(res, h):34s} {h.text[:110]}{check}")
    if s.nulls:
        print(f"  pair-swap nulls: validated {s.nulls} (texts {s.null_texts})")
    agree = sum(1 for h in paired if guo_check(h).endswith("agrees]"))
    opposite = sum(1 for h in paired if "OPPOSITE" in guo_check(h))
    return {"set": s.name, "validated": len(found), "paired": len(paired), "mode": len(mode), "texts": res.texts,
            "wall_s": s.wall_s, "identity": s.identity, "nulls": s.nulls, "guo_agree": agree, "guo_opposite": opposite}


async def main_async(args: argparse.Namespace) -> int:
    sets = [x.strip() for x in args.sets.split(",") if x.strip()]
    resources = Resources()
    rows, recall = [], None
    with tempfile.TemporaryDirectory(prefix="discovery-bench-") as tmpdir:
        for name in sets:
            if name == "sim":
                s = await run_sim(args.sim_texts, args.embedder, resources)
                planted = [b.name for b in s.res.behaviours]
                recall = len([b for b in planted if b in s.res.found_at]) / len(planted) if planted else None
                rows.append(print_set(s))
                print(f"  planted: {planted}; found (texts when first validated): {s.res.found_at}")
            elif name in REAL_SETS:
                s = await run_real(name, Path(args.data), args.null_seeds, args.max_pairs, args.embedder, resources,
                                   Path(tmpdir))
                if s is not None:
                    rows.append(print_set(s))
            else:
                print(f"unknown set {name!r}; known: sim, {', '.join(REAL_SETS)}", file=sys.stderr)
                return 2
    print("\nset    validated  mode  paired  texts   wall_s  identity  nulls_validated  guo_agree/opposite")
    for r in rows:
        guo = f"{r['guo_agree']}/{r['guo_opposite']}" if r["set"] == "hc3" else "-"
        print(f"{r['set']:6s} {r['validated']:9d} {r['mode']:5d} {r['paired']:7d} {r['texts']:6d} {r['wall_s']:8.0f} "
              f"{r['identity']:9.3f}  {r['nulls'] or '-'!s:15s}  {guo}")
    print(f"discovery_recall={'nan' if recall is None else f'{recall:.3f}'}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="sim," + ",".join(REAL_SETS))
    ap.add_argument("--data", default=str(shared_data_dir()))
    ap.add_argument("--null-seeds", type=int, default=3)
    ap.add_argument("--sim-texts", type=int, default=6000)
    ap.add_argument("--max-pairs", type=int, default=None, help="first N pairs of each real set (default: all)")
    ap.add_argument("--embedder", choices=["hashing", "minilm"], default="hashing")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
