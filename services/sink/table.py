"""The findings table for the terminal (rich) and the results as a pandas DataFrame.

One row per finding (:mod:`services.sink.findings`): share statements, mirrors and rejected
hypotheses are counted under the table, not listed as rows.  Fits an 80-column terminal: the
finding column takes what the numbers leave and wraps; the offline labeler's quoted example is
left out here (report.html and results.jsonl have it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.sink.findings import Finding, group_rows, paired_value
from services.sink.formatting import DASH, finite, fmt_num, fmt_p, fmt_pp
from services.sink.results import RESULT_SCHEMA


def claim(text: str) -> str:
    """The description without the offline labeler's 'Typical: “…”' example."""
    return text.partition(" Typical: ")[0].strip()


def _effect(f: Finding) -> str:
    r = f.row
    if f.kind == "paired":
        eff, lo, hi = (paired_value(r, k) for k in ("effect", "lo", "hi"))
        if eff is None:
            return DASH
        return fmt_num(eff) + (f"\n[{fmt_num(lo)},{fmt_num(hi)}]" if lo is not None and hi is not None else "")
    d, lo, hi = finite(r.get("share_diff")), finite(r.get("share_diff_lo")), finite(r.get("share_diff_hi"))
    if d is None:
        return DASH
    return fmt_pp(d) + (f"\n[{100 * lo:+.1f},{100 * hi:+.1f}]" if lo is not None and hi is not None else "")


def render_table(results_rows: Iterable[Mapping[str, Any]], console: Console, title: str = "Findings") -> None:
    """Print one row per finding (mode findings, then paired), then what else was decided."""
    g = group_rows(results_rows)
    n_mode, n_paired = len(g.of_kind("mode")), len(g.of_kind("paired"))
    n_rej = sum(1 for r in g.not_validated if r.get("decision") == "rejected")
    n_mirrors = sum(len(f.mirrors) for f in g.findings)
    tail = (f"Not counted as findings: {len(g.share_statements)} share statement(s) (evidence beside a finding)"
            f", {n_mirrors} mirror(s), {n_rej} rejected and {len(g.not_validated) - n_rej} pending hypothesis(es)."
            " Effect: share difference in percentage points (mode), P(side's answer > partner's) (paired)."
            " Details: report.html, results.jsonl.")
    if not g.findings:
        console.print(f"[bold]{title}[/]: none validated on held-out texts.")
        console.print(Text(tail, style="dim"))
        return
    table = Table(title=f"{title}: {len(g.findings)} ({n_mode} mode, {n_paired} paired)", expand=False,
                  title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("finding", overflow="fold", ratio=1, min_width=20)
    table.add_column("effect", justify="right", no_wrap=True)
    table.add_column("AUC", justify="right", no_wrap=True)
    table.add_column("p", justify="right", no_wrap=True)
    for f in g.findings:
        r = f.row
        words = claim(str(r.get("text", "")))
        if f.kind == "paired":
            words = "[paired] " + words
        if f.mirrors:
            words += f" (+{len(f.mirrors)} mirror)"
        table.add_row(str(f.number), Text(words),  # never parsed as rich markup
                      _effect(f), fmt_num(r.get("auc")), fmt_p(r.get("p_value")))
    console.print(table)
    console.print(Text(tail, style="dim"))


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """results.jsonl of a run directory as a DataFrame (one row per hypothesis)."""
    path = Path(run_dir) / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: was the run finalised?")
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return pd.DataFrame.from_records(rows, columns=None if rows else RESULT_SCHEMA.names)
