"""Sink service: every result stream in, one run directory out (``runs/<experiment-id>/``).

Event logs are appended and flushed within the batch; texts and the embedding index are buffered
and written as Parquet parts every ``flush_rows`` rows or ``flush_s`` seconds.  Offsets are held
back (``before_commit``) while buffered rows are unwritten, so a crash re-delivers them instead of
losing them, and every stream dedupes by event id.  :meth:`SinkService.finalize` merges the parts
and writes the results, summary and report; it also runs from ``teardown`` when it has not yet.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import ClassVar

from aiokafka import TopicPartition

from services.core.config import dump_config
from services.core.events import (
    CandidateCluster,
    ClusterSnapshot,
    ControlEvent,
    DeadLetter,
    DecodedText,
    EmbeddedText,
    GenerationReport,
    Hypothesis,
    UncertaintyEvent,
    Validation,
)
from services.core.runtime import Incoming, Service, ServiceContext
from services.sink.finalize import FinalRun, finalize_run
from services.sink.run_writer import RunWriter
from services.sink.storage import update_latest_link


class SinkService(Service):
    name: ClassVar[str] = "sink"
    consumes = (DecodedText, EmbeddedText, GenerationReport, ClusterSnapshot, UncertaintyEvent, CandidateCluster,
                Hypothesis, Validation, ControlEvent, DeadLetter)
    reservoir_size: ClassVar[int] = 3000  # embedded texts kept for the 2-D map
    flush_rows: ClassVar[int] = 2000  # buffered text/embedding rows per Parquet part, at most
    flush_s: ClassVar[float] = 5.0  # ... or this old
    reservoir_save_s: ClassVar[float] = 30.0

    def __init__(self, ctx: ServiceContext, run_dir: str | Path | None = None) -> None:
        super().__init__(ctx)
        default_dir = Path(self.cfg.experiment.run_dir) / ctx.experiment_id
        self.run_dir = Path(run_dir) if run_dir is not None else default_dir
        self.writer = RunWriter(self.run_dir, self.reservoir_size, self.cfg.experiment.seed,
                                self.flush_rows, self.flush_s)
        self.received: Counter[str] = Counter()  # records handled per logical topic, duplicates included
        self.written: Counter[str] = Counter()  # new events (texts/embeddings dedupe later, at the merge)
        self.final: FinalRun | None = None
        # why the process stopped when the controller did not announce the end (summary.json's
        # stopped_because: "signal", "broker_lost", ...); None while running
        self.stop_cause: str | None = None
        self._held: dict[TopicPartition, int] = {}
        self._lock = asyncio.Lock()
        self._opened = False
        self._finalized = False
        self._last_reservoir_save = self.clock.monotonic()
        self.m_written = self.metrics.counter("sink_events_written_total",
                                              "Events written to the run directory", ["topic"])
        self.m_dupes = self.metrics.counter("sink_duplicates_total", "Re-delivered events skipped", ["topic"])

    def _open(self) -> None:
        if not self._opened:
            self.writer.open(dump_config(self.cfg, mask_secrets=True))
            update_latest_link(self.run_dir.parent, self.run_dir.name)
            self._opened = True

    async def setup(self) -> None:
        self._open()
        self.log.info("writing run directory", extra={"run_dir": str(self.run_dir)})

    async def handle(self, batch: list[Incoming]) -> None:
        for item in batch:
            topic = item.event.topic
            self.received[topic] += 1
            if self.writer.add(item.event):
                self.written[topic] += 1
                self.m_written.labels(topic).inc()
            else:
                self.m_dupes.labels(topic).inc()
        self.writer.flush_logs()
        if self.writer.parts_due():
            self.writer.flush_parts()
        self._finalized = False

    async def tick(self) -> None:
        if self.writer.parts_due():
            self.writer.flush_parts()
        if self.clock.monotonic() - self._last_reservoir_save >= self.reservoir_save_s:
            self._last_reservoir_save = self.clock.monotonic()
            self.writer.save_reservoir()

    async def before_commit(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int] | None:
        """Commit only once no buffered row is unwritten (else hold the offsets for later)."""
        for tp, off in offsets.items():
            self._held[tp] = max(self._held.get(tp, 0), off)
        if self.writer.unflushed_rows():
            return None
        held, self._held = self._held, {}
        return held

    async def drain(self) -> dict[TopicPartition, int] | None:
        self.writer.flush_all()
        held, self._held = self._held, {}
        return held or None

    async def finalize(self) -> FinalRun:
        """Write the final files and report.html; repeated calls without new events are no-ops."""
        async with self._lock:
            if self._finalized and self.final is not None:
                return self.final
            self._open()
            self.writer.flush_all()
            self.final = await asyncio.to_thread(
                finalize_run, self.run_dir, self.cfg.validator.alpha, self.ctx.experiment_id,
                self.ctx.topics.prefix, ground_truth=self.cfg.ground_truth.enabled, config=self.cfg,
                stopped_because=self.stop_cause)
            self._finalized = True
            s = self.final.summary
            self.log.info("run finalised", extra={"run_dir": str(self.run_dir), "texts": s["texts"]["total"],
                                                  "hypotheses": s["hypotheses"],
                                                  "validated": len(s["validated"])})
            return self.final

    async def teardown(self) -> None:
        try:
            await self.finalize()
        except Exception:  # the event logs are on disk; `finalize` can be rerun
            self.log.exception("finalisation failed")
        finally:
            self.writer.close()
