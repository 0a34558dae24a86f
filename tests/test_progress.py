"""Plain progress lines (stdout not a terminal): share of the budget, texts/s, ETA and what is
validated, from the same numbers as the live table, at most one line per interval."""

from __future__ import annotations

import io

from services.core.metrics import Metrics
from services.core.progress import PlainProgress, ProgressSnapshot, snapshot


def _snap(generated: int, validated: int = 0, dead: int = 0) -> ProgressSnapshot:
    return ProgressSnapshot(round=3, planned=2400, generated=generated, embedded=generated - 10, clustered=1900,
                            candidates=4, hypotheses=5, validated=validated, dead_letters=dead)


def test_line_shows_share_rate_eta_and_validated():
    p = PlainProgress(budget_texts=6000, started=0.0)
    first = p.line(_snap(0), now=0.0)
    assert "0% of budget (0/6,000 texts)" in first and "ETA -" in first
    line = p.line(_snap(3000, validated=2), now=100.0)
    assert "[ 1m40s] 50% of budget (3,000/6,000 texts)" in line and "50% of budget (3,000/6,000 texts)" in line
    assert "30.0 texts/s" in line and "ETA 1m40s" in line and "validated 2" in line and "round 3" in line
    assert "dead letters" not in line
    assert "dead letters 7" in p.line(_snap(6000, dead=7), now=150.0)
    assert "100% of budget" in p.line(_snap(6000), now=160.0) and "ETA 0s" in p.line(_snap(6000), now=161.0)


def test_rate_is_over_the_last_minute_not_the_whole_run():
    p = PlainProgress(budget_texts=100_000, started=0.0)
    p.line(_snap(0), now=0.0)
    p.line(_snap(60_000), now=60.0)  # a fast first minute
    p.line(_snap(60_600), now=120.0)  # then 10 texts/s
    assert "10.0 texts/s" in p.line(_snap(61_200), now=180.0)


def test_prints_at_most_once_per_interval():
    out = io.StringIO()
    p = PlainProgress(budget_texts=100, interval_s=10.0, started=0.0)
    assert p.maybe_print(_snap(10), out, now=1.0)
    assert not p.maybe_print(_snap(20), out, now=5.0)
    assert p.maybe_print(_snap(30), out, now=11.5)
    assert p.maybe_print(_snap(30), out, now=12.0, force=True)  # e.g. the final line
    assert len(out.getvalue().splitlines()) == 3


def test_snapshot_reads_the_live_tables_numbers():
    m = Metrics()
    m.counter("generator_texts_total", "x", ["backend", "role"]).labels("sim", "base").inc(40)
    m.processed.labels("embedder", "texts").inc(35)
    m.processed.labels("clusterer", "embeddings").inc(99)
    m.dead_letters.labels("embedder", "texts").inc(2)
    s = snapshot({"round": 2, "planned": 80, "clustered": 30, "candidates": 1, "hypotheses": 2, "validated": 1,
                  "stop_reason": ""}, m)
    assert s == ProgressSnapshot(round=2, planned=80, generated=40, embedded=35, clustered=30, candidates=1,
                                 hypotheses=2, validated=1, dead_letters=2)
    assert snapshot({}, Metrics()).generated == 0  # before the controller's setup
