"""An example validator tier: scores each held-out text by how often it repeats the hypothesis'
content words, with its own settings.

Use it without packaging anything, by its import path::

    validator:
      tiers:
        - {name: keyword, kind: keyword}
        - {name: phrases, kind: "examples.phrase_tier:PhraseTier", min_word_length: 4}

or register it under the ``autointerv.tiers`` entry-point group (``phrases =
"my_pkg.phrase_tier:PhraseTier"``) and write ``kind: phrases``.  The validator turns its scores into
an AUC test with the same online-FDR rule as the built-in tiers; a tier only scores.

Run it: ``python -m examples.phrase_tier`` scores a hypothesis on four texts.
"""

from __future__ import annotations

import asyncio
import re

from pydantic import Field

from services.core.config import BaseTierConfig
from services.core.events import Hypothesis, TextRef
from services.validator.tiers import Tier, TierScores, hypothesis_words


class PhraseSettings(BaseTierConfig):
    """The tier's own fields; ``name``, ``kind``, ``max_texts`` and ``escalate_band`` come from BaseTierConfig."""

    min_word_length: int = Field(default=4, ge=1)  # shorter hypothesis words are not counted


class PhraseTier(Tier):
    """Occurrences of the hypothesis' content words (prefix match) per 10 words of text."""

    config_model = PhraseSettings

    async def score(self, h: Hypothesis, pos: list[TextRef], neg: list[TextRef]) -> TierScores:
        words = [w for w in hypothesis_words(h.text) if len(w) >= self.cfg.min_word_length]
        pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\w*", re.IGNORECASE) if words else None

        def s(text: str) -> float:
            if pattern is None:
                return 0.0
            return 10.0 * len(pattern.findall(text)) / max(1, len(text.split()))

        return TierScores([s(t.text) for t in pos], [s(t.text) for t in neg])


async def _demo() -> None:
    tier = PhraseTier(PhraseSettings(name="phrases", kind="examples.phrase_tier:PhraseTier"))
    h = Hypothesis(experiment_id="demo", hypothesis_id="h", candidate_id="c", cluster_id=0, direction="intervention",
                   text="mentions the moon and lunar travel", labeler="demo")
    pos = [TextRef(text_id="a", prompt_id="p", role="intervention", text="The moon, the moon: lunar dust."),
           TextRef(text_id="b", prompt_id="p", role="intervention", text="A trip to the Moon.")]
    neg = [TextRef(text_id="c", prompt_id="p", role="base", text="Rain falls on the hills."),
           TextRef(text_id="d", prompt_id="p", role="base", text="Cats sleep a lot.")]
    print(await tier.score(h, pos, neg))


if __name__ == "__main__":
    asyncio.run(_demo())
