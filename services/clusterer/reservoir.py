"""Uniform samples of a stream, one per key (Vitter's Algorithm R), offered in bulk and saved whole.

The clusterer keeps four kinds (label and held-out texts per cluster and role; member vectors per
cluster; label and held-out texts per role from everywhere), the sink one (the map's vectors).
Each is a :class:`Reservoir`; its state round trip is JSON plus one array for a vector field.

Randomness: a caller that must replay exactly (the clusterer draws three numbers per text from
one saved generator, in stream order) passes the uniforms in; otherwise the reservoir owns a
seeded generator and saves its state with the sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Reservoir", "generator_from_state", "generator_state", "reservoir_slots"]


def generator_state(rng: np.random.Generator) -> dict[str, Any]:
    """A PCG64 generator's state as JSON (its 128-bit integers as strings)."""
    st = rng.bit_generator.state
    return {"state": str(st["state"]["state"]), "inc": str(st["state"]["inc"]),
            "has_uint32": st["has_uint32"], "uinteger": st["uinteger"]}


def generator_from_state(saved: dict[str, Any]) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = {"bit_generator": "PCG64", "has_uint32": saved["has_uint32"],
                               "uinteger": saved["uinteger"],
                               "state": {"state": int(saved["state"]), "inc": int(saved["inc"])}}
    return rng


def reservoir_slots(keys: np.ndarray, u: np.ndarray, seen: dict[int, int],
                    size: int) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm R for many keyed reservoirs at once: (row indices kept, slot of each), in order.

    Row i is the c-th item of its key (c counted over the whole stream); it fills slot c-1 while
    c <= size, else replaces slot floor(u_i * c) when that is < size.  ``seen`` is updated.
    Vectorised because a per-row Python loop would cost more than the clustering itself.
    """
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    uniq, counts = ordered[starts], np.diff(np.append(starts, len(keys)))
    base = np.fromiter((seen.get(k, 0) for k in uniq.tolist()), dtype=np.int64, count=len(uniq))
    c_sorted = np.arange(len(keys)) - np.repeat(starts, counts) + 1 + np.repeat(base, counts)
    c = np.empty_like(c_sorted)
    c[order] = c_sorted
    for k, b, n in zip(uniq.tolist(), base.tolist(), counts.tolist(), strict=True):
        seen[k] = b + n
    slot = np.where(c <= size, c - 1, np.floor(u * c).astype(np.int64))
    keep = np.flatnonzero(slot < size)
    return keep, slot[keep]


def _same_item(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b, strict=True))


class Reservoir:
    """At most ``size`` items per integer key, each a uniform sample of the items offered under it.

    Items are tuples of JSON values; at most one field (``vector_field``) may hold a numpy vector,
    which the state round trip stacks into one array instead of JSON.

    >>> r = Reservoir(2, seed=0)
    >>> for word in ["a", "b", "c", "d"]:
    ...     _ = r.offer_one((word,))
    >>> len(r.get(0)), r.seen[0]
    (2, 4)
    >>> Reservoir.from_state(*r.get_state()) == r
    True
    """

    def __init__(self, size: int, vector_field: int | None = None, seed: int | None = None) -> None:
        if size < 0:
            raise ValueError(f"a reservoir's size must be >= 0, got {size}")
        self.size = size
        self.vector_field = vector_field
        self.seen: dict[int, int] = {}  # key -> items offered so far
        self.items: dict[int, list[tuple[Any, ...]]] = {}
        self._rng = np.random.default_rng(seed) if seed is not None else None

    # ------------------------------------------------------------------ offering
    def offer(self, keys: np.ndarray, u: np.ndarray,
              item: Sequence[tuple[Any, ...]] | Callable[[int], tuple[Any, ...]]) -> np.ndarray:
        """Offer rows under ``keys`` with one uniform each; ``item(i)`` (or ``item[i]``) builds row
        i's item, called only for the rows kept.  Returns the kept row indices."""
        keys = np.asarray(keys, dtype=np.int64)
        keep, slots = reservoir_slots(keys, np.asarray(u, dtype=float), self.seen, self.size)
        make = item if callable(item) else item.__getitem__
        store = self.items
        for i, k, s in zip(keep.tolist(), keys[keep].tolist(), slots.tolist(), strict=True):
            items = store.get(k)
            if items is None:
                items = store[k] = []
            if s == len(items):
                items.append(make(i))
            else:
                items[s] = make(i)
        return keep

    def slot_for(self, key: int = 0, u: float | None = None) -> int | None:
        """Count one offered item; the slot it takes, or None when it is not kept (then nothing
        else happens).  A caller that builds items lazily asks first, then :meth:`put` s."""
        if u is None:
            if self._rng is None:
                raise ValueError("this reservoir has no generator of its own: pass u")
            u = float(self._rng.random())
        c = self.seen.get(key, 0) + 1
        self.seen[key] = c
        slot = c - 1 if c <= self.size else int(u * c)
        return slot if slot < self.size else None

    def put(self, key: int, slot: int, item: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Store ``item`` in ``slot`` (the next free one or a taken one); the item it replaced."""
        items = self.items.setdefault(key, [])
        if slot == len(items):
            items.append(item)
            return None
        old, items[slot] = items[slot], item
        return old

    def offer_one(self, item: tuple[Any, ...], key: int = 0, u: float | None = None) -> bool:
        """Offer one item; True when it was kept."""
        slot = self.slot_for(key, u)
        if slot is None:
            return False
        self.put(key, slot, item)
        return True

    # ------------------------------------------------------------------ reading and editing
    def get(self, key: int) -> list[tuple[Any, ...]]:
        return self.items.get(key, [])

    def replace(self, key: int, items: list[tuple[Any, ...]], seen: int | None = None) -> None:
        """Start ``key`` afresh with these items (a cluster's children after a split)."""
        self.items[key] = list(items[: self.size])
        self.seen[key] = len(items) if seen is None else seen

    def drop(self, key: int) -> None:
        self.items.pop(key, None)
        self.seen.pop(key, None)

    def vectors(self, key: int, dtype: type = np.float32) -> np.ndarray:
        """The vector field of one key's items, stacked."""
        assert self.vector_field is not None, "this reservoir holds no vectors"
        rows = [it[self.vector_field] for it in self.get(key)]
        return np.stack(rows).astype(dtype) if rows else np.zeros((0, 0), dtype)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reservoir):
            return NotImplemented
        same = (self.size, self.vector_field, self.seen, self.items.keys()) == (
            other.size, other.vector_field, other.seen, other.items.keys())
        return same and all(len(self.items[k]) == len(other.items[k]) and all(
            _same_item(a, b) for a, b in zip(self.items[k], other.items[k], strict=True)) for k in self.items)

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ state round trip
    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able meta, arrays): items in JSON with the vector field stacked into ``vectors``."""
        vf = self.vector_field
        keys = sorted(self.items)  # sorted: equal samples give equal states, however they were built
        meta: dict[str, Any] = {
            "size": self.size, "vector_field": vf, "seen": sorted([k, n] for k, n in self.seen.items()),
            "keys": keys,
            "items": [[list(it) if vf is None else [None if j == vf else v for j, v in enumerate(it)]
                       for it in self.items[k]] for k in keys],
            "rng": generator_state(self._rng) if self._rng is not None else None,
        }
        arrays: dict[str, np.ndarray] = {}
        if vf is not None:
            rows = [it[vf] for k in keys for it in self.items[k]]
            arrays["vectors"] = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
                   size: int | None = None) -> Reservoir:
        """Rebuild a saved reservoir; a smaller ``size`` keeps each key's first items."""
        vf = meta["vector_field"]
        res = cls(meta["size"] if size is None else size, vf)
        if meta.get("rng") is not None:
            res._rng = generator_from_state(meta["rng"])
        res.seen = {int(k): int(n) for k, n in meta["seen"]}
        vectors = (arrays or {}).get("vectors")
        row = 0
        for key, items in zip(meta["keys"], meta["items"], strict=True):
            kept = []
            for it in items:
                if vf is not None:
                    it = [vectors[row] if j == vf else v for j, v in enumerate(it)]  # type: ignore[index]
                    row += 1
                kept.append(tuple(it))
            res.items[int(key)] = kept[: res.size]
        return res
