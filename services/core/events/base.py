"""What every topic payload shares: the Event base class, roles, schema version and ids.

The JSON Schema files in ``schemas/`` are generated from these models (``autointerv schemas
--write``) and are the language-neutral truth for plug-in authors; ``tests/test_schemas.py``
fails when the two drift apart.  Every record also carries CloudEvents-style Kafka headers
(see :class:`Envelope`), so routing and dedupe never need to parse the body.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = "1.0"
Role = Literal["base", "intervention"]
ROLES: tuple[Role, Role] = ("base", "intervention")


def stable_id(*parts: object) -> str:
    """Deterministic 128-bit id from parts; stable across processes (unlike ``hash()``), so a
    redelivered record gets the same id and consumers dedupe it.  Parts are compared as strings,
    with a separator between them:

    >>> stable_id("exp", 3, "base")
    '5d37cba0b787ba38fd45445ddc3a1451'
    >>> stable_id("exp", 3, "base") == stable_id("exp", "3", "base")
    True
    >>> stable_id("a", "bc") == stable_id("ab", "c")
    False
    """
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x1f")
    return h.hexdigest()


def new_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    """Base for all topic payloads."""

    model_config = ConfigDict(extra="ignore", frozen=False)
    topic: ClassVar[str]  # logical topic name, see services.core.topics
    type: ClassVar[str]  # CloudEvents type, e.g. "autointerv.text.decoded"
    key_doc: ClassVar[str] = "experiment id: one ordered stream per experiment"  # what the Kafka key is, in words

    schema_version: str = SCHEMA_VERSION
    experiment_id: str

    def event_id(self) -> str:
        """Id used for dedupe; subclasses return their natural key."""
        raise NotImplementedError

    def partition_key(self) -> str:
        """Kafka key. Stateful consumers (clusterer, sink) rely on per-experiment ordering."""
        return self.experiment_id

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, data: bytes):
        return cls.model_validate(orjson.loads(data))
