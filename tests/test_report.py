"""The report tells the truth: one row per finding with its evidence under it, shares and bars from
the same counts, clusters under their final ids with their lineage, contrast examples per finding,
readable numbers, and a terminal table that fits 80 columns.  Runs on the fixture run directory of
:mod:`tests.report_fixture` (written by the sink's own RunWriter and finalize_run)."""

from __future__ import annotations

import io
import math
import re
import shutil
from html import escape
from pathlib import Path

import numpy as np
import pytest
from report_fixture import E_VALUE, MIRROR_TEXT, PAIRED_TEXT, build_run
from rich.console import Console

from services.clusterer.snapshot import CENTROIDS_EVERY
from services.clusterer.state import ClusterState
from services.core.config import ClustererConfig
from services.sink.findings import group_rows
from services.sink.formatting import fmt_e, fmt_p, fmt_pct, fmt_pp, sci
from services.sink.report import render_report
from services.sink.table import load_results, render_table


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def html(run_dir: Path) -> str:
    return (run_dir / "report.html").read_text()


def _row(html: str, row_id: str) -> str:
    m = re.search(rf"<tr[^>]* id='{row_id}'[^>]*>(.*?)</tr>", html, re.S)
    assert m, row_id
    return m.group(1)


def _examples(html: str, number: int) -> list[tuple[str, str]]:
    """(held-out text, contrast text) rows of one finding's contrast examples, tags stripped."""
    detail = html.split(f"<details id='finding-{number}-detail'>")[1].split("</details>")[0]
    table = detail.split("<table class='ex'>")[1].split("</table>")[0]
    rows = re.findall(r"<tr><td class='prompt'>.*?</td><td>(.*?)</td><td>(.*?)</td></tr>", table, re.S)
    return [(re.sub("<[^>]+>", "", a), re.sub("<[^>]+>", "", b)) for a, b in rows]


# --------------------------------------------------------------------------- numbers


def test_numbers_are_readable() -> None:
    assert sci(E_VALUE) == "3.8e11" and fmt_e(E_VALUE) == "3.8e11" and fmt_e(2.0) == "2" and fmt_e(420.4) == "420"
    assert fmt_p(1.1e-15) == "1.1e-15" and fmt_p(0.034) == "0.034" and fmt_p(0.0) == "< 1e-300"
    assert fmt_pct(0.4583) == "46%" and fmt_pct(0.004) == "0.4%" and fmt_pp(0.046) == "+4.6 pp"
    assert fmt_p(math.nan) == fmt_e(None) == fmt_pct(math.inf) == "–"


# --------------------------------------------------------------------------- grouping


def test_findings_group_evidence_mirrors_and_kinds() -> None:
    nan = math.nan  # what pandas gives for a field a row lacks
    rows = [
        {"hypothesis_id": "t1", "candidate_id": "c1", "kind": "templated", "decision": "validated", "p_value": 1e-12},
        {"hypothesis_id": "h1", "candidate_id": "c1", "kind": "contrastive", "decision": "validated", "p_value": 1e-7,
         "mirror_of": nan},
        {"hypothesis_id": "h4", "candidate_id": "c1", "kind": "contrastive", "decision": "validated", "p_value": 1e-3},
        {"hypothesis_id": "h2", "candidate_id": "c2", "kind": "contrastive", "decision": "rejected", "p_value": 0.4},
        {"hypothesis_id": "t2", "candidate_id": "c2", "kind": "templated", "decision": "validated", "p_value": 0.02},
        {"hypothesis_id": "p1", "candidate_id": nan, "kind": "paired", "decision": "validated", "p_value": 1e-9},
        {"hypothesis_id": "m1", "candidate_id": "c9", "kind": "contrastive", "decision": "validated", "p_value": 1e-9,
         "mirror_of": "h1"},
        {"hypothesis_id": "t9", "candidate_id": "c9", "kind": "templated", "decision": "validated", "p_value": 1e-9},
    ]
    g = group_rows(rows)
    assert [(f.number, f.hypothesis_id, f.kind) for f in g.findings] == [(1, "h1", "mode"), (2, "h4", "mode"),
                                                                          (3, "p1", "paired")]
    h1, h4, p1 = g.findings
    assert [r["hypothesis_id"] for r in h1.evidence] == ["t1", "t9"]  # its own and its mirror's statement
    assert [r["hypothesis_id"] for r in h4.evidence] == ["t1"] and p1.evidence == []
    assert [r["hypothesis_id"] for r in h1.mirrors] == ["m1"] and h4.mirrors == []
    assert [r["hypothesis_id"] for r in g.undescribed] == ["t2"]
    assert [r["hypothesis_id"] for r in g.not_validated] == ["h2"]
    # a mirror of something that is no finding stands as a finding itself
    alone = group_rows([{"hypothesis_id": "m", "kind": "contrastive", "decision": "validated", "mirror_of": "x"}])
    assert [f.hypothesis_id for f in alone.findings] == ["m"]


# --------------------------------------------------------------------------- the HTML report


def test_one_row_per_finding_with_evidence_under_it(html: str) -> None:
    assert html.count("<tr class='finding'") == 3
    assert html.count("data-kind='mode'") == 2 and html.count("data-kind='paired'") == 1
    assert "Mentions cats &amp; kittens &lt;often&gt;" in html and "<often>" not in html
    assert html.count("<b>Mirror</b>") == 1 and MIRROR_TEXT in html  # under finding 1, not a row of its own
    assert html.count("<b>Share statement</b>") == 2  # t1 beside both findings about cluster 2
    assert escape(PAIRED_TEXT) in _row(html, "finding-3") and "0.71" in _row(html, "finding-3")
    assert "31% vs 6%" in _row(html, "finding-3")
    undescribed = html.split("Clusters that differ, without a proven description")[1].split("<h2")[0]
    assert "like cluster 0" in undescribed
    rejected = html.split("<h2>Rejected hypotheses</h2>")[1].split("<h2")[0]
    assert rejected.startswith("<details>") and "Talks about trains" in rejected


def test_numbers_and_ground_truth_are_formatted(html: str) -> None:
    assert "3.8e11" in html and "381740047990" not in html
    assert "p = 1.2e-7" in html
    assert "{_num" not in html and "{" not in html.split("Ground truth")[1].split("<h2")[0]
    assert re.search(r"precision <b>1\.00</b> \(2 of 2 validated.*recall <b>1\.00</b> \(1 of 1 planted", html)


def test_cluster_shares_and_bars_use_the_same_counts(html: str) -> None:
    four = _row(html, "cluster-4")  # a child of a split with no text of its own yet, 8 inherited
    assert "no own texts yet" in four and "0 / 0" in four and ">8<" in four and "50%" not in four
    three = _row(html, "cluster-3")
    assert "0 / 5" in three and ">7<" in three and "100%" in three and "of 5" in three
    assert "5 own intervention · 7 inherited intervention" in three  # the bar's segments say the same


def test_split_clusters_are_found_through_their_lineage(html: str) -> None:
    assert "cluster 2 (findings #1, #2) → <a href='#cluster-3'>3</a>, <a href='#cluster-4'>4</a>" in html
    assert "2 → 3" in _row(html, "cluster-3")
    assert "split; now" in _row(html, "finding-1") and "data-show='3,4'" in _row(html, "finding-1")


def test_map_points_carry_final_clusters_and_hover_text(html: str) -> None:
    points = re.findall(r'<circle class="pt (\w)" [^>]*data-c="(\d*)" data-tip="([^"]*)"', html)
    assert len(points) == 60
    by_cluster = {c for _, c, _ in points}
    assert by_cluster == {"0", "1", "3", "4"}  # nearest centroid of snapshot 2: final ids only
    cats = [tip for _, c, tip in points if c in ("3", "4")]
    assert len(cats) == 15 and all("My cat number" in t and "intervention (sim-intervention)" in t for t in cats)
    assert all("finding #1, #2" in t for t in cats)
    assert any(t.startswith("base (sim-base) · cluster 0") for _, _, t in points)


def test_contrast_examples_are_chosen_per_finding_from_both_sides(html: str) -> None:
    one, two = _examples(html, 1), _examples(html, 2)
    assert len(one) == len(two) == 3
    assert [a for a, _ in one] != [a for a, _ in two]
    for mine, other in one + two:
        k = re.search(r"My cat number (\d+)", mine)
        assert k, mine  # this side: held-out texts of the cluster
        assert other == f"A base answer number {k.group(1)} about the weather and the trains."  # same prompt
    assert all("purrs" in a for a, _ in one)  # finding 1's keywords pick its examples


def test_report_is_rebuilt_from_a_copied_run_directory(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / run_dir.name
    shutil.copytree(run_dir, copy)
    assert render_report(copy) == render_report(run_dir)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*https?:", render_report(copy))


# --------------------------------------------------------------------------- terminal table


def test_terminal_table_fits_80_columns_one_row_per_finding(run_dir: Path) -> None:
    buf = io.StringIO()
    render_table(load_results(run_dir).to_dict("records"), Console(file=buf, width=80, color_system=None))
    out = buf.getvalue()
    assert max(len(line) for line in out.splitlines()) <= 80
    assert re.findall(r"^│ +(\d+) │", out, re.M) == ["1", "2", "3"]
    flat = " ".join(out.split())
    assert "Mentions cats & kittens <often> (+1" in flat and "[paired] The intervention's" in flat
    assert "battles" not in out and "trains" not in out  # the mirror and the rejected one are counted, not rows
    assert "2 share statement(s)" in flat and "1 mirror(s), 1 rejected" in flat
    assert "+50.0 pp" in out and "1.2e-7" in out and "0.71" in out and "[0.62,0.79]" in out


# --------------------------------------------------------------------------- the snapshot feeding it


def test_snapshot_carries_own_counts_lineage_and_centroids() -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 16))
    X = (centres[rng.integers(0, 6, size=3000)] + 0.05 * rng.normal(size=(3000, 16))).astype(np.float32)
    roles = np.where(rng.random(3000) < 0.5, "base", "intervention")
    cfg = ClustererConfig(k_initial=2, k_max=40, warmup=200, batch_size=64, split_every=250, split_min_size=100,
                          reservoir_size=20, vector_reservoir_size=32, min_cluster_texts=30)
    st = ClusterState(cfg, "exp")

    def feed(a: int, b: int) -> None:
        st.ingest_arrays([f"t{i}" for i in range(a, b)], [f"p{i}" for i in range(a, b)], roles[a:b].tolist(),
                         ["x"] * (b - a), X[a:b])

    feed(0, 1000)
    first = st.snapshot()
    cents = first.centroids()  # the first snapshot carries them all
    assert sorted(cents) == sorted(st.engine.ids)
    assert np.allclose(np.stack([cents[c] for c in st.engine.ids]), st.engine.centroids, atol=1e-2)
    assert st.snapshot().centroids() == {}  # nothing new: nothing sent
    before = set(st.engine.ids)
    feed(1000, 1500)  # splits
    new = set(st.engine.ids) - before
    assert new and set(st.snapshot().centroids()) == new  # only the clusters created since
    rest = [st.snapshot() for _ in range(CENTROIDS_EVERY - 2)]
    assert [len(s.centroids()) for s in rest[:-1]] == [0] * (CENTROIDS_EVERY - 3)
    assert sorted(rest[-1].centroids()) == sorted(st.engine.ids)  # every CENTROIDS_EVERY-th: all again

    feed(1500, 3000)
    snap = st.snapshot()
    assert snap.lineage and all(c.parent_id == snap.lineage[c.cluster_id] for c in snap.clusters if c.parent_id)
    assert set(snap.lineage) >= set(first.lineage)  # retired clusters keep their place in the lineage
    assert any(c.count_base + c.count_intervention > c.own_base + c.own_intervention for c in snap.clusters)
    for c in snap.clusters:
        assert 0 <= c.own_base <= c.count_base and 0 <= c.own_intervention <= c.count_intervention
        n = c.own_base + c.own_intervention
        assert c.share_intervention == pytest.approx(c.own_intervention / n if n else 0.5)
    assert sum(c.count_base + c.count_intervention for c in snap.clusters) == snap.n_seen
