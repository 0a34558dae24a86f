"""Online clustering engines with stable, never-reused public cluster ids.

An engine owns centroids and ids; :class:`services.clusterer.state.ClusterState` owns everything
that is counted.  Ids are handed out 0, 1, 2, ... in creation order, so an id is also its position
in the alpha-spending sequence.  A split retires the parent id and creates two new ones; the
parent link stays in :attr:`ClusterEngine.parents`.

Assignment happens *at arrival*: :meth:`ClusterEngine.observe` labels a batch against the current
centroids and queues it for learning; :meth:`ClusterEngine.flush` applies the queued update.  The
caller flushes at fixed positions of the stream, so the result does not depend on how the stream
was cut into deliveries (a restored consumer may see other batch boundaries).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import faiss
import numpy as np
from river import cluster as river_cluster
from scipy import sparse
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import ThreadpoolController

log = logging.getLogger("autointerv.clusterer")


@dataclass
class Assignment:
    """Nearest and second-nearest public ids per row, and the distance margin between them."""

    labels: np.ndarray  # int64 public ids
    second: np.ndarray  # int64 public ids of the runner-up centroid
    margin: np.ndarray  # float32: dist(second) - dist(nearest), Euclidean, >= 0


def _as_f32(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(X, dtype=np.float32)


def _two_means(X_members: np.ndarray, seed: int,
               limits: contextlib.AbstractContextManager[Any]) -> tuple[np.ndarray, np.ndarray]:
    """2-means on a cluster's reservoir; returns (centres (2, d), fraction of members nearest each)."""
    X = _as_f32(X_members)
    if len(X) < 2 or np.allclose(X, X[0]):
        raise ValueError("need at least two distinct member vectors to split a cluster")
    with limits:
        km = KMeans(n_clusters=2, n_init=3, random_state=seed).fit(X)
    frac = np.bincount(km.labels_, minlength=2) / len(X)
    return km.cluster_centers_.astype(np.float32), frac


def _split_count(total: int, frac_a: float) -> tuple[int, int]:
    """Round one share and give the rest to the other side, so the total is conserved exactly."""
    a = round(total * frac_a)
    return a, total - a


class ClusterEngine(ABC):
    """Centroids plus id bookkeeping; subclasses supply fitting, assignment and learning."""

    name: ClassVar[str]

    def __init__(self, k_initial: int, seed: int = 0, threads: int | None = 1) -> None:
        self.k_initial = k_initial
        self.seed = seed
        self.threads = threads  # OpenMP/BLAS threads for fits (see ClustererConfig.threads)
        # one library scan per engine: threadpool_limits() rescans on every call (~4 ms)
        self._pools = ThreadpoolController() if threads is not None else None
        self._ids: list[int] = []
        self._next_id = 0
        self.parents: dict[int, int | None] = {}  # every id ever created -> parent (None: initial)
        self.retired: list[int] = []

    def _limits(self) -> contextlib.AbstractContextManager[Any]:
        """Cap OpenMP/BLAS threads for one sklearn fit (no-op when threads is None)."""
        return self._pools.limit(limits=self.threads) if self._pools is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ ids
    @property
    def ids(self) -> list[int]:
        """Active public ids, aligned with the rows of :attr:`centroids`."""
        return list(self._ids)

    @property
    def n_created(self) -> int:
        return self._next_id

    def _new_id(self, parent: int | None) -> int:
        cid = self._next_id
        self._next_id += 1
        self.parents[cid] = parent
        return cid

    def _row(self, cluster_id: int) -> int:
        try:
            return self._ids.index(cluster_id)
        except ValueError:
            raise KeyError(f"cluster {cluster_id} is not active") from None

    def _ids_state(self) -> dict[str, Any]:
        return {"ids": np.asarray(self._ids, dtype=np.int64), "next_id": self._next_id,
                "parents": [[c, -1 if p is None else p] for c, p in self.parents.items()],
                "retired": list(self.retired), "k_initial": self.k_initial, "seed": self.seed}

    def _set_ids_state(self, state: dict[str, Any]) -> None:
        self._ids = [int(i) for i in state["ids"]]
        self._next_id = int(state["next_id"])
        self.parents = {int(c): (None if p < 0 else int(p)) for c, p in state["parents"]}
        self.retired = [int(c) for c in state["retired"]]
        self.k_initial = int(state["k_initial"])
        self.seed = int(state["seed"])

    # ------------------------------------------------------------------ interface
    @property
    @abstractmethod
    def centroids(self) -> np.ndarray:
        """(k, d) float32, rows aligned with :attr:`ids`."""

    @property
    def fitted(self) -> bool:
        return bool(self._ids)

    @abstractmethod
    def fit_initial(self, X: np.ndarray) -> None:
        """Fit ``k_initial`` clusters on the warm-up buffer; ids 0..k_initial-1."""

    @abstractmethod
    def observe(self, X: np.ndarray) -> Assignment:
        """Assign rows at arrival and queue them for learning (applied by :meth:`flush`)."""

    def flush(self) -> None:
        """Apply the queued centroid update (no-op for engines that learn per row)."""

    @abstractmethod
    def nearest(self, X: np.ndarray) -> Assignment:
        """Nearest and runner-up ids and margins, without learning."""

    def assign(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(public ids, margin) for each row, without learning."""
        a = self.nearest(X)
        return a.labels, a.margin

    def partial_fit(self, X: np.ndarray) -> None:
        """Learn from X (first call on an unfitted engine fits the initial clusters)."""
        if not self.fitted:
            self.fit_initial(X)
            return
        self.observe(X)
        self.flush()

    @abstractmethod
    def split(self, cluster_id: int, X_members: np.ndarray) -> tuple[int, int]:
        """Replace ``cluster_id`` by two new ids from a 2-means on its member vectors."""

    @abstractmethod
    def get_state(self) -> dict[str, Any]:
        """JSON-able values and numpy arrays (the state module serialises them)."""

    @abstractmethod
    def set_state(self, state: dict[str, Any]) -> None: ...

    def centroid_of(self, cluster_id: int) -> np.ndarray:
        return self.centroids[self._row(cluster_id)]


class MiniBatchEngine(ClusterEngine):
    """sklearn MiniBatchKMeans for the initial fit, then Sculley's mini-batch update by hand.

    Why not ``MiniBatchKMeans.partial_fit`` after the fit: it re-seeds low-count centres at random
    (``reassignment_ratio``), which would silently change what an id means, and it cannot add or
    remove centres for splits.  The hand-written update is the same rule (per-centre learning rate
    1/count, i.e. each centre is the running mean of the rows it was assigned), with no reassignment.
    Nearest/second-nearest search uses a faiss IndexFlatL2 rebuilt whenever centroids change.
    """

    name = "minibatch"

    def __init__(self, k_initial: int, seed: int = 0, threads: int | None = 1) -> None:
        super().__init__(k_initial, seed, threads)
        if threads is not None:  # faiss has no per-call thread setting: this one is process-wide
            faiss.omp_set_num_threads(threads)
        self._centroids = np.zeros((0, 0), dtype=np.float32)
        self._counts = np.zeros(0, dtype=np.int64)
        self._pending_X: list[np.ndarray] = []
        self._pending_labels: list[np.ndarray] = []
        self._index: faiss.IndexFlatL2 | None = None

    @property
    def centroids(self) -> np.ndarray:
        return self._centroids

    @property
    def counts(self) -> np.ndarray:
        """Per-centroid learning counts (rows aligned with ids)."""
        return self._counts

    def _rebuild_index(self) -> None:
        self._index = faiss.IndexFlatL2(self._centroids.shape[1])
        self._index.add(self._centroids)

    def _search(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self._index is not None, "engine is not fitted"
        d2, rows = self._index.search(_as_f32(X), 2)
        d = np.sqrt(np.maximum(d2, 0.0))
        return rows[:, 0], rows[:, 1], (d[:, 1] - d[:, 0]).astype(np.float32)

    def fit_initial(self, X: np.ndarray) -> None:
        X = _as_f32(X)
        if len(X) < self.k_initial:
            raise ValueError(f"need >= k_initial={self.k_initial} vectors for the initial fit, got {len(X)}")
        with self._limits():
            km = MiniBatchKMeans(n_clusters=self.k_initial, random_state=self.seed, n_init=3,
                                 batch_size=min(1024, len(X))).fit(X)
        self._centroids = km.cluster_centers_.astype(np.float32)
        self._ids = [self._new_id(None) for _ in range(self.k_initial)]
        self._rebuild_index()
        rows, _, _ = self._search(X)
        self._counts = np.bincount(rows, minlength=self.k_initial).astype(np.int64)

    def nearest(self, X: np.ndarray) -> Assignment:
        rows, rows2, margin = self._search(X)
        ids = np.asarray(self._ids, dtype=np.int64)
        return Assignment(ids[rows], ids[rows2], margin)

    def observe(self, X: np.ndarray) -> Assignment:
        X = _as_f32(X)
        rows, rows2, margin = self._search(X)
        ids = np.asarray(self._ids, dtype=np.int64)
        self._pending_X.append(X)
        self._pending_labels.append(ids[rows])
        return Assignment(ids[rows], ids[rows2], margin)

    def flush(self) -> None:
        """c <- (c * n_c + sum of new rows) / (n_c + m): the 1/count mini-batch rule, batched."""
        if not self._pending_X:
            return
        X = np.concatenate(self._pending_X)
        labels = np.concatenate(self._pending_labels)
        self._pending_X, self._pending_labels = [], []
        row_of = np.full(self._next_id, -1, np.int64)
        row_of[self._ids] = np.arange(len(self._ids))
        rows = row_of[labels]
        uniq, inv, m = np.unique(rows, return_inverse=True, return_counts=True)
        onehot = sparse.csr_matrix((np.ones(len(rows)), (inv, np.arange(len(rows)))),
                                   shape=(len(uniq), len(rows)))
        sums = np.asarray(onehot @ X.astype(np.float64))  # per-centre sums, one sparse product
        old = self._counts[uniq]
        new_c = (self._centroids[uniq].astype(np.float64) * old[:, None] + sums) / (old + m)[:, None]
        self._centroids[uniq] = new_c.astype(np.float32)
        self._counts[uniq] = old + m
        self._rebuild_index()

    def split(self, cluster_id: int, X_members: np.ndarray) -> tuple[int, int]:
        """Learning counts follow the 2-means member fractions (rounded, total conserved)."""
        self.flush()
        row = self._row(cluster_id)
        centres, frac = _two_means(X_members, self.seed + cluster_id, self._limits())
        ca, cb = _split_count(int(self._counts[row]), float(frac[0]))
        a, b = self._new_id(cluster_id), self._new_id(cluster_id)
        keep = np.arange(len(self._ids)) != row
        self._centroids = np.vstack([self._centroids[keep], centres])
        self._counts = np.concatenate([self._counts[keep], [ca, cb]]).astype(np.int64)
        self._ids = [c for c in self._ids if c != cluster_id] + [a, b]
        self.retired.append(cluster_id)
        self._rebuild_index()
        return a, b

    def get_state(self) -> dict[str, Any]:
        pending_X = (np.concatenate(self._pending_X) if self._pending_X
                     else np.zeros((0, self._centroids.shape[1]), np.float32))
        pending_l = (np.concatenate(self._pending_labels) if self._pending_labels
                     else np.zeros(0, np.int64))
        return {**self._ids_state(), "centroids": self._centroids.copy(), "counts": self._counts.copy(),
                "pending_X": pending_X, "pending_labels": pending_l}

    def set_state(self, state: dict[str, Any]) -> None:
        self._set_ids_state(state)
        self._centroids = _as_f32(state["centroids"]).copy()
        self._counts = np.asarray(state["counts"], dtype=np.int64).copy()
        px, pl = state["pending_X"], state["pending_labels"]
        self._pending_X = [_as_f32(px).copy()] if len(px) else []
        self._pending_labels = [np.asarray(pl, dtype=np.int64).copy()] if len(pl) else []
        self._index = None
        if self._ids:
            self._rebuild_index()


class RiverEngine(ClusterEngine):
    """river ``cluster.KMeans`` over dict features: learns one row at a time (slow: ~hundreds/s).

    River's centre keys are the public ids, so ids stay stable and splits just swap keys.  River
    starts centres at N(mu, sigma) noise, far from unit vectors, so ``fit_initial`` seeds them with
    k_initial distinct warm-up rows (Forgy init) and then streams the warm-up through ``learn_one``.
    Margins are computed with numpy on a mirror of the centres (river only returns the nearest).
    """

    name = "river"

    def __init__(self, k_initial: int, seed: int = 0, threads: int | None = 1,
                 halflife: float = 0.05) -> None:
        super().__init__(k_initial, seed, threads)
        self.halflife = halflife
        self._model = river_cluster.KMeans(n_clusters=k_initial, halflife=halflife, seed=seed)
        self._mirror = np.zeros((0, 0), dtype=np.float64)  # float64, like river's own centres

    @property
    def centroids(self) -> np.ndarray:
        return self._mirror.astype(np.float32)

    def _center_dict(self, vec: np.ndarray) -> collections.defaultdict:
        factory = functools.partial(self._model._rng.gauss, self._model.mu, self._model.sigma)
        return collections.defaultdict(factory, enumerate(vec.tolist()))

    def _load_centres(self, ids: list[int], centres: np.ndarray) -> None:
        self._ids = list(ids)
        self._mirror = np.array(centres, dtype=np.float64)
        self._model.centers = {cid: self._center_dict(c) for cid, c in zip(ids, self._mirror, strict=True)}

    def _margin(self, x: np.ndarray) -> tuple[int, int, float]:
        d = np.linalg.norm(self._mirror - x, axis=1)
        two = np.argsort(d)[:2]
        return self._ids[two[0]], self._ids[two[1]], float(d[two[1]] - d[two[0]])

    def fit_initial(self, X: np.ndarray) -> None:
        X = _as_f32(X)
        uniq = np.unique(X, axis=0)
        if len(uniq) < self.k_initial:
            raise ValueError(f"need >= k_initial={self.k_initial} distinct vectors, got {len(uniq)}")
        pick = np.random.default_rng(self.seed).choice(len(uniq), self.k_initial, replace=False)
        self._load_centres([self._new_id(None) for _ in range(self.k_initial)], uniq[np.sort(pick)])
        self.observe(X)

    def observe(self, X: np.ndarray) -> Assignment:
        X = _as_f32(X)
        n = len(X)
        labels, second = np.empty(n, np.int64), np.empty(n, np.int64)
        margin = np.empty(n, np.float32)
        for i, x in enumerate(X):
            _, second[i], margin[i] = self._margin(x)
            cid = self._model.learn_predict_one(dict(enumerate(x.tolist())))
            labels[i] = cid
            centre = self._model.centers[cid]
            self._mirror[self._ids.index(cid)] = [centre[j] for j in range(len(x))]
        return Assignment(labels, second, margin)

    def nearest(self, X: np.ndarray) -> Assignment:
        X = np.asarray(X, dtype=np.float64)
        d = np.sqrt(np.maximum(
            (X * X).sum(1)[:, None] - 2 * X @ self._mirror.T + (self._mirror ** 2).sum(1)[None, :], 0.0))
        two = np.argsort(d, axis=1)[:, :2]
        ids = np.asarray(self._ids, dtype=np.int64)
        rows = np.arange(len(X))
        return Assignment(ids[two[:, 0]], ids[two[:, 1]],
                          (d[rows, two[:, 1]] - d[rows, two[:, 0]]).astype(np.float32))

    def split(self, cluster_id: int, X_members: np.ndarray) -> tuple[int, int]:
        row = self._row(cluster_id)
        centres, _ = _two_means(X_members, self.seed + cluster_id, self._limits())
        a, b = self._new_id(cluster_id), self._new_id(cluster_id)
        keep = np.arange(len(self._ids)) != row
        ids = [c for c in self._ids if c != cluster_id] + [a, b]
        self._load_centres(ids, np.vstack([self._mirror[keep], centres]))
        self.retired.append(cluster_id)
        return a, b

    def get_state(self) -> dict[str, Any]:
        return {**self._ids_state(), "centroids": self._mirror.copy(), "halflife": self.halflife}

    def set_state(self, state: dict[str, Any]) -> None:
        self._set_ids_state(state)
        self.halflife = float(state["halflife"])
        self._model = river_cluster.KMeans(n_clusters=self.k_initial, halflife=self.halflife, seed=self.seed)
        self._load_centres(self._ids, np.asarray(state["centroids"]))


def make_engine(kind: str, k_initial: int, seed: int = 0, threads: int | None = 1) -> ClusterEngine:
    """Engine by config name (``ClustererConfig.engine``)."""
    engines: dict[str, type[ClusterEngine]] = {"minibatch": MiniBatchEngine, "river": RiverEngine}
    if kind not in engines:
        raise ValueError(f"unknown clusterer engine {kind!r}; choose from {sorted(engines)}")
    return engines[kind](k_initial, seed, threads)
