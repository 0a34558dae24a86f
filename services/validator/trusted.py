"""The held-out texts a validator may judge a hypothesis on: the message names them, the store says them.

A hypothesis message lists its held-out texts (``holdout_texts``), but a message is only a claim:
whoever can write to the bus can invent texts, flip roles, or slip in texts the labeler saw.  So
every validation path (the cascade tiers here, the paired tier) calls :func:`trusted_holdout` and
scores only what it returns:

* each id is looked up in the generator's text store (services/core/text_store.py); the store's
  text, role, prompt and pair id replace the message's, which are never read;
* an id the store does not know (never generated in this experiment) is dropped;
* an id in the hypothesis' own ``label_text_ids`` (what its labeler saw) is dropped;
* an id on the label side of the split is dropped: the split is recomputed from the id with the
  rule the producer used, ``is_label_split(text_id, clusterer.label_fraction)`` for cluster
  hypotheses and ``is_label_pair(stored pair_id, paired.label_fraction)`` for paired ones (a
  paired text without a stored pair id is not part of any pair and is dropped too);
* an id named twice counts once.

What was dropped is counted (:meth:`TrustedHoldout.notes`, copied into the validation's
``effect``): ``dropped_untrusted`` in all, and per reason.  With too few texts left per side the
validator rejects the hypothesis (``too_few_texts``) without scoring anything.

What it does not prove: that the texts are the ones the producer chose (a bus writer could name
real held-out texts picked to fit a claim).  That would need the producer's selection recorded
too; see docs/operations.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.clusterer.arrivals import is_label_split
from services.core.config import Config
from services.core.events import Hypothesis, TextRef
from services.core.text_store import TextStore
from services.paired.pairs import is_label_pair


@dataclass
class TrustedHoldout:
    """The stored texts a hypothesis may be judged on, in the message's order, and what was dropped."""

    texts: list[TextRef] = field(default_factory=list)
    unknown: int = 0  # ids the text store never recorded
    label_ids: int = 0  # ids in the hypothesis' label_text_ids
    label_split: int = 0  # ids (or pairs) on the label side of the split
    duplicates: int = 0  # ids named more than once
    altered: int = 0  # kept ids whose text or role in the message differ from the store's (not used)

    @property
    def dropped(self) -> int:
        return self.unknown + self.label_ids + self.label_split + self.duplicates

    def notes(self) -> dict[str, float]:
        return {"dropped_untrusted": float(self.dropped), "dropped_unknown_id": float(self.unknown),
                "dropped_label_id": float(self.label_ids), "dropped_label_split": float(self.label_split),
                "dropped_duplicate_id": float(self.duplicates), "altered_in_message": float(self.altered)}


def on_label_side(ref: TextRef, h: Hypothesis, cfg: Config) -> bool:
    """The stored text ``ref`` belongs to the label side of its producer's split (or to no pair,
    for a paired hypothesis)."""
    if h.kind == "paired":
        return not ref.pair_id or is_label_pair(ref.pair_id, cfg.paired.label_fraction)
    return is_label_split(ref.text_id, cfg.clusterer.label_fraction)


async def trusted_holdout(h: Hypothesis, store: TextStore, cfg: Config) -> TrustedHoldout:
    """The hypothesis' held-out texts as the store has them, untrusted ones dropped and counted."""
    out = TrustedHoldout()
    stored = await store.fetch([t.text_id for t in h.holdout_texts])
    label = set(h.label_text_ids)
    seen: set[str] = set()
    for claimed in h.holdout_texts:
        tid = claimed.text_id
        if tid in seen:
            out.duplicates += 1
            continue
        seen.add(tid)
        ref = stored.get(tid)
        if ref is None:
            out.unknown += 1
        elif tid in label:
            out.label_ids += 1
        elif on_label_side(ref, h, cfg):
            out.label_split += 1
        else:
            out.altered += int((bool(claimed.text) and claimed.text != ref.text) or claimed.role != ref.role)
            out.texts.append(ref)
    return out
