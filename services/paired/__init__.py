"""Paired contrasts: how the intervention answers the *same* prompts differently (style, form, stance).

Pure library code (no broker): pairs and their split (``pairs``), the feature bank (``features``),
proposers (``proposers``, ``direction``, ``llm``), scorers rebuilt from JSON specs (``scorers``), the
decision for one hypothesis (``decision``), pair identity accuracy (``identity``) and the offline
driver (``discover``).  The paired statistics live in ``services.stats.paired``.
"""

from services.paired.decision import PairedDecision, decide_paired
from services.paired.discover import PairedRun, discover_paired, discover_paired_async
from services.paired.hypotheses import PairedFinding, PairedHypothesis
from services.paired.pairs import Pair, is_label_pair, pairs_from_embedded, pairs_from_replay, split_pairs, swap_null
from services.paired.scorers import PairScores, make_scorer

__all__ = [
    "Pair",
    "PairScores",
    "PairedDecision",
    "PairedFinding",
    "PairedHypothesis",
    "PairedRun",
    "decide_paired",
    "discover_paired",
    "discover_paired_async",
    "is_label_pair",
    "make_scorer",
    "pairs_from_embedded",
    "pairs_from_replay",
    "split_pairs",
    "swap_null",
]
