"""What the report shows, read from a run directory and nothing else.

The report can be rebuilt from a copied run directory (no broker, no cache): results.jsonl,
summary.json, the event logs (snapshots, candidates, hypotheses, validations), texts.parquet and
the map sample.  Logs are read as plain JSON objects, not as event models, so a report still
renders a run written by an older or newer version of the topic contracts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.core.events import ClusterSnapshot, decode_centroids
from services.core.jsonl import iter_log_objects

log = logging.getLogger("autointerv.sink")


@dataclass(frozen=True)
class TextRow:
    text_id: str
    role: str
    model_id: str
    prompt_id: str
    prompt: str
    text: str
    pair_id: str


@dataclass
class MapSample:
    """The sink's uniform sample of embedded texts, projected to 2-D, with each point's cluster."""

    ids: list[str]
    roles: list[str]
    xy: np.ndarray  # (n, 2)
    clusters: list[int | None]  # final cluster id (None: unknown)
    cluster_source: str  # how clusters were assigned, in words


@dataclass
class RunView:
    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    snapshot: ClusterSnapshot | None  # the latest
    totals_by_seq: dict[int, tuple[int, int]]  # snapshot seq -> (n_base, n_intervention)
    lineage: dict[int, int]  # child cluster id -> parent id, every split of the run
    candidates: dict[str, dict[str, Any]]
    hypotheses: dict[str, dict[str, Any]]
    validations: dict[str, list[dict[str, Any]]]  # hypothesis id -> its tiers' validations
    texts: dict[str, TextRow] = field(default_factory=dict)
    partners: dict[str, TextRow] = field(default_factory=dict)  # text id -> the other role's text of its pair
    sample: MapSample | None = None

    @property
    def final_ids(self) -> set[int]:
        return {c.cluster_id for c in self.snapshot.clusters} if self.snapshot else set()

    def children(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for child, parent in sorted(self.lineage.items()):
            out.setdefault(parent, []).append(child)
        return out

    def final_descendants(self, cluster_id: int) -> list[int]:
        """The clusters of the final snapshot that ``cluster_id`` became: itself when still there,
        else its descendants through every later split (empty when none survives)."""
        final, kids = self.final_ids, self.children()
        out, todo, seen = [], [cluster_id], set()
        while todo:
            cid = todo.pop()
            if cid in seen:
                continue
            seen.add(cid)
            if cid in final:
                out.append(cid)
            else:
                todo.extend(kids.get(cid, []))
        return sorted(out)

    def ancestors(self, cluster_id: int) -> list[int]:
        """Parent, grandparent, ... of a cluster (nearest first)."""
        out, cid = [], cluster_id
        while cid in self.lineage and self.lineage[cid] not in out and len(out) < 1000:
            cid = self.lineage[cid]
            out.append(cid)
        return out


# --------------------------------------------------------------------------- readers


def load_map_sample(path: Path) -> tuple[list[str], list[str], np.ndarray, dict[str, str]]:
    """(text ids, roles, vectors [n, dim], metadata) of a saved reservoir."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    n = table.num_rows
    dim = int(meta.get("dim", "0") or 0)
    if n == 0 or dim == 0:
        return [], [], np.zeros((0, 0), dtype=np.float32), meta
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return (table.column("text_id").to_pylist(), table.column("role").to_pylist(),
            np.asarray(flat, dtype=np.float32).reshape(n, dim), meta)


def _snapshots(path: Path) -> tuple[ClusterSnapshot | None, dict[int, np.ndarray], dict[int, tuple[int, int]],
                                    dict[int, int]]:
    """(latest snapshot, the latest centroid of each cluster, totals per seq, lineage of every split)."""
    totals: dict[int, tuple[int, int]] = {}
    lineage: dict[int, int] = {}
    latest: dict[str, Any] | None = None
    carrying: list[tuple[int, dict[str, Any]]] = []
    for obj in iter_log_objects(path):
        seq = int(obj.get("seq", -1))
        if seq in totals:
            continue
        totals[seq] = (int(obj.get("n_base", 0)), int(obj.get("n_intervention", 0)))
        for c in obj.get("clusters") or []:
            if c.get("parent_id") is not None:
                lineage[int(c["cluster_id"])] = int(c["parent_id"])
        for child, parent in (obj.get("lineage") or {}).items():
            lineage[int(child)] = int(parent)
        if latest is None or seq > int(latest["seq"]):
            latest = obj
        if obj.get("centroids_b64"):
            carrying.append((seq, {k: obj.get(k) for k in ("centroid_ids", "centroids_b64", "centroid_dim")}))
    centroids: dict[int, np.ndarray] = {}
    for _, f in sorted(carrying, key=lambda x: x[0]):  # a later row of an id replaces an earlier one
        centroids.update(decode_centroids([int(i) for i in f["centroid_ids"] or []], str(f["centroids_b64"]),
                                          int(f["centroid_dim"] or 0)))
    return (ClusterSnapshot.model_validate(latest) if latest else None), centroids, totals, lineage


def _read_texts(path: Path, column: str, values: set[str]) -> list[TextRow]:
    """Rows of texts.parquet whose ``column`` is in ``values`` (streamed, filtered in Arrow)."""
    if not values or not path.exists():
        return []
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    if column not in names:
        return []
    want = pa.array(sorted(values), pa.string())
    cols = [c for c in ("text_id", "role", "model_id", "prompt_id", "prompt", "text", "pair_id") if c in names]
    out = []
    for batch in pf.iter_batches(batch_size=65_536, columns=cols):
        sel = batch.filter(pc.is_in(batch.column(column), value_set=want))
        for r in sel.to_pylist():
            out.append(TextRow(str(r.get("text_id")), str(r.get("role") or ""), str(r.get("model_id") or ""),
                               str(r.get("prompt_id") or ""), str(r.get("prompt") or ""),
                               str(r.get("text") or ""), str(r.get("pair_id") or "")))
    return out


def _refs(objs: Iterable[Mapping[str, Any]], *keys: str) -> Iterator[Mapping[str, Any]]:
    for obj in objs:
        for key in keys:
            yield from obj.get(key) or []


# --------------------------------------------------------------------------- the map


def _project(vectors: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA  # imported lazily: only reports need it

    xy = PCA(n_components=2, random_state=0).fit_transform(vectors.astype(np.float64))
    return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))


def _assign(vectors: np.ndarray, centroids: Mapping[int, np.ndarray], view: RunView) -> tuple[list[int | None], str]:
    """Each sample text's final cluster: its nearest centroid (L2, as the clusterer assigns) among
    the final snapshot's clusters, each at the latest centroid a snapshot carried for it."""
    ids = sorted(c for c in view.final_ids if c in centroids and centroids[c].shape[0] == vectors.shape[1])
    if not ids:
        return [None] * len(vectors), "not recorded (the run's snapshots carry no centroids)"
    cents = np.stack([centroids[c] for c in ids])
    d2 = (vectors ** 2).sum(1)[:, None] - 2 * vectors @ cents.T + (cents ** 2).sum(1)[None, :]
    nearest = np.asarray(ids)[np.argmin(d2, axis=1)].tolist()
    missing = len(view.final_ids) - len(ids)
    how = "nearest centroid among the final clusters"
    return nearest, how + (f"; {missing} cluster(s) without a recorded centroid left out" if missing else "")


def load_sample(view: RunView, centroids: Mapping[int, np.ndarray]) -> MapSample | None:
    path = view.run_dir / "map_sample.parquet"
    if not path.exists():
        return None
    ids, roles, vectors, _ = load_map_sample(path)
    if len(ids) < 3:
        return None
    clusters, how = _assign(vectors, centroids, view)
    return MapSample(ids, roles, _project(vectors), clusters, how)


# --------------------------------------------------------------------------- entry point


def load_run_view(run_dir: str | Path) -> RunView:
    """Everything the report needs, from the run directory alone."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = orjson.loads(summary_path.read_bytes()) if summary_path.exists() else {}
    latest, centroids, totals, lineage = _snapshots(run_dir / "snapshots.jsonl")
    validations: dict[str, list[dict[str, Any]]] = {}
    for v in iter_log_objects(run_dir / "validations.jsonl"):
        v.pop("hypothesis", None)  # a copy of the hypothesis travels along; not needed here
        validations.setdefault(str(v.get("hypothesis_id")), []).append(v)
    for vs in validations.values():
        vs.sort(key=lambda v: (v.get("tier_index", 0), v.get("created_at", 0.0)))
    view = RunView(
        run_dir=run_dir, summary=summary, rows=list(iter_log_objects(run_dir / "results.jsonl")), snapshot=latest,
        totals_by_seq=totals, lineage=lineage,
        candidates={str(c.get("candidate_id")): c for c in iter_log_objects(run_dir / "candidates.jsonl")},
        hypotheses={str(h.get("hypothesis_id")): h for h in iter_log_objects(run_dir / "hypotheses.jsonl")},
        validations=validations)
    try:
        view.sample = load_sample(view, centroids)
    except Exception:  # the map must never cost the run its report
        log.exception("the map sample could not be read")
    texts_path = run_dir / "texts.parquet"
    ref_ids = {str(t.get("text_id")) for t in _refs([*view.candidates.values(), *view.hypotheses.values()],
                                                     "holdout_texts", "label_texts")}
    view.texts = {t.text_id: t for t in _read_texts(texts_path, "text_id",
                                                    ref_ids | set(view.sample.ids if view.sample else []))}
    examples = {tid: view.texts[tid] for tid in ref_ids if tid in view.texts and view.texts[tid].pair_id}
    by_pair: dict[str, list[TextRow]] = {}
    for t in _read_texts(texts_path, "pair_id", {t.pair_id for t in examples.values()}):
        by_pair.setdefault(t.pair_id, []).append(t)
    for tid, t in examples.items():
        other = [p for p in by_pair.get(t.pair_id, []) if p.role != t.role]
        if other:
            view.partners[tid] = other[0]
    return view
