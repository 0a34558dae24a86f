"""The text store: every text a model generated in an experiment, by id, as the generator recorded it.

Why.  A hypothesis carries its held-out texts (``TextRef``: id, role, prompt, text) so that a
validator can score them; but anyone who can write to the bus can put words into those texts, or
flip their roles, and a validator that scores what the message says validates the forgery.  The
generator is the one service every text passes *before* it exists anywhere else: it records each
text here (one pipelined ``HSET`` per backend call, before the texts are emitted), so the store
holds only what a model actually wrote, and a validator looks every held-out id up here and judges
the store's text and role, never the message's.  The embedder, which also sees every text, reads
them from the bus, where a forged ``DecodedText`` looks like any other: recording there would
vouch for whatever the bus carried.

Layout.  One Redis hash per experiment, ``<namespace>:texts:<experiment id>``, field = text id,
value = JSON ``[role, prompt_id, pair_id, text]``.  It is per-experiment state (``STATE_KINDS``):
every write refreshes ``cache.state_ttl_s``, ``autointerv clean`` deletes it.  A re-delivered
generation request rewrites the same fields (same ids; the same texts for seeded backends), so
recording is idempotent.  Redis errors propagate: the generator's batch is rewound and retried
like every other stateful write (services/core/faults.py), and nothing is emitted before its text
is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from services.core.config import Config
from services.core.events import TextRef
from services.core.state import expire_in_pipeline

KIND = "texts"  # the key kind, listed in services.core.state.STATE_KINDS
FETCH_CHUNK = 1000  # ids per HMGET: bounds one reply's size


def text_store_key(namespace: str, experiment_id: str) -> str:
    return f"{namespace}:{KIND}:{experiment_id}"


def encode(ref: TextRef) -> bytes:
    return orjson.dumps([ref.role, ref.prompt_id, ref.pair_id, ref.text])


def decode(text_id: str, raw: bytes) -> TextRef | None:
    """The stored text, or None for a value this module did not write (never trusted half-read)."""
    try:
        role, prompt_id, pair_id, text = orjson.loads(raw)
        return TextRef(text_id=text_id, role=role, prompt_id=prompt_id, pair_id=pair_id, text=text)
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None


class TextStore:
    """One experiment's texts in Redis: ``record`` (the generator) and ``fetch`` (validators)."""

    def __init__(self, redis: Any, cfg: Config, experiment_id: str) -> None:
        self.redis = redis
        self.cfg = cfg
        self.key = text_store_key(cfg.cache.namespace, experiment_id)

    async def record(self, refs: Iterable[TextRef]) -> int:
        """Record texts (one round trip: HSET of all fields plus the TTL refresh); returns how many."""
        mapping = {r.text_id: encode(r) for r in refs}
        if not mapping:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.key, mapping=mapping)
        expire_in_pipeline(pipe, self.cfg, self.key)
        await pipe.execute()
        return len(mapping)

    async def fetch(self, text_ids: Sequence[str]) -> dict[str, TextRef]:
        """The stored texts among ``text_ids`` (ids never recorded are absent), HMGET in chunks."""
        ids = list(dict.fromkeys(text_ids))
        out: dict[str, TextRef] = {}
        for i in range(0, len(ids), FETCH_CHUNK):
            chunk = ids[i:i + FETCH_CHUNK]
            for tid, raw in zip(chunk, await self.redis.hmget(self.key, chunk), strict=True):
                ref = decode(tid, raw) if raw is not None else None
                if ref is not None:
                    out[tid] = ref
        return out
