"""report.html: one self-contained file (inline CSS, SVG and JavaScript; no external resource).

Built from the run directory alone (:func:`services.sink.run_view.load_run_view`), so it can be
rebuilt from a copied directory.  It counts *findings* (described hypotheses validated on held-out
texts, :mod:`services.sink.findings`), one row each, with the evidence behind each grouped under
it: every tier's held-out test, the cluster's share statement, mirrors, and contrast examples
chosen for that finding.  Every text from a model or a labeler is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from services.sink.findings import Finding, Grouped, group_rows, paired_value
from services.sink.formatting import (
    DASH,
    finite,
    fmt_duration,
    fmt_e,
    fmt_num,
    fmt_p,
    fmt_pct,
    fmt_pp,
)
from services.sink.report_examples import examples_html
from services.sink.report_examples import side_badge as _side
from services.sink.report_map import (
    MAP_CSS,
    MAP_JS,
    cluster_counts_line,
    clusters_html,
    finding_clusters,
    lineage_text,
    map_html,
)
from services.sink.run_view import RunView, load_run_view

log = logging.getLogger("autointerv.sink")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem;line-height:1.4}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
.muted{color:#666;font-size:.88rem}
.cards{display:flex;flex-wrap:wrap;gap:.6rem;margin:1rem 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.45rem .8rem;min-width:7.5rem}
.card b{display:block;font-size:1.3rem}.card.key{border-color:#1a7f37;background:#f3fbf4}
table{border-collapse:collapse;width:100%;font-size:.9rem;margin:.5rem 0}
th,td{border-bottom:1px solid #eee;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f6f6;font-weight:600}th.num{text-align:right}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.validated{color:#1a7f37;font-weight:600}.rejected{color:#b42318}.pending,.escalated{color:#9a6700}
.side{display:inline-block;border-radius:3px;padding:0 .3rem;font-size:.75rem;color:#fff;margin-right:.3rem}
.side.intervention{background:#f58518}.side.base{background:#4c78a8}
.typ{color:#666;font-size:.85rem}
details{margin:.6rem 0;border:1px solid #e4e4e4;border-radius:6px;padding:.4rem .8rem}
details>summary{cursor:pointer}
.ex td{font-size:.86rem;width:42%}.ex td.prompt{width:16%;color:#666}
mark{background:#fff0b3;padding:0 .1rem}
button{font-size:.78rem;cursor:pointer;border:1px solid #bbb;background:#fafafa;border-radius:4px}
.evid{margin:.3rem 0 .3rem 1rem;font-size:.88rem}
.nw{white-space:nowrap}table.findings td:nth-child(2){max-width:34rem}
tr.finding td{border-bottom:none;padding-top:.6rem}tr.evrow td{padding-top:0}tr.evrow details{margin:0 0 .3rem}
"""

# --------------------------------------------------------------------------- small pieces


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: set[int] | None = None,
           row_ids: Sequence[str] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th class='num'>{escape(h)}</th>" if i in numeric else f"<th>{escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for k, r in enumerate(rows):
        rid = f" id='{row_ids[k]}'" if row_ids else ""
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        body.append(f"<tr{rid}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _decision(d: Any) -> str:
    d = escape(str(d or "pending"))
    return f"<span class='{d}'>{d}</span>"


def _described(text: str) -> str:
    """The description, with the offline labeler's quoted example set in a quieter type."""
    head, sep, tail = text.partition(" Typical: ")
    return escape(head) + (f" <span class='typ'>Typical: {escape(tail)}</span>" if sep else "")


def _test_cell(row: Mapping[str, Any]) -> str:
    auc = finite(row.get("auc"))
    parts = []
    if auc is not None:
        ci = (f" [{fmt_num(row.get('auc_lo'))}, {fmt_num(row.get('auc_hi'))}]"
              if finite(row.get("auc_lo")) is not None else "")
        parts.append(f"AUC {fmt_num(auc)}{ci}")
    parts.append(f"p = {fmt_p(row.get('p_value'))}" + (f" · q = {fmt_p(row.get('q_value'))}"
                                                       if finite(row.get("q_value")) is not None else ""))
    n_pos, n_neg = finite(row.get("n_pos")), finite(row.get("n_neg"))
    held = f", {int(n_pos)} vs {int(n_neg)} held-out texts" if n_pos is not None and n_neg is not None else ""
    parts.append(f"<span class='muted'>{escape(str(row.get('tier') or DASH))} tier{held}</span>")
    return "<br>".join(f"<span class='nw'>{x}</span>" for x in parts)


def _share_evidence(f: Finding) -> str:
    if not f.evidence:
        return f"<span class='muted nw'>e = {fmt_e(f.row.get('e_value'))}</span>" if f.row.get("e_value") else DASH
    ev = f.evidence[0]
    return (f"<span class='nw'>e = {fmt_e(ev.get('e_value') or f.row.get('e_value'))}</span>"
            f"<br>{_decision(ev.get('decision'))}")


def _difference(view: RunView, row: Mapping[str, Any]) -> str:
    d = finite(row.get("share_diff"))
    if d is None:
        return DASH
    lo, hi = finite(row.get("share_diff_lo")), finite(row.get("share_diff_hi"))
    ci = f" <span class='muted'>[{100 * lo:+.1f}, {100 * hi:+.1f}]</span>" if lo is not None and hi is not None else ""
    cand = view.candidates.get(str(row.get("candidate_id")))
    rates = ""
    if cand:
        seqs = [s for s in view.totals_by_seq if s <= int(cand.get("snapshot_seq", 0))] or list(view.totals_by_seq)
        if seqs:
            nb, ni = view.totals_by_seq[max(seqs)]
            if nb and ni:
                rates = (f"<br><span class='muted'>{fmt_pct(int(cand['count_intervention']) / ni, 1)} of intervention"
                         f" texts vs {fmt_pct(int(cand['count_base']) / nb, 1)} of base</span>")
    return f"{fmt_pp(d)}{ci}{rates}"


def _cluster_cell(view: RunView, f: Finding) -> str:
    cid = f.row.get("cluster_id")
    if cid is None:
        return DASH
    cid = int(cid)
    final = finding_clusters(view, f)
    link = f"<a href='#cluster-{cid}'>{cid}</a>" if cid in view.final_ids else str(cid)
    lin = lineage_text(view, cid)
    extra = ""
    if lin:
        extra = "<br><span class='muted'>" + escape(lin.split(";")[0]) + (
            "; now " + ", ".join(f"<a href='#cluster-{d}'>{d}</a>" for d in final) if final else "") + "</span>"
    button = (f"<br><button data-show='{','.join(str(c) for c in final)}'>show on map</button>"
              if final and view.sample is not None else "")
    return f"{link}{extra}{button}"


# --------------------------------------------------------------------------- finding sections


def _tiers_html(view: RunView, row: Mapping[str, Any]) -> str:
    vals = view.validations.get(str(row.get("hypothesis_id")), [])
    if not vals:
        return ""
    rows = []
    for v in vals:
        ci = v.get("auc_ci") or [None, None]
        auc = (f"{fmt_num(v.get('auc'))} [{fmt_num(ci[0])}, {fmt_num(ci[1])}]"
               if finite(v.get("auc")) is not None else DASH)
        rows.append([escape(str(v.get("tier"))), _decision(v.get("decision")), auc, fmt_p(v.get("p_value")),
                     fmt_p(v.get("alpha_level")), f"{v.get('n_pos', DASH)} / {v.get('n_neg', DASH)}"])
    return ("<div class='evid'><b>Held-out tests, tier by tier</b>"
            + _table(["tier", "decision", "AUC [95% CI]", "p", "level α", "texts side / other"], rows, {2, 3, 4, 5})
            + "</div>")


def _finding_detail(view: RunView, f: Finding) -> str:
    """The evidence under one finding: each tier's test, the share statement, mirrors, examples."""
    r = f.row
    kw = ", ".join(r.get("keywords") or []) or DASH
    n_tiers = len(view.validations.get(f.hypothesis_id, []))
    what = [f"{n_tiers} tier test(s)"] if n_tiers else []
    what += [f"{len(f.evidence)} share statement(s)"] if f.evidence else []
    what += [f"{len(f.mirrors)} mirror(s)"] if f.mirrors else []
    parts = [f"<details id='finding-{f.number}-detail'><summary>evidence: {', '.join([*what, 'contrast examples'])}"
             f"</summary><p class='muted'>labeler {escape(str(r.get('labeler') or DASH))} · keywords {escape(kw)}"
             f" · tier path {escape(str(r.get('tier_path') or DASH))} · hypothesis {escape(f.hypothesis_id[:12])}</p>",
             _tiers_html(view, r)]
    def counts(row: Mapping[str, Any]) -> str:
        return cluster_counts_line(view.candidates.get(str(row.get("candidate_id"))), view.totals_by_seq)

    for ev in f.evidence:
        parts.append(f"<div class='evid'><b>Share statement</b> (evidence, not a finding; "
                     f"{_decision(ev.get('decision'))}, p = {fmt_p(ev.get('p_value'))}, e = {fmt_e(ev.get('e_value'))})"
                     f": {escape(str(ev.get('text')))}<br><span class='muted'>{escape(counts(ev))}</span></div>")
    if not f.evidence and counts(r):
        parts.append(f"<div class='evid muted'>{escape(counts(r))}</div>")
    for m in f.mirrors:
        parts.append(f"<div class='evid'><b>Mirror</b> (the same difference seen from the other side): "
                     f"{_side(m.get('direction'))}{escape(str(m.get('text')))} <span class='muted'>cluster "
                     f"{m.get('cluster_id', DASH)}, p = {fmt_p(m.get('p_value'))}</span></div>")
    parts.append("<div class='evid'><b>Contrast examples</b>" + examples_html(view, r) + "</div></details>")
    return "".join(parts)


def _findings_table(view: RunView, findings: Sequence[Finding], headers: Sequence[str],
                    cells: Any, numeric: set[int]) -> str:
    """One row per finding, and under it one full-width row holding its evidence (collapsed)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for f in findings:
        tds = "".join(f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
                      for i, c in enumerate(cells(f)))
        body.append(f"<tr class='finding' id='finding-{f.number}' data-kind='{f.kind}'>{tds}</tr>"
                    f"<tr class='evrow'><td></td><td colspan='{len(headers) - 1}'>{_finding_detail(view, f)}</td></tr>")
    return f"<table class='findings'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _finding_cell(f: Finding) -> str:
    r = f.row
    mirrors = f"<br><span class='muted'>+ {len(f.mirrors)} mirror(s), see evidence</span>" if f.mirrors else ""
    return _side(r.get("direction")) + _described(str(r.get("text"))) + mirrors


def _mode_section(view: RunView, findings: Sequence[Finding]) -> str:
    if not findings:
        return ("<h2>Mode findings</h2><p>No mode finding: no cluster's description was validated on held-out"
                " texts at the stated error rate. On a run that compares a model with itself this is the"
                " expected result.</p>")
    cells = lambda f: [f"<b>{f.number}</b>", _finding_cell(f), _cluster_cell(view, f),  # noqa: E731
                       _difference(view, f.row), _test_cell(f.row), _share_evidence(f)]
    return ("<h2>Mode findings</h2><p class='muted'>Clusters one model fills and the other does not, each with a"
            " description validated on held-out texts its labeler never saw. Difference: P(cluster | intervention)"
            " − P(cluster | base) in percentage points with a 95% CI. The cluster's share test is shown as evidence"
            " beside the finding, not counted as one.</p>"
            + _findings_table(view, findings, ["#", "finding", "cluster", "difference", "held-out test",
                                               "share test"], cells, {0}))


def _paired_section(view: RunView, findings: Sequence[Finding], any_paired: bool) -> str:
    head = ("<h2>Paired findings</h2><p class='muted'>Differences in how the two models answer the same prompts"
            " (style, form, stance), tested on held-out pairs. Effect: P(the named side's answer scores higher"
            " than its partner's), 0.5 = no difference, with a 95% CI; rates: share of answers showing it.</p>")
    if not findings:
        return head + ("<p>No paired finding was validated.</p>" if any_paired
                       else "<p>This run proposed no paired hypothesis.</p>")
    def cells(f: Finding) -> list[str]:
        r = f.row
        eff, lo, hi = paired_value(r, "effect"), paired_value(r, "lo"), paired_value(r, "hi")
        ci = f" <span class='muted'>[{fmt_num(lo)}, {fmt_num(hi)}]</span>" if lo is not None and hi is not None else ""
        rate, other = paired_value(r, "rate"), paired_value(r, "rate_other")
        n = paired_value(r, "n")
        return [f"<b>{f.number}</b>", _finding_cell(f), DASH if eff is None else fmt_num(eff) + ci,
                DASH if rate is None or other is None else f"{fmt_pct(rate)} vs {fmt_pct(other)}",
                DASH if n is None else f"{int(n):,}", _test_cell(r)]

    return head + _findings_table(view, findings, ["#", "finding", "P(side > partner) [CI]", "rates", "pairs",
                                                   "held-out test"], cells, {0, 2, 3, 4})


def _undescribed_section(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    body = [[f"{r.get('cluster_id', DASH)}", _side(r.get("direction")) + escape(str(r.get("text"))),
             fmt_p(r.get("p_value")), fmt_e(r.get("e_value"))] for r in rows]
    return ("<h2>Clusters that differ, without a proven description</h2><p class='muted'>The share test says these"
            " clusters differ, but no description of how was validated on held-out texts, so none is a finding."
            "</p>" + _table(["cluster", "share statement", "p", "e-value"], body, {0, 2, 3}))


def _rejected_section(g: Grouped) -> str:
    if not g.not_validated:
        return "<h2>Rejected hypotheses</h2><p>None.</p>"
    body = [[_decision(r.get("decision")), _side(r.get("direction")) + _described(str(r.get("text"))),
             escape(str(r.get("hypothesis_kind") or r.get("kind") or DASH)), f"{r.get('cluster_id', DASH)}",
             _test_cell(r)]
            for r in g.not_validated]
    n_rej = sum(1 for r in g.not_validated if r.get("decision") == "rejected")
    return (f"<h2>Rejected hypotheses</h2><details><summary>{n_rej} rejected, {len(g.not_validated) - n_rej}"
            " pending (described hypotheses that were not validated)</summary>"
            + _table(["decision", "hypothesis", "kind", "cluster", "held-out test"], body, {3}) + "</details>")


# --------------------------------------------------------------------------- header, ground truth


def _header(view: RunView, g: Grouped) -> str:
    s = view.summary
    t, tim = s.get("texts") or {}, s.get("timings") or {}
    cl, emb = s.get("clusters") or {}, s.get("embeddings") or {}
    n_mode, n_paired = len(g.of_kind("mode")), len(g.of_kind("paired"))
    rate = emb.get("cache_hit_rate")
    cards = [
        ("findings", f"{len(g.findings)}", True), ("mode / paired", f"{n_mode} / {n_paired}", True),
        ("texts", f"{t.get('total', 0):,}", False),
        *((f"texts: {r}", f"{n:,}", False) for r, n in sorted((t.get("by_role") or {}).items())),
        ("hypotheses tested", str(len(g.findings) + sum(len(f.mirrors) for f in g.findings) + len(g.not_validated)),
         False),
        ("clusters (k)", str(cl.get("k", DASH)), False), ("candidates", str(s.get("candidates", DASH)), False),
        ("first finding after", fmt_duration(tim.get("time_to_first_validated_s")), False),
        ("wall time", fmt_duration(tim.get("wall_s")), False),
        ("dead letters", str((s.get("dead_letters") or {}).get("total", 0)), False),
        ("cache hit rate", fmt_pct(rate) if rate is not None else DASH, False),
        ("validator calls", str(s.get("validator_calls", DASH)), False),
        ("cost", f"${float(s.get('cost_usd') or 0):.2f}", False),
    ]
    html_cards = "".join(f"<div class='card{' key' if key else ''}'><b>{escape(v)}</b>{escape(k)}</div>"
                         for k, v, key in cards)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["finalized_at"])) if s.get("finalized_at") else DASH
    models = ", ".join(f"{escape(m)}: {n:,}" for m, n in sorted((t.get("by_model") or {}).items())) or DASH
    stopped = f" · stopped because: <b>{escape(str(s['stopped_because']))}</b>" if s.get("stopped_because") else ""
    return (f"<h1>autointerv report</h1><div class='muted'>experiment <b>{escape(str(s.get('experiment_id', '')))}"
            f"</b> · written {escape(when)} · α = {s.get('alpha', DASH)} · models: {models}{stopped}</div>"
            f"<div class='cards'>{html_cards}</div>"
            f"<p>{len(g.findings)} finding{'s' if len(g.findings) != 1 else ''}: each is a description validated on"
            " held-out texts its labeler never saw. Share statements about a cluster, tier-by-tier tests and"
            " mirrors are shown as evidence under the finding they support.</p>")


def _ground_truth_section(view: RunView, g: Grouped) -> str:
    gt = view.summary.get("ground_truth")
    if not gt:
        return ""
    planted = list(gt.get("planted") or [])
    number = {f.hypothesis_id: f.number for f in g.findings}
    for f in g.findings:
        number.update({str(m.get("hypothesis_id")): f.number for m in f.mirrors})
    found = len(planted) - len(gt.get("missed") or [])
    prec = gt.get("precision")
    rows = []
    for b in planted:
        ids = (gt.get("matched") or {}).get(b, [])
        nums = sorted({number[h] for h in ids if h in number})
        other = len([h for h in ids if h not in number])
        cell = ", ".join(f"<a href='#finding-{n}'>#{n}</a>" for n in nums) or "<i>no finding</i>"
        if other:
            cell += f" <span class='muted'>(+ {other} share statement{'s' if other > 1 else ''})</span>"
        kind = escape(str((gt.get("planted_kinds") or {}).get(b, "")))
        rows.append([escape(b), kind or DASH, cell if ids else "<i>missed</i>"])
    heads = [f for f in g.findings]
    matching = [f for f in heads if f.row.get("matched_behaviour")]
    line = (f"<p>precision <b>{fmt_num(prec)}</b> ({gt.get('n_validated_matching', DASH)} of"
            f" {gt.get('n_validated', DASH)} validated hypotheses match a planted behaviour) · recall"
            f" <b>{fmt_num(gt.get('recall'))}</b> ({found} of {len(planted)} planted behaviours found).</p>")
    if heads:
        line += (f"<p class='muted'>Counted over findings only (share statements and mirrors left out): "
                 f"{len(matching)} of {len(heads)} findings match a planted behaviour.</p>")
    per_kind = [f"{k}: precision {fmt_num(v.get('precision'))}, recall {fmt_num(v.get('recall'))}"
                f" ({v.get('n_validated_matching', 0)} of {v.get('n_validated', 0)} validated match)"
                for k, v in (gt.get("by_kind") or {}).items()]
    if per_kind:
        line += "<p class='muted'>By kind of finding: " + escape("; ".join(per_kind)) + ".</p>"
    return "<h2>Ground truth (planted behaviours)</h2>" + line + _table(["behaviour", "kind", "found by"], rows)


def _dead_letters(view: RunView) -> str:
    dl = (view.summary.get("dead_letters") or {}).get("by_topic") or {}
    if not dl:
        return "<h2>Dead letters</h2><p>None.</p>"
    rows = [[escape(k), f"{v:,}"] for k, v in sorted(dl.items())]
    return "<h2>Dead letters</h2>" + _table(["topic", "records"], rows, {1})


# --------------------------------------------------------------------------- the page


def render_report(run_dir: str | Path) -> str:
    view = load_run_view(run_dir)
    g = group_rows(view.rows)
    try:
        the_map = map_html(view, g.findings)
    except Exception:  # a picture must never cost the run its report
        log.exception("the map could not be drawn")
        the_map = "<p class='muted'>The map could not be drawn (see the log).</p>"
    any_paired = any(r.get("kind") == "paired" for r in view.rows)
    body = [
        _header(view, g),
        _mode_section(view, g.of_kind("mode")),
        _paired_section(view, g.of_kind("paired"), any_paired),
        _undescribed_section(g.undescribed),
        "<h2 id='map-section'>Map of the texts</h2>", the_map,
        "<h2>Clusters</h2>", clusters_html(view, g.findings),
        _ground_truth_section(view, g),
        _rejected_section(g),
        _dead_letters(view),
        "<p class='muted'>Decisions come from the validator cascade (online FDR control at level α); q-values are"
        " Benjamini-Hochberg adjusted across all final p-values at report time. e-values are anytime-valid evidence"
        " ratios (1/e bounds the chance of such evidence with no difference). Full results: results.jsonl,"
        " hypotheses.parquet, summary.json.</p>",
    ]
    title = escape(str(view.summary.get("experiment_id", "")))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>autointerv · {title}</title>"
            f"<style>{CSS}{MAP_CSS}</style></head><body>{''.join(body)}<script>{MAP_JS}</script></body></html>")


def write_report(run_dir: str | Path) -> Path:
    """Render report.html into the run directory (atomic replace)."""
    path = Path(run_dir) / "report.html"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(render_report(run_dir).encode())
    os.replace(tmp, path)
    return path
