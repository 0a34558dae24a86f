"""An example plug-in consumer: announces validated hypotheses on a topic of its own, counts them
per tier in a Prometheus series and logs each one.

Run it next to a running experiment (same KAFKA_BOOTSTRAP / REDIS_URL / experiment id), without
packaging anything::

    autointerv service --app examples.plugin_example:ValidatedCounter --config examples/demo.yaml

or register it in your package's pyproject.toml and run ``autointerv service plugin-example``::

    [project.entry-points."autointerv.services"]
    plugin-example = "examples.plugin_example:ValidatedCounter"

Its output is idempotent by event id (the alert's id is the validation's), so a redelivered batch
publishes nothing new: tests/test_contract.py runs the contract battery on it.
"""

from __future__ import annotations

from typing import ClassVar

from services.core.events import Event, Validation
from services.sdk import consumer


class ValidatedAlert(Event):
    """One validated hypothesis, announced once (downstream: a chat hook, a pager, a dashboard)."""

    topic: ClassVar[str] = "alerts"
    type: ClassVar[str] = "example.hypothesis.validated"

    validation_id: str
    hypothesis_id: str
    tier: str
    auc: float | None = None

    def event_id(self) -> str:
        return self.validation_id  # the same validation redelivered is the same alert


@consumer("validated-counter", Validation, produces=(ValidatedAlert,))
async def ValidatedCounter(svc, event: Validation) -> ValidatedAlert | None:
    """Announces, counts and logs validated hypotheses."""
    if event.decision != "validated":
        return None
    counter = svc.metrics.counter("plugin_validated_total", "Validated hypotheses seen", ["tier"])
    counter.labels(event.tier).inc()
    svc.log.info("validated hypothesis", extra={"tier": event.tier, "hypothesis_id": event.hypothesis_id})
    return ValidatedAlert(experiment_id=event.experiment_id, validation_id=event.validation_id,
                          hypothesis_id=event.hypothesis_id, tier=event.tier, auc=event.auc)
