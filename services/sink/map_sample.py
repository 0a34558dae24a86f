"""The map's sample: a uniform random sample of the embedded texts, kept across restarts.

One :class:`~services.clusterer.reservoir.Reservoir` (the clusterer's Algorithm R) holding
``(text id, role, vector)`` items under one key.  The slot is drawn before the vector is decoded,
so only kept texts pay for decoding; the item a new one evicts keeps the id index (which ignores
re-delivered texts already in the sample) up to date.

Saved as ``map_sample.parquet``: columns ``text_id``, ``role`` and ``vector`` (what the report
reads, :func:`services.sink.run_view.load_map_sample`) and, in the file's metadata, ``n_seen``,
``dim`` and the reservoir's state (JSON: counts, items and the generator), so a restarted sink
continues the same random stream instead of starting a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from services.clusterer.reservoir import Reservoir
from services.sink.run_view import load_map_sample
from services.sink.storage import write_table

MAP_SAMPLE_FILE = "map_sample.parquet"
STATE_KEY = "reservoir"  # the Parquet metadata key of the reservoir's state
KEY = 0  # the one key of the reservoir
VECTOR = 2  # the vector's place in an item


class VectorReservoir:
    """At most ``size`` embedded texts of one embedding model (one dimension), a uniform sample."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.dim: int | None = None
        self.sample = Reservoir(size, vector_field=VECTOR, seed=seed)
        self._index: dict[str, int] = {}  # text id -> slot
        self.dirty = False

    @property
    def n_seen(self) -> int:
        return self.sample.seen.get(KEY, 0)

    @property
    def ids(self) -> list[str]:
        return [it[0] for it in self.sample.get(KEY)]

    @property
    def roles(self) -> list[str]:
        return [it[1] for it in self.sample.get(KEY)]

    @property
    def vectors(self) -> list[np.ndarray]:
        return [it[VECTOR] for it in self.sample.get(KEY)]

    def offer(self, text_id: str, role: str, vector: np.ndarray | Callable[[], np.ndarray],
              dim: int | None = None) -> None:
        """Consider one text; ``vector`` may be a callable, decoded only when the text is kept."""
        if text_id in self._index or self.size <= 0:
            return
        if dim is None:
            vector = _materialise(vector)
            dim = int(vector.shape[0])
        if self.dim is None:
            self.dim = dim
        if dim != self.dim:
            return  # another embedding model: not comparable on one map
        self.dirty = True  # counted, so the state changed even when the text is not kept
        slot = self.sample.slot_for(KEY)
        if slot is None:
            return
        evicted = self.sample.put(KEY, slot, (text_id, role, _materialise(vector)))
        if evicted is not None:
            del self._index[evicted[0]]
        self._index[text_id] = slot

    def save(self, path: Path) -> None:
        dim = self.dim or 0
        state, arrays = self.sample.get_state()
        flat = np.asarray(arrays["vectors"], dtype=np.float32).reshape(-1)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), max(dim, 1))
        table = pa.table({"text_id": pa.array(self.ids, pa.string()),
                          "role": pa.array(self.roles, pa.string()), "vector": vec})
        table = table.replace_schema_metadata({"n_seen": str(self.n_seen), "dim": str(dim),
                                               STATE_KEY: orjson.dumps(state)})
        write_table(path, table)
        self.dirty = False

    @classmethod
    def load(cls, path: Path, size: int, seed: int = 0) -> VectorReservoir:
        res = cls(size, seed)
        if not path.exists():
            return res
        ids, roles, vectors, meta = load_map_sample(path)
        if STATE_KEY in meta:
            res.sample = Reservoir.from_state(orjson.loads(meta[STATE_KEY]), {"vectors": vectors}, size=size)
        else:  # saved before the state was: the same sample and count, a fresh generator
            res.sample.replace(KEY, list(zip(ids, roles, vectors, strict=True)),
                               seen=int(meta.get("n_seen", len(ids))))
        res.dim = vectors.shape[1] if len(ids) else None
        res._index = {it[0]: slot for slot, it in enumerate(res.sample.get(KEY))}
        return res


def _materialise(vector: np.ndarray | Callable[[], np.ndarray]) -> np.ndarray:
    return np.asarray(vector() if callable(vector) else vector, dtype=np.float32)
