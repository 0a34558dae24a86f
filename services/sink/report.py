"""report.html: one self-contained file (inline CSS, base64 PNG plots, no external resources).

Built from a :class:`~services.sink.writer.FinalRun`, i.e. from the run directory alone.  Plots use
matplotlib's object API on the Agg canvas (no pyplot global state); every text from a model or a
labeler is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.core.events import ClusterSnapshot, TextRef
from services.sink.writer import FinalRun, atomic_write_bytes, candidate_texts, is_finding_row, load_map_sample

log = logging.getLogger("autointerv.sink")

EXAMPLES_PER_SIDE = 3
MAX_BARS = 40
COLOURS: Mapping[str, str] = MappingProxyType({"base": "#4c78a8", "intervention": "#f58518"})

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem;line-height:1.4}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.muted{color:#666;font-size:.9rem}
.cards{display:flex;flex-wrap:wrap;gap:.6rem;margin:1rem 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.5rem .8rem;min-width:8rem}
.card b{display:block;font-size:1.3rem}
table{border-collapse:collapse;width:100%;font-size:.9rem;margin:.5rem 0}
th,td{border-bottom:1px solid #eee;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.validated{color:#1a7f37;font-weight:600}.rejected{color:#b42318}.pending{color:#9a6700}
.ex{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
.ex ul{margin:.2rem 0;padding-left:1.2rem}.ex li{margin-bottom:.3rem;font-size:.88rem}
details{margin:.5rem 0;border:1px solid #eee;border-radius:6px;padding:.4rem .8rem}
img{max-width:100%;height:auto}
"""


# --------------------------------------------------------------------------- formatting


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, float) and 0 < abs(x) < 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(x: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{_num(x, digits)} [{_num(lo, digits)}, {_num(hi, digits)}]"


def _dur(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


# --------------------------------------------------------------------------- plots


def map_figure(run_dir: Path, markers: Mapping[str, set[str]]) -> str | None:
    """PCA of the reservoir sample coloured by model; validated clusters' centroids marked.

    ``markers`` maps a label to the text ids of a validated cluster; its centroid is the mean
    position of those texts that are in the sample (skipped when none is)."""
    path = run_dir / "map_sample.parquet"
    if not path.exists():
        return None
    ids, roles, vectors, _ = load_map_sample(path)
    if len(ids) < 3:
        return None
    from sklearn.decomposition import PCA  # imported lazily: only reports need it

    xy = PCA(n_components=2, random_state=0).fit_transform(vectors)
    fig = Figure(figsize=(7.5, 6))
    ax = fig.add_subplot()
    role_arr = np.asarray(roles)
    for role, colour in COLOURS.items():
        sel = role_arr == role
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.45, c=colour, label=f"{role} ({int(sel.sum())})",
                   linewidths=0)
    pos = {t: i for i, t in enumerate(ids)}
    for label, members in markers.items():
        idx = [pos[t] for t in members if t in pos]
        if idx:
            cx, cy = xy[idx].mean(axis=0)
            ax.scatter([cx], [cy], marker="X", s=140, c="black", edgecolors="white", linewidths=1.2, zorder=5)
            ax.annotate(label, (cx, cy), xytext=(6, 6), textcoords="offset points", fontsize=9, weight="bold")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"Embedding sample ({len(ids)} texts, PCA); X = validated cluster")
    ax.legend(loc="best", markerscale=3)
    return _png(fig)


def clusters_figure(snap: ClusterSnapshot | None, validated_clusters: set[int]) -> str | None:
    """Cluster sizes by model (stacked) and each cluster's intervention share with its CI."""
    if snap is None or not snap.clusters:
        return None
    clusters = sorted(snap.clusters, key=lambda c: -(c.count_base + c.count_intervention))[:MAX_BARS]
    x = np.arange(len(clusters))
    base = np.array([c.count_base for c in clusters])
    interv = np.array([c.count_intervention for c in clusters])
    share = np.array([c.share_intervention for c in clusters])
    lo = np.array([c.share_ci[0] for c in clusters])
    hi = np.array([c.share_ci[1] for c in clusters])
    fig = Figure(figsize=(11, 6.5))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.bar(x, base, color=COLOURS["base"], label="base")
    ax1.bar(x, interv, bottom=base, color=COLOURS["intervention"], label="intervention")
    ax1.set_ylabel("texts")
    ax1.legend()
    ax1.set_title(f"Clusters of snapshot {snap.seq} (largest {len(clusters)} of {len(snap.clusters)})")
    err = np.clip(np.vstack([share - lo, hi - share]), 0, None)
    colours = ["#1a7f37" if c.cluster_id in validated_clusters else "#888" for c in clusters]
    ax2.bar(x, share, color=colours, yerr=err, capsize=2)
    overall = snap.n_intervention / max(1, snap.n_base + snap.n_intervention)
    ax2.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"overall {overall:.2f}")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("intervention share")
    ax2.legend(loc="upper right")
    ax2.set_xticks(x, [str(c.cluster_id) for c in clusters], rotation=90, fontsize=7)
    ax2.set_xlabel("cluster id (green: has a validated hypothesis)")
    return _png(fig)


# --------------------------------------------------------------------------- sections


def _header(final: FinalRun) -> str:
    s = final.summary
    t, cl, tim = s["texts"], s["clusters"], s["timings"]
    q = (cl.get("quality") or {}).get("silhouette")
    rate = s["embeddings"]["cache_hit_rate"]
    cards = [
        ("texts", f"{t['total']}"),
        *((f"texts: {r}", str(n)) for r, n in sorted(t["by_role"].items())),
        ("clusters (k)", str(cl["k"])), ("silhouette", _num(q)),
        ("candidates", str(s["candidates"])), ("hypotheses", str(s["hypotheses"])),
        ("validated", str(len(s["validated"]))), ("BH discoveries", str(s["bh_discoveries"])),
        ("dead letters", str(s["dead_letters"]["total"])),
        ("cache hit rate", "–" if rate is None else f"{100 * rate:.0f}%"),
        ("validator calls", str(s["validator_calls"])), ("cost", f"${s['cost_usd']:.2f}"),
        ("wall time", _dur(tim["wall_s"])), ("first validated after", _dur(tim["time_to_first_validated_s"])),
    ]
    html_cards = "".join(f'<div class="card"><b>{escape(v)}</b>{escape(k)}</div>' for k, v in cards)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["finalized_at"]))
    models = ", ".join(f"{escape(m)}: {n}" for m, n in sorted(t["by_model"].items())) or "–"
    return (f"<h1>autointerv report</h1><div class='muted'>experiment <b>{escape(s['experiment_id'])}</b>"
            f" · written {escape(when)} · α = {s['alpha']} · models: {models}</div>"
            f"<div class='cards'>{html_cards}</div>")


def _hyp_table(rows: Sequence[Mapping[str, Any]], with_decision: bool) -> str:
    headers = ["#", *(["decision"] if with_decision else []), "hypothesis", "direction",
               "share Δ [95% CI]", "AUC [CI]", "p", "q (BH)", "tier", "n pos/neg"]
    out = []
    for r in rows:
        dec = r["decision"]
        out.append([
            str(r["rank"]), *([f'<span class="{escape(dec)}">{escape(dec)}</span>'] if with_decision else []),
            escape(r["text"]), escape(r["direction"]),
            _ci(r["share_diff"], r["share_diff_lo"], r["share_diff_hi"]),
            _ci(r["auc"], r["auc_lo"], r["auc_hi"]), _num(r["p_value"], 4), _num(r["q_value"], 4),
            escape(r["tier"] or "–"), f"{_num(r['n_pos'])}/{_num(r['n_neg'])}",
        ])
    k = 1 if with_decision else 0
    return _table(headers, out, numeric={0, *(i + k for i in (3, 4, 5, 6, 8))})


def _examples(final: FinalRun, row: Mapping[str, Any]) -> dict[str, list[str]]:
    """Up to three texts from each side of the hypothesis's cluster (held-out texts first)."""
    refs: list[TextRef] = []
    cand = final.state.candidates.get(row["candidate_id"])
    if cand is not None:
        refs += candidate_texts(cand)
    hyp = final.state.hypotheses.get(row["hypothesis_id"])
    if hyp is not None:
        refs += hyp.holdout_texts
    out: dict[str, list[str]] = {"intervention": [], "base": []}
    seen: set[str] = set()
    for ref in refs:
        info = final.texts.lookup.get(ref.text_id)
        text = ref.text or (info.text if info else "")
        side = out.get(ref.role)
        if not text or ref.text_id in seen or side is None or len(side) >= EXAMPLES_PER_SIDE:
            continue
        seen.add(ref.text_id)
        side.append(text)
    return out


def _validated_section(final: FinalRun, validated: Sequence[Mapping[str, Any]]) -> str:
    if not validated:
        return ("<h2>Validated hypotheses</h2><p>No hypothesis was validated at the stated error rate."
                " On a run that compares a model with itself this is the expected result.</p>")
    parts = ["<h2>Validated hypotheses</h2>", _hyp_table(validated, with_decision=False)]
    for r in validated:
        ex = _examples(final, r)
        cols = "".join(
            f"<div><b>{escape(side)}</b><ul>{''.join(f'<li>{escape(t)}</li>' for t in texts) or '<li>–</li>'}"
            "</ul></div>" for side, texts in ex.items())
        meta = (f"cluster {r['cluster_id']} · labeler {escape(r['labeler'])} · keywords "
                f"{escape(', '.join(r['keywords'] or [])) or '–'} · tiers {escape(r['tier_path'] or '–')}"
                f" · e-value {_num(r['e_value'], 2)}"
                + (f" · mirrors {escape(str(r['mirror_of'])[:12])}" if r.get("mirror_of") else ""))
        parts.append(f"<details open><summary>#{r['rank']} {escape(r['text'])}</summary>"
                     f"<div class='muted'>{meta}</div><div class='ex'>{cols}</div></details>")
    return "".join(parts)


def _ground_truth_section(gt: Mapping[str, Any] | None) -> str:
    if not gt:
        return ""
    rows = [[escape(b), ", ".join(escape(h[:12]) for h in gt["matched"].get(b, [])) or "<i>missed</i>"]
            for b in gt["planted"]]
    return ("<h2>Ground truth (planted behaviours)</h2>"
            f"<p>precision {_num(gt['precision'])} ({gt['n_validated_matching']}/"
            f"{gt['n_validated'] - gt['n_mirrors']} findings match a behaviour; {gt['n_mirrors']} mirror"
            f" findings grouped under the finding they mirror) · recall {_num(gt['recall'])}"
            f" ({len(gt['planted']) - len(gt['missed'])}/{len(gt['planted'])} behaviours found).</p>"
            "<p class='muted'>A finding is a hypothesis validated on held-out texts. It matches behaviour B"
            f" when its text says B: {escape(str(gt['rule']))}, for findings about the intervention side."
            " Cluster purity is shown per finding in results.jsonl as a diagnostic, not as the rule.</p>"
            + _table(["behaviour", "findings (ids)"], rows))


def render_report(final: FinalRun) -> str:
    rows = final.rows
    validated = [r for r in rows if is_finding_row(r)]  # validated on held-out texts
    others = [r for r in rows if not is_finding_row(r)]
    markers = {}
    for r in validated:
        cand = final.state.candidates.get(r["candidate_id"])
        if cand is not None:
            markers[f"#{r['rank']}"] = {t.text_id for t in candidate_texts(cand)}
    snap = final.state.latest_snapshot
    figs: list[str | None] = []
    try:
        figs = [map_figure(final.run_dir, markers),
                clusters_figure(snap, {int(r["cluster_id"]) for r in validated})]
    except Exception:  # a plot must never cost the run its report
        log.exception("plotting failed")
    figs += [None] * (2 - len(figs))
    map_html = figs[0] or "<p class='muted'>No embedding sample was recorded.</p>"
    cl_html = figs[1] or "<p class='muted'>No cluster snapshot was recorded.</p>"
    dl = final.summary["dead_letters"]["by_topic"]
    body = [
        _header(final),
        _validated_section(final, validated),
        "<h2>Map of the texts</h2>", map_html,
        "<h2>Clusters</h2>", cl_html,
        "<h2>Rejected and pending hypotheses</h2>",
        _hyp_table(others, with_decision=True) if others else "<p>None.</p>",
        _ground_truth_section(final.summary.get("ground_truth")),
        "<h2>Dead letters</h2>",
        _table(["topic", "records"], [[escape(k), str(v)] for k, v in sorted(dl.items())], {1}) if dl
        else "<p>None.</p>",
        "<p class='muted'>Decisions come from the validator cascade (online FDR control at level α);"
        " q-values are Benjamini-Hochberg adjusted across all final p-values at report time. Share Δ is"
        " P(cluster | intervention) − P(cluster | base). Full results: results.jsonl,"
        " hypotheses.parquet.</p>",
    ]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>autointerv · {escape(final.summary['experiment_id'])}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>")


def write_report(final: FinalRun) -> Path:
    path = final.run_dir / "report.html"
    atomic_write_bytes(path, render_report(final).encode())
    return path
