"""The sink: the run directory (texts, clusters, hypotheses, results, summary) and report.html."""

from services.sink.finalize import FinalRun, finalize_run
from services.sink.service import SinkService
from services.sink.table import load_results, render_table

__all__ = ["FinalRun", "SinkService", "finalize_run", "load_results", "render_table"]
