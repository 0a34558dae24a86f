"""The clusterer's whole state: counts, reservoirs, tests and uncertainty, restorable from bytes.

Counting rules (they make the divergence test valid and restores exact):

* Every text is counted once (dedupe by a 64-bit digest of ``text_id``; re-delivered events are
  skipped) and in the cluster it was nearest to *at arrival*; counts are never recomputed.
* Centroids learn in fixed chunks of ``cfg.batch_size`` texts of the stream (positions, not
  deliveries) and growth runs at every ``cfg.split_every``-th text, so the result does not depend
  on how the consumer's deliveries were cut; randomness (reservoirs) comes from one seeded
  generator drawn three times per text, in stream order, and is saved with the state.
* Per cluster two count pairs: ``own`` (texts assigned to this id since it was created) and
  ``inherited`` (a share of the parent's counts at a split).  Displayed counts are own + inherited;
  the share, its confidence sequence and the e-value use ``own`` only: inherited counts are
  estimates from a role-labelled reservoir, not a sequence of Bernoulli draws, so testing them
  would void Ville's inequality.  Under the paired design P(intervention | cluster) = 0.5 for any
  cluster when nothing differs, so ``own`` is a fair-coin sequence under H0 *provided* the order
  in which a pair's two texts arrive does not depend on the role (shuffle within a pair upstream).
* At a split, for each role r with N_r parent texts (own + inherited) and m_r parent reservoir
  vectors of role r, of which m_ra are nearer child a: child a inherits round(N_r * m_ra / m_r) and
  child b the rest (the overall reservoir fraction when m_r = 0), so totals are conserved exactly.
  Children's text reservoirs start empty (labels and holdouts come from texts they were assigned).
* Cluster ids are created 0, 1, 2, ...; id j is tested at ``spending_level(j, alpha)``, so the
  family-wise error over every cluster ever created and every look is <= alpha.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from sklearn.decomposition import PCA

from services.clusterer.engines import Assignment, ClusterEngine, make_engine
from services.clusterer.quality import cluster_quality
from services.clusterer.uncertainty import ClusterView, RefTuple, UncertaintyTracker, ref_of
from services.core.config import ClustererConfig
from services.core.events import (
    ROLES,
    CandidateCluster,
    ClusterQuality,
    ClusterSnapshot,
    ClusterStats,
    EmbeddedText,
    TextRef,
    UncertaintyEvent,
    stable_id,
    vector_bytes,
)
from services.stats.sequential import beta_binomial_log_e_many, confidence_sequence_bernoulli, spending_level

log = logging.getLogger("autointerv.clusterer")

STATE_VERSION = 1
ROLE_CODE = {"base": 0, "intervention": 1}
MIN_SPLIT_MEMBERS = 8
MAX_LOG_E = 700.0  # exp() of more overflows a float; such evidence is decisive anyway


@dataclass
class IngestResult:
    uncertainty: list[UncertaintyEvent]
    candidates: list[CandidateCluster]
    n_new: int
    n_duplicates: int


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


def reservoir_slots(keys: np.ndarray, u: np.ndarray, seen: dict[int, int],
                    size: int) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm R for many keyed reservoirs at once: (row indices kept, slot of each), in order.

    Row i is the c-th item of its key (c counted over the whole stream); it fills slot c-1 while
    c <= size, else replaces slot floor(u_i * c) when that is < size.  ``seen`` is updated.
    Vectorised because a per-row Python loop would cost more than the clustering itself.
    """
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    uniq, starts, counts = np.unique(keys[order], return_index=True, return_counts=True)
    base = np.fromiter((seen.get(int(k), 0) for k in uniq), dtype=np.int64, count=len(uniq))
    c_sorted = np.arange(len(keys)) - np.repeat(starts, counts) + 1 + np.repeat(base, counts)
    c = np.empty_like(c_sorted)
    c[order] = c_sorted
    for k, b, n in zip(uniq.tolist(), base.tolist(), counts.tolist(), strict=True):
        seen[k] = b + n
    slot = np.where(c <= size, c - 1, np.floor(u * c).astype(np.int64))
    keep = np.flatnonzero(slot < size)
    return keep, slot[keep]


def role_divergence(X: np.ndarray, roles: np.ndarray, min_per_role: int = 4) -> tuple[float, float]:
    """(unbiased squared distance between the two roles' mean vectors, its noise term
    tr(S_0)/n_0 + tr(S_1)/n_1); (0, inf) when a role has too few samples."""
    parts = [X[roles == r] for r in (0, 1)]
    if min(len(p) for p in parts) < min_per_role:
        return 0.0, float("inf")
    means = [p.mean(axis=0) for p in parts]
    noise = sum(float(((p - m) ** 2).sum()) / (len(p) - 1) / len(p) for p, m in zip(parts, means, strict=True))
    return float(((means[0] - means[1]) ** 2).sum()) - noise, noise


def _put(items: list[Any], slot: int, value: Any) -> None:
    if slot == len(items):
        items.append(value)
    else:
        items[slot] = value


def _nearest(X: np.ndarray, centroids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    d = (X * X).sum(1)[:, None] - 2 * X @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return ids[np.argmin(d, axis=1)]


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
        self._text_seen: dict[int, int] = {}  # key cid*4 + role*2 + is_label -> items offered
        self._text_res: dict[int, list[RefTuple]] = {}
        self._vec_seen: dict[int, int] = {}
        self._vec_res: dict[int, tuple[np.ndarray, np.ndarray, list[int]]] = {}  # X f16, roles, [filled]
        self._glob_seen: dict[int, int] = {}  # role -> holdout texts offered
        self._glob_res: dict[int, list[RefTuple]] = {0: [], 1: []}
        # label-split texts from everywhere, per role: the labeler's contrast for one-sided clusters
        self._glob_label_seen: dict[int, int] = {}
        self._glob_label_res: dict[int, list[RefTuple]] = {0: [], 1: []}
        self._prev_centroids: np.ndarray | None = None
        self._prev_ids: np.ndarray | None = None
        self._pca: np.ndarray | None = None

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
        self._check_rows(X, text_ids, roles)  # before any change: a bad row leaves the state as it was
        self._dim = X.shape[1]
        role_codes = np.fromiter((ROLE_CODE[r] for r in roles), dtype=np.int64, count=len(roles))
        meta: list[RefTuple] = list(zip(text_ids, prompt_ids, role_codes.tolist(), texts, strict=True))
        self.role_totals += np.bincount(role_codes, minlength=2)
        candidates: list[CandidateCluster] = []
        start = 0
        if not self.engine.fitted:
            start = min(self.cfg.warmup - len(self._warm_X), len(meta))
            self._seen.update(dict.fromkeys(keys[:start], -1))  # buffered; the rest is marked by _record
            self._warm_X.extend(X[:start])
            self._warm_meta.extend(meta[:start])
            self._warm_keys.extend(keys[:start])
            if len(self._warm_X) >= self.cfg.warmup:
                self._fit_warmup()
        while start < len(meta):
            start = self._process_until_boundary(X, meta, keys, start, candidates)
        candidates += self._check_candidates()
        return IngestResult(self._uncertainty(), candidates, len(meta), n_dup)

    def _check_rows(self, X: np.ndarray, text_ids: list[str], roles: list[str]) -> None:
        """ValueError naming the first bad row: wrong dim, non-finite values or an unknown role."""
        if X.ndim != 2 or X.shape[1] != (self._dim or X.shape[1]) or X.shape[0] != len(text_ids):
            raise ValueError(f"expected {len(text_ids)} vectors of dim {self._dim}, got shape {X.shape}")
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        if len(bad):
            raise ValueError(f"text {text_ids[bad[0]]}: non-finite values in its vector "
                             f"({len(bad)} such row(s) in this call)")
        unknown = set(roles) - ROLE_CODE.keys()
        if unknown:
            raise ValueError(f"unknown role(s) {sorted(unknown)}; expected one of {sorted(ROLE_CODE)}")

    def _process_until_boundary(self, X: np.ndarray, meta: list[RefTuple], keys: list[int], start: int,
                                candidates: list[CandidateCluster]) -> int:
        """Process rows up to the next learning/growth position of the stream; return the next row."""
        pos, bs, se = self.n_processed, self.cfg.batch_size, self.cfg.split_every
        nxt = min((pos // bs + 1) * bs, (pos // se + 1) * se)
        end = min(len(meta), start + nxt - pos)
        self._record(self.engine.observe(X[start:end]), X[start:end], meta[start:end], keys[start:end])
        self.n_processed += end - start
        if self.n_processed % bs == 0:
            self.engine.flush()
        if self.n_processed % se == 0:
            candidates += self._check_candidates()  # parents may cross the threshold just before a split
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
        u = self._rng.random((len(meta), 3))
        keep, slots = reservoir_slots(labels * 4 + roles * 2 + is_label, u[:, 0], self._text_seen,
                                      self.cfg.reservoir_size)
        for i, s in zip(keep.tolist(), slots.tolist(), strict=True):
            key = int(labels[i] * 4 + roles[i] * 2 + is_label[i])
            _put(self._text_res.setdefault(key, []), s, meta[i])
        self._offer_vectors(labels, roles, X, u[:, 1])
        hold = np.flatnonzero(~is_label)
        keep, slots = reservoir_slots(roles[hold], u[hold, 2], self._glob_seen,
                                      self.cfg.global_reservoir_size)
        for i, s in zip(hold[keep].tolist(), slots.tolist(), strict=True):
            _put(self._glob_res[int(roles[i])], s, meta[i])
        lab = np.flatnonzero(is_label)  # disjoint from `hold`, so the same draw serves both
        keep, slots = reservoir_slots(roles[lab], u[lab, 2], self._glob_label_seen,
                                      self.cfg.global_reservoir_size)
        for i, s in zip(lab[keep].tolist(), slots.tolist(), strict=True):
            _put(self._glob_label_res[int(roles[i])], s, meta[i])
        self.tracker.observe(labels, roles, a.margin, a.second, meta.__getitem__, is_label)

    def _offer_vectors(self, labels: np.ndarray, roles: np.ndarray, X: np.ndarray, u: np.ndarray) -> None:
        size = self.cfg.vector_reservoir_size
        keep, slots = reservoir_slots(labels, u, self._vec_seen, size)
        for i, s in zip(keep.tolist(), slots.tolist(), strict=True):
            cid = int(labels[i])
            if cid not in self._vec_res:
                self._vec_res[cid] = (np.zeros((size, X.shape[1]), np.float16), np.zeros(size, np.int8), [0])
            vx, vr, filled = self._vec_res[cid]
            vx[s], vr[s] = X[i], roles[i]
            filled[0] = max(filled[0], s + 1)

    # ================================================================== growth
    def _grow(self) -> None:
        """Split toward k_max: first reported clusters that kept growing (:meth:`_regrown`), then
        the clusters whose two sides sit apart, then by estimated SSE.

        A cluster that mixes a behaviour with the ordinary texts of the same prompts keeps a 50/50
        share (generation is paired), so its share test cannot fire until the behaviour has its
        own cluster.  The role-aware score finds such clusters: the bias-corrected squared
        distance between the two roles' mean vectors in the cluster's vector sample.  Choosing
        splits with role labels does not bias the tests, which count only texts assigned to the
        children after the split (``own`` counts).
        """
        room = self.cfg.k_max - len(self.engine.ids)
        if room <= 0:
            return
        sse, mixed = [], []
        for row, cid in enumerate(self.engine.ids):
            total = int(self._own[cid].sum() + self._inherited[cid].sum())
            Xr, roles = self._members(cid)
            if total < min(self.cfg.split_min_size, self.cfg.mixed_split_min_size) or len(Xr) < MIN_SPLIT_MEMBERS:
                continue
            div, noise = role_divergence(Xr, roles)
            # a small cluster is split only when its two sides clearly sit apart (divergence above
            # its own noise term); a large one whenever they do, or by size
            if div > 0 and (total >= self.cfg.split_min_size or div >= noise):
                mixed.append((div, cid))
            if total >= self.cfg.split_min_size:
                disp = float(np.mean(np.sum((Xr - self.engine.centroids[row]) ** 2, axis=1)))
                sse.append((total * disp, cid))
        budget = min(room, self.cfg.max_splits_per_check)
        chosen = [cid for _, cid in sorted(self._regrown(), reverse=True)[:budget]]
        chosen += [cid for _, cid in sorted(mixed, reverse=True) if cid not in chosen][: max(1, budget // 2)]
        chosen += [cid for _, cid in sorted(sse, reverse=True) if cid not in chosen][: budget - len(chosen)]
        for cid in chosen[:budget]:
            self._split(cid)

    def _regrown(self) -> list[tuple[float, int]]:
        """(growth, id) of reported clusters that kept growing: ``resplit_growth`` times their size
        when they became candidates.  A reported cluster is never tested again, and early clusters
        are coarse: one that first showed a common behaviour can go on to collect a rare one's
        texts, which then stay unreported.  Splitting it gives the parts their own tests (on texts
        assigned after the split, as for any split)."""
        out = []
        for cid, at in self._emitted_at.items():
            if cid not in self._vec_res:  # retired, or no member sample
                continue
            own = int(self._own[cid].sum())
            if (own >= self.cfg.resplit_growth * max(at, 1) and own >= self.cfg.resplit_min_size
                    and self._vec_res[cid][2][0] >= MIN_SPLIT_MEMBERS):
                out.append((own / max(at, 1), cid))
        return out

    def _members(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        if cid not in self._vec_res:
            return np.zeros((0, self._dim or 0), np.float32), np.zeros(0, np.int8)
        vx, vr, filled = self._vec_res[cid]
        return vx[: filled[0]].astype(np.float32), vr[: filled[0]]

    def _split(self, cid: int) -> None:
        Xr, roles = self._members(cid)
        try:
            a, b = self.engine.split(cid, Xr)
        except ValueError as exc:
            log.debug("cluster %d not split: %s", cid, exc)
            return
        self._ensure_capacity()
        ca, cb = self.engine.centroid_of(a), self.engine.centroid_of(b)
        to_a = np.linalg.norm(Xr - ca, axis=1) <= np.linalg.norm(Xr - cb, axis=1)
        parent_total = self._own[cid] + self._inherited[cid]
        for r in (0, 1):
            mine = roles == r
            frac = float(to_a[mine].mean()) if mine.any() else float(to_a.mean())
            na = round(int(parent_total[r]) * frac)
            self._inherited[a, r], self._inherited[b, r] = na, int(parent_total[r]) - na
        size = self.cfg.vector_reservoir_size
        for child, sel in ((a, to_a), (b, ~to_a)):
            vx, vr = np.zeros((size, Xr.shape[1]), np.float16), np.zeros(size, np.int8)
            m = int(sel.sum())
            vx[:m], vr[:m] = Xr[sel], roles[sel]
            self._vec_res[child] = (vx, vr, [m])
            self._vec_seen[child] = m
        self._vec_res.pop(cid, None)
        self._vec_seen.pop(cid, None)
        self._emitted_at.pop(cid, None)
        for key in range(cid * 4, cid * 4 + 4):  # a retired id's samples are never used again
            self._text_res.pop(key, None)
            self._text_seen.pop(key, None)
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
        n = view.own.sum(axis=1)
        log_e = beta_binomial_log_e_many(view.own[:, 1], n, 0.5)
        thresholds = np.array([-math.log(spending_level(c, self.alpha)) for c in view.ids.tolist()])
        hit = (n >= self.cfg.min_cluster_texts) & (log_e >= thresholds) & ~view.emitted
        out = []
        for row in np.flatnonzero(hit).tolist():
            cid = int(view.ids[row])
            self._emitted.add(cid)
            self._emitted_at[cid] = int(n[row])
            out.append(self._candidate(cid, float(log_e[row])))
        return out

    def _refs(self, cid: int, role: int, label: bool) -> list[TextRef]:
        return [ref_of(t) for t in self._text_res.get(cid * 4 + role * 2 + int(label), [])]

    def _padded(self, cid: int, over: int, label: bool) -> dict[int, list[TextRef]]:
        """The cluster's label (or held-out) texts per role, the other side padded up to the
        over-represented side's count from that side's global label (or held-out) reservoir."""
        refs = {r: self._refs(cid, r, label) for r in (0, 1)}
        have = {t.text_id for r in (0, 1) for t in refs[r]}
        pool = (self._glob_label_res if label else self._glob_res)[1 - over]
        need = max(0, len(refs[over]) - len(refs[1 - over]))
        refs[1 - over] += [ref_of(t) for t in [t for t in pool if t[0] not in have][:need]]
        return refs

    def _candidate(self, cid: int, log_e: float) -> CandidateCluster:
        nb, ni = (int(x) for x in self._own[cid])
        over = 1 if ni > nb else 0
        level = spending_level(cid, self.alpha)
        holdout = self._padded(cid, over, label=False)
        # the labeler contrasts the over-represented side with the other side's label texts: from
        # this cluster first, padded with the other side's label texts from anywhere, so a
        # one-sided cluster (the usual case for a planted behaviour) still has a contrast
        label = self._padded(cid, over, label=True)
        log.info("clusterer %s: cluster %d divergent (%s over-represented, %d/%d, log e %.1f)",
                 self.experiment_id, cid, ROLES[over], ni, ni + nb, log_e)
        return CandidateCluster(
            experiment_id=self.experiment_id, candidate_id=stable_id(self.experiment_id, cid),
            cluster_id=cid, snapshot_seq=self.seq, direction=ROLES[over], count_base=nb,
            count_intervention=ni, share_intervention=ni / (ni + nb),
            share_ci=confidence_sequence_bernoulli(ni, ni + nb, level),
            e_value=math.exp(min(log_e, MAX_LOG_E)),
            alpha_spent=level, label_texts=label[0] + label[1],
            holdout_texts=holdout[0] + holdout[1])

    def exemplars(self, cid: int) -> list[TextRef]:
        """Up to 8 label-split texts of a cluster, both roles interleaved (never holdout texts)."""
        b, i = self._refs(cid, 0, True), self._refs(cid, 1, True)
        mixed = [t for pair in zip(b, i, strict=False) for t in pair] + b[len(i):] + i[len(b):]
        return mixed[:8]

    def _uncertainty(self) -> list[UncertaintyEvent]:
        if not self.engine.fitted:
            return []
        return self.tracker.check(self.n_processed, self._view(), self.exemplars, self.seq)

    # ================================================================== snapshot
    def _centroids_2d(self, centroids: np.ndarray) -> np.ndarray:
        """PCA of the centroids; each axis's sign follows the previous snapshot's (no flip-flop)."""
        if len(centroids) < 2:
            return np.zeros((len(centroids), 2))
        pca = PCA(n_components=2, random_state=self.cfg.seed).fit(centroids)
        comps = pca.components_.copy()
        for i in range(len(comps)):
            ref = self._pca[i] if self._pca is not None and self._pca.shape == comps.shape else None
            lead = comps[i][np.argmax(np.abs(comps[i]))]
            sign = np.sign(comps[i] @ ref) if ref is not None else np.sign(lead)
            comps[i] *= sign or 1.0
        self._pca = comps
        out = (centroids - pca.mean_) @ comps.T
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))

    def _quality_sample(self) -> tuple[np.ndarray, np.ndarray]:
        ids = [c for c in self.engine.ids if c in self._vec_res]
        if not ids:
            return np.zeros((0, self._dim or 0), np.float32), np.zeros(0, np.int64)
        parts = [self._members(c)[0] for c in ids]
        X = np.concatenate(parts)
        labels = np.repeat(np.asarray(ids, np.int64), [len(p) for p in parts])
        if len(X) > self.cfg.quality_sample:  # own generator: snapshots must not move the ingest RNG
            pick = np.random.default_rng([self.cfg.seed, self.seq]).choice(len(X), self.cfg.quality_sample,
                                                                          replace=False)
            X, labels = X[np.sort(pick)], labels[np.sort(pick)]
        return X, labels

    def snapshot(self) -> ClusterSnapshot:
        """Per-cluster stats (share/CI/e-value on ``own`` counts, CI at ``alpha``) and quality."""
        self.seq += 1
        ids = self.engine.ids
        centroids = self.engine.centroids
        view = self._view()
        clusters, quality = [], None
        if ids:
            pos = self._centroids_2d(centroids.astype(np.float64))
            n = view.own.sum(axis=1)
            log_e = beta_binomial_log_e_many(view.own[:, 1], n, 0.5)
            for row, cid in enumerate(ids):
                tot = self._own[cid] + self._inherited[cid]
                k, m = int(view.own[row, 1]), int(n[row])
                clusters.append(ClusterStats(
                    cluster_id=cid, count_base=int(tot[0]), count_intervention=int(tot[1]),
                    share_intervention=k / m if m else 0.5,
                    share_ci=confidence_sequence_bernoulli(k, m, self.alpha),
                    e_value=math.exp(min(float(log_e[row]), MAX_LOG_E)),
                    centroid_2d=(float(pos[row, 0]), float(pos[row, 1])),
                    parent_id=self.engine.parents.get(cid)))
            X, labels = self._quality_sample()
            ids_arr = np.asarray(ids, np.int64)
            current = _nearest(X, centroids, ids_arr) if len(X) else None
            previous = (_nearest(X, self._prev_centroids, self._prev_ids)
                        if len(X) and self._prev_centroids is not None else None)
            quality = cluster_quality(X, labels, centroids, ids, view.total, previous, current,
                                      self.cfg.quality_sample, self.cfg.seed)
            self._prev_centroids, self._prev_ids = centroids.copy(), ids_arr
        return ClusterSnapshot(
            experiment_id=self.experiment_id, seq=self.seq,
            n_seen=int(self.role_totals.sum()), n_base=int(self.role_totals[0]),
            n_intervention=int(self.role_totals[1]), engine=self.engine.name, clusters=clusters,
            quality=quality if quality is not None else ClusterQuality())

    # ================================================================== small queries
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
        for key, refs in self._text_res.items():
            if key % 2 == 1:  # label split only: holdout texts must not shape any description
                target = mine if key // 4 == cluster_id else rest
                for t in refs:
                    target.update(word.findall(t[3].lower()))
        n_m, n_r = sum(mine.values()) + 1, sum(rest.values()) + 1
        score = {w: math.log((c + 1) / n_m) - math.log((rest[w] + 1) / n_r) for w, c in mine.items()}
        return [w for w, _ in sorted(score.items(), key=lambda x: (-x[1], x[0]))[:k]]

    # ================================================================== persistence
    def to_bytes(self) -> bytes:
        """np.savez (no pickle) of the arrays plus zlib(orjson) metadata in one uint8 array."""
        eng = self.engine.get_state()
        arrays = {f"engine.{k}": v for k, v in eng.items() if isinstance(v, np.ndarray)}
        tmeta, tarr = self.tracker.get_state()
        arrays.update({f"tracker.{k}": v for k, v in tarr.items()})
        vec_ids = sorted(self._vec_res)
        d = self._dim or 0
        arrays.update({
            "own": self._own, "inherited": self._inherited,
            "seen_keys": np.fromiter(self._seen.keys(), np.uint64, len(self._seen)),
            "seen_cids": np.fromiter(self._seen.values(), np.int64, len(self._seen)),
            "warm_X": np.stack(self._warm_X) if self._warm_X else np.zeros((0, d), np.float32),
            "warm_keys": np.asarray(self._warm_keys, np.uint64),
            "vec_X": (np.concatenate([self._vec_res[c][0][: self._vec_res[c][2][0]] for c in vec_ids])
                      if vec_ids else np.zeros((0, d), np.float16)),
            "vec_roles": (np.concatenate([self._vec_res[c][1][: self._vec_res[c][2][0]] for c in vec_ids])
                          if vec_ids else np.zeros(0, np.int8)),
        })
        for name, val in (("prev_centroids", self._prev_centroids), ("prev_ids", self._prev_ids),
                          ("pca", self._pca)):
            if val is not None:
                arrays[name] = val
        rng = self._rng.bit_generator.state
        meta = {
            "version": STATE_VERSION, "experiment_id": self.experiment_id, "alpha": self.alpha,
            "engine_kind": self.engine.name,
            "engine": {k: v for k, v in eng.items() if not isinstance(v, np.ndarray)},
            "tracker": tmeta, "seq": self.seq, "n_processed": self.n_processed,
            "role_totals": self.role_totals.tolist(), "dim": self._dim,
            "rng": {"state": str(rng["state"]["state"]), "inc": str(rng["state"]["inc"]),
                    "has_uint32": rng["has_uint32"], "uinteger": rng["uinteger"]},
            "warm_meta": self._warm_meta, "emitted": sorted(self._emitted),
            "emitted_at": sorted(self._emitted_at.items()),
            "text_seen": list(self._text_seen.items()), "text_res": list(self._text_res.items()),
            "vec_seen": list(self._vec_seen.items()),
            "vec_filled": [[c, self._vec_res[c][2][0]] for c in vec_ids],
            "glob_seen": list(self._glob_seen.items()), "glob_res": [self._glob_res[0], self._glob_res[1]],
            "glob_label_seen": list(self._glob_label_seen.items()),
            "glob_label_res": [self._glob_label_res[0], self._glob_label_res[1]],
        }
        arrays["meta"] = np.frombuffer(zlib.compress(orjson.dumps(meta)), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, cfg: ClustererConfig) -> ClusterState:
        """Rebuild a state saved by :meth:`to_bytes` (ADWIN detectors are rebuilt by replay).

        :class:`CorruptStateError` when the bytes do not read back or hold a non-finite value
        (ValueError for a state that is sound but does not fit ``cfg``)."""
        arrays, meta = _read(data)
        bad = sorted(k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all())
        if bad:
            raise CorruptStateError(f"saved clusterer state holds NaN or inf in {', '.join(bad)}")
        if meta["version"] != STATE_VERSION:
            raise ValueError(f"clusterer state version {meta['version']} != {STATE_VERSION}")
        if meta["engine_kind"] != cfg.engine:
            raise ValueError(f"saved state uses engine {meta['engine_kind']!r}, config says {cfg.engine!r}")
        st = cls(cfg, meta["experiment_id"], meta["alpha"])
        st.engine.set_state({**meta["engine"], **_prefixed(arrays, "engine.")})
        st.tracker.set_state(meta["tracker"], _prefixed(arrays, "tracker."))
        r = meta["rng"]
        st._rng.bit_generator.state = {"bit_generator": "PCG64", "has_uint32": r["has_uint32"],
                                       "uinteger": r["uinteger"],
                                       "state": {"state": int(r["state"]), "inc": int(r["inc"])}}
        st.seq, st.n_processed, st._dim = meta["seq"], meta["n_processed"], meta["dim"]
        st.role_totals = np.asarray(meta["role_totals"], np.int64)
        st._own, st._inherited = arrays["own"].copy(), arrays["inherited"].copy()
        st._seen = dict(zip(arrays["seen_keys"].tolist(), arrays["seen_cids"].tolist(), strict=True))
        st._warm_X = list(arrays["warm_X"].astype(np.float32))
        st._warm_meta = [_ref_tuple(t) for t in meta["warm_meta"]]
        st._warm_keys = arrays["warm_keys"].tolist()
        st._emitted = set(meta["emitted"])
        st._emitted_at = {int(c): int(n) for c, n in meta.get("emitted_at", [])}
        st._text_seen = {int(k): int(v) for k, v in meta["text_seen"]}
        st._text_res = {int(k): [_ref_tuple(t) for t in v] for k, v in meta["text_res"]}
        st._vec_seen = {int(k): int(v) for k, v in meta["vec_seen"]}
        st._glob_seen = {int(k): int(v) for k, v in meta["glob_seen"]}
        st._glob_res = {r: [_ref_tuple(t) for t in meta["glob_res"][r]] for r in (0, 1)}
        st._glob_label_seen = {int(k): int(v) for k, v in meta.get("glob_label_seen", [])}
        st._glob_label_res = {r: [_ref_tuple(t) for t in meta.get("glob_label_res", [[], []])[r]] for r in (0, 1)}
        st._restore_vectors(meta["vec_filled"], arrays["vec_X"], arrays["vec_roles"])
        st._prev_centroids, st._prev_ids = arrays.get("prev_centroids"), arrays.get("prev_ids")
        st._pca = arrays.get("pca")
        return st

    @classmethod
    def after_corrupt(cls, data: bytes, cfg: ClustererConfig, experiment_id: str,
                      alpha: float = 0.05) -> ClusterState:
        """An empty state that continues a corrupt one's cluster ids and snapshot numbers.

        New ids start after every id the old state created, so its alpha-spending levels are
        never spent twice (family-wise error over both states <= alpha) and no candidate id is
        reused; snapshots keep counting up, so consumers never see a reused seq.
        :class:`CorruptStateError` when not even the metadata reads (then nothing is safe to
        assume and an operator must decide)."""
        _, meta = _read(data)
        st = cls(cfg, experiment_id, alpha)
        st.engine._next_id = int(meta["engine"]["next_id"])
        st.seq = int(meta["seq"])
        return st

    def _restore_vectors(self, filled: list[list[int]], vec_X: np.ndarray, vec_roles: np.ndarray) -> None:
        size, offset = self.cfg.vector_reservoir_size, 0
        for cid, m in filled:
            vx, vr = np.zeros((size, vec_X.shape[1]), np.float16), np.zeros(size, np.int8)
            keep = min(m, size)  # a smaller configured size keeps the first rows
            vx[:keep], vr[:keep] = vec_X[offset:offset + keep], vec_roles[offset:offset + keep]
            self._vec_res[int(cid)] = (vx, vr, [keep])
            offset += m


class CorruptStateError(ValueError):
    """A saved state that must not be restored (unreadable, or NaN/inf in its arrays)."""


def _read(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = orjson.loads(zlib.decompress(arrays.pop("meta").tobytes()))
    except (OSError, EOFError, ValueError, KeyError, zlib.error, zipfile.BadZipFile) as exc:
        raise CorruptStateError(f"saved clusterer state does not read back: {exc}") from None
    return arrays, meta


def _prefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _ref_tuple(t: list[Any]) -> RefTuple:
    return (str(t[0]), str(t[1]), int(t[2]), str(t[3]))
