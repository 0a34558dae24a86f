"""Cascade vs expensive-tier-only validation: expensive calls, tokens, dollars and agreement.

Hypotheses come from in-process sim runs (services/harness.py): the contrastive hypotheses of
planted runs and of null runs (these rarely have any: a null run's clusters seldom pass the
share test), each with its own held-out texts.  Two label sources are compared, because the
cascade can only save what its cheap tier can decide:

* ``offline``: the hypotheses exactly as the offline labeler wrote them;
* ``cluster-terms``: the same hypotheses re-worded from the clusterer's top terms of the cluster
  at candidate time (``ClusterState.top_terms``: label-split texts only, so the held-out texts
  stay unseen) with the offline labeler's ``describe``.

A stress set re-scores every re-worded hypothesis on texts of a null run (the models are equal, so nothing
it says can hold): "null twins".

Both arms run through ``services.harness.Cascade`` (the validator service's decision code, LORD++
per tier at alpha / n_tiers): cascade = keyword (free) -> expensive tier for the escalated
hypotheses only; expensive-only = the expensive tier decides everything.

No API key here, so the expensive LLM tier is STOOD IN by an offline tier that also reads the
hypothesis: the embedding tier with the real MiniLM (``--expensive embedding``; or the probe
tier, ``--expensive probe``, which ignores the hypothesis).  "Calls" are held-out texts scored by
the expensive tier (one LLM call each in a real run); tokens are estimated from the real scoring
prompt (``score_text_prompt``, ~4 characters a token) plus ``--output-tokens`` per answer, and
dollars at the ``LLMConfig`` default prices.

    .venv/bin/python bench/cascade.py [--seeds 3] [--max-texts 8000] [--expensive embedding|probe]

The last line is ``expensive_calls_saved=<expensive-only calls / cascade calls>`` for the
pipeline's hypotheses with the shipped (offline) labels.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.harness import Cascade, HarnessResult, arun_experiment, sim_config

from services.core.config import Config, EmbedderConfig, LLMConfig, TierConfig
from services.core.events import DecodedText, Hypothesis, TextRef
from services.embedder.encoder import Encoder, normalise_text
from services.embedder.hashing import HashingEncoder
from services.hypothesizer.offline import describe
from services.hypothesizer.service import KEYWORDS_PER_LABEL as KEYWORDS
from services.hypothesizer.service import other_role
from services.llm.contract import estimate_tokens
from services.llm.prompts import score_text_prompt
from services.validator.tiers import split_holdout


class MemoEncoder:
    """In-process stand-in for the Redis embedding cache: each distinct text is encoded once."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.model_key, self.dim, self.max_chars = inner.model_key, inner.dim, inner.max_chars
        self.memo: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.encode_normalised([normalise_text(t, self.max_chars) for t in texts])

    def encode_normalised(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.inner.encode_normalised(todo), strict=True))
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


@dataclass
class Arm:
    name: str
    decisions: dict[str, str]  # hypothesis id -> final decision
    expensive_texts: int  # texts scored by the expensive tier
    input_tokens: int
    output_tokens: int
    decided_at: dict[str, int]  # tier name -> hypotheses decided there

    def usd(self, llm: LLMConfig) -> float:
        return (self.input_tokens * llm.usd_per_1k_input + self.output_tokens * llm.usd_per_1k_output) / 1000


def null_twins(hyps: list[Hypothesis], null_texts: list[DecodedText], per: int, max_texts: int,
               rng: random.Random) -> list[Hypothesis]:
    """Each hypothesis re-tested on ``max_texts`` texts a side of a run where the models are equal."""
    by_role = {r: [t for t in null_texts if t.role == r] for r in ("base", "intervention")}
    out = []
    for h in hyps:
        for k in range(per):
            side = {r: rng.sample(by_role[r], max_texts) for r in by_role}
            holdout = [TextRef(text_id=t.text_id, prompt_id=t.prompt_id, role=t.role, text=t.text)
                       for r in ("base", "intervention") for t in side[r]]
            out.append(h.model_copy(update={"hypothesis_id": f"{h.hypothesis_id}-null{k}",
                                            "holdout_texts": holdout}))
    return out


async def run_arm(name: str, cfg: Config, encoder: Encoder, hyps: list[Hypothesis],
                  output_tokens: int) -> Arm:
    cascade = await Cascade.build(cfg, encoder)
    expensive = cfg.validator.tiers[-1]
    decisions, decided_at = {}, {t.name: 0 for t in cfg.validator.tiers}
    texts = tokens_in = 0
    try:
        for h in hyps:
            vs = await cascade.validate(h)
            decisions[h.hypothesis_id] = vs[-1].decision
            decided_at[vs[-1].tier] += 1
            if vs[-1].tier == expensive.name:
                pos, neg = split_holdout(h, expensive.max_texts)
                texts += len(pos) + len(neg)
                tokens_in += sum(estimate_tokens(score_text_prompt(h.text, t.text)) for t in pos + neg)
    finally:
        await cascade.aclose()
    return Arm(name, decisions, texts, tokens_in, texts * output_tokens, decided_at)


def tiers_config(base: Config, tiers: list[dict]) -> Config:
    return base.model_copy(update={"validator": base.validator.model_copy(
        update={"tiers": [TierConfig(**t) for t in tiers]})})


@dataclass
class Sets:
    offline: list[Hypothesis]  # planted + null runs' contrastive hypotheses, as labelled
    terms: list[Hypothesis]  # the same, re-worded from the cluster's top terms
    twins: list[Hypothesis]  # the re-worded ones re-scored on a null run's texts


def reworded(h: Hypothesis, terms: list[str]) -> Hypothesis:
    keywords = terms[:KEYWORDS]
    text = describe(h.direction, other_role(h.direction), keywords, None)
    return h.model_copy(update={"hypothesis_id": h.hypothesis_id + "-terms", "text": text,
                                "keywords": keywords})


async def collect(args: argparse.Namespace) -> Sets:
    hashing = HashingEncoder(EmbedderConfig(backend="hashing"))
    offline: list[Hypothesis] = []
    terms: list[Hypothesis] = []
    null_texts: list[DecodedText] = []
    for null in (False, True):
        for seed in range(args.seeds):
            cfg = sim_config(seed=seed, null=null, max_texts=args.max_texts,
                             controller={"stop_when_stable": False},
                             hypothesizer={"labels_per_cluster": args.labels_per_cluster})
            r: HarnessResult = await arun_experiment(cfg, encoder=hashing, keep_texts=null and seed == 0)
            hyps = [h for h in r.hypotheses if h.kind == "contrastive"]
            offline += hyps
            terms += [reworded(h, r.cluster_terms[h.candidate_id]) for h in hyps]
            null_texts += r.decoded
    twins = null_twins(terms, null_texts, args.null_per_hypothesis, 60, random.Random(0))
    return Sets(offline, terms, twins)


def agreement(a: Arm, b: Arm, ids: list[str]) -> float:
    return sum(a.decisions[i] == b.decisions[i] for i in ids) / len(ids) if ids else float("nan")


def report(title: str, hyps: list[Hypothesis], cascade: Arm, only: Arm, llm: LLMConfig) -> float:
    ids = [h.hypothesis_id for h in hyps]
    print(f"{title}: {len(ids)} hypotheses")
    for arm in (cascade, only):
        validated = sum(arm.decisions[i] == "validated" for i in ids)
        print(f"  {arm.name:15s} expensive calls {arm.expensive_texts:6,}  tokens in {arm.input_tokens:9,} "
              f"out {arm.output_tokens:6,}  ${arm.usd(llm):.4f}  validated {validated}/{len(ids)}  "
              f"decided at {arm.decided_at}")
    print(f"  agreement of final decisions: {agreement(cascade, only, ids):.1%}")
    saved = only.expensive_texts / cascade.expensive_texts if cascade.expensive_texts else float("inf")
    print(f"  expensive calls saved: {saved:.2f}x" + (" (the cascade made no expensive call)"
                                                      if not cascade.expensive_texts else ""))
    return saved


async def compare(title: str, hyps: list[Hypothesis], encoder: Encoder, args: argparse.Namespace,
                  llm: LLMConfig) -> float:
    base = sim_config()
    expensive = {"name": f"expensive-{args.expensive}", "kind": args.expensive}
    cheap = {"name": "keyword", "kind": "keyword", "escalate_band": args.escalate_band}
    out = args.output_tokens
    cascade = await run_arm("cascade", tiers_config(base, [cheap, expensive]), encoder, hyps, out)
    only = await run_arm("expensive-only", tiers_config(base, [expensive]), encoder, hyps, out)
    return report(title, hyps, cascade, only, llm)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="planted runs and null runs each")
    ap.add_argument("--max-texts", type=int, default=8000, help="texts per run")
    ap.add_argument("--labels-per-cluster", type=int, default=2)
    ap.add_argument("--null-per-hypothesis", type=int, default=1)
    ap.add_argument("--expensive", choices=["embedding", "probe"], default="embedding")
    ap.add_argument("--escalate-band", type=float, default=0.0, help="extra undecided band of the cheap tier")
    ap.add_argument("--output-tokens", type=int, default=3, help="tokens per scoring answer (a number)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    sets = await collect(args)
    print(f"collected {len(sets.offline)} contrastive hypotheses from {args.seeds} planted + {args.seeds} "
          f"null runs of {args.max_texts:,} texts in {time.perf_counter() - t0:.0f}s")
    from services.embedder.encoder import load_encoder

    minilm = MemoEncoder(load_encoder(EmbedderConfig()))
    llm = LLMConfig()
    print(f"EXPENSIVE TIER STAND-IN: no API key, so the {args.expensive} tier with the real MiniLM plays the "
          f"LLM tier; calls = texts it scores; $ at {llm.model} prices (${llm.usd_per_1k_input}/1K in, "
          f"${llm.usd_per_1k_output}/1K out, {args.output_tokens} output tokens per call)")
    saved = await compare("offline labels (as shipped)", sets.offline, minilm, args, llm)
    await compare("cluster-terms labels", sets.terms, minilm, args, llm)
    await compare("null twins (cluster-terms labels on a null run's texts)", sets.twins, minilm, args, llm)
    print(f"expensive_calls_saved={saved:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
