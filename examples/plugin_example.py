"""An example plug-in: counts validated hypotheses per tier and logs each one.

Run it next to a running experiment (same KAFKA_BOOTSTRAP / REDIS_URL / experiment id):

    autointerv service plugin-example --config examples/demo.yaml

after registering it in your package's pyproject.toml:

    [project.entry-points."autointerv.services"]
    plugin-example = "examples.plugin_example:ValidatedCounter"
"""

from __future__ import annotations

from services.core.events import Validation
from services.sdk import consumer


@consumer("validated-counter", Validation)
async def ValidatedCounter(svc, event: Validation) -> None:
    """Logs validated hypotheses and counts them in a Prometheus series."""
    counter = svc.metrics.counter("plugin_validated_total", "Validated hypotheses seen", ["tier"])
    if event.decision == "validated":
        counter.labels(event.tier).inc()
        svc.log.info("validated hypothesis", extra={"tier": event.tier, "hypothesis_id": event.hypothesis_id})
