"""The published view of a state: per-cluster counts, shares, e-values, 2-D positions, quality.

Taking a snapshot never moves the ingest generator (the quality sample draws from its own,
seeded by the snapshot number), so when snapshots are taken does not change what is counted.
What a snapshot itself shows does depend on the previous one: PCA axis signs follow it (no
flip-flop on the map) and assignment stability is measured against it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.decomposition import PCA

from services.clusterer.candidates import MAX_LOG_E
from services.clusterer.quality import cluster_quality
from services.core.events import ClusterQuality, ClusterSnapshot, ClusterStats, EmbeddedText
from services.stats.sequential import confidence_sequence_bernoulli
from services.stats.share_tests import share_log_e

if TYPE_CHECKING:
    from services.clusterer.state import ClusterState

# every CENTROIDS_EVERY-th snapshot carries all centroids (unless k * dim exceeds CENTROIDS_MAX_VALUES:
# a snapshot stays well under the broker's 1 MB); the ones between carry only new clusters' centroids
CENTROIDS_EVERY = 20
CENTROIDS_MAX_VALUES = 262_144


def nearest(X: np.ndarray, centroids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    d = (X * X).sum(1)[:, None] - 2 * X @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return ids[np.argmin(d, axis=1)]


def centroids_2d(st: ClusterState, centroids: np.ndarray) -> np.ndarray:
    """PCA of the centroids; each axis's sign follows the previous snapshot's (no flip-flop)."""
    if len(centroids) < 2:
        return np.zeros((len(centroids), 2))
    pca = PCA(n_components=2, random_state=st.cfg.seed).fit(centroids)
    comps = pca.components_.copy()
    for i in range(len(comps)):
        ref = st._pca[i] if st._pca is not None and st._pca.shape == comps.shape else None
        lead = comps[i][np.argmax(np.abs(comps[i]))]
        sign = np.sign(comps[i] @ ref) if ref is not None else np.sign(lead)
        comps[i] *= sign or 1.0
    st._pca = comps
    out = (centroids - pca.mean_) @ comps.T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def quality_sample(st: ClusterState) -> tuple[np.ndarray, np.ndarray]:
    ids = [c for c in st.engine.ids if st.members.get(c)]
    if not ids:
        return np.zeros((0, st.dim or 0), np.float32), np.zeros(0, np.int64)
    parts = [st._members(c)[0] for c in ids]
    X = np.concatenate(parts)
    labels = np.repeat(np.asarray(ids, np.int64), [len(p) for p in parts])
    if len(X) > st.cfg.quality_sample:  # own generator: snapshots must not move the ingest RNG
        pick = np.random.default_rng([st.cfg.seed, st.seq]).choice(len(X), st.cfg.quality_sample, replace=False)
        X, labels = X[np.sort(pick)], labels[np.sort(pick)]
    return X, labels


def take(st: ClusterState) -> ClusterSnapshot:
    """Per-cluster stats (share/CI/e-value on ``own`` counts, CI at ``alpha``) and quality."""
    st.seq += 1
    ids = st.engine.ids
    centroids = st.engine.centroids
    view = st._view()
    clusters, quality = [], None
    if ids:
        pos = centroids_2d(st, centroids.astype(np.float64))
        n = view.own.sum(axis=1)
        log_e = share_log_e(view.own)
        for row, cid in enumerate(ids):
            tot = st._own[cid] + st._inherited[cid]
            k, m = int(view.own[row, 1]), int(n[row])
            clusters.append(ClusterStats(
                cluster_id=cid, count_base=int(tot[0]), count_intervention=int(tot[1]),
                own_base=int(view.own[row, 0]), own_intervention=k,
                share_intervention=k / m if m else 0.5,
                share_ci=confidence_sequence_bernoulli(k, m, st.alpha),
                e_value=math.exp(min(float(log_e[row]), MAX_LOG_E)),
                centroid_2d=(float(pos[row, 0]), float(pos[row, 1])),
                parent_id=st.engine.parents.get(cid)))
        X, labels = quality_sample(st)
        ids_arr = np.asarray(ids, np.int64)
        current = nearest(X, centroids, ids_arr) if len(X) else None
        previous = (nearest(X, st._prev_centroids, st._prev_ids)
                    if len(X) and st._prev_centroids is not None else None)
        quality = cluster_quality(X, labels, centroids, ids, view.total, previous, current,
                                  st.cfg.quality_sample, st.cfg.seed)
        st._prev_centroids, st._prev_ids = centroids.copy(), ids_arr
    return ClusterSnapshot(
        experiment_id=st.experiment_id, seq=st.seq,
        n_seen=int(st.role_totals.sum()), n_base=int(st.role_totals[0]),
        n_intervention=int(st.role_totals[1]), engine=st.engine.name, clusters=clusters,
        quality=quality if quality is not None else ClusterQuality(),
        lineage={c: p for c, p in st.engine.parents.items() if p is not None},
        **centroid_fields(st, ids, centroids))


def centroid_fields(st: ClusterState, ids: list[int], centroids: np.ndarray) -> dict[str, Any]:
    """All centroids every CENTROIDS_EVERY snapshots, else those of clusters created since any
    was sent (a split's children): a few KB instead of the bulk of every snapshot.  At most
    CENTROIDS_MAX_VALUES values per snapshot; the rest follow in the next ones."""
    if not ids:
        return {}
    if st._centroids_full_seq is None or st.seq - st._centroids_full_seq >= CENTROIDS_EVERY:
        rows = list(range(len(ids)))
        st._centroids_full_seq = st.seq
    else:
        rows = [i for i, c in enumerate(ids) if c not in st._centroids_sent]
    rows = rows[:max(1, CENTROIDS_MAX_VALUES // max(1, centroids.shape[1]))]
    if not rows:
        return {}
    st._centroids_sent.update(ids[i] for i in rows)
    return {"centroid_ids": [int(ids[i]) for i in rows], "centroid_dim": int(centroids.shape[1]),
            "centroids_b64": EmbeddedText.encode_vector(centroids[rows].ravel(), "float16")}
