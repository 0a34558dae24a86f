"""Topic contracts: one pydantic model per topic, serialised with orjson.

The JSON Schema files in ``schemas/`` are generated from these models (``autointerv schemas
--write``) and are the language-neutral truth for plug-in authors; ``tests/test_schemas.py``
fails when the two drift apart.  Every record also carries CloudEvents-style Kafka headers
(see :class:`Envelope`), so routing and dedupe never need to parse the body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = "1.0"
Role = Literal["base", "intervention"]
ROLES: tuple[Role, Role] = ("base", "intervention")


def stable_id(*parts: object) -> str:
    """Deterministic 128-bit id from parts; stable across processes (unlike ``hash()``)."""
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


# --------------------------------------------------------------------------- generation


class PromptRef(BaseModel):
    prompt_id: str
    text: str = ""  # empty string means decode from BOS


class Exemplar(BaseModel):
    """A text that a targeted request wants continued or re-sampled around."""

    text_id: str
    prompt_id: str
    text: str = ""
    prefix_tokens: int = 8  # continue from the exemplar's first N tokens/words


class Decoding(BaseModel):
    """Per-request decoding overrides; ``None`` means "the generator's configured default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    seed: int | None = None


class GenerationRequest(Event):
    topic: ClassVar[str] = "generation-requests"
    type: ClassVar[str] = "autointerv.generation.requested"
    key_doc: ClassVar[str] = "request id: spreads requests over generator replicas"

    request_id: str = Field(default_factory=new_id)
    pair_id: str = ""  # shared by the base and intervention requests planned together
    role: Role
    reason: Literal["seed", "uncertainty", "divergence_probe", "replay", "manual"] = "seed"
    round: int = 0
    prompts: list[PromptRef] = Field(default_factory=list)
    exemplars: list[Exemplar] = Field(default_factory=list)
    n_per_prompt: int = Field(default=1, ge=1)
    decoding: Decoding = Field(default_factory=Decoding)
    note: str = ""  # why this request exists, in words (logged by the controller)

    def event_id(self) -> str:
        return self.request_id

    def partition_key(self) -> str:
        return self.request_id  # spread across generator replicas


class DecodedText(Event):
    topic: ClassVar[str] = "texts"
    type: ClassVar[str] = "autointerv.text.decoded"
    key_doc: ClassVar[str] = "text id: spreads texts over embedder replicas"

    text_id: str
    request_id: str
    pair_id: str = ""  # same for the two roles' texts of one (paired request, prompt, sample)
    role: Role
    model_id: str
    prompt_id: str
    prompt: str = ""
    text: str
    sample_index: int = 0
    n_tokens: int = 0
    reason: str = "seed"
    round: int = 0
    backend: str = ""
    generated_at: float = Field(default_factory=time.time)
    meta: dict[str, Any] = Field(default_factory=dict)  # e.g. sim ground truth, logprobs

    def event_id(self) -> str:
        return self.text_id

    def partition_key(self) -> str:
        return self.text_id  # spread across embedder replicas


class GenerationFailure(BaseModel):
    prompt_id: str
    reason: str
    exhausted: bool = False  # replay data ran out for this prompt (not an error of the model)


class GenerationReport(Event):
    """What one generation request produced: the controller's round gate counts texts by these
    reports, not by what it planned, so failed or exhausted prompts never leave it waiting."""

    topic: ClassVar[str] = "generation-reports"
    type: ClassVar[str] = "autointerv.generation.reported"

    request_id: str
    pair_id: str = ""
    role: Role
    round: int = 0
    texts: int  # texts emitted for this request
    failures: list[GenerationFailure] = Field(default_factory=list)
    backend: str = ""
    seconds: float = 0.0
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return self.request_id


# --------------------------------------------------------------------------- embedding


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


# --------------------------------------------------------------------------- clustering


class ClusterStats(BaseModel):
    """One active cluster.  ``count_*`` are displayed counts: the texts assigned to it plus a share of
    its parent's texts inherited at a split.  The share, its CI and the e-value are computed on the
    ``own_*`` counts alone (texts assigned to this id since it was created), so a chart of the share
    must show those; ``None`` in snapshots written before the field existed."""

    cluster_id: int
    count_base: int
    count_intervention: int
    share_intervention: float  # of the own counts; 0.5 when it has none yet
    share_ci: tuple[float, float]  # CI on P(intervention | cluster), from the own counts
    own_base: int | None = None
    own_intervention: int | None = None
    e_value: float = 1.0  # anytime-valid evidence against "no difference"
    centroid_2d: tuple[float, float] = (0.0, 0.0)
    parent_id: int | None = None
    top_terms: list[str] = Field(default_factory=list)


class ClusterQuality(BaseModel):
    silhouette: float | None = None
    inertia: float | None = None
    nmi_previous: float | None = None
    n_clusters: int = 0
    min_size: int = 0
    max_size: int = 0


class ClusterSnapshot(Event):
    topic: ClassVar[str] = "cluster-snapshots"
    type: ClassVar[str] = "autointerv.cluster.snapshot"

    seq: int
    n_seen: int
    n_base: int
    n_intervention: int
    engine: str
    clusters: list[ClusterStats]
    quality: ClusterQuality
    created_at: float = Field(default_factory=time.time)
    # set on the snapshot that closes a sampling round (the controller's RoundClosed barrier):
    # taken once every text of rounds <= barrier_round has arrived, so it is the same on every run
    barrier_round: int | None = None
    n_arrived: int = 0  # texts received, ingested or still waiting for their pair partner
    n_orphans: int = 0  # texts dropped because their pair partner was never produced
    n_candidates: int = 0  # candidates emitted so far (the controller waits for them at a barrier)
    n_uncertainty: int = 0  # uncertainty events emitted so far
    # child id -> parent id for every cluster a split created, retired ones included, so an id
    # cited by a candidate can be followed to the clusters that replaced it
    lineage: dict[int, int] = Field(default_factory=dict)
    # centroids (float16, little-endian, one row per id in ``centroid_ids``) of some clusters: all of
    # them every few snapshots, and in between only those created since (a split's two children),
    # so a reader that keeps the latest row per id knows every cluster's centroid.  The report
    # assigns its map sample to the final clusters with them.  Empty when none is sent.
    centroid_ids: list[int] = Field(default_factory=list)
    centroids_b64: str = ""
    centroid_dim: int = 0

    def event_id(self) -> str:
        return f"{self.experiment_id}:snapshot:{self.seq}"

    def centroids(self) -> dict[int, np.ndarray]:
        """Cluster id -> float32 centroid for the rows this snapshot carries ({} when none or malformed)."""
        return decode_centroids(self.centroid_ids, self.centroids_b64, self.centroid_dim)


def decode_centroids(ids: list[int], b64: str, dim: int) -> dict[int, np.ndarray]:
    """Id -> float32 row of a snapshot's float16 centroid block; {} unless ids, bytes and dim agree."""
    if not b64 or dim < 1 or not ids:
        return {}
    try:
        flat = np.frombuffer(base64.b64decode(b64), dtype=np.dtype("float16").newbyteorder("<"))
    except ValueError:
        return {}
    if flat.size != len(ids) * dim or not np.isfinite(flat).all():
        return {}
    return dict(zip(ids, flat.astype(np.float32).reshape(len(ids), dim), strict=True))


class TextRef(BaseModel):
    text_id: str
    prompt_id: str
    role: Role
    text: str = ""
    pair_id: str = ""  # the paired text of the other role shares it ("" when unknown or unpaired)


class UncertaintyEvent(Event):
    topic: ClassVar[str] = "uncertainty"
    type: ClassVar[str] = "autointerv.cluster.uncertain"

    uncertainty_id: str
    kind: Literal["boundary", "undersampled", "unresolved_share", "drift"]
    cluster_ids: list[int]
    score: float
    exemplars: list[TextRef] = Field(default_factory=list)
    snapshot_seq: int = 0
    detail: str = ""
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return self.uncertainty_id


class CandidateCluster(Event):
    """A cluster whose base/intervention share differs beyond the anytime-valid threshold.

    ``label_texts`` may be shown to a labeler; ``holdout_texts`` must never be: they exist only to
    validate the resulting hypotheses (the split is by a hash of the text id, decided once)."""

    topic: ClassVar[str] = "candidates"
    type: ClassVar[str] = "autointerv.cluster.divergent"

    candidate_id: str
    cluster_id: int
    snapshot_seq: int
    direction: Role  # the over-represented side
    count_base: int
    count_intervention: int
    share_intervention: float
    share_ci: tuple[float, float]
    e_value: float
    alpha_spent: float  # the level this cluster was tested at (alpha spending across clusters)
    label_texts: list[TextRef]
    holdout_texts: list[TextRef]
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return self.candidate_id


# --------------------------------------------------------------------------- hypotheses


class Hypothesis(Event):
    topic: ClassVar[str] = "hypotheses"
    type: ClassVar[str] = "autointerv.hypothesis.proposed"

    hypothesis_id: str
    candidate_id: str
    cluster_id: int
    direction: Role  # the side the description is about
    text: str  # the claim, in words
    # paired: a style contrast between the two answers to one prompt (services/paired), checked by
    # ``scorer`` on held-out pairs; candidate_id is "paired:<experiment>" and cluster_id -1
    kind: Literal["contrastive", "templated", "paired"] = "contrastive"
    labeler: str  # "offline:log-odds", "llm:openai:gpt-4o-mini", ...
    keywords: list[str] = Field(default_factory=list)
    label_text_ids: list[str] = Field(default_factory=list)  # what the labeler saw
    holdout_texts: list[TextRef] = Field(default_factory=list)  # for validators only
    cluster_evidence: dict[str, float] = Field(default_factory=dict)  # share diff, CI, e-value
    siblings: int = 1  # hypotheses proposed for the same candidate (the controller waits for all of them)
    scorer: dict[str, Any] = Field(default_factory=dict)  # paired: make_scorer spec (services/paired/scorers.py)
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return self.hypothesis_id

    @property
    def text_ids(self) -> list[str]:
        """Every text of the cluster behind it: what the labeler saw, then the held-out ones."""
        return self.label_text_ids + [t.text_id for t in self.holdout_texts]


class Validation(Event):
    topic: ClassVar[str] = "validations"
    type: ClassVar[str] = "autointerv.hypothesis.validated"

    validation_id: str
    hypothesis_id: str
    tier: str
    tier_index: int
    decision: Literal["validated", "rejected", "escalated"]
    auc: float | None = None  # None for templated share hypotheses (decided by the share test)
    auc_ci: tuple[float, float] | None = None
    p_value: float
    alpha_level: float  # the level the online FDR rule gave this test
    n_pos: int
    n_neg: int
    effect: dict[str, float] = Field(default_factory=dict)  # e.g. share difference and its CI
    calls: int = 0  # scorer calls this tier made (LLM calls for LLM tiers)
    cost_usd: float = 0.0
    hypothesis: Hypothesis | None = None  # carried for sinks and the next tier
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return self.validation_id


class ControlEvent(Event):
    """The controller's announcements to the whole experiment: a sampling round is closed (every
    text it produced is on the bus: the clusterer takes a barrier snapshot once they have all
    arrived), or the experiment is finished (why, and the counts): services finalize, the sink
    writes the report, and processes started for this one run exit."""

    topic: ClassVar[str] = "control"
    type: ClassVar[str] = "autointerv.experiment.control"

    # stopping: generation has stopped (why: stopped_because); the round's texts are all produced,
    # and services that propose from everything seen (paired contrasts) take their last turn
    kind: Literal["round_closed", "stopping", "finished"]
    round: int
    expected_texts: int = 0  # texts produced in rounds <= round (round_closed)
    force: bool = False  # round_closed after a timeout: snapshot now, whatever has arrived
    stopped_because: str = ""  # finished: budget | data_exhausted | stable | wall_time | lost_texts | signal
    detail: str = ""  # finished: the reason in words
    counts: dict[str, int] = Field(default_factory=dict)  # finished: planned, produced, failed, lost, ...
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return f"{self.experiment_id}:{self.kind}:{self.round}:{int(self.force)}"


class PairedRound(Event):
    """The paired-contrast service's answer to a closed sampling round: it has read the round's
    texts and proposed (``hypothesis_ids``, possibly none) from every label pair so far.  The
    controller settles a round only after this answer and the decisions of those hypotheses, and
    ends the run only after the final answer (to ``stopping``), so a run never ends with paired
    hypotheses still to come."""

    topic: ClassVar[str] = "paired-rounds"
    type: ClassVar[str] = "autointerv.paired.round"

    round: int
    final: bool = False  # the answer to ``stopping``: the last proposals, from every label pair
    hypothesis_ids: list[str] = Field(default_factory=list)
    label_pairs: int = 0  # label pairs the proposers saw (0: no proposal this round)
    held_out_pairs: int = 0
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        return f"{self.experiment_id}:paired-round:{self.round}:{int(self.final)}"


class DeadLetter(Event):
    topic: ClassVar[str] = "dead-letters"
    type: ClassVar[str] = "autointerv.deadletter"

    source_topic: str
    source_partition: int
    source_offset: int
    service: str
    reason: str
    original_b64: str  # the original bytes, untouched
    original_headers: dict[str, str] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)

    def event_id(self) -> str:
        # the service is part of the identity: two services (groups) may each dead-letter the same
        # record, and the sink dedupes by this id, so without it one of the two was dropped
        return f"{self.service}:{self.source_topic}:{self.source_partition}:{self.source_offset}"


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


# --------------------------------------------------------------------------- envelope


class Envelope(BaseModel):
    """CloudEvents-style headers carried on every Kafka record (binary content mode)."""

    id: str
    type: str
    source: str
    time: float
    experiment_id: str
    schema_version: str = SCHEMA_VERSION
    specversion: str = "1.0"

    HEADER_PREFIX: ClassVar[str] = "ce_"

    def to_headers(self) -> list[tuple[str, bytes]]:
        return [(f"{self.HEADER_PREFIX}{k}", str(v).encode()) for k, v in self.model_dump().items()]

    @classmethod
    def from_headers(cls, headers: list[tuple[str, bytes]] | None) -> Envelope | None:
        if not headers:
            return None
        raw = {k[len(cls.HEADER_PREFIX):]: v.decode(errors="replace") for k, v in headers
               if k.startswith(cls.HEADER_PREFIX)}
        try:
            return cls.model_validate(raw)
        except Exception:
            return None

    @classmethod
    def for_event(cls, event: Event, source: str) -> Envelope:
        return cls(id=event.event_id(), type=event.type, source=source, time=time.time(),
                   experiment_id=event.experiment_id)
