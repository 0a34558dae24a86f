"""Generative validation tier: do the two models' own likelihoods agree with the hypothesis?

What it validates.  The other tiers ask whether the hypothesis tells the *sampled* texts of the
two sides apart.  This tier asks the models themselves: an LLM writes ``generative_texts`` short
texts typical of the side the hypothesis describes ("model 1", showing the pattern) and as many
typical of the other side ("model 2", lacking it); both local models compute each text's
log-likelihood, and a text's score is the per-token log-likelihood ratio

    score = logp_intervention / n_intervention - logp_base / n_base

(the token counts are each model's own, so they coincide for a fine-tune of the base model), with
the sign flipped when the described side is the base model.  Positives are the side-1 texts,
negatives the side-2 texts, and the service's AUC test asks whether "the described model finds
this text relatively more likely" separates them.  A validated hypothesis therefore predicts the
models' distributions on texts neither model wrote, beyond the cluster it was read from.

Limits.
- Both models must run locally with logits (``backend: transformers``); the validator loads its
  own copies, so a GPU deployment needs memory for two more models.
- The texts are the LLM's idea of "typical", not samples of either model: a pattern the LLM
  cannot put into text (length, formatting, refusals it will not write) tests little, and side-2
  texts may differ from side-1 texts in more than the pattern (topic, register), which the
  likelihood ratio picks up too.  Per-token normalisation removes length, not topic.
- The texts are scored unconditionally (after the start token), not as answers to the pipeline's
  prompts; for chat-tuned models such likelihoods can be a weak proxy.
- All texts of a side come from one answer, so they are not independent draws and the AUC's
  p-value is optimistic: use the tier late in a cascade, as corroboration.
- At temperature 0 with the response cache, re-validating the same hypothesis text reuses the
  same texts (reproducible and free, but not a fresh sample).
Parse failures and LLM errors are counted (``dropped``, ``generation_failures``), never replaced by
placeholder texts; the held-out texts are not used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

from services.core.config import (
    Config,
    ConfigError,
    GenerativeTierConfig,
    LLMConfig,
    ModelsConfig,
    TransformersModelConfig,
)
from services.core.events import Hypothesis, TextRef
from services.generator.backends.transformers_backend import TransformersBackend
from services.llm.budget import Spend
from services.llm.client import LLMClient
from services.llm.errors import LLMError
from services.llm.parsing import parse_json_array
from services.llm.prompts import generative_prompt
from services.validator.tiers import Tier, TierDeps, TierScores

log = logging.getLogger("autointerv.validator.generative")

TOKENS_PER_TEXT = 80  # output budget per requested text: up to three sentences plus JSON quoting
MAX_TEXT_CHARS = 1000  # longer generated texts are clipped before scoring: bounds context and compute
ROLES = ("base", "intervention")


def require_local_models(models: ModelsConfig, tier_name: str) -> None:
    """Fail at start-up unless both models can be scored locally; the message names the field."""
    bad = [f"models.{role}.backend is {getattr(models, role).backend!r}" for role in ROLES
           if getattr(models, role).backend != "transformers"]
    if bad:
        raise ConfigError(f"validator tier {tier_name!r} (kind 'generative') scores texts with both local "
                          f"models, so they must use backend 'transformers': {'; '.join(bad)}")


@dataclass
class _Side:
    """The usable texts the LLM wrote for one side (what getting them cost is in the tier's ``Spend``)."""

    texts: list[str]
    dropped: int = 0
    failed: bool = False


def clean_texts(texts: list[str], n: int) -> list[str]:
    """Stripped, clipped, non-empty, first occurrence only, at most ``n``: each text counts once."""
    out: list[str] = []
    for t in texts:
        t = t.strip()[:MAX_TEXT_CHARS]
        if t and t not in out:
            out.append(t)
    return out[:n]


class GenerativeTier(Tier):
    """Scores LLM-written texts by the intervention/base per-token likelihood ratio."""

    reads_holdout: ClassVar[bool] = False
    config_model = GenerativeTierConfig

    def __init__(self, cfg: GenerativeTierConfig, client: LLMClient, base: TransformersBackend,
                 intervention: TransformersBackend) -> None:
        super().__init__(cfg)
        self.client = client
        self.base = base
        self.intervention = intervention

    @classmethod
    async def build(cls, cfg: Config, tier_cfg: GenerativeTierConfig, deps: TierDeps) -> Tier:
        return await build_generative_tier(cfg, tier_cfg, deps.llm_client)

    @property
    def n_texts(self) -> int:
        return self.cfg.generative_texts

    async def load(self) -> None:
        """Load both models now, so a bad model path fails at start-up, not at the first hypothesis."""
        await asyncio.to_thread(self.base.load)
        await asyncio.to_thread(self.intervention.load)

    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores:
        spend = Spend()  # both sides' requests, re-asks and failures included
        side1, side2 = await asyncio.gather(self._generate(h, 1, spend), self._generate(h, 2, spend))
        ratios = await asyncio.to_thread(self.log_ratios, side1.texts + side2.texts)
        sign = 1.0 if h.direction == "intervention" else -1.0
        scored = [None if r is None else sign * r for r in ratios]
        p, q = scored[: len(side1.texts)], scored[len(side1.texts):]
        out = TierScores([s for s in p if s is not None], [s for s in q if s is not None])
        out.calls, out.cost_usd = spend.calls, spend.cost_usd
        out.dropped = side1.dropped + side2.dropped + sum(1 for s in scored if s is None)
        out.notes = {"generated_pos": float(len(side1.texts)), "generated_neg": float(len(side2.texts)),
                     "generation_failures": float(side1.failed + side2.failed),
                     "budget_refused": float(spend.refused)}
        return out

    async def _generate(self, h: Hypothesis, side: Literal[1, 2], spend: Spend) -> _Side:
        n = self.n_texts
        max_tokens = max(self.client.cfg.max_output_tokens, n * TOKENS_PER_TEXT)
        try:
            texts = await self.client.complete_parsed(
                generative_prompt(h.text, side, n), parse_json_array, max_output_tokens=max_tokens,
                purpose=f"validate:{self.cfg.name}:side{side}", spend=spend)
        except LLMError as exc:
            log.warning("generative tier %s: no texts for side %d of hypothesis %s (%s)", self.cfg.name, side,
                        h.hypothesis_id, type(exc).__name__)
            return _Side([], dropped=n, failed=True)
        kept = clean_texts(texts, n)
        return _Side(kept, dropped=n - len(kept))

    def log_ratios(self, texts: list[str]) -> list[float | None]:
        """Per-token log-likelihood ratio, intervention over base; None for a text with no tokens.

        Blocking (runs both models); the service calls it in a worker thread."""
        if not texts:
            return []
        per_model = []
        for backend in (self.intervention, self.base):
            counts = [len(ids) for ids in backend.tokenizer(texts, add_special_tokens=False)["input_ids"]]
            per_model.append((backend.sequence_logprobs(texts), counts))
        (lp_i, n_i), (lp_b, n_b) = per_model
        return [None if min(ni, nb) == 0 else li / ni - lb / nb
                for li, ni, lb, nb in zip(lp_i, n_i, lp_b, n_b, strict=True)]

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.base.aclose()
        await self.intervention.aclose()


async def build_generative_tier(cfg: Config, tier_cfg: GenerativeTierConfig,
                                make_client: Callable[[LLMConfig], LLMClient]) -> GenerativeTier:
    """Check the models' backends, build both backends and the LLM client, load the models."""
    require_local_models(cfg.models, tier_cfg.name)
    assert isinstance(cfg.models.base, TransformersModelConfig)  # require_local_models checked both
    assert isinstance(cfg.models.intervention, TransformersModelConfig)
    base = TransformersBackend(cfg.models.base, cfg.generator, "base")
    intervention = TransformersBackend(cfg.models.intervention, cfg.generator, "intervention")
    tier = GenerativeTier(tier_cfg, make_client(tier_cfg.llm), base, intervention)
    try:
        await tier.load()
    except BaseException:
        await tier.aclose()
        raise
    return tier
