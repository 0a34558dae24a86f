"""Clustering: snapshots, uncertainty events and candidate clusters (the clusterer's output)."""

from __future__ import annotations

import base64
import time
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field

from services.core.events.base import Event, Role


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
