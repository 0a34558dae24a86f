"""What the clusterer learns from an arriving text before it is counted: its dedupe key, its
checked vector, its split (label or held out), and whether a call's rows may be ingested at all."""

from __future__ import annotations

import hashlib

import numpy as np

from services.core.events import EmbeddedText, vector_bytes

ROLE_CODE = {"base": 0, "intervention": 1}


def digest(text_id: str) -> int:
    """64-bit key for dedupe: 2M ids collide with probability ~1e-7, at half a 16-byte key's size."""
    return int.from_bytes(hashlib.blake2b(text_id.encode(), digest_size=8).digest(), "little")


def decode_vectors(items: list[EmbeddedText]) -> np.ndarray:
    """Stack the items' checked vectors (ValueError naming the first bad text); one
    frombuffer/astype for the batch when dtype and dim agree."""
    raws = []
    for it in items:
        try:
            raws.append(vector_bytes(it.vector_b64, it.dim, it.dtype))
        except ValueError as exc:
            raise ValueError(f"text {it.text_id}: {exc}") from None
    dtype, dim = items[0].dtype, items[0].dim
    if any(it.dtype != dtype or it.dim != dim for it in items):
        return np.stack([it.vector() for it in items])
    flat = np.frombuffer(b"".join(raws), dtype=np.dtype(dtype).newbyteorder("<"))
    return flat.reshape(len(items), dim).astype(np.float32)


def is_label_split(text_id: str, label_fraction: float) -> bool:
    """Decided once per text from its id: shown to the labeler (True) or held out (False)."""
    try:
        u = int(text_id[:8], 16) / 16**8
    except ValueError:  # non-hex ids: hash them first
        u = int(hashlib.blake2b(text_id.encode(), digest_size=4).hexdigest(), 16) / 16**8
    return u < label_fraction


def check_rows(X: np.ndarray, text_ids: list[str], roles: list[str], dim: int | None) -> None:
    """ValueError naming the first bad row: wrong dim, non-finite values or an unknown role."""
    if X.ndim != 2 or X.shape[1] != (dim or X.shape[1]) or X.shape[0] != len(text_ids):
        raise ValueError(f"expected {len(text_ids)} vectors of dim {dim}, got shape {X.shape}")
    bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if len(bad):
        raise ValueError(f"text {text_ids[bad[0]]}: non-finite values in its vector "
                         f"({len(bad)} such row(s) in this call)")
    unknown = set(roles) - ROLE_CODE.keys()
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; expected one of {sorted(ROLE_CODE)}")
