"""Topic contracts: one pydantic model per topic, serialised with orjson.

The JSON Schema files in ``schemas/`` are generated from these models (``autointerv schemas
--write``) and are the language-neutral truth for plug-in authors; ``tests/test_schemas.py``
fails when the two drift apart.  Every record also carries CloudEvents-style Kafka headers
(see :class:`Envelope`), so routing and dedupe never need to parse the body.

The models live in modules by topic group, and everything is importable from here:

- ``base``: the Event base class, roles, schema version, ``stable_id``;
- ``generation``: generation requests, decoded texts, generation reports;
- ``embedding``: embedded texts and their vectors;
- ``clustering``: snapshots, uncertainty events, candidate clusters (and ``TextRef``);
- ``hypotheses``: hypotheses and validations;
- ``control``: control events and dead letters;
- ``envelope``: the CloudEvents headers.
"""

from collections.abc import Mapping

from services.core.events.base import (
    ROLES,
    SCHEMA_VERSION,
    Event,
    Role,
    new_id,
    stable_id,
)
from services.core.events.clustering import (
    CandidateCluster,
    ClusterQuality,
    ClusterSnapshot,
    ClusterStats,
    TextRef,
    UncertaintyEvent,
    decode_centroids,
)
from services.core.events.control import (
    ControlEvent,
    DeadLetter,
    PairedRound,
)
from services.core.events.embedding import (
    EmbeddedText,
    decode_vector,
    vector_bytes,
)
from services.core.events.envelope import (
    Envelope,
)
from services.core.events.generation import (
    DecodedText,
    Decoding,
    Exemplar,
    GenerationFailure,
    GenerationReport,
    GenerationRequest,
    PromptRef,
)
from services.core.events.hypotheses import (
    Hypothesis,
    Validation,
)

EVENT_TYPES: tuple[type[Event], ...] = (
    GenerationRequest,
    DecodedText,
    GenerationReport,
    EmbeddedText,
    ClusterSnapshot,
    UncertaintyEvent,
    CandidateCluster,
    Hypothesis,
    Validation,
    ControlEvent,
    PairedRound,
    DeadLetter,
)
EVENTS_BY_TOPIC: Mapping[str, type[Event]] = {e.topic: e for e in EVENT_TYPES}

__all__ = [
    "EVENTS_BY_TOPIC",
    "EVENT_TYPES",
    "ROLES",
    "SCHEMA_VERSION",
    "CandidateCluster",
    "ClusterQuality",
    "ClusterSnapshot",
    "ClusterStats",
    "ControlEvent",
    "DeadLetter",
    "DecodedText",
    "Decoding",
    "EmbeddedText",
    "Envelope",
    "Event",
    "Exemplar",
    "GenerationFailure",
    "GenerationReport",
    "GenerationRequest",
    "Hypothesis",
    "PairedRound",
    "PromptRef",
    "Role",
    "TextRef",
    "UncertaintyEvent",
    "Validation",
    "decode_centroids",
    "decode_vector",
    "new_id",
    "stable_id",
    "vector_bytes",
]
