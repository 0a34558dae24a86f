"""Plain progress lines for runs whose stdout is not a terminal (CI, nohup, ``| tee``, systemd).

Rich's live table redraws in place, which a log file cannot show; there such a run printed nothing
for its whole length.  :class:`PlainProgress` turns the same numbers the live table shows
(``controller.progress()`` plus three metric totals, gathered by :func:`snapshot`) into one line
every ``interval_s``: share of the generation budget, texts per second over the last minute, an
ETA, and what has been clustered and validated so far::

    [   95s] 47% of budget (2,800/6,000 texts) | 31.5 texts/s | ETA 1m42s | round 6 | embedded 2,790
    | clustered 2,650 | hypotheses 5 | validated 3          (one line; wrapped here)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from services.core.metrics import Metrics

RATE_WINDOW_S = 60.0  # texts/s over this trailing window (the whole run until it has passed)


@dataclass(frozen=True)
class ProgressSnapshot:
    """One reading of a run's progress: the numbers of the live table, typed."""

    round: int
    planned: int
    generated: int
    embedded: int
    clustered: int
    candidates: int
    hypotheses: int
    validated: int
    dead_letters: int


def _int(p: Mapping[str, Any], key: str) -> int:
    v = p.get(key)
    return int(v) if isinstance(v, int | float) else 0


def snapshot(progress: Mapping[str, Any], metrics: Metrics) -> ProgressSnapshot:
    """``progress`` is ``controller.progress()``; the rest comes from the process's metrics."""
    return ProgressSnapshot(
        round=_int(progress, "round"), planned=_int(progress, "planned"),
        generated=int(metrics.total("generator_texts_total")),
        embedded=int(metrics.total("records_processed_total", service="embedder", topic="texts")),
        clustered=_int(progress, "clustered"), candidates=_int(progress, "candidates"),
        hypotheses=_int(progress, "hypotheses"), validated=_int(progress, "validated"),
        dead_letters=int(metrics.total("dead_letters_total")))


def _duration(s: float) -> str:
    s = max(0, round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class PlainProgress:
    """Formats a snapshot as a line and prints one at most every ``interval_s`` seconds."""

    def __init__(self, budget_texts: int, interval_s: float = 10.0, started: float | None = None) -> None:
        self.budget = max(1, budget_texts)
        self.interval_s = interval_s
        self.started = time.monotonic() if started is None else started
        self._samples: deque[tuple[float, int]] = deque()
        self._last_print: float | None = None

    def rate(self, generated: int, now: float) -> float | None:
        """Texts per second over the trailing window; None before two readings."""
        self._samples.append((now, generated))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()
        t0, g0 = self._samples[0]
        return (generated - g0) / (now - t0) if now > t0 else None

    def line(self, snap: ProgressSnapshot, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        rate = self.rate(snap.generated, now)
        share = min(1.0, snap.generated / self.budget)
        left = max(0, self.budget - snap.generated)
        if left == 0:
            eta = "ETA 0s"
        elif rate and rate > 0:
            eta = f"ETA {_duration(left / rate)}"
        else:
            eta = "ETA -"
        speed = "- texts/s" if rate is None else f"{rate:.1f} texts/s"
        parts = [f"[{_duration(now - self.started):>6}] {share:.0%} of budget "
                 f"({snap.generated:,}/{self.budget:,} texts)", speed, eta, f"round {snap.round}",
                 f"embedded {snap.embedded:,}", f"clustered {snap.clustered:,}",
                 f"hypotheses {snap.hypotheses}", f"validated {snap.validated}"]
        if snap.dead_letters:
            parts.append(f"dead letters {snap.dead_letters:,}")
        return " | ".join(parts)

    def maybe_print(self, snap: ProgressSnapshot, stream: TextIO, now: float | None = None,
                    force: bool = False) -> bool:
        """Print a line if ``interval_s`` has passed since the last one (or ``force``)."""
        now = time.monotonic() if now is None else now
        if not force and self._last_print is not None and now - self._last_print < self.interval_s:
            return False
        self._last_print = now
        print(self.line(snap, now), file=stream, flush=True)
        return True
