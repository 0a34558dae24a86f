"""The clusterer's whole state: counts, reservoirs, tests and uncertainty, restorable from bytes.

Counting rules (they make the divergence test valid and restores exact):

* Every text is counted once (dedupe by a 64-bit digest of ``text_id``; re-delivered events are
  skipped) and in the cluster it was nearest to *at arrival*; counts are never recomputed.  A text
  is marked seen only when it is ingested: a call that raises (a bad vector, an unknown role)
  changes nothing, so a retry ingests it.
* Every decision is taken at a fixed position of the stream, never at the end of a delivery:
  centroids learn in chunks of ``cfg.batch_size`` texts, candidates and uncertainty are checked at
  every ``cfg.check_every``-th text (and at :meth:`ClusterState.checkpoint`, a caller's barrier),
  growth runs at every ``cfg.split_every``-th text.  Randomness (reservoirs) comes from one seeded
  generator drawn three times per text, in stream order, and is saved with the state.  So events
  and saved bytes are functions of the stream (and the barriers) alone, not of how the consumer's
  deliveries were cut.  What still depends on time: ``snapshot_seq`` in events (the service takes
  snapshots every ``snapshot_every_s``) and a snapshot's map orientation and stability figures.
* Per cluster two count pairs: ``own`` (texts assigned to this id since it was created) and
  ``inherited`` (a share of the parent's counts at a split).  Displayed counts are own + inherited;
  the share, its confidence sequence and the e-value use ``own`` only: inherited counts are
  estimates from a role-labelled reservoir, not a sequence of Bernoulli draws, so testing them
  would void Ville's inequality.  Under the paired design P(intervention | cluster) = 0.5 for any
  cluster when nothing differs, so ``own`` is a fair-coin sequence under H0 *provided* the order
  in which a pair's two texts arrive does not depend on the role (shuffle within a pair upstream).
* At a split the children inherit the parent's displayed counts in proportion to its member
  vectors nearer each (:func:`services.clusterer.growth.inherited_counts`; totals conserved).
  Children's text reservoirs start empty (labels and holdouts come from texts they were assigned).
* Cluster ids are created 0, 1, 2, ...; id j is tested at ``spending_level(j, alpha)``, so the
  family-wise error over every cluster ever created and every look is <= alpha
  (:mod:`services.stats.share_tests`).  With ``parting_alpha_share`` > 0 the children of splits
  chosen because the two models part there spend that share of alpha among themselves, the other
  clusters the rest (each family in creation order; a child's family is fixed at its creation).

Jobs live in their own modules: sampling in :mod:`.reservoir`, the split policy in :mod:`.growth`,
candidate events in :mod:`.candidates`, snapshots in :mod:`.snapshot`, bytes in :mod:`.persist`.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from services.clusterer import candidates, persist, snapshot
from services.clusterer.arrivals import ROLE_CODE, check_rows, decode_vectors, digest, is_label_split
from services.clusterer.candidates import text_key
from services.clusterer.engines import Assignment, ClusterEngine, make_engine
from services.clusterer.growth import choose_splits, inherited_counts, regrown, role_divergence
from services.clusterer.persist import CorruptStateError
from services.clusterer.reservoir import Reservoir, reservoir_slots
from services.clusterer.uncertainty import ClusterView, RefTuple, UncertaintyTracker, ref_of
from services.core.config import ClustererConfig
from services.core.events import (
    CandidateCluster,
    ClusterSnapshot,
    EmbeddedText,
    TextRef,
    UncertaintyEvent,
)
from services.stats.share_tests import Spending, crossed

__all__ = ["ClusterState", "CorruptStateError", "IngestResult", "decode_vectors", "digest", "is_label_split",
           "reservoir_slots", "role_divergence", "text_key"]

log = logging.getLogger("autointerv.clusterer")


@dataclass
class IngestResult:
    uncertainty: list[UncertaintyEvent]
    candidates: list[CandidateCluster]
    n_new: int
    n_duplicates: int


class ClusterState:
    """Online clusters for one experiment; the service feeds it and saves ``to_bytes()``."""

    def __init__(self, cfg: ClustererConfig, experiment_id: str, alpha: float = 0.05) -> None:
        if cfg.warmup < cfg.k_initial:
            raise ValueError(f"clusterer.warmup ({cfg.warmup}) must be >= k_initial ({cfg.k_initial})")
        self.cfg = cfg
        self.experiment_id = experiment_id
        self.alpha = alpha
        self.engine: ClusterEngine = make_engine(cfg.engine, cfg.k_initial, cfg.seed, cfg.threads)
        self.tracker = UncertaintyTracker(cfg, experiment_id, alpha)
        share = cfg.parting_alpha_share  # family 1: clusters born of a split where the models part
        self.spending = Spending(alpha, (1.0 - share, share) if share else (1.0,))
        self._rng = np.random.default_rng(cfg.seed)
        self.seq = 0
        self.n_processed = 0  # unique texts fed to the engine (warm-up included once fitted)
        self.role_totals = np.zeros(2, np.int64)  # unique texts per role, buffered ones included
        self._seen: dict[int, int] = {}  # digest -> cluster id at arrival (-1 while buffered)
        self._dim: int | None = None
        self._warm_X: list[np.ndarray] = []
        self._warm_meta: list[RefTuple] = []
        self._warm_keys: list[int] = []
        self._own = np.zeros((0, 2), np.int64)  # indexed by cluster id (ids are dense)
        self._inherited = np.zeros((0, 2), np.int64)
        self._emitted: set[int] = set()
        self._emitted_at: dict[int, int] = {}  # cluster id -> own texts when it became a candidate
        # samples: texts per cluster, role and split (key text_key(cid, role, label)); member
        # vectors per cluster (splits, quality); texts per role and split from everywhere (contrasts)
        self.texts = Reservoir(cfg.reservoir_size)
        self.members = Reservoir(cfg.vector_reservoir_size, vector_field=1)  # (role, float16 vector)
        self.global_texts = Reservoir(cfg.global_reservoir_size)  # key: text_key(0, role, label)
        self._prev_centroids: np.ndarray | None = None
        self._prev_ids: np.ndarray | None = None
        self._pca: np.ndarray | None = None
        self._centroids_sent: set[int] = set()  # ids whose centroid a snapshot carried
        self._centroids_full_seq: int | None = None  # seq of the last snapshot carrying all of them

    # ================================================================== ingest
    def ingest(self, items: list[EmbeddedText]) -> IngestResult:
        """Dedupe, assign at arrival, count, learn, grow; return what became due."""
        keep, keys = self._fresh([it.text_id for it in items])
        if not keep:
            return IngestResult([], [], 0, len(items))
        fresh = [items[i] for i in keep]  # decode only what is new: re-deliveries cost a hash
        X = decode_vectors(fresh)
        return self._ingest_fresh(keys, [it.text_id for it in fresh], [it.prompt_id for it in fresh],
                                  [it.role for it in fresh], [it.text for it in fresh], X,
                                  len(items) - len(keep))

    def ingest_arrays(self, text_ids: list[str], prompt_ids: list[str], roles: list[str], texts: list[str],
                      X: np.ndarray) -> IngestResult:
        """The same as :meth:`ingest` on already decoded columns (the fast path benchmarks use)."""
        keep, keys = self._fresh(text_ids)
        if not keep:
            return IngestResult([], [], 0, len(text_ids))
        return self._ingest_fresh(keys, [text_ids[i] for i in keep], [prompt_ids[i] for i in keep],
                                  [roles[i] for i in keep], [texts[i] for i in keep],
                                  np.asarray(X)[keep], len(text_ids) - len(keep))

    def _fresh(self, text_ids: list[str]) -> tuple[list[int], list[int]]:
        """Indices and digests of ids never seen before (repeats within the batch count once)."""
        keep, keys, batch = [], [], set()
        for i, tid in enumerate(text_ids):
            key = digest(tid)
            if key not in self._seen and key not in batch:
                batch.add(key)
                keep.append(i)
                keys.append(key)
        return keep, keys

    def _ingest_fresh(self, keys: list[int], text_ids: list[str], prompt_ids: list[str], roles: list[str],
                      texts: list[str], X: np.ndarray, n_dup: int) -> IngestResult:
        X = np.ascontiguousarray(X, dtype=np.float32)
        check_rows(X, text_ids, roles, self._dim)  # before any change: a bad row leaves the state as it was
        self._dim = X.shape[1]
        role_codes = np.fromiter((ROLE_CODE[r] for r in roles), dtype=np.int64, count=len(roles))
        meta: list[RefTuple] = list(zip(text_ids, prompt_ids, role_codes.tolist(), texts, strict=True))
        self.role_totals += np.bincount(role_codes, minlength=2)
        out = IngestResult([], [], len(meta), n_dup)
        start = 0
        if not self.engine.fitted:
            start = min(self.cfg.warmup - len(self._warm_X), len(meta))
            self._seen.update(dict.fromkeys(keys[:start], -1))  # buffered; the rest is marked by _record
            self._warm_X.extend(X[:start])
            self._warm_meta.extend(meta[:start])
            self._warm_keys.extend(keys[:start])
            if len(self._warm_X) >= self.cfg.warmup:
                self._fit_warmup()
                self._due(out)
        while start < len(meta):
            start = self._process_until_boundary(X, meta, keys, start, out)
        return out

    def checkpoint(self) -> IngestResult:
        """Candidates and uncertainty events due at the current stream position.

        Checks otherwise run only at fixed positions (every ``check_every``-th text), so a caller
        with a barrier (a sampling round completely ingested) calls this to see its last texts
        tested; the barrier's position then becomes part of what the stream determines."""
        out = IngestResult([], [], 0, 0)
        self._due(out)
        return out

    def _due(self, out: IngestResult) -> None:
        out.candidates += self._check_candidates()
        out.uncertainty += self._uncertainty()

    def _process_until_boundary(self, X: np.ndarray, meta: list[RefTuple], keys: list[int], start: int,
                                out: IngestResult) -> int:
        """Process rows up to the next learning/check/growth position of the stream; return the
        next row.  Every decision is taken at a position, never at the end of a delivery."""
        pos, bs, se, ce = self.n_processed, self.cfg.batch_size, self.cfg.split_every, self.cfg.check_every
        nxt = min((pos // bs + 1) * bs, (pos // se + 1) * se, (pos // ce + 1) * ce)
        end = min(len(meta), start + nxt - pos)
        self._record(self.engine.observe(X[start:end]), X[start:end], meta[start:end], keys[start:end])
        self.n_processed += end - start
        n = self.n_processed
        if n % bs == 0:
            self.engine.flush()
        if n % ce == 0:
            self._due(out)
        elif n % se == 0:
            out.candidates += self._check_candidates()  # parents may cross the threshold just before a split
        if n % se == 0:
            self._grow()
        return end

    def _fit_warmup(self) -> None:
        X = np.stack(self._warm_X)
        self.engine.fit_initial(X)
        a = self.engine.nearest(X)
        self._record(a, X, self._warm_meta, self._warm_keys)
        self.n_processed += len(self._warm_meta)
        self._warm_X, self._warm_meta, self._warm_keys = [], [], []
        log.info("clusterer %s: fitted %d initial clusters on %d texts", self.experiment_id,
                 len(self.engine.ids), len(X))

    def _ensure_capacity(self) -> None:
        need = self.engine.n_created
        if len(self._own) < need:
            grow = max(need, 2 * len(self._own)) - len(self._own)
            self._own = np.vstack([self._own, np.zeros((grow, 2), np.int64)])
            self._inherited = np.vstack([self._inherited, np.zeros((grow, 2), np.int64)])

    def _record(self, a: Assignment, X: np.ndarray, meta: list[RefTuple], keys: list[int]) -> None:
        """Count, sample and track one piece of arrivals (labels fixed at arrival)."""
        self._ensure_capacity()
        labels = a.labels
        roles = np.fromiter((m[2] for m in meta), dtype=np.int64, count=len(meta))
        is_label = np.fromiter((is_label_split(m[0], self.cfg.label_fraction) for m in meta),
                               dtype=bool, count=len(meta))
        np.add.at(self._own, (labels, roles), 1)
        self._seen.update(zip(keys, labels.tolist(), strict=True))
        u = self._rng.random((len(meta), 3))  # one draw per text for each kind of sample, in stream order
        self.texts.offer(labels * 4 + roles * 2 + is_label, u[:, 0], meta)
        self.members.offer(labels, u[:, 1], lambda i: (int(roles[i]), X[i].astype(np.float16)))
        self.global_texts.offer(roles * 2 + is_label, u[:, 2], meta)
        self.tracker.observe(labels, roles, a.margin, a.second, meta.__getitem__, is_label)

    # ================================================================== growth
    def _grow(self) -> None:
        """Split toward k_max by the policy of :mod:`services.clusterer.growth`."""
        centroids = self.engine.centroids
        active = [(cid, int(self._own[cid].sum() + self._inherited[cid].sum()), centroids[row])
                  for row, cid in enumerate(self.engine.ids)]
        regrowing = regrown(self.cfg, self._emitted_at, lambda c: int(self._own[c].sum()),
                            lambda c: len(self.members.get(c)))
        for cid, parting in choose_splits(self.cfg, active, self._members, regrowing):
            self._split(cid, parting)

    def _members(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        items = self.members.get(cid)
        if not items:
            return np.zeros((0, self._dim or 0), np.float32), np.zeros(0, np.int8)
        return (np.stack([v for _, v in items]).astype(np.float32),
                np.fromiter((r for r, _ in items), np.int8, len(items)))

    def _split(self, cid: int, parting: bool = False) -> None:
        Xr, roles = self._members(cid)
        try:
            a, b = self.engine.split(cid, Xr)
        except ValueError as exc:
            log.debug("cluster %d not split: %s", cid, exc)
            return
        self._ensure_capacity()
        for child in (a, b):  # the alpha family is fixed now, before any text of the child is counted
            self.spending.level(child - 1)  # ids created before (initial fit) into family 0
            self.spending.add(int(parting))
        ca, cb = self.engine.centroid_of(a), self.engine.centroid_of(b)
        to_a = np.linalg.norm(Xr - ca, axis=1) <= np.linalg.norm(Xr - cb, axis=1)
        parent_total = self._own[cid] + self._inherited[cid]
        self._inherited[[a, b]] = inherited_counts(parent_total, to_a, roles)
        for child, sel in ((a, to_a), (b, ~to_a)):
            rows = [(int(r), x.astype(np.float16)) for r, x in zip(roles[sel], Xr[sel], strict=True)]
            self.members.replace(child, rows)
        self.members.drop(cid)
        self._emitted_at.pop(cid, None)
        for key in range(text_key(cid, 0, False), text_key(cid, 1, True) + 1):  # never used again
            self.texts.drop(key)
        self.tracker.retire(cid)
        log.info("clusterer %s: split cluster %d (%d texts) into %d and %d", self.experiment_id, cid,
                 int(parent_total.sum()), a, b)

    # ================================================================== tests and events
    def _view(self) -> ClusterView:
        ids = np.asarray(self.engine.ids, dtype=np.int64)
        own = self._own[ids] if len(ids) else np.zeros((0, 2), np.int64)
        total = (own + self._inherited[ids]).sum(axis=1) if len(ids) else np.zeros(0, np.int64)
        return ClusterView(ids, own, total, np.array([c in self._emitted for c in ids.tolist()], dtype=bool))

    def _check_candidates(self) -> list[CandidateCluster]:
        if not self.engine.fitted:
            return []
        view = self._view()
        levels = np.array([self.spending.level(int(c)) for c in view.ids])
        rows, log_e = crossed(view.ids, view.own, view.emitted, levels, self.cfg.min_cluster_texts)
        out = []
        for row in rows.tolist():
            cid = int(view.ids[row])
            self._emitted.add(cid)
            self._emitted_at[cid] = int(view.own[row].sum())
            out.append(candidates.cluster_candidate(self, cid, float(log_e[row])))
        return out

    def refs(self, cid: int, role: int, label: bool) -> list[TextRef]:
        """A cluster's sampled texts of one role, label split or held out."""
        return [ref_of(t) for t in self.texts.get(text_key(cid, role, label))]

    def exemplars(self, cid: int) -> list[TextRef]:
        """Up to 8 label-split texts of a cluster, both roles interleaved (never holdout texts)."""
        b, i = self.refs(cid, 0, True), self.refs(cid, 1, True)
        mixed = [t for pair in zip(b, i, strict=False) for t in pair] + b[len(i):] + i[len(b):]
        return mixed[:8]

    def _uncertainty(self) -> list[UncertaintyEvent]:
        if not self.engine.fitted:
            return []
        return self.tracker.check(self.n_processed, self._view(), self.exemplars, self.seq)

    def snapshot(self) -> ClusterSnapshot:
        """Per-cluster stats (share/CI/e-value on ``own`` counts, CI at ``alpha``) and quality."""
        return snapshot.take(self)

    # ================================================================== small queries
    @property
    def n_candidates(self) -> int:
        """Clusters reported as candidates so far."""
        return len(self._emitted)

    @property
    def dim(self) -> int | None:
        """Dimension of the vectors ingested so far (None before the first)."""
        return self._dim

    def has_seen(self, text_id: str) -> bool:
        """True once the text was ingested (buffered for warm-up included)."""
        return digest(text_id) in self._seen

    def cluster_of(self, text_id: str) -> int | None:
        """Cluster id the text was assigned at arrival (may since be retired); None if unseen/buffered."""
        cid = self._seen.get(digest(text_id))
        return None if cid is None or cid < 0 else cid

    def counts(self) -> dict[int, tuple[int, int]]:
        """Active cluster id -> (base, intervention) displayed counts (own + inherited)."""
        return {cid: (int(self._own[cid, 0] + self._inherited[cid, 0]),
                      int(self._own[cid, 1] + self._inherited[cid, 1])) for cid in self.engine.ids}

    def own_counts(self) -> dict[int, tuple[int, int]]:
        """Every id ever created -> (base, intervention) texts assigned to it since its creation."""
        return {cid: (int(self._own[cid, 0]), int(self._own[cid, 1])) for cid in range(self.engine.n_created)}

    def top_terms(self, cluster_id: int, k: int = 8) -> list[str]:
        """Words most over-represented in the cluster's label-split texts vs all others' (log-odds)."""
        word = re.compile(r"[a-z][a-z'-]{2,}")
        mine: Counter[str] = Counter()
        rest: Counter[str] = Counter()
        for key, refs in self.texts.items.items():
            if key % 2 == 0:  # label split only: held-out texts must not shape any description
                continue
            target = mine if key // 4 == cluster_id else rest
            for t in refs:
                target.update(word.findall(t[3].lower()))
        n_m, n_r = sum(mine.values()) + 1, sum(rest.values()) + 1
        score = {w: math.log((c + 1) / n_m) - math.log((rest[w] + 1) / n_r) for w, c in mine.items()}
        return [w for w, _ in sorted(score.items(), key=lambda x: (-x[1], x[0]))[:k]]

    # ================================================================== persistence
    def to_bytes(self) -> bytes:
        """np.savez (no pickle) of the arrays plus zlib(orjson) metadata (see :mod:`.persist`)."""
        return persist.to_bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes, cfg: ClustererConfig) -> ClusterState:
        """Rebuild a state saved by :meth:`to_bytes` (ADWIN detectors are rebuilt by replay).

        :class:`CorruptStateError` when the bytes do not read back or hold a non-finite value
        (ValueError for a state that is sound but does not fit ``cfg``)."""
        return persist.from_bytes(cls, data, cfg)

    @classmethod
    def after_corrupt(cls, data: bytes, cfg: ClustererConfig, experiment_id: str,
                      alpha: float = 0.05) -> ClusterState:
        """An empty state that continues a corrupt one's cluster ids and snapshot numbers.

        New ids start after every id the old state created, so its alpha-spending levels are
        never spent twice (family-wise error over both states <= alpha) and no candidate id is
        reused; snapshots keep counting up, so consumers never see a reused seq.
        :class:`CorruptStateError` when not even the metadata reads (then nothing is safe to
        assume and an operator must decide)."""
        next_id, seq = persist.saved_counters(data)
        st = cls(cfg, experiment_id, alpha)
        st.engine._next_id = next_id
        st.seq = seq
        return st
