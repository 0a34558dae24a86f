"""Where more samples would help: boundary, under-sampled, unresolved-share and drift signals.

The tracker sees every assigned text (cluster, role, margin) and, when asked, turns what it saw
into :class:`UncertaintyEvent` s for the controller.  Each (kind, cluster) is re-emitted at most
once every ``cfg.uncertainty_every`` texts, so a persistent condition keeps a steady, bounded
request rate instead of one event per batch.

Drift uses river's ADWIN on each cluster's role stream (1 = intervention).  ADWIN has no
serialisable state short of pickle, so the tracker keeps each active cluster's role history
(1 byte per text, bit-packed when saved) and rebuilds ADWIN by replaying it on restore
(~0.2 us per text); the rebuilt detector is identical because ADWIN is deterministic.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import drift

from services.core.config import ClustererConfig
from services.core.events import ROLES, TextRef, UncertaintyEvent, stable_id
from services.stats.sequential import confidence_sequence_bernoulli

MAX_EXEMPLARS = 8
RefTuple = tuple[str, str, int, str]  # (text_id, prompt_id, role code, text)


def ref_of(t: RefTuple) -> TextRef:
    return TextRef(text_id=t[0], prompt_id=t[1], role=ROLES[t[2]], text=t[3])


@dataclass
class ClusterView:
    """What the checks need about the active clusters (rows aligned)."""

    ids: np.ndarray  # int64 public ids
    own: np.ndarray  # (k, 2) counts since the id was created: the tested sample
    total: np.ndarray  # (k,) own + inherited at split
    emitted: np.ndarray  # bool: already a candidate


class UncertaintyTracker:
    """Per-cluster margin windows, boundary exemplars, ADWIN detectors and emission times.

    Margin windows are ring buffers indexed by cluster id (ids are dense and never reused), so a
    piece of arrivals is recorded with a few vectorised writes instead of a loop over clusters.
    """

    def __init__(self, cfg: ClustererConfig, experiment_id: str, alpha: float) -> None:
        self.cfg = cfg
        self.experiment_id = experiment_id
        self.alpha = alpha
        w = cfg.boundary_window
        self._small = np.zeros((0, w), np.int8)  # ring: 1 = margin < boundary_margin
        self._neigh = np.zeros((0, w), np.int64)  # ring: runner-up id of the same text
        self._written = np.zeros(0, np.int64)  # texts written per cluster (ring position)
        self._ex: dict[int, collections.deque[RefTuple]] = {}  # small-margin label-split texts
        self._roles: dict[int, bytearray] = {}
        self._adwin: dict[int, drift.ADWIN] = {}
        self._drift: dict[int, list[float]] = {}  # cid -> [window mean, long-run share]
        self._last: dict[str, int] = {}  # "kind:cid" -> n_seen at last emission

    # ------------------------------------------------------------------ per-cluster lifecycle
    def _start(self, cid: int) -> None:
        if cid >= len(self._written):
            grow = max(cid + 1, 2 * len(self._written)) - len(self._written)
            self._small = np.vstack([self._small, np.zeros((grow, self._small.shape[1]), np.int8)])
            self._neigh = np.vstack([self._neigh, np.zeros((grow, self._neigh.shape[1]), np.int64)])
            self._written = np.concatenate([self._written, np.zeros(grow, np.int64)])
        self._ex[cid] = collections.deque(maxlen=MAX_EXEMPLARS)
        self._roles[cid] = bytearray()
        self._adwin[cid] = drift.ADWIN(delta=self.cfg.drift_delta)

    def retire(self, cid: int) -> None:
        for d in (self._ex, self._roles, self._adwin, self._drift):
            d.pop(cid, None)

    def _window(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        n = min(int(self._written[cid]), self._small.shape[1])
        return self._small[cid, :n], self._neigh[cid, :n]

    # ------------------------------------------------------------------ observation
    def observe(self, labels: np.ndarray, roles: np.ndarray, margin: np.ndarray, second: np.ndarray,
                refs: Callable[[int], RefTuple], is_label: np.ndarray) -> None:
        """Record one piece of arrivals (labels at arrival, roles 0/1, margins, runner-up ids)."""
        for cid in np.unique(labels).tolist():
            if cid not in self._adwin:
                self._start(cid)
        small = margin < self.cfg.boundary_margin
        w = self._small.shape[1]
        order = np.argsort(labels, kind="stable")
        uniq, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        rank = np.empty(len(labels), np.int64)
        rank[order] = np.arange(len(labels)) - np.repeat(starts, counts)
        last_w = rank >= np.repeat(counts, counts)[np.argsort(order)] - w  # older ones would be overwritten
        pos = (self._written[labels] + rank) % w
        self._small[labels[last_w], pos[last_w]] = small[last_w]
        self._neigh[labels[last_w], pos[last_w]] = second[last_w]
        self._written[uniq] += counts
        for i in np.flatnonzero(small & is_label).tolist():
            self._ex[int(labels[i])].append(refs(i))
        for cid, r in zip(labels.tolist(), roles.tolist(), strict=True):
            self._feed(cid, r)

    def _feed(self, cid: int, role: int, replay: bool = False) -> None:
        det = self._adwin[cid]
        if not replay:
            self._roles[cid].append(role)
        det.update(role)
        if det.drift_detected and not replay:
            hist = self._roles[cid]
            self._drift[cid] = [float(det.estimation), hist.count(1) / len(hist)]

    # ------------------------------------------------------------------ checks
    def _due(self, kind: str, cid: int, n_seen: int) -> bool:
        last = self._last.get(f"{kind}:{cid}")
        return last is None or n_seen - last >= self.cfg.uncertainty_every

    def _event(self, kind: str, cids: list[int], score: float, exemplars: list[TextRef],
               n_seen: int, seq: int, detail: str) -> UncertaintyEvent:
        self._last[f"{kind}:{cids[0]}"] = n_seen
        return UncertaintyEvent(
            experiment_id=self.experiment_id, kind=kind,  # type: ignore[arg-type]
            uncertainty_id=stable_id(self.experiment_id, "uncertainty", kind, cids[0], n_seen),
            cluster_ids=cids, score=float(score), exemplars=exemplars[:MAX_EXEMPLARS],
            snapshot_seq=seq, detail=detail)

    def check(self, n_seen: int, view: ClusterView, exemplars: Callable[[int], list[TextRef]],
              seq: int) -> list[UncertaintyEvent]:
        """Events that are due now, in a fixed order (kind, then cluster id)."""
        return (self._boundary(n_seen, view, seq) + self._undersampled(n_seen, view, exemplars, seq)
                + self._unresolved(n_seen, view, exemplars, seq) + self._drifts(n_seen, view, exemplars, seq))

    def _boundary(self, n_seen: int, view: ClusterView, seq: int) -> list[UncertaintyEvent]:
        out = []
        ids = view.ids[view.ids < len(self._written)]
        n = np.minimum(self._written[ids], self._small.shape[1])
        small = self._small[ids].sum(axis=1)  # unwritten ring cells are 0
        flagged = (n >= self.cfg.boundary_min_texts) & (small >= self.cfg.boundary_share * np.maximum(n, 1))
        for cid in ids[flagged].tolist():
            if cid not in self._adwin or not self._due("boundary", cid, n_seen):
                continue
            win, neigh = self._window(cid)
            share = float(win.mean())
            near = collections.Counter(neigh[win == 1].tolist()).most_common(1)
            cids = [cid] + ([int(near[0][0])] if near else [])
            out.append(self._event("boundary", cids, share, [ref_of(t) for t in self._ex[cid]], n_seen, seq,
                                   f"{share:.0%} of the last {len(win)} texts lie within "
                                   f"{self.cfg.boundary_margin} of another centroid"))
        return out

    def _undersampled(self, n_seen: int, view: ClusterView, exemplars: Callable[[int], list[TextRef]],
                      seq: int) -> list[UncertaintyEvent]:
        if len(view.ids) < 2:
            return []
        mean = float(view.total.mean())
        out = []
        for cid, n in zip(view.ids.tolist(), view.total.tolist(), strict=True):
            if n < self.cfg.undersampled_ratio * mean and self._due("undersampled", cid, n_seen):
                out.append(self._event("undersampled", [cid], 1.0 - n / mean, exemplars(cid), n_seen, seq,
                                       f"{n} texts vs a mean of {mean:.0f} per cluster"))
        return out

    def _unresolved(self, n_seen: int, view: ClusterView, exemplars: Callable[[int], list[TextRef]],
                    seq: int) -> list[UncertaintyEvent]:
        out = []
        n = view.own.sum(axis=1)
        for row, cid in enumerate(view.ids.tolist()):
            k, m = int(view.own[row, 1]), int(n[row])
            if view.emitted[row] or not self.cfg.unresolved_min_texts <= m <= self.cfg.unresolved_max_texts:
                continue
            effect = abs(k / m - 0.5)
            if effect < self.cfg.unresolved_min_effect or not self._due("unresolved_share", cid, n_seen):
                continue
            lo, hi = confidence_sequence_bernoulli(k, m, self.alpha)
            if lo < 0.5 < hi:
                out.append(self._event("unresolved_share", [cid], effect, exemplars(cid), n_seen, seq,
                                       f"share {k / m:.2f} over {m} texts; {1 - self.alpha:.0%} "
                                       f"confidence sequence [{lo:.2f}, {hi:.2f}] still holds 0.5"))
        return out

    def _drifts(self, n_seen: int, view: ClusterView, exemplars: Callable[[int], list[TextRef]],
                seq: int) -> list[UncertaintyEvent]:
        out = []
        active = set(view.ids.tolist())
        for cid in sorted(self._drift):
            if cid not in active or not self._due("drift", cid, n_seen):
                continue
            window, share = self._drift.pop(cid)
            out.append(self._event("drift", [cid], abs(window - share), exemplars(cid), n_seen, seq,
                                   f"ADWIN: recent intervention share {window:.2f} vs {share:.2f} overall"))
        return out

    # ------------------------------------------------------------------ persistence
    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able meta, arrays): role histories bit-packed, ring buffers of active clusters."""
        cids = sorted(self._roles)
        hist = [np.frombuffer(bytes(self._roles[c]), dtype=np.uint8) for c in cids]
        arrays = {
            "roles": np.packbits(np.concatenate(hist)) if hist else np.zeros(0, np.uint8),
            "small": self._small[cids], "neigh": self._neigh[cids], "written": self._written[cids],
        }
        meta = {"cids": cids, "n_roles": [len(h) for h in hist],
                "ex": [list(map(list, self._ex[c])) for c in cids],
                "drift": [[c, *v] for c, v in self._drift.items()], "last": self._last}
        return meta, arrays

    def set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        cids = [int(c) for c in meta["cids"]]
        n_roles = meta["n_roles"]
        roles = np.unpackbits(arrays["roles"])[: sum(n_roles)]
        offsets = np.concatenate([[0], np.cumsum(n_roles)]).astype(np.int64)
        w = self._small.shape[1]
        for i, cid in enumerate(cids):
            self._start(cid)
            if arrays["small"].shape[1] == w:  # a changed boundary_window starts the windows afresh
                self._small[cid], self._neigh[cid] = arrays["small"][i], arrays["neigh"][i]
                self._written[cid] = arrays["written"][i]
            self._ex[cid].extend((t[0], t[1], int(t[2]), t[3]) for t in meta["ex"][i])
            hist = roles[offsets[i]:offsets[i + 1]].tolist()
            self._roles[cid].extend(hist)
            for r in hist:
                self._feed(cid, r, replay=True)
        self._drift = {int(c): [float(a), float(b)] for c, a, b in meta["drift"]}
        self._last = {str(k): int(v) for k, v in meta["last"].items()}
