"""Cluster quality on a bounded sample: silhouette, inertia, stability (NMI) and sizes.

Everything runs on the clusterer's vector reservoirs (at most ``sample`` rows), never on the full
stream, so a snapshot costs the same at 10K texts as at 2M.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import normalized_mutual_info_score, silhouette_score

from services.core.events import ClusterQuality


def silhouette(X: np.ndarray, labels: np.ndarray, sample: int = 2000, seed: int = 0) -> float | None:
    """Mean silhouette on at most ``sample`` rows; None when it is undefined (< 2 labels)."""
    if len(X) > sample:
        pick = np.random.default_rng(seed).choice(len(X), sample, replace=False)
        X, labels = X[pick], labels[pick]
    if not 2 <= len(np.unique(labels)) < len(X):
        return None
    return float(silhouette_score(np.asarray(X, dtype=np.float32), labels))


def inertia(X: np.ndarray, labels: np.ndarray, centroids: np.ndarray, ids: list[int]) -> float | None:
    """Mean squared distance of each row to the centroid of the cluster it is labelled with."""
    if len(X) == 0:
        return None
    row_of = {cid: r for r, cid in enumerate(ids)}
    keep = np.fromiter((int(c) in row_of for c in labels), dtype=bool, count=len(labels))
    if not keep.any():
        return None
    rows = np.fromiter((row_of[int(c)] for c in labels[keep]), dtype=np.int64)
    diff = np.asarray(X[keep], dtype=np.float64) - centroids[rows]
    return float(np.mean(np.sum(diff * diff, axis=1)))


def stability(previous: np.ndarray | None, current: np.ndarray) -> float | None:
    """NMI between two labelings of the same rows (e.g. consecutive snapshots' centroids)."""
    if previous is None or len(previous) != len(current) or len(current) == 0:
        return None
    return float(normalized_mutual_info_score(previous, current))


def cluster_quality(X: np.ndarray, labels: np.ndarray, centroids: np.ndarray, ids: list[int],
                    sizes: np.ndarray, previous_labels: np.ndarray | None = None,
                    current_labels: np.ndarray | None = None, sample: int = 2000,
                    seed: int = 0) -> ClusterQuality:
    """All quality numbers for one snapshot.

    ``labels`` are the reservoir rows' clusters (assigned at arrival); ``previous_labels`` and
    ``current_labels`` are the same rows assigned by the previous and the current centroids.
    """
    return ClusterQuality(
        silhouette=silhouette(X, labels, sample, seed),
        inertia=inertia(X, labels, centroids, ids),
        nmi_previous=stability(previous_labels, current_labels) if current_labels is not None else None,
        n_clusters=len(ids),
        min_size=int(sizes.min()) if len(sizes) else 0,
        max_size=int(sizes.max()) if len(sizes) else 0,
    )
