"""The report's two pictures as inline HTML: the interactive map of texts and the cluster table.

Both are plain SVG/HTML with a few lines of inline JavaScript (no CDN, no network), so the report
stays one self-contained file that works offline.  The map's hover text (snippet, model, cluster)
sits in each point's ``data-tip`` attribute and is shown with ``textContent``, never parsed as HTML.

The cluster table draws its bars from the same counts its share is computed on: a cluster's *own*
texts (assigned to it since it was created; what the share, CI and e-value test) in solid colour,
and the texts *inherited* from its parent at a split (estimated, never tested) hatched beside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

from services.core.events import ClusterStats
from services.sink.findings import Finding
from services.sink.formatting import fmt_e, fmt_int, fmt_pct
from services.sink.run_view import RunView

MAP_W, MAP_H, PAD = 1100, 620, 16
CLUSTER_ROWS = 25  # shown open; the rest behind a <details>
SNIPPET = 160  # characters of a text in its hover tip

MAP_CSS = """
.mapwrap{position:relative;display:block}
.mapwrap svg{border:1px solid #ddd;border-radius:6px;background:#fff;width:100%;height:auto}
.pt{opacity:.55}.pt.b{fill:#4c78a8}.pt.i{fill:#f58518}.pt:hover{opacity:1;stroke:#000;stroke-width:1}
svg.sel .pt{opacity:.07}svg.sel .pt.on{opacity:.95;stroke:#222;stroke-width:.5}
.mk text{font:bold 13px system-ui,sans-serif;paint-order:stroke;stroke:#fff;stroke-width:3px}
svg.sel .mk{opacity:.25}svg.sel .mk.on{opacity:1}
#tip{position:absolute;pointer-events:none;background:#222;color:#fff;padding:.35rem .55rem;border-radius:4px;
font-size:.8rem;max-width:26rem;display:none;white-space:pre-wrap;z-index:5}
.mapctl{margin:.4rem 0}.legend span{display:inline-block;margin-right:1rem}
.dot{display:inline-block;width:.7rem;height:.7rem;border-radius:50%;vertical-align:middle;margin-right:.25rem}
.bar{display:flex;height:.8rem;min-width:4px;background:#f3f3f3}
.bar span{display:block;height:100%}.bar .ob{background:#4c78a8}.bar .oi{background:#f58518}
.bar .ib{background:repeating-linear-gradient(45deg,#4c78a8 0 2px,#c9d6e8 2px 5px)}
.bar .ii{background:repeating-linear-gradient(45deg,#f58518 0 2px,#f9d3ad 2px 5px)}
tr.cited td{background:#f3fbf4}
"""

MAP_JS = """
(function(){
const svg=document.getElementById('map'); if(!svg) return;
const tip=document.getElementById('tip'), wrap=svg.parentNode, sel=document.getElementById('mapsel');
svg.addEventListener('mousemove',e=>{const t=e.target; if(!t.classList.contains('pt')){tip.style.display='none';return;}
 tip.textContent=t.getAttribute('data-tip'); tip.style.display='block';
 const r=wrap.getBoundingClientRect(); let x=e.clientX-r.left+12, y=e.clientY-r.top+12;
 if(x+tip.offsetWidth>r.width) x=Math.max(0,x-tip.offsetWidth-24); tip.style.left=x+'px'; tip.style.top=y+'px';});
svg.addEventListener('mouseleave',()=>{tip.style.display='none';});
function show(v){ const ids=v?v.split(','):[]; svg.classList.toggle('sel',ids.length>0);
 svg.querySelectorAll('.pt').forEach(p=>p.classList.toggle('on',ids.includes(p.getAttribute('data-c'))));
 svg.querySelectorAll('.mk').forEach(m=>m.classList.toggle('on',m.getAttribute('data-c')===v)); }
if(sel) sel.addEventListener('change',()=>show(sel.value));
document.querySelectorAll('[data-show]').forEach(b=>b.addEventListener('click',()=>{
 if(sel){sel.value=b.getAttribute('data-show');} show(b.getAttribute('data-show'));
 document.getElementById('map-section').scrollIntoView({behavior:'smooth'});}));
})();
"""

COLOUR = {"base": "#4c78a8", "intervention": "#f58518"}


def finding_clusters(view: RunView, f: Finding) -> list[int]:
    """The final clusters a mode finding's cluster became (itself, or its split descendants)."""
    cid = f.row.get("cluster_id")
    if f.kind != "mode" or cid is None:
        return []
    return view.final_descendants(int(cid))


def lineage_text(view: RunView, cluster_id: int) -> str:
    """'7 → 86, 87 (split)' for a cited cluster that was split; '' when it is in the final map."""
    if cluster_id in view.final_ids:
        return ""
    desc = view.final_descendants(cluster_id)
    if desc:
        return f"split; now {', '.join(str(d) for d in desc)}"
    return "retired; no descendant in the final snapshot"


def map_html(view: RunView, findings: Sequence[Finding]) -> str:
    s = view.sample
    if s is None:
        return "<p class='muted'>No embedding sample was recorded.</p>"
    xy = s.xy
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    px = PAD + (xy - lo) / span * np.array([MAP_W - 2 * PAD, MAP_H - 2 * PAD])
    px[:, 1] = MAP_H - px[:, 1]  # SVG y grows downwards
    of_cluster: dict[int, list[int]] = {}
    for f in findings:
        for c in finding_clusters(view, f):
            of_cluster.setdefault(c, []).append(f.number)
    circles = []
    order = np.random.default_rng(0).permutation(len(s.ids))  # neither role is drawn on top of the other
    for i in order.tolist():
        tid, role, cid = s.ids[i], s.roles[i], s.clusters[i]
        t = view.texts.get(tid)
        snippet = (t.text if t else "")[:SNIPPET] + ("…" if t and len(t.text) > SNIPPET else "")
        model = f"{role} ({t.model_id})" if t and t.model_id else role
        where = f"cluster {cid}" if cid is not None else "cluster unknown"
        if cid in of_cluster:
            where += " · finding " + ", ".join(f"#{n}" for n in of_cluster[cid])
        tip = f"{model} · {where}\n{snippet}"
        circles.append(f'<circle class="pt {"i" if role == "intervention" else "b"}" cx="{px[i, 0]:.1f}" '
                       f'cy="{px[i, 1]:.1f}" r="2.6" data-c="{"" if cid is None else cid}" '
                       f'data-tip="{escape(tip)}"/>')
    marks, options = [], ["<option value=''>all texts</option>"]
    placed: list[tuple[float, float]] = []
    pos = {c: [] for c in of_cluster}
    for i, c in enumerate(s.clusters):
        if c in pos:
            pos[c].append(i)
    for f in findings:
        cl = [c for c in finding_clusters(view, f) if pos.get(c)]
        key = ",".join(str(c) for c in finding_clusters(view, f))
        if key:
            options.append(f"<option value='{key}'>finding #{f.number}: cluster{'s' if ',' in key else ''} "
                           f"{key.replace(',', ', ')}</option>")
        if cl:
            idx = [i for c in cl for i in pos[c]]
            x, y = _free_spot(px[idx].mean(axis=0), placed)
            marks.append(f'<g class="mk" data-c="{key}"><text x="{x + 5:.1f}" y="{y - 5:.1f}">#{f.number}</text></g>')
    n_b = sum(1 for r in s.roles if r == "base")
    legend = (f"<span><i class='dot' style='background:{COLOUR['base']}'></i>base ({n_b})</span>"
              f"<span><i class='dot' style='background:{COLOUR['intervention']}'></i>intervention "
              f"({len(s.roles) - n_b})</span>")
    return (f"<p class='muted'>A uniform sample of {len(s.ids):,} embedded texts, PCA to 2-D. Hover a point for"
            f" its text, model and cluster (cluster = {escape(s.cluster_source)}). Pick a finding to light up"
            " its cluster; #n marks where a finding's texts lie.</p>"
            f"<div class='mapctl'><label>highlight <select id='mapsel'>{''.join(options)}</select></label>"
            f" <span class='legend'>{legend}</span></div>"
            f"<div class='mapwrap'><svg id='map' viewBox='0 0 {MAP_W} {MAP_H}' width='{MAP_W}' height='{MAP_H}'"
            f" role='img' aria-label='map of the texts'>{''.join(circles)}{''.join(marks)}</svg>"
            "<div id='tip'></div></div>")


def _free_spot(xy: np.ndarray, placed: list[tuple[float, float]]) -> tuple[float, float]:
    """Where a finding's label goes: its texts' mean, moved down until no earlier label overlaps."""
    x, y = float(xy[0]), float(xy[1])
    while any(abs(x - a) < 34 and abs(y - b) < 15 for a, b in placed):
        y += 15
    placed.append((x, y))
    return x, y


# --------------------------------------------------------------------------- clusters


def own_counts(c: ClusterStats) -> tuple[int, int] | None:
    """(base, intervention) texts assigned to the cluster itself; None when the snapshot did not say
    (written before the field existed) and the cluster has a parent (so it may hold inherited ones)."""
    if c.own_base is not None and c.own_intervention is not None:
        return c.own_base, c.own_intervention
    return (c.count_base, c.count_intervention) if c.parent_id is None else None


def _bar(c: ClusterStats, scale: float) -> str:
    own = own_counts(c)
    ob, oi = own if own else (0, 0)
    ib, ii = (c.count_base - ob, c.count_intervention - oi) if own else (c.count_base, c.count_intervention)
    segs = [("ob", ob, "own base"), ("oi", oi, "own intervention"), ("ib", ib, "inherited base"),
            ("ii", ii, "inherited intervention")]
    title = " · ".join(f"{n} {label}" for _, n, label in segs if n)
    spans = "".join(f"<span class='{cls}' style='width:{100 * n / scale:.2f}%'></span>" for cls, n, _ in segs if n)
    return f"<div class='bar' title='{escape(title)}'>{spans}</div>"


def _share_cell(c: ClusterStats) -> str:
    own = own_counts(c)
    if own is None:
        return "<span class='muted' title='own counts not recorded in this run'>–</span>"
    n = own[0] + own[1]
    if n == 0:
        return "<span class='muted'>– (no own texts yet)</span>"
    return (f"{fmt_pct(own[1] / n)} <span class='muted'>[{fmt_pct(c.share_ci[0])}, {fmt_pct(c.share_ci[1])}]"
            f" of {n}</span>")


def clusters_html(view: RunView, findings: Sequence[Finding]) -> str:
    snap = view.snapshot
    if snap is None or not snap.clusters:
        return "<p class='muted'>No cluster snapshot was recorded.</p>"
    cited: dict[int, list[int]] = {}
    for f in findings:
        for c in finding_clusters(view, f):
            cited.setdefault(c, []).append(f.number)
    ordered = sorted(snap.clusters, key=lambda c: (c.cluster_id not in cited, -c.e_value, c.cluster_id))
    scale = max(c.count_base + c.count_intervention for c in ordered) or 1
    rows = []
    for c in ordered:
        own = own_counts(c)
        anc = view.ancestors(c.cluster_id)
        lineage = " → ".join(str(a) for a in [*reversed(anc), c.cluster_id]) if anc else "–"
        inherited = (c.count_base + c.count_intervention - sum(own)) if own else None
        fs = ", ".join(f"<a href='#finding-{n}'>#{n}</a>" for n in cited.get(c.cluster_id, []))
        rows.append(
            f"<tr id='cluster-{c.cluster_id}' class='{'cited' if c.cluster_id in cited else ''}'>"
            f"<td class='num'>{c.cluster_id}</td><td>{escape(lineage)}</td>"
            f"<td class='num'>{fmt_int(own[0]) if own else '–'} / {fmt_int(own[1]) if own else '–'}</td>"
            f"<td class='num'>{fmt_int(inherited) if inherited is not None else '?'}</td>"
            f"<td style='width:22%'>{_bar(c, scale)}</td><td class='num'>{_share_cell(c)}</td>"
            f"<td class='num'>{fmt_e(c.e_value)}</td><td>{fs}</td></tr>")
    head = ("<tr><th>cluster</th><th>lineage (split from)</th><th>own texts base / interv.</th>"
            "<th>inherited at split</th><th>texts</th><th>intervention share of own texts [CI]</th>"
            "<th>e-value</th><th>findings</th></tr>")
    table = lambda body: f"<table class='clusters'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"  # noqa: E731
    out = [_cluster_intro(view, snap.seq, len(snap.clusters)), table(rows[:CLUSTER_ROWS])]
    if len(rows) > CLUSTER_ROWS:
        out.append(f"<details><summary>{len(rows) - CLUSTER_ROWS} more clusters</summary>"
                   f"{table(rows[CLUSTER_ROWS:])}</details>")
    retired = _retired_cited(view, findings)
    if retired:
        out.append("<p><b>Cited clusters that were later split</b> (they are not in the final snapshot; "
                   "follow the lineage to find their texts):</p><ul>" + "".join(retired) + "</ul>")
    return "".join(out)


def _cluster_intro(view: RunView, seq: int, k: int) -> str:
    return (f"<p class='muted'>The {k} clusters of the final snapshot ({seq}), under their final ids; findings'"
            " clusters first, then by evidence. Solid bars are the cluster's own texts (assigned to it"
            " since it was created): the share, its CI and the e-value are computed on exactly these."
            " Hatched bars are texts inherited from the parent at a split: an estimate, never tested."
            " <span class='legend'><i class='dot' style='background:#4c78a8'></i>base "
            "<i class='dot' style='background:#f58518'></i>intervention</span></p>")


def _retired_cited(view: RunView, findings: Sequence[Finding]) -> list[str]:
    by_cluster: dict[int, list[int]] = {}
    for f in findings:
        cid = f.row.get("cluster_id")
        if f.kind == "mode" and cid is not None and int(cid) not in view.final_ids:
            by_cluster.setdefault(int(cid), []).append(f.number)
    out = []
    for cid, numbers in by_cluster.items():
        desc = view.final_descendants(cid)
        links = ", ".join(f"<a href='#cluster-{d}'>{d}</a>" for d in desc) or "none survives"
        cited = ", ".join(f"#{n}" for n in numbers)
        out.append(f"<li>cluster {cid} (finding{'s' if len(numbers) > 1 else ''} {cited}) → {links}</li>")
    return out


def cluster_counts_line(cand: Mapping[str, Any] | None, totals: Mapping[int, tuple[int, int]]) -> str:
    """'37 of 2,200 intervention texts (1.7%) vs 0 of 2,200 base (0%)' at the candidate's snapshot."""
    if not cand:
        return ""
    seq = int(cand.get("snapshot_seq", 0))
    seqs = [s for s in totals if s <= seq] or list(totals)
    if not seqs:
        return ""
    nb, ni = totals[max(seqs)]
    kb, ki = int(cand.get("count_base", 0)), int(cand.get("count_intervention", 0))
    rate = lambda k, n: fmt_pct(k / n, 1) if n else "–"  # noqa: E731
    return (f"{ki:,} of {ni:,} intervention texts ({rate(ki, ni)}) vs {kb:,} of {nb:,} base ({rate(kb, nb)})"
            f" when it was flagged (snapshot {seq})")
