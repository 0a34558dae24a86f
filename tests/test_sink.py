"""Sink: run directory, dedupe under re-delivery, final decisions, summary, report, ground truth.

The integration tests run the sink against the real broker (``kafka_bootstrap``) with a scripted
set of events, each sent twice (at-least-once delivery), plus one undecodable record.
"""

from __future__ import annotations

import asyncio
import io
import re
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from services.core.bus import Producer, Topics, ensure_topics
from services.core.config import Config, load_config
from services.core.decision import final_validation
from services.core.events import (
    CandidateCluster,
    ClusterQuality,
    ClusterSnapshot,
    ClusterStats,
    DecodedText,
    EmbeddedText,
    Event,
    Hypothesis,
    TextRef,
    UncertaintyEvent,
    Validation,
)
from services.core.metrics import Metrics
from services.core.runtime import ServiceContext
from services.sink import SinkService, load_results, render_table
from services.sink.finalize import finalize_run
from services.sink.map_sample import VectorReservoir
from services.sink.results import RESULT_SCHEMA, RowKind, result_schema, results_rows
from services.sink.run_state import RunState
from services.sink.run_writer import RunWriter
from services.sink.storage import JsonlLog, ParquetParts

H1_TEXT = "Mentions cats & kittens <often>"  # needs escaping in HTML
H2_TEXT = "Talks about the weather"
H3_TEXT = "Writes longer notes"


# --------------------------------------------------------------------------- scripted events


def _text(exp: str, i: int, role: str, behaviour: str | None) -> DecodedText:
    return DecodedText(experiment_id=exp, text_id=f"{role[0]}{i}", request_id="r1", role=role,
                       model_id=f"sim-{role}", prompt_id=f"p{i % 3}",
                       text=f"{role} text {i} about {behaviour}",
                       generated_at=1000.0 + i, meta={"behaviour": behaviour, "topic": "pets"})


def _ref(t: DecodedText, with_text: bool = True) -> TextRef:
    return TextRef(text_id=t.text_id, prompt_id=t.prompt_id, role=t.role, text=t.text if with_text else "")


def _validation(exp: str, vid: str, hyp: Hypothesis, tier: str, idx: int, decision: str, p: float,
                auc: float | None, created: float) -> Validation:
    ci = None if auc is None else (auc - 0.1, min(1.0, auc + 0.1))
    return Validation(experiment_id=exp, validation_id=vid, hypothesis_id=hyp.hypothesis_id, tier=tier,
                      tier_index=idx, decision=decision, auc=auc, auc_ci=ci,
                      p_value=p, alpha_level=0.01, n_pos=20, n_neg=20, calls=10 + idx, cost_usd=0.01 * idx,
                      hypothesis=hyp, created_at=created)


def scripted(exp: str) -> dict[str, list[Event]]:
    """13 texts (7 base, 6 intervention: 4 "cats", 1 "moon", 1 ordinary) and the events around them.

    Candidate c1 (intervention side) holds 4 cats texts of 5 intervention texts seen: its hypothesis h1, whose words
    say cats, matches "cats"; h3 ("Writes longer notes") from the same cluster says nothing planted
    and matches nothing, though the cluster's purity is the same.  The sim's other three behaviours
    are planted (config) but found by no finding."""
    base = [_text(exp, i, "base", None) for i in range(7)]
    interv = [_text(exp, i, "intervention", b) for i, b in enumerate(["cats"] * 4 + ["moon", None])]
    texts: list[Event] = [*base, *interv]
    rng = np.random.default_rng(0)
    embs: list[Event] = [EmbeddedText(
        experiment_id=exp, text_id=t.text_id, role=t.role, prompt_id=t.prompt_id, text=t.text,
        embedding_model="test", dim=8, vector_b64=EmbeddedText.encode_vector(rng.normal(size=8)),
        cache_hit=k < 3) for k, t in enumerate(base + interv)]
    stats = [ClusterStats(cluster_id=3, count_base=1, count_intervention=5, share_intervention=5 / 6,
                          share_ci=(0.4, 0.97)),
             ClusterStats(cluster_id=5, count_base=6, count_intervention=1, share_intervention=1 / 7,
                          share_ci=(0.02, 0.5))]
    snaps: list[Event] = [
        ClusterSnapshot(experiment_id=exp, seq=1, n_seen=14, n_base=7, n_intervention=7, engine="minibatch",
                        clusters=stats, quality=ClusterQuality(silhouette=0.2, n_clusters=2)),
        ClusterSnapshot(experiment_id=exp, seq=2, n_seen=13, n_base=7, n_intervention=6, engine="minibatch",
                        clusters=[*stats, ClusterStats(cluster_id=7, count_base=0, count_intervention=0,
                                                       share_intervention=0.5, share_ci=(0, 1))],
                        quality=ClusterQuality(silhouette=0.3, n_clusters=3)),
    ]
    c1 = CandidateCluster(experiment_id=exp, candidate_id="c1", cluster_id=3, snapshot_seq=1,
                          direction="intervention", count_base=1, count_intervention=5,
                          share_intervention=5 / 6, share_ci=(0.4, 0.97), e_value=40.0, alpha_spent=0.01,
                          label_texts=[_ref(interv[0]), _ref(interv[1]), _ref(base[0])],
                          holdout_texts=[_ref(interv[2], False), _ref(interv[3]), _ref(interv[5]),
                                         _ref(base[1])])
    c2 = CandidateCluster(experiment_id=exp, candidate_id="c2", cluster_id=5, snapshot_seq=1,
                          direction="base",
                          count_base=6, count_intervention=1, share_intervention=1 / 7, share_ci=(0.02, 0.5),
                          e_value=3.0, alpha_spent=0.005, label_texts=[_ref(b) for b in base[2:5]],
                          holdout_texts=[_ref(b) for b in base[5:]])
    h1 = Hypothesis(experiment_id=exp, hypothesis_id="h1", candidate_id="c1", cluster_id=3,
                    direction="intervention", text=H1_TEXT, labeler="offline:log-odds", keywords=["cats"])
    h2 = Hypothesis(experiment_id=exp, hypothesis_id="h2", candidate_id="c2", cluster_id=5, direction="base",
                    text=H2_TEXT, labeler="offline:log-odds")
    h3 = Hypothesis(experiment_id=exp, hypothesis_id="h3", candidate_id="c1", cluster_id=3,
                    direction="intervention", text=H3_TEXT, labeler="offline:log-odds")
    vals: list[Event] = [
        _validation(exp, "v1", h1, "keyword", 0, "escalated", 0.04, 0.7, 2000.0),
        _validation(exp, "v2", h1, "embedding", 1, "validated", 0.001, 0.9, 2010.0),
        _validation(exp, "v3", h2, "keyword", 0, "rejected", 0.6, None, 2005.0),  # a share test: no AUC
        _validation(exp, "v4", h3, "keyword", 0, "escalated", 0.03, 0.66, 2006.0),
    ]
    unc: list[Event] = [UncertaintyEvent(experiment_id=exp, uncertainty_id="u1", kind="boundary",
                                         cluster_ids=[3, 5], score=0.4)]
    return {"texts": texts, "embeddings": embs, "snapshots": snaps, "uncertainty": unc,
            "candidates": [c1, c2], "hypotheses": [h1, h2, h3], "validations": vals}


N_EVENTS = 13 + 13 + 2 + 1 + 2 + 3 + 4


# --------------------------------------------------------------------------- harness


def _cfg(exp: str, run_root: Path) -> Config:
    return load_config(None, environ={}, overrides={
        "experiment": {"id": exp, "run_dir": str(run_root)},
        "bus": {"poll_timeout_ms": 100},
        "observability": {"metrics_port": None},
    })


async def _produce(cfg: Config, bootstrap: str, topics: Topics, events: list[Event]) -> None:
    prod = Producer(cfg.bus, bootstrap, topics, "test")
    await prod.start()
    try:
        for copy in range(2):  # every event twice: a re-delivery
            for ev in events:
                await prod.send(ev)
            if copy == 0:
                await prod.send_raw(topics.name("texts"), b"not json")
        await prod.flush()
    finally:
        await prod.stop()


async def _run_until(svc: SinkService, n_received: int, deadline_s: float = 45.0) -> None:
    task = asyncio.create_task(svc.run())
    end = time.monotonic() + deadline_s
    while sum(svc.received.values()) < n_received and time.monotonic() < end and not task.done():
        await asyncio.sleep(0.2)
    svc.stop()
    await task
    assert sum(svc.received.values()) >= n_received, dict(svc.received)


class ReplaySink(SinkService):
    """A fresh consumer group: re-reads every topic from the start, as after lost commits."""

    def group_id(self) -> str:
        return super().group_id() + "-replay"


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_bytes().splitlines() if line.strip())


# --------------------------------------------------------------------------- integration


async def test_sink_writes_run_directory_and_survives_replay(kafka_bootstrap: str, unique: str,
                                                             tmp_path: Path) -> None:
    exp = f"exp-{unique}"
    run_root = tmp_path / "runs"
    cfg = _cfg(exp, run_root)
    topics = Topics(f"t-{unique}")
    await ensure_topics(kafka_bootstrap, topics.all(), 2, 1)
    streams = scripted(exp)
    await _produce(cfg, kafka_bootstrap, topics, [e for evs in streams.values() for e in evs])

    svc = SinkService(ServiceContext(cfg, kafka_bootstrap, "redis://unused", Metrics(), topics))
    svc.writer.flush_rows = 5  # several part files, so the merge removes duplicates across parts
    await _run_until(svc, 2 * N_EVENTS + 1)  # + the dead letter the sink itself produced
    run_dir = run_root / exp
    assert svc.final is not None  # teardown finalised
    _check_run(run_dir, exp)
    before = {name: _lines(run_dir / name) for name in
              ("snapshots.jsonl", "candidates.jsonl", "hypotheses.jsonl", "validations.jsonl",
               "uncertainty.jsonl", "dead_letters.jsonl")}
    assert before == {"snapshots.jsonl": 2, "candidates.jsonl": 2, "hypotheses.jsonl": 3,
                      "validations.jsonl": 4, "uncertainty.jsonl": 1, "dead_letters.jsonl": 1}

    # restart over the same run dir; everything is delivered again (plus the re-dead-lettered record)
    again = ReplaySink(ServiceContext(cfg, kafka_bootstrap, "redis://unused", Metrics(), topics))
    await _run_until(again, 2 * N_EVENTS + 2)
    assert sum(again.written[t] for t in ("snapshots", "candidates", "hypotheses", "validations")) == 0
    assert {name: _lines(run_dir / name) for name in before} == before
    _check_run(run_dir, exp)
    assert not list((run_dir / "texts").glob("part-*.parquet"))  # merged away


def _check_run(run_dir: Path, exp: str) -> None:
    for name in ("config.yaml", "texts.parquet", "snapshots.jsonl", "clusters.json", "clusters.parquet",
                 "uncertainty.jsonl", "candidates.jsonl", "hypotheses.jsonl", "validations.jsonl",
                 "dead_letters.jsonl", "hypotheses.parquet", "results.jsonl", "summary.json", "report.html",
                 "embeddings.parquet", "map_sample.parquet"):
        assert (run_dir / name).is_file(), name
    latest = run_dir.parent / "latest"
    assert latest.resolve() == run_dir.resolve() or (run_dir.parent / "LATEST").read_text().strip() == exp

    texts = pq.read_table(run_dir / "texts.parquet")
    assert texts.num_rows == 13 and len(set(texts.column("text_id").to_pylist())) == 13
    assert orjson.loads(texts.column("meta")[0].as_py())["topic"] == "pets"
    assert set(DecodedText.model_fields) <= set(texts.column_names)  # every field of the contract

    s = orjson.loads((run_dir / "summary.json").read_bytes())
    assert s["experiment_id"] == exp
    assert s["texts"] == {"total": 13, "by_role": {"base": 7, "intervention": 6},
                          "by_model": {"sim-base": 7, "sim-intervention": 6}}
    assert s["embeddings"]["total"] == 13 and s["embeddings"]["cache_hits"] == 3
    assert s["clusters"]["k"] == 3 and s["clusters"]["latest_seq"] == 2 and s["clusters"]["snapshots"] == 2
    assert s["clusters"]["quality"]["silhouette"] == pytest.approx(0.3)
    assert (s["candidates"], s["hypotheses"], s["uncertainty_events"]) == (2, 3, 1)
    assert s["validated"] == [H1_TEXT]
    assert s["decisions"] == {"validated": 1, "rejected": 1, "pending": 1}
    assert s["dead_letters"] == {"total": 1, "by_topic": {"texts": 1}}
    assert s["validator_calls"] == 10 + 11 + 10 + 10
    assert s["cost_usd"] == pytest.approx(0.01)
    assert s["timings"]["time_to_first_validated_s"] == pytest.approx(2010.0 - 1000.0)
    gt = s["ground_truth"]
    assert gt["planted"] == ["cats", "disclaimer", "sailing", "moon"] and gt["matched"] == {"cats": ["h1"]}
    assert gt["precision"] == 1.0 and gt["recall"] == 0.25 and gt["n_mirrors"] == 0
    assert "all-MiniLM-L6-v2" in gt["rule"]

    res = load_results(run_dir).set_index("hypothesis_id")
    assert list(load_results(run_dir)["decision"]) == ["validated", "pending", "rejected"]
    h1 = res.loc["h1"]
    assert (h1.decision, h1.tier, h1.tier_index, h1.p_value) == ("validated", "embedding", 1, 0.001)
    assert h1.tier_path == "keyword:escalated>embedding:validated"
    assert h1.share_diff == pytest.approx(5 / 7 - 1 / 7)  # counts over snapshot 1's totals
    assert h1.share_diff_lo < h1.share_diff < h1.share_diff_hi
    # share evidence comes from the candidate the sink received, never from the messages
    assert (h1.share_intervention, h1.e_value, h1.alpha_spent) == (pytest.approx(5 / 6), 40.0, 0.01)
    # the rule is applied to every hypothesis (only findings count towards precision/recall): by
    # meaning, so h3 from the same cluster as h1 matches nothing; purity is the diagnostic beside it
    assert h1.matched_behaviour == "cats" and h1.match_score > 0.45
    assert pd.isna(res.loc["h3"].matched_behaviour) and res.loc["h3"].purity_behaviour == "cats"
    assert h1.purity == pytest.approx(4 / 5)  # 4 cats texts of the cluster's 5 intervention texts
    assert pd.isna(res.loc["h2"].matched_behaviour)
    assert res.loc["h2"].decision == "rejected" and res.loc["h3"].decision == "pending"
    assert pd.isna(res.loc["h2"].auc) and pd.isna(res.loc["h2"].auc_lo)
    # BH over the two final p-values (0.001, 0.6): q = (0.002, 0.6); pending h3 gets none
    assert h1.q_value == pytest.approx(0.002) and res.loc["h2"].q_value == pytest.approx(0.6)
    assert pd.isna(res.loc["h3"].q_value)
    assert pq.read_table(run_dir / "hypotheses.parquet").num_rows == 3
    assert pq.read_table(run_dir / "clusters.parquet").num_rows == 3

    html = (run_dir / "report.html").read_text()
    assert "Mentions cats &amp; kittens &lt;often&gt;" in html and "<often>" not in html
    assert html.count("<circle class=\"pt ") == 13  # the map: every embedded text (13 < the sample size)
    assert html.count("<tr class='finding'") == 1  # h1 is the one finding; h3 is pending, h2 rejected
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*https?:", html) and "url(http" not in html
    assert "intervention text 2 about cats" in html  # a held-out example whose text came from texts.parquet


# --------------------------------------------------------------------------- pure functions


def test_final_decision_is_last_non_escalated_tier() -> None:
    exp = "e"
    s = scripted(exp)
    h1 = s["hypotheses"][0]
    vals = {v.validation_id: v for v in s["validations"]}
    v, d = final_validation([vals["v2"], vals["v1"]])  # arrival order does not matter
    assert (v.validation_id, d) == ("v2", "validated")
    assert final_validation([vals["v4"]])[1] == "pending"
    assert final_validation([]) == (None, "pending")
    late_reject = _validation(exp, "v5", h1, "llm", 2, "rejected", 0.2, 0.55, 2020.0)
    assert final_validation([vals["v1"], vals["v2"], late_reject])[0].validation_id == "v5"


def test_parquet_parts_merge_dedupes_across_parts_and_merges(tmp_path: Path) -> None:
    schema = pa.schema([("k", pa.string()), ("v", pa.int64())])
    parts = ParquetParts(tmp_path / "p", schema, "k")
    for batch in (["a", "b"], ["b", "c"], ["a"]):
        for key in batch:
            parts.add({"k": key, "v": len(parts)})
        parts.flush()
    out = tmp_path / "merged.parquet"
    assert parts.merge(out) == 3
    assert sorted(pq.read_table(out).column("k").to_pylist()) == ["a", "b", "c"]
    again = ParquetParts(tmp_path / "p", schema, "k")  # a restart: numbering continues, merge keeps old rows
    again.add({"k": "c", "v": 9})
    again.add({"k": "d", "v": 9})
    again.flush()
    assert again.merge(out) == 4 and again.merge(out) == 4


def test_jsonl_log_dedupes_across_reopen_and_repairs_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    ev = UncertaintyEvent(experiment_id="e", uncertainty_id="u1", kind="drift", cluster_ids=[1], score=1.0)
    lg = JsonlLog(path, UncertaintyEvent)
    assert lg.append(ev) and not lg.append(ev)
    lg.close()
    with path.open("ab") as fh:
        fh.write(b'{"experiment_id": "e", "uncert')  # a crash mid-write
    lg = JsonlLog(path, UncertaintyEvent)
    assert not lg.append(ev)
    assert lg.append(ev.model_copy(update={"uncertainty_id": "u2"}))
    lg.close()
    assert [orjson.loads(x)["uncertainty_id"] for x in path.read_bytes().splitlines()] == ["u1", "u2"]


def test_reservoir_is_bounded_and_persists(tmp_path: Path) -> None:
    res = VectorReservoir(size=10, seed=1)
    for i in range(100):
        res.offer(f"t{i}", "base" if i % 2 else "intervention", np.full(4, i, dtype=np.float32))
    res.offer("t99", "base", np.zeros(4))  # a re-delivery already in the sample is ignored (if kept)
    assert len(res.ids) == 10 and len(set(res.ids)) == 10 and res.n_seen in (100, 101)
    res.save(tmp_path / "m.parquet")
    back = VectorReservoir.load(tmp_path / "m.parquet", size=10)
    assert back.ids == res.ids and back.n_seen == res.n_seen
    assert np.array_equal(np.stack(back.vectors), np.stack(res.vectors))
    table = pq.read_table(tmp_path / "m.parquet")  # what the report reads (services/sink/run_view.py)
    assert table.column_names == ["text_id", "role", "vector"] and table.column("text_id").to_pylist() == res.ids
    assert table.schema.metadata[b"n_seen"] == str(res.n_seen).encode() and table.schema.metadata[b"dim"] == b"4"


def test_reservoir_restart_continues_the_same_sample(tmp_path: Path) -> None:
    """The generator's state is saved with the sample: a sink restarted halfway keeps exactly the
    sample an uninterrupted one keeps (a fresh generator would draw other texts)."""
    def offer(res: VectorReservoir, ids: range) -> None:
        for i in ids:
            res.offer(f"t{i}", "base", lambda i=i: np.full(3, i, dtype=np.float32), dim=3)

    whole = VectorReservoir(size=8, seed=5)
    offer(whole, range(400))
    first = VectorReservoir(size=8, seed=5)
    offer(first, range(200))
    first.save(tmp_path / "m.parquet")
    resumed = VectorReservoir.load(tmp_path / "m.parquet", size=8, seed=5)
    offer(resumed, range(200, 400))
    assert resumed.ids == whole.ids and resumed.n_seen == whole.n_seen == 400
    assert np.array_equal(np.stack(resumed.vectors), np.stack(whole.vectors))


def test_reservoir_reads_a_sample_saved_without_its_state(tmp_path: Path) -> None:
    """map_sample.parquet as earlier versions wrote it: the sample and its count, no generator."""
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 2)
    table = pa.table({"text_id": ["a", "b", "c"], "role": ["base"] * 3, "vector": vec})
    pq.write_table(table.replace_schema_metadata({"n_seen": "40", "dim": "2"}), tmp_path / "old.parquet")
    res = VectorReservoir.load(tmp_path / "old.parquet", size=3)
    assert (res.ids, res.n_seen, res.dim) == (["a", "b", "c"], 40, 2)
    assert np.array_equal(res.vectors[2], [4.0, 5.0])
    res.offer("a", "base", np.zeros(2))  # already in the sample: ignored, not counted
    assert res.n_seen == 40


def test_another_kind_of_row_adds_its_columns() -> None:
    """A RowKind (what paired rows use) fills its own columns after the common ones."""
    s = scripted("e")
    paired = s["hypotheses"][0].model_copy(update={"kind": "paired"})
    state = RunState(hypotheses={h.hypothesis_id: h for h in [paired, *s["hypotheses"][1:]]},
                     validations=s["validations"])
    kind = RowKind(columns=(pa.field("n_pairs", pa.int64()),),
                   fields=lambda h, vals, st: {"n_pairs": len(vals)})
    rows = {r["hypothesis_id"]: r for r in results_rows(state, 0.05, {"paired": kind})}
    assert rows["h1"]["n_pairs"] == 2 and "n_pairs" not in rows["h2"]
    assert list(rows["h1"])[-1] == "n_pairs" and set(rows["h2"]) == set(RESULT_SCHEMA.names)
    schema = result_schema([kind])
    assert schema.names == [*RESULT_SCHEMA.names, "n_pairs"]
    assert pa.Table.from_pylist(list(rows.values()), schema=schema).column("n_pairs").to_pylist().count(2) == 1


def test_render_table_lists_findings_only_and_escapes_markup() -> None:
    rows = [
        {"decision": "rejected", "direction": "base", "text": "rejected one", "p_value": 0.5},
        {"decision": "validated", "direction": "intervention", "text": "uses [bold]brackets[/bold]",
         "p_value": 0.01, "q_value": 0.02, "auc": 0.8, "auc_lo": 0.7, "auc_hi": 0.9, "share_diff": 0.1,
         "share_diff_lo": 0.05, "share_diff_hi": 0.15, "tier": "keyword"},
    ]
    buf = io.StringIO()
    render_table(rows, Console(file=buf, width=200, color_system=None))
    out = buf.getvalue()
    assert "rejected one" not in out and "1 rejected" in out  # counted under the table, not a row
    assert "[bold]brackets[/bold]" in out and "+10.0 pp" in out and "0.80" in out


def test_finalize_of_an_empty_run_and_without_ground_truth(tmp_path: Path) -> None:
    empty = tmp_path / "runs" / "empty"
    RunWriter(empty).open("x: 1\n")
    final = finalize_run(empty, alpha=0.05)
    assert final.summary["texts"]["total"] == 0 and final.summary["ground_truth"] is None
    assert load_results(empty).empty and "No mode finding" in (empty / "report.html").read_text()

    run = tmp_path / "runs" / "scripted"
    w = RunWriter(run)
    w.open()
    for events in scripted("scripted").values():
        for ev in events:
            w.add(ev)
    w.flush_all()
    assert finalize_run(run, alpha=0.05, ground_truth=False).summary["ground_truth"] is None
    assert finalize_run(run, alpha=0.05).summary["ground_truth"] is None  # no config.yaml: no behaviours known
    cfg = load_config(None, environ={})
    assert finalize_run(run, alpha=0.05, config=cfg).summary["ground_truth"]["recall"] == 0.25
    assert (tmp_path / "runs" / "latest").resolve() == run.resolve()
