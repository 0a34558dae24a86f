"""Two services dead-lettering the same record are two dead letters, not one (the sink dedupes by
event id, so an id without the service made the summary count half of them)."""

from __future__ import annotations

from pathlib import Path

from services.core.events import DeadLetter
from services.sink.storage import JsonlLog, read_events


def _dl(service: str, offset: int = 7) -> DeadLetter:
    return DeadLetter(experiment_id="e", source_topic="autointerv.texts", source_partition=0,
                      source_offset=offset, service=service, reason="bad", original_b64="")


def test_same_record_dead_lettered_by_two_services_is_kept_twice(tmp_path: Path) -> None:
    path = tmp_path / "dead_letters.jsonl"
    log = JsonlLog(path, DeadLetter)
    assert log.append(_dl("embedder")) and log.append(_dl("sink"))
    assert not log.append(_dl("embedder"))  # a re-delivery of the same dead letter is still one
    log.close()
    assert sorted(d.service for d in read_events(path, DeadLetter)) == ["embedder", "sink"]
    assert _dl("embedder", 7).event_id() != _dl("embedder", 8).event_id()
