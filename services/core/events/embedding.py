"""Embedding: a text with its vector (the embedder's output)."""

from __future__ import annotations

import base64
import binascii
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from services.core.events.base import Event, Role


def vector_bytes(vector_b64: str, dim: int, dtype: str) -> bytes:
    """The raw little-endian bytes of a base64 vector; ValueError (naming what is wrong) unless it
    is strict base64 of exactly ``dim`` values of ``dtype`` and every value is finite."""
    if dim < 1:
        raise ValueError(f"an embedding needs dim >= 1, got {dim}")
    try:
        raw = base64.b64decode(vector_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"vector_b64 is not valid base64 ({exc})") from None
    width = np.dtype(dtype).itemsize
    if len(raw) != dim * width:
        raise ValueError(f"vector_b64 holds {len(raw)} bytes; dim={dim} of {dtype} needs {dim * width}")
    bad = int(np.count_nonzero(~np.isfinite(np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")))))
    if bad:
        raise ValueError(f"the vector has {bad} non-finite value(s) (NaN or inf)")
    return raw


def decode_vector(vector_b64: str, dim: int, dtype: str) -> np.ndarray:
    """A checked base64 vector (see :func:`vector_bytes`) as float32."""
    raw = vector_bytes(vector_b64, dim, dtype)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.float32)


class EmbeddedText(Event):
    """A decoded text plus its vector.  The vector travels as base64 of little-endian bytes:
    a JSON float list costs ~6x the bytes and measurable encode/decode CPU (bench/embedding.py)."""

    topic: ClassVar[str] = "embeddings"
    type: ClassVar[str] = "autointerv.text.embedded"
    key_doc: ClassVar[str] = "experiment id: one ordered stream per experiment for the stateful clusterer"

    text_id: str
    request_id: str = ""
    pair_id: str = ""
    role: Role
    prompt_id: str
    text: str
    reason: str = "seed"
    round: int = 0
    embedding_model: str
    dim: int
    dtype: Literal["float16", "float32"] = "float16"
    vector_b64: str
    cache_hit: bool = False
    meta: dict[str, Any] = Field(default_factory=dict)

    def event_id(self) -> str:
        return self.text_id

    @model_validator(mode="after")
    def _vector_is_sound(self) -> EmbeddedText:
        """Checked at decode, so the runtime dead-letters a bad vector before any consumer's state
        sees it (a NaN once reached the clusterer's snapshot and crash-looped every restart)."""
        vector_bytes(self.vector_b64, self.dim, self.dtype)
        return self

    def vector(self) -> np.ndarray:
        """The float32 vector; ValueError unless it is ``dim`` finite values."""
        return decode_vector(self.vector_b64, self.dim, self.dtype)

    @staticmethod
    def encode_vector(vec: np.ndarray, dtype: str = "float16") -> str:
        return base64.b64encode(np.asarray(vec, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()
