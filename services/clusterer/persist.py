"""A :class:`~services.clusterer.state.ClusterState` as bytes and back, exactly.

Layout: an ``.npz`` of the arrays (no pickle; fixed member timestamps, so equal states give equal
bytes), one of them a uint8 array holding zlib(orjson) of the JSON-able rest.  A restore refuses
(:class:`CorruptStateError`) bytes that do not read back, hold NaN or inf in any float array, or
come from another state version; the service moves such a state aside instead of crash-looping.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from services.clusterer.reservoir import Reservoir, generator_from_state, generator_state
from services.core.config import ClustererConfig

if TYPE_CHECKING:
    from services.clusterer.state import ClusterState

STATE_VERSION = 2  # 2: samples saved as Reservoir states
SIZE_OF = {"texts": "reservoir_size", "members": "vector_reservoir_size", "global_texts": "global_reservoir_size"}
RESERVOIRS = tuple(SIZE_OF)


class CorruptStateError(ValueError):
    """A saved state that must not be restored (unreadable, non-finite values, unknown version)."""


def to_bytes(st: ClusterState) -> bytes:
    eng = st.engine.get_state()
    arrays = {f"engine.{k}": v for k, v in eng.items() if isinstance(v, np.ndarray)}
    tmeta, tarr = st.tracker.get_state()
    arrays.update({f"tracker.{k}": v for k, v in tarr.items()})
    d = st.dim or 0
    arrays.update({
        "own": st._own, "inherited": st._inherited,
        "seen_keys": np.fromiter(st._seen.keys(), np.uint64, len(st._seen)),
        "seen_cids": np.fromiter(st._seen.values(), np.int64, len(st._seen)),
        "warm_X": np.stack(st._warm_X) if st._warm_X else np.zeros((0, d), np.float32),
        "warm_keys": np.asarray(st._warm_keys, np.uint64),
    })
    samples = {}
    for name in RESERVOIRS:
        rmeta, rarr = getattr(st, name).get_state()
        samples[name] = rmeta
        arrays.update({f"res.{name}.{k}": v for k, v in rarr.items()})
    for name, val in (("prev_centroids", st._prev_centroids), ("prev_ids", st._prev_ids), ("pca", st._pca)):
        if val is not None:
            arrays[name] = val
    meta = {
        "version": STATE_VERSION, "experiment_id": st.experiment_id, "alpha": st.alpha,
        "engine_kind": st.engine.name,
        "engine": {k: v for k, v in eng.items() if not isinstance(v, np.ndarray)},
        "tracker": tmeta, "seq": st.seq, "n_processed": st.n_processed,
        "role_totals": st.role_totals.tolist(), "dim": st.dim, "rng": generator_state(st._rng),
        "warm_meta": st._warm_meta, "emitted": sorted(st._emitted),
        "emitted_at": sorted(st._emitted_at.items()), "samples": samples,
        "spending": st.spending.get_state(),
    }
    arrays["meta"] = np.frombuffer(zlib.compress(orjson.dumps(meta)), dtype=np.uint8)
    return _npz(arrays)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez`` with a fixed timestamp per member (savez stamps the wall clock), so the bytes
    are a function of the state alone; ``np.load`` reads them."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for key, val in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                         force_zip64=True) as fid:
                np.lib.format.write_array(fid, np.asanyarray(val), allow_pickle=False)
    return buf.getvalue()


def read(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, meta) of saved bytes; :class:`CorruptStateError` when they do not read back."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = orjson.loads(zlib.decompress(arrays.pop("meta").tobytes()))
    except (OSError, EOFError, ValueError, KeyError, zlib.error, zipfile.BadZipFile) as exc:
        raise CorruptStateError(f"saved clusterer state does not read back: {exc}") from None
    return arrays, meta


def saved_counters(data: bytes) -> tuple[int, int]:
    """(cluster ids created, snapshot seq) of saved bytes whose metadata still reads (any version)."""
    _, meta = read(data)
    try:
        return int(meta["engine"]["next_id"]), int(meta["seq"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStateError(f"saved clusterer state lacks its id counter: {exc}") from None


def from_bytes(cls: type[ClusterState], data: bytes, cfg: ClustererConfig) -> ClusterState:
    arrays, meta = read(data)
    bad = sorted(k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all())
    if bad:
        raise CorruptStateError(f"saved clusterer state holds NaN or inf in {', '.join(bad)}")
    if meta.get("version") != STATE_VERSION:
        raise CorruptStateError(f"clusterer state version {meta.get('version')} != {STATE_VERSION}")
    if meta["engine_kind"] != cfg.engine:
        raise ValueError(f"saved state uses engine {meta['engine_kind']!r}, config says {cfg.engine!r}")
    st = cls(cfg, meta["experiment_id"], meta["alpha"])
    st.engine.set_state({**meta["engine"], **_prefixed(arrays, "engine.")})
    st.tracker.set_state(meta["tracker"], _prefixed(arrays, "tracker."))
    st._rng = generator_from_state(meta["rng"])
    st.seq, st.n_processed, st._dim = meta["seq"], meta["n_processed"], meta["dim"]
    st.role_totals = np.asarray(meta["role_totals"], np.int64)
    st._own, st._inherited = arrays["own"].copy(), arrays["inherited"].copy()
    st._seen = dict(zip(arrays["seen_keys"].tolist(), arrays["seen_cids"].tolist(), strict=True))
    st._warm_X = list(arrays["warm_X"].astype(np.float32))
    st._warm_meta = [_ref_tuple(t) for t in meta["warm_meta"]]
    st._warm_keys = arrays["warm_keys"].tolist()
    st._emitted = set(meta["emitted"])
    st._emitted_at = {int(c): int(n) for c, n in meta["emitted_at"]}
    for name in RESERVOIRS:  # a smaller configured size keeps each key's first items
        res = Reservoir.from_state(meta["samples"][name], _prefixed(arrays, f"res.{name}."),
                                   size=getattr(cfg, SIZE_OF[name]))
        setattr(st, name, res)
    st._prev_centroids, st._prev_ids = arrays.get("prev_centroids"), arrays.get("prev_ids")
    st._pca = arrays.get("pca")
    st.spending.set_state(meta["spending"])
    return st


def _prefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _ref_tuple(t: list[Any]) -> tuple[str, str, int, str]:
    return (str(t[0]), str(t[1]), int(t[2]), str(t[3]))
