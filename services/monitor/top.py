"""``autointerv top``: a terminal view of a running process's Prometheus endpoint.

Scrapes ``/metrics`` every ``refresh_s`` seconds, parses it with prometheus_client's text parser
and shows one row per ``service`` label: records processed per second (from the counter's delta
between scrapes), errors, dead letters, consumer lag, healthy, and the age of the last progress.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

PROCESSED = "autointerv_records_processed_total"
PUBLISHED = "autointerv_records_published_total"
ERRORS = "autointerv_errors_total"
DEAD = "autointerv_dead_letters_total"
LAG = "autointerv_consumer_lag"
HEALTHY = "autointerv_healthy"
PROGRESS = "autointerv_last_progress_timestamp_seconds"


@dataclass(frozen=True)
class ServiceRow:
    service: str
    processed: float = 0.0  # counter totals since the process started
    published: float = 0.0
    errors: float = 0.0
    dead_letters: float = 0.0
    lag: float = 0.0  # summed over groups and topics
    healthy: float | None = None
    last_progress: float | None = None  # unix time
    processed_per_s: float | None = None  # None until two scrapes exist

    def progress_age(self, now: float) -> float | None:
        return None if self.last_progress is None else max(0.0, now - self.last_progress)


def scrape(url: str | list[str], timeout_s: float = 5.0) -> list[Metric]:
    """Metric families of one endpoint, or of several (one experiment's processes) together."""
    families: list[Metric] = []
    for u in [url] if isinstance(url, str) else url:
        resp = httpx.get(u, timeout=timeout_s)
        resp.raise_for_status()
        families += text_string_to_metric_families(resp.text)
    return families


def service_rows(families: Iterable[Metric]) -> dict[str, ServiceRow]:
    """Totals per service label from one scrape."""
    sums: dict[str, dict[str, float]] = {}
    fields = {PROCESSED: "processed", PUBLISHED: "published", ERRORS: "errors", DEAD: "dead_letters",
              LAG: "lag", HEALTHY: "healthy", PROGRESS: "last_progress"}
    for fam in families:
        for s in fam.samples:
            field = fields.get(s.name)
            service = s.labels.get("service")
            if field is None or service is None:
                continue
            acc = sums.setdefault(service, {})
            if field in ("healthy", "last_progress"):
                acc[field] = float(s.value)
            else:
                acc[field] = acc.get(field, 0.0) + float(s.value)
    return {svc: ServiceRow(svc, **vals) for svc, vals in sorted(sums.items())}


class TopView:
    """Keeps the previous scrape to turn counters into rates."""

    def __init__(self) -> None:
        self._prev: dict[str, ServiceRow] = {}
        self._prev_t: float | None = None

    def update(self, families: Iterable[Metric], now: float) -> list[ServiceRow]:
        rows = service_rows(families)
        out = []
        for svc, row in rows.items():
            prev = self._prev.get(svc)
            rate = None
            if prev is not None and self._prev_t is not None and now > self._prev_t:
                rate = max(0.0, row.processed - prev.processed) / (now - self._prev_t)
            out.append(replace(row, processed_per_s=rate))
        self._prev, self._prev_t = rows, now
        return out


def _fmt_age(age: float | None) -> str:
    if age is None:
        return "-"
    return f"{age:.0f}s" if age < 120 else f"{age / 60:.0f}m"


def render(rows: list[ServiceRow], url: str | list[str], now: float, error: str | None = None) -> Table:
    where = url if isinstance(url, str) else (url[0] if len(url) == 1 else f"{len(url)} endpoints")
    table = Table(title=f"autointerv top — {where} — {time.strftime('%H:%M:%S', time.localtime(now))}",
                  title_justify="left", caption=error, caption_style="red")
    for col in ("service", "processed/s", "processed", "published", "errors", "dead letters", "lag",
                "healthy", "last progress"):
        table.add_column(col, justify="left" if col == "service" else "right")
    for r in rows:
        healthy = "-" if r.healthy is None else ("[green]yes[/]" if r.healthy >= 1 else "[red]NO[/]")
        rate = "-" if r.processed_per_s is None else f"{r.processed_per_s:,.1f}"
        table.add_row(r.service, rate, f"{r.processed:,.0f}", f"{r.published:,.0f}",
                      f"[red]{r.errors:,.0f}[/]" if r.errors else "0",
                      f"[yellow]{r.dead_letters:,.0f}[/]" if r.dead_letters else "0",
                      f"{r.lag:,.0f}", healthy, _fmt_age(r.progress_age(now)))
    return table


def _frame(view: TopView, url: str | list[str]) -> tuple[list[ServiceRow], Table]:
    now = time.time()
    try:
        rows = view.update(scrape(url), now)
    except (httpx.HTTPError, ValueError) as exc:
        return [], render([], url, now, error=f"scrape failed: {exc}")
    return rows, render(rows, url, now)


def run_top(url: str | list[str] = "http://127.0.0.1:9464/metrics", refresh_s: float = 1.0, once: bool = False,
            console: Console | None = None) -> list[ServiceRow]:
    """Show the live view until Ctrl-C; ``once`` scrapes twice ``refresh_s`` apart (so rates exist),
    prints one frame and returns its rows."""
    console = console or Console()
    view = TopView()
    if once:
        _frame(view, url)
        time.sleep(refresh_s)
        rows, table = _frame(view, url)
        console.print(table)
        return rows
    rows: list[ServiceRow] = []
    with Live(console=console, refresh_per_second=4, screen=False) as live:
        try:
            while True:
                rows, table = _frame(view, url)
                live.update(table)
                time.sleep(refresh_s)
        except KeyboardInterrupt:
            pass
    return rows
