"""Cascade vs expensive tier alone, on hypotheses whose truth is known: calls saved and agreement.

The hypothesis set (services/hypothesis_sets.py; no pipeline, sim texts from the sim backend) mixes
true and false hypotheses in stated proportions, per replica:

* true (12): each behaviour cluster's offline label (4) and two paraphrases of it in an LLM
  labeler's words, with no quoted keywords (8);
* false (24): labels swapped between behaviour clusters (12), near misses ("dogs and puppies" on
  the cats cluster, "Mars rovers" on the Moon cluster: 8), and each behaviour cluster's label on its
  pair-swapped held-out texts (2) and on null twins from a run of identical models (2).

Two arms through the validator service's own tiers and ``decide`` (LORD++ per tier):

* cascade: the keyword tier (free; it scores the hypothesis' own words) -> the expensive tier for
  the escalated hypotheses only;
* expensive-only: the expensive tier decides everything.

Both arms run the expensive tier's LORD++ at the same level (alpha / 2: the cascade's per-tier
level; the expensive-only arm gets validator.alpha = alpha / 2).  Against the expensive tier's own
decisions, the output gives the cascade's agreement on the true and on the false hypotheses
separately, and the expensive calls saved (texts the expensive tier scores; one LLM call each in a
real run).  Both arms are also scored against the truth by construction.

The expensive tier: an LLM tier (``--llm-provider``, needs its API key), or without a key a STAND-IN
that differs from the keyword tier in cost and judgement: the embedding tier on the bundled
all-MiniLM-L6-v2 (a transformer forward pass per text; it judges by meaning, not by words).  The
output names which one ran and the measured seconds per call of each tier.

    .venv/bin/python bench/cascade.py [--replicas 10] [--llm-provider openai --llm-model gpt-4o-mini]

Last line: ``expensive_calls_saved=<expensive-only calls / cascade calls>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.bus import Topics
from services.core.config import Config, EmbedderConfig, LLMConfig, load_config
from services.core.decision import decides
from services.core.metrics import Metrics
from services.core.runtime import ServiceContext
from services.hypothesis_sets import Labelled, MemoEncoder, build_set
from services.llm.factory import make_budget, make_llm_client
from services.validator.service import ValidatorService, build_tier
from services.validator.tiers import Tier, split_holdout

FALSE_PER_REPLICA = {"swapped": 12, "near_miss": 8, "pair_swapped": 2, "null_twin": 2}


@dataclass
class Arm:
    name: str
    decisions: dict[str, str] = field(default_factory=dict)  # hypothesis id -> final decision
    expensive_calls: int = 0  # texts scored by the expensive tier
    decided_at: Counter[str] = field(default_factory=Counter)  # tier -> hypotheses it decided
    seconds: Counter[str] = field(default_factory=Counter)  # tier -> scoring time


def pick(items: list[Labelled], replicas: int) -> list[Labelled]:
    """The stated mix: every true hypothesis; false ones per replica as in FALSE_PER_REPLICA
    (pair-swapped and null twins of the behaviour clusters, not of topic clusters)."""
    out = [x for x in items if x.truth]
    for r in range(replicas):
        mine = [x for x in items if x.replica == r and not x.truth and not x.cluster.startswith("topic:")]
        for source, n in FALSE_PER_REPLICA.items():
            chosen = [x for x in mine if x.source == source][:n]
            assert len(chosen) == n, (source, len(chosen))
            out += chosen
    return out


def config(alpha: float, tiers: list[dict]) -> Config:
    return load_config(None, environ={}, overrides={"experiment": {"budget_usd": 5.0},
                                                    "validator": {"alpha": alpha, "tiers": tiers}})


async def run_arm(name: str, cfg: Config, tiers: list[Tier], items: list[Labelled]) -> Arm:
    """Each hypothesis through the tiers in order, as the services chain them (one LORD++ per tier)."""
    ctx = ServiceContext(cfg, "in-process:0", "redis://in-process:0", Metrics(), Topics("bench"))
    services = [ValidatorService(ctx, i) for i in range(len(tiers))]
    lords = [s.new_lord() for s in services]
    arm = Arm(name)
    expensive = cfg.validator.tiers[-1].name
    try:
        for x in items:
            h = x.hypothesis
            for svc, tier, lord in zip(services, tiers, lords, strict=True):
                pos, neg = split_holdout(h, svc.tier_cfg.max_texts)
                t0 = time.perf_counter()
                scores = await tier.score(h, pos, neg)
                arm.seconds[svc.tier_cfg.name] += time.perf_counter() - t0
                if svc.tier_cfg.name == expensive:
                    arm.expensive_calls += len(pos) + len(neg)
                v = svc.decide(h, scores, lord)
                if decides(v):
                    arm.decisions[h.hypothesis_id] = v.decision
                    arm.decided_at[v.tier] += 1
                    break
    finally:
        for s in services:
            await s.producer.stop()
    return arm


def share(ids: list[str], pred) -> str:
    k = sum(1 for i in ids if pred(i))
    return f"{k}/{len(ids)} ({k / len(ids):.1%})" if ids else "-"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=10)
    # 45: the smallest behaviour cluster (moon) gets ~60 held-out texts a side, the tiers' max_texts;
    # at 20 (~20 a side) an all-tied keyword score cannot rule out AUC 0.6 and escalates
    ap.add_argument("--samples-per-prompt", type=int, default=45)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--llm-provider", choices=["openai", "anthropic", "gemini"], default=None)
    ap.add_argument("--llm-model", default="gpt-4o-mini")
    args = ap.parse_args()

    t0 = time.perf_counter()
    hs = await build_set(args.replicas, args.samples_per_prompt)
    items = pick(hs.items, args.replicas)
    n_true = sum(x.truth for x in items)
    mix = Counter(x.source for x in items)
    print(f"{len(items)} hypotheses from {args.replicas} replicas ({time.perf_counter() - t0:.0f}s): "
          f"{n_true} true ({mix['true']} offline labels, {mix['paraphrase']} paraphrases), "
          f"{len(items) - n_true} false ({', '.join(f'{mix[s]} {s}' for s in FALSE_PER_REPLICA)})")

    llm = LLMConfig(provider=args.llm_provider, model=args.llm_model) if args.llm_provider else None
    if llm is not None and not os.environ.get(llm.api_key_env or f"{llm.provider.upper()}_API_KEY"):
        sys.exit(f"--llm-provider {llm.provider}: no API key in the environment")
    expensive = ({"name": "llm", "kind": "llm", "llm": llm.model_dump()} if llm
                 else {"name": "embedding-minilm", "kind": "embedding"})
    what = (f"LLM tier {llm.provider}:{llm.model}" if llm else
            "STAND-IN (no API key): the embedding tier on the bundled all-MiniLM-L6-v2, which judges "
            "by meaning (a transformer pass per text), where the keyword tier matches words")
    print(f"expensive tier: {what}")
    from services.embedder.encoder import load_encoder

    minilm = MemoEncoder(load_encoder(EmbedderConfig()))

    async def given() -> MemoEncoder:
        return minilm

    budget = make_budget(5.0)

    async def tiers_for(cfg: Config) -> list[Tier]:
        return [await build_tier(cfg, c, encoder=given, cache=lambda: None,
                                 llm_client=lambda c: make_llm_client(c, budget=budget))
                for c in cfg.validator.tiers]

    cheap = {"name": "keyword", "kind": "keyword"}
    cascade_cfg = config(args.alpha, [cheap, expensive])
    only_cfg = config(args.alpha / 2, [expensive])  # the expensive tier at the cascade's per-tier level
    only = await run_arm("expensive-only", only_cfg, await tiers_for(only_cfg), items)
    if not llm:  # the memo (the embedding cache's stand-in) encodes each distinct text once
        per_text_s = only.seconds[expensive["name"]] / max(minilm.encoded, 1)
        print(f"  MiniLM: {minilm.encoded:,} distinct texts encoded, {per_text_s * 1000:.2f} ms per text")
    cascade = await run_arm("cascade", cascade_cfg, await tiers_for(cascade_cfg), items)
    kw_calls = sum(len(p) + len(n) for p, n in (split_holdout(x.hypothesis, 60) for x in items))
    print(f"  keyword tier: {cascade.seconds['keyword'] / kw_calls * 1000:.3f} ms per text scored")

    truth = {x.hypothesis.hypothesis_id: x for x in items}
    ids_true = [i for i, x in truth.items() if x.truth]
    ids_false = [i for i, x in truth.items() if not x.truth]
    for arm in (only, cascade):
        print(f"{arm.name:15s} expensive calls {arm.expensive_calls:7,}  decided at {dict(arm.decided_at)}  "
              f"true validated {share(ids_true, lambda i, a=arm: a.decisions[i] == 'validated')}  "
              f"false rejected {share(ids_false, lambda i, a=arm: a.decisions[i] != 'validated')}")
    agree = lambda i: cascade.decisions[i] == only.decisions[i]  # noqa: E731
    print(f"agreement with the expensive tier: true hypotheses {share(ids_true, agree)}, "
          f"false hypotheses {share(ids_false, agree)}")
    by_source = Counter(truth[i].source for i in truth if not agree(i))
    print(f"  disagreements by source: {dict(by_source) or 'none'}")
    wrong_only = Counter(truth[i].source for i in truth
                         if (only.decisions[i] == "validated") != truth[i].truth)
    wrong_cascade = Counter(truth[i].source for i in truth
                            if (cascade.decisions[i] == "validated") != truth[i].truth)
    print(f"  wrong by construction: expensive-only {dict(wrong_only) or 'none'}; "
          f"cascade {dict(wrong_cascade) or 'none'}")
    saved = only.expensive_calls / cascade.expensive_calls if cascade.expensive_calls else float("inf")
    print(f"expensive_calls_saved={saved:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
