"""The hypotheses table for the terminal (rich) and for pandas."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.sink.writer import DECISION_ORDER, RESULT_SCHEMA

WIDE_TABLE_COLUMNS = 120  # narrower consoles get the stacked layout (_narrow_table)
STYLES: Mapping[str, str] = MappingProxyType({"validated": "bold green", "rejected": "red",
                                              "pending": "yellow"})


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if 0 < abs(x) < 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def _ci(x: Any, lo: Any, hi: Any) -> str:
    return "–" if x is None else f"{_f(x)} [{_f(lo)}, {_f(hi)}]"


def render_table(results_rows: Iterable[Mapping[str, Any]], console: Console,
                 title: str = "Hypotheses") -> None:
    """Print the hypotheses, validated first (then pending, then rejected; by p-value within)."""
    rows = sorted(results_rows, key=lambda r: (DECISION_ORDER.get(r.get("decision", ""), 3),
                                               1.0 if r.get("p_value") is None else r["p_value"]))
    if not rows:
        console.print(f"[bold]{title}[/]: none proposed.")
        return
    if console.width < WIDE_TABLE_COLUMNS:
        console.print(_narrow_table(rows, title))
        return
    table = Table(title=title, show_lines=False, expand=False)
    table.add_column("#", justify="right")
    table.add_column("decision", min_width=9, no_wrap=True)
    table.add_column("side", min_width=4, no_wrap=True)
    table.add_column("hypothesis", overflow="fold", ratio=1, min_width=24)
    table.add_column("share Δ [CI]", justify="right")
    table.add_column("AUC [CI]", justify="right")
    table.add_column("p", justify="right")
    table.add_column("q", justify="right")
    table.add_column("tier")
    for i, r in enumerate(rows, 1):
        dec = str(r.get("decision", ""))
        table.add_row(
            str(i), f"[{STYLES.get(dec, '')}]{dec}[/]" if dec in STYLES else dec, str(r.get("direction", "")),
            Text(str(r.get("text", ""))),  # never parsed as rich markup
            _ci(r.get("share_diff"), r.get("share_diff_lo"), r.get("share_diff_hi")),
            _ci(r.get("auc"), r.get("auc_lo"), r.get("auc_hi")),
            _f(r.get("p_value"), 4), _f(r.get("q_value"), 4), str(r.get("tier") or "–"),
        )
    console.print(table)


def _narrow_table(rows: list[Mapping[str, Any]], title: str) -> Table:
    """Below ``WIDE_TABLE_COLUMNS`` (an 80-column terminal): the numbers go on a line under each
    hypothesis instead of into columns of their own, which a narrow terminal squeezed to nothing."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("decision", no_wrap=True)
    table.add_column("hypothesis, side, evidence", overflow="fold", ratio=1)
    for i, r in enumerate(rows, 1):
        dec = str(r.get("decision", ""))
        cell = Text(str(r.get("text", "")))  # never parsed as rich markup
        cell.append(f"\nshare Δ {_ci(r.get('share_diff'), r.get('share_diff_lo'), r.get('share_diff_hi'))}  "
                    f"AUC {_ci(r.get('auc'), r.get('auc_lo'), r.get('auc_hi'))}\n{r.get('direction', '')}  "
                    f"p {_f(r.get('p_value'), 4)}  q {_f(r.get('q_value'), 4)}  tier {r.get('tier') or '–'}",
                    style="dim")
        table.add_row(str(i), f"[{STYLES.get(dec, '')}]{dec}[/]" if dec in STYLES else dec, cell)
    return table


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """results.jsonl of a run directory as a DataFrame (one row per hypothesis)."""
    path = Path(run_dir) / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: was the run finalised?")
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return pd.DataFrame.from_records(rows, columns=None if rows else RESULT_SCHEMA.names)
